"""Configuration: frozen dataclasses, built once from the command line.

Nothing here touches the kernel or the network; every value is validated when
the dataclass is built (``__post_init__``), so the rest of the program never
re-checks a flag. The defaults are written here and nowhere else: the CLI
passes only the flags the user gave and reads ``--help`` defaults from the
fields. The ``parse_*`` helpers only turn text into a value; ranges are the
dataclasses' job. Errors are :class:`ConfigError` and carry one
human-readable line, naming the flag.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The reference design's cluster ranges, plus IPv6 unique-local addresses.
DEFAULT_INTERCEPT_CIDRS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("172.16.0.0/12"),
    ipaddress.ip_network("192.168.0.0/16"),
    ipaddress.ip_network("fc00::/7"),
)


#: Left out of UDP interception unless ``--intercept-dns``.
DNS_PORT = 53


class ConfigError(ValueError):
    """A bad flag, file or value. ``str(exc)`` is the one line shown to the user."""


#: Routing tables the kernel owns (default, main, local): never ours to fill.
RESERVED_ROUTE_TABLES: tuple[int, ...] = (253, 254, 255)
U32_MAX = 0xFFFFFFFF


def parse_cidr(text: str) -> IPNetwork:
    """``10.0.0.0/8`` or ``fc00::/7``; a network with host bits set is refused.

    ``10.1.2.3/8`` is almost always a typo for a /32 or a different prefix:
    silently widening it to 10.0.0.0/8 would intercept far more than asked.
    """
    text = text.strip()
    try:
        return ipaddress.ip_network(text)
    except ValueError as exc:
        try:
            widened = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ConfigError(f"invalid CIDR {text!r}: {exc}") from None
        raise ConfigError(
            f"invalid CIDR {text!r}: host bits set (the network is {widened}; write that, "
            f"or /{widened.max_prefixlen} for one address)"
        ) from None


def parse_int(text: str, what: str = "number", base: int = 10) -> int:
    """An integer flag (its range is checked by the dataclass that holds it)."""
    try:
        return int(text, base)
    except ValueError:
        raise ConfigError(f"invalid {what} {text!r}: not a number") from None


def parse_port(text: str) -> int:
    return parse_int(text, "port")


def parse_mark(text: str) -> int:
    """Decimal, or 0x.. (marks are often written in hex, as ``ip rule`` shows them)."""
    return parse_int(text, "mark", base=0)


def parse_seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"invalid duration {text!r}: not a number of seconds") from None


def check_port(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(f"invalid port {value!r} for {what}: must be in 1..65535")


def check_mark(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= U32_MAX:
        raise ConfigError(f"invalid mark {value!r} for {what}: must be in 1..0xffffffff")


def check_positive(value: float, what: str) -> None:
    # `not value > 0` also refuses NaN.
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"invalid {what} {value!r}: must be > 0")


def check_at_least_zero(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"invalid {what} {value!r}: must be an integer >= 0")


def check_networks(networks: tuple[IPNetwork, ...], what: str) -> None:
    for net in networks:
        if not isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise ConfigError(f"invalid {what} {net!r}: not an IP network")


def parse_spiffe_id(text: str) -> tuple[str, str]:
    """Split ``spiffe://<trust-domain>/<path>`` into (trust domain, path).

    A trailing ``/`` is allowed (it makes an allow-list prefix).
    """
    prefix = "spiffe://"
    if not text.startswith(prefix):
        raise ConfigError(f"invalid SPIFFE ID {text!r}: must start with {prefix}")
    rest = text[len(prefix) :]
    domain, _, path = rest.partition("/")
    check_trust_domain(domain, what=f"SPIFFE ID {text!r}")
    return domain, "/" + path if path or rest.endswith("/") else ""


def check_trust_domain(domain: str, *, what: str = "trust domain") -> str:
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-._")
    if not domain or not set(domain) <= allowed:
        raise ConfigError(
            f"invalid {what}: trust domain {domain!r} must be non-empty lowercase letters, "
            "digits, '-', '.', '_'"
        )
    return domain


@dataclass(frozen=True)
class Timeouts:
    """Seconds. Every wait on a peer is bounded by one of these."""

    handshake: float = 10.0
    connect: float = 5.0
    #: Inactivity allowed to the direction still open after the other has
    #: finished (a server may stream its answer for hours after the client's FIN,
    #: as long as bytes keep moving).
    half_close: float = 60.0
    #: Inactivity (no byte forwarded either way) after which a relayed
    #: connection is reset.  Envoy's TCP proxy default; keep-alive pools and
    #: gRPC pings stay well under it.
    idle: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("handshake", "connect", "half_close", "idle"):
            check_positive(getattr(self, name), f"--{name.replace('_', '-')}-timeout")


@dataclass(frozen=True)
class Limits:
    """What one sidecar holds at once; over a limit a new connection is reset at accept.

    Sized for a pod with a 256 MiB memory limit, where one connection costs
    55-60 KB (TLS state, two sockets, the relay) and the process itself
    about 43 MB: see :mod:`trio_tproxy.limits`.
    """

    #: Connections held at once, both directions, from accept to close.
    max_connections: int = 2048
    #: Inbound connections accepted and not yet past the TLS handshake and the
    #: identity check (unauthenticated: anyone who can reach the pod).
    max_pending_handshakes: int = 512
    #: The same, per source address: one flooder cannot take all of them.
    max_pending_per_source: int = 64

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_pending_handshakes", "max_pending_per_source"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"invalid --{name.replace('_', '-')} {value!r}: must be an integer >= 1"
                )


@dataclass(frozen=True)
class TLSFiles:
    """Where our credentials are.  ``cert == key`` is a credential bundle (the
    Kubernetes podCertificate format: a PKCS#8 key then the chain, one file),
    read in one go so a rotation can never pair a key with another's certificate."""

    cert: Path
    key: Path
    ca_cert: Path

    @classmethod
    def bundle(cls, bundle: Path, ca_cert: Path) -> TLSFiles:
        return cls(cert=bundle, key=bundle, ca_cert=ca_cert)

    @property
    def is_bundle(self) -> bool:
        return self.cert == self.key

    @property
    def paths(self) -> tuple[Path, ...]:
        """Each distinct file, for the reload watcher."""
        return tuple(dict.fromkeys((self.cert, self.key, self.ca_cert)))


@dataclass(frozen=True)
class IdentityPolicy:
    """How a peer's certificate must name it.

    ``spiffe``: exactly one URI SAN in ``trust_domain``, optionally in ``allow_ids``
    (exact IDs, or prefixes ending in ``/``). ``ip``: the server's certificate must
    carry an IP SAN equal to the original destination (client certificates are
    then only chain-verified, as in the reference design).
    """

    mode: Literal["spiffe", "ip"] = "spiffe"
    trust_domain: str = "cluster.local"
    allow_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in ("spiffe", "ip"):
            raise ConfigError(f"invalid verify mode {self.mode!r}: must be spiffe or ip")
        check_trust_domain(self.trust_domain)
        for allowed in self.allow_ids:
            domain, _ = parse_spiffe_id(allowed)
            if domain != self.trust_domain:
                raise ConfigError(
                    f"--allow-id {allowed!r} is outside trust domain {self.trust_domain!r}"
                )


@dataclass(frozen=True)
class Interception:
    """What the nftables table and the policy routes intercept, and how."""

    table: str = "trio_tproxy"
    intercept_cidrs: tuple[IPNetwork, ...] = DEFAULT_INTERCEPT_CIDRS
    exclude_cidrs: tuple[IPNetwork, ...] = ()
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    #: Plaintext (egress) listener and TLS (ingress) listener, on loopback.
    tcp_port: int = 1
    tls_port: int = 2
    #: Packets marked with this are recirculated through ``lo`` into the proxy.
    recirculate_mark: int = 10
    #: The proxy's own sockets carry this so they are never intercepted.
    bypass_mark: int = 12
    #: SO_MARK of the ingress dial that keeps the client's address (IP_TRANSPARENT,
    #: bound to the client IP): conntrack remembers it so that the app's replies,
    #: addressed to the client, are routed back to the sidecar through ``lo``.
    preserve_mark: int = 13
    #: Plaintext probe server for the kubelet (``/app-health/NAME``); its inbound
    #: TCP is never intercepted. 0: no probe port.
    probe_port: int = 15021
    #: Policy-routing table holding the ``local`` default routes.
    route_table: int = 10
    #: Priority of the ``ip rule`` (0 lets the kernel choose, like ``ip rule add``).
    rule_priority: int = 0
    #: UDP (opt-in): egress UDP to the intercept CIDRs goes to the UDP listener on
    #: ``udp_listen_port`` (loopback), and is carried to the peer's ``dtls_port`` over DTLS.
    intercept_udp: bool = False
    udp_listen_port: int = 1
    #: The UDP port peers send DTLS to (on the wire, unlike ``tls_port``).
    dtls_port: int = 2
    #: If not empty, only egress UDP to these remote ports is intercepted.
    udp_ports: tuple[int, ...] = ()
    #: UDP ports never intercepted, either way (local port inbound, remote outbound).
    exclude_udp_ports: tuple[int, ...] = ()
    #: DNS (UDP port 53) is left alone unless this is set: the cluster's
    #: resolvers have no sidecar to speak DTLS with.
    intercept_dns: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", self.table):
            raise ConfigError(
                f"invalid nft table name {self.table!r}: an ASCII letter, then letters, digits, '_'"
            )
        check_networks(self.intercept_cidrs, "--intercept-cidr")
        check_networks(self.exclude_cidrs, "--exclude-cidr")
        check_port(self.tcp_port, "--tcp-port")
        check_port(self.tls_port, "--tls-port")
        for port in self.exclude_inbound_ports:
            check_port(port, "--exclude-inbound-port")
        for port in self.exclude_outbound_ports:
            check_port(port, "--exclude-outbound-port")
        if self.tcp_port == self.tls_port:
            raise ConfigError(f"--tcp-port and --tls-port are both {self.tcp_port}")
        self._check_udp()
        check_mark(self.recirculate_mark, "--recirculate-mark")
        check_mark(self.bypass_mark, "--bypass-mark")
        check_mark(self.preserve_mark, "--preserve-mark")
        marks = {
            "--recirculate-mark": self.recirculate_mark,
            "--bypass-mark": self.bypass_mark,
            "--preserve-mark": self.preserve_mark,
        }
        for i, (flag, value) in enumerate(marks.items()):
            for other, value2 in list(marks.items())[i + 1 :]:
                if value == value2:
                    raise ConfigError(f"{flag} and {other} are both {value}: they must differ")
        if self.probe_port:
            check_port(self.probe_port, "--probe-port")
            if self.probe_port in (self.tcp_port, self.tls_port):
                raise ConfigError(
                    f"--probe-port {self.probe_port} is also a listener port of the proxy"
                )
        table = self.route_table
        if (
            isinstance(table, bool)
            or not isinstance(table, int)
            or not 1 <= table <= U32_MAX
            or table in RESERVED_ROUTE_TABLES
        ):
            raise ConfigError(
                f"invalid route table {table!r}: must be in 1..{U32_MAX}, and 253, 254, 255 "
                "are reserved (the kernel's default, main and local tables)"
            )
        if isinstance(self.rule_priority, bool) or not 0 <= self.rule_priority <= U32_MAX:
            raise ConfigError(
                f"invalid rule priority {self.rule_priority!r}: must be in 0..{U32_MAX} "
                "(0: the kernel chooses)"
            )

    def _check_udp(self) -> None:
        check_port(self.udp_listen_port, "--udp-listen-port")
        check_port(self.dtls_port, "--dtls-port")
        if self.udp_listen_port == self.dtls_port:
            raise ConfigError(f"--udp-listen-port and --dtls-port are both {self.dtls_port}")
        for port in self.udp_ports:
            check_port(port, "--udp-port")
        for port in self.exclude_udp_ports:
            check_port(port, "--exclude-udp-port")
        if self.dtls_port in self.exclude_udp_ports:
            raise ConfigError(f"--exclude-udp-port {self.dtls_port} is the --dtls-port")

    @property
    def udp_excluded(self) -> tuple[int, ...]:
        """UDP ports left alone both ways: the excluded ones, and DNS unless intercepted."""
        dns = () if self.intercept_dns else (DNS_PORT,)
        return tuple(sorted({*self.exclude_udp_ports, *dns}))

    @property
    def cidrs4(self) -> tuple[ipaddress.IPv4Network, ...]:
        return tuple(n for n in self.intercept_cidrs if isinstance(n, ipaddress.IPv4Network))

    @property
    def cidrs6(self) -> tuple[ipaddress.IPv6Network, ...]:
        return tuple(n for n in self.intercept_cidrs if isinstance(n, ipaddress.IPv6Network))

    @property
    def excluded4(self) -> tuple[ipaddress.IPv4Network, ...]:
        return tuple(n for n in self.exclude_cidrs if isinstance(n, ipaddress.IPv4Network))

    @property
    def excluded6(self) -> tuple[ipaddress.IPv6Network, ...]:
        return tuple(n for n in self.exclude_cidrs if isinstance(n, ipaddress.IPv6Network))


#: Schemes of ``--app-probe`` targets.
PROBE_SCHEMES = ("http", "tcp", "grpc")


@dataclass(frozen=True)
class AppProbe:
    """``NAME=SCHEME://HOST:PORT[/PATH]``: how the probe server checks one app health."""

    name: str
    scheme: Literal["http", "tcp", "grpc"]
    host: str
    port: int
    #: HTTP: the path (with query); gRPC: the service name ("" = the server as a whole).
    path: str = "/"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", self.name):
            raise ConfigError(
                f"invalid --app-probe name {self.name!r}: letters, digits, '_', '.', '-'"
            )
        if self.scheme not in PROBE_SCHEMES:
            raise ConfigError(
                f"invalid --app-probe scheme {self.scheme!r}: one of {', '.join(PROBE_SCHEMES)}"
            )
        check_port(self.port, "--app-probe")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ConfigError(
                f"invalid --app-probe host {self.host!r}: an IP address (the app on loopback)"
            ) from None


def parse_app_probe(text: str) -> AppProbe:
    """``NAME=http://127.0.0.1:8080/healthz``, ``NAME=tcp://127.0.0.1:5432``,
    ``NAME=grpc://127.0.0.1:9090[/service]``."""
    from urllib.parse import urlsplit

    name, sep, url = text.partition("=")
    if not sep:
        raise ConfigError(f"invalid --app-probe {text!r}: expected NAME=SCHEME://HOST:PORT[/PATH]")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid --app-probe {text!r}: {exc}") from None
    if not parts.hostname or port is None:
        raise ConfigError(f"invalid --app-probe {text!r}: needs HOST:PORT")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if parts.scheme == "grpc":
        path = parts.path.lstrip("/")
    return AppProbe(name, parts.scheme, parts.hostname, port, path)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Ingress:
    """What the app sees of inbound connections, and who may reach it in plaintext."""

    #: Dial the app from the client's own address (IP_TRANSPARENT + preserve mark).
    preserve_client_ip: bool = True
    #: Legacy: dial the app at 127.0.0.1/::1 (exposes localhost-only listeners to the mesh).
    inbound_to_loopback: bool = False
    #: strict: only mutual TLS from a sidecar; permissive: anything else goes to the app as is.
    inbound_mode: Literal["strict", "permissive"] = "strict"
    #: Ports that are permissive whatever ``inbound_mode`` says.
    permissive_ports: tuple[int, ...] = ()
    #: Probe targets served on ``Interception.probe_port``.
    app_probes: tuple[AppProbe, ...] = ()
    #: Seconds a probe waits for the app when the kubelet does not say.
    probe_timeout: float = 1.0

    def __post_init__(self) -> None:
        if self.inbound_mode not in ("strict", "permissive"):
            raise ConfigError(
                f"invalid --inbound-mode {self.inbound_mode!r}: must be strict or permissive"
            )
        for port in self.permissive_ports:
            check_port(port, "--permissive-port")
        names = [p.name for p in self.app_probes]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(f"--app-probe {name!r} is given twice")
        check_positive(self.probe_timeout, "--probe-timeout")

    def permissive(self, port: int) -> bool:
        return self.inbound_mode == "permissive" or port in self.permissive_ports


@dataclass(frozen=True)
class ProxyConfig:
    """Everything ``trio-tproxy run`` needs, validated."""

    tls: TLSFiles
    identity: IdentityPolicy = field(default_factory=IdentityPolicy)
    interception: Interception = field(default_factory=Interception)
    timeouts: Timeouts = field(default_factory=Timeouts)
    ingress: Ingress = field(default_factory=Ingress)
    limits: Limits = field(default_factory=Limits)
    verbosity: int = 0
    #: Install nftables rules and routes (False: an init container did it).
    manage_rules: bool = True
    #: Seconds between route checks (the IPv6 local route vanishes when lo flaps).
    route_check_interval: float = 5.0
    #: TLS sessions kept for resumption towards peers (0: always full handshakes).
    session_cache: int = 4096
    #: Key-exchange groups for OpenSSL (None: its default, with the ML-KEM hybrid).
    tls_groups: str | None = None
    #: With ``manage_rules`` False: seconds to wait for the rules another
    #: process (an init container) installs before giving up.
    rules_wait: float = 10.0
    #: Seconds between two looks (stat) at the credential files for a change.
    credential_poll: float = 2.0
    #: Warn when our certificate has less than this fraction of its lifetime left.
    expiry_warning_fraction: float = 1 / 3

    #: Seconds to let connections finish after SIGTERM (see lifecycle): well
    #: inside Kubernetes' default 30 s grace period, leaving time to exit.
    drain_timeout: float = 20.0
    #: New connections during the drain: ``accept`` (a classic sidecar: the
    #: app may still open egress while it shuts down) or ``refuse`` (close the
    #: listeners; the fail-closed ruleset resets what arrives).
    drain_new: Literal["accept", "refuse"] = "accept"
    #: What happens to the rules on exit: ``remove`` (a developer's run leaves
    #: nothing behind) or ``keep`` (a pod: the fail-closed ruleset refuses
    #: traffic until the sidecar is back; never plaintext).
    on_exit: Literal["remove", "keep"] = "remove"
    #: Admin HTTP server (/healthz, /readyz, /metrics) port; 0: off.  Excluded
    #: from inbound interception (``Interception.exclude_inbound_ports``).
    admin_port: int = 15020
    #: Log lines: ``text`` (one line per connection) or ``json`` (one object per line).
    log_format: Literal["text", "json"] = "text"
    #: UDP (with ``interception.intercept_udp``): seconds a flow may stay silent
    #: both ways before it ends, and the most flows carried at once.
    udp_idle_timeout: float = 60.0
    udp_max_flows: int = 4096
    #: Link MTU towards peers: a DTLS record, its UDP and IP headers must fit.
    udp_mtu: int = 1500

    def __post_init__(self) -> None:
        check_positive(self.credential_poll, "--credential-poll")
        check_positive(self.drain_timeout, "--drain-timeout")
        if self.drain_new not in ("accept", "refuse"):
            raise ConfigError(f"invalid --drain-new {self.drain_new!r}: accept or refuse")
        if self.on_exit not in ("remove", "keep"):
            raise ConfigError(f"invalid --on-exit {self.on_exit!r}: remove or keep")
        if self.admin_port != 0:
            check_port(self.admin_port, "--admin-port")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"invalid --log-format {self.log_format!r}: text or json")
        check_positive(self.udp_idle_timeout, "--udp-idle-timeout")
        check_positive(self.udp_max_flows, "--udp-max-flows")
        if isinstance(self.udp_mtu, bool) or not 576 <= self.udp_mtu <= 65535:
            raise ConfigError(f"invalid --udp-mtu {self.udp_mtu!r}: must be in 576..65535")
        check_at_least_zero(self.verbosity, "verbosity -v")
        check_positive(self.route_check_interval, "--route-check-interval")
        check_at_least_zero(self.session_cache, "--session-cache")
        check_positive(self.rules_wait, "--rules-wait")

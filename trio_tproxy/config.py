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
    #: How long one direction may stay open after the other has finished.
    half_close: float = 60.0

    def __post_init__(self) -> None:
        for name in ("handshake", "connect", "half_close"):
            check_positive(getattr(self, name), f"--{name.replace('_', '-')}-timeout")


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path
    ca_cert: Path


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
        if self.recirculate_mark == self.bypass_mark:
            raise ConfigError(
                f"--recirculate-mark and --bypass-mark are both {self.bypass_mark}: they must differ"
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


@dataclass(frozen=True)
class ProxyConfig:
    """Everything ``trio-tproxy run`` needs, validated."""

    tls: TLSFiles
    identity: IdentityPolicy = field(default_factory=IdentityPolicy)
    interception: Interception = field(default_factory=Interception)
    timeouts: Timeouts = field(default_factory=Timeouts)
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
    #: UDP (with ``interception.intercept_udp``): seconds a flow may stay silent
    #: both ways before it ends, and the most flows carried at once.
    udp_idle_timeout: float = 60.0
    udp_max_flows: int = 4096
    #: Link MTU towards peers: a DTLS record, its UDP and IP headers must fit.
    udp_mtu: int = 1500

    def __post_init__(self) -> None:
        check_positive(self.udp_idle_timeout, "--udp-idle-timeout")
        check_positive(self.udp_max_flows, "--udp-max-flows")
        if isinstance(self.udp_mtu, bool) or not 576 <= self.udp_mtu <= 65535:
            raise ConfigError(f"invalid --udp-mtu {self.udp_mtu!r}: must be in 576..65535")
        check_at_least_zero(self.verbosity, "verbosity -v")
        check_positive(self.route_check_interval, "--route-check-interval")
        check_at_least_zero(self.session_cache, "--session-cache")
        check_positive(self.rules_wait, "--rules-wait")

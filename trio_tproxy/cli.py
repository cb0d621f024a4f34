"""Command line: trio-tproxy run | rules | doctor | certs | demo.

The reference design's flags (``-tcp-port 1``, ``-cert ...``, ``-v 1``) are
accepted in both their single-dash Go spellings and as ``--tcp-port``.  Every
error is one line on stderr, ``trio-tproxy <subcommand>: error: ...``, and
exit code 2.

This module only maps flags to the dataclasses of :mod:`.config`: a flag the
user did not give is not passed at all, so every default lives in one place
(the dataclass field) and ``--help`` reads it from there; every range check
is the dataclass's ``__post_init__``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from . import __version__
from .config import (
    ConfigError,
    IdentityPolicy,
    Ingress,
    Interception,
    Limits,
    ProxyConfig,
    Timeouts,
    TLSFiles,
    check_port,
    parse_app_probe,
    parse_cidr,
    parse_int,
    parse_mark,
    parse_port,
    parse_seconds,
)

EXIT_USAGE = 2
T = TypeVar("T")
#: A flag the user did not give leaves no attribute: the dataclass default applies.
UNSET = argparse.SUPPRESS


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage dump) and exit code 2."""

    #: Appended to "the following arguments are required" (how to get them).
    required_hint = ""

    def error(self, message: str) -> NoReturn:
        if self.required_hint and message.startswith("the following arguments are required"):
            message = f"{message}: {self.required_hint}"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _typed(parse: Callable[[str], T]) -> Callable[[str], T]:
    """Adapt a ConfigError-raising parser to argparse's ValueError convention."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _flag(*names: str) -> list[str]:
    """``--tcp-port`` plus the Go spelling ``-tcp-port``."""
    return [n for name in names for n in (name, name[1:])]


def default(cls: type[Any], name: str) -> Any:
    """The dataclass field's default: the one place defaults are written."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")


def _shown(cls: type[Any], name: str) -> str:
    value = default(cls, name)
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The flags among ``names`` that the user gave, by dataclass field name."""
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def add_interception_flags(parser: argparse.ArgumentParser) -> None:
    def d(name: str) -> str:
        return _shown(Interception, name)

    g = parser.add_argument_group("interception")
    g.add_argument(
        *_flag("--tcp-port"),
        dest="tcp_port",
        type=_typed(parse_port),
        default=UNSET,
        help=f"plaintext (egress) listener port (default {d('tcp_port')})",
    )
    g.add_argument(
        *_flag("--tls-port"),
        dest="tls_port",
        type=_typed(parse_port),
        default=UNSET,
        help=f"mTLS (ingress) listener port (default {d('tls_port')})",
    )
    g.add_argument(
        "--intercept-cidr",
        dest="intercept_cidrs",
        action="append",
        type=_typed(parse_cidr),
        default=UNSET,
        metavar="CIDR",
        help=f"destination range to intercept (repeatable; default {d('intercept_cidrs')})",
    )
    g.add_argument(
        "--exclude-cidr",
        dest="exclude_cidrs",
        action="append",
        type=_typed(parse_cidr),
        default=UNSET,
        metavar="CIDR",
        help="never intercept traffic to (egress) or from (ingress) it (repeatable)",
    )
    g.add_argument(
        "--exclude-inbound-port",
        dest="exclude_inbound_ports",
        action="append",
        type=_typed(parse_port),
        default=UNSET,
        metavar="PORT",
        help="inbound port left in plaintext (repeatable)",
    )
    g.add_argument(
        "--exclude-outbound-port",
        dest="exclude_outbound_ports",
        action="append",
        type=_typed(parse_port),
        default=UNSET,
        metavar="PORT",
        help="outbound port left in plaintext (repeatable)",
    )
    g.add_argument(
        "--table",
        dest="table",
        default=UNSET,
        help=f"nftables table name, inet family (default {d('table')})",
    )
    g.add_argument(
        "--recirculate-mark",
        dest="recirculate_mark",
        type=_typed(parse_mark),
        default=UNSET,
        help=f"fwmark of egress packets sent through lo to the proxy (default "
        f"{d('recirculate_mark')})",
    )
    g.add_argument(
        "--bypass-mark",
        dest="bypass_mark",
        type=_typed(parse_mark),
        default=UNSET,
        help=f"SO_MARK of the proxy's own sockets (default {d('bypass_mark')})",
    )
    g.add_argument(
        "--preserve-mark",
        dest="preserve_mark",
        type=_typed(parse_mark),
        default=UNSET,
        help="SO_MARK of the ingress dial that keeps the client's address; its conntrack "
        f"mark routes the app's replies back to the proxy (default {d('preserve_mark')})",
    )
    g.add_argument(
        "--probe-port",
        dest="probe_port",
        type=_typed(parse_int),
        default=UNSET,
        help="plaintext port of the kubelet probe server, never intercepted; 0: none "
        f"(default {d('probe_port')})",
    )
    g.add_argument(
        "--route-table",
        dest="route_table",
        type=_typed(parse_int),
        default=UNSET,
        help=f"policy routing table for the local routes (default {d('route_table')})",
    )
    g.add_argument(
        "--admin-port",
        dest="admin_port",
        type=_typed(parse_int),
        default=UNSET,
        metavar="PORT",
        help="admin HTTP server port (/healthz, /readyz, /metrics), plaintext, on the pod's "
        "addresses and loopback; excluded from inbound interception; 0: off (default "
        f"{_shown(ProxyConfig, 'admin_port')})",
    )


def add_udp_flags(parser: argparse.ArgumentParser) -> None:
    """UDP over DTLS (opt-in): the rules' flags; the data path's are run flags."""

    def d(name: str) -> str:
        return _shown(Interception, name)

    g = parser.add_argument_group("UDP over DTLS (off unless --intercept-udp)")
    g.add_argument(
        "--intercept-udp",
        dest="intercept_udp",
        action="store_true",
        default=UNSET,
        help="also intercept UDP: egress to the intercept CIDRs is carried over DTLS to the "
        "peer's --dtls-port; inbound UDP is accepted only there",
    )
    g.add_argument(
        "--udp-port",
        dest="udp_ports",
        action="append",
        type=_typed(parse_port),
        default=UNSET,
        metavar="PORT",
        help="intercept only egress UDP to this remote port (repeatable; default: all)",
    )
    g.add_argument(
        "--exclude-udp-port",
        dest="exclude_udp_ports",
        action="append",
        type=_typed(parse_port),
        default=UNSET,
        metavar="PORT",
        help="UDP port left in plaintext, inbound and outbound (repeatable)",
    )
    g.add_argument(
        "--intercept-dns",
        dest="intercept_dns",
        action="store_true",
        default=UNSET,
        help="also intercept UDP port 53 (by default DNS is left alone: the cluster's "
        "resolvers have no sidecar)",
    )
    g.add_argument(
        "--udp-listen-port",
        dest="udp_listen_port",
        type=_typed(parse_port),
        metavar="PORT",
        default=UNSET,
        help=f"UDP (egress) listener port, on loopback (default {d('udp_listen_port')})",
    )
    g.add_argument(
        "--dtls-port",
        dest="dtls_port",
        type=_typed(parse_port),
        metavar="PORT",
        default=UNSET,
        help=f"UDP port peers send DTLS to, and our DTLS listener's (default {d('dtls_port')})",
    )


def interception_from(args: argparse.Namespace) -> Interception:
    given = _given(
        args,
        "table",
        "tcp_port",
        "tls_port",
        "recirculate_mark",
        "bypass_mark",
        "preserve_mark",
        "probe_port",
        "route_table",
        "intercept_cidrs",
        "exclude_cidrs",
        "exclude_inbound_ports",
        "exclude_outbound_ports",
        "intercept_udp",
        "udp_ports",
        "exclude_udp_ports",
        "intercept_dns",
        "udp_listen_port",
        "dtls_port",
    )
    for name in ("intercept_cidrs", "exclude_cidrs"):
        if name in given:
            given[name] = tuple(given[name])
    # The admin port is reached directly (kubelet, Prometheus): never intercepted.
    # `rules apply` renders it too, so an init container's table equals the sidecar's.
    admin_port = admin_port_from(args)
    if admin_port:
        given["exclude_inbound_ports"] = [*given.get("exclude_inbound_ports", ()), admin_port]
    for name in (
        "exclude_inbound_ports",
        "exclude_outbound_ports",
        "udp_ports",
        "exclude_udp_ports",
    ):
        if name in given:
            given[name] = tuple(sorted(set(given[name])))
    return Interception(**given)


def admin_port_from(args: argparse.Namespace) -> int:
    port: int = getattr(args, "admin_port", default(ProxyConfig, "admin_port"))
    if port != 0:
        try:
            check_port(port, "--admin-port")
        except ConfigError as exc:
            raise ConfigError(f"{exc} (or 0: off)") from None
    return port


def add_run_flags(parser: _Parser) -> None:
    add_interception_flags(parser)
    parser.required_hint = (
        "no key ships with trio-tproxy; make a development CA and certificate with "
        "'trio-tproxy certs ca --out DIR' and 'trio-tproxy certs issue --ca-dir DIR --out DIR "
        "--name NAME --spiffe-id spiffe://cluster.local/ns/NS/sa/SA'"
    )
    g = parser.add_argument_group(
        "TLS (--cert and --key, or --credential-bundle; and --ca-cert are required)"
    )
    g.add_argument(*_flag("--cert"), type=Path, help="this pod's certificate chain (PEM)")
    g.add_argument(*_flag("--key"), type=Path, help="its private key (PEM)")
    g.add_argument(
        "--credential-bundle",
        dest="credential_bundle",
        type=Path,
        metavar="PATH",
        help="instead of --cert and --key: one PEM file with the private key then the "
        "certificate chain (a Kubernetes podCertificate projection's credentialBundlePath)",
    )
    g.add_argument(
        *_flag("--ca-cert"),
        dest="ca_cert",
        type=Path,
        help="CA bundle peers must chain to (PEM; e.g. a clusterTrustBundle projection)",
    )
    g.add_argument(
        "--credential-poll",
        dest="credential_poll",
        type=_typed(parse_seconds),
        default=UNSET,
        metavar="SECONDS",
        help="how often to look for rotated credential files; SIGHUP reloads at once "
        f"(default {_shown(ProxyConfig, 'credential_poll')})",
    )
    g.add_argument(
        "--trust-domain",
        dest="trust_domain",
        default=UNSET,
        help="SPIFFE trust domain peers must belong to (default "
        f"{_shown(IdentityPolicy, 'trust_domain')})",
    )
    g.add_argument(
        "--verify",
        dest="mode",
        choices=("spiffe", "ip"),
        default=UNSET,
        help="spiffe: peer's SPIFFE ID in the trust domain; ip: server cert has an IP SAN "
        f"equal to the original destination (default {_shown(IdentityPolicy, 'mode')})",
    )
    g.add_argument(
        "--tls-groups",
        dest="tls_groups",
        default=UNSET,
        metavar="GROUPS",
        help="key-exchange groups, e.g. X25519:P-256 (default: OpenSSL's, which puts the "
        "post-quantum hybrid X25519MLKEM768 first)",
    )
    g.add_argument(
        "--allow-id",
        dest="allow_ids",
        action="append",
        default=UNSET,
        metavar="SPIFFE_ID",
        help="accept only these peer IDs (exact, or a prefix ending in /; repeatable)",
    )
    t = parser.add_argument_group("timeouts (seconds)")
    t.add_argument(
        "--handshake-timeout",
        dest="handshake",
        type=_typed(parse_seconds),
        default=UNSET,
        metavar="S",
        help=f"longest TLS handshake, either direction (default {_shown(Timeouts, 'handshake')})",
    )
    t.add_argument(
        "--connect-timeout",
        dest="connect",
        type=_typed(parse_seconds),
        default=UNSET,
        metavar="S",
        help="longest TCP connect to the original destination or the app (default "
        f"{_shown(Timeouts, 'connect')})",
    )
    t.add_argument(
        "--half-close-timeout",
        dest="half_close",
        type=_typed(parse_seconds),
        default=UNSET,
        metavar="S",
        help="inactivity allowed to one direction after the other ended (default "
        f"{_shown(Timeouts, 'half_close')})",
    )
    t.add_argument(
        "--idle-timeout",
        dest="idle",
        type=_typed(parse_seconds),
        default=UNSET,
        metavar="S",
        help="reset a connection when no byte moved either way for this long (default "
        f"{_shown(Timeouts, 'idle')})",
    )
    lim = parser.add_argument_group("limits (over one, a new connection is reset at accept)")
    for name, what in (
        ("max_connections", "connections held at once, both directions"),
        ("max_pending_handshakes", "inbound connections still in their TLS handshake"),
        ("max_pending_per_source", "the same, from one source address"),
    ):
        lim.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=_typed(parse_int),
            default=UNSET,
            metavar="N",
            help=f"{what} (default {_shown(Limits, name)})",
        )
    i = parser.add_argument_group("ingress (what the app sees, who reaches it)")
    i.add_argument(
        "--preserve-client-ip",
        dest="preserve_client_ip",
        type=_typed(_parse_bool),
        default=UNSET,
        metavar="true|false",
        help="dial the app from the client's own IP address, so the app sees who called "
        f"(default {_shown(Ingress, 'preserve_client_ip')})",
    )
    i.add_argument(
        "--inbound-to-loopback",
        dest="inbound_to_loopback",
        action="store_true",
        default=UNSET,
        help="legacy: dial the app at 127.0.0.1/::1 instead of the address the client "
        "dialed. RISK: every listener bound only to localhost (admin and debug ports) "
        "becomes reachable from the whole mesh",
    )
    i.add_argument(
        "--inbound-mode",
        dest="inbound_mode",
        choices=("strict", "permissive"),
        default=UNSET,
        help="strict: only mutual TLS from a sidecar; permissive: anything else (plaintext, "
        f"the app's own TLS) reaches the app as is (default {_shown(Ingress, 'inbound_mode')})",
    )
    i.add_argument(
        "--permissive-port",
        dest="permissive_ports",
        action="append",
        type=_typed(parse_port),
        default=UNSET,
        metavar="PORT",
        help="an app port that is permissive even in strict mode (repeatable)",
    )
    i.add_argument(
        "--app-probe",
        dest="app_probes",
        action="append",
        type=_typed(parse_app_probe),
        default=UNSET,
        metavar="NAME=URL",
        help="serve GET /app-health/NAME on the probe port by probing URL: "
        "http://127.0.0.1:8080/healthz, tcp://127.0.0.1:5432 or grpc://127.0.0.1:9090[/service] "
        "(repeatable)",
    )
    i.add_argument(
        "--probe-timeout",
        dest="probe_timeout",
        type=_typed(parse_seconds),
        default=UNSET,
        metavar="S",
        help="how long a probe waits for the app when the request gives no timeout "
        f"(default {_shown(Ingress, 'probe_timeout')})",
    )
    o = parser.add_argument_group("operation")
    o.add_argument(
        "-v",
        dest="verbosity",
        type=_typed(parse_int),
        default=UNSET,
        metavar="N",
        help="verbosity: 0 refusals and lifecycle, 1 one line per connection, 2 debug "
        f"(default {_shown(ProxyConfig, 'verbosity')})",
    )
    o.add_argument(
        "--no-rules",
        dest="manage_rules",
        action="store_false",
        default=UNSET,
        help="do not install nftables rules and routes: wait for the ones an init "
        "container installs (see --rules-wait)",
    )
    o.add_argument(
        "--rules-wait",
        dest="rules_wait",
        type=_typed(parse_seconds),
        default=UNSET,
        metavar="S",
        help="with --no-rules, how long to wait for the rules before giving up (default "
        f"{_shown(ProxyConfig, 'rules_wait')})",
    )
    o.add_argument(
        "--route-check-interval",
        dest="route_check_interval",
        type=_typed(parse_seconds),
        default=UNSET,
        metavar="S",
        help="seconds between checks (and repairs) of the table and routes (default "
        f"{_shown(ProxyConfig, 'route_check_interval')})",
    )
    o.add_argument(
        "--drain-timeout",
        dest="drain_timeout",
        type=_typed(parse_seconds),
        default=UNSET,
        metavar="S",
        help="after SIGTERM, let open connections finish for up to S seconds, then reset "
        f"them; exit as soon as none is left (default {_shown(ProxyConfig, 'drain_timeout')})",
    )
    o.add_argument(
        "--drain-new",
        dest="drain_new",
        choices=("accept", "refuse"),
        default=UNSET,
        help="new connections during the drain: accept (classic sidecar: the app may still "
        "open egress while it stops) or refuse (native sidecar: the app has exited) "
        f"(default {_shown(ProxyConfig, 'drain_new')})",
    )
    o.add_argument(
        "--on-exit",
        dest="on_exit",
        choices=("remove", "keep"),
        default=UNSET,
        help="rules on exit: remove (leave nothing behind) or keep (pods: the fail-closed "
        "rules refuse intercepted traffic until a sidecar is back, never plaintext) "
        f"(default {_shown(ProxyConfig, 'on_exit')})",
    )
    o.add_argument(
        "--log-format",
        dest="log_format",
        choices=("text", "json"),
        default=UNSET,
        help=f"text lines or one JSON object per line (default {_shown(ProxyConfig, 'log_format')})",
    )
    o.add_argument(
        "--session-cache",
        dest="session_cache",
        type=_typed(parse_int),
        default=UNSET,
        metavar="N",
        help="TLS sessions kept to resume connections to peers, 0: off (default "
        f"{_shown(ProxyConfig, 'session_cache')})",
    )
    # Last, so that the usage line starts with the flags every user needs.
    add_udp_flags(parser)
    u = parser.add_argument_group("UDP flows (with --intercept-udp)")
    u.add_argument(
        "--udp-idle-timeout",
        dest="udp_idle_timeout",
        type=_typed(parse_seconds),
        default=UNSET,
        metavar="S",
        help="a flow silent both ways this long ends (default "
        f"{_shown(ProxyConfig, 'udp_idle_timeout')})",
    )
    u.add_argument(
        "--udp-max-flows",
        dest="udp_max_flows",
        type=_typed(parse_int),
        default=UNSET,
        metavar="N",
        help="most UDP flows at once; more are dropped (default "
        f"{_shown(ProxyConfig, 'udp_max_flows')})",
    )
    u.add_argument(
        "--udp-mtu",
        dest="udp_mtu",
        type=_typed(parse_int),
        default=UNSET,
        metavar="BYTES",
        help="link MTU towards peers: larger app datagrams are dropped (default "
        f"{_shown(ProxyConfig, 'udp_mtu')})",
    )


def config_from(args: argparse.Namespace) -> ProxyConfig:
    identity = _given(args, "mode", "trust_domain", "allow_ids")
    if "allow_ids" in identity:
        identity["allow_ids"] = tuple(identity["allow_ids"])
    if args.credential_bundle is not None:
        tls = TLSFiles.bundle(args.credential_bundle, args.ca_cert)
    else:
        tls = TLSFiles(cert=args.cert, key=args.key, ca_cert=args.ca_cert)
    return ProxyConfig(
        tls=tls,
        identity=IdentityPolicy(**identity),
        interception=interception_from(args),
        timeouts=Timeouts(**_given(args, "handshake", "connect", "half_close", "idle")),
        ingress=_ingress_from(args),
        limits=Limits(
            **_given(args, "max_connections", "max_pending_handshakes", "max_pending_per_source")
        ),
        **_given(
            args,
            "verbosity",
            "manage_rules",
            "rules_wait",
            "route_check_interval",
            "session_cache",
            "tls_groups",
            "credential_poll",
            "drain_timeout",
            "drain_new",
            "on_exit",
            "log_format",
            "udp_idle_timeout",
            "udp_max_flows",
            "udp_mtu",
        ),
        admin_port=admin_port_from(args),
    )


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"invalid boolean {text!r}: true or false")


def _ingress_from(args: argparse.Namespace) -> Ingress:
    given = _given(
        args,
        "preserve_client_ip",
        "inbound_to_loopback",
        "inbound_mode",
        "permissive_ports",
        "app_probes",
        "probe_timeout",
    )
    if "permissive_ports" in given:
        given["permissive_ports"] = tuple(sorted(set(given["permissive_ports"])))
    if "app_probes" in given:
        given["app_probes"] = tuple(given["app_probes"])
    return Ingress(**given)


def check_tls_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--cert and --key, or --credential-bundle (not both); and --ca-cert."""
    bundle = args.credential_bundle is not None
    if bundle and (args.cert is not None or args.key is not None):
        parser.error("--credential-bundle replaces --cert and --key: give one or the other")
    missing = [] if bundle else [f for f in ("cert", "key") if getattr(args, f) is None]
    missing = [f"--{f}/-{f}" for f in missing]
    if args.ca_cert is None:
        missing.append("--ca-cert")
    if missing:
        or_bundle = " (or --credential-bundle for --cert and --key)" if not bundle else ""
        parser.error(f"the following arguments are required: {', '.join(missing)}{or_bundle}")


def setup_logging(verbosity: int, log_format: str = "text") -> None:
    from .logfmt import JsonFormatter

    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbosity >= 2 else logging.INFO, handlers=[handler])
    logging.getLogger("trio_tproxy.conn").setLevel(
        logging.INFO if verbosity >= 1 else logging.WARNING
    )
    logging.getLogger("pyroute2").setLevel(logging.WARNING)


def cmd_run(args: argparse.Namespace) -> int:
    from . import memory

    memory.limit_arenas()  # before any thread allocates (see memory.py)
    import trio

    from . import lifecycle

    config = config_from(args)
    credentials = lifecycle.preflight(config)
    setup_logging(config.verbosity, config.log_format)
    # The cyclic collector walks every tracked object it may own: keep the
    # startup objects (modules, classes) out of its way and run it less often
    # (per message the sidecar allocates many short-lived containers).
    # Measured: 4-6% less CPU per ping-pong round trip.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    trio.run(lifecycle.run, config, credentials)
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    from .interception import Installer

    ic = interception_from(args)
    installer = Installer(ic)
    if args.action == "show":
        sys.stdout.write(installer.show())
        return 0
    installer.preflight()
    if args.action == "apply":
        installer.apply()
        print(f"applied nft table inet {ic.table} and policy routes (table {ic.route_table})")
    else:
        installer.remove()  # tries every step; one error naming each failure
        print(f"deleted nft table inet {ic.table} and policy routes (table {ic.route_table})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="trio-tproxy",
        description="A transparent mutual-TLS sidecar: intercepts a pod's TCP with nftables "
        "TPROXY and wraps it in mutual TLS.",
    )
    parser.add_argument("--version", action="version", version=f"trio-tproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the sidecar (needs CAP_NET_ADMIN)")
    add_run_flags(run)
    run.set_defaults(func=cmd_run, check=functools.partial(check_tls_flags, run))

    rules = sub.add_parser(
        "rules", help="show, apply or delete the nftables rules and policy routes"
    )
    rules.add_argument("action", choices=("show", "apply", "delete"))
    add_interception_flags(rules)
    add_udp_flags(rules)
    rules.set_defaults(func=cmd_rules)

    doctor = sub.add_parser(
        "doctor",
        help="check this network namespace's interception and explain what is wrong "
        "(run inside the pod: kubectl exec / nsenter); exit 1 with findings",
    )
    add_interception_flags(doctor)
    d = doctor.add_argument_group("doctor")
    d.add_argument(*_flag("--cert"), type=Path, help="the sidecar's certificate chain (PEM)")
    d.add_argument(*_flag("--key"), type=Path, help="its private key (PEM)")
    d.add_argument(*_flag("--ca-cert"), dest="ca_cert", type=Path, help="its CA bundle (PEM)")
    d.add_argument(
        "--trust-domain",
        dest="trust_domain",
        default=_shown(IdentityPolicy, "trust_domain"),
        help="the trust domain the SPIFFE ID must be in (default %(default)s)",
    )
    d.add_argument(
        "--peer",
        type=_typed(parse_hostport),
        metavar="HOST:PORT",
        help="live self-test: connect there through the interception, show the peer identity",
    )
    d.add_argument(
        "--conn",
        type=_typed(parse_hostport),
        metavar="HOST:PORT",
        help="show conntrack's entries for connections to this destination",
    )
    d.add_argument("--json", action="store_true", help="one JSON object instead of text")
    d.add_argument(
        "--timeout", type=_typed(parse_seconds), default=3.0, metavar="S", help="per network check"
    )
    doctor.set_defaults(func=cmd_doctor)

    from . import certs, k8scli, webhook

    certs.register(sub)
    k8scli.register(sub)  # inject
    webhook.register(sub)
    demo = sub.add_parser(
        "demo", help="two pods talking mTLS through the sidecars, in network namespaces (root)"
    )
    demo.add_argument("--keep", action="store_true", help="keep the work directory")
    demo.set_defaults(func=cmd_demo)
    return parser


def parse_hostport(text: str) -> tuple[str, int]:
    """``10.0.0.2:80`` or ``[fd00::2]:80``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"invalid address {text!r}: HOST:PORT or [IPv6]:PORT")
    host = host.removeprefix("[").removesuffix("]")
    value = parse_port(port)
    check_port(value, text)
    return host, value


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    files = (args.cert, args.key, args.ca_cert)
    if any(files) and not all(files):
        raise ConfigError("--cert, --key and --ca-cert go together")
    opts = doctor.Options(
        ic=interception_from(args),
        admin_port=admin_port_from(args),
        tls=TLSFiles(args.cert, args.key, args.ca_cert) if all(files) else None,
        trust_domain=args.trust_domain,
        peer=args.peer,
        conn=args.conn,
        timeout=args.timeout,
    )
    results = doctor.run(opts)
    out = doctor.render_json(results) if args.json else doctor.render_human(results)
    sys.stdout.write(out)
    return 1 if any(r.status == doctor.FAIL for r in results) else 0


def cmd_demo(args: argparse.Namespace) -> int:
    # The demo lives in the test lab (lab/, beside this package in the source
    # tree), imported only here: the sidecar never loads it and the image has none.
    try:
        from lab import demo
    except ModuleNotFoundError as exc:
        if exc.name not in ("lab", "lab.demo", "pyroute2"):  # pyroute2: the `lab` extra
            raise
        print(
            "trio-tproxy demo: the demo ships with the source tree: "
            "run `bash dev.sh demo` from a clone of the repository",
            file=sys.stderr,
        )
        return 2
    code: int = demo.cmd_demo(args)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Reported by the subcommand's parser, so the line names it.
        sub = _subparser(parser, args.command)
        sub.error(f"unrecognized arguments: {' '.join(unknown)}")
    check = getattr(args, "check", None)
    if check is not None:
        check(args)
    try:
        code: int = args.func(args)
    except (ConfigError, OSError) as exc:
        # OSError: unreadable files, nft.NftError, netlink errors, ports in use.
        # All are the user's to fix (flags, files, capabilities): exit 2.
        print(f"trio-tproxy {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return code


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[command]
            return found
    return parser


if __name__ == "__main__":
    sys.exit(main())

"""Command line: trio-tproxy run | rules | certs | demo.

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
    Interception,
    ProxyConfig,
    Timeouts,
    TLSFiles,
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
        "--route-table",
        dest="route_table",
        type=_typed(parse_int),
        default=UNSET,
        help=f"policy routing table for the local routes (default {d('route_table')})",
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
    for name in (
        "exclude_inbound_ports",
        "exclude_outbound_ports",
        "udp_ports",
        "exclude_udp_ports",
    ):
        if name in given:
            given[name] = tuple(sorted(set(given[name])))
    return Interception(**given)


def add_run_flags(parser: _Parser) -> None:
    add_interception_flags(parser)
    parser.required_hint = (
        "no key ships with trio-tproxy; make a development CA and certificate with "
        "'trio-tproxy certs ca --out DIR' and 'trio-tproxy certs issue --ca-dir DIR --out DIR "
        "--name NAME --spiffe-id spiffe://cluster.local/ns/NS/sa/SA'"
    )
    g = parser.add_argument_group("TLS (--cert, --key and --ca-cert are required)")
    g.add_argument(
        *_flag("--cert"), type=Path, required=True, help="this pod's certificate chain (PEM)"
    )
    g.add_argument(*_flag("--key"), type=Path, required=True, help="its private key (PEM)")
    g.add_argument(
        *_flag("--ca-cert"),
        dest="ca_cert",
        type=Path,
        required=True,
        help="CA bundle peers must chain to (PEM)",
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
        help="how long one direction may stay open after the other ended (default "
        f"{_shown(Timeouts, 'half_close')})",
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
    return ProxyConfig(
        tls=TLSFiles(cert=args.cert, key=args.key, ca_cert=args.ca_cert),
        identity=IdentityPolicy(**identity),
        interception=interception_from(args),
        timeouts=Timeouts(**_given(args, "handshake", "connect", "half_close")),
        **_given(
            args,
            "verbosity",
            "manage_rules",
            "rules_wait",
            "route_check_interval",
            "session_cache",
            "tls_groups",
            "udp_idle_timeout",
            "udp_max_flows",
            "udp_mtu",
        ),
    )


def setup_logging(verbosity: int) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbosity >= 2 else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    logging.getLogger("trio_tproxy.conn").setLevel(
        logging.INFO if verbosity >= 1 else logging.WARNING
    )
    logging.getLogger("pyroute2").setLevel(logging.WARNING)


def cmd_run(args: argparse.Namespace) -> int:
    import trio

    from . import lifecycle

    config = config_from(args)
    credentials = lifecycle.preflight(config)
    setup_logging(config.verbosity)
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
    run.set_defaults(func=cmd_run)

    rules = sub.add_parser(
        "rules", help="show, apply or delete the nftables rules and policy routes"
    )
    rules.add_argument("action", choices=("show", "apply", "delete"))
    add_interception_flags(rules)
    add_udp_flags(rules)
    rules.set_defaults(func=cmd_rules)

    from . import certs

    certs.register(sub)
    demo = sub.add_parser(
        "demo", help="two pods talking mTLS through the sidecars, in network namespaces (root)"
    )
    demo.add_argument("--keep", action="store_true", help="keep the work directory")
    demo.set_defaults(func=cmd_demo)
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    # The demo lives in the test lab (lab/, beside this package in the source
    # tree), imported only here: the sidecar never loads it and the image has none.
    try:
        from lab import demo
    except ModuleNotFoundError as exc:
        if exc.name not in ("lab", "lab.demo"):
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

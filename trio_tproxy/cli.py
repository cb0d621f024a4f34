"""Command line: ``trio-tproxy run | rules | certs | demo``.

The reference design's flags (``-tcp-port 1``, ``-cert ...``, ``-v 1``) are
accepted in both their single-dash Go spellings and as ``--tcp-port``.  Every
error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

from . import __version__
from .config import (
    DEFAULT_INTERCEPT_CIDRS,
    ConfigError,
    IdentityPolicy,
    Interception,
    ProxyConfig,
    Timeouts,
    TLSFiles,
    parse_cidr,
    parse_mark,
    parse_port,
)

EXIT_USAGE = 2
T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"invalid duration {text!r}: not a number of seconds") from None
    if not value > 0:
        raise ConfigError(f"invalid duration {text!r}: must be > 0")
    return value


def _flag(*names: str) -> list[str]:
    """``--tcp-port`` plus the Go spelling ``-tcp-port``."""
    return [n for name in names for n in (name, name[1:])]


def add_interception_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("interception")
    g.add_argument(
        *_flag("--tcp-port"),
        type=_typed(parse_port),
        default=1,
        help="plaintext (egress) listener port (default 1)",
    )
    g.add_argument(
        *_flag("--tls-port"),
        type=_typed(parse_port),
        default=2,
        help="mTLS (ingress) listener port (default 2)",
    )
    g.add_argument(
        "--intercept-cidr",
        action="append",
        type=_typed(parse_cidr),
        default=[],
        metavar="CIDR",
        help="destination range to intercept (repeatable; default "
        + ", ".join(map(str, DEFAULT_INTERCEPT_CIDRS))
        + ")",
    )
    g.add_argument(
        "--exclude-cidr",
        action="append",
        type=_typed(parse_cidr),
        default=[],
        metavar="CIDR",
        help="never intercept traffic to (egress) or from (ingress) it",
    )
    g.add_argument(
        "--exclude-inbound-port",
        action="append",
        type=_typed(parse_port),
        default=[],
        metavar="PORT",
        help="inbound port left in plaintext (repeatable)",
    )
    g.add_argument(
        "--exclude-outbound-port",
        action="append",
        type=_typed(parse_port),
        default=[],
        metavar="PORT",
        help="outbound port left in plaintext (repeatable)",
    )
    g.add_argument("--table", default="trio_tproxy", help="nftables table name (inet family)")
    g.add_argument(
        "--recirculate-mark",
        type=_typed(parse_mark),
        default=10,
        help="fwmark of egress packets sent through lo to the proxy (default 10)",
    )
    g.add_argument(
        "--bypass-mark",
        type=_typed(parse_mark),
        default=12,
        help="SO_MARK of the proxy's own sockets (default 12)",
    )
    g.add_argument(
        "--route-table",
        type=int,
        default=10,
        help="policy routing table for the local routes (default 10)",
    )


def interception_from(args: argparse.Namespace) -> Interception:
    return Interception(
        table=args.table,
        intercept_cidrs=tuple(args.intercept_cidr) or DEFAULT_INTERCEPT_CIDRS,
        exclude_cidrs=tuple(args.exclude_cidr),
        exclude_inbound_ports=tuple(sorted(set(args.exclude_inbound_port))),
        exclude_outbound_ports=tuple(sorted(set(args.exclude_outbound_port))),
        tcp_port=args.tcp_port,
        tls_port=args.tls_port,
        recirculate_mark=args.recirculate_mark,
        bypass_mark=args.bypass_mark,
        route_table=args.route_table,
    )


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    add_interception_flags(parser)
    g = parser.add_argument_group("TLS")
    g.add_argument(*_flag("--cert"), type=Path, help="this pod's certificate chain (PEM)")
    g.add_argument(*_flag("--key"), type=Path, help="its private key (PEM)")
    g.add_argument(*_flag("--ca-cert"), type=Path, help="CA bundle peers must chain to (PEM)")
    g.add_argument(
        "--trust-domain",
        default="cluster.local",
        help="SPIFFE trust domain peers must belong to (default cluster.local)",
    )
    g.add_argument(
        "--verify",
        choices=("spiffe", "ip"),
        default="spiffe",
        help="spiffe: peer's SPIFFE ID in the trust domain (default); "
        "ip: server cert has an IP SAN equal to the original destination",
    )
    g.add_argument(
        "--tls-groups",
        metavar="GROUPS",
        help="key-exchange groups, e.g. X25519:P-256 (default: OpenSSL's, which puts the "
        "post-quantum hybrid X25519MLKEM768 first)",
    )
    g.add_argument(
        "--allow-id",
        action="append",
        default=[],
        metavar="SPIFFE_ID",
        help="accept only these peer IDs (exact, or a prefix ending in /; repeatable)",
    )
    t = parser.add_argument_group("timeouts (seconds)")
    t.add_argument("--handshake-timeout", type=_typed(_seconds), default=10.0)
    t.add_argument("--connect-timeout", type=_typed(_seconds), default=5.0)
    t.add_argument(
        "--half-close-timeout",
        type=_typed(_seconds),
        default=60.0,
        help="how long one direction may stay open after the other ended",
    )
    o = parser.add_argument_group("operation")
    o.add_argument(
        "-v",
        type=int,
        default=0,
        metavar="N",
        help="verbosity: 0 refusals and lifecycle, 1 one line per connection, 2 debug",
    )
    o.add_argument(
        "--no-rules",
        action="store_true",
        help="do not install nftables rules and routes (an init container did)",
    )
    o.add_argument("--route-check-interval", type=_typed(_seconds), default=5.0)
    o.add_argument(
        "--session-cache",
        type=int,
        default=4096,
        metavar="N",
        help="TLS sessions kept to resume connections to peers (0: off)",
    )


def config_from(args: argparse.Namespace) -> ProxyConfig:
    missing = [f for f in ("cert", "key", "ca_cert") if getattr(args, f) is None]
    if missing:
        flags = ", ".join("--" + f.replace("_", "-") for f in missing)
        raise ConfigError(
            f"missing {flags}: no key ships with trio-tproxy; make a development CA and "
            "certificate with `trio-tproxy certs ca --out DIR` and `trio-tproxy certs issue "
            "--ca-dir DIR --out DIR --name NAME --spiffe-id spiffe://cluster.local/ns/NS/sa/SA`"
        )
    return ProxyConfig(
        tls=TLSFiles(cert=args.cert, key=args.key, ca_cert=args.ca_cert),
        identity=IdentityPolicy(
            mode=args.verify, trust_domain=args.trust_domain, allow_ids=tuple(args.allow_id)
        ),
        interception=interception_from(args),
        timeouts=Timeouts(
            handshake=args.handshake_timeout,
            connect=args.connect_timeout,
            half_close=args.half_close_timeout,
        ),
        verbosity=args.v,
        manage_rules=not args.no_rules,
        route_check_interval=args.route_check_interval,
        session_cache=args.session_cache,
        tls_groups=args.tls_groups,
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
    from . import kernel, nft

    ic = interception_from(args)
    if args.action == "show":
        sys.stdout.write(nft.render(ic))
        return 0
    tables = nft.Nft()
    routes = kernel.PolicyRoutes(ic)
    if args.action == "apply":
        tables.apply(ic)
        routes.install()
        print(f"applied nft table inet {ic.table} and policy routes (table {ic.route_table})")
    else:
        routes.remove()
        tables.delete(ic)
        print(f"deleted nft table inet {ic.table} and policy routes (table {ic.route_table})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="trio-tproxy", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--version", action="version", version=f"trio-tproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the sidecar (needs CAP_NET_ADMIN)")
    add_run_flags(run)
    run.set_defaults(func=cmd_run)

    rules = sub.add_parser("rules", help="show, apply or delete the nftables rules and routes")
    rules.add_argument("action", choices=("show", "apply", "delete"))
    add_interception_flags(rules)
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
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"trio-tproxy {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # includes nft.NftError and netlink errors
        print(f"trio-tproxy {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())

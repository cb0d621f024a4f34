"""The command line: flags in both spellings, and one-line errors with exit code 2."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from lab.netns import next_prefix
from lab.pki import make_pki
from lab.require import skip_or_fail
from trio_tproxy import certs
from trio_tproxy.cli import build_parser, config_from, interception_from
from trio_tproxy.config import (
    ConfigError,
    IdentityPolicy,
    Interception,
    ProxyConfig,
    Timeouts,
    TLSFiles,
)
from trio_tproxy.interception import Installer

#: Placeholder --cert/--key/--ca-cert: flag checks happen before files are read.
FILES = ["--cert", "c.pem", "--key", "k.pem", "--ca-cert", "ca.pem"]


def tls_flags(cert, key, ca) -> list[str]:
    """``--cert/--key/--ca-cert`` for ``trio-tproxy run``."""
    return ["--cert", str(cert), "--key", str(key), "--ca-cert", str(ca)]


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_tproxy", *argv], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def pki(tmp_path: Path):
    return make_pki(tmp_path)


def test_go_spellings_and_long_flags_parse_the_same(pki):
    files = pki["a"]
    go = build_parser().parse_args(
        [
            "run",
            "-tcp-port",
            "15001",
            "-tls-port",
            "15002",
            "-cert",
            str(files.cert),
            "-key",
            str(files.key),
            "-ca-cert",
            str(files.ca_cert),
            "-v",
            "1",
        ]
    )
    long = build_parser().parse_args(
        [
            "run",
            "--tcp-port",
            "15001",
            "--tls-port",
            "15002",
            "--cert",
            str(files.cert),
            "--key",
            str(files.key),
            "--ca-cert",
            str(files.ca_cert),
            "-v",
            "1",
        ]
    )
    assert config_from(go) == config_from(long)
    config = config_from(go)
    assert (config.interception.tcp_port, config.interception.tls_port) == (15001, 15002)
    assert config.verbosity == 1 and config.identity.mode == "spiffe"


def test_interception_flags_build_the_config():
    args = build_parser().parse_args(
        [
            "rules",
            "show",
            "--intercept-cidr",
            "10.96.0.0/12",
            "--intercept-cidr",
            "fd00::/8",
            "--exclude-cidr",
            "10.96.0.1/32",
            "--exclude-inbound-port",
            "8081",
            "--exclude-inbound-port",
            "8081",
            "--exclude-outbound-port",
            "53",
        ]
    )
    ic = interception_from(args)
    assert ic.intercept_cidrs == (
        ipaddress.ip_network("10.96.0.0/12"),
        ipaddress.ip_network("fd00::/8"),
    )
    # The admin port (default 15020) is always excluded from inbound interception.
    assert ic.exclude_inbound_ports == (8081, 15020) and ic.exclude_outbound_ports == (53,)


def test_admin_port_is_excluded_from_inbound_interception_unless_off():
    def inbound(*flags: str) -> tuple[int, ...]:
        args = build_parser().parse_args(["rules", "show", *flags])
        return interception_from(args).exclude_inbound_ports

    assert inbound() == (15020,)
    assert inbound("--admin-port", "9901", "--exclude-inbound-port", "80") == (80, 9901)
    assert inbound("--admin-port", "0") == ()
    out = run_cli("rules", "show", "--admin-port", "70000")
    assert out.returncode == 2 and "--admin-port" in out.stderr


def test_rules_show_prints_the_table_and_the_routes():
    out = run_cli("rules", "show", "--exclude-outbound-port", "53", "--route-table", "77")
    assert out.returncode == 0, out.stderr
    args = build_parser().parse_args(
        ["rules", "show", "--exclude-outbound-port", "53", "--route-table", "77"]
    )
    assert out.stdout == Installer(interception_from(args)).show()
    assert "table inet trio_tproxy {" in out.stdout
    assert out.stdout.splitlines()[-7:] == [
        "ip link set lo up",
        "ip rule add fwmark 10 iif lo lookup 77",
        "ip -6 rule add fwmark 10 iif lo lookup 77",
        "ip rule add fwmark 13 iif lo lookup 77",
        "ip -6 rule add fwmark 13 iif lo lookup 77",
        "ip route add local 0.0.0.0/0 dev lo table 77",
        "ip -6 route add local ::/0 dev lo table 77",
    ]


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["run", *FILES, "--tcp-port", "70000"],
            "run: error: invalid port 70000 for --tcp-port: must be in 1..65535",
        ),
        (
            ["run", *FILES, "--exclude-inbound-port", "0"],
            "run: error: invalid port 0 for --exclude-inbound-port: must be in 1..65535",
        ),
        (["run", "--tcp-port", "x"], "run: error: argument --tcp-port/-tcp-port: invalid port 'x'"),
        (["run", "--intercept-cidr", "10.0.0.0/33"], "invalid CIDR '10.0.0.0/33'"),
        (
            ["rules", "show", "--intercept-cidr", "10.1.2.3/8"],
            "invalid CIDR '10.1.2.3/8': host bits set (the network is 10.0.0.0/8;",
        ),
        (
            ["rules", "show", "--exclude-cidr", "fd00::1/8"],
            "host bits set (the network is fd00::/8",
        ),
        (["run", "--verify", "dns"], "invalid choice"),
        (
            ["run", *FILES, "--handshake-timeout", "0"],
            "invalid --handshake-timeout 0.0: must be > 0",
        ),
        (["run", *FILES, "--connect-timeout", "nan"], "invalid --connect-timeout nan: must be > 0"),
        (["run", *FILES, "--route-check-interval", "0"], "--route-check-interval 0.0: must be > 0"),
        (["run", *FILES, "--rules-wait", "-1"], "invalid --rules-wait -1.0: must be > 0"),
        (
            ["run", *FILES, "--session-cache", "-5"],
            "invalid --session-cache -5: must be an integer",
        ),
        (["run", *FILES, "-v", "-1"], "invalid verbosity -v -1: must be an integer >= 0"),
        (
            ["run", *FILES, "--no-such-flag"],
            "trio-tproxy run: error: unrecognized arguments: --no-such-flag",
        ),
        (
            ["rules", "show", "--x", "1"],
            "trio-tproxy rules: error: unrecognized arguments: --x 1",
        ),
        (["run"], "the following arguments are required: --cert/-cert, --key/-key, --ca-cert"),
        (
            ["run", "--credential-bundle", "b.pem"],
            "the following arguments are required: --ca-cert",
        ),
        (
            ["run", *FILES, "--credential-bundle", "b.pem"],
            "--credential-bundle replaces --cert and --key",
        ),
        (["rules", "show", "--tcp-port", "5", "--tls-port", "5"], "both 5"),
        (["rules", "show", "--table", "1abc"], "invalid nft table name"),
        (
            ["rules", "show", "--bypass-mark", "0xa"],
            "--recirculate-mark and --bypass-mark are both 10",
        ),
        (
            ["rules", "show", "--bypass-mark", "0"],
            "invalid mark 0 for --bypass-mark: must be in 1..",
        ),
        (
            ["rules", "show", "--recirculate-mark", "0x100000000"],
            "invalid mark 4294967296 for --recirculate-mark",
        ),
        (
            ["rules", "show", "--route-table", "-1"],
            "rules: error: invalid route table -1: must be in 1..4294967295, and 253, 254, 255 "
            "are reserved",
        ),
        (["rules", "show", "--route-table", "254"], "invalid route table 254: must be in 1.."),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, line):
    out = run_cli(*argv)
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"trio-tproxy {argv[0]}: error: "), lines[0]
    assert line in lines[0]


def test_missing_certificate_explains_how_to_make_one():
    out = run_cli("run")
    assert "trio-tproxy certs ca" in out.stderr and "no key ships" in out.stderr


def test_run_help_shows_required_files_and_documents_every_flag():
    out = run_cli("run", "--help")
    assert out.returncode == 0
    usage = " ".join(out.stdout.split("\n\n", 1)[0].split())  # argparse wraps anywhere
    # Which files are required is said by the group's title (argparse cannot
    # express "--cert and --key, or --credential-bundle").
    for flag in ("--cert CERT", "--key KEY", "--ca-cert CA_CERT", "--credential-bundle PATH"):
        assert flag in usage
    assert (
        "TLS (--cert and --key, or --credential-bundle; and --ca-cert are required)" in out.stdout
    )
    for flag in (
        "--handshake-timeout",
        "--connect-timeout",
        "--half-close-timeout",
        "--rules-wait",
    ):
        body = out.stdout.split(f"  {flag} S", 1)[1].split("\n  -", 1)[0]
        assert "(default " in body, (flag, body)
    top = run_cli("--help")
    assert "`" not in top.stdout and "`" not in out.stdout


def test_help_defaults_come_from_the_dataclasses(monkeypatch):
    # Change a dataclass default: --help and the parsed config follow it.
    field = Interception.__dataclass_fields__["tcp_port"]
    monkeypatch.setattr(field, "default", 4242)
    text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()  # type: ignore[union-attr]
    assert "plaintext (egress) listener port (default 4242)" in text


def test_flags_not_given_leave_the_dataclass_defaults():
    args = build_parser().parse_args(["run", *FILES])
    tls = TLSFiles(Path("c.pem"), Path("k.pem"), Path("ca.pem"))
    # The one difference: the admin port (on by default) is excluded from interception.
    admin = Interception(exclude_inbound_ports=(ProxyConfig.admin_port,))
    assert config_from(args) == ProxyConfig(tls=tls, interception=admin)
    given = build_parser().parse_args(
        ["run", *FILES, "--no-rules", "--rules-wait", "3", "--session-cache", "0", "-v", "2"]
        + ["--connect-timeout", "1.5", "--allow-id", "spiffe://cluster.local/ns/x/"]
    )
    config = config_from(given)
    assert (config.manage_rules, config.rules_wait, config.session_cache) == (False, 3.0, 0)
    assert config.verbosity == 2 and config.timeouts == Timeouts(connect=1.5)
    assert config.identity == IdentityPolicy(allow_ids=("spiffe://cluster.local/ns/x/",))


@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda: Interception(tcp_port=0), "invalid port 0 for --tcp-port"),
        (lambda: Interception(tls_port=70000), "invalid port 70000 for --tls-port"),
        (lambda: Interception(bypass_mark=-5), "invalid mark -5 for --bypass-mark"),
        (lambda: Interception(recirculate_mark=True), "invalid mark True"),
        (lambda: Interception(route_table=253), "253, 254, 255 are reserved"),
        (lambda: Interception(route_table=0), "invalid route table 0"),
        (lambda: Interception(rule_priority=-1), "invalid rule priority -1"),
        (lambda: Interception(intercept_cidrs=("10.0.0.0/8",)), "not an IP network"),  # type: ignore[arg-type]
        (lambda: Timeouts(half_close=0), "invalid --half-close-timeout 0"),
        (lambda: ProxyConfig(tls=None, session_cache=-1), "--session-cache -1"),  # type: ignore[arg-type]
        (lambda: ProxyConfig(tls=None, route_check_interval=0), "--route-check-interval 0"),  # type: ignore[arg-type]
        (lambda: ProxyConfig(tls=None, verbosity=-1), "verbosity -v -1"),  # type: ignore[arg-type]
        (lambda: ProxyConfig(tls=None, rules_wait=0), "--rules-wait 0"),  # type: ignore[arg-type]
    ],
)
def test_dataclasses_validate_when_built(build, fragment):
    with pytest.raises(ConfigError) as info:
        build()
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.netns
def test_rules_apply_without_cap_net_admin_exits_2_with_one_line():
    # In a namespace of our own: if dropping the capability failed, nothing
    # would be installed in the machine's namespace.
    ns = f"{next_prefix()}-cap"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for action in ("apply", "delete"):
            out = subprocess.run(
                ["ip", "netns", "exec", ns, "setpriv", "--bounding-set=-net_admin,-sys_admin"]
                + [sys.executable, "-m", "trio_tproxy", "rules", action],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 2, out
            assert out.stderr.strip().splitlines() == [
                "trio-tproxy rules: error: CAP_NET_ADMIN is missing: run as root or give the "
                "container the NET_ADMIN capability (or pass --no-rules if an init container "
                "installs them)"
            ]
        tables = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "list", "tables"], capture_output=True, text=True
        )
        assert tables.stdout == ""
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)


def test_bad_files_name_the_file_and_the_problem(pki, tmp_path):
    a, b = pki["a"], pki["b"]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    ca_cert, ca_key = certs.make_ca()
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    expired, expired_key = certs.issue(
        ca_cert,
        ca_key,
        spiffe_ids=["spiffe://cluster.local/x"],
        not_before=old,
        not_after=old + dt.timedelta(days=1),
    )
    certs.write_cert(tmp_path / "expired.crt", expired)
    certs.write_key(tmp_path / "expired.key", expired_key)
    cases = [
        ((tmp_path / "absent.crt", a.key, a.ca_cert), "absent.crt"),
        ((garbage, a.key, a.ca_cert), "garbage.pem"),
        ((a.cert, b.key, a.ca_cert), "does not match"),
        ((tmp_path / "expired.crt", tmp_path / "expired.key", a.ca_cert), "expired"),
        ((a.cert, a.key, garbage), "garbage.pem"),
    ]
    for (cert, key, ca), fragment in cases:
        out = run_cli("run", *tls_flags(cert, key, ca))
        assert out.returncode == 2, (fragment, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], (fragment, out.stderr)


def test_certs_subcommand_makes_a_working_pki(tmp_path):
    assert run_cli("certs", "ca", "--out", str(tmp_path)).returncode == 0
    out = run_cli(
        "certs",
        "issue",
        "--ca-dir",
        str(tmp_path),
        "--out",
        str(tmp_path),
        "--name",
        "web",
        "--spiffe-id",
        "spiffe://cluster.local/ns/prod/sa/web",
        "--ip",
        "10.1.2.3",
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "web.key").stat().st_mode & 0o777 == 0o600
    from trio_tproxy.config import TLSFiles
    from trio_tproxy.credentials import load_credentials

    creds = load_credentials(
        TLSFiles(tmp_path / "web.crt", tmp_path / "web.key", tmp_path / "ca.crt")
    )
    assert creds.spiffe_id == "spiffe://cluster.local/ns/prod/sa/web"


@pytest.mark.netns  # setpriv --bounding-set needs root (CAP_SETPCAP)
def test_demo_refuses_politely_without_root():
    out = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-net_admin,-sys_admin",
            sys.executable,
            "-m",
            "trio_tproxy",
            "demo",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0 and "setpriv" in out.stderr:
        skip_or_fail(f"cannot drop privileges here: {out.stderr.strip()}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "trio-tproxy demo: the demo needs root: it creates network namespaces and nftables "
        "rules (run it as root)"
    ]


def test_unknown_tls_groups_exit_2_with_one_line(pki):
    files = pki["a"]
    out = run_cli(
        "run",
        *tls_flags(files.cert, files.key, files.ca_cert),
        "--no-rules",
        "--tls-groups",
        "NOPE:P-999",
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid --tls-groups 'NOPE:P-999'" in lines[0], out.stderr

"""The command line: flags in both spellings, and one-line errors with exit code 2."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_pki

from trio_tproxy import certs, nft
from trio_tproxy.cli import build_parser, config_from, interception_from


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
    assert ic.exclude_inbound_ports == (8081,) and ic.exclude_outbound_ports == (53,)


def test_rules_show_prints_exactly_the_rendered_ruleset():
    out = run_cli("rules", "show", "--exclude-outbound-port", "53")
    assert out.returncode == 0, out.stderr
    args = build_parser().parse_args(["rules", "show", "--exclude-outbound-port", "53"])
    assert out.stdout == nft.render(interception_from(args))


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["run", "--tcp-port", "70000"], "invalid port 70000"),
        (["run", "--tcp-port", "x"], "invalid port 'x'"),
        (["run", "--intercept-cidr", "10.0.0.0/33"], "invalid CIDR"),
        (["run", "--verify", "dns"], "invalid choice"),
        (["run", "--handshake-timeout", "0"], "must be > 0"),
        (["run", "--no-such-flag"], "unrecognized arguments"),
        (["run"], "missing --cert, --key, --ca-cert"),
        (["rules", "show", "--tcp-port", "5", "--tls-port", "5"], "both 5"),
        (["rules", "show", "--table", "1abc"], "invalid nft table name"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, fragment):
    out = run_cli(*argv)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert fragment in lines[0]


def test_missing_certificate_explains_how_to_make_one():
    out = run_cli("run")
    assert "trio-tproxy certs ca" in out.stderr and "no key ships" in out.stderr


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
    if out.returncode != 0 and "setpriv" in out.stderr and os.environ.get("CI") != "true":
        pytest.skip("cannot drop privileges here (not root)")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "trio-tproxy demo: the demo needs root: it creates network namespaces and nftables "
        "rules (run it with sudo)"
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

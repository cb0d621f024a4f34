"""certs: the development CA, leaves, key files and the ``certs`` subcommand."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import trio_tproxy
from trio_tproxy import certs, pem
from trio_tproxy.config import ConfigError, TLSFiles
from trio_tproxy.credentials import load_credentials

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    return certs.make_ca()


def ext(cert: x509.Certificate, cls: type[Any]) -> Any:
    return cert.extensions.get_extension_for_class(cls)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_zero() -> Iterator[None]:
    # The most permissive umask: file modes must come from our code, not the umask.
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# --- make_ca / issue -------------------------------------------------------------------


def test_make_ca_is_a_p256_self_signed_leaf_only_ca(ca: tuple[x509.Certificate, Any]) -> None:
    cert, key = ca
    assert isinstance(key.curve, ec.SECP256R1)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    cert.verify_directly_issued_by(cert)
    constraints = ext(cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ext(cert, x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "trio-tproxy development CA"
    )


def test_make_ca_validity_in_days() -> None:
    cert, _ = certs.make_ca("short", days=10)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=10) <= lifetime <= dt.timedelta(days=10, minutes=6)


def test_issue_leaf_extensions(ca: tuple[x509.Certificate, Any]) -> None:
    ca_cert, ca_key = ca
    cert, key = certs.issue(
        ca_cert,
        ca_key,
        spiffe_ids=["spiffe://cluster.local/ns/default/sa/web"],
        ips=["10.0.0.2", "fd00::2"],
        dns=["web.default.svc"],
    )
    cert.verify_directly_issued_by(ca_cert)
    assert isinstance(key.curve, ec.SECP256R1)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert cert.issuer == ca_cert.subject
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/default/sa/web"
    ]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.2"),
        ipaddress.ip_address("fd00::2"),
    ]
    assert san.get_values_for_type(x509.DNSName) == ["web.default.svc"]
    eku = ext(cert, x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    constraints = ext(cert, x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=89) < lifetime <= dt.timedelta(days=90, minutes=1)


def test_issue_validity_overrides_make_expired_and_future_certs(
    ca: tuple[x509.Certificate, Any],
) -> None:
    expired, _ = certs.issue(*ca, dns=["x"], not_after=NOW - dt.timedelta(days=1))
    assert expired.not_valid_after_utc < NOW
    assert expired.not_valid_before_utc < expired.not_valid_after_utc
    start, end = NOW + dt.timedelta(days=2), NOW + dt.timedelta(days=3)
    future, _ = certs.issue(*ca, dns=["x"], not_before=start, not_after=end)
    assert future.not_valid_before_utc == start.replace(microsecond=0)
    assert future.not_valid_after_utc == end.replace(microsecond=0)


def test_issue_never_outlives_its_ca() -> None:
    ca_cert, ca_key = certs.make_ca(days=30)
    leaf, _ = certs.issue(ca_cert, ca_key, dns=["x"], days=90)
    assert leaf.not_valid_after_utc == ca_cert.not_valid_after_utc


def test_issue_default_common_name_is_readable(ca: tuple[x509.Certificate, Any]) -> None:
    leaf, _ = certs.issue(*ca, spiffe_ids=["spiffe://cluster.local/ns/a/sa/b"])
    cn = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "spiffe://cluster.local/ns/a/sa/b"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spiffe_ids": ["http://cluster.local/a"]}, "invalid SPIFFE ID 'http://cluster.local/a'"),
        ({"spiffe_ids": ["spiffe://cluster.local/ns/"]}, "needs a path and no trailing '/'"),
        ({"spiffe_ids": ["spiffe://Bad_Domain!/a"]}, "invalid SPIFFE ID 'spiffe://Bad_Domain!/a'"),
        ({"ips": ["10.0.0.300"]}, "invalid IP address '10.0.0.300'"),
        ({"dns": ["wéb.example"]}, "invalid DNS name 'wéb.example'"),
        ({}, "at least one SPIFFE ID, IP or DNS name"),
        ({"dns": ["x"], "days": 0}, "invalid validity 0 days"),
        ({"dns": ["x"], "common_name": "c" * 65}, "invalid common name"),
    ],
)
def test_issue_rejects_bad_input(
    ca: tuple[x509.Certificate, Any], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        certs.issue(*ca, **kwargs)
    assert message in str(info.value)


# --- files ------------------------------------------------------------------------------


def test_write_key_is_0600_pkcs8_and_round_trips(
    tmp_path: Path, ca: tuple[x509.Certificate, Any], umask_zero: None
) -> None:
    _, key = certs.issue(*ca, dns=["x"])
    path = tmp_path / "leaf.key"
    certs.write_key(path, key)
    assert mode(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    loaded = pem.read_key(path)
    assert pem.key_matches(certs.issue(*ca, dns=["x"])[0], loaded) is False
    assert loaded.public_key() == key.public_key()


def test_write_key_creates_the_file_with_mode_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ca: tuple[x509.Certificate, Any]
) -> None:
    # The file must never exist with a wider mode, even before a chmod.
    calls: list[tuple[int, int]] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        calls.append((flags, mode))
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", spy)
    certs.write_key(tmp_path / "k.key", ca[1])
    assert calls, "write_key did not go through os.open"
    flags, created_mode = calls[0]
    assert created_mode == 0o600
    assert flags & os.O_CREAT and flags & os.O_EXCL


def test_write_key_replaces_a_world_readable_file(tmp_path: Path, umask_zero: None) -> None:
    path = tmp_path / "old.key"
    path.write_text("old")
    path.chmod(0o644)
    certs.write_key(path, ec.generate_private_key(ec.SECP256R1()))
    assert mode(path) == 0o600
    assert b"PRIVATE KEY" in path.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["old.key"]  # no temporary left behind


def test_write_cert_is_0644_and_keeps_order(
    tmp_path: Path, ca: tuple[x509.Certificate, Any], umask_zero: None
) -> None:
    leaf, _ = certs.issue(*ca, dns=["x"])
    path = tmp_path / "chain.crt"
    certs.write_cert(path, leaf, ca[0])
    assert mode(path) == 0o644
    assert pem.read_certs(path) == [leaf, ca[0]]


def test_write_into_missing_directory_names_the_path(tmp_path: Path) -> None:
    target = tmp_path / "nope" / "x.key"
    with pytest.raises(ConfigError, match=f"cannot write {target}: No such file or directory"):
        certs.write_key(target, ec.generate_private_key(ec.SECP256R1()))


def test_no_private_key_ships_in_the_package() -> None:
    # A real PEM key is a BEGIN line followed by base64; mentions in messages are not.
    pem_key = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\s+[A-Za-z0-9+/=]{40}")
    real = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert pem_key.search(real)  # the pattern does recognise a key
    package = Path(trio_tproxy.__file__).parent
    files = [p for p in package.rglob("*") if p.is_file()]
    assert any(p.name == "certs.py" for p in files)
    assert [p for p in files if pem_key.search(p.read_bytes())] == []


# --- command line -------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="trio-tproxy")
    certs.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["certs", *argv])
    code: int = args.func(args)
    return code


def test_cli_ca_then_issue_makes_usable_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "out"
    assert run_cli("ca", "--out", str(ca_dir), "--days", "30", "--cn", "test CA") == 0
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {ca_dir / 'ca.key'}",
        f"wrote {ca_dir / 'ca.crt'}",
    ]
    assert mode(ca_dir / "ca.key") == 0o600
    assert (
        run_cli(
            "issue",
            "--ca-dir",
            str(ca_dir),
            "--out",
            str(out),
            "--name",
            "web",
            "--spiffe-id",
            "spiffe://cluster.local/ns/default/sa/web",
            "--ip",
            "10.0.0.2",
            "--ip",
            "fd00::2",
            "--dns",
            "web.default.svc",
            "--days",
            "7",
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {out / 'web.key'}",
        f"wrote {out / 'web.crt'}",
    ]
    assert mode(out / "web.key") == 0o600
    creds = load_credentials(TLSFiles(out / "web.crt", out / "web.key", ca_dir / "ca.crt"))
    assert creds.spiffe_id == "spiffe://cluster.local/ns/default/sa/web"
    assert creds.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web"
    san = ext(creds.cert, x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("fd00::2") in san.get_values_for_type(x509.IPAddress)
    assert creds.not_after - dt.datetime.now(dt.UTC) < dt.timedelta(days=7, minutes=1)


def test_cli_ca_refuses_to_replace_a_ca_key(tmp_path: Path) -> None:
    assert run_cli("ca", "--out", str(tmp_path)) == 0
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(ConfigError, match="ca.key already exists"):
        run_cli("ca", "--out", str(tmp_path))
    assert (tmp_path / "ca.key").read_bytes() == before


def test_cli_issue_without_ca_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        run_cli(
            "issue", "--ca-dir", str(tmp_path), "--out", str(tmp_path), "--name", "x", "--dns", "x"
        )
    message = str(info.value)
    assert message.startswith(f"CA certificate {tmp_path / 'ca.crt'}: cannot read")
    assert "trio-tproxy certs ca --out DIR" in message


def test_cli_issue_with_mismatched_ca_key(tmp_path: Path) -> None:
    run_cli("ca", "--out", str(tmp_path / "a"))
    run_cli("ca", "--out", str(tmp_path / "b"))
    (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())
    with pytest.raises(ConfigError, match="CA key .*/a/ca.key does not match CA certificate"):
        run_cli(
            "issue",
            "--ca-dir",
            str(tmp_path / "a"),
            "--out",
            str(tmp_path),
            "--name",
            "x",
            "--dns",
            "x",
        )


def test_cli_issue_with_garbage_ca_cert(tmp_path: Path) -> None:
    run_cli("ca", "--out", str(tmp_path))
    (tmp_path / "ca.crt").write_text("hello\n")
    with pytest.raises(ConfigError, match=r"ca\.crt: no certificate \(not PEM"):
        run_cli(
            "issue", "--ca-dir", str(tmp_path), "--out", str(tmp_path), "--name", "x", "--dns", "x"
        )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ip", "10.0.0.300"], "invalid IP address '10.0.0.300'"),
        (["--spiffe-id", "spiffe:/cluster.local/x"], "invalid SPIFFE ID 'spiffe:/cluster.local/x'"),
        (["--name", "../escape", "--dns", "x"], "invalid --name '../escape'"),
    ],
)
def test_cli_issue_rejects_bad_values(tmp_path: Path, flags: list[str], message: str) -> None:
    run_cli("ca", "--out", str(tmp_path))
    argv = ["issue", "--ca-dir", str(tmp_path), "--out", str(tmp_path)]
    if "--name" not in flags:
        argv += ["--name", "x"]
    with pytest.raises(ConfigError) as info:
        run_cli(*argv, *flags)
    assert message in str(info.value)
    assert not (tmp_path / "x.key").exists()


def test_unreadable_file_gets_no_create_hint(tmp_path: Path, monkeypatch) -> None:
    """Only a missing file suggests `certs ca`: creating a CA cannot fix permissions."""
    assert run_cli("ca", "--out", str(tmp_path)) == 0
    files = TLSFiles(tmp_path / "ca.crt", tmp_path / "ca.key", tmp_path / "ca.crt")

    real_open = Path.open

    def denied(self: Path, *args: Any, **kw: Any) -> Any:
        if self.name == "ca.crt":
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kw)

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(ConfigError) as info:
        load_credentials(files)
    assert "Permission denied" in str(info.value)
    assert "certs ca" not in str(info.value)
    monkeypatch.undo()

    (tmp_path / "dir.crt").mkdir()  # another read error (EISDIR): no hint either
    with pytest.raises(ConfigError) as info:
        load_credentials(TLSFiles(tmp_path / "dir.crt", tmp_path / "ca.key", tmp_path / "ca.crt"))
    assert "cannot read" in str(info.value) and "certs " not in str(info.value)

    with pytest.raises(ConfigError) as info:  # a missing file still says how to make one
        load_credentials(TLSFiles(tmp_path / "no.crt", tmp_path / "ca.key", tmp_path / "ca.crt"))
    assert "trio-tproxy certs ca" in str(info.value)

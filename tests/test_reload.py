"""Credential rotation without root: the credential bundle format, the kubelet's
``..data`` symlink swap, a torn or corrupt update, and the expiry warnings.

The kernel path (a live transfer across a swap, new connections presenting the
new certificate, SIGHUP) is tests/test_rotation.py.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import serialization

from lab import kubelet
from lab.pki import PKI, spiffe_id
from trio_tproxy import certs, tlspolicy
from trio_tproxy.config import ConfigError, TLSFiles
from trio_tproxy.credentials import Credentials, load_credentials
from trio_tproxy.reload import CredentialWatcher, fingerprint
from trio_tproxy.sessions import SessionCache


def bundle_bytes(ca: PKI, name: str, **issue: object) -> tuple[bytes, int]:
    """A podCertificate credential bundle: PKCS#8 key, then the chain; and the serial."""
    cert, key = certs.issue(ca.cert, ca.key, spiffe_ids=[spiffe_id(name)], **issue)  # type: ignore[arg-type]
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ) + cert.public_bytes(serialization.Encoding.PEM)
    return pem, cert.serial_number


def ca_bytes(ca: PKI) -> bytes:
    return ca.ca_path.read_bytes()


@pytest.fixture
def ca(tmp_path: Path) -> PKI:
    return PKI(tmp_path / "pki")


def publish(volume: Path, bundle: bytes, ca: PKI) -> TLSFiles:
    kubelet.write(volume, {"credentialbundle.pem": bundle, "ca.crt": ca_bytes(ca)})
    return TLSFiles.bundle(volume / "credentialbundle.pem", volume / "ca.crt")


def test_credential_bundle_is_read_and_checked(tmp_path, ca):
    pem, serial = bundle_bytes(ca, "a")
    files = publish(tmp_path / "vol", pem, ca)
    creds = load_credentials(files)
    assert creds.cert.serial_number == serial and creds.spiffe_id == spiffe_id("a")
    # The contexts take the parsed CA certificates (not a second read of the file).
    tlspolicy.server_context(creds)
    tlspolicy.client_context(creds)
    # A bundle whose key is not the leaf's: the startup error names the bundle.
    other, _ = bundle_bytes(ca, "b")
    key_of_other = other.split(b"-----BEGIN CERTIFICATE-----")[0]
    cert_of_first = pem[pem.index(b"-----BEGIN CERTIFICATE-----") :]
    (tmp_path / "bad.pem").write_bytes(key_of_other + cert_of_first)
    with pytest.raises(ConfigError, match="credential bundle .*bad.pem: the key does not match"):
        load_credentials(TLSFiles.bundle(tmp_path / "bad.pem", ca.ca_path))
    (tmp_path / "nokey.pem").write_bytes(cert_of_first)
    with pytest.raises(ConfigError, match="credential bundle .*nokey.pem: no private key"):
        load_credentials(TLSFiles.bundle(tmp_path / "nokey.pem", ca.ca_path))


def test_symlink_swap_changes_the_fingerprint_of_the_resolved_file(tmp_path, ca):
    pem, _ = bundle_bytes(ca, "a")
    files = publish(tmp_path / "vol", pem, ca)
    before = fingerprint(files.paths)
    assert None not in before
    assert fingerprint(files.paths) == before  # stable while nothing changes
    # Same bytes, new directory: still a change (new inode), as the kubelet makes it.
    publish(tmp_path / "vol", pem, ca)
    assert fingerprint(files.paths) != before
    assert (tmp_path / "vol" / "credentialbundle.pem").is_symlink()


class Applied:
    def __init__(self) -> None:
        self.got: list[Credentials] = []

    def __call__(self, creds: Credentials) -> None:
        tlspolicy.server_context(creds)  # what Sidecar.use_credentials does first
        self.got.append(creds)


def test_watcher_switches_on_swap_and_keeps_old_on_a_corrupt_bundle(tmp_path, ca, caplog):
    trio.run(_test_watcher_switches_on_swap_and_keeps_old_on_a_corrupt_bundle, tmp_path, ca, caplog)


async def _test_watcher_switches_on_swap_and_keeps_old_on_a_corrupt_bundle(tmp_path, ca, caplog):
    caplog.set_level(logging.INFO, logger="trio_tproxy")
    vol = tmp_path / "vol"
    pem1, serial1 = bundle_bytes(ca, "a")
    files = publish(vol, pem1, ca)
    applied = Applied()
    w = CredentialWatcher.for_files(files, load_credentials(files), applied, poll=3600)
    assert not await w.check()  # nothing changed: nothing read
    pem2, serial2 = bundle_bytes(ca, "a")
    publish(vol, pem2, ca)
    assert await w.check()
    assert [c.cert.serial_number for c in applied.got] == [serial2]
    assert w.current.cert.serial_number == serial2
    assert f"credentials reloaded (files changed): now serial {serial2:x}" in caplog.text
    assert f"(was serial {serial1:x})" in caplog.text
    # A truncated bundle: one error line, the current credentials stay.
    caplog.clear()
    publish(vol, pem2[: len(pem2) // 2], ca)
    assert not await w.check()
    assert w.current.cert.serial_number == serial2 and len(applied.got) == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "credentials not reloaded (files changed): credential bundle" in errors[0].message
    assert f"keeping serial {serial2:x}" in errors[0].message
    # Not retried (and not logged again) until the files change once more.
    assert not await w.check()
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    # A trust bundle with no certificate: refused as at start-up.
    kubelet.write(vol, {"credentialbundle.pem": pem2, "ca.crt": b"garbage"})
    assert not await w.check()
    assert "CA file" in caplog.records[-1].message
    # Good files again: switched.
    pem3, serial3 = bundle_bytes(ca, "a")
    publish(vol, pem3, ca)
    assert await w.check()
    assert w.current.cert.serial_number == serial3
    assert w.reloads == 2 and w.failures == 2


def test_watcher_refuses_a_certificate_apply_rejects(tmp_path, ca, caplog):
    trio.run(_test_watcher_refuses_a_certificate_apply_rejects, tmp_path, ca, caplog)


async def _test_watcher_refuses_a_certificate_apply_rejects(tmp_path, ca, caplog):
    pem1, serial1 = bundle_bytes(ca, "a")
    files = publish(tmp_path / "vol", pem1, ca)

    def refuse(creds: Credentials) -> None:
        raise RuntimeError("OpenSSL says no")

    w = CredentialWatcher.for_files(files, load_credentials(files), refuse, poll=3600)
    publish(tmp_path / "vol", bundle_bytes(ca, "a")[0], ca)
    assert not await w.check()
    assert w.current.cert.serial_number == serial1
    assert "RuntimeError: OpenSSL says no; keeping serial" in caplog.text


def test_request_reloads_unchanged_files_and_a_torn_read_heals(tmp_path, ca, caplog):
    trio.run(_test_request_reloads_unchanged_files_and_a_torn_read_heals, tmp_path, ca, caplog)


async def _test_request_reloads_unchanged_files_and_a_torn_read_heals(tmp_path, ca, caplog):
    caplog.set_level(logging.INFO, logger="trio_tproxy")
    pem1, _ = bundle_bytes(ca, "a")
    files = publish(tmp_path / "vol", pem1, ca)
    applied = Applied()
    w = CredentialWatcher.for_files(files, load_credentials(files), applied, poll=3600)
    assert await w.check(reason="SIGHUP")  # forced: same files, reloaded anyway
    assert "credentials reloaded (SIGHUP)" in caplog.text
    # Three files (cert, key, CA) read in three reads: a swap between the
    # fingerprint and the reads is seen again on the next look.
    three = tmp_path / "three"
    cert_a, key_a = certs.issue(ca.cert, ca.key, spiffe_ids=[spiffe_id("a")])
    three.mkdir()
    certs.write_cert(three / "tls.crt", cert_a)
    certs.write_key(three / "tls.key", key_a)
    tfiles = TLSFiles(three / "tls.crt", three / "tls.key", ca.ca_path)
    w3 = CredentialWatcher.for_files(tfiles, load_credentials(tfiles), applied, poll=3600)
    cert_b, key_b = certs.issue(ca.cert, ca.key, spiffe_ids=[spiffe_id("a")])
    certs.write_cert(three / "tls.crt", cert_b)  # the key has not been written yet
    assert not await w3.check()  # mismatch: refused, old kept
    certs.write_key(three / "tls.key", key_b)
    assert await w3.check()
    assert w3.current.cert.serial_number == cert_b.serial_number


def test_watch_loop_wakes_on_request_and_polls(tmp_path, ca):
    pem1, _ = bundle_bytes(ca, "a")
    files = publish(tmp_path / "vol", pem1, ca)
    applied = Applied()

    async def main() -> None:
        w = CredentialWatcher.for_files(files, load_credentials(files), applied, poll=3600)
        async with trio.open_nursery() as nursery:
            await nursery.start(w.watch)
            w.request()  # what SIGHUP does: no poll for an hour, reloaded at once
            with trio.fail_after(5):
                while not applied.got:  # noqa: ASYNC110 - apply is a plain callback
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        w = CredentialWatcher.for_files(files, load_credentials(files), applied, poll=0.05)
        async with trio.open_nursery() as nursery:
            await nursery.start(w.watch)
            publish(tmp_path / "vol", bundle_bytes(ca, "a")[0], ca)
            with trio.fail_after(5):  # found by the poll
                while len(applied.got) < 2:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_expiry_warned_once_ahead_and_once_when_expired(tmp_path, ca, caplog):
    now = dt.datetime.now(dt.UTC)
    pem, serial = bundle_bytes(
        ca, "a", not_before=now - dt.timedelta(hours=20), not_after=now + dt.timedelta(hours=4)
    )
    files = publish(tmp_path / "vol", pem, ca)
    clock = [now - dt.timedelta(hours=12)]  # 16h of 24h left: quiet
    w = CredentialWatcher.for_files(
        files, load_credentials(files, now=clock[0]), Applied(), clock=lambda: clock[0]
    )
    w.check_expiry()
    assert not caplog.records
    clock[0] = now  # 4h of 24h left (< 1/3)
    w.check_expiry()
    w.check_expiry()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    # not_after is stored to the second: 4h less a fraction
    assert re.search(
        rf"our certificate expires in (3h59m|4h0m) \(serial {serial:x}", warnings[0].message
    )
    clock[0] = now + dt.timedelta(hours=5)
    w.check_expiry()
    w.check_expiry()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "our certificate has EXPIRED" in errors[0].message


def test_session_cache_clear():
    cache = SessionCache(4)
    cache._sessions[("10.0.0.1", 1)] = object()  # type: ignore[assignment]
    assert len(cache) == 1
    cache.clear()
    assert len(cache) == 0

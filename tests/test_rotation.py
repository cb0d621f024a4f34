"""Credential rotation through the kernel path (root, network namespaces).

Pod B's sidecar reads a podCertificate credential bundle and a trust bundle
from a volume written the way the kubelet writes projected volumes
(:mod:`lab.kubelet`: a new hidden directory, then an atomic ``..data``
symlink swap).  While a long transfer from A to B runs through both sidecars,
B's credentials are rotated: the transfer completes byte for byte on its old
TLS session, and a new connection is served with the new certificate (its
serial read from the certificate B presents to a client in "outside").  A
corrupt bundle keeps the current certificate; SIGHUP alone reloads.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lab import kubelet
from lab.netns import next_prefix, socket_in
from lab.pods import PodLab, spiffe_id
from trio_tproxy import certs
from trio_tproxy.config import TLSFiles

pytestmark = pytest.mark.netns

ECHO = 7001


def issue_bundle(lab: PodLab, pod: str) -> tuple[bytes, int]:
    """A fresh credential bundle (PKCS#8 key + leaf) for ``pod``; and its serial."""
    ca_cert = x509.load_pem_x509_certificate((lab.workdir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((lab.workdir / "ca.key").read_bytes(), None)
    host = lab.host(pod)
    cert, key = certs.issue(
        ca_cert,
        ca_key,  # type: ignore[arg-type]
        spiffe_ids=[spiffe_id(pod)],
        ips=[host.ip4, host.ip6, host.ip4_plain, host.ip6_plain],
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ) + cert.public_bytes(serialization.Encoding.PEM)
    return pem, cert.serial_number


def publish(lab: PodLab, bundle: bytes, layout: str = "bundle") -> None:
    """Write B's credentials as the kubelet does: a podCertificate + clusterTrustBundle
    projection (``bundle``) or a Secret / csi-driver-spiffe volume (``secret``)."""
    ca = (lab.workdir / "ca.crt").read_bytes()
    if layout == "bundle":
        kubelet.write(lab.workdir / "b-volume", {"credentialbundle.pem": bundle, "ca.crt": ca})
    else:
        cut = bundle.index(b"-----BEGIN CERTIFICATE-----") if b"CERTIFICATE" in bundle else 0
        key, chain = bundle[:cut], bundle[cut:]
        kubelet.write(lab.workdir / "b-secret", {"tls.crt": chain, "tls.key": key, "ca.crt": ca})


def presented_serial(lab: PodLab, port: int = ECHO) -> int:
    """Connect from "outside" to B (TLS, with outside's client certificate): B's serial."""
    files = lab.files["outside"]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(lab.workdir / "ca.crt"))
    ctx.load_cert_chain(str(files.cert), str(files.key))
    raw = socket_in(lab.host("outside").netns, socket.AF_INET)
    raw.settimeout(10)
    raw.connect((lab.host("b").ip4, port))
    with ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
        tls.sendall(b"ping")
        assert tls.recv(4) == b"ping"  # served: the app echoes through B's sidecar
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def wait_for(lab: PodLab, pod: str, pattern: str, since: int, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = lab.sidecars[pod].log()[since:]
        m = re.search(pattern, text)
        if m:
            return text[text.rfind("\n", 0, m.start()) + 1 : text.find("\n", m.end())]
        if time.monotonic() > deadline:
            raise AssertionError(f"no /{pattern}/ in {pod}'s log:\n{text[-3000:]}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodLab]:
    with PodLab(tmp_path_factory.mktemp("rot"), prefix=next_prefix()) as lab:
        bundle, _ = issue_bundle(lab, "b")
        publish(lab, bundle)
        volume = lab.workdir / "b-volume"
        lab.files["b-bundle"] = TLSFiles.bundle(volume / "credentialbundle.pem", volume / "ca.crt")
        publish(lab, bundle, "secret")
        secret = lab.workdir / "b-secret"
        lab.files["b-secret"] = TLSFiles(secret / "tls.crt", secret / "tls.key", secret / "ca.crt")
        lab.start_sidecar("a")
        py = sys.executable
        lab.start_app("b", py, "-m", "lab.apps", "echo-server", str(ECHO), port=ECHO)
        yield lab


class Transfer(threading.Thread):
    """A→B echo through both sidecars: ``chunks`` of 64 KiB, one round trip each,
    pausing at ``hold`` until released (so the rotation happens mid-transfer)."""

    def __init__(self, lab: PodLab, chunks: int, hold: int) -> None:
        super().__init__(daemon=True)
        self.lab, self.chunks, self.hold = lab, chunks, hold
        self.at_hold, self.release = threading.Event(), threading.Event()
        self.echoed = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            sock = socket_in(self.lab.host("a").netns, socket.AF_INET)
            sock.settimeout(20)
            sock.connect((self.lab.host("b").ip4, ECHO))
            with sock:
                for i in range(self.chunks):
                    if i == self.hold:
                        self.at_hold.set()
                        assert self.release.wait(30)
                    chunk = os.urandom(65536)
                    sock.sendall(chunk)
                    got = b""
                    while len(got) < len(chunk):
                        data = sock.recv(len(chunk) - len(got))
                        assert data, "connection closed mid-transfer"
                        got += data
                    assert got == chunk
                    self.echoed += len(got)
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(1) == b""
        except BaseException as exc:  # reported by the test
            self.error = exc


@pytest.mark.parametrize("layout", ["bundle", "secret"])
def test_symlink_swap_mid_transfer_then_new_connections_use_the_new_certificate(lab, layout):
    sidecar = lab.start_sidecar("b", "--credential-poll", "0.1", identity=f"b-{layout}")
    try:
        first = presented_serial(lab)
        transfer = Transfer(lab, chunks=64, hold=16)
        transfer.start()
        assert transfer.at_hold.wait(20), transfer.error
        since = len(sidecar.log())
        bundle, second = issue_bundle(lab, "b")
        publish(lab, bundle, layout)  # the kubelet's atomic ..data swap
        line = wait_for(lab, "b", r"credentials reloaded \(files changed\)", since)
        assert f"now serial {second:x}" in line and f"(was serial {first:x})" in line
        transfer.release.set()
        transfer.join(30)
        assert transfer.error is None and transfer.echoed == 64 * 65536
        # The live connection finished on its old session; A's sidecar logged it whole.
        assert presented_serial(lab) == second != first

        # A corrupt bundle: one error line, the second certificate stays in use.
        since = len(sidecar.log())
        publish(lab, bundle[: len(bundle) // 2], layout)  # a truncated key / bundle
        line = wait_for(lab, "b", r"credentials not reloaded", since)
        assert ("credential bundle" if layout == "bundle" else "certificate file") in line
        assert f"keeping serial {second:x}" in line
        assert presented_serial(lab) == second
        assert sidecar.process.poll() is None
    finally:
        assert lab.stop_sidecar("b") == 0


def test_sighup_alone_reloads_and_never_stops_the_sidecar(lab):
    bundle, before = issue_bundle(lab, "b")
    publish(lab, bundle)
    # An hour between polls: only the signal can make it look.
    sidecar = lab.start_sidecar("b", "--credential-poll", "3600", identity="b-bundle")
    try:
        assert presented_serial(lab) == before
        bundle, after = issue_bundle(lab, "b")
        publish(lab, bundle)
        assert presented_serial(lab) == before  # not noticed without the signal
        since = len(sidecar.log())
        sidecar.process.send_signal(signal.SIGHUP)
        line = wait_for(lab, "b", r"credentials reloaded \(SIGHUP\)", since)
        assert f"now serial {after:x}" in line
        assert "SIGHUP received: reloading credentials" in sidecar.log()[since:]
        assert presented_serial(lab) == after
        since = len(sidecar.log())
        sidecar.process.send_signal(signal.SIGUSR1)
        wait_for(lab, "b", r"SIGUSR1 received: ignored", since)
        assert presented_serial(lab) == after and sidecar.process.poll() is None
    finally:
        assert lab.stop_sidecar("b") == 0


def test_the_volume_has_the_kubelet_layout(lab: PodLab) -> None:
    # The volume really is the kubelet's layout: a symlink to ..data, which is a symlink.
    volume = Path(lab.workdir / "b-volume")
    assert os.readlink(volume / "credentialbundle.pem") == "..data/credentialbundle.pem"
    assert os.readlink(volume / "..data").startswith("..20")

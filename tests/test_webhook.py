"""trio-tproxy webhook: AdmissionReview in, JSONPatch out; over real HTTPS with curl.

The pure part (:func:`trio_tproxy.webhook.review`) is driven with fixture
pods: the patch it returns, applied to the pod, gives a pod valid for
Kubernetes 1.35 with the sidecar; skipped pods are allowed with a warning;
bad input is a 400 with the reason.  Then the real server runs as a process
(``trio-tproxy webhook``) on loopback with a certificate from the dev CA, and
curl makes the API server's call: the round trip, malformed and oversized
requests, health endpoints, a serving-certificate rotation by the kubelet's
symlink swap and by SIGHUP, SIGTERM.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from k8s_schema import apply_patch, decode_patch, validate

from lab import kubelet
from lab.pki import PKI
from trio_tproxy import certs
from trio_tproxy.inject import InjectConfig
from trio_tproxy.webhook import review

FIXTURES = Path(__file__).parent / "fixtures" / "inject"


def admission_review(obj: dict, *, operation: str = "CREATE", uid: str | None = None) -> dict:
    """What the API server sends (the fields a mutating webhook reads)."""
    meta = obj.get("metadata", {})
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid or str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": meta.get("namespace", "default"),
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def pods(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((FIXTURES / f"{name}.yaml").read_text()) if d]


def call(obj: dict, **kw: object) -> tuple[str, dict]:
    req = admission_review(obj, **kw)  # type: ignore[arg-type]
    status, body = review(json.dumps(req).encode(), InjectConfig())
    assert status == 200
    assert body["apiVersion"] == "admission.k8s.io/v1" and body["kind"] == "AdmissionReview"
    assert body["response"]["uid"] == req["request"]["uid"]
    return req["request"]["uid"], body["response"]


@pytest.mark.parametrize("name", ["plain", "probes", "init-container"])
def test_patch_applied_to_the_pod_gives_a_valid_injected_pod(name):
    (pod,) = pods(name)
    _, response = call(pod)
    assert response["allowed"] is True and "warnings" not in response or name == "probes"
    patched = apply_patch(pod, decode_patch(response))
    validate(patched)
    assert patched["spec"]["initContainers"][0]["name"] == "trio-tproxy"
    # The webhook's pod is the offline command's pod (one core).
    golden = yaml.safe_load(
        (Path(__file__).parent / "golden" / "inject" / f"{name}.yaml").read_text()
    )
    assert patched == golden
    # Reinvocation (reinvocationPolicy: IfNeeded): no second patch, no warning.
    _, again = call(patched)
    assert again == {"uid": again["uid"], "allowed": True}


def test_pod_without_namespace_or_name_as_the_api_server_sends_it():
    (pod,) = pods("plain")
    del pod["metadata"]["namespace"]
    del pod["metadata"]["name"]
    pod["metadata"]["generateName"] = "web-5d8f7-"
    _, response = call(pod)
    patch = decode_patch(response)
    assert not any(op["path"].startswith("/metadata/namespace") for op in patch)
    validate(apply_patch(pod, patch))


def test_skipped_pods_are_allowed_with_a_warning():
    (host,) = pods("host-network")
    _, response = call(host)
    assert response["allowed"] is True and "patch" not in response
    assert "hostNetwork pod skipped" in response["warnings"][0]
    _, opted_out, _ = pods("annotations")
    _, response = call(opted_out)
    assert "patch" not in response and 'trio-tproxy.io/inject is "false"' in response["warnings"][0]
    (pod,) = pods("plain")
    _, response = call(pod, operation="UPDATE")
    assert response == {"uid": response["uid"], "allowed": True}


def test_invalid_annotation_is_denied_with_the_reason():
    (pod,) = pods("plain")
    pod["metadata"]["annotations"] = {"trio-tproxy.io/exclude-inbound-ports": "http"}
    _, response = call(pod)
    assert response["allowed"] is False and response["status"]["code"] == 400
    assert "invalid port 'http'" in response["status"]["message"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "body is not JSON"),
        (b"\xff\xfe", "body is not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}', "not an"),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', "no request"),
        (
            b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}',
            "no uid",
        ),
    ],
)
def test_bad_bodies_are_400_with_a_reason(body, reason):
    status, out = review(body, InjectConfig())
    assert status == 400 and reason in out["error"]


# --- the real server -------------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[str]
    port: int
    ca: Path
    volume: Path
    log_path: Path
    pki: PKI

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, pattern: str, since: int = 0, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.log()[since:]):
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, f"no /{pattern}/ in:\n{self.log()}"
            time.sleep(0.05)
        return self.log()[since:]

    def curl(self, path: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "curl",
                "-sS",
                "-m",
                "10",
                "--cacert",
                str(self.ca),
                "-w",
                "\n%{http_code}",
                *args,
                f"https://127.0.0.1:{self.port}{path}",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=20,
        )

    def serial(self) -> int:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


def serving_files(ca: PKI) -> tuple[dict[str, bytes], int]:
    cert, key = certs.issue(
        ca.cert, ca.key, dns=["trio-tproxy-webhook.trio-tproxy.svc"], ips=["127.0.0.1"]
    )
    return {
        "tls.crt": cert.public_bytes(serialization.Encoding.PEM),
        "tls.key": key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    }, cert.serial_number


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    ca = PKI(tmp_path / "pki")
    files, _ = serving_files(ca)
    volume = tmp_path / "webhook-tls"
    kubelet.write(volume, files)  # as a cert-manager Secret is mounted
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path / "webhook.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trio_tproxy",
                "webhook",
                "--tls-cert",
                str(volume / "tls.crt"),
                "--tls-key",
                str(volume / "tls.key"),
                "--host",
                "127.0.0.1",
                "--host",
                "::1",
                "--port",
                str(port),
                "--max-request-bytes",
                "200000",
                "--request-timeout",
                "2",
                "--credential-poll",
                "0.1",
            ],  # fmt: skip
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    srv = Server(process, port, ca.ca_path, volume, log_path, ca)
    try:
        srv.wait_log("webhook ready")
        yield srv
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def test_https_admission_round_trip_with_curl(server, tmp_path):
    (pod,) = pods("probes")
    req = admission_review(pod, uid="705ab4f5-6393-11e8-b7cc-42010a800002")
    (tmp_path / "review.json").write_text(json.dumps(req))
    out = server.curl(
        "/inject",
        "-H",
        "content-type: application/json",
        "--data-binary",
        f"@{tmp_path / 'review.json'}",
    )
    body, code = out.stdout.rsplit("\n", 1)
    assert code == "200", out
    response = json.loads(body)["response"]
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002" and response["allowed"]
    patched = apply_patch(pod, decode_patch(response))
    validate(patched)
    assert (
        "--app-probe=api-liveness=http://127.0.0.1:8080/healthz"
        in (patched["spec"]["initContainers"][0]["args"])
    )
    assert "admission uid=705ab4f5-6393-11e8-b7cc-42010a800002 allowed=True patched=True" in (
        server.log()
    )
    for path in ("/healthz", "/readyz"):
        out = server.curl(path)
        assert out.stdout.endswith("\n200"), out
    # Both families (a Service may reach the pod over either).
    out = server.curl("/healthz", "--connect-to", f"127.0.0.1:{server.port}:[::1]:{server.port}")
    assert out.stdout.endswith("\n200"), out


def test_malformed_oversized_and_wrong_method_requests(server, tmp_path):
    out = server.curl("/inject", "--data-binary", "{not json")
    body, code = out.stdout.rsplit("\n", 1)
    assert code == "400" and "body is not JSON" in json.loads(body)["error"]
    # --max-request-bytes 200000: a 100 kB review is served, a 300 kB one is 413.
    (pod,) = pods("plain")
    pod["metadata"]["annotations"] = {"example.com/big": "x" * 100_000}
    big = tmp_path / "big.json"
    big.write_text(json.dumps(admission_review(pod)))
    out = server.curl("/inject", "--data-binary", f"@{big}")
    assert out.stdout.endswith("\n200"), out.stdout[-300:]
    big.write_text(json.dumps(admission_review(pod)) + " " * 200_000)
    out = server.curl("/inject", "--data-binary", f"@{big}")
    assert out.stdout.endswith("\n413"), out.stdout[-300:]
    assert server.curl("/inject").stdout.endswith("\n405")  # GET
    assert server.curl("/nope").stdout.endswith("\n404")
    # Plain HTTP on the HTTPS port, and a client that sends nothing: no crash.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        s.recv(100)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.settimeout(10)
        t0 = time.monotonic()
        s.recv(100)  # the TLS handshake never came: closed by the request timeout (2 s)
        assert time.monotonic() - t0 < 8
    assert server.curl("/healthz").stdout.endswith("\n200")
    assert server.process.poll() is None


def test_serving_certificate_rotates_by_symlink_swap_and_sighup(server):
    first = server.serial()
    files, second = serving_files(server.pki)
    since = len(server.log())
    kubelet.write(server.volume, files)
    server.wait_log(r"credentials reloaded \(files changed\)", since)
    assert server.serial() == second != first
    # Unchanged files, SIGHUP: reloaded anyway.
    since = len(server.log())
    server.process.send_signal(signal.SIGHUP)
    server.wait_log(r"credentials reloaded \(SIGHUP\)", since)
    # A broken key: kept.
    since = len(server.log())
    kubelet.write(server.volume, {**files, "tls.key": b"garbage"})
    server.wait_log(r"credentials not reloaded", since)
    assert server.serial() == second
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(10) == 0
    assert "SIGTERM received: shutting down" in server.log()

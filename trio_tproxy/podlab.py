"""Two pods with sidecars on one machine: what the demo, the netns tests and the
benchmarks all stand on.

A :class:`~trio_tproxy.topology.Topology` (pods ``a`` and ``b``, host
``outside``), a throwaway PKI (one CA, a SPIFFE certificate per pod that also
carries the pod's IP SANs, a client certificate for ``outside``, and a rogue
CA for negative tests), and ``trio-tproxy run`` started inside each pod's
namespace as a real process, with its log in the work directory.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import certs
from .config import TLSFiles
from .topology import Host, Topology

TRUST_DOMAIN = "cluster.local"


def spiffe_id(name: str, namespace: str = "demo", domain: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{domain}/ns/{namespace}/sa/{name}"


@dataclass
class Sidecar:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class PodLab:
    """``with PodLab(workdir) as lab:`` builds everything; leaving removes it all."""

    def __init__(self, workdir: Path, *, prefix: str | None = None) -> None:
        self.workdir = workdir
        self.topology = Topology(prefix=prefix)
        self.files: dict[str, TLSFiles] = {}
        self.sidecars: dict[str, Sidecar] = {}

    # -- set-up ------------------------------------------------------------------

    def __enter__(self) -> PodLab:
        try:
            self.topology.create()
            self.make_pki()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host(self, name: str) -> Host:
        return self.topology.host(name)

    def make_pki(self) -> None:
        """CA + a cert per host; a rogue CA's cert; a cert in another trust domain."""
        d = self.workdir
        d.mkdir(parents=True, exist_ok=True)
        ca_cert, ca_key = certs.make_ca()
        certs.write_cert(d / "ca.crt", ca_cert)
        certs.write_key(d / "ca.key", ca_key)
        for host in self.topology.hosts:
            cert, key = certs.issue(
                ca_cert,
                ca_key,
                spiffe_ids=[spiffe_id(host.name)],
                ips=[host.ip4, host.ip6, host.ip4_plain, host.ip6_plain],
            )
            self._write(host.name, cert, key, d / "ca.crt")
        # Same CA, another trust domain: chain-valid, identity-invalid.
        cert, key = certs.issue(
            ca_cert,
            ca_key,
            spiffe_ids=["spiffe://evil.example/ns/x/sa/b"],
            ips=[self.host("b").ip4, self.host("b").ip6],
        )
        self._write("b-evil-domain", cert, key, d / "ca.crt")
        rogue_ca, rogue_key = certs.make_ca(common_name="rogue CA")
        certs.write_cert(d / "rogue-ca.crt", rogue_ca)
        cert, key = certs.issue(rogue_ca, rogue_key, spiffe_ids=[spiffe_id("outside")])
        self._write("rogue", cert, key, d / "rogue-ca.crt")

    def _write(self, name: str, cert: object, key: object, ca: Path) -> None:
        certs.write_cert(self.workdir / f"{name}.crt", cert)  # type: ignore[arg-type]
        certs.write_key(self.workdir / f"{name}.key", key)  # type: ignore[arg-type]
        self.files[name] = TLSFiles(self.workdir / f"{name}.crt", self.workdir / f"{name}.key", ca)

    # -- sidecars ------------------------------------------------------------------

    def sidecar_command(self, identity: str) -> list[str]:
        """``trio-tproxy run`` with ``identity``'s certificate, key and our CA."""
        files = self.files[identity]
        return [
            sys.executable,
            "-m",
            "trio_tproxy",
            "run",
            "--cert",
            str(files.cert),
            "--key",
            str(files.key),
            "--ca-cert",
            str(files.ca_cert),
            "--trust-domain",
            TRUST_DOMAIN,
        ]

    def start_sidecar(
        self, pod: str, *flags: str, identity: str | None = None, wait: float = 20.0
    ) -> Sidecar:
        """Run ``trio-tproxy run`` in ``pod``'s namespace; return once it logged "ready"."""
        log_path = self.workdir / f"sidecar-{pod}.log"
        with open(log_path, "ab") as log:
            process = self.topology.popen(
                pod,
                # -v 1 to prove interception in the logs; a fast route check for tests
                [
                    *self.sidecar_command(identity or pod),
                    "-v",
                    "1",
                    "--route-check-interval",
                    "0.5",
                    *flags,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        sidecar = Sidecar(pod, process, log_path)
        self.sidecars[pod] = sidecar
        offset = len(sidecar.log())
        deadline = time.monotonic() + wait
        while "ready:" not in sidecar.log()[offset:]:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"sidecar in pod {pod} did not become ready "
                    f"(exit code {process.poll()}):\n{sidecar.log()[-3000:]}"
                )
            time.sleep(0.05)
        return sidecar

    def stop_sidecar(self, pod: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        sidecar = self.sidecars.pop(pod)
        return self.topology.stop(sidecar.process, sig=sig, timeout=timeout)

    def start_app(self, pod: str, *argv: str, port: int) -> subprocess.Popen[bytes]:
        """Start a plaintext app in ``pod`` and wait until it listens on ``port``."""
        log = open(self.workdir / f"app-{pod}-{port}.log", "ab")  # noqa: SIM115 - owned by proc
        process = self.topology.popen(pod, list(argv), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.topology.wait_port(pod, "::", port, timeout=10, proc=process)
        return process

    def close(self) -> None:
        for pod in list(self.sidecars):
            try:
                self.stop_sidecar(pod)
            except Exception:  # noqa: BLE001 - teardown must go on
                pass
        self.topology.destroy()

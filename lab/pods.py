"""Two pods with sidecars on one machine: what the demo, the netns tests, the
kernel-path fuzz campaign and the benchmarks all stand on.

:class:`PodLab` is a :class:`~lab.topology.Topology` (pods ``a`` and ``b``, host
``outside``), a throwaway :class:`~lab.pki.PKI` (one CA, a SPIFFE certificate
per pod in Kubernetes namespace :data:`NAMESPACE` that also carries the pod's IP
SANs, a client certificate for ``outside``, one in another trust domain and one
from a rogue CA for negative tests), and ``trio-tproxy run`` started inside each
pod's namespace as a real process, with its log in the work directory.

:class:`Pods` is a PodLab with both sidecars up, giving connections from app A
to app B through both sidecars as a *transport* for the relay property
(fuzz/relay_property.py), with a check that every relay leg was closed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from trio_tproxy import certs
from trio_tproxy.config import TLSFiles

from . import pki
from .netns import socket_in
from .pki import TRUST_DOMAIN
from .topology import Host, Topology

__all__ = [
    "NAMESPACE",
    "TRUST_DOMAIN",
    "PodLab",
    "Pods",
    "Sidecar",
    "spiffe_id",
    "work_directory",
]

#: The Kubernetes namespace the pods' service accounts are in.
NAMESPACE = "demo"


def spiffe_id(name: str) -> str:
    """The SPIFFE ID of pod ``name``'s certificate."""
    return pki.spiffe_id(name, NAMESPACE)


@contextmanager
def work_directory(prefix: str, *, keep: bool = False) -> Iterator[Path]:
    """A fresh directory for a PodLab's keys and logs: removed on exit, or kept and named."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            print(f"work directory kept: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class Sidecar:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class PodLab:
    """``with PodLab(workdir) as lab:`` builds everything; leaving removes it all."""

    def __init__(
        self, workdir: Path, *, prefix: str | None = None, sidecar_image: str | None = None
    ) -> None:
        """``sidecar_image``: run the sidecars as containers of that image (lab.image)."""
        self.workdir = workdir
        self.sidecar_image = sidecar_image
        self._containers: list[str] = []
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
        ca = pki.PKI(self.workdir)
        certs.write_key(self.workdir / "ca.key", ca.key)  # to issue more by hand (--keep)
        for host in self.topology.hosts:
            self.files[host.name] = ca.issue(
                host.name,
                spiffe_ids=[spiffe_id(host.name)],
                ips=[host.ip4, host.ip6, host.ip4_plain, host.ip6_plain],
            )
        # Same CA, another trust domain: chain-valid, identity-invalid.
        self.files["b-evil-domain"] = ca.issue(
            "b-evil-domain",
            spiffe_ids=["spiffe://evil.example/ns/x/sa/b"],
            ips=[self.host("b").ip4, self.host("b").ip6],
        )
        rogue = pki.PKI(self.workdir, "rogue-ca", common_name="rogue CA")
        self.files["rogue"] = rogue.issue("rogue", spiffe_ids=[spiffe_id("outside")])

    # -- sidecars ------------------------------------------------------------------

    def sidecar_command(self, identity: str) -> list[str]:
        """``trio-tproxy run`` with ``identity``'s certificate, key and our CA."""
        files = self.files[identity]
        own = (
            ["--credential-bundle", str(files.cert)]
            if files.is_bundle
            else ["--cert", str(files.cert), "--key", str(files.key)]
        )
        return [
            sys.executable,
            "-m",
            "trio_tproxy",
            "run",
            *own,
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
        # -v 1 to prove interception in the logs; a fast route check for tests
        argv = [
            *self.sidecar_command(identity or pod),
            "-v",
            "1",
            "--route-check-interval",
            "0.5",
            *flags,
        ]
        with open(log_path, "ab") as log:
            if self.sidecar_image is None:
                process = self.topology.popen(pod, argv, stdout=log, stderr=subprocess.STDOUT)
            else:
                from . import image

                # podman runs in the root namespace and puts the container in the pod's;
                # SIGTERM to podman reaches the sidecar (podman proxies signals).
                name = f"{self.host(pod).netns}-sidecar"
                self._containers.append(name)
                process = subprocess.Popen(
                    image.run_argv(
                        self.sidecar_image, self.host(pod).netns, self.workdir, name, argv[3:]
                    ),  # fmt: skip
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=image.podman_env(),
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

    def start_app(
        self, pod: str, *argv: str, port: int, protocol: str = "tcp"
    ) -> subprocess.Popen[bytes]:
        """Start a plaintext app in ``pod`` and wait until it listens on ``port``
        (``protocol="udp"``: until its UDP socket is bound)."""
        log = open(self.workdir / f"app-{pod}-{port}.log", "ab")  # noqa: SIM115 - owned by proc
        process = self.topology.popen(pod, list(argv), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.topology.wait_port(pod, "::", port, timeout=10, proc=process, protocol=protocol)
        return process

    @contextmanager
    def capture(self, name: str, *bpf: str) -> Iterator[Path]:
        """tcpdump on the bridge (every pod's traffic crosses it) while the body runs.

        Yields the pcap's path; it is complete once the block has ended.
        ``bpf`` narrows the filter (default: all TCP)."""
        path = self.workdir / f"{name}.pcap"
        errors_path = self.workdir / f"{name}.tcpdump.log"
        with open(errors_path, "wb") as errors:
            tcpdump = self.topology.popen(
                "node",
                ["tcpdump", "--immediate-mode", "-i", "br0", "-U", "-s", "0", "-w", str(path)]
                + list(bpf or ("tcp",)),
                stdout=subprocess.DEVNULL,
                stderr=errors,
            )
        try:
            deadline = time.monotonic() + 5
            while b"listening on" not in errors_path.read_bytes():
                if tcpdump.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tcpdump did not start: {errors_path.read_text()}")
                time.sleep(0.02)
            yield path
        finally:
            time.sleep(0.2)  # let packets in flight reach the capture
            self.topology.stop(tcpdump, sig=signal.SIGINT)

    def close(self) -> None:
        for pod in list(self.sidecars):
            try:
                self.stop_sidecar(pod)
            except Exception:  # noqa: BLE001 - teardown must go on
                pass
        if self._containers:
            from . import image

            for name in self._containers:  # a container would keep its namespace alive
                image.remove_container(name)
        self.topology.destroy()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Pods:
    """A PodLab with both sidecars up, and a transport for fuzz/relay_property."""

    PORT = 7100

    def __init__(self, lab: PodLab, family: int = socket.AF_INET) -> None:
        self.lab = lab
        self.family = family
        #: Each sidecar's fd count with no connection open.
        self.baseline: dict[str, int] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None  # made by start()

    @classmethod
    def start(cls, prefix: str | None = None) -> Pods:
        """A PodLab in a temporary directory (removed by :meth:`stop`), both sidecars ready."""
        workdir = tempfile.TemporaryDirectory(prefix="tpt-pods-")
        lab = PodLab(Path(workdir.name), prefix=prefix)
        try:
            lab.__enter__()
            try:
                lab.start_sidecar("a", "-v", "0")
                lab.start_sidecar("b", "-v", "0")
            except BaseException:
                lab.close()
                raise
        except BaseException:
            workdir.cleanup()
            raise
        pods = cls(lab)
        pods._workdir = workdir
        return pods

    def stop(self) -> None:
        try:
            self.lab.close()
        finally:
            if self._workdir is not None:
                self._workdir.cleanup()

    def sidecar_fds(self) -> dict[str, int]:
        return {pod: fd_count(s.process.pid) for pod, s in self.lab.sidecars.items()}

    @asynccontextmanager
    async def transport(self) -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
        """One connection from app A to app B through both sidecars.

        On exit: both sidecars must be back to their idle file-descriptor
        count within 10 s (both legs of both relays closed).
        """
        b = self.lab.host("b")
        dst = b.ip4 if self.family == socket.AF_INET else b.ip6
        if self.baseline is None:
            self.baseline = self.sidecar_fds()  # idle sidecars: listeners, epoll, logs
        before = self.baseline
        listener = trio.socket.from_stdlib_socket(socket_in(b.netns, socket.AF_INET6))
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        await listener.bind(("::", self.PORT))
        listener.listen(1)
        client = trio.socket.from_stdlib_socket(socket_in(self.lab.host("a").netns, self.family))
        try:
            with trio.fail_after(10):
                await client.connect((dst, self.PORT))
                server, peer = await listener.accept()
        except BaseException:
            client.close()
            raise
        finally:
            listener.close()
        # B's sidecar keeps the client address (the default): app B sees app A's.
        a = self.lab.host("a")
        seen = str(peer[0]).removeprefix("::ffff:")
        if seen != (a.ip4 if self.family == socket.AF_INET else a.ip6):
            client.close()
            server.close()
            raise AssertionError(f"app B saw the connection from {seen}, not from pod A")
        client_stream, server_stream = trio.SocketStream(client), trio.SocketStream(server)
        try:
            yield client_stream, server_stream
        finally:
            await client_stream.aclose()
            await server_stream.aclose()
        deadline = time.monotonic() + 10
        while (now := self.sidecar_fds()) != before:
            if time.monotonic() > deadline:
                raise AssertionError(f"sidecar fds {before} -> {now}: a relay leg was left open")
            await trio.sleep(0.02)


def wait_for_log(lab: PodLab, pod: str, pattern: str, since: int = 0, timeout: float = 10) -> str:
    """The first line of ``pod``'s sidecar log after offset ``since`` matching ``pattern``."""
    deadline = time.monotonic() + timeout
    while True:
        log = lab.sidecars[pod].log()[since:]
        if m := re.search(pattern, log):
            return log[log.rfind("\n", 0, m.start()) + 1 : log.find("\n", m.end())]
        if time.monotonic() > deadline:
            raise AssertionError(f"no line /{pattern}/ in sidecar {pod}'s log:\n{log[-3000:]}")
        time.sleep(0.05)


def offsets(lab: PodLab) -> dict[str, int]:
    """Where each sidecar's log ends now (for :func:`wait_for_log`'s ``since``)."""
    return {pod: len(s.log()) for pod, s in lab.sidecars.items()}

"""The four set-ups under test, each able to start, name its processes and stop.

Why one small class per set-up: the measurements only need to know where the
client in pod A connects for each service, which PIDs count as "the proxy" for
CPU and memory, and where the B side's TLS port is for the mTLS check. Each
set-up runs alone (started before its tests, stopped after), so the others
can never carry its traffic: with the sidecars up, every connection from A to
B's cluster IP is intercepted; with them down, stunnel and haproxy listen on
B's IP without interference.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from lab.pods import PodLab

from . import configs

#: Where the app in pod B listens; one port per service, in this order.
APP_PORT = 5000
#: lab/apps.py's services (its ``serve`` listens on APP_PORT + their index).
SERVICES = ("bulk", "rr", "conn", "idle")
#: The real applications' ports (benchmarks/apps.py), after those; forwarded by
#: stunnel and haproxy like the others, whether or not this run starts the app.
APP_SERVICES = ("http", "redis", "pg")
FORWARDED = SERVICES + APP_SERVICES
_STUNNEL_PORTS = (15000, 25000)  # client side in A on 127.0.0.1, server side on B's IP
_HAPROXY_PORTS = (16000, 26000)
_STOPPED_LINE = re.compile(r"stopped: connections (\{.*?\}|\S+); refusals (\{.*?\}|\S+)")

Address = tuple[str, int]


def app_port(service: str) -> int:
    return APP_PORT + FORWARDED.index(service)


#: Key exchange for the sidecars: what the OpenSSL 3.0 of haproxy and stunnel
#: negotiates (X25519).  trio-tproxy's default adds the ML-KEM hybrid, which
#: costs about 14% more CPU and memory per handshake (benchmarks.loopback).
GROUPS = "X25519:P-256"


@dataclass
class Proxy:
    """Base: plaintext, no proxy at all; the client connects to B's IP directly."""

    name: ClassVar[str] = "plaintext"
    tls: ClassVar[bool] = False
    lab: PodLab
    #: The proxy process of each pod ("a", "b"), once started.
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: What stop() learnt (e.g. the sidecars' connection counters), for the JSON.
    notes: dict[str, str] = field(default_factory=dict)
    #: TLS session resumption towards the peer (each proxy's own mechanism).
    resume: bool = True
    #: haproxy's ``nbthread`` (1: the fair match for one single-threaded trio process).
    haproxy_threads: int = 1

    def start(self) -> None:
        """Start the proxies and return once they accept connections."""

    def stop(self) -> None:
        for proc in self.processes.values():
            self.lab.topology.stop(proc)
        self.processes.clear()

    def target(self, service: str) -> Address:
        """Where the load generator in pod A connects for ``service``."""
        return self.lab.host("b").ip4, app_port(service)

    def probe_target(self) -> Address | None:
        """B's TLS port for the echo service, for the mTLS check (None: no TLS)."""
        return None

    def pids(self) -> dict[str, int]:
        """The proxy process of each pod, whose CPU and memory (with its children) we count."""
        return {pod: p.pid for pod, p in self.processes.items()}

    def configuration(self) -> dict[str, str]:
        """The exact configuration, for the JSON file."""
        return {}


@dataclass
class TrioTproxy(Proxy):
    """The sidecars, through the real interception: nft TPROXY in both pods."""

    name: ClassVar[str] = "trio-tproxy"
    tls: ClassVar[bool] = True
    #: Where this run's part of each (appended) sidecar log starts.
    log_offsets: dict[str, int] = field(default_factory=dict)

    def start(self) -> None:
        for pod in ("a", "b"):
            log = self.lab.workdir / f"sidecar-{pod}.log"
            self.log_offsets[pod] = log.stat().st_size if log.exists() else 0
            # -v 0: no line per connection (later flags override PodLab's -v 1).
            # -v 0 and the default route-check interval (PodLab's 0.5 s is for tests);
            # the key exchange that haproxy and stunnel (OpenSSL 3.0) negotiate.
            flags = ["-v", "0", "--route-check-interval", "5", "--tls-groups", GROUPS]
            flags += [] if self.resume else ["--session-cache", "0"]
            sidecar = self.lab.start_sidecar(pod, *flags)
            self.processes[pod] = sidecar.process

    def stop(self) -> None:
        for pod in ("a", "b"):
            if pod in self.lab.sidecars:
                self.lab.stop_sidecar(pod)
            log = self.lab.workdir / f"sidecar-{pod}.log"
            text = log.read_text(errors="replace")[self.log_offsets.get(pod, 0) :]
            found = _STOPPED_LINE.search(text)
            self.notes[pod] = (
                f"connections {found[1]}; refusals {found[2]}" if found else "no 'stopped' line"
            )
        self.processes.clear()

    def probe_target(self) -> Address:
        return self.lab.host("b").ip4, app_port("rr")

    def configuration(self) -> dict[str, str]:
        extra = "" if self.resume else " --session-cache 0"
        return {
            "flags": f"trio-tproxy run (PodLab.start_sidecar) -v 0 --route-check-interval 5{extra}"
        }


class _Pair(Proxy):
    """A client-side proxy in A and a server-side proxy in B, from a rendered config."""

    ports: ClassVar[tuple[int, int]] = (0, 0)

    def services(self) -> list[configs.Service]:
        local, remote = self.ports
        return [
            configs.Service(name, local + i, remote + i, app_port(name))
            for i, name in enumerate(FORWARDED)
        ]

    def credentials(self, pod: str) -> configs.Credentials:
        files = self.lab.files[pod]
        pem = self.lab.workdir / f"{pod}-cert-and-key.pem"
        pem.write_bytes(files.cert.read_bytes() + files.key.read_bytes())
        pem.chmod(0o600)
        return configs.Credentials(files.cert, files.key, files.ca_cert, pem)

    def render(self, pod: str) -> str:
        raise NotImplementedError

    def argv(self, config: Path) -> list[str]:
        raise NotImplementedError

    def configuration(self) -> dict[str, str]:
        return {pod: self.render(pod) for pod in ("a", "b")}

    def start(self) -> None:
        b_ip = self.lab.host("b").ip4
        local, remote = self.ports
        for pod, ip, port in (("b", b_ip, remote), ("a", "127.0.0.1", local)):
            path = self.lab.workdir / f"{self.name}-{pod}.conf"
            path.write_text(self.render(pod))
            with open(self.lab.workdir / f"{self.name}-{pod}.log", "ab") as log:
                proc = self.lab.topology.popen(
                    pod, self.argv(path), stdout=log, stderr=subprocess.STDOUT
                )
            self.processes[pod] = proc
            for i in range(len(FORWARDED)):
                self.lab.topology.wait_port(pod, ip, port + i, timeout=10, proc=proc)

    def target(self, service: str) -> Address:
        return "127.0.0.1", self.ports[0] + FORWARDED.index(service)

    def probe_target(self) -> Address:
        return self.lab.host("b").ip4, self.ports[1] + FORWARDED.index("rr")


class Stunnel(_Pair):
    name = "stunnel"
    tls = True
    ports = _STUNNEL_PORTS

    def render(self, pod: str) -> str:
        b_ip = self.lab.host("b").ip4
        if pod == "a":
            return configs.stunnel_client(self.services(), b_ip, self.credentials(pod), self.resume)
        return configs.stunnel_server(self.services(), b_ip, self.credentials(pod))

    def argv(self, config: Path) -> list[str]:
        return ["stunnel4", str(config)]


class Haproxy(_Pair):
    name = "haproxy"
    tls = True
    ports = _HAPROXY_PORTS

    def render(self, pod: str) -> str:
        b_ip = self.lab.host("b").ip4
        if pod == "a":
            return configs.haproxy_client(
                self.services(), b_ip, self.credentials(pod), self.resume, self.haproxy_threads
            )
        return configs.haproxy_server(
            self.services(), b_ip, self.credentials(pod), self.haproxy_threads
        )

    def argv(self, config: Path) -> list[str]:
        return ["haproxy", "-db", "-f", str(config)]


ALL: dict[str, type[Proxy]] = {p.name: p for p in (Proxy, TrioTproxy, Stunnel, Haproxy)}

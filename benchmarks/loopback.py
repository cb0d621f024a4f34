"""The sidecars' data path over loopback: no kernel interception, no root.

    python -m benchmarks.loopback [--mib 512 | --rr 20000 | --conns 2000] [--profile out.txt]
                                  [--session-cache 0] [--tls-groups X25519:P-256]

One process runs sidecar A (egress) and sidecar B (ingress) — the real
``Sidecar`` handlers, TLS 1.3 mutual authentication, identity checks and
relays — with A's "original destination" pinned to B's TLS listener and B's
app dial pinned to a sink.  A second process is the app pair (blocking
sockets in threads).  Figures are for both sidecars together, from the
sidecar process's /proc CPU counters:

* bulk: one connection, N MiB one way, half-close: MB/s and CPU s/GiB;
* rr: 64 B ping-pong on one connection: p50/p99 µs and CPU µs per round trip;
* conns: sequential short connections (100 B each way): conn/s, CPU ms/conn.

``--profile`` runs py-spy (native frames) on the sidecar process.  This is
the quick loop for optimizing; ``python -m benchmarks`` is the comparison
with haproxy and stunnel through the real interception.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CHUNK = 1 << 20


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sidecars(
    in_port: int, out_port: int, ready: Path, session_cache: int, pki: Path, groups: str | None
) -> None:
    """Child: sidecar A listens (egress) on in_port; B's ingress dials out_port.

    Its certificates go into ``pki``, a directory the parent removes (the child
    is killed, so it could not)."""
    import trio

    from lab.pki import make_pki
    from trio_tproxy.config import Interception, ProxyConfig
    from trio_tproxy.credentials import load_credentials
    from trio_tproxy.plainstream import PlainStream
    from trio_tproxy.proxy import Sidecar

    files = make_pki(pki)

    def make(name: str, tcp: int, tls: int, **kw: object) -> Sidecar:
        config = ProxyConfig(
            tls=files[name],
            interception=Interception(tcp_port=tcp, tls_port=tls),
            session_cache=session_cache,
            tls_groups=groups,
        )
        creds = load_credentials(files[name])
        return Sidecar(config, creds, listen_hosts=("127.0.0.1",), kernel_options=False, **kw)

    b = make("b", _free_port(), _free_port())

    async def to_sink(dst: object, client: object) -> PlainStream:
        return PlainStream(await b.dial(("127.0.0.1", out_port)))

    b.ingress_dialer = to_sink
    a = make(
        "a",
        in_port,
        _free_port(),
        egress_destination=lambda sock: ("127.0.0.1", b.config.interception.tls_port),
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(b.serve)
            await nursery.start(a.serve)
            ready.write_text("ready")  # noqa: ASYNC240 - once, before serving

    trio.run(main)


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


def run(args: argparse.Namespace) -> dict[str, float]:
    sink = socket.create_server(("127.0.0.1", 0), backlog=128)
    out_port = sink.getsockname()[1]
    in_port = _free_port()
    workdir = tempfile.TemporaryDirectory(prefix="tpt-bench-")
    ready = Path(workdir.name) / "ready"
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.loopback",
            "--child",
            str(in_port),
            str(out_port),
            str(ready),
            str(args.session_cache),
            workdir.name,
            args.tls_groups,
        ]
    )
    spy = None
    try:
        while not ready.exists():
            if child.poll() is not None:
                raise RuntimeError("sidecar process died")
            time.sleep(0.05)
        mode = _rr if args.rr else _conns if args.conns else _bulk
        server = threading.Thread(target=_serve, args=(sink, mode), daemon=True)
        server.start()
        if args.profile:
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(child.pid),
                    "--format",
                    "raw",
                    "--output",
                    str(args.profile),
                    "--native",
                    "--rate",
                    "200",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
        return mode(in_port, child.pid, args)
    finally:
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
        child.kill()
        child.wait()
        sink.close()
        workdir.cleanup()


def _serve(sink: socket.socket, mode: object) -> None:
    """The app behind sidecar B: a sink for bulk, an echo for rr and conns."""
    while True:
        try:
            conn, _ = sink.accept()
        except OSError:
            return
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if mode is _bulk:
                buf, total = bytearray(CHUNK), 0
                while n := conn.recv_into(buf):
                    total += n
                conn.sendall(str(total).encode())
            else:
                while data := conn.recv(65536):
                    conn.sendall(data)


def _bulk(port: int, pid: int, args: argparse.Namespace) -> dict[str, float]:
    payload = os.urandom(CHUNK)
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as client:
        for _ in range(args.mib):
            client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        assert int(client.recv(64)) == args.mib * CHUNK
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    return {
        "mib": args.mib,
        "MB_per_s": args.mib * CHUNK / elapsed / 1e6,
        "sidecars_cpu_s_per_GiB": cpu / (args.mib / 1024),
    }


def _rr(port: int, pid: int, args: argparse.Namespace) -> dict[str, float]:
    rtts = []
    msg = b"x" * 64
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sendall(msg)
        assert client.recv(64) == msg  # handshakes done
        cpu0 = cpu_seconds(pid)
        for _ in range(args.rr):
            t = time.perf_counter()
            client.sendall(msg)
            got = b""
            while len(got) < 64:
                got += client.recv(64 - len(got))
            rtts.append(time.perf_counter() - t)
        cpu = cpu_seconds(pid) - cpu0
    rtts.sort()
    return {
        "round_trips": args.rr,
        "p50_us": rtts[len(rtts) // 2] * 1e6,
        "p99_us": rtts[int(len(rtts) * 0.99)] * 1e6,
        "sidecars_cpu_us_per_rt": cpu / args.rr * 1e6,
    }


def _conns(port: int, pid: int, args: argparse.Namespace) -> dict[str, float]:
    msg = b"y" * 100
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    for _ in range(args.conns):
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(msg)
            client.shutdown(socket.SHUT_WR)
            got = b""
            while data := client.recv(256):
                got += data
            assert got == msg
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    return {
        "connections": args.conns,
        "conn_per_s": args.conns / elapsed,
        "sidecars_cpu_ms_per_conn": cpu / args.conns * 1e3,
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sidecars(
            int(sys.argv[2]),
            int(sys.argv[3]),
            Path(sys.argv[4]),
            int(sys.argv[5]),
            Path(sys.argv[6]),
            sys.argv[7] or None,
        )
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loopback")
    parser.add_argument("--mib", type=int, default=512, help="bulk: MiB one way (default)")
    parser.add_argument("--rr", type=int, default=0, help="ping-pong round trips instead")
    parser.add_argument("--conns", type=int, default=0, help="short connections instead")
    parser.add_argument("--profile", type=Path, help="py-spy raw profile of the sidecars")
    parser.add_argument(
        "--session-cache",
        type=int,
        default=4096,
        help="sidecar A's TLS session cache (0: full handshakes)",
    )
    parser.add_argument(
        "--tls-groups",
        default="X25519:P-256",
        help="both sidecars' key-exchange groups ('' for OpenSSL's default, with the ML-KEM "
        "hybrid); the default is what python -m benchmarks gives them",
    )
    print(json.dumps(run(parser.parse_args())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Relay throughput over loopback, no kernel interception, no root.

    python -m benchmarks.loopback [--mib 512] [--profile out.txt]

One process runs both relays of the data path (plain->TLS and TLS->plain,
as sidecar A's egress and sidecar B's ingress do), with real TLS 1.3 between
them; a second process is the app pair: a client thread sends N MiB and
half-closes, a server thread reads to EOF, counts and answers "done".
Reported: MB/s of the one connection, and the relay process's CPU seconds
per GiB (both relays together, so two TLS endpoints), from /proc.
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


def relays(in_port: int, out_port: int, ready: Path) -> None:
    """Child: listen on in_port; relay plain -> TLS -> plain -> 127.0.0.1:out_port."""
    import trio

    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from helpers import contexts, make_pki, tls_pair

    from trio_tproxy.plainstream import PlainStream
    from trio_tproxy.relay import relay

    files = make_pki(Path(tempfile.mkdtemp(prefix="tpt-bench-")))
    a, b = contexts(files["a"]), contexts(files["b"])

    async def handle(accepted: trio.SocketStream) -> None:
        app = PlainStream(accepted.socket)
        upstream = PlainStream((await trio.open_tcp_stream("127.0.0.1", out_port)).socket)
        left, right = await tls_pair(a.client, b.server)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay, app, left)
            nursery.start_soon(relay, right, upstream)

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(in_port, host="127.0.0.1")
        ready.write_text("ready")  # noqa: ASYNC240 - once, before serving
        await trio.serve_listeners(handle, listeners)

    trio.run(main)


def run(mib: int, profile: Path | None, rr: int = 0) -> dict[str, float]:
    sink = socket.create_server(("127.0.0.1", 0))
    out_port = sink.getsockname()[1]
    probe = socket.create_server(("127.0.0.1", 0))
    in_port = probe.getsockname()[1]
    probe.close()
    ready = Path(tempfile.mktemp(prefix="tpt-bench-ready-"))
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.loopback",
            "--child",
            str(in_port),
            str(out_port),
            str(ready),
        ]
    )
    spy = None
    try:
        while not ready.exists():
            if child.poll() is not None:
                raise RuntimeError("relay process died")
            time.sleep(0.05)
        received = [0]

        def serve() -> None:
            conn, _ = sink.accept()
            if rr:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while data := conn.recv(64):
                    conn.sendall(data)
                conn.close()
                return
            buf = bytearray(CHUNK)
            while n := conn.recv_into(buf):
                received[0] += n
            conn.sendall(b"done")
            conn.close()

        server = threading.Thread(target=serve)
        server.start()
        if profile:
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(child.pid),
                    "--format",
                    "raw",
                    "--output",
                    str(profile),
                    "--native",
                    "--rate",
                    "200",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
        if rr:
            return _ping_pong(in_port, rr, child.pid, server)
        payload = os.urandom(CHUNK)
        cpu0, t0 = cpu_seconds(child.pid), time.perf_counter()
        with socket.create_connection(("127.0.0.1", in_port)) as client:
            for _ in range(mib):
                client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            assert client.recv(16) == b"done"
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(child.pid) - cpu0
        server.join()
        assert received[0] == mib * CHUNK, received[0]
        return {
            "mib": mib,
            "seconds": elapsed,
            "MB_per_s": mib * CHUNK / elapsed / 1e6,
            "relay_cpu_s_per_GiB": cpu / (mib / 1024),
        }
    finally:
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
        child.kill()
        child.wait()
        sink.close()
        ready.unlink(missing_ok=True)


def _ping_pong(port: int, count: int, pid: int, server: threading.Thread) -> dict[str, float]:
    """``count`` round trips of 64 B on one connection: latency and relay CPU per trip."""
    rtts = []
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msg = b"x" * 64
        client.sendall(msg)
        assert client.recv(64) == msg  # warm up: handshake done
        cpu0 = cpu_seconds(pid)
        for _ in range(count):
            t = time.perf_counter()
            client.sendall(msg)
            got = b""
            while len(got) < 64:
                got += client.recv(64 - len(got))
            rtts.append(time.perf_counter() - t)
        cpu = cpu_seconds(pid) - cpu0
    server.join()
    rtts.sort()
    return {
        "round_trips": count,
        "p50_us": rtts[len(rtts) // 2] * 1e6,
        "p99_us": rtts[int(len(rtts) * 0.99)] * 1e6,
        "relay_cpu_us_per_rt": cpu / count * 1e6,
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        relays(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loopback")
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--profile", type=Path, help="py-spy raw profile of the relay process")
    parser.add_argument("--rr", type=int, default=0, help="ping-pong round trips instead of bulk")
    args = parser.parse_args()
    print(json.dumps(run(args.mib, args.profile, args.rr)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""probes: /app-health/NAME answered by probing a real app on loopback (no root).

The apps are the lab's (lab.apps health-server, lab.grpchealth) in threads or
processes on 127.0.0.1; the flag file flips their health.  The kernel-path
version (a kubelet in another namespace, port 15021 exempt from
interception) is in tests/test_ingress.py.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import h11
import pytest
import trio

from lab import apps, grpchealth
from trio_tproxy.config import AppProbe, Ingress, ProxyConfig, TLSFiles
from trio_tproxy.probes import _health_request, _health_status, request_timeout, server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_thread(target, *args) -> None:
    threading.Thread(target=target, args=args, daemon=True).start()


def wait_listening(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            threading.Event().wait(0.01)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture
def flag(tmp_path: Path) -> Path:
    path = tmp_path / "healthy"
    path.touch()
    return path


def config(*probes: AppProbe) -> ProxyConfig:
    files = TLSFiles(Path("c"), Path("k"), Path("ca"))
    return ProxyConfig(tls=files, ingress=Ingress(app_probes=probes, probe_timeout=1.0))


async def get(port: int, path: str) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        req = h11.Request(method="GET", target=path, headers=[("host", "x")])
        await stream.send_all(conn.send(req) + conn.send(h11.EndOfMessage()))
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(4096))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, body


def probe_statuses(cfg: ProxyConfig, paths: list[str], flip: Path | None = None):
    """GET each path with the app healthy, then (if ``flip``) unhealthy."""

    async def main():
        srv = server(cfg, mark=None)
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(srv.serve, [("127.0.0.1", 0)])
            port = bound[0][1]
            first = [await get(port, p) for p in paths]
            second = []
            if flip is not None:
                await trio.Path(flip).unlink()
                second = [await get(port, p) for p in paths]
            srv.stop()
        return first, second

    return trio.run(main)


def test_http_status_is_passed_through_and_flips(flag):
    port = free_port()
    start_thread(apps.serve_health, port, str(flag))
    wait_listening(port)
    cfg = config(AppProbe("web", "http", "127.0.0.1", port, "/healthz"))
    first, second = probe_statuses(cfg, ["/app-health/web"], flip=flag)
    assert first[0][0] == 200
    assert second[0][0] == 503


def test_grpc_serving_then_not_serving(flag):
    port = free_port()
    start_thread(grpchealth.serve, port, str(flag), "::")
    wait_listening(port)
    cfg = config(AppProbe("rpc", "grpc", "127.0.0.1", port, ""))
    first, second = probe_statuses(cfg, ["/app-health/rpc"], flip=flag)
    assert first[0][0] == 200, first
    assert second[0] == (503, b"rpc: health status 2 (SERVING is 1)\n")


def test_tcp_probe_and_unknown_names():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        cfg = config(
            AppProbe("db", "tcp", "127.0.0.1", port),
            AppProbe("down", "tcp", "127.0.0.1", free_port()),
        )
        first, _ = probe_statuses(cfg, ["/app-health/db", "/app-health/down", "/app-health/x"])
    assert first[0][0] == 200
    assert first[1] == (
        503,
        b"down: connect to 127.0.0.1:%d failed: ECONNREFUSED\n" % cfg.ingress.app_probes[1].port,
    )
    assert first[2][0] == 404


def test_a_silent_app_times_out_as_asked():
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts, never answers
        port = listener.getsockname()[1]
        cfg = config(AppProbe("web", "http", "127.0.0.1", port, "/"))
        first, _ = probe_statuses(cfg, ["/app-health/web?timeout=0.2"])
    assert first[0] == (503, b"web: no answer within 0.2s\n")


def test_timeouts_and_grpc_messages():
    assert request_timeout("timeout=2.5", 1.0) == 2.5
    assert request_timeout("a=1&timeout=999", 1.0) == 30.0
    assert request_timeout("timeout=nan", 1.0) == 1.0
    assert request_timeout("timeout=-1", 1.0) == 1.0
    assert request_timeout("", 1.0) == 1.0
    assert _health_request("") == b"\x00\x00\x00\x00\x00"
    assert _health_request("a.B") == b"\x00\x00\x00\x00\x05\x0a\x03a.B"
    assert _health_request("x" * 200)[5:8] == b"\x0a\xc8\x01"
    assert _health_status(b"\x00\x00\x00\x00\x02\x08\x01") == 1
    assert _health_status(b"\x00\x00\x00\x00\x00") == 0
    assert _health_status(b"\x01") is None

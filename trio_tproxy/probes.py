"""Kubelet probes without plaintext app ports: ``GET /app-health/NAME`` on the probe port.

The kubelet runs on the node, has no mesh certificate, and its probes would be
refused by a strict ingress.  Instead of leaving the app's port open in
plaintext, a probe is rewritten to ``httpGet: {port: 15021, path:
/app-health/NAME}`` (k8s/PROBES.md) and this server, in the sidecar, answers it
by probing the app itself on loopback, as ``--app-probe NAME=URL`` says:

* ``http://127.0.0.1:8080/healthz``: an HTTP/1.1 GET (h11); the app's status
  code is passed through (the kubelet counts 200-399 as success), its body is
  not;
* ``tcp://127.0.0.1:5432``: a TCP connect; 200 if it is accepted, else 503;
* ``grpc://127.0.0.1:9090[/service]``: ``grpc.health.v1.Health/Check`` over
  cleartext HTTP/2 (h2: the python-hyper project's pure-Python, sans-I/O
  HTTP/2 state machine, also behind httpx and hypercorn; a hand-written client
  would need HPACK with Huffman decoding to read ``grpc-status``); 200 when
  the answer is SERVING, else 503.

Timeouts: ``?timeout=S`` on the request (the rewritten probe can carry the
original ``timeoutSeconds``), else ``--probe-timeout``; never more than the
server's handler limit.  A probe that fails or times out is 503 with a
one-line reason in the body: the kubelet logs it.

Each probe is one fresh connection to the app, with the bypass mark when the
process may set it, so a probe to an in-cluster address would not be
intercepted as egress.  The server itself is :mod:`.httpserver`; its port is
exempt from interception in ``nft.render`` (``tcp dport 15021 return``).
"""

from __future__ import annotations

import errno
import logging
import math
import socket as _stdsocket
from collections.abc import Awaitable, Callable
from functools import partial

import h2.config
import h2.connection
import h2.events
import h11
import trio

from . import kernel
from .config import AppProbe, ProxyConfig
from .httpserver import HttpServer, Limits, Request, Response, method_not_allowed, text

log = logging.getLogger("trio_tproxy.probes")

PATH_PREFIX = "/app-health/"
#: Seconds a probe may take at most, whatever the request asks.
MAX_TIMEOUT = 30.0
_GRPC_PATH = "/grpc.health.v1.Health/Check"
_SERVING = 1


class ProbeFailed(Exception):
    """The app is not healthy; ``str()`` is the one-line reason."""


async def _connect(probe: AppProbe, mark: int | None) -> trio.SocketStream:
    family = _stdsocket.AF_INET6 if ":" in probe.host else _stdsocket.AF_INET
    sock = trio.socket.socket(family, _stdsocket.SOCK_STREAM)
    try:
        if mark is not None:
            try:
                kernel.set_mark(sock, mark)
            except OSError:
                pass  # no CAP_NET_ADMIN (tests): loopback is not intercepted anyway
        await sock.connect((probe.host, probe.port))
    except OSError as exc:
        sock.close()
        name = errno.errorcode.get(exc.errno or 0, str(exc))
        raise ProbeFailed(f"connect to {probe.host}:{probe.port} failed: {name}") from None
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def check_tcp(probe: AppProbe, mark: int | None) -> int:
    stream = await _connect(probe, mark)
    await stream.aclose()
    return 200


async def check_http(probe: AppProbe, mark: int | None) -> int:
    stream = await _connect(probe, mark)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        host = f"[{probe.host}]" if ":" in probe.host else probe.host
        request = h11.Request(
            method="GET",
            target=probe.path,
            headers=[
                ("host", f"{host}:{probe.port}"),
                ("user-agent", "trio-tproxy-probe"),
                ("connection", "close"),
            ],
        )
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(16384)
                conn.receive_data(data)
                if not data and conn.their_state is h11.SEND_RESPONSE:
                    raise ProbeFailed("the app closed the connection without an answer")
                continue
            if isinstance(event, h11.Response):
                return int(event.status_code)
            if isinstance(event, h11.ConnectionClosed):
                raise ProbeFailed("the app closed the connection without an answer")


def _health_request(service: str) -> bytes:
    """A gRPC message holding HealthCheckRequest{service} (protobuf field 1, string)."""
    raw = service.encode()
    body = b""
    if raw:
        length, varint = len(raw), bytearray()
        while True:
            byte = length & 0x7F
            length >>= 7
            varint.append(byte | (0x80 if length else 0))
            if not length:
                break
        body = b"\x0a" + bytes(varint) + raw
    return b"\x00" + len(body).to_bytes(4, "big") + body


def _health_status(message: bytes) -> int | None:
    """HealthCheckResponse.status (field 1, varint) from one gRPC message, or None."""
    if len(message) < 5 or message[0] != 0:
        return None
    body = message[5 : 5 + int.from_bytes(message[1:5], "big")]
    if not body:
        return 0  # proto3: the default (UNKNOWN) is not sent
    if body[0] == 0x08 and len(body) >= 2 and body[1] < 0x80:
        return body[1]
    return None


async def check_grpc(probe: AppProbe, mark: int | None) -> int:
    stream = await _connect(probe, mark)
    async with stream:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        host = f"[{probe.host}]" if ":" in probe.host else probe.host
        conn.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", _GRPC_PATH),
                (":authority", f"{host}:{probe.port}"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        conn.send_data(sid, _health_request(probe.path), end_stream=True)
        await stream.send_all(conn.data_to_send())
        message = b""
        grpc_status: str | None = None
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise ProbeFailed("the app closed the HTTP/2 connection before answering")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    message += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    for name, value in event.headers:
                        if name in (b"grpc-status", "grpc-status"):
                            grpc_status = value.decode() if isinstance(value, bytes) else value
                elif isinstance(event, h2.events.StreamReset):
                    raise ProbeFailed(f"the app reset the health check (code {event.error_code})")
                elif isinstance(event, h2.events.StreamEnded):
                    if grpc_status not in (None, "0"):
                        raise ProbeFailed(f"health check answered grpc-status {grpc_status}")
                    status = _health_status(message)
                    if status != _SERVING:
                        raise ProbeFailed(f"health status {status} (SERVING is 1)")
                    return 200
            pending = conn.data_to_send()
            if pending:
                await stream.send_all(pending)


CHECKS: dict[str, Callable[[AppProbe, int | None], Awaitable[int]]] = {
    "tcp": check_tcp,
    "http": check_http,
    "grpc": check_grpc,
}


def request_timeout(query: str, default: float) -> float:
    """``timeout=S`` from a query string, bounded to (0, MAX_TIMEOUT]; else ``default``."""
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name == "timeout":
            try:
                seconds = float(value)
            except ValueError:
                break
            if math.isfinite(seconds) and seconds > 0:
                return min(seconds, MAX_TIMEOUT)
    return min(default, MAX_TIMEOUT)


async def answer(probe: AppProbe, limit: float, mark: int | None) -> Response:
    """Probe the app once, within ``limit`` seconds; the kubelet's answer."""
    timeout = limit
    try:
        with trio.fail_after(timeout):
            status = await CHECKS[probe.scheme](probe, mark)
    except trio.TooSlowError:
        return text(503, f"{probe.name}: no answer within {timeout:g}s\n")
    except ProbeFailed as exc:
        return text(503, f"{probe.name}: {exc}\n")
    except (OSError, trio.BrokenResourceError, h11.ProtocolError, h2.exceptions.H2Error) as exc:
        return text(503, f"{probe.name}: {type(exc).__name__}: {exc}\n")
    return text(status, f"{probe.name}: {status}\n")


def routes(
    config: ProxyConfig, *, mark: int | None
) -> dict[str, Callable[[Request], Awaitable[Response]]]:
    """``/app-health/NAME`` for each ``--app-probe``."""

    async def handle(probe: AppProbe, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return method_not_allowed()
        timeout = request_timeout(request.query, config.ingress.probe_timeout)
        return await answer(probe, timeout, mark)

    return {PATH_PREFIX + p.name: partial(handle, p) for p in config.ingress.app_probes}


def server(config: ProxyConfig, *, mark: int | None) -> HttpServer:
    limits = Limits(handler_timeout=MAX_TIMEOUT + 1, keep_alive=False, max_connections=32)
    return HttpServer(routes(config, mark=mark), limits=limits, name="probes")


async def serve(
    config: ProxyConfig,
    hosts: tuple[str, ...] = ("0.0.0.0", "::"),
    *,
    mark: int | None = None,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The probe server on every host at ``probe_port``, until cancelled."""
    port = config.interception.probe_port
    await server(config, mark=mark).serve([(host, port) for host in hosts], task_status=task_status)

"""A small, bounded HTTP/1.1 server on trio and h11, for control endpoints.

It serves the sidecar's admin endpoints (``/healthz``, ``/readyz``,
``/metrics``), the kubelet probe endpoints and the admission webhook: a few
routes, small requests, clients that may be slow, broken or hostile.  It is
not a web framework: no routing patterns, no streaming bodies, no HTTP/2.

API (stable: other modules build on it; add to it, do not change it)::

    from trio_tproxy.httpserver import HttpServer, Limits, Request, Response

    async def healthz(req: Request) -> Response:
        return Response(200, [("content-type", "text/plain")], b"ok\\n")

    server = HttpServer({"/healthz": healthz}, limits=Limits(), name="admin")
    bound = await nursery.start(server.serve, [("127.0.0.1", 15020), ("::1", 15020)])
    # bound: the (host, port) pairs actually listened on (port 0 -> the real port)
    ...
    server.stop()          # graceful: see "Stopping" below; serve() then returns

* ``routes`` maps an exact path (no query string) to ``async (Request) ->
  Response``.  An unknown path is 404.  The handler checks the method itself
  (:func:`method_not_allowed` builds the 405).  For ``HEAD`` the server sends
  the handler's headers and drops the body.  ``server.routes`` is a plain dict:
  a route may be added before ``serve`` (e.g. probe endpoints mounted on the
  admin server).
* ``Request``: ``method`` (str, upper case), ``target`` (the raw target),
  ``path``, ``query`` (str, without ``?``), ``headers`` (lower-case names,
  values as str, in order), ``body`` (bytes, the whole body), ``client``
  (address accept() gave), ``header(name)`` -> first value or None.
* ``Response(status=200, headers=(), body=b"")``.  The server adds
  ``content-length`` and, when it closes the connection, ``connection: close``.
* ``wrap`` (optional): ``async (trio.SocketStream) -> ByteStream``, called per
  accepted connection inside the request deadline: the TLS hook.  With stdlib
  ``ssl``: ``lambda s: _ret(trio.SSLStream(s, ctx, server_side=True))``; with
  pyOpenSSL, any object with ``receive_some``/``send_all``/``aclose``.
* ``sock_setup`` (optional): called with each listening socket before
  ``bind`` (e.g. to set ``SO_MARK``).

Bounds (:class:`Limits`), each answered, never a crash:

* header block larger than ``max_header_bytes`` -> 431; body larger than
  ``max_body_bytes`` -> 413; malformed HTTP -> 400 (h11's hint); a request
  not received completely within ``request_timeout`` of its first byte (or of
  the accept, for the first request: slowloris) -> 408 and close; an idle
  keep-alive connection closes after ``idle_timeout``; a handler that raises
  -> 500 (logged with its traceback), one that outlasts ``handler_timeout``
  -> 503; more than ``max_connections`` at once -> the extra connection gets
  503 and is closed.
* ``keep_alive=False`` answers every request with ``connection: close``.

Stopping: :meth:`HttpServer.stop` closes the listeners at once, closes
connections that are idle or still receiving a request, lets a handler that
is running finish (bounded by ``handler_timeout``) and answers it with
``connection: close``; then ``serve`` returns.  Cancelling ``serve``'s scope
instead stops everything at once.

Connection states::

    RECEIVING --(whole request)--> HANDLING --(response sent)--> RECEIVING (keep-alive)
        |                             |                               or CLOSED
        +--(stop, timeout, error)-----+--> CLOSED

Only RECEIVING is interruptible by ``stop()``: a response is never cut.
"""

from __future__ import annotations

import errno
import logging
import socket as _stdsocket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Protocol

import h11
import trio

log = logging.getLogger("trio_tproxy.http")

Address = tuple[str, int]


class ByteStream(Protocol):
    """What the server needs from a connection (trio's ``Stream`` has it)."""

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray: ...

    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    client: Address

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True)
class Response:
    status: int = 200
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""


Handler = Callable[[Request], Awaitable[Response]]
Wrapper = Callable[[trio.SocketStream], Awaitable[ByteStream]]
SocketSetup = Callable[[_stdsocket.socket], None]


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 64 * 1024
    #: Seconds to receive one whole request, from its first byte (from the
    #: accept for the first request, including ``wrap``'s TLS handshake).
    request_timeout: float = 10.0
    #: Seconds a keep-alive connection may wait for its next request.
    idle_timeout: float = 30.0
    handler_timeout: float = 10.0
    max_connections: int = 64
    keep_alive: bool = True
    #: Seconds to send a response (a client that does not read).
    send_timeout: float = 10.0


def text(status: int, body: str, content_type: str = "text/plain; charset=utf-8") -> Response:
    """A plain-text response."""
    return Response(status, [("content-type", content_type)], body.encode())


def method_not_allowed(allowed: Sequence[str] = ("GET", "HEAD")) -> Response:
    return Response(
        405,
        [("allow", ", ".join(allowed)), ("content-type", "text/plain; charset=utf-8")],
        b"method not allowed\n",
    )


#: accept() failures that mean "out of a resource for now": wait, do not die.
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_RECEIVE_SIZE = 16 * 1024


class _Closing(Exception):
    """Ends a connection after an error response was (tried to be) sent."""


@dataclass(eq=False)
class _Conn:
    #: Set while the connection waits for / receives a request: stop() cancels it.
    receive_scope: trio.CancelScope | None = None


@dataclass
class HttpServer:
    routes: dict[str, Handler]
    limits: Limits = field(default_factory=Limits)
    wrap: Wrapper | None = None
    sock_setup: SocketSetup | None = None
    name: str = "http"
    #: Requests answered, by status (cheap counters for tests and metrics).
    responses: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.routes = dict(self.routes)
        self._stopping = False
        self._listen_scope: trio.CancelScope | None = None
        self._conns: set[_Conn] = set()

    @property
    def active_connections(self) -> int:
        return len(self._conns)

    def stop(self) -> None:
        """Graceful stop (see the module docstring); idempotent."""
        self._stopping = True
        if self._listen_scope is not None:
            self._listen_scope.cancel()
        for conn in self._conns:
            if conn.receive_scope is not None:
                conn.receive_scope.cancel()

    async def serve(
        self,
        addresses: Sequence[Address],
        *,
        task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on every address, report the bound ones, serve until stopped."""
        listeners: list[trio.socket.SocketType] = []
        try:
            for addr in addresses:
                listeners.append(await self._listen(addr))
            bound = [_bound(sock) for sock in listeners]
            # Outer nursery: the connections; inner one (in the listen scope):
            # the accept loops, which stop() cancels first.
            async with trio.open_nursery() as conn_nursery:
                with trio.CancelScope() as self._listen_scope:
                    if self._stopping:
                        self._listen_scope.cancel()
                    async with trio.open_nursery() as accept_nursery:
                        for sock in listeners:
                            accept_nursery.start_soon(self._accept_loop, sock, conn_nursery)
                        task_status.started(bound)
                for sock in listeners:
                    sock.close()
        finally:
            for sock in listeners:
                sock.close()

    async def _listen(self, addr: Address) -> trio.socket.SocketType:
        host, port = addr
        family = _stdsocket.AF_INET6 if ":" in host else _stdsocket.AF_INET
        sock = trio.socket.socket(family, _stdsocket.SOCK_STREAM)
        try:
            sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 1)
            if family == _stdsocket.AF_INET6:
                sock.setsockopt(_stdsocket.IPPROTO_IPV6, _stdsocket.IPV6_V6ONLY, 1)
            if self.sock_setup is not None:
                self.sock_setup(sock)  # type: ignore[arg-type]
            await sock.bind((host, port))
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _accept_loop(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            try:
                conn_sock, client = await sock.accept()
            except OSError as exc:
                if exc.errno not in _CAPACITY_ERRNOS:
                    raise
                log.warning("%s: accept: %s; pausing", self.name, exc)
                await trio.sleep(0.1)
                continue
            if len(self._conns) >= self.limits.max_connections:
                nursery.start_soon(self._refuse, conn_sock)
                continue
            conn = _Conn()
            self._conns.add(conn)
            nursery.start_soon(self._connection, conn, conn_sock, (client[0], client[1]))

    async def _refuse(self, sock: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(sock)
        try:
            await self._error(stream, h11.Connection(h11.SERVER), None, 503, "too many connections")
        finally:
            await _close(stream)

    async def _connection(self, conn: _Conn, sock: trio.socket.SocketType, client: Address) -> None:
        raw = trio.SocketStream(sock)
        stream: ByteStream = raw
        try:
            h11conn = h11.Connection(
                h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes
            )
            first = True
            deadline = trio.current_time() + self.limits.request_timeout
            if self.wrap is not None:
                with trio.CancelScope(deadline=deadline) as scope:
                    conn.receive_scope = scope
                    stream = await self.wrap(raw)
                conn.receive_scope = None
                if scope.cancelled_caught:
                    return
            while not self._stopping:
                request = await self._receive_request(conn, stream, h11conn, client, first)
                first = False
                if request is None:
                    return
                response = await self._handle(request)
                close = self._stopping or not self.limits.keep_alive
                await self._send(stream, h11conn, request.method, response, close)
                if h11conn.our_state is not h11.DONE or h11conn.their_state is not h11.DONE:
                    return
                h11conn.start_next_cycle()
        except _Closing:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("%s: connection from %s ended: %s", self.name, client, exc)
        finally:
            self._conns.discard(conn)
            await _close(stream)

    async def _receive_request(
        self,
        conn: _Conn,
        stream: ByteStream,
        h11conn: h11.Connection,
        client: Address,
        first: bool,
    ) -> Request | None:
        """One whole request, or None when the connection should just close."""
        limits = self.limits
        # Idle wait (keep-alive) and then the request deadline from its first byte.
        now = trio.current_time()
        deadline = now + (limits.request_timeout if first else limits.idle_timeout)
        started = first
        head: h11.Request | None = None
        body = bytearray()
        with trio.CancelScope(deadline=deadline) as scope:
            conn.receive_scope = scope
            try:
                while True:
                    try:
                        event = h11conn.next_event()
                    except h11.RemoteProtocolError as exc:
                        await self._error(stream, h11conn, head, exc.error_status_hint, str(exc))
                        raise _Closing from exc
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(_RECEIVE_SIZE)
                        if not started and data:
                            started = True
                            scope.deadline = trio.current_time() + limits.request_timeout
                        try:
                            h11conn.receive_data(bytes(data))
                        except h11.RemoteProtocolError as exc:  # data after close
                            raise _Closing from exc
                        continue
                    if isinstance(event, h11.Request):
                        head = event
                        started = True
                        # h11 bounds only a head still incomplete; one that
                        # arrived whole in a single read is measured here.
                        if _head_size(event) > limits.max_header_bytes:
                            await self._error(
                                stream, h11conn, head, 431, "request header too large"
                            )
                            raise _Closing
                        length = _content_length(event)
                        if length is not None and length > limits.max_body_bytes:
                            await self._error(stream, h11conn, head, 413, "request body too large")
                            raise _Closing
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > limits.max_body_bytes:
                            await self._error(stream, h11conn, head, 413, "request body too large")
                            raise _Closing
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:  # ConnectionClosed, or PAUSED (cannot happen before a response)
                        return None
            finally:
                conn.receive_scope = None
        if scope.cancelled_caught:
            if started and not self._stopping:
                await self._error(stream, h11conn, head, 408, "request timeout")
            return None
        assert head is not None
        target = head.target.decode("ascii", "replace")
        path, _, query = target.partition("?")
        return Request(
            method=head.method.decode("ascii", "replace").upper(),
            target=target,
            path=path,
            query=query,
            headers=[(k.decode("ascii", "replace"), v.decode("latin-1")) for k, v in head.headers],
            body=bytes(body),
            client=client,
        )

    async def _handle(self, request: Request) -> Response:
        handler = self.routes.get(request.path)
        if handler is None:
            return text(404, "not found\n")
        try:
            with trio.fail_after(self.limits.handler_timeout):
                return await handler(request)
        except trio.TooSlowError:
            log.warning("%s: %s %s: handler timed out", self.name, request.method, request.path)
            return text(503, "handler timed out\n")
        except Exception:
            log.exception("%s: %s %s: handler failed", self.name, request.method, request.path)
            return text(500, "internal error\n")

    async def _send(
        self,
        stream: ByteStream,
        h11conn: h11.Connection,
        method: str,
        response: Response,
        close: bool,
    ) -> None:
        headers = [(k, v) for k, v in response.headers if k.lower() != "content-length"]
        headers.append(("content-length", str(len(response.body))))
        if close:
            headers.append(("connection", "close"))
        try:
            data = h11conn.send(
                h11.Response(
                    status_code=response.status, headers=headers, reason=_reason(response.status)
                )
            )
            assert data is not None
            if method != "HEAD" and response.body:
                more = h11conn.send(h11.Data(data=response.body))
                assert more is not None
                data += more
            end = h11conn.send(h11.EndOfMessage())
            assert end is not None
            data += end
        except h11.LocalProtocolError:
            log.exception("%s: bad response from a handler", self.name)
            raise _Closing from None
        self._count(response.status)
        with trio.move_on_after(self.limits.send_timeout) as scope:
            await stream.send_all(data)
        if scope.cancelled_caught:
            raise _Closing

    async def _error(
        self,
        stream: ByteStream,
        h11conn: h11.Connection,
        head: h11.Request | None,
        status: int,
        why: str,
    ) -> None:
        """Answer a request we could not read, if the protocol still allows an answer.

        h11 lets a server in IDLE send a response without a request: that is
        how a 400/408/431/503 goes out before any request was parsed.
        """
        log.debug("%s: %d %s", self.name, status, why)
        if h11conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        method = head.method.decode("ascii", "replace").upper() if head is not None else "GET"
        with trio.move_on_after(1.0):
            try:
                await self._send(stream, h11conn, method, text(status, why + "\n"), close=True)
            except (_Closing, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    def _count(self, status: int) -> None:
        self.responses[status] = self.responses.get(status, 0) + 1


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _head_size(event: h11.Request) -> int:
    return len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)


def _content_length(event: h11.Request) -> int | None:
    for key, value in event.headers:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _close(stream: ByteStream) -> None:
    """Close without waiting on the network (a TLS close_notify may not be sent)."""
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


def _bound(sock: trio.socket.SocketType) -> Address:
    name = sock.getsockname()
    return (str(name[0]), int(name[1]))


__all__ = [
    "Address",
    "ByteStream",
    "Handler",
    "HttpServer",
    "Limits",
    "Request",
    "Response",
    "SocketSetup",
    "Wrapper",
    "method_not_allowed",
    "text",
]

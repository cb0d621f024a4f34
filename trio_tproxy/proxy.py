"""The data path: two kinds of listener and one handler per connection.

* **egress** (plaintext listener, ``--tcp-port``): the app's connection to a
  cluster address, TPROXY'd here after recirculation through ``lo``.  We dial
  its original destination (``getsockname()`` of the accepted socket) over
  mutual TLS, verify the server's identity, then relay.
* **ingress** (TLS listener, ``--tls-port``): a peer sidecar's connection to
  this pod.  We complete the handshake, verify the client's identity, dial the
  app on the original port, then relay.

Each handler owns both legs: every path out of it (refusal, relay end,
cancellation, a bug) closes both sockets.  A refusal is one log line with who,
what and why, and one counter; it never disturbs other connections.
"""

from __future__ import annotations

import errno
import logging
import socket as _stdsocket
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio
from OpenSSL import SSL

from . import kernel, tlspolicy
from .config import ProxyConfig
from .identity import IdentityError, describe
from .plainstream import PlainStream
from .relay import RelayResult, abort, relay
from .tlsstream import TLSStream

log = logging.getLogger("trio_tproxy")
#: One line per finished connection; enabled from ``-v 1``.
conn_log = logging.getLogger("trio_tproxy.conn")

Address = tuple[str, int]
#: Dials the app for an ingress connection: (original destination, client) -> stream.
IngressDialer = Callable[[Address, Address], Awaitable[trio.abc.HalfCloseableStream]]
#: Finds where an egress connection was going.
DestinationLookup = Callable[[trio.socket.SocketType], Address]

_LOOPBACK: dict[int, str] = {_stdsocket.AF_INET: "127.0.0.1", _stdsocket.AF_INET6: "::1"}


def fmt_addr(addr: Address) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _family(host: str) -> int:
    return _stdsocket.AF_INET6 if ":" in host else _stdsocket.AF_INET


@dataclass
class Stats:
    """Counters since start: connections by (direction, outcome), refusals by reason."""

    connections: Counter[tuple[str, str]] = field(default_factory=Counter)
    refusals: Counter[tuple[str, str]] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)
    active: int = 0


class Refused(Exception):
    """A connection we will not carry; ``str()`` is the reason for the log."""

    def __init__(self, reason: str, *, alert_sent: bool = False) -> None:
        super().__init__(reason)
        #: The TLS handshake failed and OpenSSL queued an alert for the peer.
        self.alert_sent = alert_sent


async def open_listener(
    host: str, port: int, *, transparent: bool, mark: int | None, backlog: int = 4096
) -> trio.SocketListener:
    sock = trio.socket.socket(_family(host), _stdsocket.SOCK_STREAM)
    try:
        sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 1)
        if sock.family == _stdsocket.AF_INET6:
            sock.setsockopt(_stdsocket.IPPROTO_IPV6, _stdsocket.IPV6_V6ONLY, 1)
        if transparent:
            kernel.set_transparent(sock)
        if mark is not None:
            # Accepted sockets inherit it: without it the TLS listener's
            # SYN-ACKs would be recirculated and every inbound connection stall.
            kernel.set_mark(sock, mark)
        await sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


class Sidecar:
    """Listeners and handlers for one pod.  Kernel set-up lives in ``lifecycle``."""

    def __init__(
        self,
        config: ProxyConfig,
        credentials: tlspolicy.Credentials,
        *,
        listen_hosts: tuple[str, ...] = ("127.0.0.1", "::1"),
        kernel_options: bool = True,
        egress_destination: DestinationLookup | None = None,
        ingress_dialer: IngressDialer | None = None,
    ) -> None:
        self.config = config
        self.listen_hosts = listen_hosts
        self.kernel_options = kernel_options
        groups = config.tls_groups
        self.server_context = tlspolicy.server_context(credentials, config.identity, groups=groups)
        self.client_context = tlspolicy.client_context(credentials, config.identity, groups=groups)
        self.egress_destination = egress_destination or kernel.original_destination
        self.ingress_dialer = ingress_dialer or self.dial_app_on_loopback
        self.stats = Stats()
        self.sessions = tlspolicy.SessionCache(config.session_cache)
        #: Addresses actually bound, filled by serve(): {"egress": [...], "ingress": [...]}.
        self.bound: dict[str, list[Address]] = {"egress": [], "ingress": []}

    # -- sockets we dial -------------------------------------------------------

    async def dial(self, addr: Address) -> trio.socket.SocketType:
        """Connect to ``addr`` with the bypass mark, within the connect timeout."""
        sock = trio.socket.socket(_family(addr[0]), _stdsocket.SOCK_STREAM)
        try:
            if self.kernel_options:
                kernel.set_mark(sock, self.config.interception.bypass_mark)
            sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
            with trio.fail_after(self.config.timeouts.connect):
                await sock.connect(addr)
        except trio.TooSlowError:
            sock.close()
            raise Refused(
                f"connect to {fmt_addr(addr)} timed out after {self.config.timeouts.connect:g}s"
            ) from None
        except OSError as exc:
            sock.close()
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            raise Refused(f"connect to {fmt_addr(addr)} failed: {name}") from None
        except BaseException:
            sock.close()
            raise
        return sock

    async def dial_app_on_loopback(self, dst: Address, client: Address) -> PlainStream:
        """Reach the app on the original port at the loopback of the same family."""
        ic = self.config.interception
        if dst[1] in (ic.tcp_port, ic.tls_port):
            # Dialing our own listener would loop the connection back into us.
            raise Refused(f"port {dst[1]} is the proxy's own listener, not an app port")
        return PlainStream(await self.dial((_LOOPBACK[_family(dst[0])], dst[1])))

    # -- serving ---------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ic = self.config.interception
        mark = ic.bypass_mark if self.kernel_options else None
        listeners: list[tuple[str, trio.SocketListener]] = []
        try:
            for host in self.listen_hosts:
                egress = await open_listener(
                    host, ic.tcp_port, transparent=self.kernel_options, mark=None
                )
                listeners.append(("egress", egress))
                ingress = await open_listener(
                    host, ic.tls_port, transparent=self.kernel_options, mark=mark
                )
                listeners.append(("ingress", ingress))
            for kind, listener in listeners:
                self.bound[kind].append(listener.socket.getsockname()[:2])
            async with trio.open_nursery() as nursery:
                for kind, listener in listeners:
                    handler = self.handle_egress if kind == "egress" else self.handle_ingress
                    nursery.start_soon(trio.serve_listeners, self._guard(handler), [listener])
                task_status.started()
        finally:
            for _, listener in listeners:
                await listener.aclose()

    def _guard(
        self, handler: Callable[[trio.SocketStream], Awaitable[None]]
    ) -> Callable[[trio.SocketStream], Awaitable[None]]:
        """No connection may take the process down: log a bug, close, carry on."""

        async def guarded(stream: trio.SocketStream) -> None:
            self.stats.active += 1
            try:
                await handler(stream)
            except Exception:
                log.exception("internal error in connection handler; connection aborted")
                self.stats.refusals[("internal", "bug")] += 1
                await _abort_all([stream])
            finally:
                self.stats.active -= 1

        return guarded

    # -- handlers --------------------------------------------------------------

    async def handle_egress(self, accepted: trio.SocketStream) -> None:
        start = trio.current_time()
        app = PlainStream(accepted.socket)
        src = _peer(app.socket)
        dst = self.egress_destination(app.socket)
        legs: list[trio.abc.HalfCloseableStream] = [app]
        try:
            sock = await self.dial(dst)
            tls = TLSStream(sock, tlspolicy.new_connection(self.client_context, sock, server=False))
            legs.append(tls)
            self.sessions.offer(tls.conn, dst)
            peer = await self._handshake(
                tls, lambda: tlspolicy.verify_server(tls.conn, self.config.identity, dst[0])
            )
            result = await relay(app, tls, half_close_timeout=self.config.timeouts.half_close)
            if result.outcome == "ok":
                self.sessions.keep(tls.conn, dst)  # the ticket came with the data
            self._finished(
                "egress", src, dst, peer, tls, result.a_to_b, result.b_to_a, result, start
            )
        except Refused as exc:
            self._refuse("egress", src, dst, str(exc))
            if exc.alert_sent:
                await abort(app)  # the app learns at once; the peer gets our alert
                await tls.close_after_alert()
        finally:
            await _abort_all(legs)  # no-op for legs the relay already closed

    async def handle_ingress(self, raw: trio.SocketStream) -> None:
        start = trio.current_time()
        src = _peer(raw.socket)
        dst = kernel.original_destination(raw.socket)
        tls = TLSStream(
            raw.socket, tlspolicy.new_connection(self.server_context, raw.socket, server=True)
        )
        legs: list[trio.abc.HalfCloseableStream] = [tls]
        try:
            peer = await self._handshake(
                tls, lambda: tlspolicy.verify_client(tls.conn, self.config.identity)
            )
            app = await self.ingress_dialer(dst, src)
            legs.append(app)
            result = await relay(tls, app, half_close_timeout=self.config.timeouts.half_close)
            self._finished(
                "ingress", src, dst, peer, tls, result.b_to_a, result.a_to_b, result, start
            )
        except Refused as exc:
            self._refuse("ingress", src, dst, str(exc))
            if exc.alert_sent:
                await tls.close_after_alert()
        finally:
            await _abort_all(legs)

    async def _handshake(
        self, tls: TLSStream, verify: Callable[[], tlspolicy.PeerIdentity]
    ) -> tlspolicy.PeerIdentity:
        """Handshake within the timeout, then the identity check; Refused on failure."""
        try:
            with trio.fail_after(self.config.timeouts.handshake):
                await tls.do_handshake()
            return verify()
        except trio.TooSlowError:
            raise Refused(
                f"TLS handshake timed out after {self.config.timeouts.handshake:g}s"
            ) from None
        except IdentityError as exc:
            raise Refused(f"identity rejected: {exc} (presented {_presented(tls)})") from None
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            raise Refused(
                f"TLS handshake failed: {tlspolicy.explain(cause, tls.conn)}"
                f" (presented {_presented(tls)})",
                alert_sent=True,
            ) from None

    # -- outcomes --------------------------------------------------------------

    def _refuse(self, direction: str, src: Address, dst: Address, reason: str) -> None:
        self.stats.connections[(direction, "refused")] += 1
        self.stats.refusals[(direction, _reason_key(reason))] += 1
        log.warning("%s %s -> %s refused: %s", direction, fmt_addr(src), fmt_addr(dst), reason)

    def _finished(
        self,
        direction: str,
        src: Address,
        dst: Address,
        peer: tlspolicy.PeerIdentity,
        tls: TLSStream,
        sent: int,
        received: int,
        result: RelayResult,
        start: float,
    ) -> None:
        """``sent``: app -> peer bytes; ``received``: peer -> app bytes."""
        self.stats.connections[(direction, result.outcome)] += 1
        self.stats.bytes[f"{direction}_sent"] += sent
        self.stats.bytes[f"{direction}_received"] += received
        if conn_log.isEnabledFor(logging.INFO):
            conn_log.info(
                "%s %s -> %s peer=%s %s sent=%d received=%d duration=%.3fs outcome=%s "
                "handshake=%s%s",
                direction,
                fmt_addr(src),
                fmt_addr(dst),
                peer.description,
                tlspolicy.tls_info(tls.conn),
                sent,
                received,
                trio.current_time() - start,
                result.outcome,
                "resumed" if tlspolicy.session_reused(tls.conn) else "full",
                f" ({result.detail})" if result.detail else "",
            )


async def _abort_all(legs: Sequence[trio.abc.Stream]) -> None:
    with trio.CancelScope(shield=True):
        for leg in legs:
            await abort(leg)


def _peer(sock: trio.socket.SocketType) -> Address:
    try:
        host, port = sock.getpeername()[:2]
        return str(host), int(port)
    except OSError:
        return ("?", 0)


def _presented(tls: TLSStream) -> str:
    try:
        cert = tls.conn.get_peer_certificate(as_cryptography=True)
    except SSL.Error:
        cert = None
    return describe(cert) if cert is not None else "no certificate"


def _reason_key(reason: str) -> str:
    """A short, bounded label for the refusal counter."""
    head = reason.split(" (presented", 1)[0]
    return head.split(":", 1)[-1].strip()[:60] if ":" in head else head[:60]

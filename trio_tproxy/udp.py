"""UDP over DTLS: transparent UDP listeners, the flow table, one task per flow.

Opt-in (``--intercept-udp``). The nft rules (:mod:`.nft`) send egress UDP to
the **UDP listener** (``--udp-listen-port`` on loopback) and inbound UDP to
the pod's ``--dtls-port`` to the **DTLS listener**; both are IP_TRANSPARENT
and learn each datagram's original destination from ``IP(V6)_ORIGDSTADDR``.

A *flow* is (source, original destination). Its life, in one task:

* **egress** (app A -> B): a *peer socket* connected to
  ``<destination IP>:<dtls-port>``, a DTLS client handshake that names the
  original port in ALPN (:mod:`.dtls`), then two pumps. The app's datagrams
  all come through the listener (a dict lookup and a channel send each);
  answers go back through one raw UDP socket per family, written with the
  original destination as source address and port, so the app sees its
  peer's real address. Not a socket bound (IP_TRANSPARENT) to that
  destination: it would hold the port number in this namespace, and an app
  binding that port (wildcard) would fail with EADDRINUSE while the flow
  lives, or make the flow fail if it bound first (symmetric-port protocols).
* **ingress** (B): the DTLS listener answers a first ClientHello with a
  stateless cookie; only a ClientHello that echoes it creates a flow. Its
  socket is bound (IP_TRANSPARENT) to ``<pod IP>:<dtls-port>`` and connected
  to the peer sidecar, then the handshake (client certificate, identity and
  allow-list as for TCP), then an *app socket* connected to
  ``loopback:<port from ALPN>``, then the pumps.

Datagrams keep their semantics: each is sealed or opened alone, sent at
once, never retransmitted, reordered or merged; one too large for a DTLS
record at the configured MTU is dropped and counted, never cut. What a
flow's queue cannot hold while its handshake runs is dropped and counted.

The table is bounded (``--udp-max-flows``: a datagram that would open one
more flow is dropped and counted); a flow ends after ``--udp-idle-timeout``
seconds with no datagram either way (then a close_notify tells the peer's
sidecar to end its side at once), on the peer's close_notify, on a fatal
DTLS error, or when the sidecar stops. An egress flow whose handshake was
refused stays in the table for :data:`REFUSAL_HOLD` seconds, dropping the
app's datagrams, so that an app sending to a pod without a sidecar does not
start a handshake per datagram. Every flow ends with one log line (``-v 1``)
and is counted in ``Stats.udp``.
"""

from __future__ import annotations

import errno
import logging
import socket as _stdsocket
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import trio
from OpenSSL import SSL

from . import dtls, kernel
from .config import ProxyConfig
from .credentials import Credentials

log = logging.getLogger("trio_tproxy")
conn_log = logging.getLogger("trio_tproxy.conn")

Address = tuple[str, int]
FlowKey = tuple[Address, Address]

#: Bigger than any UDP payload: recv never truncates.
RECV_SIZE: Final = 65536
#: Datagrams a flow queues while its handshake runs (more are dropped).
INBOX: Final = 256
#: Seconds a refused egress flow drops its app's datagrams before trying again.
REFUSAL_HOLD: Final = 1.0
#: Seconds between two "flow table full" warnings.
TABLE_FULL_WARN_EVERY: Final = 10.0
_IP_OVERHEAD: Final[dict[int, int]] = {_stdsocket.AF_INET: 20 + 8, _stdsocket.AF_INET6: 40 + 8}
_LOOPBACK: Final[dict[int, str]] = {_stdsocket.AF_INET: "127.0.0.1", _stdsocket.AF_INET6: "::1"}


def _family(host: str) -> int:
    return _stdsocket.AF_INET6 if ":" in host else _stdsocket.AF_INET


def fmt_addr(addr: Address) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno)).lower()


@dataclass(eq=False)
class Flow:
    """One flow's sockets' owner is its task; this is what the listener and the log see."""

    direction: str
    #: The app (egress) or the peer sidecar (ingress).
    src: Address
    #: The original destination.
    dst: Address
    start: float
    inbox: trio.MemorySendChannel[bytes]
    outbox: trio.MemoryReceiveChannel[bytes]
    last: float = 0.0
    sent_packets: int = 0
    sent_bytes: int = 0
    received_packets: int = 0
    received_bytes: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    peer: str = "-"
    info: str = "-"
    outcome: str = "error"
    detail: str = ""
    refusal: str | None = None

    def deliver(self, data: bytes) -> None:
        """A datagram the listener received for this flow (hot path: no await)."""
        try:
            self.inbox.send_nowait(data)
        except trio.WouldBlock:
            self.drops["queue full"] += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.drops["flow ending"] += 1


class FlowTable:
    """Flows by (source, original destination), at most ``limit`` of them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.flows: dict[FlowKey, Flow] = {}

    def __len__(self) -> int:
        return len(self.flows)

    def get(self, key: FlowKey) -> Flow | None:
        return self.flows.get(key)

    def add(self, key: FlowKey, flow: Flow) -> bool:
        """False (and nothing added) when the table is full."""
        if len(self.flows) >= self.limit:
            return False
        self.flows[key] = flow
        return True

    def discard(self, key: FlowKey, flow: Flow) -> None:
        if self.flows.get(key) is flow:
            del self.flows[key]


def new_flow(direction: str, src: Address, dst: Address) -> Flow:
    send, receive = trio.open_memory_channel[bytes](INBOX)
    now = trio.current_time()
    return Flow(direction, src, dst, now, send, receive, last=now)


class UDPService:
    """The two UDP listeners of one pod, and every flow's task (in :meth:`serve`'s nursery)."""

    def __init__(
        self,
        config: ProxyConfig,
        credentials: Credentials,
        udp_stats: Counter[str],
        *,
        listen_hosts: tuple[str, ...] = ("127.0.0.1", "::1"),
    ) -> None:
        self.config = config
        self.contexts = dtls.contexts(credentials)
        self.stats = udp_stats
        self.listen_hosts = listen_hosts
        self.table = FlowTable(config.udp_max_flows)
        ic = config.interception
        self.mark = ic.bypass_mark
        self.dtls_port = ic.dtls_port
        #: Never an app port: delivering there would loop into our own listeners.
        self.own_ports = frozenset({ic.udp_listen_port, ic.dtls_port})
        #: Ciphertext MTU (largest UDP payload) towards peers, by family.
        self.mtu: dict[int, int] = {
            fam: config.udp_mtu - overhead for fam, overhead in _IP_OVERHEAD.items()
        }
        self.bound: dict[str, list[Address]] = {"udp": [], "dtls": []}
        self._full_warned_at: float | None = None
        #: Raw UDP senders by family, made when a flow first needs one (see _reply_path).
        self._raw: dict[int, trio.socket.SocketType] = {}

    def use_credentials(self, credentials: Credentials) -> None:
        """New flows use ``credentials`` (live associations keep theirs; the cookie key stays)."""
        self.contexts = dtls.contexts(credentials, self.contexts.cookies)

    # -- sockets -----------------------------------------------------------------

    async def _socket(
        self,
        family: int,
        *,
        bind: Address | None = None,
        connect: Address | None = None,
        transparent: bool = False,
        origdst: bool = False,
    ) -> trio.socket.SocketType:
        sock = trio.socket.socket(family, _stdsocket.SOCK_DGRAM)
        try:
            kernel.set_mark(sock, self.mark)
            if family == _stdsocket.AF_INET6:
                sock.setsockopt(_stdsocket.IPPROTO_IPV6, _stdsocket.IPV6_V6ONLY, 1)
            if transparent:
                kernel.set_transparent(sock)
                # Flows to one destination each bind it (connected to different peers).
                sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 1)
            if origdst:
                kernel.set_recv_original_destination(sock)
            if bind is not None:
                await sock.bind(bind)
            if connect is not None:
                await sock.connect(connect)
        except BaseException:
            sock.close()
            raise
        return sock

    # -- serving -----------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[dict[str, list[Address]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind both listeners on every host, then receive until cancelled."""
        ic = self.config.interception
        listeners: list[tuple[str, trio.socket.SocketType]] = []
        try:
            for host in self.listen_hosts:
                for kind, port in (("udp", ic.udp_listen_port), ("dtls", ic.dtls_port)):
                    sock = await self._socket(
                        _family(host), bind=(host, port), transparent=True, origdst=True
                    )
                    listeners.append((kind, sock))
                    self.bound[kind].append(_address(sock.getsockname()))
            async with trio.open_nursery() as nursery:
                for kind, sock in listeners:
                    loop = self._egress_listener if kind == "udp" else self._ingress_listener
                    nursery.start_soon(loop, sock, nursery)
                task_status.started(self.bound)
        finally:
            for _, sock in listeners:
                sock.close()
            for raw in self._raw.values():
                raw.close()

    async def _receive(self, sock: trio.socket.SocketType) -> tuple[bytes, Address, Address] | None:
        """One datagram with its source and original destination (None: dropped)."""
        data, ancdata, flags, src = await sock.recvmsg(RECV_SIZE, kernel.ORIGDST_CMSG_SPACE)
        dst = kernel.original_destination_of_datagram(ancdata)
        if dst is None or flags & (_stdsocket.MSG_TRUNC | _stdsocket.MSG_CTRUNC):
            self.stats["drop_no_destination"] += 1
            return None
        return data, _address(src), dst

    def _admit(self, direction: str, src: Address, dst: Address) -> Flow | None:
        """A new flow in the table, or None (counted) when it is full."""
        flow = new_flow(direction, src, dst)
        if not self.table.add((src, dst), flow):
            self._table_full()
            return None
        return flow

    def _table_full(self) -> None:
        self.stats["drop_table_full"] += 1
        now = trio.current_time()
        if self._full_warned_at is None or now - self._full_warned_at >= TABLE_FULL_WARN_EVERY:
            self._full_warned_at = now
            log.warning(
                "udp flow table full (%d flows, --udp-max-flows): datagrams of new flows "
                "are dropped until one ends",
                len(self.table),
            )

    async def _egress_listener(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        table = self.table
        while True:
            try:
                got = await self._receive(sock)
            except OSError as exc:
                self.stats[f"drop_{_errname(exc)}"] += 1
                continue
            if got is None:
                continue
            data, src, dst = got
            flow = table.get((src, dst))
            if flow is None:
                flow = self._admit("egress", src, dst)
                if flow is None:
                    continue
                nursery.start_soon(self._egress_flow, flow)
            flow.deliver(data)

    async def _ingress_listener(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        table, server = self.table, self.contexts.server
        while True:
            try:
                got = await self._receive(sock)
            except OSError as exc:
                self.stats[f"drop_{_errname(exc)}"] += 1
                continue
            if got is None:
                continue
            data, src, dst = got
            flow = table.get((src, dst))
            if flow is not None:  # sent before the flow's own socket was connected
                flow.deliver(data)
                continue
            if len(table) >= table.limit:
                self._table_full()
                continue
            mtu = self.mtu[_family(dst[0])]
            conn, replies = dtls.listen(server, data, dtls.flow_bytes(src, dst), mtu)
            if conn is None:
                # A HelloVerifyRequest (no state kept), or not a ClientHello at all.
                self.stats["cookie_sent" if replies else "drop_not_dtls"] += 1
                for reply in replies:
                    try:
                        await sock.sendmsg([reply], [kernel.source_address_cmsg(dst[0])], 0, src)
                    except OSError as exc:
                        self.stats[f"drop_{_errname(exc)}"] += 1
                continue
            flow = self._admit("ingress", src, dst)
            if flow is not None:
                nursery.start_soon(self._ingress_flow, flow, conn)

    # -- flows -------------------------------------------------------------------

    async def _egress_flow(self, flow: Flow) -> None:
        family = _family(flow.dst[0])
        sockets: list[trio.socket.SocketType] = []
        try:
            deliver = self._reply_path(flow, family)
            peer = await self._socket(family, connect=(flow.dst[0], self.dtls_port))
            sockets.append(peer)
            mtu = self.mtu[family]
            conn = dtls.new_connection(self.contexts.client, server=False, flow=b"", mtu=mtu)
            conn.set_alpn_protos([dtls.alpn_for_port(flow.dst[1])])
            assoc = dtls.Association(conn, mtu)
            identity = await assoc.handshake(
                lambda: peer.recv(RECV_SIZE),
                peer.send,
                timeout=self.config.timeouts.handshake,
                verify=dtls.verifier_for_server(self.config.identity, flow.dst[0]),
            )
            flow.peer, flow.info = identity.description, assoc.info
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._to_peer, flow, assoc, flow.outbox.receive, peer.send)
                nursery.start_soon(
                    self._from_peer, flow, assoc, _recv(peer), deliver, peer.send, nursery
                )
                nursery.start_soon(self._idle, flow, nursery)
            await _close_notify(assoc, peer)
        except dtls.HandshakeError as exc:
            flow.refusal, flow.outcome = str(exc), "refused"
            self._report(flow)
            for sock in sockets:
                sock.close()
            with trio.move_on_after(REFUSAL_HOLD):
                async for _ in flow.outbox:
                    self.stats["drop_refused"] += 1
        except trio.Cancelled:
            flow.outcome = "cancelled"
            raise
        except OSError as exc:
            flow.outcome, flow.detail = "error", f"socket: {exc}"
        except Exception:
            log.exception("internal error in UDP egress flow")
        finally:
            self.table.discard((flow.src, flow.dst), flow)
            for sock in sockets:
                sock.close()
            self._report(flow)

    def _reply_path(self, flow: Flow, family: int) -> Callable[[bytes], Awaitable[object]]:
        """How this flow sends to the app: from the original destination's address
        and port, through the shared raw socket (see :func:`kernel.raw_udp_socket`).

        Not a socket bound there: a transparent socket bound to a foreign
        address still holds its port number, so the app could not bind that
        port (wildcard) while the flow lives, nor could the flow bind it if
        the app had (symmetric-port protocols: NTP, gossip).
        """
        raw = self._raw.get(family)
        if raw is None:
            raw = self._raw[family] = trio.socket.from_stdlib_socket(
                kernel.raw_udp_socket(family, self.mark)
            )
        # Per flow, once: the source (PKTINFO), the address; per datagram only the header.
        ancdata, address = [kernel.source_address_cmsg(flow.dst[0])], (flow.src[0], 0)
        ports = kernel.raw_udp_ports(flow.dst[1], flow.src[1])

        async def send_raw(data: bytes) -> object:
            return await raw.sendmsg(
                [ports + kernel.raw_udp_tail(len(data)), data], ancdata, 0, address
            )

        return send_raw

    async def _ingress_flow(self, flow: Flow, conn: SSL.Connection) -> None:
        family = _family(flow.dst[0])
        sockets: list[trio.socket.SocketType] = []
        try:
            peer = await self._socket(family, bind=flow.dst, connect=flow.src, transparent=True)
            sockets.append(peer)
            assoc = dtls.Association(conn, self.mtu[family])

            async def receive() -> bytes:
                # The listener may have queued a datagram that raced the connect.
                try:
                    return flow.outbox.receive_nowait()
                except trio.WouldBlock:
                    return await peer.recv(RECV_SIZE)

            identity = await assoc.handshake(
                receive,
                peer.send,
                timeout=self.config.timeouts.handshake,
                verify=dtls.verifier_for_client(self.config.identity),
            )
            flow.peer, flow.info = identity.description, assoc.info
            port = dtls.port_from_alpn(conn.get_alpn_proto_negotiated())
            if port is None or port in self.own_ports:
                raise dtls.HandshakeError(f"no app port to deliver to (ALPN {port})")
            flow.dst = (flow.dst[0], port)  # for the log: where it was going
            app = await self._socket(family, connect=(_LOOPBACK[family], port))
            sockets.append(app)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    self._from_peer, flow, assoc, flow.outbox.receive, app.send, peer.send, nursery
                )
                nursery.start_soon(
                    self._from_peer, flow, assoc, _recv(peer), app.send, peer.send, nursery
                )
                nursery.start_soon(self._to_peer, flow, assoc, _recv(app), peer.send)
                nursery.start_soon(self._idle, flow, nursery)
            await _close_notify(assoc, peer)
        except dtls.HandshakeError as exc:
            flow.refusal, flow.outcome = str(exc), "refused"
        except trio.Cancelled:
            flow.outcome = "cancelled"
            raise
        except OSError as exc:
            flow.outcome, flow.detail = "error", f"socket: {exc}"
        except Exception:
            log.exception("internal error in UDP ingress flow")
        finally:
            self.table.discard((flow.src, (flow.dst[0], self.dtls_port)), flow)
            for sock in sockets:
                sock.close()
            self._report(flow)

    # -- pumps -------------------------------------------------------------------

    async def _to_peer(
        self,
        flow: Flow,
        assoc: dtls.Association,
        receive: Callable[[], Awaitable[bytes]],
        send: Callable[[bytes], Awaitable[object]],
    ) -> None:
        """App datagrams, one record each, to the peer sidecar."""
        drops = flow.drops
        while True:
            try:
                data = await receive()
            except OSError as exc:  # an ICMP error for an earlier send to the app
                drops[f"app {_errname(exc)}"] += 1
                continue
            flow.last = trio.current_time()
            try:
                record = assoc.seal(data)
            except dtls.TooBig:
                drops["too big"] += 1
                continue
            try:
                await send(record)
            except OSError as exc:
                drops[f"peer {_errname(exc)}"] += 1
                continue
            flow.sent_packets += 1
            flow.sent_bytes += len(data)

    async def _from_peer(
        self,
        flow: Flow,
        assoc: dtls.Association,
        receive: Callable[[], Awaitable[bytes]],
        deliver: Callable[[bytes], Awaitable[object]],
        send_peer: Callable[[bytes], Awaitable[object]],
        nursery: trio.Nursery,
    ) -> None:
        """Records from the peer sidecar, each opened and delivered as one datagram."""
        drops = flow.drops
        while True:
            try:
                datagram = await receive()
            except OSError as exc:  # ICMP: the peer's sidecar is gone, say
                drops[f"peer {_errname(exc)}"] += 1
                continue
            flow.last = trio.current_time()
            try:
                plain = assoc.open(datagram)
            except dtls.PeerClosed:
                flow.outcome = "closed"
                nursery.cancel_scope.cancel()
                return
            except SSL.Error as exc:
                flow.outcome, flow.detail = "error", f"DTLS: {exc}"
                nursery.cancel_scope.cancel()
                return
            if not plain:
                # A handshake record (the peer did not get our last flight) or
                # one DTLS dropped (forged, replayed): answer what OpenSSL wrote.
                for extra in assoc.pending():
                    try:
                        await send_peer(extra)
                    except OSError:
                        pass
                continue
            for data in plain:
                try:
                    await deliver(data)
                except OSError as exc:
                    drops[f"app {_errname(exc)}"] += 1
                    continue
                flow.received_packets += 1
                flow.received_bytes += len(data)

    async def _idle(self, flow: Flow, nursery: trio.Nursery) -> None:
        idle = self.config.udp_idle_timeout
        while True:
            deadline = flow.last + idle
            if trio.current_time() >= deadline:
                flow.outcome = "idle"
                nursery.cancel_scope.cancel()
                return
            await trio.sleep_until(deadline)

    # -- outcomes ----------------------------------------------------------------

    def _report(self, flow: Flow) -> None:
        """The one log line and count of a flow (egress refusals report before their hold)."""
        if flow.outcome == "reported":
            return
        direction, stats = flow.direction, self.stats
        drops = ",".join(f"{reason.replace(' ', '_')}:{n}" for reason, n in flow.drops.items())
        for reason, count in flow.drops.items():
            stats[f"drop_{reason.replace(' ', '_')}"] += count
        flow.drops.clear()
        stats[f"{direction}_{flow.outcome}"] += 1
        if flow.refusal is not None:
            log.warning(
                "udp %s %s -> %s refused: %s",
                direction,
                fmt_addr(flow.src),
                fmt_addr(flow.dst),
                flow.refusal,
            )
            flow.outcome = "reported"
            return
        stats[f"{direction}_sent_packets"] += flow.sent_packets
        stats[f"{direction}_sent_bytes"] += flow.sent_bytes
        stats[f"{direction}_received_packets"] += flow.received_packets
        stats[f"{direction}_received_bytes"] += flow.received_bytes
        if conn_log.isEnabledFor(logging.INFO):
            conn_log.info(
                "udp %s %s -> %s peer=%s %s sent=%dp/%dB received=%dp/%dB duration=%.3fs "
                "outcome=%s%s%s",
                direction,
                fmt_addr(flow.src),
                fmt_addr(flow.dst),
                flow.peer,
                flow.info,
                flow.sent_packets,
                flow.sent_bytes,
                flow.received_packets,
                flow.received_bytes,
                trio.current_time() - flow.start,
                flow.outcome,
                f" drops={drops}" if drops else "",
                f" ({flow.detail})" if flow.detail else "",
            )
        flow.outcome = "reported"


def _recv(sock: trio.socket.SocketType) -> Callable[[], Awaitable[bytes]]:
    return lambda: sock.recv(RECV_SIZE)


async def _close_notify(assoc: dtls.Association, sock: trio.socket.SocketType) -> None:
    """Tell the peer's sidecar this flow is over (best effort, never blocks)."""
    record = assoc.close_notify()
    if record:
        with trio.CancelScope(shield=True):
            try:
                await sock.send(record)
            except OSError:
                pass


def _address(name: object) -> Address:
    assert isinstance(name, tuple)
    return str(name[0]), int(name[1])

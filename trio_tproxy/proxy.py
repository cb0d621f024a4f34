"""The data path: two kinds of listener and one handler per connection.

* **egress** (plaintext listener, ``--tcp-port``): the app's connection to a
  cluster address, TPROXY'd here after recirculation through ``lo``.  We dial
  its original destination (``getsockname()`` of the accepted socket) over
  mutual TLS, verify the server's identity, then relay.
* **ingress** (TLS listener, ``--tls-port``): a peer sidecar's connection to
  this pod.  We complete the handshake, verify the client's identity, dial the
  app at the original destination (the address and port the client dialed,
  never loopback unless ``--inbound-to-loopback``), from the client's own IP
  address (``--preserve-client-ip``, see :meth:`Sidecar.dial_app`), then relay.
  In permissive mode (``--inbound-mode permissive``, ``--permissive-port``) we
  first peek at the connection's first bytes: only a ClientHello offering our
  ALPN is TLS for us; anything else goes to the app as it is (plaintext relay).

Ownership of the sockets: the handler owns every leg until it hands both to
:func:`~trio_tproxy.relay.relay`, which from then on is their only owner
(it closes both, whatever happens).  A connection that never reaches the
relay (refused, cancelled, a bug) is closed by its handler.

Every accepted connection is logged and counted exactly once, whichever way
it ends: a refusal is one warning line with who, what and why; every other
end (ok, reset, truncated, timeout, cancelled - e.g. on SIGTERM - or error)
is one ``trio_tproxy.conn`` line, and ``Stats.connections`` counts both by
(direction, outcome).  The source address is the one ``accept()`` returned
(``getpeername`` fails once the peer has reset).

The accept loop sleeps on capacity errors (EMFILE, ENFILE, ENOBUFS, ENOMEM),
logs one warning per burst, and lets every other error propagate.  It also
admits or refuses each connection against the limits (:mod:`.limits`)
before any task or TLS object exists for it: a refusal there is an RST, one
rate-limited warning line per kind, and a count in ``Stats.refusals``
(and ``Stats.connections``), not a line per connection.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import random
import resource
import socket as _stdsocket
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass, field
from typing import Any

import trio

from . import kernel, limits, memory, peek, tlspolicy
from .clienthello import SIDECAR
from .config import ProxyConfig
from .credentials import Credentials
from .metrics import DURATION_BUCKETS, HANDSHAKE_BUCKETS, Histogram
from .plainstream import PlainStream
from .relay import RelayResult, relay
from .sessions import SessionCache
from .streams import Stream
from .udp import UDPService

log = logging.getLogger("trio_tproxy")
#: One line per finished connection; enabled from ``-v 1``.
conn_log = logging.getLogger("trio_tproxy.conn")

Address = tuple[str, int]
#: Dials the app for an ingress connection: (original destination, client) -> stream.
IngressDialer = Callable[[Address, Address], Awaitable[Stream]]
#: Finds where an egress connection was going.
DestinationLookup = Callable[[trio.socket.SocketType], Address]
#: Handles one accepted socket and the address accept() gave.
Handler = Callable[[trio.socket.SocketType, Address], Awaitable[None]]
#: Decides, in the accept loop, whether a connection from this address is taken.
Admit = Callable[[Address], bool]

_LOOPBACK: dict[int, str] = {_stdsocket.AF_INET: "127.0.0.1", _stdsocket.AF_INET6: "::1"}
#: accept() failures that mean "out of a resource for now": wait, do not die.
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: How long the accept loop sleeps after a capacity error, and how often it says so.
CAPACITY_PAUSE = 0.1
CAPACITY_WARN_EVERY = 10.0


def fmt_addr(addr: Address) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _family(host: str) -> int:
    return _stdsocket.AF_INET6 if ":" in host else _stdsocket.AF_INET


@dataclass
class Stats:
    """Counters since start: connections by (direction, outcome), refusals by reason.

    Bumped once per connection (never per message); :mod:`.metrics` reads them
    at scrape time.
    """

    connections: Counter[tuple[str, str]] = field(default_factory=Counter)
    refusals: Counter[tuple[str, str]] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)
    active: int = 0
    pending_handshakes: int = 0
    #: (direction, "full" | "resumed") -> handshake durations.
    handshake_seconds: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    #: direction -> connection durations.
    duration_seconds: dict[str, Histogram] = field(
        default_factory=lambda: {d: Histogram(DURATION_BUCKETS) for d in ("egress", "ingress")}
    )
    rule_repairs: int = 0
    rule_check_failures: int = 0
    #: The latest ended connections (for the doctor's self-test via the admin server).
    recent: deque[dict[str, object]] = field(default_factory=lambda: deque(maxlen=32))

    def handshake_done(self, direction: str, resumed: bool, seconds: float) -> None:
        key = (direction, "resumed" if resumed else "full")
        hist = self.handshake_seconds.get(key)
        if hist is None:
            hist = self.handshake_seconds[key] = Histogram(HANDSHAKE_BUCKETS)
        hist.observe(seconds)

    #: Inbound connections a permissive port passed to the app without TLS.
    plaintext_accepted: int = 0
    #: UDP flows by outcome, packets, bytes and drops by reason (``--intercept-udp``).
    udp: Counter[str] = field(default_factory=Counter)


class Refused(Exception):
    """A connection we will not carry; ``str()`` is the reason for the log."""


async def open_listener(
    host: str, port: int, *, transparent: bool, mark: int | None, backlog: int = 4096
) -> trio.socket.SocketType:
    sock = trio.socket.socket(_family(host), _stdsocket.SOCK_STREAM)
    try:
        sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 1)
        # Accepted sockets inherit it (no syscall per connection). Without it the
        # TLS server's handshake flight and its session tickets, two small writes,
        # waited for the client's delayed ACK: ~40 ms per connection.
        sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
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
    return sock


async def accept_loop(
    listener: trio.socket.SocketType,
    handler: Handler,
    *,
    admit: Admit | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept forever, one task per admitted connection (in this loop's nursery).

    A connection ``admit`` refuses is reset at once, unread."""
    warned_at: float | None = None
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            try:
                sock, addr = await listener.accept()
            except OSError as exc:
                if exc.errno not in CAPACITY_ERRNOS:
                    raise
                now = trio.current_time()
                if warned_at is None or now - warned_at >= CAPACITY_WARN_EVERY:
                    warned_at = now
                    log.warning(
                        "accept on %s paused: %s (new connections wait in the backlog)",
                        fmt_addr(listener.getsockname()[:2]),
                        errno.errorcode.get(exc.errno or 0, exc),
                    )
                await trio.sleep(CAPACITY_PAUSE)
                continue
            src = (str(addr[0]), int(addr[1]))
            if admit is not None and not admit(src):
                _abort_socket(sock)
                continue
            nursery.start_soon(handler, sock, src)


@dataclass
class _Conn:
    """One connection's facts, filled in as its handler learns them."""

    direction: str
    src: Address
    dst: Address
    start: float
    leg: tlspolicy.TLSLeg | None = None
    result: RelayResult | None = None
    refusal: str | None = None
    reported: bool = False
    #: Permissive ingress without TLS: what the first bytes were ("plaintext", "tls").
    plaintext: str | None = None


class Sidecar:
    """Listeners and handlers for one pod.  Kernel set-up lives in ``lifecycle``."""

    def __init__(
        self,
        config: ProxyConfig,
        credentials: Credentials,
        *,
        listen_hosts: tuple[str, ...] = ("127.0.0.1", "::1"),
        kernel_options: bool = True,
        egress_destination: DestinationLookup | None = None,
        ingress_dialer: IngressDialer | None = None,
        ports: tuple[int, int] | None = None,
    ) -> None:
        """``ports``: (egress, ingress) to bind instead of the configured ones; 0 lets
        the kernel choose (tests): ``serve`` reports what was bound."""
        self.config = config
        #: Ours; a reload replaces them (lifecycle's credential watcher warns before expiry).
        self.credentials = credentials
        self.listen_hosts = listen_hosts
        self.kernel_options = kernel_options
        self.use_credentials(credentials)
        self.egress_destination = egress_destination or kernel.original_destination
        self.ingress_dialer = ingress_dialer or self.dial_app
        self.stats = Stats()
        self.admission = limits.Admission(config.limits)
        self._throttle = limits.Throttle()
        #: The open-file limit after raising it (for the "ready:" line).
        self.fd_limit = "unchanged"
        ic = config.interception
        self.ports = ports if ports is not None else (ic.tcp_port, ic.tls_port)
        #: Addresses actually bound, filled by serve(): {"egress": [...], "ingress": [...]}.
        self.bound: dict[str, list[Address]] = {"egress": [], "ingress": []}
        #: Ports of our own listeners: never a destination we dial.
        self.own_ports: frozenset[int] = frozenset(p for p in self.ports if p)
        #: UDP over DTLS, when asked for (it needs the kernel options).
        self.udp = (
            UDPService(config, credentials, self.stats.udp, listen_hosts=listen_hosts)
            if ic.intercept_udp and kernel_options
            else None
        )
        #: Source ports of the inbound connections we hold, by (client IP, port
        #: dialed): a preserved-address dial to the app must not pick one (see
        #: :meth:`dial`).
        self._inbound_ports: dict[tuple[str, int], Counter[int]] = {}
        #: Drain (lifecycle): set at SIGTERM; with ``refuse_new`` new connections
        #: are refused; once ``drain_expired`` the connections still open are
        #: cancelled (reset) and reported with outcome ``drained``.
        self.draining = False
        self.refuse_new = False
        self.drain_expired = False
        self._idle: trio.Event | None = None

    async def wait_idle(self) -> None:
        """Return once no connection is active (drain: exit on zero connections)."""
        while self.stats.active:
            self._idle = trio.Event()
            await self._idle.wait()

    def use_credentials(self, credentials: Credentials) -> None:
        """Serve NEW connections with ``credentials`` (raises, changing nothing, if
        OpenSSL refuses them).  Live connections keep the context they started
        with; sessions set up under the old credentials are never resumed."""
        groups = self.config.tls_groups
        server = tlspolicy.server_context(credentials, groups=groups)
        client = tlspolicy.client_context(credentials, groups=groups)
        # Three assignments, no await between them: atomic for every handler.
        # A fresh ticket key comes with the new server context, so peers'
        # tickets from the old one are refused too.
        self.server_context, self.client_context = server, client
        old = getattr(self, "sessions", None)
        self.sessions = SessionCache(self.config.session_cache)
        # Name checks by peer certificate; forgotten with the trust they were made under.
        self.identities = tlspolicy.IdentityMemo()
        if old is not None:
            old.clear()  # a live egress connection may still keep() into it: harmless
        self.credentials = credentials
        udp = getattr(self, "udp", None)  # None too while __init__ runs
        if udp is not None:
            udp.use_credentials(credentials)

    # -- sockets we dial -------------------------------------------------------

    async def dial(
        self, addr: Address, *, source: str | None = None, avoid: Container[int] = ()
    ) -> trio.socket.SocketType:
        """Connect to ``addr`` with the bypass mark, within the connect timeout.

        ``source``: a foreign address to connect from (the ingress client's):
        IP_TRANSPARENT lets us bind it, the preserve mark (instead of the bypass
        mark) makes conntrack route the app's replies back to us through ``lo``.
        The source port comes from :data:`PRESERVE_PORTS`, below every common
        ephemeral range (Linux 32768-60999, Windows and macOS 49152-65535), and
        is never one of ``avoid`` (the source ports of the inbound connections
        from that client to that app port we hold).  Two collisions are
        avoided that way, both about once in 10,000 connections with 16 at a
        time when the kernel chose the port from the clients' own range:

        * our socket ``client:p -> app:port`` has the 4-tuple of a TPROXY'd
          socket ``client:p -> app:port`` we accepted, which the kernel cannot
          see (it is keyed from the other end): the app's SYN goes to that
          socket instead (connect "succeeds", then ECONNRESET);
        * the client later opens ``client:p -> app:port`` itself: TPROXY's
          lookup finds the app's accepted socket of our connection (local
          ``app:port``, remote ``client:p``) and that connection is reset.
        """
        # A stdlib socket until connected: its connect_ex lets a connection that
        # completed within the call go on without a scheduler pass (see _connect).
        raw = _stdsocket.socket(_family(addr[0]), _stdsocket.SOCK_STREAM | _SOCK_NONBLOCK)
        try:
            ic = self.config.interception
            if source is not None:
                kernel.set_transparent(raw)
                kernel.set_mark(raw, ic.preserve_mark)
                _bind_preserved(raw, source, avoid)
            elif self.kernel_options:
                kernel.set_mark(raw, ic.bypass_mark)
            raw.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
            await _connect(raw, addr, self.config.timeouts.connect)
        except Refused:
            raw.close()
            raise
        except OSError as exc:
            raw.close()
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            raise Refused(f"connect to {fmt_addr(addr)} failed: {name}") from None
        except BaseException:
            raw.close()
            raise
        return trio.socket.from_stdlib_socket(raw)

    async def dial_app(self, dst: Address, client: Address) -> PlainStream:
        """Reach the app at the original destination (``dst``, the address the
        client dialed), from the client's address when preservation is on.

        Never 127.0.0.1 unless ``--inbound-to-loopback``: a listener bound only
        to localhost (an admin or debug port) must not be reachable from the
        mesh; an app bound only to the pod IP must be.  Link-local IPv6
        addresses carry their scope (``fe80::1%eth0``) from the accepted socket.
        """
        if dst[1] in self.own_ports:
            # Dialing our own listener would loop the connection back into us.
            raise Refused(f"port {dst[1]} is the proxy's own listener, not an app port")
        ingress = self.config.ingress
        if ingress.inbound_to_loopback:
            target: Address = (_LOOPBACK[_family(dst[0])], dst[1])
            source = None
        else:
            target = dst
            # A scoped (link-local) client is not kept: the app's reply goes to
            # a socket bound to eth0, and the fwmark route (local ::/0 dev lo)
            # does not match that strict output interface; the SYN-ACK would
            # leave on eth0 instead of looping back (see docs/kernel.md).
            keep = ingress.preserve_client_ip and self.kernel_options and "%" not in client[0]
            source = client[0] if keep else None
        avoid = self._inbound_ports.get((client[0], dst[1]), ())
        sock = await self.dial(target, source=source, avoid=avoid)
        if conn_log.isEnabledFor(logging.INFO):
            # The client's port cannot be kept: this line pairs it with ours.
            conn_log.info(
                "ingress %s <-> app leg %s -> %s%s",
                fmt_addr(client),
                fmt_addr(_address(sock.getsockname())),
                fmt_addr(target),
                " (client address kept)" if source is not None else "",
            )
        return PlainStream(sock)

    def _dials_itself(self, dst: Address) -> bool:
        """Egress to one of our own listener ports on an address of this pod.

        Dialing it would accept it again, dial again...: one connection becomes
        a chain that ends only when file descriptors run out.  Only a
        destination on one of our ports costs a check (a bind probe).
        """
        if dst[1] not in self.own_ports:
            return False
        return _is_local_address(dst[0])

    # -- serving ---------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[dict[str, list[Address]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind both listeners on every host, then accept until cancelled.

        Reports :attr:`bound` through ``task_status.started()`` once every
        listener accepts (so tests can bind port 0).
        """
        ic = self.config.interception
        mark = ic.bypass_mark if self.kernel_options else None
        if self.kernel_options:
            soft = limits.raise_fd_limit()[0]
            self.fd_limit = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
        listeners: list[tuple[str, trio.socket.SocketType]] = []
        tcp_port, tls_port = self.ports
        try:
            for host in self.listen_hosts:
                egress = await open_listener(
                    host, tcp_port, transparent=self.kernel_options, mark=None
                )
                listeners.append(("egress", egress))
                ingress = await open_listener(
                    host, tls_port, transparent=self.kernel_options, mark=mark
                )
                listeners.append(("ingress", ingress))
            for kind, listener in listeners:
                self.bound[kind].append(_address(listener.getsockname()))
            self.own_ports = frozenset(
                {*self.own_ports, *(addr[1] for addrs in self.bound.values() for addr in addrs)}
            )
            async with trio.open_nursery() as nursery:
                for kind, listener in listeners:
                    if kind == "egress":
                        handler, admit = self.handle_egress, self._admit_egress
                    else:
                        handler, admit = self.handle_ingress, self._admit_ingress
                    await nursery.start(
                        functools.partial(accept_loop, admit=admit),
                        listener,
                        self._gate(kind, handler),
                    )
                nursery.start_soon(self._trim_after_bursts)
                if self.udp is not None:
                    await nursery.start(self.udp.serve)
                task_status.started(self.bound)
        finally:
            for _, listener in listeners:
                listener.close()

    def _gate(self, direction: str, handler: Handler) -> Handler:
        """During a drain with ``refuse_new``: reset new connections, one line each."""

        async def gated(sock: trio.socket.SocketType, src: Address) -> None:
            if not self.refuse_new:
                await handler(sock, src)
                return
            # Admitted (counted active, and pending if inbound) by accept_loop.
            conn = _Conn(direction, src, ("?", 0), trio.current_time())
            if direction == "ingress":
                self._handshake_over(src)
            try:
                conn.dst = kernel.original_destination(sock)
            except OSError:
                pass
            conn.refusal = "draining: the sidecar is shutting down"
            _abort_socket(sock)
            self._report(conn, "refused")

        return gated

    # -- admission -------------------------------------------------------------

    def _admit_egress(self, src: Address) -> bool:
        return self._admit("egress", src, pending=False)

    def _admit_ingress(self, src: Address) -> bool:
        return self._admit("ingress", src, pending=True)

    def _admit(self, direction: str, src: Address, *, pending: bool) -> bool:
        kind = self.admission.admit(src[0], pending=pending)
        if kind is None:
            self.stats.active += 1
            return True
        self.stats.connections[(direction, "refused")] += 1
        self.stats.refusals[(direction, kind)] += 1
        quiet = self._throttle.due(f"{direction} {kind}", trio.current_time())
        if quiet is not None:
            lim = self.config.limits
            held = {
                limits.MAX_CONNECTIONS: f"{self.admission.active} connections held",
                limits.MAX_PENDING: f"{self.admission.pending} handshakes pending",
                limits.MAX_PENDING_PER_SOURCE: f"{self.admission.pending_by_source[src[0]]} "
                f"handshakes pending from {src[0]}",
            }[kind]
            value = getattr(lim, kind.replace("-", "_"))
            log.warning(
                "%s %s refused at accept: %s (--%s %d)%s",
                direction,
                fmt_addr(src),
                held,
                kind,
                value,
                f"; {quiet} more refused for this since the last such line" if quiet else "",
            )
        return False

    def _handshake_over(self, src: Address) -> None:
        """An admitted inbound connection is no longer pending (authenticated or not)."""
        self.admission.authenticated(src[0])

    async def _trim_after_bursts(self) -> None:
        """glibc keeps the heap a burst freed (~55 KB a connection) unless asked."""
        while True:
            await trio.sleep(limits.TRIM_EVERY)
            if self.admission.burst_ended():
                memory.trim()

    # -- handlers --------------------------------------------------------------

    async def handle_egress(self, sock: trio.socket.SocketType, src: Address) -> None:
        conn = _Conn("egress", src, ("?", 0), trio.current_time())
        app = PlainStream(sock)
        #: Legs this handler still owns (the relay takes both).
        legs: list[Stream] = [app]
        ended = "error"
        try:
            conn.dst = dst = self.egress_destination(sock)
            if self._dials_itself(dst):
                raise Refused(f"{fmt_addr(dst)} is this sidecar's own listener")
            tls_sock = await self.dial(dst)
            sessions = self.sessions  # replaced (not reused) when credentials change
            handshake_start = trio.current_time()
            self.stats.pending_handshakes += 1
            try:
                leg = await tlspolicy.connect(
                    self.client_context,
                    tls_sock,
                    self.config.identity,
                    dst,
                    handshake_timeout=self.config.timeouts.handshake,
                    sessions=sessions,
                    memo=self.identities,
                )
            finally:
                self.stats.pending_handshakes -= 1
            self.stats.handshake_done(
                "egress", bool(leg.resumed), trio.current_time() - handshake_start
            )
            conn.leg = leg
            legs.append(leg.stream)
            conn.result = RelayResult()
            legs.clear()  # from here on the relay owns and closes both legs
            await relay(
                app,
                leg.stream,
                half_close_timeout=self.config.timeouts.half_close,
                idle_timeout=self.config.timeouts.idle,
                result=conn.result,
            )
            if conn.result.outcome == "ok":
                tlspolicy.keep_session(sessions, leg, dst)  # the ticket came with the data
            ended = "relayed"
        except Refused as exc:
            conn.refusal, ended = str(exc), "refused"
        except tlspolicy.HandshakeFailed as exc:
            ended = "refused"
            await self._handshake_failed(conn, exc, legs, app)
        except trio.Cancelled:
            ended = "cancelled"
            raise
        except Exception:
            log.exception("internal error in egress handler; connection aborted")
        finally:
            await _abort_all(legs)
            self._report(conn, ended)

    async def _handshake_failed(
        self,
        conn: _Conn,
        exc: tlspolicy.HandshakeFailed,
        legs: list[Stream],
        app: Stream | None = None,
    ) -> None:
        """Report a failed handshake now (closing may take the alert's grace
        period), then let the peer read our alert before the socket closes."""
        conn.refusal = str(exc)
        self._report(conn, "refused")
        if not exc.alert_sent:
            legs.append(exc.stream)  # closed with the other legs
            return
        if app is not None:
            with trio.CancelScope(shield=True):
                await app.abort()  # the app learns at once; the peer gets our alert
        await exc.stream.close_after_alert()

    async def handle_ingress(self, sock: trio.socket.SocketType, src: Address) -> None:
        conn = _Conn("ingress", src, ("?", 0), trio.current_time())
        raw: trio.socket.SocketType | None = sock
        legs: list[Stream] = []
        ended = "error"
        pending = True
        held: Counter[int] | None = None
        try:
            conn.src, conn.dst = src, dst = kernel.ingress_addresses(sock, src)
            held = self._inbound_ports.setdefault((src[0], dst[1]), Counter())
            held[src[1]] += 1
            if self.config.ingress.permissive(dst[1]):
                kind = await peek.first_bytes_kind(
                    sock, tlspolicy.ALPN, self.config.timeouts.handshake
                )
                if kind is not SIDECAR:
                    pending = False  # decided: no handshake to wait for
                    self._handshake_over(src)
                    raw = None
                    peer = PlainStream(sock)
                    legs.append(peer)
                    await self._relay_plaintext(conn, peer, kind.value, dst, src, legs)
                    ended = "relayed"
                    return
            raw = None  # tlspolicy.accept owns it from here, then the leg does
            handshake_start = trio.current_time()
            self.stats.pending_handshakes += 1
            try:
                leg = await tlspolicy.accept(
                    self.server_context,
                    sock,
                    self.config.identity,
                    handshake_timeout=self.config.timeouts.handshake,
                    memo=self.identities,
                )
            finally:
                self.stats.pending_handshakes -= 1
                pending = False
                self._handshake_over(src)
            self.stats.handshake_done(
                "ingress", bool(leg.resumed), trio.current_time() - handshake_start
            )
            conn.leg = leg
            legs.append(leg.stream)
            app = await self.ingress_dialer(dst, src)
            legs.append(app)
            conn.result = RelayResult()
            legs.clear()  # from here on the relay owns and closes both legs
            await relay(
                leg.stream,
                app,
                half_close_timeout=self.config.timeouts.half_close,
                idle_timeout=self.config.timeouts.idle,
                result=conn.result,
            )
            ended = "relayed"
        except (Refused, peek.PeekFailed) as exc:
            conn.refusal, ended = str(exc), "refused"
        except tlspolicy.HandshakeFailed as exc:
            ended = "refused"
            await self._handshake_failed(conn, exc, legs)
        except trio.Cancelled:
            ended = "cancelled"
            raise
        except Exception:
            log.exception("internal error in ingress handler; connection aborted")
        finally:
            if held is not None:
                held[src[1]] -= 1
                if held[src[1]] <= 0:
                    del held[src[1]]
                    if not held:
                        self._inbound_ports.pop((src[0], conn.dst[1]), None)
            if pending:
                self._handshake_over(src)
            if raw is not None:
                _abort_socket(raw)
            await _abort_all(legs)
            self._report(conn, ended)

    async def _relay_plaintext(
        self,
        conn: _Conn,
        peer: PlainStream,
        kind: str,
        dst: Address,
        src: Address,
        legs: list[Stream],
    ) -> None:
        """Permissive: the client is not a sidecar; the app gets its bytes as they are."""
        self.stats.plaintext_accepted += 1
        conn.plaintext = kind
        if conn_log.isEnabledFor(logging.INFO):
            conn_log.info(
                "ingress %s -> %s plaintext accepted (permissive): %s",
                fmt_addr(src),
                fmt_addr(dst),
                "TLS without our ALPN" if kind == "tls" else "not TLS",
            )
        app = await self.ingress_dialer(dst, src)
        legs.append(app)
        conn.result = RelayResult()
        legs.clear()  # from here on the relay owns and closes both legs
        await relay(
            peer, app, half_close_timeout=self.config.timeouts.half_close, result=conn.result
        )

    # -- outcomes --------------------------------------------------------------

    def _report(self, conn: _Conn, ended: str) -> None:
        """The one log line and count of a connection (see the module docstring)."""
        if conn.reported:
            return
        conn.reported = True
        stats = self.stats
        stats.active -= 1
        self.admission.closed()
        if not stats.active and self._idle is not None:
            self._idle.set()
        direction = conn.direction
        leg = conn.leg
        peer = "-" if leg is None else leg.peer.description
        if conn.refusal is not None:
            reason = conn.refusal
            stats.connections[(direction, "refused")] += 1
            stats.refusals[(direction, _reason_key(reason))] += 1
            log.warning(
                "%s %s -> %s refused: %s",
                direction,
                fmt_addr(conn.src),
                fmt_addr(conn.dst),
                reason,
                extra={
                    "conn": {
                        "direction": direction,
                        "src": fmt_addr(conn.src),
                        "dst": fmt_addr(conn.dst),
                        "outcome": "refused",
                        "reason": reason,
                    }
                },
            )
            stats.recent.append(
                {"direction": direction, "src": conn.src, "dst": conn.dst, "outcome": "refused"}
            )
            return
        result = conn.result
        if result is None:  # ended before the relay: cancelled or a bug
            outcome = "cancelled" if ended == "cancelled" else "error"
            result = RelayResult(outcome=outcome, detail="before the relay started")
            if outcome == "error":
                stats.refusals[("internal", "bug")] += 1
        outcome = result.outcome
        if outcome == "cancelled" and self.drain_expired:
            outcome = "drained"  # reset at the end of the drain (lifecycle)
        # The relay's a is the app's leg on egress, the peer's on ingress.
        if direction == "egress":
            sent, received = result.a_to_b, result.b_to_a
        else:
            sent, received = result.b_to_a, result.a_to_b
        duration = trio.current_time() - conn.start
        stats.connections[(direction, outcome)] += 1
        stats.bytes[f"{direction}_sent"] += sent
        stats.bytes[f"{direction}_received"] += received
        stats.duration_seconds[direction].observe(duration)
        stats.recent.append(
            {
                "direction": direction,
                "src": conn.src,
                "dst": conn.dst,
                "peer": peer,
                "outcome": outcome,
            }
        )
        if conn_log.isEnabledFor(logging.INFO):
            resumed = None if leg is None else leg.resumed
            fields = {
                "direction": direction,
                "src": fmt_addr(conn.src),
                "dst": fmt_addr(conn.dst),
                "peer": peer,
                "tls": ("-" if leg is None else leg.info)
                if conn.plaintext is None
                else f"permissive-{conn.plaintext}",
                "sent": sent,
                "received": received,
                "duration": round(duration, 3),
                "outcome": outcome,
                "handshake": "resumed" if resumed else "-" if resumed is None else "full",
                "alpn": "-" if leg is None or not leg.alpn else tlspolicy.ALPN.decode(),
                "detail": result.detail or "",
            }
            conn_log.info(
                "%s %s -> %s peer=%s %s sent=%d received=%d duration=%.3fs outcome=%s "
                "handshake=%s alpn=%s%s",
                direction,
                fields["src"],
                fields["dst"],
                peer,
                fields["tls"],
                sent,
                received,
                duration,
                outcome,
                fields["handshake"],
                fields["alpn"],
                f" ({result.detail})" if result.detail else "",
                extra={"conn": fields},
            )


async def _abort_all(legs: list[Stream]) -> None:
    if not legs:
        return  # the relay owns them (the usual case): no shielded scope to set up
    with trio.CancelScope(shield=True):
        for leg in legs:
            await leg.abort()


#: Source ports of the app legs that keep the client's address (see Sidecar.dial).
PRESERVE_PORTS = range(16384, 32768)


def preserve_port_clash(ephemeral: range, reserved: list[range]) -> range | None:
    """The part of :data:`PRESERVE_PORTS` this namespace may also hand out as
    ephemeral ports (None: no overlap).  A client whose kernel picks one of those
    ports meets the second collision of :meth:`Sidecar.dial`: about one
    connection in (number of ports) / (connections held) times out or is reset."""
    low = max(ephemeral.start, PRESERVE_PORTS.start)
    high = min(ephemeral.stop, PRESERVE_PORTS.stop)
    if low >= high:
        return None
    free = [port for port in range(low, high) if not any(port in r for r in reserved)]
    return range(free[0], free[-1] + 1) if free else None


def preserve_port_warning(proc: str = "/proc/sys/net/ipv4") -> str | None:
    """One line for the log when this pod's ephemeral ports overlap :data:`PRESERVE_PORTS`."""
    found = kernel.ephemeral_ports(proc)
    if found is None:
        return None
    ephemeral, _ = found
    clash = preserve_port_clash(*found)
    if clash is None:
        return None
    return (
        f"net.ipv4.ip_local_port_range is {ephemeral.start} {ephemeral.stop - 1}: ports "
        f"{clash.start}-{clash.stop - 1} are also the ones the sidecar gives the app legs of "
        f"kept client addresses ({PRESERVE_PORTS.start}-{PRESERVE_PORTS.stop - 1}), so a "
        "connection from this pod to a peer that keeps client addresses may time out or be "
        "reset now and then; keep the range above "
        f"{PRESERVE_PORTS.stop - 1}, or reserve the ports (net.ipv4.ip_local_reserved_ports="
        f"{PRESERVE_PORTS.start}-{PRESERVE_PORTS.stop - 1})"
    )


#: Not in every Python's socket module (Linux only); the kernel's value.
_SOCK_NONBLOCK: int = getattr(_stdsocket, "SOCK_NONBLOCK", 0o4000)


async def _connect(sock: _stdsocket.socket, addr: Address, seconds: float) -> None:
    """Connect the non-blocking ``sock`` to ``addr`` within ``seconds``.

    What trio's ``connect`` does, minus its scheduler pass when the connection
    is there when ``connect()`` returns: over loopback and veth the peer's
    SYN-ACK (or RST) is processed within the call.  Raises OSError (refused,
    unreachable...) or :class:`Refused` on timeout.
    """
    err = sock.connect_ex(_sockaddr(addr))
    if err == errno.EINPROGRESS:
        try:
            sock.getpeername()
            return  # established within the call
        except OSError:
            err = sock.getsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_ERROR)
        if not err:  # still in progress: wait, within the connect timeout
            with trio.CancelScope(deadline=trio.current_time() + seconds) as deadline:
                await trio.lowlevel.wait_writable(sock)
            if deadline.cancelled_caught:
                raise Refused(f"connect to {fmt_addr(addr)} timed out after {seconds:g}s")
            err = sock.getsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_ERROR)
    if err:
        raise OSError(err, errno.errorcode.get(err, str(err)))


def _sockaddr(addr: Address) -> tuple[str, int] | tuple[str, int, int, int]:
    """``addr`` for the stdlib's ``connect``: a scoped link-local address
    (``fe80::1%eth0``) with its scope id resolved, which the 2-tuple form drops."""
    if "%" not in addr[0]:
        return addr
    found = _stdsocket.getaddrinfo(
        addr[0], addr[1], _stdsocket.AF_INET6, _stdsocket.SOCK_STREAM, 0, _stdsocket.AI_NUMERICHOST
    )
    name: tuple[Any, ...] = found[0][4]
    return str(name[0]), int(name[1]), int(name[2]), int(name[3])


def _bind_preserved(
    sock: _stdsocket.socket, source: str, avoid: Container[int], tries: int = 64
) -> None:
    """Bind ``sock`` to ``source`` on a free port of :data:`PRESERVE_PORTS` not in ``avoid``."""
    for _ in range(tries):
        port = random.choice(PRESERVE_PORTS)
        if port in avoid:
            continue
        try:
            sock.bind((source, port))
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    sock.bind((source, 0))  # the range is crowded: the kernel's choice
    if sock.getsockname()[1] in avoid:
        raise OSError(errno.EADDRINUSE, "no free source port for the client's address")


def _abort_socket(sock: trio.socket.SocketType) -> None:
    try:
        kernel.set_abort_on_close(sock)
    except OSError:
        pass
    sock.close()


def _address(name: object) -> Address:
    assert isinstance(name, tuple)
    return str(name[0]), int(name[1])


def _is_local_address(host: str) -> bool:
    """Whether ``host`` is an address of this network namespace (or unspecified)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.is_loopback or ip.is_unspecified:
        return True
    probe = _stdsocket.socket(_family(host), _stdsocket.SOCK_STREAM)
    try:
        probe.bind((host, 0))  # only a local address can be bound (no IP_FREEBIND)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _reason_key(reason: str) -> str:
    """A short, bounded label for the refusal counter."""
    head = reason.split(" (presented", 1)[0]
    return head.split(":", 1)[-1].strip()[:60] if ":" in head else head[:60]

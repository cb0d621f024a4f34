"""The compiled data path of an established connection, and when it is off.

General theory of operation
---------------------------
The relay's Python loop costs a scheduler pass, a ``receive_some`` and a
``send_all`` per message: most of the sidecar's CPU for small messages.  For
the two directions of a sidecar connection (plain TCP -> TLS and TLS -> plain
TCP) this module moves that loop into C (``_fastpath.c``), in two stages:

1. **The relay thread** (the default).  Once both legs are ready, the
   connection is handed to one C thread per process that relays every
   established connection in an epoll loop of its own, without the GIL and
   without Python per message.  It hands the connection back at the first
   end of either direction (EOF, a failure) and Python does the rest: the
   end of a connection is Python's, its bytes are not.
2. **Per wake-up** (after the hand-back, or ``TRIO_TPROXY_FASTPATH=wakeup``).
   One C call per wake-up reads, encrypts or decrypts, and writes until
   something would block, and returns what to wait for; Python waits on that
   fd with the streams' own rules (:meth:`TLSStream._wait` shares the TLS
   socket between the two directions) and calls again.

Both stages drive the same per-direction state (``struct tt_pipe``): bytes
read and not yet written, counters, and the end of a direction, sticky, so a
hand-back loses nothing and an error is not met twice.

Ownership is the whole safety argument: at any moment a connection's fds and
``SSL*`` belong either to the thread or to Python.  Python takes them back
with ``tt_conn_stop`` (cancellation, drain, the idle timeout) under the mutex
the thread holds whenever it touches a connection; after that call the
thread never touches them again, so the relay may close them.

Everything that is not data goes back to the streams, so the semantics are
theirs, not a second copy: :meth:`Pair.forward` returns at the source's clean
end (the relay's ``receive_some`` then reads it, and a plain stream still tells
a reset hidden behind a FIN), and failures are raised through the streams'
translation of the very exceptions pyOpenSSL gives for the compiled call's
result (:func:`.ossl.call_error`).

The same OpenSSL: ``_fastpath.c`` links none; it gets ``SSL_read``,
``SSL_write`` and ``SSL_get_error`` as pointers from pyOpenSSL's bindings
(:func:`.ossl.address`).  No Python callback is set on our contexts outside
the handshake, so the thread never calls into Python.

When it is off (:data:`WHY_OFF` says why): no C compiler at install time, no
private bindings in this pyOpenSSL, or ``TRIO_TPROXY_FASTPATH=off``.  Then
:func:`pair` returns None and the relay's Python loop does everything; the
relay tests and the fuzz property run all three ways.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib.util import find_spec
from typing import Any

import trio
from OpenSSL import SSL

from . import ossl
from .plainstream import PlainStream
from .streams import DEFAULT_RECEIVE_SIZE, State, Stream
from .tlsstream import TLSStream

_CDEF = """
typedef int (*tt_ssl_io)(void *ssl, void *buf, int num);
typedef int (*tt_ssl_get_error)(const void *ssl, int ret);
typedef unsigned long (*tt_err_get)(void);
typedef void (*tt_err_put)(int lib, int func, int reason, const char *file, int line);
struct tt_ossl {
    tt_ssl_io read; tt_ssl_io write; tt_ssl_get_error get_error;
    tt_err_get err_get; tt_err_put err_put;
};
struct tt_pipe {
    char *scratch; int cap; char *pend; int plen; long long moved;
    int after_flush; int ret; int err; int done; char *own; int own_cap;
    int nerr; unsigned long errs[8];
};
void tt_pipe_restore_errors(const struct tt_ossl *o, const struct tt_pipe *p);
struct tt_conn { struct tt_pipe to_tls; struct tt_pipe to_plain; };  /* its head only */
struct tt_loop;
int tt_plain_to_tls(const struct tt_ossl *o, int fd, void *ssl, struct tt_pipe *p, long budget);
int tt_tls_to_plain(const struct tt_ossl *o, void *ssl, int fd, struct tt_pipe *p, long budget);
void tt_pipe_free(struct tt_pipe *p);
struct tt_loop *tt_loop_new(const struct tt_ossl *o, int scratch_cap, long budget);
int tt_loop_notify_fd(struct tt_loop *l);
struct tt_conn *tt_conn_acquire(struct tt_loop *l);
void tt_conn_start(struct tt_loop *l, struct tt_conn *c, int plain_fd, int tls_fd, void *ssl);
int tt_conn_stop(struct tt_loop *l, struct tt_conn *c);
int tt_loop_collect(struct tt_loop *l, struct tt_conn **out, int max);
void tt_conn_release(struct tt_loop *l, struct tt_conn *c);
"""

# The codes of _fastpath.c
SRC_READABLE, SRC_WRITABLE, DST_READABLE, DST_WRITABLE, YIELD, SRC_EOF, SRC_FAILED, DST_FAILED = (
    range(1, 9)
)

#: Bytes one call may move before it lets others run (about 1 ms of bulk).
BUDGET = 1 << 20
#: The thread's turn per connection: fairness between its connections.
THREAD_BUDGET = 256 * 1024


def _promote_after(default: int = 8) -> int:
    """TRIO_TPROXY_PROMOTE_AFTER, a count >= 0 (else the default: the ready line shows it)."""
    value = os.environ.get("TRIO_TPROXY_PROMOTE_AFTER", "")
    return int(value) if value.isdigit() else default


#: Wake-ups of one direction before a connection goes to the relay thread (see
#: Pair); TRIO_TPROXY_PROMOTE_AFTER overrides it (0: at the first wait).
PROMOTE_AFTER = _promote_after()

_WANT_READ = SSL.WantReadError()
_WANT_WRITE = SSL.WantWriteError()

_MODES = {"off": "off", "0": "off", "no": "off", "false": "off", "wakeup": "wakeup"}
#: TRIO_TPROXY_FASTPATH: unset (the relay thread), "wakeup" (no thread), "off".
MODE = _MODES.get(os.environ.get("TRIO_TPROXY_FASTPATH", "").lower(), "thread")


def _load() -> tuple[Any, Any, Any, str]:
    """(ffi, lib, the OpenSSL function table, "") or (None, None, None, why not)."""
    if MODE == "off":
        return None, None, None, "TRIO_TPROXY_FASTPATH=off"
    spec = find_spec("trio_tproxy._fastpath")
    if spec is None or not spec.origin:
        return None, None, None, "not built (no C compiler when trio-tproxy was installed)"
    names = ("SSL_read", "SSL_write", "SSL_get_error", "ERR_get_error", "ERR_put_error")
    functions = {name: ossl.address(name) for name in names}
    if None in functions.values():
        return None, None, None, "this pyOpenSSL has no private bindings to OpenSSL"
    import cffi  # cryptography's dependency: only the sidecar that uses the fast path loads it

    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    try:
        lib = ffi.dlopen(spec.origin)
    except OSError as exc:
        return None, None, None, f"cannot load {spec.origin}: {exc}"
    table = ffi.new("struct tt_ossl *")
    table.read = ffi.cast("tt_ssl_io", functions["SSL_read"])
    table.write = ffi.cast("tt_ssl_io", functions["SSL_write"])
    table.get_error = ffi.cast("tt_ssl_get_error", functions["SSL_get_error"])
    table.err_get = ffi.cast("tt_err_get", functions["ERR_get_error"])
    table.err_put = ffi.cast("tt_err_put", functions["ERR_put_error"])
    return ffi, lib, table, ""


_ffi, _lib, _OSSL, WHY_OFF = _load()
#: The compiled path is there (tests switch it off with monkeypatch).
ENABLED = not WHY_OFF
#: Established connections go to the relay thread (tests switch it off too).
THREAD = ENABLED and MODE == "thread"
_scratch: Any = _ffi.new("char[]", DEFAULT_RECEIVE_SIZE) if ENABLED else None
_loop: Any = None


def describe() -> str:
    """One phrase for the start-up log line."""
    if not ENABLED:
        return f"Python ({WHY_OFF})"
    if THREAD:
        return f"compiled, relay thread after {PROMOTE_AFTER} waits"
    return "compiled, per wake-up"


def relay_thread() -> Any:
    """The process's relay thread, started on first use; None if it cannot start.

    Three fds (its epoll and two eventfds) and one thread for the life of the
    process: the sidecar starts it at start-up (``describe`` then tells)."""
    global _loop, THREAD
    if not THREAD:
        return None
    if _loop is None:
        _loop = _lib.tt_loop_new(_OSSL, DEFAULT_RECEIVE_SIZE, THREAD_BUDGET)
        if _loop == _ffi.NULL:
            THREAD = False  # per wake-up then: same behaviour, more CPU
            return None
    return _loop


# -- handing connections back: one dispatcher task per trio run -------------------------

_WAITERS: trio.lowlevel.RunVar[dict[int, trio.Event]] = trio.lowlevel.RunVar("fastpath_waiters")


def _waiters() -> dict[int, trio.Event]:
    try:
        return _WAITERS.get()
    except LookupError:
        waiters: dict[int, trio.Event] = {}
        _WAITERS.set(waiters)
        trio.lowlevel.spawn_system_task(_dispatch, waiters, name="fastpath hand-backs")
        return waiters


async def _dispatch(waiters: dict[int, trio.Event]) -> None:
    loop = relay_thread()
    fd = _lib.tt_loop_notify_fd(loop)
    returned = _ffi.new("struct tt_conn *[]", 64)
    while True:
        await trio.lowlevel.wait_readable(fd)
        for i in range(_lib.tt_loop_collect(loop, returned, 64)):
            event = waiters.pop(int(_ffi.cast("uintptr_t", returned[i])), None)
            if event is not None:
                event.set()


# -- one connection ---------------------------------------------------------------------


def pair(a: Stream, b: Stream) -> Pair | None:
    """The fast path for relaying ``a`` and ``b``; None when there is none for them."""
    if not ENABLED:
        return None
    if type(a) is PlainStream and type(b) is TLSStream:
        return Pair(b, a)
    if type(a) is TLSStream and type(b) is PlainStream:
        return Pair(a, b)
    return None


class Pair:
    """Both directions of one plain/TLS connection, and who is carrying them.

    A connection starts per wake-up.  Once one direction has waited
    :data:`PROMOTE_AFTER` times without either direction ending, it is worth a
    thread: both pumps leave their per-wake-up loops (the one that decides
    cancels the other's wait, which is safe between two C calls) and the
    connection goes to the relay thread until its first end.  Short
    connections (a request, a response, a close) never pay the two
    hand-overs between threads; long ones stop paying Python per message.

    ``to_tls`` is plain -> TLS, ``to_plain`` TLS -> plain (``struct tt_pipe``
    each), in a slot of the relay thread when there is one, else local.
    """

    __slots__ = (
        "tls",
        "plain",
        "_conn",
        "_local",
        "_accounted",
        "_waits",
        "_promoted",
        "_started",
        "_handed_back",
        "_out_of_run",
    )

    def __init__(self, tls: TLSStream, plain: PlainStream) -> None:
        self.tls = tls
        self.plain = plain
        self._conn: Any = None  # a slot of the relay thread, while we hold one
        self._local: _Local | None = None  # the pipes when there is no slot
        self._accounted = [0, 0]  # bytes of to_tls/to_plain reported through ``moved``
        #: Each direction's per-wake-up phase, to be cancelled by a promotion.
        self._waits: list[trio.CancelScope | None] = [None, None]
        self._promoted = False
        #: The thread has had the connection (once at most); set when it hands it back.
        self._started = False
        self._handed_back: trio.Event | None = None
        #: Set when a direction leaves its per-wake-up loop (a promotion waits for it).
        self._out_of_run: trio.Event | None = None

    def _pipe(self, index: int) -> Any:
        field = "to_tls" if index == 0 else "to_plain"
        if self._conn is not None:
            return _ffi.addressof(self._conn, field)
        assert self._local is not None
        return getattr(self._local, field)

    def _unreported(self) -> tuple[int, int]:
        """Bytes of (to_tls, to_plain) the thread moved that ``moved`` has not reported."""
        if self._conn is None:
            return 0, 0
        return (
            int(self._conn.to_tls.moved) - self._accounted[0],
            int(self._conn.to_plain.moved) - self._accounted[1],
        )

    def unreported(self) -> tuple[int, int]:
        """:meth:`_unreported`, now reported: what the thread moved before a
        connection was taken back (cancelled)."""
        to_tls, to_plain = self._unreported()
        self._accounted[0] += to_tls
        self._accounted[1] += to_plain
        return to_tls, to_plain

    def in_flight(self) -> int:
        """Bytes the thread moved that ``moved`` has not reported yet (for the watchdog)."""
        return sum(self._unreported())

    async def forward(self, outbound: bool, moved: Callable[[int], None]) -> None:
        """Carry one direction in compiled code until its source ends.

        Returns at the source's clean end (the caller's next ``receive_some``
        reads it).  ``moved(n)`` gets the bytes written since its last call.
        Raises what ``receive_some``/``send_all`` would raise.
        """
        tls, plain = self.tls, self.plain
        src, dst = (plain, tls) if outbound else (tls, plain)
        if src._receiving:
            raise src._busy("receiving")
        if dst._sending:
            raise dst._busy("sending")
        src._receiving = dst._sending = True
        index = 0 if outbound else 1
        try:
            if not tls._handshake_done:
                await tls.do_handshake()
            if self._conn is None and self._local is None:
                loop = relay_thread()
                conn = _lib.tt_conn_acquire(loop) if loop is not None else _ffi.NULL
                if conn != _ffi.NULL:
                    self._conn = conn
                else:
                    self._local = _Local()
            counted = self._count(index, moved)
            while True:
                if self._promoted:
                    await self._in_thread(index)
                pipe = self._pipe(index)
                if pipe.moved != self._accounted[index]:
                    moved(pipe.moved - self._accounted[index])
                    self._accounted[index] = pipe.moved
                budget = PROMOTE_AFTER if self._may_promote() else -1
                try:
                    with trio.CancelScope() as waiting:
                        self._waits[index] = waiting
                        if await _run(tls, plain, outbound, counted, pipe, budget):
                            return  # the source's end
                        self._promote()
                finally:
                    self._left_run(index)
        finally:
            self._left_run(index)
            src._receiving = dst._sending = False

    def _left_run(self, index: int) -> None:
        """This direction makes no C call until it is back in ``_run``."""
        self._waits[index] = None
        if self._out_of_run is not None:
            self._out_of_run.set()

    def _count(self, index: int, moved: Callable[[int], None]) -> Callable[[int], None]:
        accounted = self._accounted

        def counted(n: int) -> None:
            accounted[index] += n
            moved(n)

        return counted

    def _may_promote(self) -> bool:
        """Not yet in the thread, and no direction has ended (it would come straight back)."""
        conn = self._conn
        return (
            conn is not None
            and not self._started
            and not conn.to_tls.done
            and not conn.to_plain.done
        )

    def _promote(self) -> None:
        if self._promoted or not self._may_promote():
            return
        self._promoted = True
        for waiting in self._waits:
            if waiting is not None:
                waiting.cancel()  # the other pump, parked between two C calls

    async def _in_thread(self, index: int) -> None:
        """Hand the connection to the relay thread (the first pump) and wait for it back.

        Not before the other direction has left its per-wake-up loop: cancelling
        its wait does not stop a task trio has already woken, which would make
        one more C call on this connection, concurrently with the thread.
        """
        while self._waits[1 - index] is not None:
            self._out_of_run = trio.Event()
            await self._out_of_run.wait()
        self._out_of_run = None
        if not self._started:
            self._started = True
            self._handed_back = trio.Event()
            _waiters()[int(_ffi.cast("uintptr_t", self._conn))] = self._handed_back
            ssl = _ffi.cast("void *", ossl.ssl_address(self.tls.conn))
            _lib.tt_conn_start(_loop, self._conn, self.plain._fd, self.tls._fd, ssl)
        assert self._handed_back is not None
        try:
            await self._handed_back.wait()
        finally:
            self.stop()
        self._promoted = False  # once: after the hand-back, per wake-up to the end

    def stop(self) -> None:
        """Take the connection back from the thread (idempotent; the fds are ours after)."""
        if self._handed_back is not None:
            if not self._handed_back.is_set():
                _lib.tt_conn_stop(_loop, self._conn)
                self._handed_back.set()
            _waiters().pop(int(_ffi.cast("uintptr_t", self._conn)), None)

    def release(self) -> None:
        """After the relay: the slot (or the local pipes) and their buffers go."""
        self.stop()
        if self._conn is not None:
            _lib.tt_conn_release(_loop, self._conn)
            self._conn = None
        if self._local is not None:
            _lib.tt_pipe_free(self._local.to_tls)
            _lib.tt_pipe_free(self._local.to_plain)
            self._local = None


class _Local:
    """The two pipes of a connection relayed per wake-up only."""

    __slots__ = ("to_tls", "to_plain")

    def __init__(self) -> None:
        self.to_tls = _ffi.new("struct tt_pipe *")
        self.to_plain = _ffi.new("struct tt_pipe *")


async def _run(
    tls: TLSStream,
    plain: PlainStream,
    outbound: bool,
    moved: Callable[[int], None],
    c: Any,
    wakeups: int = -1,
) -> bool:
    """One direction, one C call per wake-up, until its source ends (True), or
    until it would wait once more than ``wakeups`` (False; -1: no limit)."""
    c.scratch = _scratch
    c.cap = DEFAULT_RECEIVE_SIZE
    ssl = _ffi.cast("void *", ossl.ssl_address(tls.conn))
    step = _lib.tt_plain_to_tls if outbound else _lib.tt_tls_to_plain
    fd = plain._fd
    args = (_OSSL, fd, ssl, c, BUDGET) if outbound else (_OSSL, ssl, fd, c, BUDGET)
    await trio.lowlevel.checkpoint_if_cancelled()
    ok = State.OK
    wait_readable, wait_writable = trio.lowlevel.wait_readable, trio.lowlevel.wait_writable
    while True:
        if tls._state is not ok or plain._state is not ok:
            tls._check_usable()
            plain._check_usable()
        before = c.moved
        code = step(*args)
        if c.moved != before:
            moved(c.moved - before)
        if code <= YIELD:
            if wakeups == 0:
                return False
            wakeups -= 1
        if code == SRC_READABLE:
            if outbound:
                await wait_readable(fd)
            else:
                await tls._wait(_WANT_READ)
        elif code == DST_WRITABLE:
            if outbound:
                await tls._wait(_WANT_WRITE)
            else:
                await wait_writable(fd)
        elif code == YIELD:
            await trio.lowlevel.checkpoint()
        elif code == SRC_WRITABLE or code == DST_READABLE:  # OpenSSL's turn-arounds
            await tls._wait(_WANT_WRITE if code == SRC_WRITABLE else _WANT_READ)
        elif code == SRC_EOF:
            if not outbound:
                tls._eof_received = True  # close_notify; the relay's receive_some says b""
            return True
        else:
            failed_tls = (code == DST_FAILED) == outbound
            if failed_tls:
                # OpenSSL's error queue is per thread: the relay thread's failure
                # is put back into ours before pyOpenSSL reads it.
                ossl.clear_errors()
                _lib.tt_pipe_restore_errors(_OSSL, c)
                exc = ossl.call_error(tls.conn, c.ret, c.err)
                raise tls._translate(exc) from exc
            error = OSError(c.err, os.strerror(c.err))
            raise plain._error(error) from error

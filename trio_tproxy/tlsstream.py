"""A trio ``HalfCloseableStream`` over a pyOpenSSL ``Connection``.

General theory of operation
---------------------------
OpenSSL owns the socket: the ``Connection`` is built on the non-blocking fd of
a trio socket and does its own ``read``/``write`` syscalls.  Whenever it says
``WantReadError`` / ``WantWriteError`` we park on
``trio.lowlevel.wait_readable`` / ``wait_writable`` and retry the *same* call.
(Memory BIOs, with one socket syscall per 256 KiB, were measured too: the
extra copies and buffer churn made them about 18% more CPU per GiB.)

A relay uses one stream from two tasks at once (one reads, one writes), and
either call may need either event (a read may have to send a TLS 1.3
KeyUpdate; a write may have to read).  trio allows only one waiter per socket
per event.  A task that finds another already waiting for the event does not
wait on the socket: it waits for the other task's wait to end and then
*retries its own call*, because the other task may have consumed the very
readiness it needed (OpenSSL buffers what it read).

Scheduling: ``receive_some`` yields exactly once (while waiting, or at a
checkpoint if the data was already there, so a busy pump cannot starve other
tasks); ``send_all`` yields only when it has to wait.  trio's ``SocketStream``
yields after every call, which costs a relay two scheduler rounds per message.

States: OK -> BROKEN (any transport/TLS error; every later call raises
``BrokenResourceError``) and OK/BROKEN -> CLOSED (``aclose``/``abort``; later
calls raise ``ClosedResourceError``).  All OpenSSL and OS errors are
translated into trio exceptions in :meth:`TLSStream._translate`, nowhere else.

End of stream, exactly:

* ``send_eof()`` sends close_notify, then ``shutdown(SHUT_WR)``; reading goes
  on (TLS 1.2 and 1.3 both allow it).  Idempotent.
* ``receive_some()`` returns ``b""`` only after the peer's close_notify.  A
  TCP FIN without close_notify means someone cut the stream: that raises
  :class:`TruncatedError`, never a clean EOF, so a relay turns it into a reset.
* ECONNRESET raises :class:`ConnectionReset`.  Both are ``BrokenResourceError``.
* ``aclose()`` always closes the fd.  ``abort()`` closes it with
  ``SO_LINGER {1, 0}`` so the peer gets an RST.

Throughput: a read drains every record OpenSSL can produce without blocking
(several 16 KiB records) before returning, and a write hands OpenSSL a whole
256 KiB buffer (partial writes are off, see tlspolicy).
"""

from __future__ import annotations

import enum
import errno
import socket as _stdsocket
from collections.abc import Callable
from typing import Any, TypeVar

import trio
from OpenSSL import SSL

from . import kernel

T = TypeVar("T")

#: Upper bound of one ``receive_some()``; about a socket buffer's worth.
DEFAULT_RECEIVE_SIZE = 256 * 1024
#: OpenSSL hands out at most one record (16 KiB) per SSL_read.
_RECORD = 16 * 1024
#: Largest slice given to one SSL_write: big enough to fill the socket buffer
#: in one call, small enough to bound the memory OpenSSL holds in flight.
_SEND_CHUNK = 256 * 1024


#: The peer's TCP is gone: reset, or fully closed so that our write met an RST
#: (EPIPE) or a shutdown met a dead connection (ENOTCONN).
RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN})


class TruncatedError(trio.BrokenResourceError):
    """The peer's TCP stream ended without a TLS close_notify."""


class ConnectionReset(trio.BrokenResourceError):
    """The peer reset the TCP connection."""


class TLSAlertError(trio.BrokenResourceError):
    """The TLS layer failed (an alert, a protocol error, a failed handshake)."""


_WANT = (SSL.WantReadError, SSL.WantWriteError)
#: Why a drain stopped (None: it reached its limit).
Stop = SSL.Error | OSError | None


def _drain_public(conn: SSL.Connection, limit: int) -> tuple[bytes, Stop]:
    """Read records until ``limit`` bytes or until OpenSSL stops.

    Returns the bytes and the exception that stopped the loop (WantRead when
    the socket is drained, ZeroReturn at close_notify, an error), or None
    when ``limit`` was reached.
    """
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        try:
            data = conn.recv(min(limit - total, _RECORD))
        except (SSL.Error, OSError) as exc:
            return b"".join(chunks), exc
        chunks.append(data)
        total += len(data)
    return b"".join(chunks), None


# The fast path calls SSL_read straight into one shared buffer: one C call per
# 16 KiB record and a single copy out, where Connection.recv allocates, reads
# and copies for every record.  Sharing is safe because trio runs one task at a
# time and the bytes are copied out before anything awaits.  It uses
# pyOpenSSL's private cffi handles, so it falls back to the public API if they
# ever go away.
_lib: Any = getattr(SSL, "_lib", None)
_ffi: Any = getattr(SSL, "_ffi", None)
_FAST = _lib is not None and _ffi is not None and hasattr(SSL.Connection, "_raise_ssl_error")
_shared: Any = _ffi.new("char[]", DEFAULT_RECEIVE_SIZE) if _FAST else None


def _drain_fast(conn: SSL.Connection, limit: int) -> tuple[bytes, Stop]:
    """Same contract as :func:`_drain_public`."""
    ssl = conn._ssl
    total = 0
    stop: Stop = None
    while total < limit:
        n = _lib.SSL_read(ssl, _shared + total, limit - total)
        if n <= 0:
            try:
                conn._raise_ssl_error(ssl, n)
                stop = SSL.Error(f"SSL_read returned {n} without an error")
            except (SSL.Error, OSError) as exc:
                stop = exc
            break
        total += n
    return _ffi.buffer(_shared, total)[:], stop


drain = _drain_fast if _FAST else _drain_public


class _State(enum.Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class TLSStream(trio.abc.HalfCloseableStream):
    """One TLS connection over one trio TCP socket.  See the module docstring."""

    def __init__(self, sock: trio.socket.SocketType, conn: SSL.Connection) -> None:
        """``conn`` must be built on ``sock`` (``SSL.Connection(ctx, sock)``)."""
        self.socket = sock
        self.conn = conn
        self._fd = sock.fileno()
        self._state = _State.OK
        self._handshake_done = False
        self._eof_sent = False
        self._eof_received = False
        self._sending = False
        self._receiving = False
        #: An error met while draining, raised after the data drained with it.
        self._pending_error: BaseException | None = None
        #: Set while a task waits for the socket to be readable (resp. writable).
        self._read_waiter: trio.Event | None = None
        self._write_waiter: trio.Event | None = None
        #: Times this stream yielded to wait (see "Scheduling" above).
        self._waits = 0
        #: The last receive emptied the socket.
        self._drained = False

    # -- the one retry loop ------------------------------------------------

    async def _wait(self, want: Exception) -> None:
        """Wait for what OpenSSL asked for, or for the task already waiting for it."""
        self._waits += 1
        readable = isinstance(want, SSL.WantReadError)
        waiter = self._read_waiter if readable else self._write_waiter
        if waiter is not None:
            await waiter.wait()  # then the caller retries its own call
            return
        done = trio.Event()
        if readable:
            self._read_waiter = done
        else:
            self._write_waiter = done
        try:
            if readable:
                await trio.lowlevel.wait_readable(self._fd)
            else:
                await trio.lowlevel.wait_writable(self._fd)
        finally:
            if readable:
                self._read_waiter = None
            else:
                self._write_waiter = None
            done.set()

    async def _retry(self, fn: Callable[..., T], *args: object) -> T:
        self._check_usable()
        while True:
            try:
                return fn(*args)
            except _WANT as want:
                await self._wait(want)
            except SSL.ZeroReturnError:
                raise  # close_notify: the caller's business, not an error
            except (SSL.Error, OSError) as exc:
                raise self._translate(exc) from exc
            self._check_usable()

    def _check_usable(self) -> None:
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("TLS stream is closed")
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("TLS stream is broken")

    def _translate(self, exc: SSL.Error | OSError) -> trio.BrokenResourceError:
        """The one place OpenSSL/OS errors become trio errors."""
        self._state = _State.BROKEN
        if isinstance(exc, SSL.SysCallError):
            code = exc.args[0] if exc.args else None
            if code in RESET_ERRNOS:
                return ConnectionReset(f"connection reset by peer ({errno.errorcode[code]})")
            if code == -1 or code == 0:
                return TruncatedError("peer closed TCP without TLS close_notify")
            return trio.BrokenResourceError(f"socket error: {exc}")
        if isinstance(exc, OSError):
            if exc.errno in RESET_ERRNOS:
                return ConnectionReset(
                    f"connection reset by peer ({errno.errorcode[exc.errno or 0]})"
                )
            return trio.BrokenResourceError(f"socket error: {exc}")
        reason = _openssl_reason(exc)
        if "unexpected eof" in reason:
            return TruncatedError("peer closed TCP without TLS close_notify")
        return TLSAlertError(reason)

    # -- handshake -----------------------------------------------------------

    async def do_handshake(self) -> None:
        """Complete the handshake.  Failures raise ``TLSAlertError`` (or another
        ``BrokenResourceError``) whose ``__cause__`` is the OpenSSL exception."""
        if self._handshake_done:
            await trio.lowlevel.checkpoint()
            return
        await self._retry(self.conn.do_handshake)
        self._handshake_done = True

    # -- receiving -----------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this TLS stream")
        self._receiving = True
        try:
            if not self._handshake_done:
                await self.do_handshake()
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._pending_error is not None:
                error, self._pending_error = self._pending_error, None
                self._state = _State.BROKEN
                raise error
            self._check_usable()
            if self._eof_received:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return b""
            limit = min(max_bytes or DEFAULT_RECEIVE_SIZE, DEFAULT_RECEIVE_SIZE)
            waits = self._waits
            if self._drained:
                # The last drain emptied the socket (OpenSSL holds no whole
                # record): wait before asking, a read now would be EAGAIN.
                self._drained = False
                await self._wait(SSL.WantReadError())
            while True:
                data, stop = drain(self.conn, limit)
                if data:
                    self._drained = isinstance(stop, SSL.WantReadError)
                    if isinstance(stop, SSL.ZeroReturnError):
                        self._eof_received = True
                    elif stop is not None and not isinstance(stop, _WANT):
                        # Deliver the bytes before the error; raise it next call.
                        self._pending_error = self._translate(stop)
                        self._pending_error.__cause__ = stop
                        self._state = _State.OK
                    if self._waits == waits:  # data was already there: yield once anyway
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return data
                if isinstance(stop, _WANT):
                    await self._wait(stop)
                elif isinstance(stop, SSL.ZeroReturnError):
                    self._eof_received = True
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
                else:
                    assert stop is not None
                    raise self._translate(stop) from stop
                self._check_usable()
        finally:
            self._receiving = False

    # -- sending -------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        self._sending = True
        try:
            if not self._handshake_done:
                await self.do_handshake()
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_usable()
            if self._eof_sent:
                raise trio.ClosedResourceError("cannot send after send_eof()")
            with memoryview(data) as view:
                sent = 0
                while sent < len(view):
                    sent += await self._retry(self.conn.send, view[sent : sent + _SEND_CHUNK])
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        self._check_usable()
        await trio.lowlevel.wait_writable(self._fd)

    async def send_eof(self) -> None:
        """close_notify, then SHUT_WR.  Reading continues; idempotent."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_usable()
        if self._eof_sent:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._eof_sent = True
        self._sending = True
        try:
            await self._retry(self.conn.shutdown)
            try:
                self.socket.shutdown(_stdsocket.SHUT_WR)
            except OSError as exc:
                raise self._translate(exc) from exc
        finally:
            self._sending = False
        await trio.lowlevel.cancel_shielded_checkpoint()

    # -- closing -------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the fd.  If we never said close_notify and the stream is
        healthy, try to say it once without waiting (best effort)."""
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        if self._state is _State.OK and self._handshake_done and not self._eof_sent:
            self._eof_sent = True
            try:
                self.conn.shutdown()  # non-blocking: sent now or never
            except (SSL.Error, OSError):
                pass
        self._close()
        await trio.lowlevel.checkpoint()

    async def abort(self) -> None:
        """Close with an RST: the peer sees ECONNRESET, not an orderly end."""
        if self._state is not _State.CLOSED:
            try:
                kernel.set_abort_on_close(self.socket)
            except OSError:
                pass
            self._close()
        await trio.lowlevel.checkpoint()

    async def close_after_alert(self, grace: float = 1.0) -> None:
        """Close after a failed handshake so the peer reads our alert.

        OpenSSL has already written the alert; an RST (or closing with unread
        data, which also sends one) could overtake it and the peer would log
        "reset" instead of the reason.  So: FIN, drain briefly, close.
        """
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        try:
            self.socket.shutdown(_stdsocket.SHUT_WR)
            with trio.move_on_after(grace):
                while await self.socket.recv(65536):
                    pass
        except OSError:
            pass
        self._close()

    def _close(self) -> None:
        self._state = _State.CLOSED
        self.socket.close()


def _openssl_reason(exc: BaseException) -> str:
    """The reason strings OpenSSL put in an ``SSL.Error``, joined, lowercase."""
    parts: list[str] = []
    for arg in exc.args:
        if isinstance(arg, list):
            for item in arg:
                if isinstance(item, tuple) and item:
                    parts.append(str(item[-1]))
        elif arg:
            parts.append(str(arg))
    return "; ".join(parts).lower() or type(exc).__name__

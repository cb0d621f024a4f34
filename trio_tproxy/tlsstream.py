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

Scheduling, states (OK / BROKEN / CLOSED), the error types and ``abort()``
are those of every relay stream: see :mod:`trio_tproxy.streams`.  All OpenSSL
and OS errors become trio exceptions in :meth:`TLSStream._translate` (which
asks :func:`trio_tproxy.tlserrors.stream_error`), nowhere else.

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
(several 16 KiB records) before returning, through pyOpenSSL's private
bindings when they exist (see :mod:`trio_tproxy.ossl`), and a write hands
OpenSSL a whole 256 KiB buffer (partial writes are off, see tlspolicy).
"""

from __future__ import annotations

import socket as _stdsocket
from collections.abc import Callable
from typing import TypeVar

import trio
from OpenSSL import SSL

from . import ossl
from .streams import DEFAULT_RECEIVE_SIZE, State, Stream
from .tlserrors import stream_error

T = TypeVar("T")

#: Largest slice given to one SSL_write: big enough to fill the socket buffer
#: in one call, small enough to bound the memory OpenSSL holds in flight.
_SEND_CHUNK = 256 * 1024

_WANT = (SSL.WantReadError, SSL.WantWriteError)

#: Read every record available: the fast path when the private bindings exist.
drain = ossl.drain_for(ossl.PRIVATE)


class TLSStream(Stream):
    """One TLS connection over one trio TCP socket.  See the module docstring."""

    def __init__(self, sock: trio.socket.SocketType, conn: SSL.Connection) -> None:
        """``conn`` must be built on ``sock`` (``SSL.Connection(ctx, sock)``)."""
        super().__init__(sock, "TLS stream")
        self.conn = conn
        self._handshake_done = False
        self._eof_received = False
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

    def _error(self, exc: OSError) -> trio.BrokenResourceError:
        return self._translate(exc)

    def _translate(self, exc: SSL.Error | OSError) -> trio.BrokenResourceError:
        """The one place OpenSSL/OS errors become trio errors; the stream is BROKEN after."""
        self._state = State.BROKEN
        return stream_error(exc)

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
            raise self._busy("receiving")
        self._receiving = True
        try:
            if not self._handshake_done:
                await self.do_handshake()
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._pending_error is not None:
                error, self._pending_error = self._pending_error, None
                self._state = State.BROKEN
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
                        self._state = State.OK
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
            raise self._busy("sending")
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

    async def _say_eof(self) -> None:
        await self._retry(self.conn.shutdown)  # close_notify

    # -- closing -------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the fd.  If we never said close_notify and the stream is
        healthy, try to say it once without waiting (best effort)."""
        if self._state is State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        if self._state is State.OK and self._handshake_done and not self._eof_sent:
            self._eof_sent = True
            try:
                self.conn.shutdown()  # non-blocking: sent now or never
            except (SSL.Error, OSError):
                pass
        self._close()
        await trio.lowlevel.checkpoint()

    async def close_after_alert(self, grace: float = 1.0) -> None:
        """Close after a failed handshake so the peer reads our alert.

        OpenSSL has already written the alert; an RST (or closing with unread
        data, which also sends one) could overtake it and the peer would log
        "reset" instead of the reason.  So: FIN, drain briefly, close.
        """
        if self._state is State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        try:
            self.socket.shutdown(_stdsocket.SHUT_WR)
            with trio.move_on_after(grace):
                while await self.socket.recv(65536):
                    pass
        except OSError:
            pass
        finally:
            self._close()  # even when cancelled while draining

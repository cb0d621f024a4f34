"""A plain TCP socket as a trio ``HalfCloseableStream``, built for relaying.

trio's own ``SocketStream`` yields to the scheduler after every successful
send and receive, even when the kernel did not block; in a relay that is two
extra scheduler rounds (and epoll calls) per message and leg, which profiling
showed to be most of the cost of small messages.  Here, as in
:class:`~trio_tproxy.tlsstream.TLSStream`:

* ``receive_some`` yields exactly once: while waiting for data, or at a
  checkpoint if data was already there (so a busy pump cannot starve others);
* ``send_all`` yields only if the socket buffer is full.

Errors become ``BrokenResourceError`` (``ConnectionReset`` for a reset) at
this one edge; the socket is the caller's to close through ``aclose``.
"""

from __future__ import annotations

import os
import socket as _stdsocket

import trio

from .tlsstream import DEFAULT_RECEIVE_SIZE, RESET_ERRNOS, ConnectionReset

#: Receive staging buffer shared by every stream: filled and copied out within
#: one step of one task, with no await in between.
_IN = memoryview(bytearray(DEFAULT_RECEIVE_SIZE))


class PlainStream(trio.abc.HalfCloseableStream):
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.socket = sock
        self._fd = sock.fileno()
        self._eof_sent = False
        self._closed = False
        self._sending = False
        self._receiving = False
        self._drained = False

    def _broken(self, exc: OSError) -> trio.BrokenResourceError:
        if exc.errno in RESET_ERRNOS:
            return ConnectionReset(f"connection reset by peer ({exc.strerror})")
        return trio.BrokenResourceError(f"socket error: {exc}")

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_open()
            view = _IN[: min(max_bytes or DEFAULT_RECEIVE_SIZE, DEFAULT_RECEIVE_SIZE)]
            waited = False
            if self._drained:
                # The last read emptied the socket: a read now would most
                # likely fail with EAGAIN, so wait first (saves a syscall).
                await trio.lowlevel.wait_readable(self._fd)
                waited = True
            while True:
                try:
                    n = os.readv(self._fd, [view])
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self._fd)
                    waited = True
                except OSError as exc:
                    raise self._broken(exc) from exc
            self._drained = 0 < n < len(view)
            data = bytes(view[:n])
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_open()
            if self._eof_sent:
                raise trio.ClosedResourceError("cannot send after send_eof()")
            with memoryview(data) as view:
                while view:
                    try:
                        view = view[os.write(self._fd, view) :]
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(self._fd)
                    except OSError as exc:
                        raise self._broken(exc) from exc
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        await trio.lowlevel.wait_writable(self._fd)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        if self._eof_sent:
            return
        self._eof_sent = True
        try:
            self.socket.shutdown(_stdsocket.SHUT_WR)
        except OSError as exc:
            raise self._broken(exc) from exc

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self.socket.close()
        await trio.lowlevel.checkpoint()

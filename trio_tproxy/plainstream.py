"""A plain TCP socket as a relay :class:`~trio_tproxy.streams.Stream`.

States, errors and scheduling are the shared ones (see :mod:`.streams`).
What is particular to plain TCP:

* Reads and writes are ``os.readv``/``os.write`` on the fd: no allocation but
  the ``bytes`` handed out, and one shared staging buffer (filled and copied
  out within one step of one task, with no await in between).
* After a read that left the socket drained, the next read waits first: a read
  now would almost surely be ``EAGAIN`` (saves a syscall per message).
* A reset is reported once by the kernel: if a send already collected it, the
  next read returns 0 as if the peer had sent FIN.  At EOF, while we have not
  shut our own write side (after that, the peer's FIN also leaves the socket
  CLOSE), ``kernel.was_reset`` tells the two apart and a hidden reset raises
  :class:`~trio_tproxy.streams.ConnectionReset`.  One ``getsockopt`` per
  connection, never per message.
"""

from __future__ import annotations

import os

import trio

from . import kernel
from .streams import (
    DEFAULT_RECEIVE_SIZE,
    RESET_ERRNOS,
    ConnectionReset,
    State,
    Stream,
    reset_error,
)

_IN = memoryview(bytearray(DEFAULT_RECEIVE_SIZE))


class PlainStream(Stream):
    def __init__(self, sock: trio.socket.SocketType) -> None:
        super().__init__(sock, "TCP stream")
        self._drained = False

    def _error(self, exc: OSError) -> trio.BrokenResourceError:
        """The one place OS errors become trio errors; the stream is BROKEN after."""
        self._state = State.BROKEN
        if exc.errno in RESET_ERRNOS:
            return reset_error(exc.errno)
        return trio.BrokenResourceError(f"socket error: {exc}")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise self._busy("receiving")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_usable()
            view = _IN[: min(max_bytes or DEFAULT_RECEIVE_SIZE, DEFAULT_RECEIVE_SIZE)]
            waited = False
            if self._drained:
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
                    raise self._error(exc) from exc
            if n == 0 and not self._eof_sent and kernel.was_reset(self.socket):
                self._state = State.BROKEN
                raise ConnectionReset("connection reset by peer (seen as EOF)")
            self._drained = 0 < n < len(view)
            data = bytes(view[:n])
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise self._busy("sending")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_usable()
            if self._eof_sent:
                raise trio.ClosedResourceError("cannot send after send_eof()")
            with memoryview(data) as view:
                while view:
                    try:
                        view = view[os.write(self._fd, view) :]
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(self._fd)
                    except OSError as exc:
                        raise self._error(exc) from exc
        finally:
            self._sending = False

    async def aclose(self) -> None:
        if self._state is not State.CLOSED:
            self._close()
        await trio.lowlevel.checkpoint()

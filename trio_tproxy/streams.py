"""What the two relay streams share: states, errors, the conflict guard, abort.

:class:`~trio_tproxy.plainstream.PlainStream` (a TCP socket) and
:class:`~trio_tproxy.tlsstream.TLSStream` (pyOpenSSL on a TCP socket) are both
:class:`Stream`: a trio ``HalfCloseableStream`` built for relaying, that owns
one socket and can be closed two ways.

States (the same for both)::

    OK --(a transport or TLS error)--> BROKEN --+
     |                                          +--(aclose / abort)--> CLOSED
     +------------------------------------------+

* In BROKEN every later call raises ``trio.BrokenResourceError``: the syscall
  that failed is never retried (a reset is reported once by the kernel, a retry
  could read it as EOF).
* In CLOSED every later call raises ``trio.ClosedResourceError``; ``aclose``
  and ``abort`` are idempotent and always close the fd.
* ``abort()`` closes with ``SO_LINGER {1, 0}``: the peer reads a reset, not an
  orderly end.  It never waits on the network.

Errors, translated by each stream at its one edge (``raise ... from exc``):

* :class:`ConnectionReset`: the peer reset TCP, including a reset that the
  kernel reported as EOF because a send had already collected it
  (``PlainStream`` checks ``kernel.was_reset`` at EOF for that).
* :class:`TruncatedError`: TLS only, TCP FIN without close_notify.
* :class:`TLSAlertError`: TLS only, an alert or protocol error.

All three are ``BrokenResourceError``, so callers that only care that the leg
failed catch that, and the relay classifies the subclass for its log line.

One task at a time may receive and one may send (a relay has one reader and
one writer per leg); a second one gets ``trio.BusyResourceError``.

Scheduling (both streams): ``receive_some`` yields exactly once (while
waiting, or at a checkpoint if data was already there, so a busy pump cannot
starve other tasks); ``send_all`` yields only if it has to wait.  trio's
``SocketStream`` yields after every call, which costs a relay two scheduler
rounds per message.
"""

from __future__ import annotations

import enum
import errno
import socket

import trio

from . import kernel

#: Upper bound of one ``receive_some()``; about a socket buffer's worth.
DEFAULT_RECEIVE_SIZE = 256 * 1024

#: The peer's TCP is gone: reset, or fully closed so that our write met an RST
#: (EPIPE) or a shutdown met a dead connection (ENOTCONN).
RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN})


class ConnectionReset(trio.BrokenResourceError):
    """The peer reset the TCP connection."""


class TruncatedError(trio.BrokenResourceError):
    """The peer's TCP stream ended without a TLS close_notify."""


class TLSAlertError(trio.BrokenResourceError):
    """The TLS layer failed (an alert, a protocol error, a failed handshake)."""


def reset_error(code: int | None) -> ConnectionReset:
    return ConnectionReset(f"connection reset by peer ({errno.errorcode.get(code or 0, code)})")


class State(enum.Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class Stream(trio.abc.HalfCloseableStream):
    """The base of both relay streams: one socket, one state, two guards."""

    def __init__(self, sock: trio.socket.SocketType, what: str) -> None:
        self.socket = sock
        self._fd = sock.fileno()
        self._state = State.OK
        self._eof_sent = False
        self._what = what
        # The conflict guard: one task at a time receives, one sends.  Each
        # public method tests and sets its flag inline, then clears it in a
        # ``finally`` (a context manager would cost ~0.3 us per call, several
        # times per relayed message).
        self._receiving = False
        self._sending = False

    @property
    def state(self) -> State:
        return self._state

    def _busy(self, doing: str) -> trio.BusyResourceError:
        return trio.BusyResourceError(f"another task is {doing} on this {self._what}")

    def _check_usable(self) -> None:
        if self._state is not State.OK:
            if self._state is State.CLOSED:
                raise trio.ClosedResourceError(f"{self._what} is closed")
            raise trio.BrokenResourceError(f"{self._what} is broken")

    async def wait_send_all_might_not_block(self) -> None:
        self._check_usable()
        await trio.lowlevel.wait_writable(self._fd)

    async def send_eof(self) -> None:
        """Say end of stream (:meth:`_say_eof`), then ``SHUT_WR``; reading goes on.

        Idempotent; a second call only checkpoints."""
        if self._sending:
            raise self._busy("sending")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_usable()
            if not self._eof_sent:
                self._eof_sent = True
                await self._say_eof()
                try:
                    self.socket.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    raise self._error(exc) from exc
        finally:
            self._sending = False
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def _say_eof(self) -> None:
        """What the protocol says before the FIN (TLS: close_notify); TCP: nothing."""

    def _error(self, exc: OSError) -> trio.BrokenResourceError:
        """Translate a socket error at this stream's one edge (and mark it BROKEN)."""
        raise NotImplementedError

    async def abort(self) -> None:
        """Close with an RST: the peer sees ECONNRESET, not an orderly end."""
        if self._state is not State.CLOSED:
            try:
                kernel.set_abort_on_close(self.socket)
            except OSError:
                pass  # already dead: closing is all that is left
            self._close()
        await trio.lowlevel.checkpoint()

    def _close(self) -> None:
        self._state = State.CLOSED
        self.socket.close()

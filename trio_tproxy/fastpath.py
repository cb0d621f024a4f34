"""The compiled data path of an established connection, and when it is off.

General theory of operation
---------------------------
The relay's Python loop costs a scheduler pass, a ``receive_some`` and a
``send_all`` per message.  For the two directions of a sidecar connection
(plain TCP -> TLS and TLS -> plain TCP) this module runs the loop in C
instead (``_fastpath.c``): one call reads, encrypts or decrypts, and writes
until something would block, and returns what to wait for.  Python then runs
once per wake-up, not once per record: it waits on the fd the C code names,
with the streams' own waiting rules (:meth:`TLSStream._wait` shares the TLS
socket between the two directions), and calls again.

Everything that is not data goes back to the streams, so the semantics are
theirs, not a second copy: :func:`forward` returns at the source's end
(the relay's ``receive_some`` then reads the EOF again, and a plain stream
still tells a reset hidden behind a FIN), and failures are raised through the
streams' translation of the same exceptions (:func:`.ossl.call_error` makes
pyOpenSSL translate the compiled call's result).  Bytes read and not yet
written are kept per direction (copied out of the shared scratch buffer only
when a write has to wait), so a blocked peer costs its own bytes, an idle
connection nothing.

The same OpenSSL.  ``_fastpath.c`` links no OpenSSL: it gets ``SSL_read``,
``SSL_write`` and ``SSL_get_error`` as pointers from pyOpenSSL's bindings
(:func:`.ossl.address`).

When it is off (:data:`WHY_OFF` says why): no C compiler at install time, no
private bindings in this pyOpenSSL, a pair of legs it does not serve (plain to
plain), or ``TRIO_TPROXY_FASTPATH=off`` in the environment.  Then
:func:`forward` returns at once and the relay's Python loop does everything;
the relay tests run both ways (``tests/test_relay.py``).
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
struct tt_ossl { tt_ssl_io read; tt_ssl_io write; tt_ssl_get_error get_error; };
struct tt_pipe {
    char *scratch; int cap; char *pend; int plen; long long moved;
    int after_flush; int ret; int err;
};
int tt_plain_to_tls(const struct tt_ossl *o, int fd, void *ssl, struct tt_pipe *p, long budget);
int tt_tls_to_plain(const struct tt_ossl *o, void *ssl, int fd, struct tt_pipe *p, long budget);
"""

# The codes of _fastpath.c
SRC_READABLE, SRC_WRITABLE, DST_READABLE, DST_WRITABLE, YIELD, SRC_EOF, SRC_FAILED, DST_FAILED = (
    range(1, 9)
)

#: Bytes one call may move before it lets other tasks run (about 1 ms of bulk).
BUDGET = 1 << 20

_WANT_READ = SSL.WantReadError()
_WANT_WRITE = SSL.WantWriteError()


def _load() -> tuple[Any, Any, Any, str]:
    """(ffi, lib, the OpenSSL function table, "") or (None, None, None, why not)."""
    if os.environ.get("TRIO_TPROXY_FASTPATH", "").lower() in ("0", "off", "no", "false"):
        return None, None, None, "TRIO_TPROXY_FASTPATH=off"
    spec = find_spec("trio_tproxy._fastpath")
    if spec is None or not spec.origin:
        return None, None, None, "not built (no C compiler when trio-tproxy was installed)"
    functions = {name: ossl.address(name) for name in ("SSL_read", "SSL_write", "SSL_get_error")}
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
    return ffi, lib, table, ""


_ffi, _lib, _OSSL, WHY_OFF = _load()
#: The compiled path is there (tests switch it off with monkeypatch).
ENABLED = not WHY_OFF
_scratch: Any = _ffi.new("char[]", DEFAULT_RECEIVE_SIZE) if ENABLED else None


def describe() -> str:
    """One phrase for the start-up log line."""
    return "compiled" if ENABLED else f"Python ({WHY_OFF})"


class _Pipe:
    """One direction's C state: the bytes pending and the counters."""

    __slots__ = ("c", "_kept")

    def __init__(self) -> None:
        self.c = _ffi.new("struct tt_pipe *")
        self.c.scratch = _scratch
        self.c.cap = DEFAULT_RECEIVE_SIZE
        self._kept: Any = None

    def keep_pending(self) -> None:
        """Move pending bytes out of the shared scratch buffer before anyone else uses it."""
        c = self.c
        if _scratch <= c.pend < _scratch + DEFAULT_RECEIVE_SIZE:
            self._kept = _ffi.new("char[]", c.plen)
            _ffi.memmove(self._kept, c.pend, c.plen)
            c.pend = self._kept


async def forward(src: Stream, dst: Stream, moved: Callable[[int], None]) -> None:
    """Carry ``src`` to ``dst`` in compiled code until ``src`` ends.

    Returns at once when there is no fast path for this pair (or it is off), and
    at the source's clean end (the caller's next ``receive_some`` on ``src``
    reads it).  ``moved(n)`` is called with the bytes written since the last
    call.  Raises what ``receive_some``/``send_all`` would raise.
    """
    if not ENABLED:
        return
    if type(src) is PlainStream and type(dst) is TLSStream:
        tls, plain, outbound = dst, src, True
    elif type(src) is TLSStream and type(dst) is PlainStream:
        tls, plain, outbound = src, dst, False
    else:
        return
    if not tls._handshake_done:
        await tls.do_handshake()
    if src._receiving:
        raise src._busy("receiving")
    if dst._sending:
        raise dst._busy("sending")
    src._receiving = dst._sending = True
    try:
        await _run(tls, plain, outbound, moved)
    finally:
        src._receiving = dst._sending = False


async def _run(
    tls: TLSStream, plain: PlainStream, outbound: bool, moved: Callable[[int], None]
) -> None:
    pipe = _Pipe()
    c = pipe.c
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
        if c.plen:
            pipe.keep_pending()
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
            return
        else:
            failed_tls = (code == DST_FAILED) == outbound
            if failed_tls:
                exc = ossl.call_error(tls.conn, c.ret, c.err)
                raise tls._translate(exc) from exc
            error = OSError(c.err, os.strerror(c.err))
            raise plain._error(error) from error

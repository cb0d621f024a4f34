"""Every use of pyOpenSSL's private cffi bindings (``SSL._lib``/``SSL._ffi``), in one place.

pyOpenSSL has no public name for a few things the data path wants: reading
records straight into one shared buffer, setting the key-exchange groups,
asking whether a session was resumed, and the text of an X.509 verify error.
Its private bindings have them.  They may disappear in any release, so:

**One fallback policy.**  The handles are looked up once, at import, with
``getattr``; importing this module (and everything above it) never fails when
they are gone.  Then each function falls back to the public API where one
exists (the drain loop, the verify error's number), and otherwise says
"unknown" (``session_reused`` returns None) or, where silently doing less
would change what the operator asked for (``set_groups``), refuses with a
``ConfigError``.  :data:`PRIVATE` says which mode we are in; tests monkeypatch
it (and the handles) to run the fallbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from OpenSSL import SSL

from .config import ConfigError
from .streams import DEFAULT_RECEIVE_SIZE

_lib: Any = getattr(SSL, "_lib", None)
_ffi: Any = getattr(SSL, "_ffi", None)
#: The private bindings are there and look like what we were written against.
PRIVATE = _lib is not None and _ffi is not None and hasattr(SSL.Connection, "_raise_ssl_error")

#: OpenSSL hands out at most one record (16 KiB) per SSL_read.
RECORD = 16 * 1024
#: SSL_MODE_ENABLE_PARTIAL_WRITE, a stable OpenSSL constant pyOpenSSL does not export.
MODE_ENABLE_PARTIAL_WRITE = 0x1

# _NO_CYCLE: the exception that stops a drain is returned, not raised, nearly
# once per message (WantRead). With its traceback it would hold this frame,
# whose ``stop`` holds the exception again, and through ``f_back`` the
# caller's frame with the bytes it received: a reference cycle per message
# that only the cyclic GC frees, which the sidecar runs rarely (cli.cmd_run).
# Measured with tracemalloc after a benchmark: 6-8 MB of received bytes per
# sidecar still alive once every connection had ended. The traceback only
# showed pyOpenSSL's _raise_ssl_error, so it is dropped.

#: Why a drain stopped (None: it reached its limit).
Stop = SSL.Error | OSError | None


def drain_public(conn: SSL.Connection, limit: int) -> tuple[bytes, Stop]:
    """Read records until ``limit`` bytes or until OpenSSL stops.

    Returns the bytes and the exception that stopped the loop (WantRead when
    the socket is drained, ZeroReturn at close_notify, an error), or None
    when ``limit`` was reached.
    """
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        try:
            data = conn.recv(min(limit - total, RECORD))
        except (SSL.Error, OSError) as exc:
            return b"".join(chunks), exc.with_traceback(None)  # no cycle: see _NO_CYCLE
        chunks.append(data)
        total += len(data)
    return b"".join(chunks), None


# The fast path calls SSL_read straight into one shared buffer: one C call per
# 16 KiB record and a single copy out, where Connection.recv allocates, reads
# and copies for every record.  Sharing is safe because trio runs one task at a
# time and the bytes are copied out before anything awaits.
_shared: Any = _ffi.new("char[]", DEFAULT_RECEIVE_SIZE) if PRIVATE else None


def drain_fast(conn: SSL.Connection, limit: int) -> tuple[bytes, Stop]:
    """Same contract as :func:`drain_public`."""
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
                stop = exc.with_traceback(None)  # no cycle: see _NO_CYCLE
            break
        total += n
    return _ffi.buffer(_shared, total)[:], stop


Drain = Callable[[SSL.Connection, int], tuple[bytes, Stop]]


def drain_for(private: bool) -> Drain:
    return drain_fast if private else drain_public


def set_groups(ctx: SSL.Context, groups: str) -> None:
    """Key-exchange groups, e.g. ``"X25519:P-256"``; ConfigError if OpenSSL rejects them."""
    if not PRIVATE:
        # Ignoring the flag would quietly keep groups the operator chose to drop.
        raise ConfigError(f"--tls-groups {groups!r}: this pyOpenSSL has no binding to set groups")
    if _lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode()) != 1:
        raise ConfigError(f"invalid --tls-groups {groups!r}: OpenSSL rejected it")


def clear_partial_write(ctx: SSL.Context) -> None:
    """Public since pyOpenSSL 24: no private binding needed, kept here with its kin."""
    ctx.clear_mode(MODE_ENABLE_PARTIAL_WRITE)


def session_reused(conn: SSL.Connection) -> bool | None:
    """Whether the handshake resumed a session; None when we cannot ask."""
    if not PRIVATE:
        return None
    return bool(_lib.SSL_session_reused(conn._ssl))


def verify_error_text(code: int) -> str:
    """OpenSSL's text for an X509_V_ERR_* code (the number alone without the bindings)."""
    if PRIVATE:
        try:
            text = _ffi.string(_lib.X509_verify_cert_error_string(code))
            return str(text.decode("ascii", "replace"))
        except (AttributeError, TypeError):
            pass
    return f"X509 error {code}"


# --- for the compiled data path (fastpath.py) -----------------------------------------


def address(name: str) -> int | None:
    """The address of OpenSSL function ``name`` in pyOpenSSL's own OpenSSL; None without it.

    cffi casts an API-mode function to a plain function pointer, so compiled code
    can call the very OpenSSL that owns our ``SSL*`` (cryptography's, never the
    system's libssl).
    """
    if not PRIVATE:
        return None
    try:
        return int(_ffi.cast("uintptr_t", getattr(_lib, name)))
    except (AttributeError, TypeError):
        return None


def ssl_address(conn: SSL.Connection) -> int:
    """The ``SSL*`` under ``conn`` (only called when :func:`address` gave the functions)."""
    return int(_ffi.cast("uintptr_t", conn._ssl))


def clear_errors() -> None:
    """Empty this thread's OpenSSL error queue (before putting a failure's back)."""
    if PRIVATE:
        _lib.ERR_clear_error()


def call_error(conn: SSL.Connection, ret: int, errno: int) -> SSL.Error | OSError:
    """The exception pyOpenSSL raises for an SSL_read/SSL_write that returned ``ret``.

    The call was made by compiled code, which left OpenSSL's error queue as it was
    and saved ``errno``; handing that errno to cffi first makes pyOpenSSL's own
    translation see exactly what it would have seen.
    """
    _ffi.errno = errno
    try:
        conn._raise_ssl_error(conn._ssl, ret)
    except (SSL.Error, OSError) as exc:
        return exc.with_traceback(None)  # no cycle: see _NO_CYCLE
    return SSL.Error(f"OpenSSL call returned {ret} without an error")

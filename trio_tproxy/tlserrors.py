"""OpenSSL errors, read in one place: into stream errors, and into reasons for a log line.

pyOpenSSL raises ``SSL.Error`` whose ``args[0]`` is OpenSSL's error queue,
``[(library, function, reason), ...]``; ``SSL.SysCallError(errno, text)`` for
the socket under it (``-1, 'Unexpected EOF'`` for a FIN without
close_notify); ``ZeroReturnError`` for close_notify.  Two readers use them:

* :func:`stream_error` - the TLS stream's one translation into trio errors
  (:class:`~trio_tproxy.streams.ConnectionReset`, ``TruncatedError``,
  ``TLSAlertError``), so the relay can classify an outcome by type.
* :func:`explain` - a short human reason for a refused handshake ("unknown CA",
  "plaintext HTTP on TLS port", "peer alert: ..."), for the refusal line.

OpenSSL's own error for a refused chain is just "certificate verify failed";
the verify callback (see :mod:`.tlspolicy`) keeps the first X.509 error as a
:class:`VerifyError`, which :func:`explain` prefers.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

import trio
from OpenSSL import SSL

from .identity import IdentityError
from .streams import RESET_ERRNOS, TLSAlertError, TruncatedError, reset_error


def reasons(exc: BaseException) -> list[str]:
    """The reason strings OpenSSL queued in an ``SSL.Error``, lowercase, in order."""
    queue = exc.args[0] if exc.args else None
    if isinstance(queue, list):
        return [str(item[-1]).lower() for item in queue if isinstance(item, tuple) and item]
    return [str(arg).lower() for arg in exc.args if arg and not isinstance(arg, list)]


# --- for the stream -------------------------------------------------------------------


def stream_error(exc: SSL.Error | OSError) -> trio.BrokenResourceError:
    """The one place OpenSSL/OS errors under a TLS stream become trio errors."""
    if isinstance(exc, SSL.SysCallError):
        code = exc.args[0] if exc.args else None
        if code in RESET_ERRNOS:
            return reset_error(code)
        if code == -1 or code == 0:
            return TruncatedError("peer closed TCP without TLS close_notify")
        return trio.BrokenResourceError(f"socket error: {exc}")
    if isinstance(exc, OSError):
        if exc.errno in RESET_ERRNOS:
            return reset_error(exc.errno)
        return trio.BrokenResourceError(f"socket error: {exc}")
    found = reasons(exc)
    if any("unexpected eof" in reason for reason in found):
        return TruncatedError("peer closed TCP without TLS close_notify")
    return TLSAlertError("; ".join(found) or type(exc).__name__)


# --- for the log line -------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyError:
    """The first X.509 error OpenSSL met while checking the peer's chain."""

    code: int
    text: str
    #: 0 is the peer's own certificate, 1 its issuer, ...
    depth: int

    @property
    def reason(self) -> str:
        return _VERIFY_REASONS.get(self.code, f"certificate verify failed: {self.text}")


# X509_V_ERR_* codes (stable across OpenSSL versions) -> the reasons we log.
_VERIFY_REASONS = {
    2: "unknown CA",  # unable to get issuer certificate
    9: "certificate not yet valid",
    10: "certificate expired",
    18: "unknown CA",  # self-signed certificate
    19: "unknown CA",  # self-signed certificate in chain
    20: "unknown CA",  # unable to get local issuer certificate
    21: "unknown CA",  # unable to verify the first certificate
}

_ALERT = re.compile(r"^(?:sslv3|tlsv1|tlsv13|tls) alert ")
_REASONS = {
    "peer did not return a certificate": "no client certificate",
    "http request": "plaintext HTTP on TLS port",
    "https proxy request": "plaintext HTTP on TLS port",
    "wrong version number": "not TLS",
    "packet length too long": "not TLS",
    "unknown protocol": "not TLS",
    "unsupported protocol": "TLS version not supported",
    "no protocols available": "TLS version not supported",
    "unsupported version": "TLS version not supported",
    "version too low": "TLS version not supported",
}


def explain(exc: BaseException, verify_error: VerifyError | None = None) -> str:
    """A short reason for a failed handshake or identity check, for one log line."""
    exc = _innermost(exc)
    if isinstance(exc, IdentityError):
        return str(exc)
    if verify_error is not None:
        return verify_error.reason
    if isinstance(exc, SSL.ZeroReturnError):
        return "peer closed during handshake"
    if isinstance(exc, SSL.SysCallError):
        return _explain_syscall(exc)
    if isinstance(exc, SSL.Error):
        return _explain_openssl(exc)
    if isinstance(exc, OSError):
        return _explain_errno(exc.errno, exc.strerror or str(exc))
    return str(exc) or type(exc).__name__


def _innermost(exc: BaseException) -> BaseException:
    # The TLS stream re-raises OpenSSL/OS errors as trio errors "from" them.
    seen = 0
    while (
        not isinstance(exc, SSL.Error | OSError | IdentityError)
        and exc.__cause__ is not None
        and seen < 10
    ):
        exc, seen = exc.__cause__, seen + 1
    return exc


def _explain_syscall(exc: SSL.SysCallError) -> str:
    code, text = (exc.args + (None, None))[:2]
    if code == -1:  # EOF without close_notify ('Unexpected EOF')
        return "peer closed during handshake"
    return _explain_errno(code if isinstance(code, int) else None, str(text))


def _explain_errno(code: int | None, text: str) -> str:
    if code == errno.ECONNRESET:
        return "connection reset during handshake"
    if code == errno.EPIPE:
        return "peer closed during handshake"
    return text


def _explain_openssl(exc: SSL.Error) -> str:
    found = reasons(exc)
    for reason in found:
        if reason in _REASONS:
            return _REASONS[reason]
        if _ALERT.match(reason):
            return f"peer alert: {reason}"
    return found[0] if found else str(exc) or "TLS error"

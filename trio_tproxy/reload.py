"""Credential rotation: notice new files, check them, switch for new connections.

How files change under us.  Kubernetes writes Secrets, projected volumes
(podCertificate, clusterTrustBundle) and csi-driver-spiffe volumes the same
way: the new files go into a fresh hidden directory, then one ``rename()``
swaps the ``..data`` symlink to it; ``tls.crt`` is a symlink to
``..data/tls.crt``.  So the name we were given never changes, only what it
resolves to.  We therefore watch the *resolved* files: a ``stat()`` (which
follows symlinks) of each path, keeping ``(st_dev, st_ino, st_mtime_ns,
st_size)``.  A symlink swap changes the inode; an editor or ``cp`` over the
file changes mtime or size.  Three ``stat()`` calls every ``--credential-poll``
seconds cost nothing next to a handshake, need no inotify plumbing, and work
on every filesystem (inotify on the directory would save at most a poll
interval of latency; SIGHUP gives an immediate reload when that matters).

States: the watcher holds the credentials in use and the fingerprint of the
files it last *tried* (good or bad).  On a change (or SIGHUP, which always
reloads) it fingerprints first, then reads: if the read straddles a second
swap, the next poll sees another fingerprint and tries again, so a torn read
heals by itself.  A file that fails the start-up checks
(:func:`~.credentials.load_credentials`) is one error line and changes
nothing: the old credentials stay until good files appear.  Good files
switch the sidecar's contexts (:meth:`~.proxy.Sidecar.use_credentials`): new
connections use them, live ones keep theirs, the resumption cache is emptied.

Expiry: each tick also compares the time with the certificate's lifetime; a
certificate with less than ``expiry_warning_fraction`` of its life left is
one warning (once per certificate), an expired one an error (once): the
rotation that should have replaced it did not happen.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import trio
from cryptography import x509

from .config import ConfigError, TLSFiles
from .credentials import Credentials, load_credentials

__all__ = ["CredentialWatcher", "Watched", "fingerprint"]

log = logging.getLogger("trio_tproxy")

#: Per path: (device, inode, mtime in ns, size) of what it resolves to, or None.
Fingerprint = tuple[tuple[int, int, int, int] | None, ...]


def fingerprint(paths: tuple[Path, ...]) -> Fingerprint:
    """What each path resolves to now (None: missing or unreadable)."""
    out: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)  # follows the ..data symlink chain
        except OSError:
            out.append(None)
        else:
            out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


class Watched(Protocol):
    """What the watcher needs of what it loads (Credentials, the webhook's serving cert)."""

    @property
    def cert(self) -> x509.Certificate: ...

    @property
    def not_after(self) -> dt.datetime: ...

    def describe(self) -> str: ...


C = TypeVar("C", bound=Watched)


def warning_at(creds: Watched, fraction: float) -> dt.datetime:
    """When less than ``fraction`` of the certificate's lifetime is left."""
    lifetime = creds.not_after - creds.cert.not_valid_before_utc
    return creds.not_after - lifetime * fraction


class CredentialWatcher(Generic[C]):
    """Polls ``paths`` and SIGHUP requests; ``load()``s and ``apply``s good new credentials.

    ``load`` runs in a thread and raises on bad files; ``apply`` must raise (and
    change nothing) if it cannot use them; it runs on the event loop, between
    two connections' steps, so the switch is atomic."""

    def __init__(
        self,
        paths: tuple[Path, ...],
        load: Callable[[], C],
        current: C,
        apply: Callable[[C], None],
        *,
        poll: float = 2.0,
        expiry_warning_fraction: float = 1 / 3,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.paths = paths
        self.load = load
        self.current = current
        self.apply = apply
        self.poll = poll
        self.fraction = expiry_warning_fraction
        self.clock = clock
        self._seen = fingerprint(paths)
        self._wakeup = trio.Event()
        self._forced = False
        self._warned: set[tuple[int, str]] = set()
        #: Counters for tests and metrics: reloads that switched, and that failed.
        self.reloads = 0
        self.failures = 0

    @classmethod
    def for_files(
        cls, files: TLSFiles, current: Credentials, apply: Callable[[Credentials], None], **kw: Any
    ) -> CredentialWatcher[Credentials]:
        """The sidecar's: ``files`` checked by :func:`~.credentials.load_credentials`."""
        return CredentialWatcher(
            files.paths, functools.partial(load_credentials, files), current, apply, **kw
        )

    def request(self) -> None:
        """Reload now, changed or not (SIGHUP).  Safe to call from any trio task."""
        self._forced = True
        self._wakeup.set()

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self.check_expiry()
            with trio.move_on_after(self.poll):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            forced, self._forced = self._forced, False
            await self.check(reason="SIGHUP" if forced else None)

    async def check(self, *, reason: str | None = None) -> bool:
        """Reload if the files changed (or ``reason`` forces it); True if switched."""
        seen = fingerprint(self.paths)
        if reason is None:
            if seen == self._seen:
                return False
            reason = "files changed"
        self._seen = seen
        # Parsing and the signature check take a few ms: off the event loop.
        try:
            new = await trio.to_thread.run_sync(self.load)
            self.apply(new)
        except Exception as exc:  # noqa: BLE001 - any refusal (ConfigError, SSL.Error) keeps the old
            self.failures += 1
            what = " ".join(str(exc).split())
            if not isinstance(exc, ConfigError):
                what = f"{type(exc).__name__}: {what}"
            log.error(
                "credentials not reloaded (%s): %s; keeping %s",
                reason,
                what,
                self.current.describe(),
            )
            return False
        old, self.current = self.current, new
        self.reloads += 1
        log.info(
            "credentials reloaded (%s): now %s (was serial %x)",
            reason,
            new.describe(),
            old.cert.serial_number,
        )
        self.check_expiry()
        return True

    def check_expiry(self) -> None:
        """One warning when the certificate nears its end, one error once it has expired."""
        creds, now = self.current, self.clock()
        serial = creds.cert.serial_number
        if now >= creds.not_after:
            if (serial, "expired") not in self._warned:
                self._warned.add((serial, "expired"))
                log.error(
                    "our certificate has EXPIRED (%s): peers refuse it; rotation did not "
                    "replace %s",
                    creds.describe(),
                    self.paths[0],
                )
        elif now >= warning_at(creds, self.fraction):
            if (serial, "soon") not in self._warned:
                self._warned.add((serial, "soon"))
                left = creds.not_after - now
                log.warning(
                    "our certificate expires in %s (%s): expected a rotation of %s by now",
                    _fmt_delta(left),
                    creds.describe(),
                    self.paths[0],
                )


def _fmt_delta(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60}m"
    return f"{seconds // 60}m{seconds % 60}s"

"""Giving memory back: glibc's malloc settings and trimming when idle.

Why this exists: a sidecar's heap grows under load (256 KiB receive results,
handshake state, session tickets) and glibc keeps what was freed for reuse.
Measured in the benchmarks: ~60 MB RSS per idle sidecar at start, ~140 MB
after the bulk, connection-rate and ping-pong tests, never returned. Python's
own small-object allocator gives its 256 KiB arenas back once they are empty;
what stays is glibc's:

* **free pages inside the heap.** ``free()`` only shrinks the heap from its
  top, and only above ``M_TRIM_THRESHOLD``, which glibc raises on its own
  (up to 64 MiB) each time a large block that had been ``mmap``-ed is freed;
  the next big blocks then come from the heap and stay there.
  ``malloc_trim(0)`` returns every free page of every arena to the kernel
  (``MADV_DONTNEED``), wherever it is. It walks the arenas, so it is called
  when the sidecar has no connection (:func:`trim_when_idle`), never per
  message, and after a flood of handshakes by whoever saw it end (:func:`trim`).
* **arenas.** glibc gives threads their own arenas (up to 8 per core), each
  with its own free lists that the others cannot reuse. The sidecar's threads
  (``trio.to_thread``: rule installs, DNS) are rare and short, so two arenas
  are plenty. ``M_ARENA_MAX`` must be set before the first thread allocates:
  :func:`limit_arenas` is called first thing in ``trio-tproxy run``; the
  ``MALLOC_ARENA_MAX`` environment variable, if set, wins.

Both are glibc's: elsewhere (musl, macOS) each function is a harmless no-op
that says so by returning False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable
from typing import Any

import trio

log = logging.getLogger(__name__)

#: mallopt() parameter number of M_ARENA_MAX in glibc's malloc.h (stable ABI).
M_ARENA_MAX = -8
#: Arenas for the whole process: the trio thread plus the occasional worker thread.
ARENAS = 2
#: Seconds between looks at the connection count while waiting for a quiet moment.
TRIM_CHECK_INTERVAL = 2.0


def _load_libc() -> Any:
    """glibc if this process runs on it (with mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


_libc = _load_libc()


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's arenas (before any thread starts); False when not applied."""
    if _libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(_libc.mallopt(M_ARENA_MAX, arenas))


def trim() -> bool:
    """Return the free pages of every glibc arena to the kernel.

    Cost: a walk over the free lists, milliseconds for a heap of a few hundred
    MB; call it when idle or once after a burst, never per message. True when
    memory was released.
    """
    if _libc is None:
        return False
    return bool(_libc.malloc_trim(0))


async def trim_when_idle(
    active: Callable[[], int],
    ended: Callable[[], int],
    *,
    interval: float = TRIM_CHECK_INTERVAL,
) -> None:
    """Forever: trim once after each busy period, when no connection is open.

    ``active()`` is the number of open connections, ``ended()`` a counter of
    connections ended so far: a quiet sidecar (nothing ended since the last
    trim) is not trimmed again, so an idle process only wakes up to compare
    two integers.
    """
    trimmed_at = ended()
    while True:
        await trio.sleep(interval)
        count = ended()
        if count != trimmed_at and not active():
            trimmed_at = count
            trim()

"""Memory of one idle TLS leg with the sidecar's own contexts: ``python -m benchmarks.tls_memory``.

No root, no network: N client/server pairs made by ``tlspolicy`` (the
sidecar's contexts, SPIFFE certificates from ``lab.pki``), handshaken, one
byte each way, then held. Prints RssAnon per leg and how much of it Python's
allocator traced (the rest is OpenSSL's C heap):

* ``--transport bio``: memory BIOs, as :class:`~trio_tproxy.tlsstream.TLSStream`
  uses them; ``socket``: OpenSSL reading and writing a socketpair itself;
* ``--groups``: key-exchange groups (default: OpenSSL's, with the ML-KEM hybrid);
* ``--keep client|server|both``: which leg of each pair is held.
"""

from __future__ import annotations

import argparse
import gc
import socket
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from OpenSSL import SSL

from lab.pki import make_pki
from trio_tproxy import tlspolicy
from trio_tproxy.credentials import load_credentials

WARM_UP = 20


def rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon")


def _retry(call: Callable[[], Any]) -> bool:
    try:
        call()
    except (SSL.WantReadError, SSL.WantWriteError):
        return False
    return True


def bio_pair(cctx: SSL.Context, sctx: SSL.Context) -> tuple[Any, ...]:
    c = tlspolicy.new_connection(cctx, None, server=False)
    s = tlspolicy.new_connection(sctx, None, server=True)

    def shuttle() -> None:
        moved = True
        while moved:
            moved = False
            for x, y in ((c, s), (s, c)):
                try:
                    data = x.bio_read(65536)
                except SSL.WantReadError:
                    continue
                y.bio_write(data)
                moved = True

    for _ in range(20):
        done = [_retry(x.do_handshake) for x in (c, s)]
        shuttle()
        if all(done):
            break
    c.send(b"x")
    shuttle()
    s.recv(1)
    s.send(b"y")
    shuttle()
    c.recv(1)
    return c, s


def socket_pair(cctx: SSL.Context, sctx: SSL.Context) -> tuple[Any, ...]:
    x, y = socket.socketpair()
    c = tlspolicy.new_connection(cctx, x, server=False)
    s = tlspolicy.new_connection(sctx, y, server=True)
    c.setblocking(False)
    s.setblocking(False)
    done = {"c": False, "s": False}
    for _ in range(200):
        for name, conn in (("c", c), ("s", s)):
            done[name] = done[name] or _retry(conn.do_handshake)
        if all(done.values()):
            break
    c.send(b"x")
    while not _retry(lambda: s.recv(1)):
        pass
    s.send(b"y")
    while not _retry(lambda: c.recv(1)):
        pass
    return c, s, x, y


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=500, help="pairs")
    parser.add_argument("--transport", choices=("bio", "socket"), default="bio")
    parser.add_argument("--groups", default=None, help="e.g. X25519:P-256")
    parser.add_argument("--keep", choices=("both", "client", "server"), default="both")
    args = parser.parse_args(argv)

    files = make_pki(Path(tempfile.mkdtemp(prefix="tls-memory-")))
    cctx = tlspolicy.client_context(load_credentials(files["a"]), groups=args.groups)
    sctx = tlspolicy.server_context(load_credentials(files["b"]), groups=args.groups)
    make = bio_pair if args.transport == "bio" else socket_pair
    held: list[tuple[Any, ...]] = [make(cctx, sctx) for _ in range(WARM_UP)]
    held.clear()
    gc.collect()

    tracemalloc.start()
    anon0, traced0 = rss_anon_kib(), tracemalloc.get_traced_memory()[0]
    for _ in range(args.n):
        pair = make(cctx, sctx)
        if args.keep == "client":
            pair = pair[0::2]  # the client connection (and its socket)
        elif args.keep == "server":
            pair = pair[1::2]
        held.append(pair)
    gc.collect()
    anon1, traced1 = rss_anon_kib(), tracemalloc.get_traced_memory()[0]
    legs = args.n * (2 if args.keep == "both" else 1)
    anon = (anon1 - anon0) / legs
    python = (traced1 - traced0) / 1024 / legs
    print(
        f"{args.transport} groups={args.groups or 'default'} keep={args.keep}: "
        f"{anon:.1f} KiB RssAnon per idle leg, of which Python {python:.1f} KiB, "
        f"OpenSSL and the rest {anon - python:.1f} KiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The admin server: ``/healthz``, ``/readyz``, ``/metrics`` (and ``/connections``).

Plaintext HTTP on ``--admin-port`` (default 15020, 0: off), bound to the
pod's own addresses and loopback, served by :mod:`.httpserver`.  The port is
added to the inbound exclusions of the nft table (``cli.interception_from``),
so the kubelet and Prometheus reach it directly; its replies leave as
conntrack replies, which the output chain never intercepts.

* ``/healthz``: 200 while the process runs its event loop (liveness).
* ``/readyz``: 200 only when the listeners are up, the rules and routes are
  verified in place (the installer's ``verify()``, at most once a second,
  serialised with the drift watcher's repairs), and our certificate is valid
  now; 503 with one line per problem otherwise, and at once when the drain
  starts (SIGTERM).
* ``/metrics``: Prometheus exposition of :mod:`.metrics` (prometheus_client
  does the format and content negotiation).
* ``/connections``: the latest ended connections as JSON, to loopback
  clients only (``trio-tproxy doctor --peer`` reads the peer identity there).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from .credentials import Credentials
from .httpserver import HttpServer, Limits, Request, Response, method_not_allowed, text

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("trio_tproxy")

#: Seconds a verify() result is reused: a probe flood must not fork an nft per request.
VERIFY_CACHE = 1.0


@dataclass
class Health:
    """What ``/readyz`` reads; lifecycle keeps it current."""

    credentials: Credentials
    #: Blocking: the installer's verify() (problems; empty = in place), or None (not ours to check).
    verify: Callable[[], list[str]] | None = None
    listening: bool = False
    ready: bool = False
    draining: bool = False
    #: Serialises verify() with the drift watcher's repair (one Installer, one thread at a time).
    lock: threading.Lock = field(default_factory=threading.Lock)
    _cached: tuple[float, list[str]] | None = None

    async def problems(self) -> list[str]:
        found = []
        if self.draining:
            found.append("draining: the sidecar is shutting down")
        if not self.listening:
            found.append("listeners are not up")
        elif not self.ready:
            found.append("starting: interception not installed yet")
        now = dt.datetime.now(dt.UTC)
        creds = self.credentials
        if now >= creds.not_after:
            found.append(f"certificate expired at {creds.not_after:%Y-%m-%d %H:%M:%S} UTC")
        elif now < creds.cert.not_valid_before_utc:
            found.append("certificate not yet valid")
        if self.verify is not None and self.ready and not self.draining:
            found += await self._verified()
        return found

    async def _verified(self) -> list[str]:
        now = trio.current_time()
        if self._cached is not None and now - self._cached[0] < VERIFY_CACHE:
            return self._cached[1]
        verify = self.verify
        assert verify is not None

        def locked() -> list[str]:
            with self.lock:
                return verify()

        try:
            result = await trio.to_thread.run_sync(locked)
        except OSError as exc:
            result = [f"could not verify the rules: {exc}"]
        self._cached = (trio.current_time(), result)
        return result


def make_server(
    health: Health,
    registry: Callable[[], CollectorRegistry],
    stats_recent: Callable[[], list[dict[str, object]]],
) -> HttpServer:
    """``registry()`` builds the metrics registry, called on the first scrape only
    (prometheus_client is imported then: a sidecar never scraped never loads it)."""
    built: list[CollectorRegistry] = []

    async def healthz(req: Request) -> Response:
        if req.method not in ("GET", "HEAD"):
            return method_not_allowed()
        return text(200, "ok\n")

    async def readyz(req: Request) -> Response:
        if req.method not in ("GET", "HEAD"):
            return method_not_allowed()
        problems = await health.problems()
        if problems:
            return text(503, "".join(f"not ready: {p}\n" for p in problems))
        return text(200, "ready\n")

    async def metrics(req: Request) -> Response:
        if req.method not in ("GET", "HEAD"):
            return method_not_allowed()
        from prometheus_client.exposition import choose_encoder

        if not built:
            built.append(registry())
        encoder, content_type = choose_encoder(req.header("accept") or "")
        return Response(200, [("content-type", content_type)], encoder(built[0]))

    async def connections(req: Request) -> Response:
        if req.method not in ("GET", "HEAD"):
            return method_not_allowed()
        if not ipaddress.ip_address(req.client[0]).is_loopback:
            return text(403, "loopback only\n")
        body = json.dumps(stats_recent(), default=str).encode() + b"\n"
        return Response(200, [("content-type", "application/json")], body)

    return HttpServer(
        {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics, "/connections": connections},
        limits=Limits(max_header_bytes=8192, max_body_bytes=1024, request_timeout=5.0),
        name="admin",
    )


def pod_addresses(port: int) -> list[tuple[str, int]]:
    """Loopback and every global address of this namespace (link-local ones need a scope)."""
    from .rtnl import Rtnl

    found: list[str] = ["127.0.0.1", "::1"]
    with Rtnl() as nl:
        for addr in nl.addresses():
            ip = ipaddress.ip_address(addr)
            if ip.is_loopback or ip.is_link_local or addr in found:
                continue
            found.append(addr)
    return [(a, port) for a in found]


def listen_addresses(port: int, hosts: Sequence[str] | None = None) -> list[tuple[str, int]]:
    return [(h, port) for h in hosts] if hosts is not None else pod_addresses(port)

"""The sidecar's life: preflight, install, serve, watch, and remove on exit.

Order matters.  Listeners come up first (binding needs no rules), then the
nftables table and policy routes, then the one "ready" line.  On SIGTERM or
SIGINT (Kubernetes sends the former, a terminal the latter) the listeners and
connections are cancelled and every rule and route this process added is
removed, whatever happened before.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal

import trio

from . import kernel, nft, tlspolicy
from .config import ConfigError, ProxyConfig
from .credentials import Credentials, load_credentials
from .proxy import Sidecar, fmt_addr

log = logging.getLogger("trio_tproxy")

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21


def has_capability(bit: int) -> bool:
    """Whether the effective capability set has ``bit`` (read from /proc, no libcap)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return os.geteuid() == 0


def preflight(config: ProxyConfig) -> Credentials:
    """Everything ``run`` needs, checked before touching the kernel.

    Raises ConfigError with one line naming what is missing."""
    credentials = load_credentials(config.tls)
    tlspolicy.client_context(credentials, groups=config.tls_groups)  # validates
    if config.manage_rules:
        if shutil.which("nft") is None:
            raise ConfigError(
                "the nft tool is not installed (Debian/Ubuntu: apt-get install nftables)"
            )
        if not has_capability(CAP_NET_ADMIN):
            raise ConfigError(
                "CAP_NET_ADMIN is missing: run as root or give the container the NET_ADMIN "
                "capability (or pass --no-rules if an init container installs them)"
            )
    return credentials


def describe_interception(config: ProxyConfig) -> str:
    ic = config.interception
    parts = ["intercepting " + ", ".join(str(n) for n in ic.intercept_cidrs)]
    if ic.exclude_cidrs:
        parts.append("excluding " + ", ".join(str(n) for n in ic.exclude_cidrs))
    if ic.exclude_inbound_ports:
        parts.append("inbound ports excluded " + ",".join(map(str, ic.exclude_inbound_ports)))
    if ic.exclude_outbound_ports:
        parts.append("outbound ports excluded " + ",".join(map(str, ic.exclude_outbound_ports)))
    return "; ".join(parts)


async def watch_routes(routes: kernel.PolicyRoutes, interval: float) -> None:
    """Re-add policy routes that vanish (the IPv6 local route does when lo flaps)."""
    while True:
        await trio.sleep(interval)
        try:
            # netlink calls block: keep them off the event loop
            for restored in await trio.to_thread.run_sync(routes.repair):
                log.warning("restored %s (it had disappeared)", restored)
        except OSError as exc:
            log.error("route check failed: %s", exc)


async def run(config: ProxyConfig, credentials: Credentials) -> None:
    """Serve until SIGTERM/SIGINT; remove what we installed on the way out."""
    ic = config.interception
    sidecar = Sidecar(config, credentials)
    tables = nft.Nft()
    routes = kernel.PolicyRoutes(ic)
    installed = False
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sidecar.serve)
            if config.manage_rules:
                installed = True
                tables.apply(ic)
                routes.install()
                nursery.start_soon(watch_routes, routes, config.route_check_interval)
            log.warning(
                "ready: egress on %s, ingress (mTLS) on %s, %s, identity %s; verify=%s "
                "trust-domain=%s",
                " ".join(fmt_addr(a) for a in sidecar.bound["egress"]),
                " ".join(fmt_addr(a) for a in sidecar.bound["ingress"]),
                describe_interception(config),
                credentials.spiffe_id or "(no SPIFFE ID)",
                config.identity.mode,
                config.identity.trust_domain,
            )
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.warning("%s received: shutting down", signal.Signals(signum).name)
                    break
            nursery.cancel_scope.cancel()
    finally:
        if installed:
            _remove(tables, routes, config)
        stats = sidecar.stats
        log.warning(
            "stopped: connections %s; refusals %s",
            dict(sorted((f"{d}/{o}", n) for (d, o), n in stats.connections.items())) or "{}",
            dict(sorted((f"{d}/{r}", n) for (d, r), n in stats.refusals.items())) or "{}",
        )


def _remove(tables: nft.Nft, routes: kernel.PolicyRoutes, config: ProxyConfig) -> None:
    """Remove rules and routes; report every failure but try everything."""
    try:
        routes.remove()
    except OSError as exc:
        log.error("could not remove policy routes: %s", exc)
    try:
        tables.delete(config.interception)
    except nft.NftError as exc:
        log.error("could not delete nft table %s: %s", config.interception.table, exc)
    else:
        log.warning("removed nft table inet %s and policy routes", config.interception.table)

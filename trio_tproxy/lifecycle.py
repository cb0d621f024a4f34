"""The sidecar's life: preflight, arm signals, serve, install, watch, remove on exit.

Order matters:

1. Signals first.  SIGTERM and SIGINT (Kubernetes sends the former, a terminal
   the latter) are turned into a message to this module *before anything is
   installed*, so a signal at any moment of start-up or shutdown ends in the
   same place: nothing of ours left in the kernel, exit 0, one log line saying
   which signal came.  A signal during ``apply`` lets that one ``nft``/netlink
   step finish (threads cannot be interrupted), then removes everything.  A
   signal during removal is absorbed: removal always runs to its end.
2. Listeners come up (binding needs no rules).
3. The interception installer (:mod:`.interception`) loads the table and the
   routes, off the event loop; with ``--no-rules`` we instead wait, bounded,
   until another process (an init container) has installed them.
4. The one "ready:" line, at INFO.
5. A watcher (:mod:`.drift`) wakes on netlink notifications (rules, routes,
   links, nftables objects of our table), re-checks table and routes together
   and repairs them within milliseconds, one warning line per repair; a
   ``route_check_interval`` poll backs it up.

A start-up failure (bad port, nft error, rules missing) removes what was
installed and propagates as one exception: the CLI prints one line, exit 2.
"""

from __future__ import annotations

import functools
import logging
import signal
from collections.abc import AsyncIterator
from types import FrameType

import trio

from . import drift, tlspolicy
from .config import ProxyConfig
from .credentials import Credentials, load_credentials
from .interception import Installer, InterceptionError, is_permission_error
from .proxy import Sidecar, fmt_addr

__all__ = ["preflight", "run"]

log = logging.getLogger("trio_tproxy")

#: Seconds between two checks while waiting for an init container's rules.
RULES_POLL = 0.2


def preflight(config: ProxyConfig) -> Credentials:
    """Everything ``run`` needs, checked before touching the kernel.

    Raises ConfigError with one line naming what is missing."""
    credentials = load_credentials(config.tls)
    tlspolicy.client_context(credentials, groups=config.tls_groups)  # validates
    if config.manage_rules:
        Installer(config.interception).preflight()
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


async def wait_for_rules(installer: Installer, wait: float) -> str:
    """Wait until another process has installed interception; say what was checked.

    Reading the nft table needs CAP_NET_ADMIN, which a sidecar relying on an
    init container usually lacks: then only the routes can be checked.
    """
    deadline = trio.current_time() + wait
    check = installer.verify
    checked = "rules installed by another process (table and routes verified)"
    while True:
        try:
            problems = await trio.to_thread.run_sync(check)
        except OSError as exc:
            if check != installer.verify or not is_permission_error(exc):
                raise
            check = installer.routes.missing
            checked = "rules installed by another process (routes verified; no CAP_NET_ADMIN "
            checked += "to read the nft table)"
            continue
        if not problems:
            return checked
        if trio.current_time() >= deadline:
            raise InterceptionError(
                f"--no-rules: interception is not in place after {wait:g}s", problems
            )
        await trio.sleep(RULES_POLL)


async def _stop_on_signal(
    signals: AsyncIterator[int], scope: trio.CancelScope, received: list[str]
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        received.append(name)
        log.info("%s received: shutting down", name)
        scope.cancel()
        return


def _absorb_late_signal(signum: int, frame: FrameType | None) -> None:
    # Installed before the receiver opens, so trio restores (and redelivers any
    # queued signal to) this instead of the default action: a second SIGTERM
    # that arrived while we were removing the rules must not kill us now.
    log.debug("%s received while stopping: ignored", signal.Signals(signum).name)


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one real error inside a nursery's exception group, or the group itself."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else group


async def run(config: ProxyConfig, credentials: Credentials) -> None:
    """Serve until SIGTERM/SIGINT; remove what we installed on the way out."""
    installer = Installer(config.interception)
    sidecar = Sidecar(config, credentials)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _absorb_late_signal)
    received: list[str] = []
    installed = ready = False
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signal, signals, nursery.cancel_scope, received)
                await nursery.start(sidecar.serve)
                if config.manage_rules:
                    installed = True  # before apply: a failed apply may leave a table
                    await trio.to_thread.run_sync(installer.apply)
                    # Cancelled with the nursery, before the removal below: a
                    # check in flight finishes first, so no repair races it.
                    await nursery.start(
                        functools.partial(
                            drift.watch,
                            installer.repair,
                            table=config.interception.table,
                            route_table=config.interception.route_table,
                            fallback_interval=config.route_check_interval,
                        )
                    )
                    rules = describe_interception(config)
                else:
                    checked = await wait_for_rules(installer, config.rules_wait)
                    rules = f"{describe_interception(config)} ({checked})"
                log.info(
                    "ready: egress on %s, ingress (mTLS) on %s, %s, identity %s; verify=%s "
                    "trust-domain=%s; open-file limit %s",
                    " ".join(fmt_addr(a) for a in sidecar.bound["egress"]),
                    " ".join(fmt_addr(a) for a in sidecar.bound["ingress"]),
                    rules,
                    credentials.spiffe_id or "(no SPIFFE ID)",
                    config.identity.mode,
                    config.identity.trust_domain,
                    sidecar.fd_limit,
                )
                ready = True
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None
        finally:
            # A start-up failure is reported by the caller in one line: stay quiet.
            quiet = not (ready or received)
            if installed:
                with trio.CancelScope(shield=True):
                    await _remove(installer, quiet=quiet)
            if not quiet:
                stats = sidecar.stats
                log.info(
                    "stopped: connections %s; refusals %s",
                    dict(sorted((f"{d}/{o}", n) for (d, o), n in stats.connections.items()))
                    or "{}",
                    dict(sorted((f"{d}/{r}", n) for (d, r), n in stats.refusals.items())) or "{}",
                )


async def _remove(installer: Installer, *, quiet: bool) -> None:
    """Remove table and routes (off the event loop); log each failure, never raise."""
    try:
        await trio.to_thread.run_sync(installer.remove)
    except OSError as exc:
        log.error("%s", exc)
    else:
        if not quiet:
            log.info("removed nft table inet %s and policy routes", installer.ic.table)

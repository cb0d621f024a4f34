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
5. The credential watcher (:mod:`.reload`) polls the certificate files and
   takes SIGHUP as "reload now"; SIGUSR1/SIGUSR2 are logged and ignored.  From
   the first line of ``run`` until the end, no signal but SIGKILL ends the
   process without a log line.
6. A watcher (:mod:`.drift`) wakes on netlink notifications (rules, routes,
   links, nftables objects of our table), re-checks table and routes together
   and repairs them within milliseconds, one warning line per repair; a
   ``route_check_interval`` poll backs it up.

A start-up failure (bad port, nft error, rules missing) removes what was
installed and propagates as one exception: the CLI prints one line, exit 2.

Drain (``--drain-timeout``, default 20 s).  The first SIGTERM/SIGINT after
"ready" starts a drain: ``/readyz`` answers 503 at once, open connections keep
flowing, and the sidecar exits as soon as none is active (Istio's
``EXIT_ON_ZERO_ACTIVE_CONNECTIONS``) or when the timeout passes; then the
connections still open are reset and each is logged and counted with outcome
``drained``.  A second signal ends the drain at once (same reset).  Exit code
0 either way.  New connections during the drain (``--drain-new``):

* ``accept`` (default): carried as usual.  In a classic sidecar the app gets
  SIGTERM at the same moment and may still open egress connections (flush a
  queue, close a session) or receive requests from clients whose endpoint
  list has not caught up yet; refusing them would break its own shutdown.
  Each new connection delays the exit, up to the timeout.
* ``refuse``: every new connection is reset with one log line (refusal reason
  ``draining``).  For a native sidecar (an init container with
  ``restartPolicy: Always``) Kubernetes stops the sidecar only after the app
  containers have exited, so nothing legitimate opens egress any more and an
  ingress connection has no app to reach: refusing at once lets the drain end
  sooner.  (``accept`` is also safe there: such a connection fails at the dial.)

The default 20 s leaves 10 s of Kubernetes' default 30 s grace period for the
exit itself (removing or keeping the rules, final log lines) before SIGKILL.

Rules on exit (``--on-exit``):

* ``remove`` (default): a developer's run, a test, ``trio-tproxy run`` on a
  workstation namespace: nothing of ours is left in the kernel, whatever the
  exit (signal, start-up failure).
* ``keep``: for pods (the manifest uses it).  The table stays loaded, and
  since the ruleset fails closed, intercepted connections are refused with a
  TCP reset until a sidecar is back (a container restart re-applies the same
  table atomically): never plaintext.  Removing the rules at exit would let
  ingress reach the app in plaintext for the rest of the pod's life (the app
  container may outlive the sidecar in a classic sidecar set-up).
* A SIGKILL, an OOM kill or a crash never reaches the removal: the rules stay
  and fail closed in both modes.
"""

from __future__ import annotations

import functools
import logging
import signal
from collections.abc import AsyncIterator
from types import FrameType

import trio

from . import admin, drift, fastpath, memory, metrics, probes, reload, tlspolicy
from .config import ProxyConfig
from .credentials import Credentials, load_credentials
from .interception import Installer, InterceptionError, is_permission_error
from .proxy import Sidecar, fmt_addr, preserve_port_warning

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


class _Drain:
    """The drain after the first signal (see the module docstring)."""

    def __init__(self, sidecar: Sidecar, health: admin.Health, config: ProxyConfig) -> None:
        self.sidecar = sidecar
        self.health = health
        self.config = config
        self.scope: trio.CancelScope | None = None

    def start(self, name: str) -> trio.CancelScope:
        sidecar = self.sidecar
        self.health.draining = sidecar.draining = True
        sidecar.refuse_new = self.config.drain_new == "refuse"
        log.info(
            "%s received: shutting down: draining %d connections active, new connections %s, "
            "exit when none is left or in %gs",
            name,
            sidecar.stats.active,
            "refused" if sidecar.refuse_new else "accepted",
            self.config.drain_timeout,
        )
        self.scope = trio.CancelScope()
        return self.scope

    async def run(self, scope: trio.CancelScope, stop: trio.CancelScope) -> None:
        sidecar = self.sidecar
        with scope:
            with trio.move_on_after(self.config.drain_timeout) as timer:
                await sidecar.wait_idle()
        left = sidecar.stats.active
        if left:
            sidecar.drain_expired = True
            why = "drain timeout" if timer.cancelled_caught else "second signal"
            log.warning("%s: resetting the %d connections still open", why, left)
        else:
            log.info("drained: no connection active")
        stop.cancel()


async def _stop_on_signal(
    signals: AsyncIterator[int],
    scope: trio.CancelScope,
    received: list[str],
    drain: _Drain | None = None,
    ready: list[bool] | None = None,
) -> None:
    async with trio.open_nursery() as nursery:
        async for signum in signals:
            name = signal.Signals(signum).name
            received.append(name)
            if drain is not None and drain.scope is None and ready and ready[0]:
                nursery.start_soon(drain.run, drain.start(name), scope)
                continue
            if drain is not None and drain.scope is not None:
                log.info("%s received: ending the drain now", name)
                drain.scope.cancel()
            else:
                log.info("%s received: shutting down", name)
                scope.cancel()
            return


#: Signals that must never end the sidecar silently: SIGHUP reloads the
#: credentials (what ghostunnel/stunnel users expect); the user signals, whose
#: default action is to terminate without a word, are logged and ignored.
RELOAD_SIGNALS = (signal.SIGHUP,)
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


async def _reload_on_signal(
    signals: AsyncIterator[int], watcher: reload.CredentialWatcher[Credentials]
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum in RELOAD_SIGNALS:
            log.info("%s received: reloading credentials", name)
            watcher.request()
        else:
            log.warning("%s received: ignored (SIGTERM stops, SIGHUP reloads)", name)


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
    health = admin.Health(credentials)

    def use_credentials(new: Credentials) -> None:
        sidecar.use_credentials(new)
        health.credentials = new  # /readyz and the expiry gauge follow the reload

    watcher = reload.CredentialWatcher.for_files(
        config.tls,
        credentials,
        use_credentials,
        poll=config.credential_poll,
        expiry_warning_fraction=config.expiry_warning_fraction,
    )
    for signum in (signal.SIGTERM, signal.SIGINT, *RELOAD_SIGNALS, *IGNORED_SIGNALS):
        signal.signal(signum, _absorb_late_signal)
    received: list[str] = []
    installed = ready = False
    ready_flag = [False]  # read by the signal task: drain only once ready
    drain = _Drain(sidecar, health, config)
    with (
        trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals,
        trio.open_signal_receiver(*RELOAD_SIGNALS, *IGNORED_SIGNALS) as other_signals,
    ):
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    _stop_on_signal, signals, nursery.cancel_scope, received, drain, ready_flag
                )
                nursery.start_soon(_reload_on_signal, other_signals, watcher)
                await nursery.start(watcher.watch)
                await nursery.start(sidecar.serve)
                stats = sidecar.stats
                nursery.start_soon(
                    memory.trim_when_idle,
                    lambda: stats.active,
                    lambda: sum(stats.connections.values()),
                )
                health.listening = True
                admin_bound: list[tuple[str, int]] = []
                if config.admin_port:
                    admin_bound = await _start_admin(nursery, config, sidecar, health)
                if config.manage_rules:
                    installed = True  # before apply: a failed apply may leave a table
                    await trio.to_thread.run_sync(installer.apply)
                    # Cancelled with the nursery, before the removal below: a
                    # check in flight finishes first, so no repair races it.
                    health.verify = installer.verify

                    def repair() -> list[str]:
                        with health.lock:  # /readyz's verify() uses the same installer
                            return installer.repair()

                    await nursery.start(
                        functools.partial(
                            drift.watch,
                            repair,
                            table=config.interception.table,
                            route_table=config.interception.route_table,
                            fallback_interval=config.route_check_interval,
                            on_check=functools.partial(_count_check, sidecar),
                        )
                    )
                    rules = describe_interception(config)
                else:
                    checked = await wait_for_rules(installer, config.rules_wait)
                    rules = f"{describe_interception(config)} ({checked})"
                    # Without CAP_NET_ADMIN the table cannot be read: routes only.
                    no_cap = "no CAP_NET_ADMIN" in checked
                    health.verify = installer.routes.missing if no_cap else installer.verify
                if config.interception.probe_port:
                    await nursery.start(
                        functools.partial(
                            probes.serve, config, mark=config.interception.bypass_mark
                        )
                    )
                    log.info(
                        "probe server (plaintext) on port %d: %s",
                        config.interception.probe_port,
                        " ".join(probes.PATH_PREFIX + p.name for p in config.ingress.app_probes)
                        or "no --app-probe",
                    )
                fastpath.relay_thread()  # before the first connection, not during it
                if sidecar.kernel_options and (clash := preserve_port_warning()):
                    log.warning("%s", clash)
                log.info(
                    "ready: egress on %s, ingress (mTLS) on %s, %s, identity %s; verify=%s "
                    "trust-domain=%s; open-file limit %s; data path %s",
                    " ".join(fmt_addr(a) for a in sidecar.bound["egress"]),
                    " ".join(fmt_addr(a) for a in sidecar.bound["ingress"]),
                    rules,
                    credentials.spiffe_id or "(no SPIFFE ID)",
                    config.identity.mode,
                    config.identity.trust_domain,
                    sidecar.fd_limit,
                    fastpath.describe(),
                )
                if admin_bound:  # after "ready:": a start-up failure stays one line
                    log.info(
                        "admin server (/healthz /readyz /metrics) on %s",
                        " ".join(fmt_addr(a) for a in admin_bound),
                    )
                ready = ready_flag[0] = health.ready = True
                # Start-up's garbage (argument parsing, certificate and
                # context loading, the rule install's thread) is free but held
                # by glibc: give it back once (measured: -0.8 MB idle RSS).
                memory.trim()
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None
        finally:
            # A start-up failure is reported by the caller in one line: stay quiet.
            quiet = not (ready or received)
            if installed and config.on_exit == "remove":
                with trio.CancelScope(shield=True):
                    await _remove(installer, quiet=quiet)
            elif installed and not quiet:
                log.info(
                    "kept nft table inet %s and policy routes (--on-exit keep): intercepted "
                    "connections are refused until a sidecar is back",
                    config.interception.table,
                )
            if not quiet:
                stats = sidecar.stats
                log.info(
                    "stopped: connections %s; refusals %s",
                    dict(sorted((f"{d}/{o}", n) for (d, o), n in stats.connections.items()))
                    or "{}",
                    dict(sorted((f"{d}/{r}", n) for (d, r), n in stats.refusals.items())) or "{}",
                )


def _count_check(sidecar: Sidecar, check: drift.Check) -> None:
    if check.restored:
        sidecar.stats.rule_repairs += 1
    if check.error is not None:
        sidecar.stats.rule_check_failures += 1


async def _start_admin(
    nursery: trio.Nursery, config: ProxyConfig, sidecar: Sidecar, health: admin.Health
) -> list[tuple[str, int]]:
    def extra() -> dict[str, float]:
        return {
            "credential_expiry_timestamp_seconds": health.credentials.not_after.timestamp(),
            "draining": float(health.draining),
        }

    server = admin.make_server(
        health,
        functools.partial(metrics.registry, sidecar.stats, extra),
        lambda: list(sidecar.stats.recent),
    )
    addresses = await trio.to_thread.run_sync(admin.pod_addresses, config.admin_port)
    try:
        bound: list[tuple[str, int]] = await nursery.start(server.serve, addresses)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"admin server: cannot listen on port {config.admin_port}: {exc.strerror or exc} "
            "(--admin-port PORT to move it, 0 to turn it off)",
        ) from None
    return bound


async def _remove(installer: Installer, *, quiet: bool) -> None:
    """Remove table and routes (off the event loop); log each failure, never raise."""
    try:
        await trio.to_thread.run_sync(installer.remove)
    except OSError as exc:
        log.error("%s", exc)
    else:
        if not quiet:
            log.info("removed nft table inet %s and policy routes", installer.ic.table)

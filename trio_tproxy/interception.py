"""The interception installer: the nftables table and the policy routes as ONE unit.

``run``, ``trio-tproxy rules show|apply|delete`` and the tests all go through
:class:`Installer`; nothing else adds or removes interception state.

Units (all per network namespace):

1. the nft table ``inet <table>``: the text :func:`nft.render` gives, plus a
   ``fingerprint`` set whose comment carries the SHA-256 of that text, loaded
   as one ``nft -f -`` transaction (the kernel applies all of it or none);
2. ``lo`` up (TPROXY and the ``local`` routes need it);
3. the policy routes (:class:`kernel.PolicyRoutes`): ``ip rule fwmark <mark>
   iif lo lookup <table>`` and ``local default dev lo`` in that table, for
   IPv4 and IPv6.

Order.  :meth:`Installer.apply` loads the table first, then ``lo`` and the
routes.  The table is the step that fails for the usual reasons (nft missing,
no CAP_NET_ADMIN, a kernel without ``nft_tproxy``) and it fails atomically, so
a failed first step leaves nothing; if the routes then fail, apply removes
what it did before raising: apply is all or nothing.  :meth:`Installer.remove`
goes in the reverse order (routes, then table) and tries EVERY step whatever
failed before, then raises one :class:`InterceptionError` naming each failure.
Both orders are safe at every point in between: routes without the table
carry nothing (no packet has the mark), a table without routes marks egress
that is then routed normally.

What :meth:`Installer.verify` compares: the table is present; its fingerprint
equals the hash of what :func:`render` gives for this configuration (a table
left by another version or other flags is "different"); when this installer
loaded the table itself, ``nft list table`` equals, after dropping counter
values, the listing read right after loading (so a rule deleted by hand is
seen); ``lo`` is up; the route objects (two rules and a local route per family) exist.  :meth:`Installer.repair`
re-loads the whole table when it is absent or different (one transaction
again) and re-adds missing routes; it returns what it restored.

Every method blocks (a subprocess or netlink): from trio, call them with
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil

from .config import ConfigError, Interception
from .kernel import PolicyRoutes
from .nft import Nft, NftError, NftErrorKind, render

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21

#: Name of the set that carries the fingerprint (never referenced by a rule).
FINGERPRINT_SET = "fingerprint"
_FINGERPRINT = re.compile(r'comment "trio-tproxy sha256 ([0-9a-f]{64})"')
_COUNTER = re.compile(r"counter packets \d+ bytes \d+")


class InterceptionError(OSError):
    """Installing, checking or removing interception failed.

    ``failures`` holds one line per failed step; ``str()`` joins them.
    """

    def __init__(self, what: str, failures: list[str]) -> None:
        super().__init__(f"{what}: " + "; ".join(failures))
        self.failures = tuple(failures)


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


def fingerprint(ic: Interception) -> str:
    """SHA-256 of the rendered table: equal fingerprints, equal tables."""
    return hashlib.sha256(render(ic).encode()).hexdigest()


def transaction(ic: Interception) -> str:
    """What :meth:`Installer.apply` feeds to ``nft -f -``: the table, then its fingerprint."""
    return (
        render(ic)
        + "# the fingerprint that verify() compares: sha256 of the text above\n"
        + f"add set inet {ic.table} {FINGERPRINT_SET} {{ type mark; "
        + f'comment "trio-tproxy sha256 {fingerprint(ic)}"; }}\n'
    )


def _normalise(listing: str) -> str:
    return "\n".join(_COUNTER.sub("counter", line).rstrip() for line in listing.splitlines())


class Installer:
    """Interception for one :class:`Interception` config, in this namespace or ``netns``."""

    def __init__(self, ic: Interception, netns: str | None = None, nft: Nft | None = None) -> None:
        self.ic = ic
        self.nft = nft if nft is not None else Nft(netns=netns)
        self.routes = PolicyRoutes(ic, netns)
        #: ``nft list table`` (normalised) right after our own load, if we loaded it.
        self._loaded: str | None = None

    # -- checks that need no kernel change

    def preflight(self) -> None:
        """Raise ConfigError (one line) if apply/remove cannot work here."""
        if shutil.which("nft") is None:
            raise ConfigError(
                "the nft tool is not installed (Debian/Ubuntu: apt-get install nftables)"
            )
        if not has_capability(CAP_NET_ADMIN):
            raise ConfigError(
                "CAP_NET_ADMIN is missing: run as root or give the container the NET_ADMIN "
                "capability (or pass --no-rules if an init container installs them)"
            )

    def show(self) -> str:
        """Everything apply installs: the nft transaction, then the iproute2 equivalents."""
        routes = "\n".join(self.routes.commands())
        return (
            transaction(self.ic)
            + "# policy routing, installed through netlink; the iproute2 equivalents:\n"
            + routes
            + "\n"
        )

    # -- kernel

    def apply(self) -> None:
        """Install the table, then ``lo`` up and the routes; on failure undo and raise."""
        self.nft.load(transaction(self.ic))  # atomic: on failure, nothing to undo
        try:
            self._remember_listing()
            self.routes.install()
        except OSError as exc:
            try:
                self.remove()
            except InterceptionError as undo:
                raise InterceptionError(
                    "could not install policy routes", [str(exc), *undo.failures]
                ) from exc
            raise

    def verify(self) -> list[str]:
        """What is missing or different, one short line each (empty: all in place)."""
        problems = self._table_problems()
        problems += self.routes.missing()
        return problems

    def repair(self) -> list[str]:
        """Re-load the table if absent or different, re-add missing routes; say what."""
        restored = []
        if self._table_problems():
            self._load()
            restored.append(f"nft table inet {self.ic.table}")
        restored += self.routes.repair()
        return restored

    def remove(self) -> None:
        """Delete routes, then the table; try both, raise one error naming each failure."""
        failures: list[str] = []
        try:
            self.routes.remove()
        except OSError as exc:
            failures += [str(f) for f in getattr(exc, "failures", ())] or [str(exc)]
        try:
            self.nft.delete(self.ic)
        except NftError as exc:
            failures.append(f"nft table inet {self.ic.table}: {exc}")
        self._loaded = None
        if failures:
            raise InterceptionError("could not remove interception", failures)

    # -- helpers

    def _load(self) -> None:
        self.nft.load(transaction(self.ic))
        self._remember_listing()

    def _remember_listing(self) -> None:
        listing = self.nft.list_table(self.ic)
        self._loaded = _normalise(listing) if listing is not None else None

    def _table_problems(self) -> list[str]:
        name = f"nft table inet {self.ic.table}"
        listing = self.nft.list_table(self.ic)
        if listing is None:
            return [f"{name} absent"]
        found = _FINGERPRINT.search(listing)
        if found is None or found.group(1) != fingerprint(self.ic):
            return [f"{name} differs from this configuration's (fingerprint)"]
        if self._loaded is not None and _normalise(listing) != self._loaded:
            return [f"{name} was changed since it was loaded"]
        return []


def is_permission_error(exc: BaseException) -> bool:
    """An nft run refused for want of CAP_NET_ADMIN (reading a table needs it too)."""
    return isinstance(exc, NftError) and exc.kind in (
        NftErrorKind.PERMISSION,
        NftErrorKind.NOT_INSTALLED,
    )

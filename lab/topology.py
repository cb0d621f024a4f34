"""Throw-away network-namespace topologies for the demo, the integration tests and the benchmarks.

Why this exists
---------------
A transparent proxy is only proven through the kernel path: nft TPROXY rules,
policy routing, SO_MARK and IP_TRANSPARENT all act on real packets crossing
real interfaces. So the demo, the integration suite and the benchmarks all run
the sidecar between *pods* that are network namespaces, and this one module
builds them, so that all three agree on names and addresses.

Layout (``P`` is the per-run prefix, unique so that parallel runs never meet)::

    P-node        br0 (bridge, up) + one port "v<host>" per host
    P-a           lo (up), eth0 = the other end of the veth "va" in P-node
    P-b           lo (up), eth0 <-> "vb"
    P-outside     lo (up), eth0 <-> "voutside"   (a host without a sidecar)

All hosts share one L2 segment, so every address is on-link: no gateway and no
forwarding sysctl. Host number ``n`` (1, 2, ... in the order given) gets:

    ip4        10.X.0.n/24            inside the intercepted cluster ranges
    ip4_plain  198.18.X.n/24          benchmark range, not intercepted
    ip6        fdGG:GGGG:GGGG::n/64   unique-local (fc00::/7), intercepted
    ip6_plain  2001:db8:X::n/64       documentation range, not intercepted
    (and fe80::n/64, so neighbour discovery has its usual link-local source)

``X`` and ``G`` come from a hash of the prefix, so two topologies alive at once
also differ in their addresses, which keeps captures and logs unambiguous.

Safety
------
The only change made to the caller's namespace is creating and removing the
namespace files under /run/netns. Both ends of each veth are created directly
in their namespaces (one netlink request with the peer's namespace fd): a name
created in the root namespace first would collide across parallel runs.

IPv6 addresses normally wait one to two seconds in duplicate address
detection. Every address here is added with IFA_F_NODAD, the hosts' kernel
link-local addresses are replaced by fixed ones (address generation mode
"none"), and the bridge and its ports get no IPv6 address at all, so
``create()`` returns as soon as the addresses are usable (it checks that none
is tentative).

Teardown
--------
``destroy()`` first ends processes: the ones started with ``popen()`` by PID,
then any other process found inside one of our namespaces (a child's child,
say), through a pidfd so a recycled PID is never signalled. Each gets SIGTERM,
a short grace period, then SIGKILL. A process left inside would keep its
namespace, interfaces and ports alive after the name is gone. Then every
namespace is removed, and ``destroy()`` raises :class:`TopologyError` if
anything with the prefix is still listed. ``create()`` cleans up by itself when
it fails or is interrupted part way; ``destroy()`` defers Ctrl-C until it is
done; it is safe to call twice; and an ``atexit`` hook destroys topologies a
program forgot.

pyroute2 (0.9) does its namespace work in forked children: ``netns.create()``
forks to unshare, and ``IPRoute(netns=...)`` forks to open a netlink socket in
the namespace. Its synchronous API also runs a private asyncio loop, so call
this module from plain threads (or ``trio.to_thread``), not from inside a
running asyncio loop.
"""

from __future__ import annotations

import atexit
import hashlib
import ipaddress
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any, Final

from pyroute2 import IPRoute, netns

from .netns import NETNS_DIR, leftovers

__all__ = [
    "DEFAULT_HOSTS",
    "NODE",
    "Host",
    "Topology",
    "TopologyError",
    "sigterm_sets",
    "sigterm_unwinds",
]

#: The hosts of the standard topology: two pods and one host without a sidecar.
DEFAULT_HOSTS: Final = ("a", "b", "outside")
#: Name that ``popen``/``run``/``wait_port`` accept for the node namespace (the bridge).
NODE: Final = "node"

_HOST_NAME = re.compile(r"[a-z][a-z0-9-]{0,13}")  # "v" + name is the node-side veth: <= 15
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
_MAX_HOSTS: Final = 250
_PREFIXLEN4: Final = 24
_PREFIXLEN6: Final = 64

# linux/if_addr.h, linux/if_link.h
_IFA_F_NODAD: Final = 0x02
_IFA_F_DADFAILED: Final = 0x08
_IFA_F_TENTATIVE: Final = 0x40
_IN6_ADDR_GEN_MODE_NONE: Final = 1
_NO_IPV6_AUTOCONF: Final = {
    "attrs": [["AF_INET6", {"attrs": [["IFLA_INET6_ADDR_GEN_MODE", _IN6_ADDR_GEN_MODE_NONE]]}]]
}

_ADDRESS_TIMEOUT: Final = 5.0  # seconds for addresses to leave the tentative state
_KILL_WAIT: Final = 2.0  # seconds for SIGKILLed processes to disappear


class TopologyError(RuntimeError):
    """The topology could not be built, used or completely removed."""


@dataclass(frozen=True)
class Host:
    """One host (a pod, or the sidecar-less "outside") and its addresses, without prefix lengths.

    ``ip4``/``ip6`` are inside the intercepted cluster ranges (10.0.0.0/8,
    fc00::/7); ``ip4_plain``/``ip6_plain`` are outside every cluster range.
    """

    name: str
    netns: str
    ip4: str
    ip4_plain: str
    ip6: str
    ip6_plain: str


def sigterm_unwinds() -> None:
    """Make SIGTERM raise KeyboardInterrupt in this process, so that a ``with
    Topology()`` block tears everything down as on Ctrl-C.

    pyroute2 forks helpers that inherit the handler and get SIGTERM when done:
    in them it just exits, or they would run our teardown too.
    """

    def interrupt() -> None:
        raise KeyboardInterrupt

    _on_sigterm(interrupt)


def sigterm_sets(event: threading.Event) -> None:
    """Make SIGTERM set ``event`` in this process (and end pyroute2's forked helpers).

    For a loop that can stop between steps (the fuzz campaign): an exception
    raised by a signal handler lands wherever the main thread happens to be, and
    is lost if that is a gc callback or a ``__del__``.
    """
    _on_sigterm(event.set)


def _on_sigterm(action: Callable[[], None]) -> None:
    main_pid = os.getpid()

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != main_pid:
            os._exit(0)
        action()

    signal.signal(signal.SIGTERM, handler)


def _ip_binary() -> str:
    found = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
    if found is None:
        raise TopologyError("the iproute2 `ip` tool is not installed")
    return found


def _netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def _hosts_of(prefix: str, names: Sequence[str]) -> dict[str, Host]:
    digest = hashlib.sha256(prefix.encode()).digest()
    x = 1 + digest[0] % 254
    net4 = ipaddress.IPv4Network(f"10.{x}.0.0/{_PREFIXLEN4}")
    net4_plain = ipaddress.IPv4Network(f"198.18.{x}.0/{_PREFIXLEN4}")
    ula = ipaddress.IPv6Address(b"\xfd" + digest[1:6] + bytes(10))
    net6 = ipaddress.IPv6Network(f"{ula}/{_PREFIXLEN6}")
    net6_plain = ipaddress.IPv6Network(f"2001:db8:{x:x}::/{_PREFIXLEN6}")
    return {
        name: Host(
            name=name,
            netns=f"{prefix}-{name}",
            ip4=str(net4[n]),
            ip4_plain=str(net4_plain[n]),
            ip6=str(net6[n]),
            ip6_plain=str(net6_plain[n]),
        )
        for n, name in enumerate(names, start=1)
    }


def _listens(ss_output: str, ip: str, port: int) -> bool:
    """Whether a ``ss -Htln`` line shows a socket that accepts connections to ``ip:port``."""
    want = ipaddress.ip_address(ip)
    for line in ss_output.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        address, _, port_text = fields[3].rpartition(":")
        if port_text != str(port):
            continue
        address = address.partition("%")[0].strip("[]")  # "[::1]", "0.0.0.0%eth0"
        if address == "*":  # IPv6 wildcard that also takes IPv4
            return True
        local = ipaddress.ip_address(address)
        if isinstance(local, ipaddress.IPv6Address) and local.ipv4_mapped is not None:
            local = local.ipv4_mapped
        if local == want or (local.is_unspecified and local.version == want.version):
            return True
    return False


class _DeferInterrupts:
    """Hold SIGINT (Ctrl-C) back until the block is done, then deliver it.

    Cleanup interrupted half way would leak namespaces. The handler can only be
    swapped in the main thread; elsewhere this does nothing.
    """

    def __init__(self) -> None:
        self._previous: Any = None
        self._received = False
        self._active = False

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self._received = True

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        if previous is None:  # installed from C: cannot be restored from Python
            return
        self._previous = previous
        signal.signal(signal.SIGINT, self._note)
        self._active = True

    def __exit__(self, *exc_info: object) -> None:
        if not self._active:
            return
        signal.signal(signal.SIGINT, self._previous)
        if self._received:
            signal.raise_signal(signal.SIGINT)


_live: weakref.WeakSet[Topology] = weakref.WeakSet()


@atexit.register
def _destroy_forgotten() -> None:
    for topo in list(_live):
        try:
            topo.destroy()
        except Exception as exc:  # nothing left to raise to at exit
            print(f"lab.topology: at exit: {exc}", file=sys.stderr)


class Topology:
    """Namespaces, bridge, veths and addresses of one run; see the module docstring.

    Use as ``with Topology() as topo: ...`` or ``topo = Topology().create()``
    followed by ``topo.destroy()`` in a ``finally``.
    """

    def __init__(
        self,
        prefix: str | None = None,
        hosts: Iterable[str] = DEFAULT_HOSTS,
        *,
        kill_grace: float = 2.0,
    ) -> None:
        self.prefix = prefix if prefix is not None else f"tpt-{secrets.token_hex(3)}"
        if not _PREFIX.fullmatch(self.prefix):
            raise ValueError(f"bad namespace prefix {self.prefix!r}: want [A-Za-z0-9_.-], no '/'")
        names = tuple(hosts)
        if not 1 <= len(names) <= _MAX_HOSTS:
            raise ValueError(f"want 1 to {_MAX_HOSTS} hosts, got {len(names)}")
        for name in names:
            if not _HOST_NAME.fullmatch(name) or name == NODE:
                raise ValueError(
                    f"bad host name {name!r}: want [a-z][a-z0-9-]*, at most 14 characters, "
                    f"not {NODE!r}"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate host names in {names}")
        self.kill_grace = kill_grace
        self.node_netns = f"{self.prefix}-{NODE}"
        self._hosts = _hosts_of(self.prefix, names)
        self._state = "new"  # -> "creating" -> "up" -> "destroyed"
        self._claimed = False  # the prefix was free and is ours to remove
        self._owned: list[str] = []  # namespaces this object created, in order
        self._procs: list[subprocess.Popen[Any]] = []

    def __repr__(self) -> str:
        return f"<Topology {self.prefix!r} {self._state} hosts={list(self._hosts)}>"

    # -- description ---------------------------------------------------------

    @property
    def hosts(self) -> tuple[Host, ...]:
        return tuple(self._hosts.values())

    @property
    def namespaces(self) -> list[str]:
        """Every namespace name of this topology, node first."""
        return [self.node_netns, *(h.netns for h in self._hosts.values())]

    def host(self, name: str) -> Host:
        try:
            return self._hosts[name]
        except KeyError:
            raise KeyError(f"no host {name!r} in {self!r}") from None

    def netns_of(self, name: str) -> str:
        """The namespace of host ``name``, or of the bridge for :data:`NODE`."""
        return self.node_netns if name == NODE else self.host(name).netns

    # -- building ------------------------------------------------------------

    def create(self) -> Topology:
        """Build everything; on any failure (or Ctrl-C) remove what was built and re-raise."""
        if self._state != "new":
            raise TopologyError(f"create() called on a topology that is {self._state}")
        self._state = "creating"
        _live.add(self)
        try:
            clash = leftovers(self.prefix)
            if clash:
                raise TopologyError(
                    f"namespaces with prefix {self.prefix!r} already exist: {clash}"
                )
            self._claimed = True
            for name in self.namespaces:
                self._create_namespace(name)
            self._build_node()
            for host in self._hosts.values():
                self._setup_host(host)
        except BaseException as exc:
            try:
                self.destroy()
            except Exception as cleanup:  # the original error matters most
                exc.add_note(f"cleanup after the failed create() also failed: {cleanup}")
            raise
        self._state = "up"
        return self

    def _create_namespace(self, name: str) -> None:
        # pyroute2 creates it in a forked child that an interrupt would not stop:
        # hold Ctrl-C back so that the namespace exists and is recorded, or neither.
        with _DeferInterrupts():
            try:
                netns.create(name)
            except FileExistsError:
                # Another run claimed the same prefix at the same time: not ours to remove.
                raise TopologyError(f"namespace {name!r} appeared while creating it") from None
            except BaseException:
                self._owned.append(name)  # a partial failure may leave the file behind
                raise
            self._owned.append(name)

    def _build_node(self) -> None:
        with IPRoute(netns=self.node_netns) as ipr:
            ipr.link("add", ifname="br0", kind="bridge", br_mcast_snooping=0)
            (bridge,) = ipr.link_lookup(ifname="br0")
            ipr.link("set", index=bridge, IFLA_AF_SPEC=_NO_IPV6_AUTOCONF)
            ipr.link("set", index=bridge, state="up")
            for host in self._hosts.values():
                port = f"v{host.name}"
                fd = os.open(_netns_path(host.netns), os.O_RDONLY)
                try:
                    ipr.link(
                        "add",
                        ifname=port,
                        kind="veth",
                        master=bridge,
                        peer={"ifname": "eth0", "net_ns_fd": fd},
                    )
                finally:
                    os.close(fd)
                (index,) = ipr.link_lookup(ifname=port)
                # The kernel rejects IFLA_AF_SPEC in the creating request (EAFNOSUPPORT).
                ipr.link("set", index=index, IFLA_AF_SPEC=_NO_IPV6_AUTOCONF)
                ipr.link("set", index=index, state="up")

    def _setup_host(self, host: Host) -> None:
        addresses = [
            (host.ip4, _PREFIXLEN4),
            (host.ip4_plain, _PREFIXLEN4),
            (host.ip6, _PREFIXLEN6),
            (host.ip6_plain, _PREFIXLEN6),
            (f"fe80::{list(self._hosts).index(host.name) + 1:x}", _PREFIXLEN6),
        ]
        with IPRoute(netns=host.netns) as ipr:
            (lo,) = ipr.link_lookup(ifname="lo")
            ipr.link("set", index=lo, state="up")
            (eth0,) = ipr.link_lookup(ifname="eth0")
            ipr.link("set", index=eth0, IFLA_AF_SPEC=_NO_IPV6_AUTOCONF)
            for address, prefixlen in addresses:
                ipr.addr(
                    "add", index=eth0, address=address, prefixlen=prefixlen, flags=_IFA_F_NODAD
                )
            ipr.link("set", index=eth0, state="up")
            deadline = time.monotonic() + _ADDRESS_TIMEOUT
            while True:
                pending = []
                for msg in ipr.get_addr(index=eth0):
                    flags = msg.get("IFA_FLAGS") or msg["flags"]
                    if flags & _IFA_F_DADFAILED:
                        raise TopologyError(
                            f"{host.netns}: DAD failed for {msg.get('IFA_ADDRESS')}"
                        )
                    if flags & _IFA_F_TENTATIVE:
                        pending.append(msg.get("IFA_ADDRESS"))
                if not pending:
                    return
                if time.monotonic() > deadline:
                    raise TopologyError(f"{host.netns}: addresses still tentative: {pending}")
                time.sleep(0.01)

    # -- processes -----------------------------------------------------------

    def _exec_argv(self, name: str, argv: Sequence[str]) -> list[str]:
        if self._state != "up":
            raise TopologyError(f"{self!r} is not up")
        # `ip netns exec` execs the command in place: the PID is the program's own.
        return [_ip_binary(), "netns", "exec", self.netns_of(name), *argv]

    def popen(self, host_name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the host's namespace; ``destroy()`` will end it if still running."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self._exec_argv(host_name, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def run(
        self,
        host_name: str,
        argv: Sequence[str],
        timeout: float = 30.0,
        *,
        check: bool = False,
        input: str | None = None,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion inside the host's namespace; output is captured as text."""
        kwargs.setdefault("capture_output", True)
        return subprocess.run(
            self._exec_argv(host_name, argv),
            timeout=timeout,
            check=check,
            input=input,
            text=True,
            **kwargs,
        )

    def stop(
        self, proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 5
    ) -> int:
        """Send ``sig``, wait up to ``timeout`` seconds, then SIGKILL; return the returncode."""
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(_KILL_WAIT)
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    def wait_port(
        self,
        host_name: str,
        ip: str,
        port: int,
        timeout: float = 10.0,
        *,
        proc: subprocess.Popen[Any] | None = None,
        protocol: str = "tcp",
    ) -> None:
        """Wait until a TCP socket in the host's namespace listens for ``ip:port``
        (``protocol="udp"``: a UDP socket is bound to it).

        Wildcard listeners count (0.0.0.0 for IPv4, [::] for IPv6, a dual-stack
        ``*`` for both). It looks at ``ss`` instead of connecting, so the server
        never sees a probe connection. If ``proc`` exits first, raise
        :class:`TopologyError` at once; after ``timeout`` raise ``TimeoutError``.
        """
        deadline = time.monotonic() + timeout
        while True:
            if proc is not None and proc.poll() is not None:
                raise TopologyError(
                    f"process {proc.args!r} exited with {proc.returncode} "
                    f"before listening on {ip} port {port} in {host_name}"
                )
            flags = "-Huln" if protocol == "udp" else "-Htln"
            listing = self.run(host_name, ["ss", flags], timeout=timeout, check=True)
            if _listens(listing.stdout, ip, port):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {ip} port {port} in {host_name}")
            time.sleep(0.02)

    def _inodes(self) -> set[tuple[int, int]]:
        """(device, inode) of each of our namespaces, as ``stat`` shows them."""
        inodes = set()
        for name in self._owned:
            try:
                st = os.stat(_netns_path(name))
            except FileNotFoundError:
                continue
            inodes.add((st.st_dev, st.st_ino))
        return inodes

    def _pids_inside(self) -> list[int]:
        """PIDs of live processes whose network namespace is one of ours."""
        inodes = self._inodes()
        pids = [pid for pid in _all_pids() if _netns_inode(pid) in inodes]
        if os.getpid() in pids:
            raise TopologyError("this very process is inside one of the namespaces to remove")
        return pids

    def _end_processes(self) -> None:
        """SIGTERM, grace, SIGKILL: tracked processes by PID, the rest found by namespace."""
        pidfds: dict[int, int] = {}
        try:
            for sig, wait in ((signal.SIGTERM, self.kill_grace), (signal.SIGKILL, _KILL_WAIT)):
                tracked = {p.pid for p in self._procs}
                for proc in self._procs:
                    if proc.poll() is None:
                        proc.send_signal(sig)
                for pid in self._pids_inside():
                    if pid in tracked:
                        continue
                    if pid not in pidfds:
                        try:
                            pidfd = os.pidfd_open(pid)
                        except ProcessLookupError:
                            continue
                        if _netns_inode(pid) not in self._inodes():
                            os.close(pidfd)  # it ended and its PID was reused meanwhile
                            continue
                        pidfds[pid] = pidfd
                    try:
                        signal.pidfd_send_signal(pidfds[pid], sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + wait
                while True:
                    alive = [p.pid for p in self._procs if p.poll() is None]
                    alive += [pid for pid in self._pids_inside() if not _exited(pidfds.get(pid))]
                    if not alive or time.monotonic() > deadline:
                        break
                    time.sleep(0.01)
                if not alive:
                    break
            else:
                raise TopologyError(f"processes survived SIGKILL: {alive}")
        finally:
            for fd in pidfds.values():
                os.close(fd)
        self._procs.clear()

    # -- teardown ------------------------------------------------------------

    def destroy(self) -> None:
        """End every process, remove every namespace; raise if anything of the prefix remains."""
        with _DeferInterrupts():
            errors: list[str] = []
            try:
                self._end_processes()
            except Exception as exc:  # still remove the namespaces
                errors.append(f"ending processes: {exc}")
            for name in list(reversed(self._owned)):
                try:
                    netns.remove(name)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    errors.append(f"removing {name}: {exc}")
                    continue
                self._owned.remove(name)
            if self._state != "new":
                self._state = "destroyed"
            remaining = leftovers(self.prefix) if self._claimed else []
            if errors or remaining:
                raise TopologyError(
                    f"{self.prefix}: incomplete teardown; still present: {remaining}; "
                    + "; ".join(errors)
                )
            _live.discard(self)

    def __enter__(self) -> Topology:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()


def _exited(pidfd: int | None) -> bool:
    """Whether the process behind ``pidfd`` has exited (a pidfd polls readable then)."""
    if pidfd is None:
        return False
    return bool(select.select([pidfd], [], [], 0)[0])


def _all_pids() -> list[int]:
    return [int(entry.name) for entry in os.scandir("/proc") if entry.name.isdigit()]


def _netns_inode(pid: int) -> tuple[int, int] | None:
    """(device, inode) of the network namespace of ``pid``; None if gone or a zombie."""
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return st.st_dev, st.st_ino

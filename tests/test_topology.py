"""The namespace topology that the demo, the integration tests and the benchmarks stand on.

The tests marked ``netns`` build real namespaces; the others check the naming
and address plan without touching the kernel.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lab.netns import leftovers
from lab.topology import NODE, Host, Topology, TopologyError, _listens
from trio_tproxy.config import DEFAULT_INTERCEPT_CIDRS

KINDS = ("ip4", "ip4_plain", "ip6", "ip6_plain")
ECHO_PORT = 7070

# Accepts forever on every address of the host and answers each connection with the
# address it came from, so a client learns which source address the kernel chose.
ECHO_SERVER = """
import socket
s = socket.create_server(("::", int(__import__("sys").argv[1])),
                         family=socket.AF_INET6, dualstack_ipv6=True)
while True:
    c, peer = s.accept()
    ip = peer[0].removeprefix("::ffff:")
    c.sendall(ip.encode())
    c.close()
"""
ECHO_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
    print(c.recv(100).decode())
"""


def ip_json(topo: Topology, host: str, *args: str) -> list[dict[str, Any]]:
    done = topo.run(host, ["ip", "-j", *args], check=True)
    result: list[dict[str, Any]] = json.loads(done.stdout)
    return result


def root_links() -> set[str]:
    done = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True)
    return {str(link["ifname"]) for link in json.loads(done.stdout)}


def netns_inode(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def pid_gone(pid: int, timeout: float = 2.0) -> bool:
    """Whether ``pid`` disappears (exits and is reaped, or is a zombie) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


# -- the plan, without the kernel ---------------------------------------------


def test_default_prefixes_are_random_and_names_derive_from_them() -> None:
    one, two = Topology(), Topology()
    assert one.prefix != two.prefix
    assert one.prefix.startswith("tpt-") and len(one.prefix) == len("tpt-") + 6
    assert one.namespaces == [f"{one.prefix}-{n}" for n in ("node", "a", "b", "outside")]
    assert one.host("b").netns == f"{one.prefix}-b"
    assert one.netns_of(NODE) == f"{one.prefix}-node"


def test_address_plan_separates_cluster_and_plain_ranges() -> None:
    topo = Topology(prefix="tpt-plan")
    cluster = DEFAULT_INTERCEPT_CIDRS
    seen: set[str] = set()
    for n, host in enumerate(topo.hosts, start=1):
        ip4, ip4_plain = ipaddress.IPv4Address(host.ip4), ipaddress.IPv4Address(host.ip4_plain)
        ip6, ip6_plain = ipaddress.IPv6Address(host.ip6), ipaddress.IPv6Address(host.ip6_plain)
        assert ip4 in ipaddress.ip_network("10.0.0.0/8")
        assert ip6 in ipaddress.ip_network("fc00::/7")
        assert any(ip4 in net for net in cluster) and any(ip6 in net for net in cluster)
        assert not any(ip4_plain in net for net in cluster if net.version == 4)
        assert not any(ip6_plain in net for net in cluster if net.version == 6)
        assert ip4_plain in ipaddress.ip_network("198.18.0.0/16")
        assert ip6_plain in ipaddress.ip_network("2001:db8::/32")
        # Host n is .n / ::n in every range, so the hosts share each /24 and /64.
        assert {int(ip4) & 0xFF, int(ip4_plain) & 0xFF, int(ip6) & 0xFFFF} == {n}
        assert int(ip6_plain) & 0xFFFF == n
        seen |= {host.ip4, host.ip4_plain, host.ip6, host.ip6_plain}
    assert len(seen) == 4 * len(topo.hosts)
    nets = {str(ipaddress.ip_interface(f"{h.ip6}/64").network) for h in topo.hosts}
    assert len(nets) == 1
    assert topo.host("a").ip6 != Topology(prefix="tpt-plan2").host("a").ip6


@pytest.mark.parametrize(
    ("prefix", "hosts"),
    [
        ("bad/prefix", ("a",)),
        ("", ("a",)),
        ("tpt-x", ("node",)),
        ("tpt-x", ("a", "a")),
        ("tpt-x", ("fifteen-chars-x",)),
        ("tpt-x", ("Upper",)),
        ("tpt-x", ()),
    ],
)
def test_bad_prefixes_and_host_names_are_refused(prefix: str, hosts: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        Topology(prefix=prefix, hosts=hosts)


SS_LISTING = """\
LISTEN 0      128               0.0.0.0:8001 0.0.0.0:*
LISTEN 0      128                     *:8002       *:*
LISTEN 0      128                  [::]:8003    [::]:*
LISTEN 0      128                 [::1]:8004    [::]:*
LISTEN 0      128    [::ffff:127.0.0.1]:8005       *:*
LISTEN 0      128         10.1.0.2%eth0:8006 0.0.0.0:*
"""


@pytest.mark.parametrize(
    ("ip", "port", "expected"),
    [
        ("10.1.0.2", 8001, True),  # IPv4 wildcard
        ("fd00::2", 8001, False),
        ("10.1.0.2", 8002, True),  # dual-stack wildcard takes both families
        ("fd00::2", 8002, True),
        ("fd00::2", 8003, True),  # IPv6-only wildcard
        ("10.1.0.2", 8003, False),
        ("::1", 8004, True),
        ("fd00::2", 8004, False),
        ("127.0.0.1", 8005, True),  # v4-mapped
        ("10.1.0.2", 8006, True),  # bound to a device
        ("10.1.0.2", 8007, False),
        ("10.1.0.2", 800, False),
    ],
)
def test_listening_sockets_are_matched_like_the_kernel_would(
    ip: str, port: int, expected: bool
) -> None:
    assert _listens(SS_LISTING, ip, port) is expected


# -- the real thing -------------------------------------------------------------


@pytest.mark.netns
def test_every_host_has_its_addresses_up_and_none_tentative(topology: Topology) -> None:
    for n, host in enumerate(topology.hosts, start=1):
        (eth0,) = ip_json(topology, host.name, "addr", "show", "dev", "eth0")
        assert eth0["operstate"] == "UP"
        infos = eth0["addr_info"]
        assert {(a["local"], a["prefixlen"]) for a in infos} == {
            (host.ip4, 24),
            (host.ip4_plain, 24),
            (host.ip6, 64),
            (host.ip6_plain, 64),
            (f"fe80::{n:x}", 64),
        }
        assert not [a for a in infos if a.get("tentative") or a.get("dadfailed")]
        (lo,) = ip_json(topology, host.name, "link", "show", "dev", "lo")
        assert "UP" in lo["flags"]


@pytest.mark.netns
def test_node_bridges_one_port_per_host(topology: Topology) -> None:
    (bridge,) = ip_json(topology, NODE, "link", "show", "dev", "br0")
    assert bridge["operstate"] == "UP"
    ports = ip_json(topology, NODE, "link", "show", "master", "br0")
    assert {p["ifname"] for p in ports} == {f"v{h.name}" for h in topology.hosts}
    assert all(p["operstate"] == "UP" for p in ports)
    # No IPv6 (so no duplicate address detection) on the bridge or its ports.
    assert ip_json(topology, NODE, "-6", "addr") == []


@pytest.fixture(scope="module")
def echo_servers(topology: Topology) -> Iterator[None]:
    procs = {
        h.name: topology.popen(h.name, [sys.executable, "-c", ECHO_SERVER, str(ECHO_PORT)])
        for h in topology.hosts
    }
    try:
        for name, proc in procs.items():
            topology.wait_port(name, topology.host(name).ip4, ECHO_PORT, timeout=10, proc=proc)
        yield
    finally:
        for proc in procs.values():
            topology.stop(proc)


@pytest.mark.netns
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("src", "dst"),
    [("a", "b"), ("b", "a"), ("a", "outside"), ("outside", "a"), ("outside", "b")],
)
def test_hosts_reach_each_other_on_link_at_each_address(
    topology: Topology, echo_servers: None, src: str, dst: str, kind: str
) -> None:
    target = getattr(topology.host(dst), kind)
    done = topology.run(src, [sys.executable, "-c", ECHO_CLIENT, target, str(ECHO_PORT)])
    assert done.returncode == 0, done.stderr
    # The server saw the client's address of the same kind: direct, on-link, no NAT.
    assert done.stdout.strip() == getattr(topology.host(src), kind)


@pytest.mark.netns
def test_wait_port_times_out_then_sees_a_late_listener(topology: Topology) -> None:
    a = topology.host("a")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=f"{a.ip6} port 7071"):
        topology.wait_port("a", a.ip6, 7071, timeout=0.3)
    assert time.monotonic() - started < 3
    late = (
        "import socket, time; time.sleep(0.5); "
        f"s = socket.create_server(('{a.ip6}', 7071), family=socket.AF_INET6); time.sleep(30)"
    )
    proc = topology.popen("a", [sys.executable, "-c", late])
    try:
        topology.wait_port("a", a.ip6, 7071, timeout=10, proc=proc)
        assert proc.poll() is None
        # Bound to one address: another address on the same port does not count.
        with pytest.raises(TimeoutError):
            topology.wait_port("a", a.ip6_plain, 7071, timeout=0.1)
    finally:
        assert topology.stop(proc) == -signal.SIGTERM


@pytest.mark.netns
def test_wait_port_stops_waiting_when_the_server_dies(topology: Topology) -> None:
    proc = topology.popen("b", [sys.executable, "-c", "raise SystemExit(3)"])
    started = time.monotonic()
    with pytest.raises(TopologyError, match="exited with 3"):
        topology.wait_port("b", topology.host("b").ip4, 7072, timeout=30, proc=proc)
    assert time.monotonic() - started < 10


@pytest.mark.netns
def test_popen_runs_the_program_itself_inside_the_namespace(topology: Topology) -> None:
    proc = topology.popen("outside", ["sleep", "60"])
    inside = netns_inode(f"/run/netns/{topology.host('outside').netns}")

    def where() -> tuple[str, tuple[int, int]]:
        with open(f"/proc/{proc.pid}/comm") as f:
            return f.read().strip(), netns_inode(f"/proc/{proc.pid}/ns/net")

    try:
        deadline = time.monotonic() + 5
        while where() != ("sleep", inside) and time.monotonic() < deadline:
            time.sleep(0.01)  # `ip` is still entering the namespace and exec'ing
        # The PID we track is sleep's own (`ip netns exec` execs in place), in the namespace.
        assert where() == ("sleep", inside)
    finally:
        assert topology.stop(proc) == -signal.SIGTERM


@pytest.mark.netns
def test_stop_escalates_to_sigkill(topology: Topology) -> None:
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"
    proc = topology.popen("a", [sys.executable, "-c", stubborn], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"1\n"
        started = time.monotonic()
        assert topology.stop(proc, timeout=0.3) == -signal.SIGKILL
        assert time.monotonic() - started < 3
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.netns
def test_two_live_topologies_do_not_share_names_or_addresses(
    make_topology: Callable[..., Topology],
) -> None:
    before = root_links()
    one, two = make_topology(), make_topology()
    assert set(one.namespaces).isdisjoint(two.namespaces)
    assert leftovers(one.prefix) == sorted(one.namespaces)
    assert leftovers(two.prefix) == sorted(two.namespaces)
    assert one.host("a").ip6 != two.host("a").ip6
    # Both have their own br0/eth0; none of it was created in the root namespace.
    for topo in (one, two):
        (eth0,) = ip_json(topo, "a", "addr", "show", "dev", "eth0")
        assert topo.host("a").ip4 in {a["local"] for a in eth0["addr_info"]}
    ours = {"br0", "eth0", "va", "vb", "voutside"}
    assert not (root_links() - before) & ours


@pytest.mark.netns
def test_a_taken_prefix_is_refused_without_touching_its_owner(netns_prefix: str) -> None:
    with Topology(prefix=netns_prefix) as first:
        with pytest.raises(TopologyError, match="already exist"):
            Topology(prefix=netns_prefix).create()
        assert leftovers(netns_prefix) == sorted(first.namespaces)
        assert first.run("a", ["true"]).returncode == 0
    assert leftovers(netns_prefix) == []


@pytest.mark.netns
def test_leftovers_matches_the_prefix_not_longer_names(netns_prefix: str) -> None:
    with (
        Topology(prefix=netns_prefix, hosts=("a",)),
        Topology(prefix=netns_prefix + "x", hosts=("a",)),
    ):
        assert leftovers(netns_prefix) == [f"{netns_prefix}-a", f"{netns_prefix}-node"]
    assert leftovers(netns_prefix) == [] and leftovers(netns_prefix + "x") == []


@pytest.mark.netns
def test_destroy_ends_every_process_and_is_idempotent(netns_prefix: str) -> None:
    topo = Topology(prefix=netns_prefix, kill_grace=0.5).create()
    try:
        sleeper = topo.popen("a", ["sleep", "600"])
        # A shell whose background child is not tracked: found by its namespace.
        shell = topo.popen("b", ["sh", "-c", "sleep 600 & echo $!; wait"], stdout=subprocess.PIPE)
        assert shell.stdout is not None
        orphan = int(shell.stdout.readline())
        shell.stdout.close()
        stubborn = topo.popen(
            "outside",
            ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"],
            stdout=subprocess.PIPE,
        )
        assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
        stubborn.stdout.close()
    finally:
        started = time.monotonic()
        topo.destroy()
    assert time.monotonic() - started < 5
    assert sleeper.returncode == -signal.SIGTERM
    assert shell.returncode == -signal.SIGTERM
    assert stubborn.returncode == -signal.SIGKILL
    assert pid_gone(orphan)
    assert leftovers(netns_prefix) == []
    topo.destroy()  # a second call finds nothing to do and does not raise
    with pytest.raises(TopologyError, match="not up"):
        topo.popen("a", ["true"])


@pytest.mark.netns
def test_an_error_inside_the_with_block_still_removes_everything(netns_prefix: str) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with Topology(prefix=netns_prefix) as topo:
            proc = topo.popen("a", ["sleep", "600"])
            assert len(leftovers(netns_prefix)) == 4
            raise RuntimeError("boom")
    assert proc.returncode == -signal.SIGTERM
    assert leftovers(netns_prefix) == []


@pytest.mark.netns
def test_ctrl_c_half_way_through_create_removes_what_was_built(
    netns_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    setup_host = Topology._setup_host

    def interrupted(self: Topology, host: Host) -> None:
        if host.name == "b":
            seen.append(leftovers(netns_prefix))
            raise KeyboardInterrupt
        setup_host(self, host)

    monkeypatch.setattr(Topology, "_setup_host", interrupted)
    topo = Topology(prefix=netns_prefix)
    with pytest.raises(KeyboardInterrupt):
        topo.create()
    assert seen == [sorted(topo.namespaces)]  # it really was half built
    assert leftovers(netns_prefix) == []
    topo.destroy()


@pytest.mark.netns
def test_create_and_destroy_are_quick(netns_prefix: str) -> None:
    topo = Topology(prefix=netns_prefix)
    started = time.monotonic()
    topo.create()
    created = time.monotonic()
    topo.destroy()
    done = time.monotonic()
    print(f"create {created - started:.3f}s destroy {done - created:.3f}s")
    assert created - started < 5
    assert done - created < 5


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt during the test, as in an interactive run.

    A pytest started with SIGINT ignored (``nohup ... &`` does that) inherits
    SIG_IGN, and Python then installs no handler of its own.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.netns
@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_during_destroy_is_held_until_cleanup_is_done(
    netns_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    end_processes = Topology._end_processes

    def interrupted(self: Topology) -> None:
        signal.raise_signal(signal.SIGINT)  # as if Ctrl-C arrived now
        end_processes(self)

    topo = Topology(prefix=netns_prefix).create()
    proc = topo.popen("b", ["sleep", "600"])
    monkeypatch.setattr(Topology, "_end_processes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        topo.destroy()
    assert proc.returncode == -signal.SIGTERM
    assert leftovers(netns_prefix) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.netns
def test_ctrl_c_in_a_program_using_the_topology_leaves_nothing(netns_prefix: str) -> None:
    # The default handler first: a pytest started with SIGINT ignored (nohup) would
    # pass SIG_IGN on, and the Ctrl-C below would never arrive.
    script = f"""
import signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from lab.topology import Topology
with Topology(prefix={netns_prefix!r}) as topo:
    topo.popen("a", ["sleep", "600"])
    print("up", flush=True)
    time.sleep(600)
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        assert len(leftovers(netns_prefix)) == 4
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"KeyboardInterrupt" in err
    assert proc.returncode == -signal.SIGINT  # how Python ends on an uncaught Ctrl-C
    assert leftovers(netns_prefix) == []

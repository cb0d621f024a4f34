"""trio_tproxy.nft: golden renderings, nft --check, the runner, error classification.

Rendering tests need nothing. Tests that run nft are marked ``netns`` and do it
inside a network namespace of their own, named under the session prefix
(:func:`lab.netns.scratch_netns`) and deleted afterwards even on failure.
Regenerate the golden files with ``UPDATE_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from lab.netns import next_prefix, scratch_netns
from lab.require import skip_or_fail
from trio_tproxy.config import Interception
from trio_tproxy.interception import Installer, fingerprint, transaction
from trio_tproxy.nft import (
    Nft,
    NftError,
    NftErrorKind,
    classify,
    one_line,
    render,
    render_delete,
)

GOLDEN = Path(__file__).parent / "golden"
net = ipaddress.ip_network

CONFIGS: dict[str, Interception] = {
    "default": Interception(),
    "excludes": Interception(
        exclude_cidrs=(net("10.96.0.0/12"), net("fd00:10::/64"), net("192.168.1.10/32")),
        exclude_inbound_ports=(15021, 22, 15021),
        exclude_outbound_ports=(5432, 443),
    ),
    "custom": Interception(
        table="mesh_tproxy",
        tcp_port=15001,
        tls_port=15006,
        recirculate_mark=0x539,
        bypass_mark=0x53A,
        route_table=100,
        rule_priority=100,
    ),
    # Overlapping and duplicate CIDRs: nft rejects overlaps in an interval set.
    "ipv4_only": Interception(
        intercept_cidrs=(net("172.16.0.0/12"), net("10.1.0.0/16"), net("10.0.0.0/8")),
    ),
    "ipv6_only": Interception(intercept_cidrs=(net("fd00::/8"), net("2001:db8::/32"))),
    "everything": Interception(
        intercept_cidrs=(net("0.0.0.0/0"), net("::/0")),
        exclude_cidrs=(net("169.254.0.0/16"), net("fe80::/10")),
    ),
    # UDP over DTLS (opt-in): the only configurations with UDP rules.
    "udp": Interception(intercept_udp=True, exclude_udp_ports=(5060, 123)),
    "udp_ports_dns": Interception(
        intercept_udp=True,
        intercept_dns=True,
        udp_ports=(5353, 4789),
        udp_listen_port=15002,
        dtls_port=15007,
    ),
}


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def check_ns() -> Iterator[str]:
    """One namespace for the --check tests (they never change it)."""
    with scratch_netns() as name:
        yield name


@pytest.fixture
def netns() -> Iterator[str]:
    with scratch_netns() as name:
        yield name


class FakeRunner:
    """Records (argv, stdin) and answers with queued results (success by default)."""

    def __init__(self, *results: subprocess.CompletedProcess[str] | BaseException) -> None:
        self.calls: list[tuple[list[str], str]] = []
        self.results = list(results)

    def __call__(self, argv: Sequence[str], stdin: str) -> subprocess.CompletedProcess[str]:
        self.calls.append((list(argv), stdin))
        if not self.results:
            return subprocess.CompletedProcess(list(argv), 0, "", "")
        result = self.results.pop(0)
        if isinstance(result, BaseException):
            raise result
        return result


def failed(returncode: int, stderr: str, stdout: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess([], returncode, stdout, stderr)


def rule_lines(text: str) -> list[str]:
    """The rule lines of a rendering (inside chains, not type/comment lines)."""
    rules, in_chain = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("chain "):
            in_chain = True
        elif stripped == "}":
            in_chain = False
        elif in_chain and not stripped.startswith(("type ", "comment ")):
            rules.append(stripped)
    return rules


# --------------------------------------------------------------------------- render


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_render_matches_golden(name: str) -> None:
    text = render(CONFIGS[name])
    path = GOLDEN / f"{name}.nft"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run UPDATE_GOLDEN=1 pytest tests/test_nft.py"
    assert text == path.read_text(), f"{path} differs: review, then UPDATE_GOLDEN=1 to accept"


def test_render_is_one_replace_transaction() -> None:
    lines = [line for line in render(Interception()).splitlines() if not line.startswith("#")]
    assert lines[:3] == [
        "add table inet trio_tproxy",
        "delete table inet trio_tproxy",
        "table inet trio_tproxy {",
    ]
    assert lines[-1] == "}"
    assert render(Interception()).endswith("}\n")


def test_render_is_independent_of_input_order() -> None:
    a = Interception(
        intercept_cidrs=(net("10.0.0.0/8"), net("fc00::/7"), net("192.168.0.0/16")),
        exclude_cidrs=(net("10.96.0.0/12"), net("10.0.0.1/32")),
        exclude_inbound_ports=(22, 15021),
        exclude_outbound_ports=(443, 80, 443),
    )
    b = Interception(
        intercept_cidrs=(net("192.168.0.0/16"), net("fc00::/7"), net("10.0.0.0/8")),
        exclude_cidrs=(net("10.0.0.1/32"), net("10.96.0.0/12")),
        exclude_inbound_ports=(15021, 22),
        exclude_outbound_ports=(80, 443),
    )
    assert render(a) == render(b)
    assert "elements = { 80, 443 }" in render(a)
    assert "elements = { 10.0.0.1/32, 10.96.0.0/12 }" in render(a)


def test_overlapping_cidrs_are_collapsed() -> None:
    text = render(CONFIGS["ipv4_only"])
    assert "elements = { 10.0.0.0/8, 172.16.0.0/12 }" in text
    assert "10.1.0.0/16" not in text


def test_ipv6_only_leaves_cidrs4_empty_and_returns_all_ipv4() -> None:
    text = render(CONFIGS["ipv6_only"])
    cidrs4 = text.split("set cidrs4 {", 1)[1].split("}", 1)[0]
    assert "elements" not in cidrs4
    assert "elements = { 2001:db8::/32, fd00::/8 }" in text
    # Egress returns every IPv4 packet: an empty set matches nothing. Ingress
    # does not look at the destination at all.
    assert text.count("ip daddr != @cidrs4 return") == 1


def test_ipv4_only_leaves_cidrs6_empty() -> None:
    text = render(CONFIGS["ipv4_only"])
    cidrs6 = text.split("set cidrs6 {", 1)[1].split("}", 1)[0]
    assert "type ipv6_addr" in cidrs6
    assert "elements" not in cidrs6
    assert text.count("ip6 daddr != @cidrs6 return") == 1


def test_every_rule_says_what_it_is_for() -> None:
    rules = rule_lines(render(CONFIGS["excludes"]))
    assert len(rules) == 27
    for rule in rules:
        match = re.search(r' comment "([^"]+)"$', rule)
        assert match, f"rule without a comment: {rule}"
        assert len(match.group(1)) <= 128, "nft limits comments to 128 characters"


def test_custom_ports_marks_and_table_are_used() -> None:
    text = render(CONFIGS["custom"])
    assert "table inet mesh_tproxy {" in text
    assert "meta mark 1337 meta l4proto tcp tproxy ip to 127.0.0.1:15001 accept" in text
    assert "meta mark 1337 meta l4proto tcp tproxy ip6 to [::1]:15001 accept" in text
    assert "meta l4proto tcp tproxy ip to 127.0.0.1:15006 accept" in text
    assert "meta l4proto tcp tproxy ip6 to [::1]:15006 accept" in text
    assert "meta mark 1338 return" in text
    assert 'oifname != "lo" meta l4proto tcp meta mark set 1337' in text
    assert "trio_tproxy" not in text.replace("trio-tproxy", "")


def test_recirculated_egress_is_matched_before_ingress_exclusions() -> None:
    # An excluded inbound port may be another pod's service port: looped-back
    # egress to it must still reach the plaintext listener.
    # And a looped-back packet no listener takes is refused right there.
    rules = chain_rules(render(CONFIGS["excludes"]), "prerouting")
    first_exclusion = next(i for i, r in enumerate(rules) if "@in_ports" in r)
    egress = [i for i, r in enumerate(rules) if r.startswith("meta mark 10 ")]
    assert egress == [0, 1, 2]
    assert "reject with tcp reset" in rules[2]
    assert max(egress) < first_exclusion


def chain_rules(text: str, chain: str) -> list[str]:
    """The rule lines of one chain, in order."""
    body = text.split(f"\tchain {chain} {{\n", 1)[1].split("\n\t}", 1)[0]
    return [r for r in rule_lines(f"\tchain {chain} {{\n{body}\n\t}}") if r]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_tproxy_rule_is_followed_by_a_reject_for_the_same_match(name: str) -> None:
    # tproxy falls through (NFT_BREAK) when no transparent socket listens: the
    # next verdict for the same packets must refuse them, never the accept policy.
    ic = CONFIGS[name]
    every = chain_rules(render(ic), "prerouting")

    # TCP's rules here, UDP's (the --intercept-udp configurations) below.
    def is_udp(rule: str) -> bool:
        return (" udp " in rule or "udp dport" in rule) and "{ tcp, udp }" not in rule

    rules = [r for r in every if not is_udp(r)]
    mark = f"meta mark {ic.recirculate_mark} "
    egress = [i for i, r in enumerate(rules) if r.startswith(mark) and " tproxy " in r]
    assert len(egress) == 2
    assert rules[max(egress) + 1].startswith(f"{mark}meta l4proto tcp reject with tcp reset ")
    ingress = [i for i, r in enumerate(rules) if " tproxy " in r and not r.startswith(mark)]
    assert len(ingress) == 2
    tail = rules[max(ingress) + 1 :]
    assert [r.split(" comment ")[0] for r in tail] == [
        "ct state invalid drop",
        "ct state new tcp flags & (fin | syn | rst | ack) != syn drop",
        "meta l4proto tcp reject with tcp reset",
    ]
    # nothing in this chain accepts other than through tproxy
    assert all(" tproxy " in r for r in every if " accept " in r)
    udp = [r.split(" comment ")[0] for r in every if is_udp(r)]
    reject = "reject with icmpx type port-unreachable"
    if not ic.intercept_udp:
        assert udp == []
        return
    u, d = ic.udp_listen_port, ic.dtls_port
    assert udp == [
        f"{mark}meta l4proto udp tproxy ip to 127.0.0.1:{u} accept",
        f"{mark}meta l4proto udp tproxy ip6 to [::1]:{u} accept",
        f"{mark}meta l4proto udp {reject}",
        "udp dport @udp_exclude return",
        f"udp dport {d} tproxy ip to 127.0.0.1:{d} accept",
        f"udp dport {d} tproxy ip6 to [::1]:{d} accept",
        f"meta l4proto udp {reject}",
    ]
    # the UDP refusals end the chain, each right after its tproxy pair
    assert every[-1].startswith(f"meta l4proto udp {reject} ")
    assert every.index(
        next(r for r in every if r.startswith(f"{mark}meta l4proto udp reject"))
    ) == (
        every.index(next(r for r in every if r.startswith(f"{mark}meta l4proto udp tproxy ip6")))
        + 1
    )


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ingress_intercepts_every_destination(name: str) -> None:
    rules = chain_rules(render(CONFIGS[name]), "prerouting")
    assert not any("daddr" in r for r in rules), "ingress must not depend on the destination"
    # the egress chain keeps its destination CIDRs
    output = chain_rules(render(CONFIGS[name]), "output")
    assert "ip daddr != @cidrs4 return" in " ".join(output)


def test_ingress_exemptions_come_before_the_tproxy_rules() -> None:
    rules = [
        r.split(" comment ")[0] for r in chain_rules(render(CONFIGS["excludes"]), "prerouting")
    ]
    first_tproxy = next(i for i, r in enumerate(rules) if " tproxy " in r and "mark" not in r)
    exemptions = [
        'iifname "lo" return',
        "meta l4proto != tcp return",
        "ct direction reply return",
        "ip saddr @exclude4 return",
        "ip6 saddr @exclude6 return",
        "tcp dport @in_ports return",
        "tcp dport 15021 return",
    ]
    assert rules[first_tproxy - len(exemptions) : first_tproxy] == exemptions
    # looped-back egress (mark, on lo) is decided before lo traffic is let through
    assert rules.index('iifname "lo" return') == 3


def test_preserved_client_address_rules_come_first_in_output() -> None:
    # Before the bypass-mark return: the sidecar's dial carries the preserve
    # mark (not the bypass mark), and the app's replies carry no mark at all
    # until the ct mark rule gives them one.
    ic = CONFIGS["custom"]
    rules = [r.split(" comment ")[0] for r in chain_rules(render(ic), "output")]
    keep = ic.preserve_mark
    assert rules[:3] == [
        f"ct mark {keep} meta mark set {keep} return",
        f"meta mark {keep} ct mark set {keep} return",
        f"meta mark {ic.bypass_mark} return",
    ]


def test_probe_port_zero_renders_no_probe_exemption() -> None:
    text = render(dataclasses.replace(CONFIGS["custom"], probe_port=0))
    assert "tcp dport 15021" not in text and "probe server" not in text


def test_marked_egress_must_leave_through_lo() -> None:
    ic = CONFIGS["custom"]
    assert chain_rules(render(ic), "postrouting") == [
        f'meta mark {ic.recirculate_mark} oifname != "lo" drop comment '
        '"marked egress that policy routing did not loop back (rule/route gone): never sent"',
        f'meta mark {ic.preserve_mark} oifname != "lo" drop comment '
        '"a reply to a preserved client address that policy routing did not keep local"',
    ]


def test_render_delete_is_add_then_delete() -> None:
    assert render_delete(CONFIGS["custom"]) == (
        "add table inet mesh_tproxy\ndelete table inet mesh_tproxy\n"
    )


# --------------------------------------------------------------------------- nft --check


@pytest.mark.netns
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_nft_check_accepts_rendering(check_ns: str, name: str) -> None:
    nft = Nft(netns=check_ns)
    nft.check(render(CONFIGS[name]))
    nft.check(render_delete(CONFIGS[name]))
    # --check applies nothing.
    assert nft.list_table(CONFIGS[name]) is None


@pytest.mark.netns
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_nft_check_accepts_the_installer_transaction(check_ns: str, name: str) -> None:
    Nft(netns=check_ns).check(transaction(CONFIGS[name]))


@pytest.mark.netns
def test_nft_check_rejects_bad_text_in_one_line(check_ns: str) -> None:
    with pytest.raises(NftError) as info:
        Nft(netns=check_ns).check("table inet x {\n\tchain c { type filter hook nowhere }\n}\n")
    assert info.value.kind is NftErrorKind.FAILED
    assert "syntax error" in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.argv == ("ip", "netns", "exec", check_ns, "nft", "--check", "-f", "-")


# --------------------------------------------------------------------------- runner (fake)


def test_apply_feeds_render_to_one_nft_run() -> None:
    run = FakeRunner()
    Nft(run=run).apply(CONFIGS["excludes"])
    assert run.calls == [(["nft", "-f", "-"], render(CONFIGS["excludes"]))]


def test_load_feeds_the_text_to_one_nft_run() -> None:
    run = FakeRunner()
    Nft(run=run).load("add table inet x\n")
    assert run.calls == [(["nft", "-f", "-"], "add table inet x\n")]


def test_installer_transaction_is_the_render_plus_its_fingerprint() -> None:
    ic = CONFIGS["excludes"]
    text = transaction(ic)
    assert text.startswith(render(ic))
    digest = hashlib.sha256(render(ic).encode()).hexdigest()
    assert fingerprint(ic) == digest
    assert text.splitlines()[-1] == (
        f'add set inet trio_tproxy fingerprint {{ type mark; comment "trio-tproxy sha256 {digest}"; }}'
    )
    # Another configuration, another fingerprint; the same one, the same.
    assert fingerprint(Interception(tls_port=15006)) != fingerprint(Interception())
    assert fingerprint(Interception()) == fingerprint(Interception())


class FakeRoutes:
    """Stands in for PolicyRoutes (no netlink here): records calls, fails on demand."""

    def __init__(self, fail_install: bool = False) -> None:
        self.calls: list[str] = []
        self.fail_install = fail_install

    def install(self) -> None:
        self.calls.append("install")
        if self.fail_install:
            raise OSError(1, "ip rule fwmark 10 iif lo lookup 10: refused")

    def remove(self) -> None:
        self.calls.append("remove")


def test_installer_order_table_then_routes_and_undo_in_reverse() -> None:
    ic = Interception()
    run = FakeRunner()
    installer = Installer(ic, nft=Nft(run=run))
    installer.routes = FakeRoutes()  # type: ignore[assignment]
    installer.apply()
    assert [stdin for _, stdin in run.calls] == [transaction(ic), ""]  # load, then list
    assert installer.routes.calls == ["install"]  # type: ignore[attr-defined]

    # Routes fail: apply removes routes, then the table, and re-raises.
    run = FakeRunner()
    installer = Installer(ic, nft=Nft(run=run))
    installer.routes = FakeRoutes(fail_install=True)  # type: ignore[assignment]
    with pytest.raises(OSError, match="refused"):
        installer.apply()
    assert installer.routes.calls == ["install", "remove"]  # type: ignore[attr-defined]
    assert run.calls[-1] == (["nft", "-f", "-"], render_delete(ic))


def test_apply_in_netns_uses_ip_netns_exec() -> None:
    run = FakeRunner()
    Nft(run=run, netns="tpt-0123abcd").apply(Interception())
    assert run.calls == [
        (["ip", "netns", "exec", "tpt-0123abcd", "nft", "-f", "-"], render(Interception()))
    ]


def test_delete_feeds_render_delete() -> None:
    run = FakeRunner()
    Nft(run=run).delete(CONFIGS["custom"])
    assert run.calls == [
        (["nft", "-f", "-"], "add table inet mesh_tproxy\ndelete table inet mesh_tproxy\n")
    ]


def test_check_uses_check_flag() -> None:
    run = FakeRunner()
    Nft(run=run).check("table inet x {\n}\n")
    assert run.calls == [(["nft", "--check", "-f", "-"], "table inet x {\n}\n")]


def test_list_table_returns_stdout() -> None:
    listing = "table inet trio_tproxy {\n}\n"
    run = FakeRunner(subprocess.CompletedProcess([], 0, listing, ""))
    assert Nft(run=run).list_table(Interception()) == listing
    assert run.calls == [(["nft", "list", "table", "inet", "trio_tproxy"], "")]


def test_list_table_absent_is_none() -> None:
    stderr = "Error: No such file or directory\nlist table inet trio_tproxy\n" + " " * 16 + "^^^\n"
    run = FakeRunner(failed(1, stderr))
    assert Nft(run=run).list_table(Interception()) is None


def test_list_table_other_failure_raises() -> None:
    run = FakeRunner(
        failed(1, "netlink: Error: cache initialization failed: Operation not permitted")
    )
    with pytest.raises(NftError) as info:
        Nft(run=run).list_table(Interception())
    assert info.value.kind is NftErrorKind.PERMISSION


def test_runner_exception_is_classified() -> None:
    run = FakeRunner(FileNotFoundError(2, "No such file or directory", "nft"))
    with pytest.raises(NftError) as info:
        Nft(run=run).apply(Interception())
    assert info.value.kind is NftErrorKind.NOT_INSTALLED
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert isinstance(info.value, OSError)  # the CLI reports every OSError the same way


# --------------------------------------------------------------------------- classify

SYNTAX = (
    "/dev/stdin:19:51-51: Error: syntax error, unexpected '}', expecting newline or semicolon\n"
    "    meta l4proto tcp tproxy ip6 to [::1]:2 accept }\n"
    "                                                  ^\n"
)


@pytest.mark.parametrize(
    ("argv", "outcome", "kind", "needle"),
    [
        (["nft", "-f", "-"], FileNotFoundError(2, "No such file", "nft"), "NOT_INSTALLED", "nft is not installed"),
        (["ip", "netns", "exec", "n", "nft"], FileNotFoundError(2, "No such file", "ip"), "NOT_INSTALLED", "ip is not installed"),
        (["nft", "-f", "-"], PermissionError(13, "Permission denied", "nft"), "PERMISSION", "Permission denied"),
        (["nft", "-f", "-"], subprocess.TimeoutExpired(["nft"], 30), "FAILED", "no answer after 30s"),
        (["nft", "list", "tables"], failed(1, "Operation not permitted (you must be root)\nnetlink: Error: cache initialization failed: Operation not permitted\n"), "PERMISSION", "CAP_NET_ADMIN"),
        (["ip", "netns", "exec", "n", "nft"], failed(255, 'setting the network namespace "n" failed: Operation not permitted\n'), "PERMISSION", "CAP_NET_ADMIN"),
        (["ip", "netns", "exec", "n", "nft"], failed(255, 'exec of "nft" failed: No such file or directory\n'), "NOT_INSTALLED", "nft is not installed"),
        (["nft", "list", "table", "inet", "t"], failed(1, "Error: No such file or directory\nlist table inet t\n                ^\n"), "NOT_FOUND", "No such file or directory"),
        (["nft", "-f", "-"], failed(1, "Error: Could not process rule: No such file or directory\ndelete table inet t\n                  ^\n"), "NOT_FOUND", "Could not process rule"),
        (["ip", "netns", "exec", "n", "nft"], failed(255, 'Cannot open network namespace "n": No such file or directory\n'), "FAILED", "Cannot open network namespace"),
        (["nft", "-f", "-"], failed(1, SYNTAX), "FAILED", "unexpected '}'"),
        (["nft", "-f", "-"], failed(1, ""), "FAILED", "exit status 1"),
    ],
)  # fmt: skip
def test_classify(
    argv: list[str],
    outcome: subprocess.CompletedProcess[str] | BaseException,
    kind: str,
    needle: str,
) -> None:
    if isinstance(outcome, BaseException):
        error = classify(argv, exc=outcome)
    else:
        error = classify(argv, returncode=outcome.returncode, stderr=outcome.stderr)
    assert error.kind is NftErrorKind[kind]
    assert needle in str(error)
    assert "\n" not in str(error)
    assert str(error).startswith(" ".join(argv) + ": ")


def test_one_line_drops_caret_markers() -> None:
    assert one_line(SYNTAX) == (
        "/dev/stdin:19:51-51: Error: syntax error, unexpected '}', expecting newline or "
        "semicolon | meta l4proto tcp tproxy ip6 to [::1]:2 accept }"
    )


# --------------------------------------------------------------------------- real nft


@pytest.mark.netns
def test_apply_list_replace_delete(netns: str) -> None:
    nft = Nft(netns=netns)
    ic = CONFIGS["excludes"]
    assert nft.list_table(ic) is None

    nft.apply(ic)
    first = nft.list_table(ic)
    assert first is not None
    assert first.startswith("table inet trio_tproxy {")
    assert "elements = { 22, 15021 }" in first
    assert "tproxy ip to 127.0.0.1:2 accept" in first
    assert first.count('comment "') == 27 + 3 + 6 + 1  # rules, chains, sets, table

    nft.apply(ic)  # idempotent: the same table, not a second copy of each rule
    assert nft.list_table(ic) == first

    # Same table name, other ports: applying replaces, nothing of the old stays.
    other = Interception(tcp_port=15001, tls_port=15006)
    nft.apply(other)
    replaced = nft.list_table(other)
    assert replaced is not None
    assert "tproxy ip to 127.0.0.1:15006 accept" in replaced
    assert "127.0.0.1:2 " not in replaced
    assert "elements = { 22, 15021 }" not in replaced

    nft.delete(other)
    assert nft.list_table(other) is None
    nft.delete(other)  # deleting an absent table is fine
    ruleset = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "list", "ruleset"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert ruleset.stdout.strip() == ""


@pytest.mark.netns
def test_apply_replaces_table_left_by_crashed_run(netns: str) -> None:
    ic = Interception()
    leftover = "table inet trio_tproxy {\n\tchain stale {\n\t\tmeta mark 99 drop\n\t}\n}\n"
    subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-f", "-"],
        input=leftover,
        text=True,
        check=True,
        capture_output=True,
    )
    nft = Nft(netns=netns)
    nft.apply(ic)
    listing = nft.list_table(ic)
    assert listing is not None
    assert "chain stale" not in listing
    assert "chain prerouting" in listing


@pytest.mark.netns
@pytest.mark.parametrize("who", ["ip netns exec", "nft"])
def test_real_permission_error_is_classified(netns: str, who: str) -> None:
    """Without CAP_NET_ADMIN, both ``ip netns exec`` and nft itself fail as PERMISSION."""
    if shutil.which("setpriv") is None:
        skip_or_fail("setpriv (util-linux) is not installed")
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

    def unprivileged(argv: Sequence[str], stdin: str) -> subprocess.CompletedProcess[str]:
        # Drop root before `ip netns exec`, or after it (nft runs in the namespace).
        cut = 0 if who == "ip netns exec" else 4
        argv = [*argv[:cut], *drop, *argv[cut:]]
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)

    with pytest.raises(NftError) as info:
        Nft(run=unprivileged, netns=netns).apply(Interception())
    assert info.value.kind is NftErrorKind.PERMISSION
    assert "Operation not permitted" in str(info.value)
    assert Nft(netns=netns).list_table(Interception()) is None


@pytest.mark.netns
def test_missing_netns_is_a_failure_not_an_absent_table() -> None:
    name = next_prefix()
    with pytest.raises(NftError) as info:
        Nft(netns=name).list_table(Interception())
    assert info.value.kind is NftErrorKind.FAILED
    assert "Cannot open network namespace" in str(info.value)

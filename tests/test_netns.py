"""The kernel path, end to end, in network namespaces (root).

Pods A and B run ``trio-tproxy run`` as real processes with real nftables
rules and policy routes; "outside" is a host with no sidecar.  Clients are
real: curl, openssl s_client, tcpdump on the bridge, and plain sockets
created inside the pods' namespaces.  Every case runs over IPv4 and IPv6.

Proof of interception is always the sidecars' own log lines (with the peer's
SPIFFE ID), never only the client's answer: a broken ruleset can still let
traffic through unproxied.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from fuzz.relay_property import run_script, scripts
from lab.netns import next_prefix, probe
from lab.pods import PodLab, Pods, offsets, spiffe_id, wait_for_log

pytestmark = pytest.mark.netns

ECHO, HALFCLOSE, HTTP = 7001, 7000, 8080
FAMILIES = ["ipv4", "ipv6"]


def addr(host, family: str, plain: bool = False) -> str:
    if family == "ipv4":
        return host.ip4_plain if plain else host.ip4
    return host.ip6_plain if plain else host.ip6


def url_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def fmt(ip: str, port: int) -> str:
    return f"{url_host(ip)}:{port}"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodLab]:
    with PodLab(tmp_path_factory.mktemp("lab"), prefix=next_prefix()) as lab:
        lab.start_sidecar("a")
        lab.start_sidecar("b")
        py = sys.executable
        lab.start_app("b", py, "-m", "lab.apps", "echo-server", str(ECHO), port=ECHO)
        lab.start_app("b", py, "-m", "lab.apps", "halfclose-server", str(HALFCLOSE), port=HALFCLOSE)
        lab.start_app("b", py, "-m", "http.server", str(HTTP), "--bind", "::", port=HTTP)
        lab.start_app("outside", py, "-m", "lab.apps", "echo-server", str(ECHO), port=ECHO)
        yield lab


def restart(lab: PodLab, pod: str, *flags: str, identity: str | None = None) -> None:
    assert lab.stop_sidecar(pod) == 0
    lab.start_sidecar(pod, *flags, identity=identity)


# a) ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_a_http_with_curl_is_intercepted_by_both_sidecars(lab, family):
    b = addr(lab.host("b"), family)
    since = offsets(lab)
    out = lab.topology.run(
        "a",
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://{url_host(b)}:{HTTP}/"],
    )
    assert out.stdout == "200", out.stderr
    egress = wait_for_log(lab, "a", rf"egress \S+ -> {re.escape(fmt(b, HTTP))} ", since["a"])
    ingress = wait_for_log(lab, "b", rf"ingress \S+ -> {re.escape(fmt(b, HTTP))} ", since["b"])
    assert f"peer={spiffe_id('b')}" in egress and "outcome=ok" in egress
    assert f"peer={spiffe_id('a')}" in ingress and "outcome=ok" in ingress
    assert "TLSv1.3" in egress and "TLSv1.3" in ingress


@pytest.mark.parametrize("family", FAMILIES)
def test_a_raw_tcp_half_close_is_intercepted(lab, family):
    b = addr(lab.host("b"), family)
    since = offsets(lab)
    message = os.urandom(200_000)
    received, end = probe(lab.host("a").netns, b, HALFCLOSE, message)
    assert end == "eof"
    assert received.startswith(f"got {len(message)} bytes".encode())
    egress = wait_for_log(lab, "a", rf"egress \S+ -> {re.escape(fmt(b, HALFCLOSE))} ", since["a"])
    assert f"peer={spiffe_id('b')}" in egress and f"sent={len(message)}" in egress
    ingress = wait_for_log(lab, "b", rf"ingress \S+ -> {re.escape(fmt(b, HALFCLOSE))} ", since["b"])
    assert f"peer={spiffe_id('a')}" in ingress and f"received={len(message)}" in ingress


# b) ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_b_the_wire_carries_only_tls(lab, family):
    b = addr(lab.host("b"), family)
    marker = f"plaintext-marker-{secrets.token_hex(8)}".encode()
    with lab.capture(f"wire-{family}", "tcp", "port", str(ECHO)) as capture:
        received, end = probe(lab.host("a").netns, b, ECHO, marker * 100)
        assert (received, end) == (marker * 100, "eof")
    wire = capture.read_bytes()
    assert wire.count(b"\x17\x03\x03") >= 2, "no TLS application-data records on the wire"
    assert marker not in wire, "the plaintext crossed the bridge"


# c) ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_c_plaintext_from_outside_never_reaches_the_app(lab, family):
    b = addr(lab.host("b"), family)
    since = offsets(lab)
    marker = f"outside-plaintext-{secrets.token_hex(4)}".encode()
    received, end = probe(lab.host("outside").netns, b, ECHO, marker)
    assert marker not in received, "B's app echoed plaintext from outside"
    assert end in ("eof", "reset"), end
    line = wait_for_log(lab, "b", rf"ingress \S+ -> {re.escape(fmt(b, ECHO))} refused", since["b"])
    assert "not TLS" in line or "TLS handshake failed" in line
    out = lab.topology.run("outside", ["curl", "-sS", "-m", "5", f"http://{url_host(b)}:{HTTP}/"])
    assert out.returncode != 0 and "Directory listing" not in out.stdout


# d) ------------------------------------------------------------------------


def curl_https(lab: PodLab, ip: str, *cert_args: str) -> subprocess.CompletedProcess[str]:
    return lab.topology.run(
        "outside",
        [
            "curl",
            "-sS",
            "-m",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
            str(lab.workdir / "ca.crt"),
            *cert_args,
            f"https://{url_host(ip)}:{HTTP}/",
        ],
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_d_outside_with_valid_client_certificate_reaches_the_app(lab, family):
    b = addr(lab.host("b"), family)
    files = lab.files["outside"]
    since = offsets(lab)
    out = curl_https(lab, b, "--cert", str(files.cert), "--key", str(files.key))
    assert out.stdout == "200", out.stderr
    line = wait_for_log(lab, "b", rf"ingress \S+ -> {re.escape(fmt(b, HTTP))} peer=", since["b"])
    # curl closes as soon as it has the response, which may race our close_notify
    assert f"peer={spiffe_id('outside')}" in line and re.search("outcome=(ok|reset)", line)
    # openssl s_client, raw bytes through to the echo app
    marker = f"s_client-{secrets.token_hex(4)}"
    # s_client ends the connection at stdin EOF: keep stdin open until the echo is back.
    s_client = lab.topology.run(
        "outside",
        [
            "sh",
            "-c",
            (
                f"(echo {marker}; sleep 1) | openssl s_client -connect {fmt(b, ECHO)} "
                f"-CAfile {lab.workdir / 'ca.crt'} -cert {files.cert} -key {files.key} "
                "-quiet -no_ign_eof -verify_return_error"
            ),
        ],
        timeout=15,
    )
    assert marker in s_client.stdout, s_client.stderr


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("client", ["no certificate", "another CA"])
def test_d_outside_without_valid_certificate_is_refused(lab, family, client):
    b = addr(lab.host("b"), family)
    since = offsets(lab)
    if client == "no certificate":
        out = curl_https(lab, b)
        reason = "no client certificate"
    else:
        rogue = lab.files["rogue"]
        out = curl_https(lab, b, "--cert", str(rogue.cert), "--key", str(rogue.key))
        reason = "unknown CA"
    assert out.stdout != "200" and out.returncode != 0
    line = wait_for_log(lab, "b", rf"ingress \S+ -> {re.escape(fmt(b, HTTP))} refused", since["b"])
    assert reason in line, line


# e) f) ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_e_plaintext_server_inside_the_cidrs_fails_closed_until_excluded(lab, family):
    outside = lab.host("outside")
    dst = addr(outside, family)
    since = offsets(lab)
    received, end = probe(lab.host("a").netns, dst, ECHO, b"hello")
    assert end == "reset" and received == b"", (received, end)
    line = wait_for_log(lab, "a", rf"egress \S+ -> {re.escape(fmt(dst, ECHO))} refused", since["a"])
    assert "TLS handshake failed" in line
    try:
        cidr = f"{dst}/32" if family == "ipv4" else f"{dst}/128"
        for flags in (("--exclude-cidr", cidr), ("--exclude-outbound-port", str(ECHO))):
            restart(lab, "a", *flags)
            since = offsets(lab)
            assert probe(lab.host("a").netns, dst, ECHO, b"hello") == (b"hello", "eof"), flags
            time.sleep(0.2)
            assert fmt(dst, ECHO) not in lab.sidecars["a"].log()[since["a"] :]
    finally:
        restart(lab, "a")


@pytest.mark.parametrize("family", FAMILIES)
def test_f_address_outside_the_cidrs_goes_direct(lab, family):
    dst = addr(lab.host("outside"), family, plain=True)
    since = offsets(lab)
    assert probe(lab.host("a").netns, dst, ECHO, b"direct") == (b"direct", "eof")
    time.sleep(0.2)
    assert fmt(dst, ECHO) not in lab.sidecars["a"].log()[since["a"] :]


# g) ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_g_server_of_another_trust_domain_is_refused(lab, family):
    b = addr(lab.host("b"), family)
    try:
        restart(lab, "b", identity="b-evil-domain")
        since = offsets(lab)
        received, end = probe(lab.host("a").netns, b, ECHO, b"secret")
        assert end == "reset" and b"secret" not in received
        line = wait_for_log(
            lab, "a", rf"egress \S+ -> {re.escape(fmt(b, ECHO))} refused", since["a"]
        )
        assert "wrong trust domain 'evil.example'" in line and "spiffe://evil.example" in line
    finally:
        restart(lab, "b")


# h) ------------------------------------------------------------------------


def kernel_state(lab: PodLab, pod: str) -> dict[str, str]:
    run = lab.topology.run
    return {
        "tables": run(pod, ["nft", "list", "tables"]).stdout,
        "rules4": run(pod, ["ip", "rule", "show", "fwmark", "10"]).stdout,
        "rules6": run(pod, ["ip", "-6", "rule", "show", "fwmark", "10"]).stdout,
        "routes4": run(pod, ["ip", "route", "show", "table", "10"]).stdout,
        "routes6": run(pod, ["ip", "-6", "route", "show", "table", "10"]).stdout,
    }


def test_h_lifecycle_sigterm_sigkill_and_lo_flap(tmp_path):
    with PodLab(tmp_path, prefix=next_prefix()) as lab:
        lab.start_app("b", sys.executable, "-m", "lab.apps", "echo-server", str(ECHO), port=ECHO)
        lab.start_sidecar("b")
        lab.start_sidecar("a")
        state = kernel_state(lab, "a")
        assert "trio_tproxy" in state["tables"]
        assert all(state[k].strip() for k in ("rules4", "rules6", "routes4", "routes6")), state
        # SIGTERM: everything removed, exit 0
        assert lab.stop_sidecar("a") == 0
        state = kernel_state(lab, "a")
        assert not any(v.strip() for v in state.values()), state
        assert "removed nft table" in (lab.workdir / "sidecar-a.log").read_text()
        # SIGKILL leaves the rules behind; a new start replaces them and works
        lab.start_sidecar("a")
        assert lab.stop_sidecar("a", sig=signal.SIGKILL) == -signal.SIGKILL
        assert "trio_tproxy" in kernel_state(lab, "a")["tables"]
        lab.start_sidecar("a")
        b6 = lab.host("b").ip6
        assert probe(lab.host("a").netns, b6, ECHO, b"after kill") == (b"after kill", "eof")
        # lo down/up deletes the IPv6 local route; the sidecar restores it
        since = offsets(lab)
        lab.topology.run("a", ["ip", "link", "set", "lo", "down"], check=True)
        lab.topology.run("a", ["ip", "link", "set", "lo", "up"], check=True)
        # "link lo up, " too when the watcher checked between the two commands (a loaded machine)
        wait_for_log(lab, "a", r"restored (link lo up, )?ip -6 route local", since["a"])
        since = offsets(lab)
        assert probe(lab.host("a").netns, b6, ECHO, b"after lo") == (b"after lo", "eof")
        wait_for_log(lab, "a", rf"egress \S+ -> {re.escape(fmt(b6, ECHO))} peer=", since["a"])
        assert lab.stop_sidecar("a") == 0
        assert not any(v.strip() for v in kernel_state(lab, "a").values())


def test_h_rules_subcommand_show_apply_delete(lab):
    show = subprocess.run(
        [sys.executable, "-m", "trio_tproxy", "rules", "show", "--table", "probe_t"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "table inet probe_t" in show.stdout and "tproxy" in show.stdout
    pod = "outside"  # no sidecar there: apply/delete must leave it as it was
    cmd = [sys.executable, "-m", "trio_tproxy", "rules"]
    assert lab.topology.run(pod, [*cmd, "apply", "--route-table", "77"]).returncode == 0
    listed = lab.topology.run(pod, ["nft", "list", "table", "inet", "trio_tproxy"]).stdout
    assert "tproxy" in listed
    assert "lookup 77" in lab.topology.run(pod, ["ip", "rule"]).stdout
    assert lab.topology.run(pod, [*cmd, "delete", "--route-table", "77"]).returncode == 0
    assert "trio_tproxy" not in lab.topology.run(pod, ["nft", "list", "tables"]).stdout
    assert "lookup 77" not in lab.topology.run(pod, ["ip", "rule"]).stdout


def test_h_run_without_capabilities_fails_with_one_line(lab):
    without_net_admin = ["setpriv", "--bounding-set=-net_admin,-sys_admin"]
    out = subprocess.run(
        [*without_net_admin, *lab.sidecar_command("a")], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "CAP_NET_ADMIN is missing" in lines[0], out.stderr


# i) ------------------------------------------------------------------------


KERNEL_EXAMPLES = int(os.environ.get("KERNEL_FUZZ_EXAMPLES", "40"))


@pytest.mark.parametrize("family", FAMILIES)
def test_i_half_close_and_reset_property_through_the_kernel(lab, family):
    from hypothesis import HealthCheck, given, settings

    pods = Pods(lab, socket.AF_INET if family == "ipv4" else socket.AF_INET6)

    @settings(
        max_examples=KERNEL_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(script=scripts)
    def prop(script):
        trio.run(run_script, script, pods.transport)

    prop()


def test_i_kernel_transport_really_goes_through_both_sidecars(lab):
    """Guard for the property above: its connections are proxied, not direct."""
    pods = Pods(lab)
    since = offsets(lab)
    trio.run(
        run_script,
        [("send", "client", 10), ("eof", "client", 0), ("eof", "server", 0)],
        pods.transport,
    )
    dst = fmt(lab.host("b").ip4, Pods.PORT)
    assert "outcome=ok" in wait_for_log(lab, "a", rf"egress \S+ -> {re.escape(dst)} ", since["a"])
    assert "outcome=ok" in wait_for_log(lab, "b", rf"ingress \S+ -> {re.escape(dst)} ", since["b"])


def test_workdir_is_private(lab):
    """The throwaway CA key is not readable by other users."""
    assert (Path(lab.workdir) / "ca.key").stat().st_mode & 0o077 == 0

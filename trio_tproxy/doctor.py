"""``trio-tproxy doctor``: why is this pod's traffic (not) intercepted?

Run inside the pod's network namespace (``kubectl exec``, ``nsenter -n -t
PID``) with the sidecar's flags.  Each check gives :class:`Result`\\ s: ``ok``,
``info`` (worth knowing, not a fault) or ``fail`` (a finding: one plain
sentence and the command that fixes it).  Exit code 0 without findings, 1
with.  Checks, in order:

1. the nft table is present and equal to what these flags render: the
   installer's fingerprint, plus a rule-by-rule diff by the rules' comments;
2. the policy rules and ``local`` routes of both families (and ``lo`` up);
3. the two listeners on loopback, with IP_TRANSPARENT and (ingress) the
   bypass mark, read with ``ss --inet-sockopt`` (iproute2 >= 5.10);
4. the admin endpoint answers ``/readyz`` (which also says why not ready);
5. sysctls.  What was verified on the lab kernels (docs/kernel.md):
   ``rp_filter`` 0, 1 and 2 all work (TPROXY'd packets are delivered
   locally, and replies leave on the route they came in by), and
   ``route_localnet`` is not needed; they are shown as information.  What
   breaks: ``disable_ipv6`` on ``lo`` (no ``::1``: the sidecar cannot
   listen) or ``lo`` down;
6. the credential files: readable, key matches, valid now, chain to the CA
   bundle, exactly one SPIFFE ID in the trust domain;
7. ``--conn HOST:PORT``: conntrack's entries for that destination;
8. ``--peer HOST:PORT``: a live connection through the interception, and
   the peer's identity as the sidecar's admin endpoint reports it.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import ConfigError, Interception, TLSFiles
from .interception import Installer, is_permission_error
from .nft import render

OK, INFO, FAIL = "ok", "info", "fail"


@dataclass(frozen=True)
class Result:
    status: str
    check: str
    text: str
    fix: str = ""


@dataclass(frozen=True)
class Options:
    ic: Interception
    admin_port: int
    tls: TLSFiles | None = None
    trust_domain: str = "cluster.local"
    peer: tuple[str, int] | None = None
    conn: tuple[str, int] | None = None
    timeout: float = 3.0
    #: The flags to repeat in a fix command (``trio-tproxy rules apply ...``).
    flags: str = " <the sidecar's interception flags>"


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- 1, 2: table and routes ---------------------------------------------------------

_COMMENT = re.compile(r'comment "([^"]*)"')


def check_table(opts: Options) -> Iterator[Result]:
    ic = opts.ic
    installer = Installer(ic)
    name = f"nft table inet {ic.table}"
    fix = f"trio-tproxy rules apply{opts.flags}   (or restart the sidecar, which applies it)"
    try:
        listing = installer.nft.list_table(ic)
    except OSError as exc:
        if is_permission_error(exc):
            yield Result(
                FAIL,
                "table",
                f"The {name} cannot be read: {exc}.",
                "run the doctor with CAP_NET_ADMIN (as root, or nsenter from the node)",
            )
            return
        raise
    if listing is None:
        yield Result(
            FAIL,
            "table",
            f"The {name} is missing: nothing is intercepted and nothing fails closed; "
            "the pod's traffic flows in plaintext.",
            fix,
        )
        return
    problems = installer.verify()
    table_problems = [p for p in problems if p.startswith("nft table")]
    expected = _COMMENT.findall(render(ic))
    found = _COMMENT.findall(listing)
    missing = [c for c in expected if c not in found]
    extra = [c for c in found if c not in expected and not c.startswith("trio-tproxy sha256")]
    if table_problems or missing or extra:
        diff = "".join(f"\n      - {c}" for c in missing) + "".join(f"\n      + {c}" for c in extra)
        yield Result(
            FAIL,
            "table",
            f"The {name} differs from what these flags render "
            f"({'; '.join(table_problems) or 'rules differ'}); rules by comment, - missing, "
            f"+ unexpected:{diff or ' (same rules, other values)'}",
            fix,
        )
    else:
        yield Result(OK, "table", f"The {name} is loaded and equal to what these flags render.")


def check_routes(opts: Options) -> Iterator[Result]:
    installer = Installer(opts.ic)
    missing = installer.routes.missing()
    if not missing:
        yield Result(OK, "routes", "The policy rules and local routes are in place (IPv4, IPv6).")
    for what in missing:
        yield Result(
            FAIL,
            "routes",
            f"Missing: {what}: packets marked for interception are not delivered to the sidecar.",
            _add_command(what),
        )


def _add_command(description: str) -> str:
    for kind in (" rule ", " route "):
        head, sep, rest = description.partition(kind)
        if sep and head.startswith("ip"):
            return f"{head}{kind}add {rest}"
    if "lo" in description:
        return "ip link set lo up"
    return "restart the sidecar (it re-adds the routes)"


# -- 3: listeners --------------------------------------------------------------------


def check_listeners(opts: Options) -> Iterator[Result]:
    ic = opts.ic
    if shutil.which("ss") is None:
        yield Result(
            INFO,
            "listeners",
            "ss is not installed: listeners not checked.",
            "apt-get install iproute2",
        )
        return
    out = subprocess.run(
        ["ss", "-tlnHe", "--inet-sockopt"], capture_output=True, text=True, timeout=10
    ).stdout
    sockets = _parse_ss(out)
    for port, kind, want_mark in (
        (ic.tcp_port, "egress", None),
        (ic.tls_port, "ingress", ic.bypass_mark),
    ):
        for host in ("127.0.0.1", "::1"):
            addr = _fmt(host, port)
            info = sockets.get(addr)
            if info is None:
                yield Result(
                    FAIL,
                    "listeners",
                    f"Nothing listens on {addr} (the {kind} listener): the sidecar is not "
                    "running, or runs with other ports; intercepted connections are refused.",
                    "kubectl logs POD -c trio-tproxy   (then restart it: kubectl delete pod POD)",
                )
                continue
            faults = []
            if "transparent" not in info:
                faults.append("without IP_TRANSPARENT (TPROXY cannot deliver to it)")
            if want_mark is not None and f"fwmark:{want_mark:#x}" not in info:
                faults.append(f"without the bypass mark {want_mark:#x} (its replies would loop)")
            if faults:
                yield Result(
                    FAIL,
                    "listeners",
                    f"{addr} listens {' and '.join(faults)}: not the sidecar, or another version.",
                    "ss -tlnpe  (find who holds it)",
                )
            else:
                mark = f", fwmark {want_mark:#x}" if want_mark else ""
                yield Result(OK, "listeners", f"{kind} listener {addr}: IP_TRANSPARENT{mark}.")


def _parse_ss(out: str) -> dict[str, str]:
    """Local address -> the socket's line(s) of ``ss -tlnHe --inet-sockopt``."""
    found: dict[str, str] = {}
    last = None
    for line in out.splitlines():
        if line.startswith(("\t", " ")) and last is not None:
            found[last] += " " + line.strip()
            continue
        fields = line.split()
        if len(fields) >= 4 and fields[0] == "LISTEN":
            last = fields[3]
            found[last] = line
    return found


# -- 4: admin endpoint ---------------------------------------------------------------


def http_get(host: str, port: int, path: str, timeout: float) -> tuple[int, str]:
    """A minimal GET (the doctor imports nothing it does not need); (status, body)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: doctor\r\nconnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode(errors="replace")


def check_admin(opts: Options) -> Iterator[Result]:
    if not opts.admin_port:
        yield Result(INFO, "admin", "The admin endpoint is off (--admin-port 0): not checked.")
        return
    try:
        status, body = http_get("127.0.0.1", opts.admin_port, "/readyz", opts.timeout)
    except OSError as exc:
        yield Result(
            FAIL,
            "admin",
            f"The sidecar's admin endpoint 127.0.0.1:{opts.admin_port} does not answer "
            f"({exc.strerror or exc}): the sidecar is not running (or uses another --admin-port).",
            "kubectl logs POD -c trio-tproxy --previous   (why it stopped), then "
            "kubectl delete pod POD",
        )
        return
    if status == 200:
        yield Result(OK, "admin", f"The admin endpoint answers: /readyz {status} {body.strip()}.")
    else:
        reasons = "; ".join(line.removeprefix("not ready: ") for line in body.splitlines())
        yield Result(
            FAIL,
            "admin",
            f"The sidecar is not ready (/readyz {status}): {reasons}.",
            "kubectl logs POD -c trio-tproxy",
        )


# -- 5: sysctls ----------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def check_sysctls(opts: Options) -> Iterator[Result]:
    flags = _read("/sys/class/net/lo/flags")
    if flags is not None and not int(flags, 16) & 1:
        yield Result(
            FAIL, "sysctl", "lo is down: TPROXY and the local routes need it.", "ip link set lo up"
        )
    if _read("/proc/sys/net/ipv6/conf/lo/disable_ipv6") == "1":
        yield Result(
            FAIL,
            "sysctl",
            "IPv6 is disabled on lo (net.ipv6.conf.lo.disable_ipv6=1): ::1 is gone, the "
            "sidecar cannot listen on it.",
            "sysctl -w net.ipv6.conf.lo.disable_ipv6=0",
        )
    rp = {
        p.parent.name: p.read_text().strip()
        for p in sorted(Path("/proc/sys/net/ipv4/conf").glob("*/rp_filter"))
    }
    from .proxy import PRESERVE_PORTS, preserve_port_warning

    clash = preserve_port_warning()
    if clash is not None:
        yield Result(
            FAIL,
            "sysctl",
            clash + ".",
            f"sysctl -w net.ipv4.ip_local_reserved_ports={PRESERVE_PORTS.start}-"
            f"{PRESERVE_PORTS.stop - 1}",
        )
    localnet = _read("/proc/sys/net/ipv4/conf/all/route_localnet")
    shown = " ".join(f"{k}={v}" for k, v in rp.items())
    yield Result(
        INFO,
        "sysctl",
        f"rp_filter {shown}; route_localnet all={localnet}: no effect on interception "
        "(rp_filter 0, 1 and 2 and route_localnet 0 were all verified to work).",
    )


# -- 6: credentials ------------------------------------------------------------------


def check_credentials(opts: Options) -> Iterator[Result]:
    from OpenSSL import crypto

    from .credentials import load_credentials

    files = opts.tls
    if files is None:
        yield Result(INFO, "credentials", "No --cert/--key/--ca-cert given: not checked.")
        return
    fix = (
        "check the Secret mounted at "
        + str(files.cert.parent)
        + " (kubectl describe pod POD), or issue one: trio-tproxy certs issue --ca-dir DIR "
        "--out DIR --name NAME --spiffe-id spiffe://TRUST-DOMAIN/ns/NS/sa/SA"
    )
    try:
        creds = load_credentials(files)
    except (ConfigError, OSError) as exc:
        yield Result(FAIL, "credentials", f"The credentials are unusable: {exc}.", fix)
        return
    store = crypto.X509Store()
    for ca in creds.ca_certs:
        store.add_cert(crypto.X509.from_cryptography(ca))
    chain = [crypto.X509.from_cryptography(c) for c in creds.chain]
    try:
        crypto.X509StoreContext(
            store, crypto.X509.from_cryptography(creds.cert), chain
        ).verify_certificate()
    except crypto.X509StoreContextError as exc:
        yield Result(
            FAIL,
            "credentials",
            f"The certificate {files.cert} does not chain to the "
            f"CA bundle {files.ca_cert}: {exc}; peers will refuse it.",
            fix,
        )
        return
    sid = creds.spiffe_id
    if sid is None:
        yield Result(
            FAIL,
            "credentials",
            f"The certificate {files.cert} carries no single "
            "SPIFFE ID: peers verifying SPIFFE IDs refuse it.",
            fix,
        )
        return
    domain = sid.removeprefix("spiffe://").split("/", 1)[0]
    if domain != opts.trust_domain:
        yield Result(
            FAIL,
            "credentials",
            f"The certificate's SPIFFE ID {sid} is outside the "
            f"trust domain {opts.trust_domain}: peers refuse it.",
            fix,
        )
        return
    left = creds.not_after - dt.datetime.now(dt.UTC)
    yield Result(
        OK,
        "credentials",
        f"Credentials valid: {sid}, key matches, chains to the CA bundle, expires "
        f"{creds.not_after:%Y-%m-%d %H:%M} UTC (in {left.days} d {left.seconds // 3600} h).",
    )


# -- 7: conntrack --------------------------------------------------------------------


def check_conntrack(opts: Options) -> Iterator[Result]:
    if opts.conn is None:
        return
    host, port = opts.conn
    if shutil.which("conntrack") is None:
        yield Result(
            INFO,
            "conntrack",
            f"conntrack is not installed: cannot list the entries for {_fmt(host, port)}.",
            "apt-get install conntrack  (or read "
            "/proc/net/nf_conntrack where the kernel provides it)",
        )
        return
    family = "ipv6" if ":" in host else "ipv4"
    run = subprocess.run(
        ["conntrack", "-L", "-f", family, "-p", "tcp", "--dst", host, "--dport", str(port)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    yield Result(
        INFO,
        "conntrack",
        f"conntrack entries for {_fmt(host, port)}: "
        + ("".join(f"\n      {line}" for line in lines) or "none"),
    )


# -- 8: live self-test ---------------------------------------------------------------


def check_peer(opts: Options) -> Iterator[Result]:
    if opts.peer is None:
        return
    host, port = opts.peer
    target = _fmt(host, port)
    try:
        with socket.create_connection((host, port), timeout=opts.timeout) as sock:
            local = sock.getsockname()[:2]
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(opts.timeout)
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
    except OSError as exc:
        yield Result(
            FAIL,
            "peer",
            f"A connection to {target} failed: {exc}.",
            "kubectl logs POD -c trio-tproxy   (the sidecar's refusal line says why)",
        )
        return
    entry = None
    deadline = time.monotonic() + opts.timeout
    while entry is None and time.monotonic() < deadline and opts.admin_port:
        try:
            _, body = http_get("127.0.0.1", opts.admin_port, "/connections", opts.timeout)
            for item in json.loads(body):
                if list(item.get("src", ())) == [local[0], local[1]]:
                    entry = item
        except (OSError, ValueError):
            break
        if entry is None:
            time.sleep(0.05)
    if entry is None:
        yield Result(
            FAIL,
            "peer",
            f"The connection to {target} was not seen by the sidecar: it was not intercepted.",
            "trio-tproxy doctor (the table and route "
            "checks above); is the destination in --intercept-cidr?",
        )
    elif entry.get("outcome") == "refused":
        yield Result(
            FAIL,
            "peer",
            f"The sidecar refused the connection to {target}.",
            "kubectl logs POD -c trio-tproxy | grep refused",
        )
    else:
        yield Result(
            OK,
            "peer",
            f"{target} through the interception: peer {entry.get('peer')}, "
            f"outcome {entry.get('outcome')}.",
        )


def check_data_path(opts: Options) -> Iterator[Result]:
    from . import fastpath

    if fastpath.ENABLED:
        yield Result(
            OK, "data path", "compiled (one C call per wake-up for established connections)."
        )
    else:
        yield Result(
            INFO,
            "data path",
            f"pure Python: {fastpath.WHY_OFF}. Same behaviour, more CPU per message.",
            "apt-get install -y gcc libc6-dev && pip install --force-reinstall --no-deps trio-tproxy",
        )


CHECKS = (
    check_table,
    check_routes,
    check_listeners,
    check_admin,
    check_sysctls,
    check_credentials,
    check_conntrack,
    check_peer,
    check_data_path,
)


def run(opts: Options) -> list[Result]:
    results: list[Result] = []
    for check in CHECKS:
        try:
            results.extend(check(opts))
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            results.append(
                Result(
                    FAIL,
                    check.__name__.removeprefix("check_"),
                    f"The check itself failed: {exc!r}.",
                    "report this as a bug",
                )
            )
    return results


def render_human(results: list[Result]) -> str:
    marks = {OK: "ok  ", INFO: "info", FAIL: "FAIL"}
    lines = []
    for r in results:
        lines.append(f"{marks[r.status]} {r.check:11} {r.text}")
        if r.status == FAIL and r.fix:
            lines.append(f"     {'':11} fix: {r.fix}")
    failed = sum(r.status == FAIL for r in results)
    lines.append(f"{failed} finding{'s' if failed != 1 else ''}" if failed else "healthy")
    return "\n".join(lines) + "\n"


def render_json(results: list[Result]) -> str:
    failed = [r for r in results if r.status == FAIL]
    return json.dumps({"healthy": not failed, "results": [asdict(r) for r in results]}) + "\n"

"""nftables as data: render the whole interception table, load it with one ``nft -f -``.

Why a module of its own (the knftables model): rendering is separate from
running. :func:`render` is a pure function from an :class:`Interception` to the
exact text of one nft transaction, so it is tested against golden files without
root. :class:`Nft` feeds that text to a single ``nft -f -`` process, so the kernel
applies all of it or none of it; a crash can never leave half a ruleset.

The transaction is ``add table`` / ``delete table`` / ``table { ... }``: adding
first makes the delete succeed whether or not a table was left by an earlier
(crashed) run, so applying is also how we reconcile, and applying twice is the
same as applying once.

How a connection is intercepted (see docs/interception.md and docs/kernel.md):

* egress: chain ``output`` (``type route``, so a changed mark re-routes the
  packet) marks the pod's outgoing TCP to intercepted destinations (the
  cluster CIDRs, minus exclusions) with the recirculate mark; ``ip rule
  fwmark <mark> iif lo lookup <table>`` plus a ``local default`` route in that
  table loop it back through ``lo``, where chain ``prerouting`` TPROXYs it to
  the plaintext listener on ``tcp_port``.
* ingress: every TCP connection arriving on any other interface, to *any*
  address of the pod (cluster, link-local, others; both families), is TPROXYed
  to the mutual-TLS listener on ``tls_port``. Only excluded source CIDRs and
  excluded inbound ports pass in plaintext. The destination is not looked at:
  keying ingress on the cluster CIDRs let ``fe80::`` and other addresses reach
  the app unproxied.
* the proxy's own sockets carry the bypass mark and are never marked for
  egress; local traffic (``iifname lo``: the proxy's dial to the app, the
  replies of looped-back egress) is not ingress, and neither are replies
  (conntrack's reply direction): the SYN-ACK answering the sidecar's dial, or
  any connection the pod opened directly (excluded, outside the CIDRs).

Fail closed. A ``tproxy`` statement does not match when no transparent
socket listens on its target (``nft_tproxy`` sets NFT_BREAK): evaluation goes
on to the next rule, and the chain policy is accept. So every tproxy rule is
followed by a verdict for the same packets that refuses them:

* looped-back egress no listener took: ``reject with tcp reset``. The app's
  ``connect`` fails at once with ECONNREFUSED. (Without it: a 20 s hang over
  IPv4, where the kernel's own RST has a non-local source and is not routed,
  and over IPv6 the pod's own app answered if it listened on that port.)
* ingress no listener took: a new connection (a bare SYN) gets ``reject with
  tcp reset``; packets conntrack calls invalid, or a mid-stream packet of a
  flow it never saw start (after a conntrack flush: maybe a reply to our own
  dial that it can no longer tell apart), are dropped, not reset, so that a
  live connection is never killed by a stray (kube-proxy drops INVALID for the
  same reason).
* marked egress that policy routing did not loop back (ip rule or local route
  deleted, the IPv6 route lost when ``lo`` flaps) is dropped in chain
  ``postrouting`` before it leaves, instead of going out in plaintext; the
  kernel does not allow ``reject`` there.

A TCP reset, not ICMP: an RST is what a TCP peer gets from a closed port and
every stack turns it into ECONNREFUSED at once. ICMP port unreachable is not
TCP's answer, admin-prohibited is a soft error (RFC 1122, RFC 1812: many
stacks retry until their connect timeout) and is often filtered on the way,
and ICMP does not end an established flow (RFC 5927). ICMP is what a UDP peer
expects: with ``--intercept-udp`` (and only then) UDP has rules of its own,
refused with ICMP port unreachable (see the UDP helpers below render). The whole table is one transaction: it is loaded with its refusals, or
not at all.

Every set is always declared, empty or not, so the table has one shape whatever
the configuration. An empty ``cidrs4`` or ``cidrs6`` is correct: ``ip daddr !=
@cidrs4 return`` then returns every IPv4 packet, i.e. IPv4 egress is not
intercepted (ingress does not look at these sets).
"""

from __future__ import annotations

import enum
import ipaddress
import subprocess
from collections.abc import Callable, Iterable, Sequence

from .config import Interception

#: ``run(argv, stdin)``: run one command, feed it ``stdin``, never raise on exit status.
Runner = Callable[[Sequence[str], str], "subprocess.CompletedProcess[str]"]

#: Seconds one nft run may take before we give up on it.
NFT_TIMEOUT = 30.0


# --------------------------------------------------------------------------- render


def _elements(items: Sequence[str]) -> list[str]:
    return [f"\t\telements = {{ {', '.join(items)} }}"] if items else []


def _set(name: str, type_: str, comment: str, items: Sequence[str], interval: bool) -> list[str]:
    flags = ["\t\tflags interval"] if interval else []
    return [
        f"\tset {name} {{",
        f"\t\ttype {type_}",
        *flags,
        f'\t\tcomment "{comment}"',
        *_elements(items),
        "\t}",
    ]


def _cidrs(networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> list[str]:
    # collapse_addresses sorts and merges overlaps: nft rejects overlapping
    # elements in an interval set ("conflicting intervals specified").
    nets = list(networks)
    v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
    collapsed = [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]
    return [str(n) for n in collapsed]


def _ports(ports: Iterable[int]) -> list[str]:
    return [str(p) for p in sorted(set(ports))]


def _rule(text: str, comment: str) -> str:
    return f'\t\t{text} comment "{comment}"'


# UDP (``--intercept-udp``): rendered only when asked for, so that the TCP-only
# table stays exactly what it was. Egress UDP follows TCP's path (the same
# mark, rule and route) to the UDP listener; inbound UDP is only welcome on
# the DTLS port. What no socket takes is refused with ICMP port unreachable
# (icmpx: the right ICMP type for each family), which is what a UDP sender
# expects from a closed port: a connected socket's next call fails with
# ECONNREFUSED (see docs/kernel.md).

_UDP_REJECT = "reject with icmpx type port-unreachable"


def _udp_sets(ic: Interception) -> list[str]:
    if not ic.intercept_udp:
        return []
    return [
        *_set(
            "udp_ports",
            "inet_service",
            "remote ports whose outbound UDP is intercepted (empty: all)",
            _ports(ic.udp_ports),
            False,
        ),
        *_set(
            "udp_exclude",
            "inet_service",
            "UDP ports never intercepted, either way (DNS unless --intercept-dns)",
            _ports(ic.udp_excluded),
            False,
        ),
    ]


def _udp_egress_prerouting(ic: Interception) -> list[str]:
    if not ic.intercept_udp:
        return []
    mark, port = ic.recirculate_mark, ic.udp_listen_port
    return [
        # A flow's later datagrams go to its own connected socket (tproxy's
        # established lookup), the first ones to the listener.
        _rule(
            f"meta mark {mark} meta l4proto udp tproxy ip to 127.0.0.1:{port} accept",
            "egress UDP looped back through lo: UDP listener",
        ),
        _rule(
            f"meta mark {mark} meta l4proto udp tproxy ip6 to [::1]:{port} accept",
            "egress UDP looped back through lo: UDP listener (IPv6)",
        ),
        _rule(
            f"meta mark {mark} meta l4proto udp {_UDP_REJECT}",
            "fail closed: egress UDP no listener took (sidecar down) is refused, never sent",
        ),
    ]


def _not_intercepted(ic: Interception) -> str:
    if not ic.intercept_udp:
        return _rule("meta l4proto != tcp return", "only TCP is intercepted: ICMP, UDP, ... pass")
    return _rule(
        "meta l4proto != { tcp, udp } return", "only TCP and UDP are intercepted: ICMP, ... pass"
    )


def _udp_ingress(ic: Interception) -> list[str]:
    if not ic.intercept_udp:
        return []
    port = ic.dtls_port
    return [
        _rule("udp dport @udp_exclude return", "excluded inbound UDP port"),
        # Peers' sidecars send DTLS to this port only; an association's later
        # datagrams go to its own connected socket (established lookup).
        _rule(
            f"udp dport {port} tproxy ip to 127.0.0.1:{port} accept",
            "inbound DTLS from a peer sidecar: DTLS listener",
        ),
        _rule(
            f"udp dport {port} tproxy ip6 to [::1]:{port} accept",
            "inbound DTLS from a peer sidecar: DTLS listener (IPv6)",
        ),
        _rule(
            f"meta l4proto udp {_UDP_REJECT}",
            "fail closed: inbound UDP in plaintext, or DTLS no listener took, is refused",
        ),
    ]


def _udp_egress_output(ic: Interception) -> list[str]:
    if not ic.intercept_udp:
        return []
    only = (
        [_rule("udp dport != @udp_ports return", "outbound UDP port not intercepted")]
        if ic.udp_ports
        else []
    )
    return [
        _rule("udp dport @udp_exclude return", "excluded outbound UDP port (DNS by default)"),
        *only,
        _rule(
            f'oifname != "lo" meta l4proto udp meta mark set {ic.recirculate_mark}',
            f"egress UDP: ip rule fwmark {ic.recirculate_mark} sends it to route table "
            f"{ic.route_table}",
        ),
    ]


def render(ic: Interception) -> str:
    """The whole transaction that (re)creates table ``inet <ic.table>``.

    Deterministic: the same configuration always gives the same text, whatever
    the order of CIDRs and ports in it.
    """
    t = ic.table
    mark, bypass, keep = ic.recirculate_mark, ic.bypass_mark, ic.preserve_mark
    probe = (
        [_rule(f"tcp dport {ic.probe_port} return", "the sidecar's plaintext probe server")]
        if ic.probe_port
        else []
    )
    tcp, tls = ic.tcp_port, ic.tls_port
    lines = [
        "# trio-tproxy interception table: load with one `nft -f -` (all or nothing).",
        "# add + delete first, so any table left by an earlier run is replaced.",
        f"add table inet {t}",
        f"delete table inet {t}",
        f"table inet {t} {{",
        '\tcomment "trio-tproxy: transparent mutual-TLS interception"',
        *_set(
            "cidrs4",
            "ipv4_addr",
            "IPv4 destinations intercepted on egress",
            _cidrs(ic.cidrs4),
            True,
        ),
        *_set(
            "cidrs6",
            "ipv6_addr",
            "IPv6 destinations intercepted on egress",
            _cidrs(ic.cidrs6),
            True,
        ),
        *_set(
            "exclude4",
            "ipv4_addr",
            "IPv4 peers never intercepted (ingress source, egress destination)",
            _cidrs(ic.excluded4),
            True,
        ),
        *_set(
            "exclude6",
            "ipv6_addr",
            "IPv6 peers never intercepted (ingress source, egress destination)",
            _cidrs(ic.excluded6),
            True,
        ),
        *_set(
            "in_ports",
            "inet_service",
            "local ports whose inbound TCP is not intercepted",
            _ports(ic.exclude_inbound_ports),
            False,
        ),
        *_udp_sets(ic),
        *_set(
            "out_ports",
            "inet_service",
            "remote ports whose outbound TCP is not intercepted",
            _ports(ic.exclude_outbound_ports),
            False,
        ),
        "\tchain prerouting {",
        '\t\tcomment "TPROXY ingress to the TLS listener, looped-back egress to the TCP listener; '
        'refuse what no listener takes"',
        "\t\ttype filter hook prerouting priority mangle - 5; policy accept;",
        # First, so that no ingress exclusion below can catch looped-back egress
        # (an excluded inbound port may well be some other pod's service port).
        _rule(
            f"meta mark {mark} meta l4proto tcp tproxy ip to 127.0.0.1:{tcp} accept",
            "egress looped back through lo: plaintext listener",
        ),
        _rule(
            f"meta mark {mark} meta l4proto tcp tproxy ip6 to [::1]:{tcp} accept",
            "egress looped back through lo: plaintext listener (IPv6)",
        ),
        # tproxy does not match when nothing listens (NFT_BREAK): without this
        # the packet would fall to the policy. Its RST goes out in conntrack's
        # reply direction (the output chain leaves it alone) and back in on lo.
        _rule(
            f"meta mark {mark} meta l4proto tcp reject with tcp reset",
            "fail closed: egress no listener took (sidecar down) is refused, never sent",
        ),
        *_udp_egress_prerouting(ic),
        _rule(
            'iifname "lo" return', "other local traffic, e.g. the proxy's own dials, is not ingress"
        ),
        _not_intercepted(ic),
        # Inbound packets of connections the pod opened: SYN-ACKs to the
        # sidecar's own dials, replies of excluded or direct egress. No
        # transparent socket owns them: they would reach the reject below.
        _rule("ct direction reply return", "replies of connections the pod opened are not ingress"),
        # No destination test: every address of the pod (link-local, outside
        # the cluster CIDRs, both families) is ingress.
        _rule("ip saddr @exclude4 return", "excluded IPv4 source"),
        _rule("ip6 saddr @exclude6 return", "excluded IPv6 source"),
        _rule("tcp dport @in_ports return", "excluded inbound port"),
        *probe,
        # Packets of accepted flows come here too: tproxy finds their socket
        # first (established lookup), the listener only for new connections.
        _rule(
            f"meta l4proto tcp tproxy ip to 127.0.0.1:{tls} accept",
            "ingress to any address of the pod: mutual-TLS listener",
        ),
        _rule(
            f"meta l4proto tcp tproxy ip6 to [::1]:{tls} accept",
            "ingress to any address of the pod: mutual-TLS listener (IPv6)",
        ),
        # What no socket took. Conntrack could not place it (out of window):
        # drop, as kube-proxy does, rather than reset a live flow.
        _rule("ct state invalid drop", "fail closed: a packet conntrack cannot place is dropped"),
        # A mid-stream packet conntrack saw no start of (after a conntrack
        # flush, say) may be a reply to our own dial: drop, do not reset it.
        # The pod's next packet re-creates the entry in the right direction.
        _rule(
            "ct state new tcp flags & (fin | syn | rst | ack) != syn drop",
            "fail closed: a packet of a flow conntrack never saw start is dropped",
        ),
        _rule(
            "meta l4proto tcp reject with tcp reset",
            "fail closed: ingress no listener took (sidecar down) is refused, never delivered",
        ),
        *_udp_ingress(ic),
        "\t}",
        "\tchain output {",
        # nft 1.0.6 rejects `priority srcnat - 5` here; 95 is the same number.
        # `type route`: a packet whose mark changes is routed again.
        '\t\tcomment "mark egress TCP so that policy routing loops it back through lo"',
        "\t\ttype route hook output priority 95; policy accept;",
        # Client-address preservation: the sidecar dials the app from the
        # client's IP with SO_MARK <keep>; conntrack keeps the mark so that the
        # app's replies (to that foreign address) get it too and are routed
        # back through lo (ip rule fwmark <keep> iif lo) to the sidecar.
        _rule(
            f"ct mark {keep} meta mark set {keep} return",
            "the app's replies to a dial that kept the client address: back to the sidecar",
        ),
        _rule(
            f"meta mark {keep} ct mark set {keep} return",
            "the sidecar's dial from the client's address: conntrack remembers it",
        ),
        _rule(f"meta mark {bypass} return", "the proxy's own sockets (bypass SO_MARK)"),
        # Without this, the app's replies on an excluded inbound port (or to a
        # client it was reached from unproxied) would be marked and looped back.
        _rule("ct direction reply return", "replies of inbound connections are not egress"),
        _rule("ip daddr != @cidrs4 return", "IPv4 destination not intercepted"),
        _rule("ip6 daddr != @cidrs6 return", "IPv6 destination not intercepted"),
        _rule("ip daddr @exclude4 return", "excluded IPv4 destination"),
        _rule("ip6 daddr @exclude6 return", "excluded IPv6 destination"),
        _rule("tcp dport @out_ports return", "excluded outbound port"),
        *_udp_egress_output(ic),
        _rule(
            f'oifname != "lo" meta l4proto tcp meta mark set {mark}',
            f"egress: ip rule fwmark {mark} sends it to route table {ic.route_table}",
        ),
        "\t}",
        # The mark only loops egress back if the ip rule and the local route
        # are there. Without them (deleted, or the IPv6 route lost when lo
        # flaps) the packet would leave in plaintext. The kernel refuses
        # `reject` in postrouting (EOPNOTSUPP): drop, the client times out.
        "\tchain postrouting {",
        '\t\tcomment "fail closed: egress marked for the proxy leaves only through lo"',
        "\t\ttype filter hook postrouting priority srcnat; policy accept;",
        _rule(
            f'meta mark {mark} oifname != "lo" drop',
            "marked egress that policy routing did not loop back (rule/route gone): never sent",
        ),
        _rule(
            f'meta mark {keep} oifname != "lo" drop',
            "a reply to a preserved client address that policy routing did not keep local",
        ),
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def render_delete(ic: Interception) -> str:
    """A transaction that deletes the table, and succeeds if it is already absent."""
    return f"add table inet {ic.table}\ndelete table inet {ic.table}\n"


# --------------------------------------------------------------------------- errors


class NftErrorKind(enum.Enum):
    #: The ``nft`` (or ``ip``, for ``ip netns exec``) binary is missing.
    NOT_INSTALLED = "not-installed"
    #: No CAP_NET_ADMIN (not root, or the capability was dropped).
    PERMISSION = "permission"
    #: nft reported ENOENT: the table (or an object it names) does not exist.
    NOT_FOUND = "not-found"
    #: Anything else: syntax errors, missing kernel support, timeouts.
    FAILED = "failed"


class NftError(OSError):
    """An nft run failed. ``str(exc)`` is one line; ``kind`` says why.

    An OSError, like every other failure to change the kernel's state, so a
    caller can handle "could not set up interception" with one ``except``.
    """

    def __init__(
        self,
        kind: NftErrorKind,
        argv: Sequence[str],
        message: str,
        returncode: int | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.argv = tuple(argv)
        self.returncode = returncode


def one_line(text: str) -> str:
    """nft's multi-line error output as one line (caret markers dropped)."""
    lines = [line.strip() for line in text.splitlines()]
    return " | ".join(line for line in lines if line and set(line) - set("^~ "))


def classify(
    argv: Sequence[str],
    *,
    returncode: int | None = None,
    stderr: str = "",
    exc: BaseException | None = None,
) -> NftError:
    """The one place that decides what kind of failure an nft run was.

    Either ``exc`` (the runner could not start the process, or it timed out) or
    ``returncode``/``stderr`` (it ran and failed). nft only reports errors as
    text, so this matches its messages (and ``ip netns exec``'s) here and
    nowhere else.
    """
    cmd = " ".join(argv)
    if isinstance(exc, FileNotFoundError):
        missing = exc.filename or argv[0]
        return NftError(
            NftErrorKind.NOT_INSTALLED,
            argv,
            f"{cmd}: {missing!s} is not installed (install nftables / iproute2)",
            returncode,
        )
    if isinstance(exc, PermissionError):
        return NftError(
            NftErrorKind.PERMISSION, argv, f"{cmd}: cannot execute: {exc.strerror}", returncode
        )
    if isinstance(exc, subprocess.TimeoutExpired):
        return NftError(
            NftErrorKind.FAILED, argv, f"{cmd}: no answer after {exc.timeout:g}s", returncode
        )
    if exc is not None:
        return NftError(NftErrorKind.FAILED, argv, f"{cmd}: {exc}", returncode)

    detail = one_line(stderr) or f"exit status {returncode}"
    lines = stderr.splitlines()
    if any(line.startswith("exec of ") and "No such file" in line for line in lines):
        # `ip netns exec NS nft` with no nft on PATH.
        return NftError(
            NftErrorKind.NOT_INSTALLED, argv, f"{cmd}: nft is not installed: {detail}", returncode
        )
    if "Operation not permitted" in stderr:
        return NftError(
            NftErrorKind.PERMISSION,
            argv,
            f"{cmd}: needs CAP_NET_ADMIN (run as root or grant it): {detail}",
            returncode,
        )
    # nft's own ENOENT ("Error: No such file or directory", "Error: Could not
    # process rule: No such file or directory"); not ip's "Cannot open network
    # namespace ...: No such file or directory", which is a plain failure.
    if any("Error:" in line and line.endswith("No such file or directory") for line in lines):
        return NftError(NftErrorKind.NOT_FOUND, argv, f"{cmd}: {detail}", returncode)
    return NftError(NftErrorKind.FAILED, argv, f"{cmd}: {detail}", returncode)


# --------------------------------------------------------------------------- runner


def run_subprocess(argv: Sequence[str], stdin: str) -> subprocess.CompletedProcess[str]:
    """The default runner: a real process, output captured, no exception on failure."""
    return subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, check=False, timeout=NFT_TIMEOUT
    )


class Nft:
    """Runs nft, each call one process (``ip netns exec NS nft ...`` with ``netns``)."""

    def __init__(self, run: Runner | None = None, netns: str | None = None) -> None:
        self._run: Runner = run if run is not None else run_subprocess
        self.netns = netns

    def argv(self, *args: str) -> list[str]:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns is not None else []
        return [*prefix, "nft", *args]

    def apply(self, ic: Interception) -> None:
        """Create or replace the whole table, atomically."""
        self.load(render(ic))

    def load(self, text: str) -> None:
        """Run ``text`` as one transaction (``nft -f -``): all of it or none of it."""
        self._call(("-f", "-"), text)

    def delete(self, ic: Interception) -> None:
        """Delete the table; not an error if it is absent."""
        self._call(("-f", "-"), render_delete(ic))

    def check(self, text: str) -> None:
        """Have nft and the kernel validate ``text`` without applying it."""
        self._call(("--check", "-f", "-"), text)

    def list_table(self, ic: Interception) -> str | None:
        """``nft list table inet <table>``, or None if there is no such table."""
        try:
            return self._call(("list", "table", "inet", ic.table), "")
        except NftError as exc:
            if exc.kind is NftErrorKind.NOT_FOUND:
                return None
            raise

    def _call(self, args: Sequence[str], stdin: str) -> str:
        argv = self.argv(*args)
        try:
            proc = self._run(argv, stdin)
        except (OSError, subprocess.SubprocessError) as exc:
            raise classify(argv, exc=exc) from exc
        if proc.returncode != 0:
            raise classify(argv, returncode=proc.returncode, stderr=proc.stderr or "")
        return proc.stdout or ""

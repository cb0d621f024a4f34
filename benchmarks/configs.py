"""The stunnel4 and haproxy configurations of the comparison, as pure text.

Why rendered separately from running: a reader checking that the comparison
is fair wants the exact configuration, and the harness prints and saves it.

Both are set up the way trio-tproxy behaves, so that the figures compare the
same work:

* mutual TLS: the server side requires a client certificate and verifies its
  chain against the CA; the client side verifies the server's chain. Neither
  checks SPIFFE IDs (trio-tproxy does, after the handshake).
* TLS 1.3 only, the same ECDSA P-256 certificates and CA as the sidecars, and
  the same key exchange (X25519: the sidecars run with ``--tls-groups
  X25519:P-256``, since Debian's OpenSSL 3.0 has no ML-KEM hybrid).
* TLS session resumption on, as each does by default towards a peer it
  talked to before (trio-tproxy keeps one TLS 1.3 session per destination;
  haproxy reuses its backend session; stunnel ``sessionResume = yes``).
  ``python -m benchmarks --no-resumption`` turns it off in all three, so that
  every short connection costs a full handshake.
* TCP_NODELAY on every socket (trio sets it on the sockets it opens).
* No per-connection log lines (the sidecars run with ``-v 0``).
* haproxy: one thread (``nbthread 1``); the sidecar is one single-threaded
  process too, and on a 2-core box the load generators need the other core.
  stunnel has no such knob: it runs one thread per connection.
  ``--haproxy-threads N`` changes it, to reproduce a reading taken with
  haproxy's default (one thread per core): see the README's ping-pong section.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Long enough for the slowest test; not so long that a stuck run hangs forever.
IDLE_TIMEOUT_S = 600


@dataclass(frozen=True)
class Service:
    """One forwarded port: the client side listens on ``127.0.0.1:local`` in pod A,
    the server side on ``<B's IP>:remote`` in pod B, which forwards to ``127.0.0.1:app``."""

    name: str
    local: int
    remote: int
    app: int


@dataclass(frozen=True)
class Credentials:
    cert: Path
    key: Path
    ca: Path
    #: cert + key in one file, the way haproxy wants them
    pem: Path


def stunnel_client(
    services: list[Service], b_ip: str, creds: Credentials, resume: bool = True
) -> str:
    lines = _stunnel_globals()
    for s in services:
        lines += [
            f"[{s.name}]",
            "client = yes",
            f"accept = 127.0.0.1:{s.local}",
            f"connect = {b_ip}:{s.remote}",
            *_stunnel_tls(creds),
            f"sessionResume = {'yes' if resume else 'no'}",
            "",
        ]
    return "\n".join(lines)


def stunnel_server(services: list[Service], b_ip: str, creds: Credentials) -> str:
    lines = _stunnel_globals()
    for s in services:
        lines += [
            f"[{s.name}]",
            f"accept = {b_ip}:{s.remote}",
            f"connect = 127.0.0.1:{s.app}",
            *_stunnel_tls(creds),
            "",
        ]
    return "\n".join(lines)


def _stunnel_globals() -> list[str]:
    return [
        "foreground = yes",
        "pid =",
        "syslog = no",
        "debug = 3",  # errors only: no line per connection
        "socket = l:TCP_NODELAY=1",
        "socket = r:TCP_NODELAY=1",
        "",
    ]


def _stunnel_tls(creds: Credentials) -> list[str]:
    # verifyChain = yes: the peer must present a certificate chaining to CAfile;
    # on the server side that makes the client certificate mandatory.
    return [
        f"cert = {creds.cert}",
        f"key = {creds.key}",
        f"CAfile = {creds.ca}",
        "verifyChain = yes",
        "sslVersionMin = TLSv1.3",
    ]


def haproxy_client(
    services: list[Service],
    b_ip: str,
    creds: Credentials,
    resume: bool = True,
    threads: int = 1,
) -> str:
    lines = _haproxy_globals(threads)
    for s in services:
        lines += [
            f"listen {s.name}",
            f"    bind 127.0.0.1:{s.local}",
            f"    server b {b_ip}:{s.remote} ssl crt {creds.pem} ca-file {creds.ca} "
            "verify required ssl-min-ver TLSv1.3" + ("" if resume else " no-ssl-reuse"),
            "",
        ]
    return "\n".join(lines)


def haproxy_server(services: list[Service], b_ip: str, creds: Credentials, threads: int = 1) -> str:
    lines = _haproxy_globals(threads)
    for s in services:
        lines += [
            f"listen {s.name}",
            f"    bind {b_ip}:{s.remote} ssl crt {creds.pem} ca-file {creds.ca} "
            "verify required ssl-min-ver TLSv1.3",
            f"    server app 127.0.0.1:{s.app}",
            "",
        ]
    return "\n".join(lines)


def _haproxy_globals(threads: int) -> list[str]:
    return [
        "global",
        f"    nbthread {threads}",
        "    maxconn 8000",  # two fds per connection: stays under a 20000-fd limit
        "",
        "defaults",
        "    mode tcp",
        "    maxconn 8000",
        "    timeout connect 10s",
        f"    timeout client {IDLE_TIMEOUT_S}s",
        f"    timeout server {IDLE_TIMEOUT_S}s",
        "",
    ]

"""Tiny plaintext apps for the demo, the netns tests and the benchmarks.

They stand for the application in a pod, which knows nothing of TLS:

    python -m trio_tproxy.apps halfclose-server PORT
        accept; read to EOF; answer "got N bytes sha256 H" after DELAY s; close.
    python -m trio_tproxy.apps halfclose-client HOST PORT MESSAGE [DELAY]
        send MESSAGE, shut the write side, print the whole answer.
    python -m trio_tproxy.apps echo-server PORT
        echo each connection until EOF, then half-close.

Blocking stdlib sockets on purpose: the apps must not share code paths with
the proxy under test.
"""

from __future__ import annotations

import hashlib
import socket
import sys
import threading
import time
from collections.abc import Callable


def _listen(port: int) -> socket.socket:
    # One dual-stack socket, like most apps: "::" accepts IPv4 and IPv6.
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind(("::", port))
    srv.listen(128)
    return srv


def _read_to_eof(conn: socket.socket) -> bytes:
    parts = []
    while data := conn.recv(1 << 16):
        parts.append(data)
    return b"".join(parts)


def _serve(port: int, handle: Callable[..., None], *args: object) -> None:
    srv = _listen(port)
    print(f"listening on [::]:{port}", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn, *args), daemon=True).start()


def _halfclose_handler(conn: socket.socket, delay: float) -> None:
    with conn:
        try:
            data = _read_to_eof(conn)
            time.sleep(delay)
            digest = hashlib.sha256(data).hexdigest()[:16]
            conn.sendall(f"got {len(data)} bytes sha256 {digest}\n".encode())
            conn.shutdown(socket.SHUT_WR)
            _read_to_eof(conn)
        except OSError as exc:
            print(f"halfclose-server: {exc}", file=sys.stderr, flush=True)


def _echo_handler(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(1 << 16):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError as exc:
            print(f"echo-server: {exc}", file=sys.stderr, flush=True)


def halfclose_client(host: str, port: int, message: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=15) as conn:
        conn.sendall(message)
        conn.shutdown(socket.SHUT_WR)
        return _read_to_eof(conn)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "halfclose-server":
        delay = float(argv[2]) if len(argv) > 2 else 0.0
        _serve(int(argv[1]), _halfclose_handler, delay)
    elif len(argv) >= 2 and argv[0] == "echo-server":
        _serve(int(argv[1]), _echo_handler)
    elif len(argv) >= 4 and argv[0] == "halfclose-client":
        sys.stdout.write(halfclose_client(argv[1], int(argv[2]), argv[3].encode()).decode())
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The stand-in applications: what runs in a pod in place of the real app.

They stand for the application in a pod, which knows nothing of TLS, so they
must share no code path with the proxies under test: stdlib only, nothing from
trio_tproxy, nothing from the rest of the lab. That also lets the benchmark
harness run this file by path (``python .../lab/apps.py``) with no package
import at start-up; the demo and the tests run ``python -m lab.apps``.
Blocking sockets and threads keep it simple; big buffers for bulk and
TCP_NODELAY for the small exchanges keep it cheap, and every load generator
reports its own CPU time so a reader can check that it was not the bottleneck.

Servers (one dual-stack listener on [::] each; a thread per connection):

    halfclose-server PORT [DELAY]
                               read to EOF; DELAY s later answer
                               "got N bytes sha256 H"; half-close; wait for EOF
    echo-server PORT           echo each connection until EOF, then half-close
    peer-server PORT [HOST...] read to EOF, answer "peer IP PORT" (its getpeername(),
                               IPv4-mapped shown as IPv4), half-close; on [::] or
                               only on the HOSTs given (e.g. 127.0.0.1 ::1, or a pod IP)
    tls-echo-server PORT CERT KEY
                               the app's own TLS (no client certificate): echo until EOF
    health-server PORT FILE    HTTP: 200 while FILE exists, 503 otherwise
    stream-server PORT SECONDS RATE
                               read to EOF, then send RATE bytes/s (10 writes a
                               second) for SECONDS; half-close
    serve PORT                 the benchmark app in pod B; four listeners:
                               PORT   bulk: read an 8-byte size N, then send N bytes
                                      while reading to EOF; half-close
                               PORT+1 echo (request/response)
                               PORT+2 connection rate: read 100 B, send 100 B, wait EOF
                               PORT+3 idle: read 1 B, send 1 B, hold until EOF

Clients:

    halfclose-client HOST PORT MESSAGE
                               send MESSAGE, shut the write side, print the whole answer
    bulk HOST PORT MIB         one connection, MIB MiB each way
    rr HOST PORT COUNT SIZE    COUNT ping-pongs of SIZE bytes on one connection
    connrate HOST PORT SECONDS CONCURRENCY
                               short connections (100 B each way) for SECONDS
                               from CONCURRENCY threads
    idle HOST PORT COUNT       open COUNT connections, print a line, hold them
                               until stdin closes
    conncount HOST PORT COUNT CONCURRENCY
                               COUNT short connections (as connrate) from
                               CONCURRENCY threads
    flood HOST PORT COUNT hello|silent
                               open COUNT connections that never finish a TLS
                               handshake (a ClientHello, or nothing), print a
                               line, hold them until stdin closes
    probe HOST PORT CA [CERT KEY]
                               one TLS echo exchange straight to a TLS port
                               (the benchmark harness's mTLS check)

UDP (one dual-stack [::] socket each):

    udp-echo-server PORT       send each datagram back to its sender, unchanged
    dns-server PORT            answer every A query with 192.0.2.53 (TTL 60),
                               anything else with NOTIMP: a stand-in resolver
    udp-rr HOST PORT COUNT SIZE
                               COUNT datagram round trips of SIZE bytes (one
                               in flight; a lost one is counted, waited for
                               at most 1 s), then the packets per second of a
                               window of 32 datagrams in flight

The benchmark clients (bulk, rr, connrate, idle, probe) print one JSON object
on stdout.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import selectors
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

BULK_CHUNK = 1 << 20  # bytes per sendall / recv_into in the bulk test
HEADER = struct.Struct("!Q")
CONN_SIZE = 100  # bytes each way per short connection
RR_WARMUP = 100  # untimed round trips before the ping-pong measurement
ACCEPT_WORKERS = 32  # connection-rate server threads blocked in accept()
TIMEOUT = 60.0  # seconds: a stuck proxy fails the run instead of hanging it
#: Where rr samples its latency distribution (the same grid as benchmarks/apptools.py).
CDF_PERCENTILES = tuple(sorted({*range(1, 100, 3), 50, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 100}))


# -- helpers -------------------------------------------------------------------


def cpu_seconds() -> float:
    """User + system CPU of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` completely; EOF before that is an error."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"EOF after {got} of {len(view)} bytes")
        got += n


def drain(sock: socket.socket, buf: bytearray) -> int:
    """Read to EOF; return the byte count."""
    total = 0
    while n := sock.recv_into(buf):
        total += n
    return total


def send_zeros(sock: socket.socket, total: int) -> None:
    """Send ``total`` bytes in BULK_CHUNK pieces, then half-close."""
    chunk = memoryview(bytes(BULK_CHUNK))
    left = total
    while left:
        n = min(left, BULK_CHUNK)
        sock.sendall(chunk[:n])
        left -= n
    sock.shutdown(socket.SHUT_WR)


def connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values)) - 1))
    return sorted_values[rank]


# -- the app server ------------------------------------------------------------


def listen(port: int) -> socket.socket:
    # One dual-stack socket, like most apps: "::" accepts IPv4 and IPv6.
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind(("::", port))
    srv.listen(4096)
    return srv


def spawn(target: Callable[..., None], *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def serve_thread_per_conn(srv: socket.socket, handler: Callable[[socket.socket], None]) -> None:
    while True:
        conn, _ = srv.accept()
        spawn(guarded, handler, conn)


def guarded(handler: Callable[[socket.socket], None], conn: socket.socket) -> None:
    """Run one connection's handler; a peer's reset must not end the server."""
    try:
        with conn:
            conn.settimeout(TIMEOUT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handler(conn)
    except OSError as exc:
        print(f"apps: {handler.__name__}: {exc!r}", file=sys.stderr, flush=True)


def handle_bulk(conn: socket.socket) -> None:
    header = bytearray(HEADER.size)
    recv_exactly(conn, memoryview(header))
    (total,) = HEADER.unpack(header)
    sender = spawn(send_zeros, conn, total)
    received = drain(conn, bytearray(BULK_CHUNK))
    sender.join()
    if received != total:
        print(f"apps serve: bulk got {received} of {total} bytes", file=sys.stderr, flush=True)


def read_to_eof(conn: socket.socket) -> bytes:
    parts = []
    while data := conn.recv(1 << 16):
        parts.append(data)
    return b"".join(parts)


def halfclose_handler(delay: float) -> Callable[[socket.socket], None]:
    def handle_halfclose(conn: socket.socket) -> None:
        data = read_to_eof(conn)
        time.sleep(delay)  # the answer comes after the client's EOF, and later
        digest = hashlib.sha256(data).hexdigest()[:16]
        conn.sendall(f"got {len(data)} bytes sha256 {digest}\n".encode())
        conn.shutdown(socket.SHUT_WR)
        read_to_eof(conn)

    return handle_halfclose


def stream_handler(seconds: float, rate: int) -> Callable[[socket.socket], None]:
    def handle_stream(conn: socket.socket) -> None:
        read_to_eof(conn)
        chunk = bytes(rate // 10)
        start = time.monotonic()
        tick = 0
        while time.monotonic() - start < seconds:
            conn.sendall(chunk)
            tick += 1
            time.sleep(max(0.0, start + tick / 10 - time.monotonic()))
        conn.shutdown(socket.SHUT_WR)
        read_to_eof(conn)

    return handle_stream


def handle_echo(conn: socket.socket) -> None:
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    while n := conn.recv_into(buf):
        conn.sendall(view[:n])
    conn.shutdown(socket.SHUT_WR)


def handle_short(conn: socket.socket) -> None:
    buf = bytearray(CONN_SIZE)
    recv_exactly(conn, memoryview(buf))
    conn.sendall(buf)
    drain(conn, buf)


def accept_worker(srv: socket.socket) -> None:
    """Handle short connections inline: no thread start per connection."""
    while True:
        conn, _ = srv.accept()
        guarded(handle_short, conn)


def serve_idle(srv: socket.socket) -> None:
    """Hold any number of connections in one thread (a thread each would cost more)."""
    sel = selectors.DefaultSelector()
    srv.setblocking(False)
    sel.register(srv, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            if sock is srv:
                try:
                    conn, _ = srv.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(64)
                if data:
                    sock.send(data)  # 1 byte into an empty buffer: never blocks
                    continue
            except OSError:
                pass
            sel.unregister(sock)
            sock.close()


def handle_peer(conn: socket.socket) -> None:
    host, port = conn.getpeername()[:2]
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    read_to_eof(conn)
    conn.sendall(f"peer {host} {port}\n".encode())
    conn.shutdown(socket.SHUT_WR)


def serve_peer(port: int, hosts: list[str]) -> None:
    """The peer server on [::] (dual-stack), or only on each of ``hosts``."""
    if not hosts:
        serve_one(port, handle_peer)
        return
    for host in hosts:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        srv.bind((host, port))
        srv.listen(128)
        spawn(serve_thread_per_conn, srv, handle_peer)
    print(f"peer server on {hosts} port {port}", flush=True)
    threading.Event().wait()


def serve_tls_echo(port: int, cert: str, key: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    srv = listen(port)

    def handle(conn: socket.socket) -> None:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            while data := tls.recv(65536):
                tls.sendall(data)

    print(f"TLS echo on [::]:{port}", flush=True)
    serve_thread_per_conn(srv, handle)


def serve_health(port: int, flag: str) -> None:
    def handle(conn: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request and (more := conn.recv(4096)):
            request += more
        status = "200 OK" if os.path.exists(flag) else "503 Service Unavailable"
        body = status.encode()
        conn.sendall(
            f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )

    serve_one(port, handle)


def serve_one(port: int, handler: Callable[[socket.socket], None]) -> None:
    """One listener, a thread per connection, forever."""
    srv = listen(port)
    print(f"listening on [::]:{port}", flush=True)
    serve_thread_per_conn(srv, handler)


def serve(port: int) -> None:
    listeners = [listen(port + i) for i in range(4)]
    spawn(serve_thread_per_conn, listeners[0], handle_bulk)
    spawn(serve_thread_per_conn, listeners[1], handle_echo)
    for _ in range(ACCEPT_WORKERS):
        spawn(accept_worker, listeners[2])
    spawn(serve_idle, listeners[3])
    print(f"serving on [::]:{port}-{port + 3}", flush=True)
    threading.Event().wait()


# -- clients -------------------------------------------------------------------


def halfclose_client(host: str, port: int, message: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=15) as conn:
        conn.sendall(message)
        conn.shutdown(socket.SHUT_WR)
        return read_to_eof(conn)


def bulk(host: str, port: int, mib: int) -> None:
    total = mib << 20
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    with connect(host, port) as sock:
        sock.sendall(HEADER.pack(total))
        sender = spawn(send_zeros, sock, total)
        received = drain(sock, bytearray(BULK_CHUNK))
        sender.join()
    seconds = time.perf_counter() - t0
    if received != total:
        raise SystemExit(
            f"bulk: received {received} of {total} bytes ({total - received} short) "
            f"before EOF, after {seconds:.1f} s"
        )
    emit(
        {
            "bytes_each_way": total,
            "seconds": seconds,
            "cpu_seconds": cpu_seconds() - cpu0,
        }
    )


def rr(host: str, port: int, count: int, size: int) -> None:
    message = os.urandom(size)
    buf = bytearray(size)
    view = memoryview(buf)
    samples: list[float] = []
    with connect(host, port) as sock:
        for _ in range(min(RR_WARMUP, count)):  # warm-up: handshake, caches, TCP windows
            sock.sendall(message)
            recv_exactly(sock, view)
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        clock = time.perf_counter_ns
        for _ in range(count):
            start = clock()
            sock.sendall(message)
            recv_exactly(sock, view)
            samples.append((clock() - start) / 1000)
        seconds = time.perf_counter() - t0
        cpu = cpu_seconds() - cpu0
    if bytes(buf) != message:
        raise SystemExit("rr: echo does not match")
    samples.sort()
    emit(
        {
            "count": count,
            "seconds": seconds,
            "cpu_seconds": cpu,
            "p50_us": percentile(samples, 0.50),
            "p99_us": percentile(samples, 0.99),
            "p999_us": percentile(samples, 0.999),
            # the distribution, for the benchmark's tail-latency chart: [percentile, us]
            "cdf_us": [[p, percentile(samples, p / 100)] for p in CDF_PERCENTILES],
        }
    )


def connrate(host: str, port: int, duration: float, concurrency: int) -> None:
    size = CONN_SIZE
    message = os.urandom(size)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[str] = []
    deadline = time.perf_counter() + duration

    def worker(mine: list[float]) -> None:
        buf = bytearray(size)
        view = memoryview(buf)
        clock = time.perf_counter
        while (start := clock()) < deadline:
            try:
                with connect(host, port) as sock:
                    sock.sendall(message)
                    recv_exactly(sock, view)
            except OSError as exc:
                errors.append(repr(exc))
                continue
            mine.append(clock() - start)

    cpu0, t0 = cpu_seconds(), time.perf_counter()
    threads = [spawn(worker, mine) for mine in latencies]
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - t0
    samples = sorted(x * 1000 for mine in latencies for x in mine)
    emit(
        {
            "connections": len(samples),
            "errors": len(errors),
            "first_errors": errors[:3],
            "seconds": seconds,
            "cpu_seconds": cpu_seconds() - cpu0,
            "p50_ms": percentile(samples, 0.50),
            "p99_ms": percentile(samples, 0.99),
        }
    )


def conncount(host: str, port: int, count: int, concurrency: int) -> None:
    """``count`` short connections (100 B each way) from ``concurrency`` threads."""
    message = os.urandom(CONN_SIZE)
    left = [count]
    lock = threading.Lock()
    errors: list[str] = []
    done = [0]

    def worker() -> None:
        buf = bytearray(CONN_SIZE)
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            try:
                with connect(host, port) as sock:
                    sock.sendall(message)
                    recv_exactly(sock, memoryview(buf))
                with lock:
                    done[0] += 1
            except OSError as exc:
                errors.append(repr(exc))

    t0 = time.perf_counter()
    threads = [spawn(worker) for _ in range(concurrency)]
    for thread in threads:
        thread.join()
    emit(
        {
            "connections": done[0],
            "errors": len(errors),
            "first_errors": errors[:3],
            "seconds": time.perf_counter() - t0,
        }
    )


def client_hello() -> bytes:
    """The first flight of a TLS client, made by the stdlib (no certificate, no check)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def flood(host: str, port: int, count: int, mode: str) -> None:
    """``count`` connections that never finish a handshake; held until stdin closes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    hello = client_hello() if mode == "hello" else b""
    socks = []
    failed = 0
    t0 = time.perf_counter()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        try:
            sock.connect((host, port))
            if hello:
                sock.sendall(hello)
        except OSError:
            failed += 1  # refused, or reset at accept: the sidecar's limit
        socks.append(sock)
    emit({"opened": count - failed, "failed": failed, "seconds": time.perf_counter() - t0})
    sys.stdin.read()
    for sock in socks:
        sock.close()
    emit({"closed": len(socks)})


def idle(host: str, port: int, count: int) -> None:
    """Open ``count`` connections, each proven end to end by a 1-byte echo, and hold them."""
    socks = []
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    one = memoryview(bytearray(1))
    for _ in range(count):
        sock = connect(host, port)
        sock.sendall(b"i")
        recv_exactly(sock, one)
        socks.append(sock)
    emit(
        {
            "opened": len(socks),
            "seconds": time.perf_counter() - t0,
            "cpu_seconds": cpu_seconds() - cpu0,
        }
    )
    sys.stdin.read()  # the harness measures memory now, then closes our stdin
    for sock in socks:
        sock.close()
    emit({"closed": len(socks)})


def probe(host: str, port: int, ca: str, cert: str | None, key: str | None) -> None:
    """One TLS echo exchange; report the version and cipher, or the error that ended it.

    Under TLS 1.3 a server that refuses the client certificate does so after
    the client's handshake has finished, so the verdict is the echo, not the
    handshake.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    if cert and key:
        ctx.load_cert_chain(cert, key)
    result: dict[str, Any] = {"echoed": False}
    try:
        with (
            socket.create_connection((host, port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            result["version"] = tls.version()
            result["cipher"] = (tls.cipher() or ("?",))[0]
            tls.sendall(b"mtls-probe")
            data = b""
            while len(data) < 10 and (more := tls.recv(64)):
                data += more
            result["echoed"] = data == b"mtls-probe"
            if not result["echoed"]:
                result["error"] = f"no echo (got {data!r})"
            else:
                tls.unwrap()  # close_notify both ways: a clean end, not a truncation
    except (OSError, ssl.SSLError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    emit(result)


# -- UDP -----------------------------------------------------------------------

DNS_ANSWER = bytes([192, 0, 2, 53])
UDP_RR_WAIT = 1.0  # seconds: a datagram not echoed by then is lost
UDP_WINDOW = 32  # datagrams in flight in the packets-per-second phase


def udp_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    return sock


def udp_echo_server(port: int) -> None:
    with udp_socket(port) as sock:
        while True:
            data, peer = sock.recvfrom(65535)
            try:
                sock.sendto(data, peer)
            except OSError as exc:
                print(f"apps: udp-echo-server: {exc!r}", file=sys.stderr, flush=True)


def dns_answer(query: bytes) -> bytes | None:
    """The answer to one DNS query (None: not a query we can parse)."""
    if len(query) < 12:
        return None
    ident, flags, qdcount = struct.unpack_from("!HHH", query)
    if flags & 0x8000 or qdcount != 1:
        return None
    pos = 12
    while pos < len(query) and query[pos]:  # the name, label by label
        pos += 1 + query[pos]
    if pos + 5 > len(query):
        return None
    qtype, qclass = struct.unpack_from("!HH", query, pos + 1)
    question = query[12 : pos + 5]
    rd = flags & 0x0100
    if qtype == 1 and qclass == 1:
        header = struct.pack("!HHHHHH", ident, 0x8400 | rd, 1, 1, 0, 0)
        # name: a pointer to the question's (offset 12); type A, class IN, TTL 60
        answer = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + DNS_ANSWER
        return header + question + answer
    return struct.pack("!HHHHHH", ident, 0x8404 | rd, 1, 0, 0, 0) + question


def dns_server(port: int) -> None:
    with udp_socket(port) as sock:
        while True:
            query, peer = sock.recvfrom(65535)
            answer = dns_answer(query)
            if answer is not None:
                sock.sendto(answer, peer)


def udp_rr(host: str, port: int, count: int, size: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    samples: list[float] = []
    lost = 0
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((host, port))
        sock.settimeout(UDP_RR_WAIT)
        clock = time.perf_counter_ns
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        for i in range(count):
            message = i.to_bytes(4, "big") + os.urandom(size - 4)
            start = clock()
            sock.send(message)
            try:
                while sock.recv(65535) != message:  # a late echo of a lost one
                    pass
            except TimeoutError:
                lost += 1
                continue
            samples.append((clock() - start) / 1000)
        rr_seconds = time.perf_counter() - t0
        # Throughput: keep UDP_WINDOW in flight, count what comes back.
        message = os.urandom(size)
        sock.settimeout(UDP_RR_WAIT)
        sent = received = 0
        t1 = time.perf_counter()
        for _ in range(UDP_WINDOW):
            sock.send(message)
            sent += 1
        while sent < count:
            try:
                sock.recv(65535)
            except TimeoutError:
                break
            received += 1
            sock.send(message)
            sent += 1
        try:
            while received < sent:
                sock.recv(65535)
                received += 1
        except TimeoutError:
            pass
        pps_seconds = time.perf_counter() - t1 - (UDP_RR_WAIT if received < sent else 0)
        cpu = cpu_seconds() - cpu0
    samples.sort()
    emit(
        {
            "count": count,
            "size": size,
            "lost": lost,
            "seconds": rr_seconds,
            "cpu_seconds": cpu,
            "p50_us": percentile(samples, 0.50),
            "p99_us": percentile(samples, 0.99),
            "pps": received / pps_seconds if pps_seconds > 0 else 0.0,
            "pps_lost": sent - received,
        }
    )


def main(argv: list[str]) -> int:
    cmd, args = (argv[0], argv[1:]) if argv else ("", [])
    if cmd == "halfclose-server" and len(args) in (1, 2):
        delay = float(args[1]) if len(args) == 2 else 0.0
        serve_one(int(args[0]), halfclose_handler(delay))
    elif cmd == "echo-server" and len(args) == 1:
        serve_one(int(args[0]), handle_echo)
    elif cmd == "peer-server" and len(args) >= 1:
        serve_peer(int(args[0]), args[1:])
    elif cmd == "tls-echo-server" and len(args) == 3:
        serve_tls_echo(int(args[0]), args[1], args[2])
    elif cmd == "health-server" and len(args) == 2:
        serve_health(int(args[0]), args[1])
    elif cmd == "stream-server" and len(args) == 3:
        serve_one(int(args[0]), stream_handler(float(args[1]), int(args[2])))
    elif cmd == "conncount" and len(args) == 4:
        conncount(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif cmd == "flood" and len(args) == 4 and args[3] in ("hello", "silent"):
        flood(args[0], int(args[1]), int(args[2]), args[3])
    elif cmd == "halfclose-client" and len(args) == 3:
        answer = halfclose_client(args[0], int(args[1]), args[2].encode())
        sys.stdout.write(answer.decode())
    elif cmd == "serve" and len(args) == 1:
        serve(int(args[0]))
    elif cmd == "bulk" and len(args) == 3:
        bulk(args[0], int(args[1]), int(args[2]))
    elif cmd == "rr" and len(args) == 4:
        rr(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif cmd == "connrate" and len(args) == 4:
        connrate(args[0], int(args[1]), float(args[2]), int(args[3]))
    elif cmd == "idle" and len(args) == 3:
        idle(args[0], int(args[1]), int(args[2]))
    elif cmd == "udp-echo-server" and len(args) == 1:
        udp_echo_server(int(args[0]))
    elif cmd == "dns-server" and len(args) == 1:
        dns_server(int(args[0]))
    elif cmd == "udp-rr" and len(args) == 4:
        udp_rr(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif cmd == "probe" and len(args) in (3, 5):
        probe(args[0], int(args[1]), args[2], *(args[3:5] if len(args) == 5 else (None, None)))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

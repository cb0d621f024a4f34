"""A stand-in gRPC app for probe tests: ``grpc.health.v1.Health/Check`` over cleartext HTTP/2.

    python -m lab.grpchealth PORT FLAGFILE

Answers SERVING (1) while FLAGFILE exists, NOT_SERVING (2) otherwise, for any
service name; any other path gets ``grpc-status: 12`` (UNIMPLEMENTED).  Built
on h2's server role with blocking sockets and a thread per connection: it
shares no code with trio_tproxy.probes (which is the client under test).
"""

from __future__ import annotations

import os
import socket
import sys
import threading

import h2.config
import h2.connection
import h2.events

SERVING, NOT_SERVING = 1, 2


def _reply(conn: h2.connection.H2Connection, sid: int, path: str, flag: str) -> None:
    if path != "/grpc.health.v1.Health/Check":
        conn.send_headers(
            sid,
            [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "12")],
            end_stream=True,
        )
        return
    status = SERVING if os.path.exists(flag) else NOT_SERVING
    body = bytes([0x08, status])
    conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
    conn.send_data(sid, b"\x00" + len(body).to_bytes(4, "big") + body)
    conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)


def handle(sock: socket.socket, flag: str) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    paths: dict[int, str] = {}
    with sock:
        while data := sock.recv(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    headers = {
                        (k.decode() if isinstance(k, bytes) else k): (
                            v.decode() if isinstance(v, bytes) else v
                        )
                        for k, v in event.headers
                    }
                    paths[event.stream_id] = headers.get(":path", "")
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    _reply(conn, event.stream_id, paths.pop(event.stream_id, ""), flag)
            sock.sendall(conn.data_to_send())


def serve(port: int, flag: str, host: str = "::") -> None:
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind((host, port))
    srv.listen(64)
    print(f"gRPC health on [{host}]:{port}", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_guarded, args=(conn, flag), daemon=True).start()


def _guarded(sock: socket.socket, flag: str) -> None:
    try:
        handle(sock, flag)
    except (OSError, h2.exceptions.H2Error) as exc:
        print(f"grpchealth: {exc!r}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    serve(int(sys.argv[1]), sys.argv[2])

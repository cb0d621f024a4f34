"""Sockets in the pods' namespaces, driven from the test process.

A network namespace belongs to a thread on Linux, and a socket keeps the
namespace it was created in.  So a short-lived thread enters pod A's (or
B's) namespace, creates a socket and exits; the test then uses the socket
from trio in the main thread, and its traffic takes the real kernel path:
app A -> nftables/TPROXY -> sidecar A -> mTLS -> sidecar B -> app B.
"""

from __future__ import annotations

import ctypes
import os
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from trio_tproxy.podlab import PodLab

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def socket_in(netns: str, family: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket created inside network namespace ``netns`` (by a helper thread)."""
    made: list[socket.socket | BaseException] = []

    def enter_and_create() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            made.append(socket.socket(family, kind))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            made.append(exc)

    thread = threading.Thread(target=enter_and_create)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Pods:
    """A PodLab with both sidecars up, and a transport for fuzz/relay_property."""

    PORT = 7100

    def __init__(self, lab: PodLab, family: int = socket.AF_INET) -> None:
        self.lab = lab
        self.family = family
        #: Each sidecar's fd count with no connection open.
        self.baseline: dict[str, int] | None = None

    @classmethod
    def start(cls) -> Pods:
        lab = PodLab(Path(tempfile.mkdtemp(prefix="tpt-pods-")))
        lab.__enter__()
        try:
            lab.start_sidecar("a", "-v", "0")
            lab.start_sidecar("b", "-v", "0")
        except BaseException:
            lab.close()
            raise
        return cls(lab)

    def stop(self) -> None:
        self.lab.close()

    def sidecar_fds(self) -> dict[str, int]:
        return {pod: fd_count(s.process.pid) for pod, s in self.lab.sidecars.items()}

    @asynccontextmanager
    async def transport(self) -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
        """One connection from app A to app B through both sidecars.

        On exit: both sidecars must be back to their idle file-descriptor
        count within 10 s (both legs of both relays closed).
        """
        b = self.lab.host("b")
        dst = b.ip4 if self.family == socket.AF_INET else b.ip6
        if self.baseline is None:
            self.baseline = self.sidecar_fds()  # idle sidecars: listeners, epoll, logs
        before = self.baseline
        listener = trio.socket.from_stdlib_socket(socket_in(b.netns, socket.AF_INET6))
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        await listener.bind(("::", self.PORT))
        listener.listen(1)
        client = trio.socket.from_stdlib_socket(socket_in(self.lab.host("a").netns, self.family))
        try:
            with trio.fail_after(10):
                await client.connect((dst, self.PORT))
                server, _ = await listener.accept()
        except BaseException:
            client.close()
            raise
        finally:
            listener.close()
        client_stream, server_stream = trio.SocketStream(client), trio.SocketStream(server)
        try:
            yield client_stream, server_stream
        finally:
            await client_stream.aclose()
            await server_stream.aclose()
        deadline = time.monotonic() + 10
        while (now := self.sidecar_fds()) != before:
            if time.monotonic() > deadline:
                raise AssertionError(f"sidecar fds {before} -> {now}: a relay leg was left open")
            await trio.sleep(0.02)


def probe(
    netns: str,
    host: str,
    port: int,
    message: bytes,
    *,
    timeout: float = 5.0,
    half_close: bool = True,
) -> tuple[bytes, str]:
    """A plaintext client in ``netns``: connect, send, (half-close), read to the end.

    Returns (bytes received, how it ended: "eof", "reset", "timeout", "refused",
    or "unreachable")."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket_in(netns, family)
    sock.settimeout(timeout)
    received = bytearray()
    try:
        sock.connect((host, port))
        sock.sendall(message)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        while data := sock.recv(65536):
            received += data
        return bytes(received), "eof"
    except ConnectionResetError:
        return bytes(received), "reset"
    except ConnectionRefusedError:
        return bytes(received), "refused"
    except TimeoutError:
        return bytes(received), "timeout"
    except OSError as exc:
        return bytes(received), f"error {exc.strerror}"
    finally:
        sock.close()

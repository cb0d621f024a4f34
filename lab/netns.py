"""Network-namespace helpers shared by the topology, the pods and the tests.

Names
-----
Every namespace the lab makes is named ``<prefix>`` or ``<prefix>-<something>``.
:data:`RUN_PREFIX` is drawn once per process; :func:`next_prefix` hands out
``RUN_PREFIX-1``, ``RUN_PREFIX-2``, ... so that a test session can prove at its
end, with one ``leftovers(RUN_PREFIX)``, that none of its namespaces survived
(tests/conftest.py does). :class:`~lab.topology.Topology` draws its own random
prefix when the caller names none (the demo, the benchmarks).

Sockets in a namespace
----------------------
A network namespace belongs to a thread on Linux, and a socket keeps the
namespace it was created in. :func:`socket_in` lets a short-lived thread enter
the namespace, create the socket and exit; the caller then uses the socket from
any thread (or from trio), and its traffic takes the namespace's kernel path
(its nftables rules and routes). The calling thread never moves.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from pyroute2 import netns

__all__ = [
    "RUN_PREFIX",
    "leftovers",
    "next_prefix",
    "probe",
    "scratch_netns",
    "socket_in",
]

#: The prefix of this process's namespaces (see the module docstring).
RUN_PREFIX: Final = f"tpt-{secrets.token_hex(3)}"
_numbers = itertools.count(1)

NETNS_DIR: Final = "/run/netns"
_CLONE_NEWNET: Final = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def next_prefix() -> str:
    """A prefix unique in this process and under :data:`RUN_PREFIX`."""
    return f"{RUN_PREFIX}-{next(_numbers)}"


def leftovers(prefix: str) -> list[str]:
    """Namespaces still present that belong to ``prefix``: named ``prefix`` or ``prefix-*``."""
    return sorted(n for n in netns.listnetns() if n == prefix or n.startswith(prefix + "-"))


@contextmanager
def scratch_netns() -> Iterator[str]:
    """An empty namespace (only ``lo``, down) named under :data:`RUN_PREFIX`; removed on exit.

    For tests of one kernel object at a time (nft tables, policy routes);
    :class:`~lab.topology.Topology` builds connected hosts.
    """
    name = next_prefix()
    netns.create(name)
    try:
        yield name
    finally:
        try:
            netns.remove(name)
        except FileNotFoundError:
            pass


def socket_in(
    name: str, family: int, kind: int = socket.SOCK_STREAM, proto: int = 0
) -> socket.socket:
    """A socket created inside network namespace ``name`` (by a helper thread)."""
    made: list[socket.socket | BaseException] = []

    def enter_and_create() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            made.append(socket.socket(family, kind, proto))
        except BaseException as exc:  # handed to the caller
            made.append(exc)

    thread = threading.Thread(target=enter_and_create)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def probe(
    name: str,
    host: str,
    port: int,
    message: bytes,
    *,
    timeout: float = 5.0,
    half_close: bool = True,
) -> tuple[bytes, str]:
    """A plaintext client in namespace ``name``: connect, send, (half-close), read to the end.

    Returns (bytes received, how it ended: "eof", "reset", "timeout", "refused",
    or "error <strerror>")."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket_in(name, family)
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

"""The compiled data path's hand-overs between the trio thread and the relay thread.

The relay tests (test_relay.py) and the fuzz property run on every data path;
this file tests what only the relay thread does: when a connection goes to it.
"""

from __future__ import annotations

import os

import pytest
import trio

from lab.chain import Contexts, CountingLib, chain, contexts, read_to_eof
from lab.pki import make_pki
from lab.require import skip_or_fail
from trio_tproxy import fastpath


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Contexts, Contexts]:
    files = make_pki(tmp_path_factory.mktemp("pki"))
    return contexts(files["a"]), contexts(files["b"])


@pytest.mark.parametrize("exchanges", [1, 3, 40])
def test_a_connection_goes_to_the_relay_thread_once_it_has_waited_enough(
    pki, monkeypatch, exchanges
):
    """Short exchanges stay per wake-up (no hand-over between threads); a connection
    that keeps talking goes to the thread, once, and everything arrives."""
    if not fastpath.ENABLED or fastpath.MODE != "thread":
        skip_or_fail(f"the relay thread is off: {fastpath.describe()}")
    monkeypatch.setattr(fastpath, "THREAD", True)
    assert fastpath.relay_thread() is not None
    monkeypatch.setattr(fastpath, "PROMOTE_AFTER", 8)
    lib = CountingLib(fastpath._lib)
    monkeypatch.setattr(fastpath, "_lib", lib)
    a, b = pki

    async def main():
        async with chain(a, b) as ch:
            for i in range(exchanges):
                message = b"%d:" % i + os.urandom(100)
                await ch.client.send_all(message)
                received = b""
                while len(received) < len(message):
                    received += await ch.server.receive_some(65536)
                assert received == message
                await ch.server.send_all(message[::-1])
                received = b""
                while len(received) < len(message):
                    received += await ch.client.receive_some(65536)
                assert received == message[::-1]
            await ch.client.send_eof()
            assert await read_to_eof(ch.server) == b""
            await ch.server.send_eof()
            assert await read_to_eof(ch.client) == b""

    trio.run(main)
    # Two relays (the chain's two sidecars); each direction waits once per exchange.
    assert lib.started == (2 if exchanges > fastpath.PROMOTE_AFTER else 0)

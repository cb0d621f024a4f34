"""The private pyOpenSSL bindings are optional: everything works without them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from lab.pki import make_pki

#: Runs in a fresh interpreter where SSL._lib and SSL._ffi are gone while
#: trio_tproxy is imported.  (pyOpenSSL needs them itself, as module globals,
#: so they come back afterwards; our modules have looked and found nothing.)
_SCRIPT = textwrap.dedent(
    """
    import sys
    from OpenSSL import SSL
    saved = SSL._lib, SSL._ffi
    del SSL._lib, SSL._ffi
    import trio
    from trio_tproxy import ossl, proxy, tlspolicy, tlsstream  # importing must not fail
    SSL._lib, SSL._ffi = saved
    from trio_tproxy.config import ConfigError, IdentityPolicy, TLSFiles
    from trio_tproxy.credentials import load_credentials

    assert not ossl.PRIVATE and tlsstream.drain is ossl.drain_public
    assert ossl.verify_error_text(10) == "X509 error 10"
    d = sys.argv[1]
    creds = load_credentials(TLSFiles(f"{d}/a.crt", f"{d}/a.key", f"{d}/ca.crt"))
    try:
        tlspolicy.client_context(creds, groups="X25519")
    except ConfigError as exc:
        assert "no binding" in str(exc)
    else:
        raise AssertionError("--tls-groups silently ignored")
    server_ctx, client_ctx = tlspolicy.server_context(creds), tlspolicy.client_context(creds)

    async def main():
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client_sock = trio.socket.socket()
        await client_sock.connect(listener.getsockname())
        server_sock, _ = await listener.accept()
        listener.close()
        policy = IdentityPolicy()
        async with trio.open_nursery() as nursery:
            legs = {}

            async def accept():
                legs["server"] = await tlspolicy.accept(
                    server_ctx, server_sock, policy, handshake_timeout=5
                )

            nursery.start_soon(accept)
            legs["client"] = await tlspolicy.connect(
                client_ctx, client_sock, policy, ("127.0.0.1", 1), handshake_timeout=5
            )
        client, server = legs["client"], legs["server"]
        assert client.resumed is None and client.version == "TLSv1.3"
        payload = bytes(range(256)) * 4096
        async with trio.open_nursery() as nursery:
            async def send():
                await client.stream.send_all(payload)
                await client.stream.send_eof()
            nursery.start_soon(send)
            got = bytearray()
            while data := await server.stream.receive_some():
                got += data
        assert got == payload
        await client.stream.aclose()
        await server.stream.aclose()

    trio.run(main)
    print("ok")
    """
)


def test_everything_works_without_the_private_bindings(tmp_path: Path) -> None:
    make_pki(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_drain_stop_holds_no_frames() -> None:
    """The exception a drain returns (once per message) carries no traceback: with one it
    would hold the drain's and the caller's frames (and the bytes received) in a reference
    cycle until the cyclic GC runs; measured as megabytes kept after the load ended."""
    from OpenSSL import SSL

    from trio_tproxy import ossl

    drains = [ossl.drain_public] + ([ossl.drain_fast] if ossl.PRIVATE else [])
    for drain in drains:
        conn = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)  # memory BIOs
        conn.set_connect_state()
        data, stop = drain(conn, 1024)  # the handshake wants the server's answer
        assert data == b"" and isinstance(stop, SSL.WantReadError), (drain, stop)
        assert stop.__traceback__ is None, drain

"""TLS sessions to resume on egress, one per original destination, most recent first.

Resumption skips the certificate signature and chain verification of a full
handshake (the larger part of its CPU).  The session still carries the peer's
certificate, whose identity is checked again on every connection; the server
bounds a session's life (OpenSSL: 300 s).  A session is kept only after a
connection went well (its ticket came with the data).
"""

from __future__ import annotations

from collections import OrderedDict

from OpenSSL import SSL

Address = tuple[str, int]


class SessionCache:
    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._sessions: OrderedDict[Address, SSL.Session] = OrderedDict()

    def offer(self, conn: SSL.Connection, dst: Address) -> None:
        """Before the handshake: propose the last session with ``dst``, if any."""
        session = self._sessions.get(dst)
        if session is not None:
            conn.set_session(session)

    def keep(self, conn: SSL.Connection, dst: Address) -> None:
        """After a connection to ``dst`` went well: remember its newest session."""
        if self.size <= 0:
            return
        session = conn.get_session()
        if session is None:
            return
        self._sessions[dst] = session
        self._sessions.move_to_end(dst)
        while len(self._sessions) > self.size:
            self._sessions.popitem(last=False)

    def clear(self) -> None:
        """Forget every session: our credentials (or trust) changed, so a session
        set up under the old ones must not be resumed under the new."""
        self._sessions.clear()

    def __len__(self) -> int:
        return len(self._sessions)

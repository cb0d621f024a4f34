"""TLS sessions to resume on egress, one per original destination, most recent first.

Resumption skips the certificate signature and chain verification of a full
handshake (the larger part of its CPU).  It must not stretch trust, so:

* a session is kept only after a connection went well (its ticket came with
  the data), with the peer certificate's ``notAfter`` and the time of the
  full handshake it descends from (a resumption's new ticket does not renew
  it);
* it is offered only while that certificate is still valid and for at most
  :data:`SESSION_LIFETIME` seconds after that full handshake: past either, the next connection makes a
  full handshake, in which OpenSSL checks the certificate again (and refuses
  an expired one);
* the peer's identity is checked again on every connection, resumed or not,
  and so is its certificate's ``notAfter`` (:mod:`.tlspolicy`), which also
  covers the server side: our server issues tickets valid for
  :data:`SESSION_LIFETIME` seconds (``SSL_CTX_set_timeout``; OpenSSL's default
  is 7200 s) and refuses a resumed session whose client certificate has
  expired since;
* :meth:`SessionCache.clear` forgets everything, for when our credentials
  change (a session made with the old ones must not outlive them).
"""

from __future__ import annotations

import datetime as dt
import time
from collections import OrderedDict

from OpenSSL import SSL

Address = tuple[str, int]

#: Seconds a session may be resumed, on both sides (OpenSSL's server default is 7200).
SESSION_LIFETIME = 300


class SessionCache:
    def __init__(self, size: int = 4096, lifetime: float = SESSION_LIFETIME) -> None:
        self.size = size
        self.lifetime = lifetime
        #: dst -> (session, the peer certificate's notAfter, monotonic time kept)
        self._sessions: OrderedDict[Address, tuple[SSL.Session, dt.datetime, float]] = OrderedDict()

    def offer(self, conn: SSL.Connection, dst: Address) -> None:
        """Before the handshake: propose the last session with ``dst``, if still good."""
        entry = self._sessions.get(dst)
        if entry is None:
            return
        session, not_after, kept = entry
        if time.monotonic() - kept >= self.lifetime or dt.datetime.now(dt.UTC) >= not_after:
            del self._sessions[dst]  # a full handshake re-checks the certificate
            return
        conn.set_session(session)

    def keep(
        self, conn: SSL.Connection, dst: Address, not_after: dt.datetime, *, resumed: bool
    ) -> None:
        """After a connection to ``dst`` went well: remember its newest session.

        ``not_after``: the peer certificate's; the session is not offered past it.
        A session that came from resuming keeps the age of the full handshake it
        descends from: a chain of resumptions ends within ``lifetime``."""
        if self.size <= 0:
            return
        session = conn.get_session()
        if session is None:
            return
        kept = time.monotonic()
        previous = self._sessions.get(dst)
        if resumed and previous is not None:
            kept = previous[2]
        self._sessions[dst] = (session, not_after, kept)
        self._sessions.move_to_end(dst)
        while len(self._sessions) > self.size:
            self._sessions.popitem(last=False)

    def clear(self) -> None:
        """Forget every session: our credentials (or trust) changed, so a session
        set up under the old ones must not be resumed under the new."""
        self._sessions.clear()

    def __len__(self) -> int:
        return len(self._sessions)

"""Throwaway certificates for the tests, the pods, the fuzz campaigns and the benchmarks.

One builder: a :class:`PKI` is a CA whose certificate is written into a
directory, and :meth:`PKI.issue` writes a leaf's certificate and key next to it
and returns them as the :class:`~trio_tproxy.config.TLSFiles` that
``trio-tproxy run`` and ``tlspolicy.load_credentials`` take, so every test goes
through the real file loaders. A leaf may be told to trust another PKI's CA
(``trust=``), which is how the tests build "signed by a CA the peer does not
know". Keys are written mode 0600 by :mod:`trio_tproxy.certs`; the directory
belongs to the caller (a pytest ``tmp_path`` or a ``TemporaryDirectory``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trio_tproxy import certs
from trio_tproxy.config import TLSFiles

__all__ = ["TRUST_DOMAIN", "PKI", "make_pki", "spiffe_id"]

TRUST_DOMAIN = "cluster.local"


def spiffe_id(name: str, namespace: str = "default", domain: str = TRUST_DOMAIN) -> str:
    """The SPIFFE ID of service account ``name`` in Kubernetes namespace ``namespace``."""
    return f"spiffe://{domain}/ns/{namespace}/sa/{name}"


class PKI:
    """A CA in ``directory``: its certificate at ``directory/<name>.crt``, leaves beside it.

    ``cert`` and ``key`` are the CA's own, for tests that issue by hand
    (``certs.issue(pki.cert, pki.key, ...)``); ``ca_path`` is the file a peer
    trusts.
    """

    def __init__(self, directory: Path, name: str = "ca", *, common_name: str | None = None):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = certs.make_ca(common_name) if common_name else certs.make_ca()
        self.ca_path = directory / f"{name}.crt"
        certs.write_cert(self.ca_path, self.cert)

    def issue(self, name: str, *, trust: PKI | None = None, **issue: Any) -> TLSFiles:
        """Write ``<name>.crt``/``<name>.key``, a leaf signed by this CA.

        ``issue`` goes to :func:`trio_tproxy.certs.issue` (``spiffe_ids``,
        ``ips``, ``dns``, ``not_before``, ``not_after`` ...); the files trust
        ``trust``'s CA, by default this one.
        """
        cert, key = certs.issue(self.cert, self.key, **issue)
        cert_path, key_path = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        certs.write_cert(cert_path, cert)
        certs.write_key(key_path, key)
        return TLSFiles(cert_path, key_path, (trust or self).ca_path)


def make_pki(directory: Path, names: tuple[str, ...] = ("a", "b")) -> dict[str, TLSFiles]:
    """A CA and one leaf per name for loopback tests: SPIFFE ID ``.../ns/default/sa/<name>``,
    IP SANs 127.0.0.1 and ::1."""
    ca = PKI(directory)
    return {
        name: ca.issue(name, spiffe_ids=[spiffe_id(name)], ips=["127.0.0.1", "::1"])
        for name in names
    }

"""Who a peer certificate names, and whether that is who we wanted.

OpenSSL checks the chain (signature, CA, dates); pyOpenSSL offers no hostname
or IP check, so the name check lives here, in pure functions over
``cryptography`` certificates. No I/O: tests build certificates and call these
directly, and the TLS layer calls them once a handshake is done.

Two policies (see :class:`~trio_tproxy.config.IdentityPolicy`):

* ``spiffe``: the certificate is an X509-SVID: exactly one URI SAN, a valid
  ``spiffe://<trust-domain>/<path>`` in our trust domain, optionally in an
  allow-list of exact IDs or of prefixes ending in ``/``.
* ``ip``: the server's certificate carries an IP SAN equal to the address the
  client originally dialled (what TPROXY recovered).

Every refusal is an :class:`IdentityError` whose ``str()`` is a short reason for
a log line. Strings taken from a certificate are shown with ``repr()`` so a
hostile certificate cannot inject newlines or escapes into our logs.
"""

from __future__ import annotations

import ipaddress
import re

from cryptography import x509
from cryptography.x509.oid import NameOID

from .config import ConfigError, IdentityPolicy, parse_spiffe_id

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SPIFFE_PREFIX = "spiffe://"
#: SPIFFE ID path segments: letters, digits, '.', '-', '_' (and not '.' or '..').
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


class IdentityError(Exception):
    """The peer's certificate does not name an acceptable identity.

    ``str(exc)`` is the reason, e.g. ``"no SPIFFE ID"``.
    """


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:  # duplicate or undecodable extensions
        raise IdentityError(f"malformed certificate extensions: {exc}") from None


def _uris(cert: x509.Certificate) -> list[str]:
    san = _san(cert)
    return san.get_values_for_type(x509.UniformResourceIdentifier) if san else []


def _ips(cert: x509.Certificate) -> list[IPAddress]:
    san = _san(cert)
    return _san_ips(san) if san else []


def _san_ips(san: x509.SubjectAlternativeName) -> list[IPAddress]:
    # cryptography types IPAddress values as address-or-network (networks are for
    # name constraints); a SAN names hosts, so only addresses count.
    values = san.get_values_for_type(x509.IPAddress)
    return [
        _normalize(v)
        for v in values
        if isinstance(v, ipaddress.IPv4Address | ipaddress.IPv6Address)
    ]


def _normalize(ip: IPAddress) -> IPAddress:
    # ::ffff:10.0.0.2 (a v4 peer seen on a dual-stack socket) is 10.0.0.2.
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:  # fe80::1%eth0: the zone is ours, not the certificate's
            return ipaddress.IPv6Address(str(ip).partition("%")[0])
    return ip


def spiffe_ids(cert: x509.Certificate) -> list[str]:
    """The URI SANs that look like SPIFFE IDs, unvalidated."""
    return [uri for uri in _uris(cert) if uri.startswith(SPIFFE_PREFIX)]


def describe(cert: x509.Certificate) -> str:
    """A short, log-safe name for ``cert``: its SPIFFE ID(s), else IP/DNS SANs, else CN."""
    try:
        ids = spiffe_ids(cert)
        san = _san(cert)
    except IdentityError:
        ids, san = [], None
    if ids:
        return ", ".join(_safe(i) for i in ids)
    if san is not None:
        ips = _san_ips(san)
        if ips:
            return "IP " + ", ".join(str(ip) for ip in ips)
        names = san.get_values_for_type(x509.DNSName)
        if names:
            return "DNS " + ", ".join(_safe(n) for n in names)
    try:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        cns = []
    if cns:
        value = cns[0].value
        return "CN=" + _safe(value if isinstance(value, str) else value.decode("latin-1"))
    return f"serial {cert.serial_number:x}"


def describe_presented(cert: x509.Certificate) -> str:
    """``describe(cert)`` plus its issuer and validity, for a refusal line: enough to
    tell a rogue CA or a stale certificate from the workload that should be there."""
    issuer = _cn(cert.issuer) or "(no CN)"
    when = "%Y-%m-%d %H:%M:%S"
    try:
        valid = f"{cert.not_valid_before_utc:{when}}..{cert.not_valid_after_utc:{when}} UTC"
    except ValueError:
        valid = "unreadable dates"
    return f"{describe(cert)}, issuer CN={issuer}, valid {valid}"


def _cn(name: x509.Name) -> str | None:
    try:
        cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    if not cns:
        return None
    value = cns[0].value
    return _safe(value if isinstance(value, str) else value.decode("latin-1"))


def _safe(text: str) -> str:
    # Keep ordinary names readable; quote anything a log reader could be fooled by.
    return text if text.isprintable() and " " not in text else repr(text)


def check_spiffe(cert: x509.Certificate, policy: IdentityPolicy) -> str:
    """Return the certificate's SPIFFE ID if ``policy`` accepts it, else raise IdentityError."""
    uris = _uris(cert)
    if not uris:
        raise IdentityError("no SPIFFE ID")
    if len(uris) > 1:
        # An X509-SVID has exactly one URI SAN; two would make "who is it?" ambiguous.
        raise IdentityError(f"several URI SANs: {', '.join(repr(u) for u in uris)}")
    spiffe_id = uris[0]
    try:
        domain, path = parse_spiffe_id(spiffe_id)
    except ConfigError:
        raise IdentityError(f"invalid SPIFFE ID {spiffe_id!r}") from None
    if domain != policy.trust_domain:
        raise IdentityError(f"wrong trust domain {domain!r} (want {policy.trust_domain!r})")
    if not _valid_path(path):
        raise IdentityError(f"invalid SPIFFE ID {spiffe_id!r}: bad path")
    if policy.allow_ids and not any(_allowed(spiffe_id, entry) for entry in policy.allow_ids):
        raise IdentityError(f"SPIFFE ID not in allow-list: {spiffe_id!r}")
    return spiffe_id


def _valid_path(path: str) -> bool:
    # A workload ID has a non-empty path of plain segments: no '//', no trailing
    # '/', no '.'/'..' (which could make a prefix allow-list match unexpectedly),
    # no percent-encoding, query or fragment.
    if not path.startswith("/"):
        return False
    segments = path[1:].split("/")
    return all(_SEGMENT.fullmatch(s) and s not in (".", "..") for s in segments)


def _allowed(spiffe_id: str, entry: str) -> bool:
    return spiffe_id == entry or (entry.endswith("/") and spiffe_id.startswith(entry))


def check_ip(cert: x509.Certificate, ip: str) -> str:
    """Check that ``cert`` has an IP SAN equal to ``ip``; return :func:`describe`."""
    try:
        want = _normalize(ipaddress.ip_address(ip))
    except ValueError:
        raise IdentityError(f"invalid destination IP {ip!r}") from None
    have = _ips(cert)
    if want not in have:
        listed = ", ".join(str(a) for a in have)
        raise IdentityError(f"IP SAN mismatch: want {want}, certificate has [{listed}]")
    return describe(cert)

"""Our credentials: certificate chain, key and trusted CAs, read from files and checked once.

Credentials come from files only (no built-in key, ever) and are checked at
startup, so a bad file stops the sidecar with one :class:`ConfigError` line
naming it instead of failing every handshake later: the key must match the
certificate, the certificate must be valid now and usable as both TLS server
and client (each sidecar is both), and the CA bundle must hold a certificate
that has not expired.  The same checks gate a reload (:mod:`.reload`).

Two layouts: three files (``tls.crt``, ``tls.key``, ``ca.crt`` as a Secret or
cert-manager's csi-driver-spiffe write them), or a Kubernetes podCertificate
credential bundle (PKCS#8 key then chain in one file, read in one go) with the
CA bundle from a ``clusterTrustBundle`` projection.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from . import identity
from .config import ConfigError, TLSFiles
from .pem import SigningKey, key_matches, read_bundle, read_certs, read_key, signing_key

_CREATE_HINT = (
    " (create one with `trio-tproxy certs ca --out DIR` then `trio-tproxy certs issue"
    " --ca-dir DIR --out DIR --name NAME --spiffe-id spiffe://TRUST-DOMAIN/ns/NS/sa/SA`)"
)
_CREATE_CA_HINT = " (create one with `trio-tproxy certs ca --out DIR`, or use your cluster's CA)"


@dataclass(frozen=True)
class Credentials:
    """Our certificate chain, key and trusted CAs, parsed and checked once."""

    files: TLSFiles
    #: Our leaf certificate (the first one in ``files.cert``).
    cert: x509.Certificate
    #: Its SPIFFE ID, when it carries exactly one.
    spiffe_id: str | None
    not_after: dt.datetime
    #: Intermediates that followed the leaf in ``files.cert``.
    chain: tuple[x509.Certificate, ...]
    key: SigningKey = field(repr=False)
    ca_certs: tuple[x509.Certificate, ...] = field(repr=False)

    def describe(self) -> str:
        """For log lines: which certificate this is, and until when."""
        return (
            f"serial {self.cert.serial_number:x}, {self.spiffe_id or '(no SPIFFE ID)'}, "
            f"valid until {_fmt(self.not_after)}"
        )


def load_credentials(files: TLSFiles, *, now: dt.datetime | None = None) -> Credentials:
    """Read and check our certificate, key and CA bundle; ConfigError names the bad file."""
    now = now or dt.datetime.now(dt.UTC)
    if now.tzinfo is None:  # naive means UTC, as in cryptography
        now = now.replace(tzinfo=dt.UTC)
    if files.is_bundle:
        raw_key, certs = read_bundle(files.cert, hint=_CREATE_HINT)
        key = signing_key(raw_key, files.key, what="credential bundle")
    else:
        certs = read_certs(files.cert, what="certificate file", hint=_CREATE_HINT)
        key = signing_key(read_key(files.key, what="key file", hint=_CREATE_HINT), files.key)
    cas = read_certs(files.ca_cert, what="CA file", hint=_CREATE_CA_HINT)
    leaf = certs[0]
    if not key_matches(leaf, key):
        if files.is_bundle:
            raise ConfigError(
                f"credential bundle {files.cert}: the key does not match the first certificate"
            )
        raise ConfigError(f"key file {files.key} does not match certificate {files.cert}")
    _check_dates(leaf, now, f"certificate file {files.cert}")
    _check_eku(leaf, files)
    if all(ca.not_valid_after_utc < now for ca in cas):
        raise ConfigError(
            f"CA file {files.ca_cert}: every certificate has expired "
            f"(latest on {_fmt(max(ca.not_valid_after_utc for ca in cas))})"
        )
    ids = identity.spiffe_ids(leaf)
    return Credentials(
        files=files,
        cert=leaf,
        spiffe_id=ids[0] if len(ids) == 1 else None,
        not_after=leaf.not_valid_after_utc,
        chain=tuple(certs[1:]),
        key=key,
        ca_certs=tuple(cas),
    )


def _check_dates(cert: x509.Certificate, now: dt.datetime, what: str) -> None:
    if now > cert.not_valid_after_utc:
        raise ConfigError(f"{what}: certificate expired on {_fmt(cert.not_valid_after_utc)}")
    if now < cert.not_valid_before_utc:
        raise ConfigError(
            f"{what}: certificate not yet valid (from {_fmt(cert.not_valid_before_utc)})"
        )


def _check_eku(cert: x509.Certificate, files: TLSFiles) -> None:
    # Each sidecar is a TLS server (ingress) and a client (egress): a certificate
    # restricted to one role would fail half the traffic, at the peers, later.
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return  # no EKU means any purpose
    except ValueError as exc:
        raise ConfigError(f"certificate file {files.cert}: malformed extensions: {exc}") from None
    for oid, role in (
        (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
        (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
    ):
        if oid not in usages:
            raise ConfigError(
                f"certificate file {files.cert}: extended key usage lacks {role}"
                " (a sidecar is both TLS server and client)"
            )


def _fmt(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")

"""Reading the sidecar's PEM files: certificates, keys, and whether they match.

The runtime's only file parser (the dev CA in :mod:`trio_tproxy.certs` uses it
too).  Every problem is one :class:`~trio_tproxy.config.ConfigError` line that
names the file, what it should hold and what is wrong; ``hint`` (how to create
the file) is added only when the file does not exist, never when it exists
but cannot be read (e.g. permission denied: creating a new CA would not help).
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from .config import ConfigError

#: Keys that can sign both certificates and TLS handshakes (what OpenSSL's
#: use_privatekey takes).
SigningKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | dsa.DSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)

#: Certificate and key files are small; refuse to slurp e.g. /dev/zero.
MAX_PEM_BYTES = 1 << 20


def _read_file(path: Path, what: str, hint: str = "") -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {path}: cannot read: {exc.strerror or exc}{hint}") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_PEM_BYTES:
        raise ConfigError(f"{what} {path}: larger than {MAX_PEM_BYTES} bytes, not a PEM file")
    return data


def read_certs(
    path: Path | str, *, what: str = "certificate file", hint: str = ""
) -> list[x509.Certificate]:
    """Every certificate in a PEM file, in order; ConfigError if there is none.

    ``hint`` is appended when the file does not exist (e.g. how to create it).
    """
    path = Path(path)
    return parse_certs(_read_file(path, what, hint), path, what)


def parse_certs(data: bytes, path: Path, what: str) -> list[x509.Certificate]:
    """Every certificate in PEM ``data`` read from ``path`` (other blocks are skipped)."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(
            f"{what} {path}: no certificate (not PEM: no '-----BEGIN CERTIFICATE-----')"
        )
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{what} {path}: malformed certificate: {_one_line(exc)}") from None
    return certs


def read_key(path: Path | str, *, what: str = "key file", hint: str = "") -> PrivateKeyTypes:
    """The (unencrypted) private key in a PEM file."""
    path = Path(path)
    return parse_key(_read_file(path, what, hint), path, what)


def parse_key(data: bytes, path: Path, what: str) -> PrivateKeyTypes:
    """The first private key in PEM ``data`` read from ``path``."""
    if b"-----BEGIN" not in data or b"PRIVATE KEY-----" not in data:
        raise ConfigError(
            f"{what} {path}: no private key (not PEM: no '-----BEGIN ... PRIVATE KEY-----')"
        )
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{what} {path}: encrypted private keys are not supported") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{what} {path}: malformed private key: {_one_line(exc)}") from None


def read_bundle(
    path: Path | str, *, what: str = "credential bundle", hint: str = ""
) -> tuple[PrivateKeyTypes, list[x509.Certificate]]:
    """A credential bundle (a private key, then the certificate chain) in ONE read.

    Two reads of two files can straddle a rotation and pair the old key with
    the new certificate; one read of one file cannot."""
    path = Path(path)
    data = _read_file(path, what, hint)
    return parse_key(data, path, what), parse_certs(data, path, what)


def signing_key(key: PrivateKeyTypes, path: Path | str, *, what: str = "key file") -> SigningKey:
    """``key`` if it can sign certificates and TLS handshakes (not DH, X25519, ML-KEM...)."""
    if not isinstance(key, SigningKey):
        raise ConfigError(f"{what} {path}: unsupported key type {type(key).__name__}")
    return key


def key_matches(cert: x509.Certificate, key: PrivateKeyTypes) -> bool:
    """True when ``key`` is the private half of ``cert``'s public key."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__

"""A development CA and workload certificates, made with ``cryptography``.

Why this exists: the proxy must never fall back to a built-in key (an
"insecure default" seen in other sidecars), so every deployment brings its own
files. For clusters without cert-manager or SPIRE, ``trio-tproxy certs ca`` and
``trio-tproxy certs issue`` make those files: ECDSA P-256 keys, SHA-256
signatures, leaves that carry SPIFFE URI / IP / DNS SANs and both serverAuth and
clientAuth (each sidecar is a TLS server on ingress and a client on egress).

Keys are written with mode 0600 from the moment the file exists (a temporary
file created with that mode, then renamed), and no key ever ships in the package.

The sidecar itself never imports this module: it reads its files with
:mod:`trio_tproxy.pem`, which this module shares (``load_ca``) so every bad
file gives the same kind of one-line :class:`ConfigError`.  ``register`` adds
the ``certs`` subcommand to the CLI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .config import ConfigError, parse_spiffe_id
from .pem import SigningKey, key_matches, read_certs, read_key, signing_key

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Backdate certificates a little so a peer whose clock lags does not see them
#: as "not yet valid".
CLOCK_SKEW = dt.timedelta(minutes=5)

CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"


# --- making certificates -------------------------------------------------------


def make_ca(
    common_name: str = "trio-tproxy development CA", days: int = 365
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA that may sign leaves only (path length 0)."""
    _check_days(days)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _utcnow()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _check_cn(common_name))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(
    ca_cert: x509.Certificate,
    ca_key: SigningKey,
    *,
    spiffe_ids: Iterable[str] = (),
    ips: Iterable[str | IPAddress] = (),
    dns: Iterable[str] = (),
    common_name: str | None = None,
    days: int = 90,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf for both TLS roles, signed by ``ca_cert``/``ca_key``.

    ``not_before``/``not_after`` override the validity window as given (tests use
    them for expired and not-yet-valid certificates); otherwise the leaf is valid
    from a few minutes ago for ``days``, but never past the CA's own expiry.
    """
    uris = [_check_leaf_spiffe_id(text) for text in spiffe_ids]
    addrs = [_parse_ip(value) for value in ips]
    names = [_check_dns(name) for name in dns]
    if not (uris or addrs or names):
        raise ConfigError("a certificate needs at least one SPIFFE ID, IP or DNS name")
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.IPAddress(a) for a in addrs]
    sans += [x509.DNSName(n) for n in names]

    now = _utcnow()
    not_before, not_after = _as_utc(not_before), _as_utc(not_after)
    if not_after is None:
        _check_days(days)
        not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_before is None:
        # An explicit past not_after (an expired test certificate) still needs
        # a window that starts before it ends.
        not_before = min(now - CLOCK_SKEW, not_after - dt.timedelta(days=1))
    if common_name is None:
        # A CN is only for humans reading logs; the SANs are what peers check.
        candidates = [*names, *map(str, addrs), *uris]
        common_name = next((c for c in candidates if len(c) <= 64), "trio-tproxy workload")

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _check_cn(common_name))]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, _hash_for(ca_key))
    )
    return cert, key


def _hash_for(key: SigningKey) -> hashes.SHA256 | None:
    # EdDSA signs the message itself and takes no separate hash.
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _as_utc(when: dt.datetime | None) -> dt.datetime | None:
    # Naive datetimes mean UTC, as in cryptography; making them aware lets us compare.
    if when is not None and when.tzinfo is None:
        return when.replace(tzinfo=dt.UTC)
    return when


def _check_days(days: int) -> None:
    if days <= 0:
        raise ConfigError(f"invalid validity {days!r} days: must be > 0")


def _check_cn(name: str) -> str:
    # X.509 caps commonName at 64 characters; cryptography would raise a bare ValueError.
    if not 1 <= len(name) <= 64:
        raise ConfigError(f"invalid common name {name!r}: must be 1..64 characters")
    return name


def _check_leaf_spiffe_id(text: str) -> str:
    _, path = parse_spiffe_id(text)
    if not path or path.endswith("/"):
        raise ConfigError(
            f"invalid SPIFFE ID {text!r}: a workload ID needs a path and no trailing '/'"
        )
    return text


def _parse_ip(value: str | IPAddress) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        raise ConfigError(f"invalid IP address {value!r}") from None


def _check_dns(name: str) -> str:
    # SAN dNSName is IA5 (ASCII); internationalised names must be given as A-labels.
    if not name or not name.isascii() or any(c.isspace() for c in name):
        raise ConfigError(f"invalid DNS name {name!r}: must be non-empty ASCII (A-labels)")
    return name


# --- files -------------------------------------------------------------------


def write_key(path: Path | str, key: PrivateKeyTypes) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, mode 0600 from creation on."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(Path(path), data, 0o600)


def write_cert(path: Path | str, *certs: x509.Certificate) -> None:
    """Write ``certs`` (leaf first, then any intermediates) as PEM, mode 0644."""
    if not certs:
        raise ValueError("write_cert needs at least one certificate")
    data = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    _write_atomic(Path(path), data, 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # A fresh temporary file created with `mode` (O_EXCL: never someone else's
    # file), then renamed over the target: readers see the old file or the
    # complete new one, and a key is never readable by others, even briefly.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # the umask may have removed bits we want
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None


# --- command line ------------------------------------------------------------

_CREATE_CA_HINT = " (create one with `trio-tproxy certs ca --out DIR`)"


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``certs ca`` and ``certs issue`` to the program's subcommands."""
    certs = subparsers.add_parser(
        "certs",
        help="make a development CA and workload certificates",
        description="Make a development CA and workload certificates (ECDSA P-256, SHA-256).",
    )
    actions = certs.add_subparsers(dest="certs_action", required=True, metavar="ACTION")

    ca = actions.add_parser("ca", help="create DIR/ca.crt and DIR/ca.key")
    ca.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    ca.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    ca.add_argument("--cn", default="trio-tproxy development CA", metavar="NAME", help="CA name")
    ca.set_defaults(func=_cmd_ca)

    leaf = actions.add_parser("issue", help="create DIR/NAME.crt and DIR/NAME.key")
    leaf.add_argument(
        "--ca-dir", required=True, type=Path, metavar="DIR", help="holds ca.crt and ca.key"
    )
    leaf.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    leaf.add_argument("--name", required=True, help="file name stem, also the certificate's CN")
    leaf.add_argument(
        "--spiffe-id",
        action="append",
        default=[],
        metavar="ID",
        dest="spiffe_ids",
        help="spiffe://TRUST-DOMAIN/PATH URI SAN (repeatable)",
    )
    leaf.add_argument("--ip", action="append", default=[], dest="ips", help="IP SAN (repeatable)")
    leaf.add_argument(
        "--dns", action="append", default=[], metavar="NAME", help="DNS SAN (repeatable)"
    )
    leaf.add_argument("--days", type=int, default=90, help="validity in days (default 90)")
    leaf.set_defaults(func=_cmd_issue)


def _cmd_ca(args: argparse.Namespace) -> int:
    out: Path = args.out
    key_path = out / CA_KEY_NAME
    if key_path.exists():
        # Replacing a CA key silently would orphan every certificate it issued.
        raise ConfigError(
            f"{key_path} already exists: refusing to replace a CA key (remove it first)"
        )
    cert, key = make_ca(args.cn, args.days)
    _mkdir(out)
    write_key(key_path, key)
    print(f"wrote {key_path}")
    write_cert(out / CA_CERT_NAME, cert)
    print(f"wrote {out / CA_CERT_NAME}")
    return 0


def _cmd_issue(args: argparse.Namespace) -> int:
    name: str = args.name
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"invalid --name {name!r}: a plain file name stem")
    ca_cert, ca_key = load_ca(args.ca_dir)
    cert, key = issue(
        ca_cert,
        ca_key,
        spiffe_ids=args.spiffe_ids,
        ips=args.ips,
        dns=args.dns,
        common_name=name if len(name) <= 64 else None,
        days=args.days,
    )
    out: Path = args.out
    _mkdir(out)
    write_key(out / f"{name}.key", key)
    print(f"wrote {out / f'{name}.key'}")
    write_cert(out / f"{name}.crt", cert)
    print(f"wrote {out / f'{name}.crt'}")
    return 0


def load_ca(ca_dir: Path | str) -> tuple[x509.Certificate, SigningKey]:
    """Read DIR/ca.crt and DIR/ca.key as written by ``certs ca``, and check them."""
    ca_dir = Path(ca_dir)
    cert_path, key_path = ca_dir / CA_CERT_NAME, ca_dir / CA_KEY_NAME
    cert = read_certs(cert_path, what="CA certificate", hint=_CREATE_CA_HINT)[0]
    key = signing_key(
        read_key(key_path, what="CA key", hint=_CREATE_CA_HINT), key_path, what="CA key"
    )
    if not key_matches(cert, key):
        raise ConfigError(f"CA key {key_path} does not match CA certificate {cert_path}")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        constraints = None
    if constraints is None or not constraints.ca:
        raise ConfigError(
            f"CA certificate {cert_path}: not a CA (basicConstraints CA:TRUE missing)"
        )
    if cert.not_valid_after_utc < _utcnow():
        raise ConfigError(
            f"CA certificate {cert_path}: expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
        )
    return cert, key


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create directory {path}: {exc.strerror or exc}") from None

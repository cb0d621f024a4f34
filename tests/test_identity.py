"""identity: name checks on certificates, driven directly (no TLS, no sockets)."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trio_tproxy.config import IdentityPolicy
from trio_tproxy.identity import IdentityError, check_ip, check_spiffe, describe, spiffe_ids

# One key for every test certificate: identity never looks at signatures.
_KEY = ec.generate_private_key(ec.SECP256R1())


def make_cert(*sans: x509.GeneralName, cn: str | None = "test") -> x509.Certificate:
    """A self-signed certificate with exactly these SANs (none: no SAN extension)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(_KEY.public_key())
        .serial_number(0xABC)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(_KEY, hashes.SHA256())


def uri(text: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(text)


def ip(text: str) -> x509.IPAddress:
    return x509.IPAddress(ipaddress.ip_address(text))


POLICY = IdentityPolicy(mode="spiffe", trust_domain="cluster.local")


# --- spiffe_ids / describe ---------------------------------------------------------


def test_spiffe_ids_keeps_only_spiffe_uris() -> None:
    cert = make_cert(uri("https://example.com/x"), uri("spiffe://cluster.local/ns/a/sa/b"))
    assert spiffe_ids(cert) == ["spiffe://cluster.local/ns/a/sa/b"]


def test_spiffe_ids_without_san_is_empty() -> None:
    assert spiffe_ids(make_cert()) == []


def test_describe_prefers_spiffe_id() -> None:
    cert = make_cert(uri("spiffe://cluster.local/ns/a/sa/b"), ip("10.0.0.1"), cn="web")
    assert describe(cert) == "spiffe://cluster.local/ns/a/sa/b"


def test_describe_falls_back_to_ips_then_dns_then_cn() -> None:
    assert describe(make_cert(ip("10.0.0.1"), ip("fd00::1"))) == "IP 10.0.0.1, fd00::1"
    assert describe(make_cert(x509.DNSName("web.example"))) == "DNS web.example"
    assert describe(make_cert(cn="legacy-client")) == "CN=legacy-client"
    assert describe(make_cert(cn=None)) == "serial abc"


def test_describe_quotes_control_characters() -> None:
    # A certificate must not be able to forge a second log line.
    text = describe(make_cert(cn="evil\nfake log line"))
    assert "\n" not in text
    assert text == "CN='evil\\nfake log line'"


# --- check_spiffe -------------------------------------------------------------------


def test_check_spiffe_accepts_one_id_in_trust_domain() -> None:
    cert = make_cert(uri("spiffe://cluster.local/ns/default/sa/web"), ip("10.0.0.1"))
    assert check_spiffe(cert, POLICY) == "spiffe://cluster.local/ns/default/sa/web"


@pytest.mark.parametrize(
    "sans",
    [(), (x509.DNSName("web.example"),), (ip("10.0.0.1"),)],
    ids=["no-san", "dns-only", "ip-only"],
)
def test_check_spiffe_without_uri_san(sans: tuple[x509.GeneralName, ...]) -> None:
    with pytest.raises(IdentityError, match=r"^no SPIFFE ID$"):
        check_spiffe(make_cert(*sans), POLICY)


def test_check_spiffe_rejects_several_uri_sans() -> None:
    cert = make_cert(uri("spiffe://cluster.local/a"), uri("spiffe://cluster.local/b"))
    with pytest.raises(IdentityError, match=r"^several URI SANs"):
        check_spiffe(cert, POLICY)


def test_check_spiffe_counts_non_spiffe_uris_too() -> None:
    # An SVID has exactly one URI SAN; an extra https URI makes it ambiguous.
    cert = make_cert(uri("spiffe://cluster.local/a"), uri("https://example.com/"))
    with pytest.raises(IdentityError, match=r"^several URI SANs"):
        check_spiffe(cert, POLICY)


def test_check_spiffe_wrong_trust_domain_message() -> None:
    cert = make_cert(uri("spiffe://evil.org/ns/default/sa/web"))
    with pytest.raises(IdentityError) as info:
        check_spiffe(cert, POLICY)
    assert str(info.value) == "wrong trust domain 'evil.org' (want 'cluster.local')"


def test_check_spiffe_trust_domain_is_not_a_suffix_match() -> None:
    cert = make_cert(uri("spiffe://evil.cluster.local/ns/a/sa/b"))
    with pytest.raises(IdentityError, match="wrong trust domain 'evil.cluster.local'"):
        check_spiffe(cert, POLICY)


@pytest.mark.parametrize(
    "bad",
    [
        "https://cluster.local/ns/a",
        "spiffe://cluster.local",
        "spiffe://cluster.local/",
        "spiffe://cluster.local/ns//a",
        "spiffe://cluster.local/ns/a/",
        "spiffe://cluster.local/ns/../admin",
        "spiffe://cluster.local/ns/a%2Fb",
        "spiffe://cluster.local/ns/a?x=1",
        "spiffe://Cluster.Local/ns/a",
    ],
)
def test_check_spiffe_rejects_malformed_ids(bad: str) -> None:
    with pytest.raises(IdentityError, match=r"^invalid SPIFFE ID"):
        check_spiffe(make_cert(uri(bad)), POLICY)


def test_allow_list_exact_entry() -> None:
    policy = IdentityPolicy(allow_ids=("spiffe://cluster.local/ns/a/sa/b",))
    assert check_spiffe(make_cert(uri("spiffe://cluster.local/ns/a/sa/b")), policy)
    # Without a trailing '/', an entry is not a prefix.
    with pytest.raises(IdentityError, match=r"^SPIFFE ID not in allow-list"):
        check_spiffe(make_cert(uri("spiffe://cluster.local/ns/a/sa/bb")), policy)
    with pytest.raises(IdentityError, match=r"^SPIFFE ID not in allow-list"):
        check_spiffe(make_cert(uri("spiffe://cluster.local/ns/a/sa/b/c")), policy)


def test_allow_list_prefix_entry_matches_whole_segments_only() -> None:
    policy = IdentityPolicy(allow_ids=("spiffe://cluster.local/ns/web/",))
    ok = "spiffe://cluster.local/ns/web/sa/frontend"
    assert check_spiffe(make_cert(uri(ok)), policy) == ok
    with pytest.raises(IdentityError) as info:
        check_spiffe(make_cert(uri("spiffe://cluster.local/ns/webhook/sa/x")), policy)
    assert str(info.value) == (
        "SPIFFE ID not in allow-list: 'spiffe://cluster.local/ns/webhook/sa/x'"
    )


def test_empty_allow_list_allows_whole_trust_domain() -> None:
    cert = make_cert(uri("spiffe://cluster.local/anything/at/all"))
    assert (
        check_spiffe(cert, IdentityPolicy(allow_ids=())) == "spiffe://cluster.local/anything/at/all"
    )


# --- check_ip -------------------------------------------------------------------------


def test_check_ip_match_returns_description() -> None:
    cert = make_cert(ip("10.0.0.2"), x509.DNSName("web"))
    assert check_ip(cert, "10.0.0.2") == "IP 10.0.0.2"


def test_check_ip_mismatch_message() -> None:
    with pytest.raises(IdentityError) as info:
        check_ip(make_cert(ip("10.0.0.3")), "10.0.0.2")
    assert str(info.value) == "IP SAN mismatch: want 10.0.0.2, certificate has [10.0.0.3]"


def test_check_ip_without_ip_sans() -> None:
    cert = make_cert(uri("spiffe://cluster.local/a"), x509.DNSName("10.0.0.2"))
    # A DNS SAN spelled like an address is not an IP SAN.
    with pytest.raises(IdentityError, match=r"certificate has \[\]$"):
        check_ip(cert, "10.0.0.2")


def test_check_ip_normalizes_ipv4_mapped_destination() -> None:
    assert check_ip(make_cert(ip("10.0.0.2")), "::ffff:10.0.0.2") == "IP 10.0.0.2"


def test_check_ip_normalizes_ipv4_mapped_san() -> None:
    assert check_ip(make_cert(ip("::ffff:10.0.0.2")), "10.0.0.2") == "IP 10.0.0.2"


def test_check_ip_ipv6_spellings_compare_equal() -> None:
    assert check_ip(make_cert(ip("fd00::1")), "fd00:0:0:0:0:0:0:1") == "IP fd00::1"


def test_check_ip_ignores_zone_of_destination() -> None:
    assert check_ip(make_cert(ip("fe80::1")), "fe80::1%eth0") == "IP fe80::1"


def test_check_ip_v4_and_v6_do_not_match_each_other() -> None:
    with pytest.raises(IdentityError, match="IP SAN mismatch"):
        check_ip(make_cert(ip("::a00:2")), "10.0.0.2")


def test_check_ip_rejects_garbage_destination() -> None:
    with pytest.raises(IdentityError, match="invalid destination IP 'not-an-ip'"):
        check_ip(make_cert(ip("10.0.0.2")), "not-an-ip")

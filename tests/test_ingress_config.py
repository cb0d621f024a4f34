"""The ingress flags: parsing and validation (no kernel)."""

from __future__ import annotations

import pytest

from trio_tproxy.cli import build_parser, config_from
from trio_tproxy.config import AppProbe, ConfigError, Ingress, Interception, parse_app_probe

TLS = ["--cert", "c", "--key", "k", "--ca-cert", "ca"]


def config(*flags: str):
    return config_from(build_parser().parse_args(["run", *TLS, *flags]))


def test_defaults_keep_the_client_address_strictly():
    c = config()
    assert c.ingress == Ingress()
    assert c.ingress.preserve_client_ip and not c.ingress.inbound_to_loopback
    assert c.ingress.inbound_mode == "strict" and not c.ingress.permissive(8080)
    assert c.interception.preserve_mark == 13 and c.interception.probe_port == 15021


def test_flags_map_to_the_dataclass():
    c = config(
        "--preserve-client-ip=false",
        "--inbound-to-loopback",
        "--permissive-port",
        "9000",
        "--app-probe",
        "web=http://127.0.0.1:8080/healthz?full=1",
        "--app-probe",
        "db=tcp://127.0.0.1:5432",
        "--app-probe",
        "rpc=grpc://[::1]:9090/my.Service",
        "--preserve-mark",
        "0x20",
    )
    assert not c.ingress.preserve_client_ip and c.ingress.inbound_to_loopback
    assert c.ingress.permissive(9000) and not c.ingress.permissive(9001)
    assert c.ingress.app_probes == (
        AppProbe("web", "http", "127.0.0.1", 8080, "/healthz?full=1"),
        AppProbe("db", "tcp", "127.0.0.1", 5432, "/"),
        AppProbe("rpc", "grpc", "::1", 9090, "my.Service"),
    )
    assert c.interception.preserve_mark == 0x20


@pytest.mark.parametrize("mark", ["10", "12"])
def test_the_preserve_mark_must_differ_from_the_others(mark):
    with pytest.raises(ConfigError, match="--preserve-mark and|and --preserve-mark"):
        Interception(preserve_mark=int(mark))


@pytest.mark.parametrize(
    "text, message",
    [
        ("web", "expected NAME="),
        ("web=http://127.0.0.1/healthz", "needs HOST:PORT"),
        ("web=ftp://127.0.0.1:21", "scheme"),
        ("we b=tcp://127.0.0.1:1", "name"),
        ("web=tcp://localhost:1", "an IP address"),
    ],
)
def test_bad_app_probes_say_why(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_app_probe(text)


def test_probe_names_are_unique_and_modes_checked():
    probe = AppProbe("web", "tcp", "127.0.0.1", 1)
    with pytest.raises(ConfigError, match="twice"):
        Ingress(app_probes=(probe, probe))
    with pytest.raises(ConfigError, match="strict or permissive"):
        Ingress(inbound_mode="open")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="also a listener port"):
        Interception(probe_port=2)

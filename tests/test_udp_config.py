"""--intercept-udp and friends: flags -> config, validation, defaults that leave TCP alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.pki import make_pki
from trio_tproxy.cli import build_parser, config_from, interception_from
from trio_tproxy.config import ConfigError, Interception, ProxyConfig, TLSFiles
from trio_tproxy.nft import render


def test_udp_is_off_by_default_and_leaves_the_table_alone():
    ic = Interception()
    assert not ic.intercept_udp
    assert "udp" not in render(ic).replace("UDP, ...", "")


def test_udp_flags_build_the_config():
    args = build_parser().parse_args(
        [
            "rules",
            "show",
            "--intercept-udp",
            "--udp-port",
            "5353",
            "--udp-port",
            "443",
            "--udp-port",
            "5353",
            "--exclude-udp-port",
            "123",
            "--udp-listen-port",
            "15002",
            "--dtls-port",
            "15007",
        ]
    )
    ic = interception_from(args)
    assert ic.intercept_udp and not ic.intercept_dns
    assert ic.udp_ports == (443, 5353) and ic.exclude_udp_ports == (123,)
    assert (ic.udp_listen_port, ic.dtls_port) == (15002, 15007)
    # DNS is left alone both ways unless asked for
    assert ic.udp_excluded == (53, 123)
    dns = interception_from(
        build_parser().parse_args(["rules", "show", "--intercept-udp", "--intercept-dns"])
    )
    assert dns.udp_excluded == ()


def test_run_flags_for_udp_flows(tmp_path: Path):
    files = make_pki(tmp_path)["a"]
    args = build_parser().parse_args(
        [
            "run",
            "--cert",
            str(files.cert),
            "--key",
            str(files.key),
            "--ca-cert",
            str(files.ca_cert),
            "--intercept-udp",
            "--udp-idle-timeout",
            "2.5",
            "--udp-max-flows",
            "10",
            "--udp-mtu",
            "9000",
        ]
    )
    config = config_from(args)
    assert (config.udp_idle_timeout, config.udp_max_flows, config.udp_mtu) == (2.5, 10, 9000)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"udp_listen_port": 2, "dtls_port": 2}, "--udp-listen-port and --dtls-port are both 2"),
        ({"dtls_port": 0}, "--dtls-port"),
        ({"udp_ports": (70000,)}, "--udp-port"),
        ({"exclude_udp_ports": (2,)}, "--exclude-udp-port 2 is the --dtls-port"),
    ],
)
def test_bad_udp_interception_is_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Interception(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"udp_idle_timeout": 0}, "--udp-idle-timeout"),
        ({"udp_max_flows": 0}, "--udp-max-flows"),
        ({"udp_mtu": 500}, "--udp-mtu"),
    ],
)
def test_bad_udp_flow_settings_are_refused(kwargs, message):
    files = TLSFiles(Path("c"), Path("k"), Path("ca"))
    with pytest.raises(ConfigError, match=message):
        ProxyConfig(tls=files, **kwargs)

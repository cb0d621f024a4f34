"""Proof that each TLS set-up really does mutual TLS, checked once per run.

Why: a misconfigured comparison (a server side that does not ask for a client
certificate, a TLS 1.2 fallback) would make a competitor look cheaper than it
is. From the host "outside" (no sidecar, so nothing intercepts it), a stdlib
TLS client goes straight to the B side's TLS port for the echo service:

* with a valid certificate from the same CA: the echo must come back, over TLS 1.3;
* with no certificate: it must not (under TLS 1.3 the refusal arrives after
  the client's handshake, so the echo is the verdict);
* with a chain-valid certificate from another CA: it must not.

The client side's check of the server certificate is configured the same way
(verify required against the CA) but is not exercised here.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from .proxies import Proxy
from .scenarios import LOADGEN


@dataclass(frozen=True)
class Verdict:
    ok: bool
    summary: str
    probes: dict[str, dict[str, Any]]


def verify_mtls(proxy: Proxy) -> Verdict:
    target = proxy.probe_target()
    if target is None:
        return Verdict(True, "no TLS (plaintext)", {})
    lab = proxy.lab
    host, port = target
    ca = str(lab.files["outside"].ca_cert)
    cases = {
        "valid-cert": [str(lab.files["outside"].cert), str(lab.files["outside"].key)],
        "no-cert": [],
        "rogue-ca-cert": [str(lab.files["rogue"].cert), str(lab.files["rogue"].key)],
    }
    probes: dict[str, dict[str, Any]] = {}
    for case, creds in cases.items():
        done = lab.topology.run(
            "outside", [sys.executable, str(LOADGEN), "probe", host, str(port), ca, *creds]
        )
        try:
            probes[case] = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            probes[case] = {"echoed": False, "error": f"probe crashed: {done.stderr[-500:]}"}
    good = probes["valid-cert"]
    ok = (
        good.get("echoed") is True
        and good.get("version") == "TLSv1.3"
        and probes["no-cert"].get("echoed") is False
        and probes["rogue-ca-cert"].get("echoed") is False
    )
    summary = (
        f"valid cert: {'echo' if good.get('echoed') else 'FAILED ' + good.get('error', '')} "
        f"({good.get('version')}, {good.get('cipher')}); "
        f"no cert: {_refusal(probes['no-cert'])}; "
        f"other CA: {_refusal(probes['rogue-ca-cert'])}"
    )
    return Verdict(ok, summary, probes)


def _refusal(probe: dict[str, Any]) -> str:
    if probe.get("echoed"):
        return "ACCEPTED (not mutual TLS!)"
    return "refused (" + str(probe.get("error", "no echo"))[:70] + ")"

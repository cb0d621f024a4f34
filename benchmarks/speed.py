"""``openssl speed``: the machine's crypto limit, to read the proxies' figures against.

Why: a proxy cannot move data faster than one core encrypts it, nor accept
connections faster than one core signs and verifies; these two numbers put
the bulk and connection-rate figures in scale. One core, one second each,
the system's openssl (the library haproxy and stunnel use; trio-tproxy's
pyOpenSSL brings its own, whose version the JSON records too).
"""

from __future__ import annotations

import subprocess
from typing import Any

#: bytes per AES-GCM operation: one full TLS record
RECORD = 16384


def _run(*args: str) -> list[str]:
    done = subprocess.run(
        ["openssl", "speed", "-mr", "-seconds", "1", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.splitlines()


def openssl_speed() -> dict[str, Any]:
    """AES-256-GCM MB/s on 16 KiB records; ECDSA P-256 signs and verifies per second."""
    result: dict[str, Any] = {}
    try:
        for line in _run("-bytes", str(RECORD), "-evp", "aes-256-gcm"):
            if line.startswith("+F:"):  # +F:<n>:AES-256-GCM:<bytes per second>
                result["aes_256_gcm_mbps"] = float(line.split(":")[3]) / 1e6
        for line in _run("ecdsap256"):
            if line.startswith("+F4:"):  # +F4:<n>:256:<signs/s>:<verifies/s>
                fields = line.split(":")
                result["ecdsa_p256_sign_per_s"] = float(fields[3])
                result["ecdsa_p256_verify_per_s"] = float(fields[4])
        version = subprocess.run(["openssl", "version"], capture_output=True, text=True)
        result["openssl"] = version.stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        result["error"] = str(exc)
    return result

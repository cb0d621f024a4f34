"""The container image, built and run as the lab's sidecars (root; podman).

``python -m lab.image`` (``tox -e image``, ``bash dev.sh image``):

1. makes the base image if podman lacks it: a Debian bookworm root filesystem
   from Debian's packages (``mmdebstrap``) imported under the public name
   ``docker.io/library/debian:bookworm-slim``, so the unchanged ``Dockerfile``
   builds here without a registry and elsewhere from the public image;
2. builds the ``Dockerfile`` (timed), and checks what the image holds: the
   sidecar package and its dependencies, nothing of the lab (``lab``,
   ``tests``, ``fuzz``, ``benchmarks``), a non-root default user;
3. runs the demo (:mod:`lab.demo`) with both sidecars as containers of that
   image: ``podman run --network ns:/run/netns/<pod> --cap-drop ALL
   --cap-add NET_ADMIN --cap-add NET_BIND_SERVICE --user 0`` (see
   :func:`run_argv`), and exits with the demo's verdict.

Podman on these VMs needs two settings (a private ``containers.conf`` passed
with ``CONTAINERS_CONF``, nothing under /etc changes): ulimits within the
hard limit, and runc (crun refuses the hybrid cgroup layout).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["BASE", "TAG", "build", "ensure_base", "podman_env", "run_argv"]

BASE = "docker.io/library/debian:bookworm-slim"
TAG = "localhost/trio-tproxy:dev"
ROOT = Path(__file__).resolve().parent.parent
#: Where pip inside the build finds the CA bundle (this machine's network may re-sign HTTPS).
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
LAB_PACKAGES = ("lab", "tests", "fuzz", "benchmarks")


def podman_env() -> dict[str, str]:
    """The environment for podman: a private containers.conf for this VM's limits."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard_text = "1048576" if hard == resource.RLIM_INFINITY else str(hard)
    conf = Path(tempfile.gettempdir()) / "trio-tproxy-podman" / "containers.conf"
    conf.parent.mkdir(exist_ok=True)
    conf.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={hard_text}:{hard_text}", "nproc=32768:32768"]\n'
        '[engine]\nruntime = "runc"\n'
    )
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(*args: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    done: subprocess.CompletedProcess[str] = subprocess.run(
        ["podman", *args], env=podman_env(), text=True, check=check, **kw
    )
    return done


def ensure_base() -> float | None:
    """Import the Debian base under its public name unless podman has it; seconds taken."""
    if podman("image", "exists", BASE, check=False).returncode == 0:
        return None
    started = time.monotonic()
    suites = ["bookworm", "bookworm-updates"]
    sources = [f"deb http://deb.debian.org/debian {s} main" for s in suites]
    sources.append("deb http://deb.debian.org/debian-security bookworm-security main")
    strap = subprocess.Popen(
        [
            "mmdebstrap",
            "--quiet",
            "--variant=minbase",
            "--include=python3,python3-venv,nftables,iproute2,ca-certificates",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "bookworm",
            "-",
            *sources,
        ],  # fmt: skip
        stdout=subprocess.PIPE,
    )
    assert strap.stdout is not None
    podman("import", "-q", "-", BASE, stdin=strap.stdout, stdout=subprocess.DEVNULL)
    strap.stdout.close()
    if strap.wait() != 0:
        raise RuntimeError(f"mmdebstrap failed with exit code {strap.returncode}")
    return time.monotonic() - started


def build(tag: str = TAG) -> float:
    """``podman build`` the repository's Dockerfile; seconds taken."""
    started = time.monotonic()
    volumes = (
        ["-v", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"] if Path(HOST_CA_BUNDLE).exists() else []
    )
    podman("build", "-q", *volumes, "-t", tag, str(ROOT), stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def contents(tag: str = TAG) -> tuple[list[str], str, int]:
    """(top-level names in the venv's site-packages, default user, image size in bytes)."""
    listing = podman(
        "run", "--rm", "--pull=never", "--entrypoint", "sh", tag, "-c",
        "ls /opt/trio-tproxy/lib/python3*/site-packages; echo @; id -u",
        capture_output=True,
    ).stdout  # fmt: skip
    names, user = listing.split("@\n")
    size = podman("image", "inspect", "--format", "{{.Size}}", tag, capture_output=True).stdout
    return names.split(), user.strip(), int(size)


def run_argv(tag: str, netns: str, workdir: Path, name: str, args: list[str]) -> list[str]:
    """``podman run`` for a sidecar in lab namespace ``netns`` (the pod's network).

    ``--user 0`` with NET_ADMIN and NET_BIND_SERVICE (ports 1 and 2 are below
    1024): what the injected pod spec asks for.  The
    work directory (certificates, keys) is mounted read-only at the same path."""
    return [
        "podman", "run", "--rm", "--pull=never", "--name", name,
        "--network", f"ns:/run/netns/{netns}",
        "--cap-drop", "ALL", "--cap-add", "NET_ADMIN", "--cap-add", "NET_BIND_SERVICE",
        "--user", "0",
        "--read-only", "-v", f"{workdir}:{workdir}:ro",
        tag, *args,
    ]  # fmt: skip


def remove_container(name: str) -> None:
    podman("rm", "-f", "--ignore", name, check=False, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.image", description=__doc__)
    parser.add_argument("--tag", default=TAG)
    parser.add_argument("--no-build", action="store_true", help="use the image already built")
    parser.add_argument("--keep", action="store_true", help="keep the demo's work directory")
    args = parser.parse_args(argv)
    for tool in ("podman", "runc", "mmdebstrap"):
        if shutil.which(tool) is None:
            print(f"lab.image: {tool} is not installed (apt-get install podman runc mmdebstrap)")
            return 2
    if not args.no_build:
        base = ensure_base()
        print(f"==> base {BASE}: " + ("present" if base is None else f"imported in {base:.0f}s"))
        took = build(args.tag)
        print(f"==> built {args.tag} in {took:.0f}s")
    names, user, size = contents(args.tag)
    print(
        f"==> image size {size / 1e6:.0f} MB; default uid {user}; site-packages: {' '.join(names)}"
    )
    leaked = [n for n in names if n in LAB_PACKAGES]
    if leaked or "trio_tproxy" not in names or user == "0":
        print(f"FAILED: image contents: lab packages {leaked}, default uid {user}")
        return 1
    from . import demo

    return demo.cmd_demo(argparse.Namespace(keep=args.keep, image=args.tag))


if __name__ == "__main__":
    sys.exit(main())

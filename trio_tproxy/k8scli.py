"""``trio-tproxy inject`` and ``trio-tproxy webhook``: flags, YAML and printing.

The injection itself is :mod:`.inject` (pure); the admission server is
:mod:`.webhook`.  YAML (PyYAML) is imported here, inside the command, so
``trio-tproxy run`` never loads it: Kubernetes manifests are YAML, the
standard library has no YAML parser, and PyYAML is the one every Python
Kubernetes tool uses (safe loader, no dependencies of its own).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .config import ConfigError
from .inject import InjectConfig, InjectError, inject_object, json_patch

__all__ = ["add_inject_flags", "inject_config_from", "register"]


def add_inject_flags(parser: argparse.ArgumentParser) -> None:
    d = InjectConfig()
    g = parser.add_argument_group("sidecar")
    g.add_argument("--image", default=d.image, help=f"sidecar image (default {d.image})")
    g.add_argument(
        "--trust-domain",
        default=d.trust_domain,
        help=f"SPIFFE trust domain (default {d.trust_domain})",
    )
    g.add_argument(
        "--signer-name",
        default=d.signer_name,
        help="podCertificate signer issuing one SPIFFE certificate per service account "
        f"(default {d.signer_name})",
    )
    g.add_argument(
        "--trust-bundle-signer",
        default=None,
        help="signer whose ClusterTrustBundles are the CA bundle (default: --signer-name)",
    )
    g.add_argument(
        "--key-type",
        default=d.key_type,
        choices=("ECDSAP256", "ECDSAP384", "ECDSAP521", "ED25519", "RSA3072", "RSA4096"),
        help=f"key the kubelet generates (default {d.key_type})",
    )
    g.add_argument(
        "--max-expiration-seconds",
        type=int,
        default=d.max_expiration_seconds,
        help=f"certificate lifetime asked of the signer (default {d.max_expiration_seconds})",
    )
    g.add_argument(
        "--credentials",
        default=d.credentials,
        choices=("pod-certificate", "csi-spiffe"),
        help="pod-certificate: podCertificate + clusterTrustBundle projected volume (Kubernetes "
        ">= 1.35); csi-spiffe: cert-manager csi-driver-spiffe volume "
        f"(default {d.credentials}; per pod: annotation trio-tproxy.io/credentials)",
    )
    g.add_argument(
        "--sidecar-verbosity",
        type=int,
        default=0,
        help="the sidecar's -v unless the pod's annotation says otherwise",
    )


def inject_config_from(args: argparse.Namespace) -> InjectConfig:
    if not 3600 <= args.max_expiration_seconds <= 7862400:
        raise ConfigError("--max-expiration-seconds must be in 3600..7862400 (1 hour..91 days)")
    return InjectConfig(
        image=args.image,
        trust_domain=args.trust_domain,
        signer_name=args.signer_name,
        trust_bundle_signer=args.trust_bundle_signer,
        key_type=args.key_type,
        max_expiration_seconds=args.max_expiration_seconds,
        verbosity=args.sidecar_verbosity,
        credentials=args.credentials,
    )


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    inject = subparsers.add_parser(
        "inject",
        help="add the sidecar to pods and workloads in YAML/JSON (offline)",
        description="Read Kubernetes objects (YAML or JSON, several documents allowed), add the "
        "sidecar to every Pod and pod template (Deployment, StatefulSet, DaemonSet, ReplicaSet, "
        "Job, CronJob) and print them: `trio-tproxy inject -f app.yaml | kubectl apply -f -`. "
        "Other objects pass through unchanged; skipped pods are named on stderr.",
    )
    inject.add_argument("-f", "--filename", required=True, help="input file, - for stdin")
    inject.add_argument(
        "-o",
        "--output",
        choices=("pod", "patch"),
        default="pod",
        help="pod: the mutated objects as YAML; patch: one JSONPatch (JSON array) per object",
    )
    add_inject_flags(inject)
    inject.set_defaults(func=cmd_inject)


def cmd_inject(args: argparse.Namespace) -> int:
    import yaml  # lazily: only this command needs it

    config = inject_config_from(args)
    try:
        text = sys.stdin.read() if args.filename == "-" else Path(args.filename).read_text()
    except OSError as exc:
        raise ConfigError(f"-f {args.filename}: cannot read: {exc.strerror or exc}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError(f"-f {args.filename}: not YAML: {' '.join(str(exc).split())}") from None
    pairs: list[tuple[Any, Any]] = []  # (as read, as injected)
    for doc in docs:
        items = doc.get("items") if isinstance(doc, dict) and doc.get("kind") == "List" else None
        if isinstance(items, list):
            pairs.append((doc, {**doc, "items": [_one(item, config) for item in items]}))
        else:
            pairs.append((doc, _one(doc, config)))
    if args.output == "patch":
        for old, new in pairs:
            print(json.dumps(json_patch(old, new)))
        return 0
    objs = [new for _, new in pairs]
    sys.stdout.write(yaml.safe_dump_all(objs, sort_keys=False, explicit_start=len(objs) > 1))
    return 0


def _one(doc: Any, config: InjectConfig) -> Any:
    if not isinstance(doc, dict):
        raise ConfigError("inject: a document is not a Kubernetes object (a mapping)")
    try:
        result = inject_object(doc, config)
    except InjectError as exc:
        raise ConfigError(f"inject: {exc}") from None
    for warning in result.warnings:
        print(f"trio-tproxy inject: warning: {warning}", file=sys.stderr)
    if result.reason and "no pod template" not in result.reason:
        print(f"trio-tproxy inject: skipped: {result.reason}", file=sys.stderr)
    return result.obj

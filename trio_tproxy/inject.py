"""Sidecar injection: a Pod (or a workload's pod template) in, the mutated one out.

Pure: dicts in, dicts and a JSONPatch out, no I/O and no YAML (the CLI and
the webhook parse and print).  ``trio-tproxy inject`` (offline, like
``istioctl kube-inject``) and ``trio-tproxy webhook`` (admission) share it,
so what a test checks here is what a cluster gets.

What injection adds to a pod spec:

* the sidecar as a *native sidecar*: ``initContainers[0]`` with
  ``restartPolicy: Always``.  The kubelet starts the app containers only once
  its ``startupProbe`` passes, and that probe is the sidecar's ``/readyz``
  (admin port 15020), true only once the listeners are up and the nft table
  and routes are in place: the app's first connection is already intercepted.
  It stops after the app containers, so their last connections still go out.
* ``NET_ADMIN`` (nft, policy routes, ``IP_TRANSPARENT``, ``SO_MARK``) and
  ``NET_BIND_SERVICE`` (the listeners' default ports 1 and 2 are below 1024:
  with NET_ADMIN alone, ``bind`` fails with EACCES - found by running the
  image in the lab), all other capabilities dropped, read-only root
  filesystem, no privilege escalation; uid 0 because Kubernetes grants added
  capabilities to root only (no ambient capabilities for other users).
* the credentials as a projected volume: a ``podCertificate`` source (the
  kubelet makes a key of ``keyType``, gets it signed by ``signerName`` for
  the pod's service account and rotates it; one credential bundle file) and a
  ``clusterTrustBundle`` source (the signer's trust anchors).  A pod
  annotated with ``trio-tproxy.io/credentials: csi-spiffe`` (or the
  ``--credentials`` default) gets a cert-manager csi-driver-spiffe volume
  instead, and ``trio-tproxy.io/credentials-secret: NAME`` that Secret (both
  write ``tls.crt``, ``tls.key``, ``ca.crt``).
* the app containers' ``httpGet``/``tcpSocket``/``grpc`` probes point at the
  sidecar's probe port (15021, never intercepted) as
  ``/app-health/<container>-<kind>``, and the sidecar gets the matching
  ``--app-probe NAME=URL``: the kubelet (outside the mesh, no certificate)
  cannot reach the app through mTLS, the sidecar can reach it on loopback.
  A probe that cannot be forwarded faithfully (custom headers or ``host``)
  keeps its target, and its port is excluded from inbound interception.

Per-pod annotations (``trio-tproxy.io/...``): ``inject: "false"`` opts out;
``exclude-inbound-ports``, ``exclude-outbound-ports`` (comma-separated),
``exclude-cidrs``, ``inbound-mode`` (strict|permissive), ``verbosity``.
A pod with ``hostNetwork: true`` is skipped (its network namespace is the
node's: our rules would intercept the node).  Injecting an injected pod
changes nothing (the sidecar container's name is the marker).
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "InjectConfig",
    "Result",
    "inject_object",
    "json_patch",
    "pod_spec_paths",
]

Json = Any
SIDECAR = "trio-tproxy"
VOLUME = "trio-tproxy-credentials"
MOUNT = "/var/run/trio-tproxy"
BUNDLE_FILE = "credentialbundle.pem"
TRUST_FILE = "ca.crt"
ADMIN_PORT = 15020
PROBE_PORT = 15021
PREFIX = "trio-tproxy.io/"
PROBE_KINDS = (("livenessProbe", "liveness"), ("readinessProbe", "readiness"),
               ("startupProbe", "startup"))  # fmt: skip
#: Probe fields that are timing, kept as they are when a probe is redirected.
PROBE_TIMING = (
    "initialDelaySeconds",
    "periodSeconds",
    "timeoutSeconds",
    "successThreshold",
    "failureThreshold",
    "terminationGracePeriodSeconds",
)
#: Where each workload kind keeps its pod template.
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


@dataclass(frozen=True)
class InjectConfig:
    """How to build the sidecar; one per webhook/CLI run."""

    image: str = "trio-tproxy:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    trust_domain: str = "cluster.local"
    #: The podCertificate signer that issues SPIFFE certificates per service account.
    signer_name: str = "trio-tproxy.io/spiffe"
    key_type: str = "ECDSAP256"
    #: Requested certificate lifetime (the signer may issue shorter).
    max_expiration_seconds: int = 86400
    #: ClusterTrustBundles of this signer (all of them: empty selector) are the CA bundle.
    trust_bundle_signer: str | None = None
    #: Where certificates come from: "pod-certificate" (projected volume, Kubernetes
    #: >= 1.35) or "csi-spiffe" (cert-manager's csi-driver-spiffe: one SPIFFE ID per
    #: service account today, on any version); per pod: annotation ``credentials``.
    credentials: str = "pod-certificate"
    verbosity: int = 0
    cpu_request: str = "50m"
    memory_request: str = "48Mi"
    memory_limit: str = "256Mi"


@dataclass
class Result:
    obj: Json
    #: True when a sidecar was added (False: skipped, or already there).
    injected: bool
    #: Why it was not injected (None when it was).
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)


class InjectError(ValueError):
    """The object cannot be injected as given (bad annotation, not a pod spec)."""


def pod_spec_paths(obj: Json) -> tuple[str, ...] | None:
    """Path to the pod template (``()`` for a Pod), or None for other kinds."""
    if not isinstance(obj, dict):
        return None
    return TEMPLATE_PATHS.get(str(obj.get("kind", "")))


def inject_object(obj: Json, config: InjectConfig) -> Result:
    """Inject the Pod or workload ``obj``; a copy, ``obj`` is never changed.

    Any other kind comes back unchanged (``reason`` says so)."""
    path = pod_spec_paths(obj)
    if path is None:
        return Result(obj, False, f"kind {obj.get('kind')!r} has no pod template")
    out = copy.deepcopy(obj)
    template = out
    for key in path:
        template = template.get(key) if isinstance(template, dict) else None
        if not isinstance(template, dict):
            raise InjectError(f"{obj.get('kind')}: no {'.'.join(path)}")
    where = f"{obj.get('kind')} {_name(obj)}"
    result = _inject_template(template, config, where)
    result.obj = out if result.injected else obj
    return result


def _name(obj: Json) -> str:
    meta = obj.get("metadata") or {}
    name = meta.get("name") or meta.get("generateName", "") + "*"
    return f"{meta['namespace']}/{name}" if meta.get("namespace") else str(name)


def _inject_template(template: Json, config: InjectConfig, where: str) -> Result:
    meta = template.setdefault("metadata", {})
    annotations = meta.get("annotations") or {}
    spec = template.get("spec")
    if not isinstance(spec, dict):
        raise InjectError(f"{where}: no pod spec")
    if str(annotations.get(PREFIX + "inject", "true")).lower() == "false":
        return Result(template, False, f'{where}: annotation {PREFIX}inject is "false"')
    if spec.get("hostNetwork"):
        return Result(
            template,
            False,
            f"{where}: hostNetwork pod skipped (it shares the node's network namespace: "
            "interception would capture the node's traffic)",
        )
    if any(c.get("name") == SIDECAR for c in _containers(spec)):
        return Result(template, False, f"{where}: already injected")
    warnings: list[str] = []
    opts = _annotations(annotations, where)
    probes: list[str] = []
    excluded_inbound = list(opts["exclude_inbound_ports"])
    for container in spec.get("containers") or []:
        for field_name, kind in PROBE_KINDS:
            probe = container.get(field_name)
            if not isinstance(probe, dict):
                continue
            name = f"{container.get('name')}-{kind}"
            redirected = _redirect_probe(container, probe, name, warnings, where)
            if redirected is None:
                port = _probe_port(container, probe)
                if port is not None and port not in excluded_inbound:
                    excluded_inbound.append(port)
                continue
            url, new_probe = redirected
            container[field_name] = new_probe
            probes.append(f"{name}={url}")
    sidecar = _sidecar(config, opts, excluded_inbound, probes, annotations)
    spec["initContainers"] = [sidecar, *(spec.get("initContainers") or [])]
    spec["volumes"] = [*(spec.get("volumes") or []), _volume(config, annotations)]
    meta["annotations"] = {**annotations, PREFIX + "status": "injected"}
    return Result(template, True, None, warnings)


def _containers(spec: Json) -> Iterator[Json]:
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or []:
            if isinstance(c, dict):
                yield c


def _split(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _annotations(annotations: Json, where: str) -> dict[str, Any]:
    def ports(key: str) -> list[int]:
        out = []
        for text in _split(annotations.get(PREFIX + key, "")):
            if not text.isdigit() or not 1 <= int(text) <= 65535:
                raise InjectError(f"{where}: annotation {PREFIX}{key}: invalid port {text!r}")
            out.append(int(text))
        return out

    cidrs = []
    for text in _split(annotations.get(PREFIX + "exclude-cidrs", "")):
        try:
            cidrs.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise InjectError(
                f"{where}: annotation {PREFIX}exclude-cidrs: invalid CIDR {text!r}"
            ) from None
    mode = str(annotations.get(PREFIX + "inbound-mode", "")) or None
    if mode not in (None, "strict", "permissive"):
        raise InjectError(
            f"{where}: annotation {PREFIX}inbound-mode: {mode!r} is not strict or permissive"
        )
    credentials = annotations.get(PREFIX + "credentials")
    if credentials is not None and credentials not in ("pod-certificate", "csi-spiffe"):
        raise InjectError(
            f"{where}: annotation {PREFIX}credentials: {credentials!r} is not pod-certificate "
            f"or csi-spiffe (for a Secret: {PREFIX}credentials-secret: NAME)"
        )
    verbosity = annotations.get(PREFIX + "verbosity")
    if verbosity is not None and not str(verbosity).isdigit():
        raise InjectError(f"{where}: annotation {PREFIX}verbosity: {verbosity!r} is not a number")
    return {
        "exclude_inbound_ports": ports("exclude-inbound-ports"),
        "exclude_outbound_ports": ports("exclude-outbound-ports"),
        "exclude_cidrs": cidrs,
        "inbound_mode": mode,
        "verbosity": None if verbosity is None else int(verbosity),
    }


def _resolve_port(container: Json, port: Any) -> int | None:
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            value = p.get("containerPort")
            return int(value) if isinstance(value, int) else None
    return None


def _probe_port(container: Json, probe: Json) -> int | None:
    for handler in ("httpGet", "tcpSocket", "grpc"):
        if isinstance(probe.get(handler), dict):
            return _resolve_port(container, probe[handler].get("port"))
    return None


def _redirect_probe(
    container: Json, probe: Json, name: str, warnings: list[str], where: str
) -> tuple[str, Json] | None:
    """(the --app-probe URL, the probe aimed at the sidecar), or None to leave it."""
    url: str | None = None
    if isinstance(probe.get("httpGet"), dict):
        get = probe["httpGet"]
        port = _resolve_port(container, get.get("port"))
        https = str(get.get("scheme", "HTTP")).upper() == "HTTPS"
        if get.get("httpHeaders") or get.get("host") or https:
            # The probe server speaks plain HTTP to the app and sends no custom
            # headers: rather than probe something else, leave this one as is.
            what = "an HTTPS scheme" if https else "custom headers or host"
            warnings.append(
                f"{where}: {name} probe has {what}: not redirected; its port is excluded "
                "from inbound interception (plaintext from anywhere)"
            )
            return None
        if port is not None:
            path = str(get.get("path") or "/")
            url = f"http://127.0.0.1:{port}{path if path.startswith('/') else '/' + path}"
    elif isinstance(probe.get("tcpSocket"), dict):
        port = _resolve_port(container, probe["tcpSocket"].get("port"))
        if probe["tcpSocket"].get("host"):
            warnings.append(f"{where}: {name} probe has a host: not redirected")
            return None
        if port is not None:
            url = f"tcp://127.0.0.1:{port}"
    elif isinstance(probe.get("grpc"), dict):
        port = _resolve_port(container, probe["grpc"].get("port"))
        service = probe["grpc"].get("service")
        if port is not None:
            url = f"grpc://127.0.0.1:{port}" + (f"/{service}" if service else "")
    else:
        return None  # exec probes run inside the container: nothing to do
    if url is None:
        warnings.append(f"{where}: {name} probe names an unknown port: not redirected")
        return None
    new = {k: probe[k] for k in PROBE_TIMING if k in probe}
    new["httpGet"] = {"path": f"/app-health/{name}", "port": PROBE_PORT, "scheme": "HTTP"}
    return url, new


def _sidecar(
    config: InjectConfig,
    opts: dict[str, Any],
    excluded_inbound: list[int],
    probes: list[str],
    annotations: Json,
) -> Json:
    if _credentials(config, annotations) != "pod-certificate":
        files = [
            f"--cert={MOUNT}/tls.crt",
            f"--key={MOUNT}/tls.key",
            f"--ca-cert={MOUNT}/ca.crt",
        ]
    else:
        files = [f"--credential-bundle={MOUNT}/{BUNDLE_FILE}", f"--ca-cert={MOUNT}/{TRUST_FILE}"]
    args = ["run", *files, f"--trust-domain={config.trust_domain}"]
    # A pod keeps its (fail-closed) rules when the sidecar stops: refused, never
    # plaintext, until it is back.  As a native sidecar it is stopped after the
    # app containers have exited, so new connections during its drain are refused.
    args += ["--on-exit=keep", "--drain-new=refuse"]
    args += [f"--exclude-inbound-port={p}" for p in excluded_inbound]
    args += [f"--exclude-outbound-port={p}" for p in opts["exclude_outbound_ports"]]
    args += [f"--exclude-cidr={c}" for c in opts["exclude_cidrs"]]
    if opts["inbound_mode"]:
        args.append(f"--inbound-mode={opts['inbound_mode']}")
    args += [f"--app-probe={p}" for p in probes]
    verbosity = opts["verbosity"] if opts["verbosity"] is not None else config.verbosity
    if verbosity:
        args.append(f"-v={verbosity}")

    def ready() -> Json:  # a new dict each time: YAML output without anchors
        return {"httpGet": {"path": "/readyz", "port": ADMIN_PORT, "scheme": "HTTP"}}

    return {
        "name": SIDECAR,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "restartPolicy": "Always",
        "args": args,
        "ports": [
            {"name": "tproxy-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
            {"name": "tproxy-probe", "containerPort": PROBE_PORT, "protocol": "TCP"},
        ],
        # Passes only once listeners, nft table and routes are in place: the
        # kubelet starts the app containers after it.
        "startupProbe": {**ready(), "periodSeconds": 1, "failureThreshold": 60},
        "readinessProbe": {**ready(), "periodSeconds": 5},
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_BIND_SERVICE"]},
        },
        "resources": {
            "requests": {"cpu": config.cpu_request, "memory": config.memory_request},
            "limits": {"memory": config.memory_limit},
        },
        "volumeMounts": [{"name": VOLUME, "mountPath": MOUNT, "readOnly": True}],
    }


CREDENTIALS = ("pod-certificate", "csi-spiffe", "secret")
CSI_SPIFFE_DRIVER = "spiffe.csi.cert-manager.io"


def _credentials(config: InjectConfig, annotations: Json) -> str:
    if annotations.get(PREFIX + "credentials-secret"):
        return "secret"
    return str(annotations.get(PREFIX + "credentials") or config.credentials)


def _volume(config: InjectConfig, annotations: Json) -> Json:
    kind = _credentials(config, annotations)
    if kind == "secret":
        secret = str(annotations[PREFIX + "credentials-secret"])
        return {"name": VOLUME, "secret": {"secretName": secret, "defaultMode": 0o400}}
    if kind == "csi-spiffe":
        # csi-driver-spiffe writes tls.crt, tls.key and ca.crt, issued for the
        # pod's service account, and renews them before expiry.
        return {"name": VOLUME, "csi": {"driver": CSI_SPIFFE_DRIVER, "readOnly": True}}
    return {
        "name": VOLUME,
        "projected": {
            "defaultMode": 0o400,
            "sources": [
                {
                    "podCertificate": {
                        "signerName": config.signer_name,
                        "keyType": config.key_type,
                        "maxExpirationSeconds": config.max_expiration_seconds,
                        "credentialBundlePath": BUNDLE_FILE,
                    }
                },
                {
                    "clusterTrustBundle": {
                        "signerName": config.trust_bundle_signer or config.signer_name,
                        # Empty selector: every bundle of that signer (unset would be none).
                        "labelSelector": {},
                        "path": TRUST_FILE,
                    }
                },
            ],
        },
    }


# --- JSONPatch ---------------------------------------------------------------------


def _pointer(path: list[str | int]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def json_patch(old: Json, new: Json) -> list[dict[str, Any]]:
    """RFC 6902 operations that turn ``old`` into ``new``.

    Dicts are compared key by key and lists element by element when their
    lengths match; a list that gained leading elements (our init container)
    becomes ``add`` at index 0; anything else is one ``replace``.  Small
    patches keep the admission log readable and touch nothing we did not
    change."""
    ops: list[dict[str, Any]] = []
    _diff(old, new, [], ops)
    return ops


def _diff(old: Json, new: Json, path: list[str | int], ops: list[dict[str, Any]]) -> None:
    if old == new and type(old) is type(new):
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old:
            if key not in new:
                ops.append({"op": "remove", "path": _pointer([*path, key])})
        for key, value in new.items():
            if key not in old:
                ops.append({"op": "add", "path": _pointer([*path, key]), "value": value})
            else:
                _diff(old[key], value, [*path, key], ops)
        return
    if isinstance(old, list) and isinstance(new, list):
        if len(old) == len(new):
            for i, (a, b) in enumerate(zip(old, new, strict=True)):
                _diff(a, b, [*path, i], ops)
            return
        extra = len(new) - len(old)
        if extra > 0 and new[extra:] == old:
            for i in range(extra):
                ops.append({"op": "add", "path": _pointer([*path, i]), "value": new[i]})
            return
        if extra > 0 and new[:-extra] == old:
            for value in new[len(old) :]:
                ops.append({"op": "add", "path": _pointer([*path, "-"]), "value": value})
            return
    ops.append({"op": "replace", "path": _pointer(path), "value": new})

"""k8s/: the kustomize base and the example, checked offline.

* Rendering: a small kustomize subset written here (``resources``,
  ``namespace``, ``labels`` without selectors: all the base uses) renders
  ``k8s/`` and ``k8s/example``; where ``kubectl`` is installed, ``kubectl
  kustomize`` must render the same objects.
* Schemas: every rendered object, the hand-written ``k8s/pod.yaml``, and every
  pod of the example after injection (offline command and webhook patch) is
  valid for Kubernetes 1.35 (tests/k8s_schema.py).  cert-manager's Issuer and
  Certificate are CRDs that no offline Kubernetes schema knows: their
  references are checked instead (Secret name, CA injection, DNS names).
* Wiring: the webhook configuration points at the Service, port and path the
  server serves; the namespace label is the one the example uses; every
  container's args are parsed by the real command-line parser.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_schema import apply_patch, decode_patch, validate
from test_webhook import admission_review

from trio_tproxy import cli
from trio_tproxy.inject import InjectConfig, inject_object
from trio_tproxy.webhook import review

K8S = Path(__file__).parent.parent / "k8s"
CRD_GROUPS = ("cert-manager.io/",)
#: Flags of `run` that other work adds (ingress: probe server, inbound mode).
FLAGS_FROM_ELSEWHERE = ("--app-probe", "--inbound-mode")


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render(directory: Path) -> list[dict[str, Any]]:
    """kustomize's behaviour for the fields our kustomizations use (others are refused)."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - {"apiVersion", "kind", "namespace", "labels", "resources", "patches"}
    assert not unknown, f"render() does not implement {unknown}"
    objs: list[dict[str, Any]] = []
    for res in k["resources"]:
        path = directory / res
        objs += render(path) if path.is_dir() else load(path)
    for entry in k.get("patches", []):
        patch = yaml.safe_load(entry["patch"])
        assert set(entry) == {"patch"} and patch.pop("$patch") == "delete"
        gone = [o for o in objs if key(o) == key(patch) and o["apiVersion"] == patch["apiVersion"]]
        assert len(gone) == 1, patch
        objs.remove(gone[0])
    for obj in objs:
        meta = obj.setdefault("metadata", {})
        if "namespace" in k and obj["kind"] not in CLUSTER_SCOPED:
            meta["namespace"] = k["namespace"]
        for entry in k.get("labels", []):
            assert entry.get("includeSelectors") is False
            meta["labels"] = {**meta.get("labels", {}), **entry["pairs"]}
        if obj["kind"] == "ClusterRoleBinding" and "namespace" in k:
            for s in obj.get("subjects", []):
                s["namespace"] = k["namespace"]
    return objs


CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "MutatingWebhookConfiguration",
    "ClusterTrustBundle",
}


def key(obj: dict[str, Any]) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return (obj["kind"], meta.get("namespace", ""), meta["name"])


@pytest.fixture(scope="module", params=["k8s", "k8s/dev", "k8s/example"])
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    directory = K8S.parent / request.param
    return request.param, render(directory)


def test_kubectl_kustomize_renders_the_same_objects(rendered):
    name, objs = rendered
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        # Not a skip: the Python rendering above is the check; say what was not run.
        print(f"kubectl not installed: {name} rendered by the kustomize subset in this file only")
        return
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S.parent / name)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    theirs = {key(o): o for o in yaml.safe_load_all(out.stdout) if o}
    ours = {key(o): o for o in objs}
    assert theirs == ours


def test_every_object_is_valid_or_a_checked_crd(rendered):
    _, objs = rendered
    for obj in objs:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            assert obj["kind"] in ("Issuer", "Certificate")
            continue
        validate(obj)


def test_hand_written_pod_is_valid():
    (pod,) = load(K8S / "pod.yaml")
    validate(pod)


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def test_webhook_wiring():
    objs = render(K8S)
    (mwc,) = by_kind(objs, "MutatingWebhookConfiguration")
    (svc,) = by_kind(objs, "Service")
    (deploy,) = by_kind(objs, "Deployment")
    (pdb,) = by_kind(objs, "PodDisruptionBudget")
    certs = {o["metadata"]["name"]: o for o in by_kind(objs, "Certificate")}
    (hook,) = mwc["webhooks"]
    assert hook["sideEffects"] == "None" and hook["failurePolicy"] == "Fail"
    assert hook["reinvocationPolicy"] == "IfNeeded" and hook["admissionReviewVersions"] == ["v1"]
    ref = hook["clientConfig"]["service"]
    assert (ref["namespace"], ref["name"]) == (
        svc["metadata"]["namespace"],
        svc["metadata"]["name"],
    )
    assert ref["path"] == "/inject"  # the server's route
    (port,) = svc["spec"]["ports"]
    assert ref["port"] == port["port"]
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert port["targetPort"] in [p["name"] for p in container["ports"]]
    assert (
        svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    )
    assert pdb["spec"]["selector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
    assert deploy["spec"]["replicas"] == 2 and pdb["spec"]["minAvailable"] == 1
    # The serving certificate: cert-manager writes the Secret the Deployment mounts,
    # for the Service's DNS name, and injects its CA into the webhook configuration.
    serving = certs["trio-tproxy-webhook"]
    secret = deploy["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"]
    assert serving["spec"]["secretName"] == secret
    dns = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    assert dns in serving["spec"]["dnsNames"]
    ns, name = mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].split("/")
    assert (ns, name) == (serving["metadata"]["namespace"], "trio-tproxy-webhook")
    # The webhook's args are real flags of `trio-tproxy webhook`.
    args = cli.build_parser().parse_args(container["args"])
    assert args.func.__name__ == "cmd_webhook" and args.port == 8443
    # The example namespace carries the label the webhook selects.
    (example_ns,) = by_kind(render(K8S / "example"), "Namespace")
    selector = hook["namespaceSelector"]["matchLabels"]
    assert selector.items() <= example_ns["metadata"]["labels"].items()
    # The webhook's own namespace does not (failurePolicy Fail would deadlock it).
    (own_ns,) = by_kind(objs, "Namespace")
    assert not selector.items() <= own_ns["metadata"].get("labels", {}).items()


def sidecar_args_parse(args: list[str]) -> None:
    parsed, unknown = cli.build_parser().parse_known_args(args)
    assert parsed.func.__name__ == "cmd_run"
    assert all(u.startswith(FLAGS_FROM_ELSEWHERE) for u in unknown), unknown


def test_example_pods_injected_offline_and_by_the_webhook_are_valid():
    objs = render(K8S / "example")
    (mwc,) = by_kind(render(K8S), "MutatingWebhookConfiguration")
    config = InjectConfig()
    for deploy in by_kind(objs, "Deployment"):
        # Offline: the Deployment's template.
        result = inject_object(deploy, config)
        assert result.injected
        validate(result.obj)
        template = result.obj["spec"]["template"]
        sidecar = template["spec"]["initContainers"][0]
        sidecar_args_parse(sidecar["args"])
        # Admission: the pod the ReplicaSet controller creates from the template.
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {**deploy["spec"]["template"]["metadata"], "generateName": "x-"},
            "spec": deploy["spec"]["template"]["spec"],
        }
        status, body = review(json.dumps(admission_review(pod)).encode(), config)
        assert status == 200 and body["response"]["allowed"]
        patched = apply_patch(pod, decode_patch(body["response"]))
        validate(patched)
        assert patched["spec"] == template["spec"]
    assert mwc["webhooks"][0]["matchConditions"][0]["name"] == "not-opted-out"


def test_inject_fixture_outputs_have_parseable_sidecar_args():
    for golden in (Path(__file__).parent / "golden" / "inject").glob("*.yaml"):
        for obj in load(golden):
            for c in _pod_spec(obj).get("initContainers", []):
                if c["name"] == "trio-tproxy":
                    sidecar_args_parse(c["args"])


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "Pod":
        return dict(obj["spec"])
    if obj["kind"] == "CronJob":
        return dict(obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return dict(obj.get("spec", {}).get("template", {}).get("spec", {}))

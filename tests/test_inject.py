"""trio-tproxy inject: fixtures -> golden outputs, JSONPatch, idempotence, schemas.

Fixtures (tests/fixtures/inject): a plain pod, probes of each kind, an
existing init container, hostNetwork, annotations (tuned, opted out), and a
multi-document file with a Deployment, a Service and a CronJob.  Each is run
through the real command (``cli.main``) in both output modes; the pod output
must equal the golden file, the patch applied to the input must give the pod
output, the output must be valid for Kubernetes (tests/k8s_schema.py), and
injecting the output again must change nothing.

Regenerate the golden files with ``UPDATE_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from k8s_schema import apply_patch, validate

from trio_tproxy import cli
from trio_tproxy.inject import InjectConfig, inject_object, json_patch

FIXTURES = Path(__file__).parent / "fixtures" / "inject"
GOLDEN = Path(__file__).parent / "golden" / "inject"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.yaml"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}: run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from its golden file"


@pytest.mark.parametrize("name", NAMES)
def test_fixture_matches_golden_patch_agrees_and_output_is_valid(capsys, name):
    fixture = FIXTURES / f"{name}.yaml"
    code, pod_text, err = run(capsys, "inject", "-f", str(fixture))
    assert code == 0, err
    golden(f"{name}.yaml", pod_text)
    code, patch_text, _ = run(capsys, "inject", "-f", str(fixture), "-o", "patch")
    assert code == 0
    golden(f"{name}.patch.json", patch_text)
    inputs = [d for d in yaml.safe_load_all(fixture.read_text()) if d]
    outputs = list(yaml.safe_load_all(pod_text))
    patches = [json.loads(line) for line in patch_text.splitlines()]
    assert len(inputs) == len(outputs) == len(patches)
    for before, after, patch in zip(inputs, outputs, patches, strict=True):
        assert apply_patch(before, patch) == after
        validate(before)
        validate(after)
        # Idempotent: injecting the output changes nothing.
        again = inject_object(after, InjectConfig())
        assert not again.injected and again.obj == after
        assert json_patch(after, again.obj) == []
    # The same twice through the command: a second run is a no-op.
    out = GOLDEN / f"{name}.yaml"
    code, twice, _ = run(capsys, "inject", "-f", str(out))
    assert code == 0 and list(yaml.safe_load_all(twice)) == outputs


def sidecar_of(pod: dict) -> dict:
    first = pod["spec"]["initContainers"][0]
    assert first["name"] == "trio-tproxy"
    return first


def test_plain_pod_gets_a_native_sidecar_with_pod_certificate_credentials(capsys):
    code, text, _ = run(capsys, "inject", "-f", str(FIXTURES / "plain.yaml"))
    pod = yaml.safe_load(text)
    sidecar = sidecar_of(pod)
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"] == {
        "path": "/readyz",
        "port": 15020,
        "scheme": "HTTP",
    }
    sc = sidecar["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_BIND_SERVICE"]}
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert "--credential-bundle=/var/run/trio-tproxy/credentialbundle.pem" in sidecar["args"]
    assert "--ca-cert=/var/run/trio-tproxy/ca.crt" in sidecar["args"]
    volume = pod["spec"]["volumes"][-1]
    sources = volume["projected"]["sources"]
    assert sources[0]["podCertificate"] == {
        "signerName": "trio-tproxy.io/spiffe",
        "keyType": "ECDSAP256",
        "maxExpirationSeconds": 86400,
        "credentialBundlePath": "credentialbundle.pem",
    }
    assert sources[1]["clusterTrustBundle"]["path"] == "ca.crt"
    assert pod["metadata"]["annotations"]["trio-tproxy.io/status"] == "injected"


def test_probes_are_redirected_to_the_sidecar_probe_port(capsys):
    code, text, err = run(capsys, "inject", "-f", str(FIXTURES / "probes.yaml"))
    pod = yaml.safe_load(text)
    args = sidecar_of(pod)["args"]
    api, grpc, legacy = pod["spec"]["containers"]
    assert api["livenessProbe"] == {
        "periodSeconds": 10,
        "failureThreshold": 3,
        "httpGet": {"path": "/app-health/api-liveness", "port": 15021, "scheme": "HTTP"},
    }
    assert "--app-probe=api-liveness=http://127.0.0.1:8080/healthz" in args
    assert api["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"  # kept: see below
    assert "--exclude-inbound-port=8443" in args
    assert "--app-probe=api-startup=tcp://127.0.0.1:8080" in args
    assert "--app-probe=grpc-liveness=grpc://127.0.0.1:9090/health" in args
    assert "--app-probe=grpc-readiness=grpc://127.0.0.1:9090" in args
    assert grpc["startupProbe"] == {"exec": {"command": ["/bin/true"]}}  # untouched
    # Custom headers cannot be forwarded: probe kept, its port left in plaintext.
    assert legacy["livenessProbe"]["httpGet"]["port"] == 7070
    assert "--exclude-inbound-port=7070" in args
    assert "legacy-liveness probe has custom headers" in err
    assert "api-readiness probe has an HTTPS scheme" in err


def test_existing_init_container_stays_after_the_sidecar(capsys):
    _, text, _ = run(capsys, "inject", "-f", str(FIXTURES / "init-container.yaml"))
    pod = yaml.safe_load(text)
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["trio-tproxy", "schema"]
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["scratch", "trio-tproxy-credentials"]


def test_host_network_and_opt_out_are_skipped_with_a_reason(capsys):
    _, text, err = run(capsys, "inject", "-f", str(FIXTURES / "host-network.yaml"))
    assert yaml.safe_load(text) == yaml.safe_load((FIXTURES / "host-network.yaml").read_text())
    assert "skipped: Pod kube-system/node-agent: hostNetwork pod skipped" in err
    _, text, err = run(capsys, "inject", "-f", str(FIXTURES / "annotations.yaml"))
    tuned, opted_out, csi = yaml.safe_load_all(text)
    assert csi["spec"]["volumes"][-1]["csi"] == {
        "driver": "spiffe.csi.cert-manager.io",
        "readOnly": True,
    }
    assert "--cert=/var/run/trio-tproxy/tls.crt" in sidecar_of(csi)["args"]
    assert "initContainers" not in opted_out["spec"]
    assert 'annotation trio-tproxy.io/inject is "false"' in err
    args = sidecar_of(tuned)["args"]
    for arg in (
        "--cert=/var/run/trio-tproxy/tls.crt",
        "--exclude-inbound-port=9100",
        "--exclude-inbound-port=9101",
        "--exclude-outbound-port=5432",
        "--exclude-cidr=10.96.0.1/32",
        "--exclude-cidr=fd00::1/128",
        "--inbound-mode=permissive",
        "-v=1",
    ):
        assert arg in args, arg
    assert tuned["spec"]["volumes"][-1]["secret"]["secretName"] == "tuned-spiffe-tls"


def test_workload_templates_are_injected_and_other_kinds_pass_through(capsys):
    _, text, _ = run(capsys, "inject", "-f", str(FIXTURES / "deployment.yaml"))
    deployment, service, cronjob = yaml.safe_load_all(text)
    sidecar_of(deployment["spec"]["template"])
    assert service == list(yaml.safe_load_all((FIXTURES / "deployment.yaml").read_text()))[1]
    sidecar_of(cronjob["spec"]["jobTemplate"]["spec"]["template"])


def test_stdin_and_a_list(capsys, monkeypatch):
    import io

    pod = yaml.safe_load((FIXTURES / "plain.yaml").read_text())
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"kind": "List", "items": [pod]})))
    code, text, _ = run(capsys, "inject", "-f", "-")
    assert code == 0
    sidecar_of(yaml.safe_load(text)["items"][0])


@pytest.mark.parametrize(
    ("annotation", "value", "message"),
    [
        ("exclude-inbound-ports", "80,http", "invalid port 'http'"),
        ("exclude-cidrs", "10.0.0.0/33", "invalid CIDR '10.0.0.0/33'"),
        ("inbound-mode", "open", "'open' is not strict or permissive"),
        ("verbosity", "high", "'high' is not a number"),
        ("credentials", "vault", "'vault' is not pod-certificate or csi-spiffe"),
    ],
)
def test_bad_annotation_is_one_line_exit_2(capsys, tmp_path, annotation, value, message):
    pod = yaml.safe_load((FIXTURES / "plain.yaml").read_text())
    pod["metadata"]["annotations"] = {f"trio-tproxy.io/{annotation}": value}
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(pod))
    code, out, err = run(capsys, "inject", "-f", str(path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(
        "trio-tproxy inject: error: inject: Pod prod/web"
    )
    assert message in err


def test_not_yaml_is_one_line(capsys, tmp_path):
    (tmp_path / "x.yaml").write_text("a: [1,\n")
    code, _, err = run(capsys, "inject", "-f", str(tmp_path / "x.yaml"))
    assert code == 2 and "not YAML" in err and err.count("\n") == 1


def test_run_does_not_load_yaml():
    # `run` builds the same parser; YAML is imported only by `inject`.
    code = (
        "import sys; from trio_tproxy import cli; cli.build_parser(); print('yaml' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

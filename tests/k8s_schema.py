"""Validation against the Kubernetes OpenAPI schemas, offline (kubernetes-validate).

Pinned to Kubernetes 1.35, the release in which podCertificate projected
volumes (KEP-4317) went beta: the first schema that knows every field the
injected pods use.  Strict: an unknown field (a typo) is an error, as it is
for ``kubectl apply --validate=strict``.
"""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import kubernetes_validate

K8S_VERSION = "1.35.0"


def validate(obj: dict[str, Any]) -> None:
    """Raise with the object's kind/name and the schema's message if ``obj`` is invalid."""
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        meta = obj.get("metadata") or {}
        raise AssertionError(
            f"{obj.get('kind')} {meta.get('name')}: invalid for Kubernetes {K8S_VERSION}: "
            f"{exc.message} at {'/'.join(map(str, exc.path))}"
        ) from None


def apply_patch(doc: Any, patch: list[dict[str, Any]]) -> Any:
    """RFC 6902 add/remove/replace (what our patches use), written independently of
    trio_tproxy.inject.json_patch so a test can check one against the other."""
    doc = copy.deepcopy(doc)
    for op in patch:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        if op["op"] == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), op["value"])
            else:
                parent[last] = op["value"]
        elif op["op"] == "replace":
            if isinstance(parent, list):
                parent[int(last)] = op["value"]
            else:
                assert last in parent, op
                parent[last] = op["value"]
        elif op["op"] == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        else:
            raise AssertionError(f"unexpected op {op}")
    return doc


def decode_patch(response: dict[str, Any]) -> list[dict[str, Any]]:
    assert response["patchType"] == "JSONPatch"
    patch: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"], validate=True))
    return patch

"""``trio-tproxy webhook``: the mutating admission webhook that injects the sidecar.

The API server POSTs an ``admission.k8s.io/v1`` AdmissionReview to
``/inject``; we answer with the same UID, ``allowed: true`` and a base64
JSONPatch (``patchType: JSONPatch``) computed by :mod:`.inject` (the same
code as the offline ``trio-tproxy inject``).  A pod we skip (opt-out
annotation, ``hostNetwork``) is allowed unchanged with a warning the user's
``kubectl`` prints; an already injected pod (reinvocation) is allowed
silently; a pod whose ``trio-tproxy.io/`` annotations are invalid is denied
with the reason (a typo must not silently yield a pod without the mesh).
Anything that is not an AdmissionReview is a 400 with the reason, never a
crash: :func:`review` is pure (bytes in, status and JSON out) and tested
without sockets.

Transport: :mod:`.httpserver` (trio + h11; bounded header and body sizes,
request/idle/handler timeouts, connection cap) wrapped in TLS by its ``wrap``
hook with the standard library's ``ssl`` and ``trio.SSLStream``.  Not
pyOpenSSL: this is the API server talking to a Service with an ordinary
server certificate (no client certificates, no SPIFFE checks, no half-close
semantics), exactly what ``ssl`` does well, and it keeps the mesh data path's
TLS code out of the webhook.  The serving certificate (``tls.crt``/``tls.key``
from a cert-manager Secret or ``trio-tproxy certs``) is hot-reloaded by the
same watcher as the sidecar's (:mod:`.reload`): each new connection takes the
context current at its accept.

``/healthz``: the process serves.  ``/readyz``: a serving certificate is
loaded and valid now (an expired one would fail every admission call).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import functools
import json
import logging
import signal
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from cryptography import x509

from .config import ConfigError
from .httpserver import Handler, HttpServer, Limits, Request, Response, method_not_allowed, text
from .inject import InjectConfig, InjectError, inject_object, json_patch
from .k8scli import add_inject_flags, inject_config_from
from .pem import key_matches, read_certs, read_key

__all__ = ["ServingCert", "load_serving_cert", "register", "review"]

log = logging.getLogger("trio_tproxy")

#: An AdmissionReview holds the object (and for updates the old one); the API
#: server caps objects at ~1.5 MiB (etcd), so 3 MiB bounds every real request.
MAX_REVIEW_BYTES = 3 * 1024 * 1024
JSON = "application/json"


# --- the pure part -------------------------------------------------------------------


def _bad(reason: str) -> tuple[int, dict[str, Any]]:
    return 400, {"error": reason}


def review(body: bytes, config: InjectConfig) -> tuple[int, dict[str, Any]]:
    """An AdmissionReview request body -> (HTTP status, JSON to send)."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return _bad(f"body is not JSON: {exc}")
    if not isinstance(doc, dict):
        return _bad("body is not a JSON object")
    if doc.get("apiVersion") != "admission.k8s.io/v1" or doc.get("kind") != "AdmissionReview":
        return _bad(
            "not an admission.k8s.io/v1 AdmissionReview "
            f"(apiVersion={doc.get('apiVersion')!r}, kind={doc.get('kind')!r})"
        )
    request = doc.get("request")
    if not isinstance(request, dict):
        return _bad("AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        return _bad("AdmissionReview request has no uid")
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    obj = request.get("object")
    operation = request.get("operation", "CREATE")
    if operation == "CREATE" and isinstance(obj, dict):
        if "namespace" not in (obj.get("metadata") or {}) and request.get("namespace"):
            # The API server fills metadata.namespace after admission: name it for logs.
            obj_for_names = {
                **obj,
                "metadata": {**obj.get("metadata", {}), "namespace": request["namespace"]},
            }
        else:
            obj_for_names = obj
        try:
            result = inject_object(obj_for_names, config)
        except InjectError as exc:
            response["allowed"] = False
            response["status"] = {"code": 400, "message": f"trio-tproxy: {exc}"}
        else:
            if result.injected:
                # Both sides have the borrowed namespace: the patch never touches it.
                patch = json_patch(obj_for_names, result.obj)
                response["patchType"] = "JSONPatch"
                response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
            warnings = list(result.warnings)
            if result.reason and "already injected" not in result.reason:
                warnings.append(f"trio-tproxy: not injected: {result.reason}")
            if warnings:
                response["warnings"] = warnings
    return 200, {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }


# --- serving certificate ---------------------------------------------------------------


@dataclass(frozen=True)
class ServingCert:
    """The webhook's certificate and the ``ssl`` context serving it."""

    cert: x509.Certificate
    context: ssl.SSLContext = field(repr=False)

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    def describe(self) -> str:
        return (
            f"serving certificate serial {self.cert.serial_number:x}, "
            f"valid until {self.not_after:%Y-%m-%d %H:%M:%S} UTC"
        )


def load_serving_cert(cert_path: Path, key_path: Path) -> ServingCert:
    """Read and check the serving certificate; ConfigError names the bad file."""
    certs = read_certs(cert_path, what="webhook certificate file")
    key = read_key(key_path, what="webhook key file")
    if not key_matches(certs[0], key):
        raise ConfigError(f"webhook key file {key_path} does not match {cert_path}")
    now = dt.datetime.now(dt.UTC)
    if not certs[0].not_valid_before_utc <= now <= certs[0].not_valid_after_utc:
        raise ConfigError(f"webhook certificate file {cert_path}: not valid now")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert_path), str(key_path))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"webhook certificate {cert_path}: {exc}") from None
    # load_cert_chain read the files again: refuse a rotation between the two reads.
    if not key_matches(read_certs(cert_path)[0], key):
        raise ConfigError(f"webhook certificate {cert_path} changed while loading")
    return ServingCert(certs[0], ctx)


# --- the server --------------------------------------------------------------------------


class Webhook:
    def __init__(self, config: InjectConfig, serving: ServingCert) -> None:
        self.config = config
        self.serving = serving
        self.reviews = 0

    def use(self, serving: ServingCert) -> None:
        self.serving = serving  # new connections only: each took its context at accept

    async def wrap(self, stream: trio.SocketStream) -> trio.SSLStream[trio.SocketStream]:
        tls = trio.SSLStream(stream, self.serving.context, server_side=True)
        await tls.do_handshake()
        return tls

    async def inject(self, req: Request) -> Response:
        if req.method != "POST":
            return method_not_allowed(("POST",))
        status, body = review(req.body, self.config)
        self.reviews += 1
        if status != 200:
            log.warning("admission request from %s refused: %s", req.client[0], body["error"])
        else:
            r = body["response"]
            log.info(
                "admission uid=%s allowed=%s patched=%s%s",
                r["uid"],
                r["allowed"],
                "patch" in r,
                "".join(f" warning={w!r}" for w in r.get("warnings", [])),
            )
        return Response(status, [("content-type", JSON)], json.dumps(body).encode())

    async def healthz(self, req: Request) -> Response:
        return text(200, "ok\n")

    async def readyz(self, req: Request) -> Response:
        now = dt.datetime.now(dt.UTC)
        if now > self.serving.not_after:
            return text(503, f"{self.serving.describe()}: expired\n")
        return text(200, "ok\n")

    def server(self, limits: Limits) -> HttpServer:
        routes: dict[str, Handler] = {
            "/inject": self.inject,
            "/healthz": self.healthz,
            "/readyz": self.readyz,
        }
        return HttpServer(routes, limits=limits, wrap=self.wrap, name="webhook")


async def serve(
    args: argparse.Namespace,
    config: InjectConfig,
    serving: ServingCert,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    from . import reload

    hook = Webhook(config, serving)
    limits = Limits(
        max_body_bytes=args.max_request_bytes,
        request_timeout=args.request_timeout,
        handler_timeout=args.request_timeout,
    )
    server = hook.server(limits)
    watcher = reload.CredentialWatcher(
        (args.tls_cert, args.tls_key),
        functools.partial(load_serving_cert, args.tls_cert, args.tls_key),
        serving,
        hook.use,
        poll=args.credential_poll,
    )
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.watch)
            hosts = args.host or ["0.0.0.0", "::"]
            bound = await nursery.start(server.serve, [(h, args.port) for h in hosts])
            log.info(
                "webhook ready: https on %s, %s",
                " ".join(f"{h}:{p}" for h, p in bound),
                serving.describe(),
            )
            task_status.started(bound)
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    log.info("SIGHUP received: reloading the serving certificate")
                    watcher.request()
                    continue
                log.info("%s received: shutting down", name)
                server.stop()  # in-flight reviews finish; then serve() returns
                break
            nursery.cancel_scope.cancel()


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    p = subparsers.add_parser(
        "webhook",
        help="serve the mutating admission webhook that injects the sidecar (HTTPS)",
        description="Serve POST /inject (admission.k8s.io/v1 AdmissionReview -> JSONPatch), "
        "GET /healthz and /readyz over HTTPS. The serving certificate is reloaded when its "
        "files change or on SIGHUP.",
    )
    p.add_argument("--tls-cert", type=Path, required=True, help="serving certificate (PEM)")
    p.add_argument("--tls-key", type=Path, required=True, help="its private key (PEM)")
    p.add_argument(
        "--host",
        action="append",
        default=None,
        help="address to listen on, repeatable (default 0.0.0.0 and ::, each family its own "
        "socket: the Service may reach the pod over either)",
    )
    p.add_argument("--port", type=int, default=8443, help="port (default 8443)")
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=MAX_REVIEW_BYTES,
        help=f"largest AdmissionReview accepted, 413 beyond (default {MAX_REVIEW_BYTES})",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=10.0,
        help="seconds to receive a request and to answer it (default 10; the API server's "
        "own timeoutSeconds is at most 30)",
    )
    p.add_argument(
        "--credential-poll",
        type=float,
        default=2.0,
        help="seconds between looks at the certificate files (default 2)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0)
    add_inject_flags(p)
    p.set_defaults(func=cmd_webhook)


def cmd_webhook(args: argparse.Namespace) -> int:
    config = inject_config_from(args)
    serving = load_serving_cert(args.tls_cert, args.tls_key)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose >= 2 else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    trio.run(serve, args, config, serving)
    return 0

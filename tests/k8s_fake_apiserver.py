"""A FAKE kube-apiserver on loopback, for testing the submit path where no real one can run.

It serves the few endpoints `tprun.submit(..., backend="kubernetes")` uses, validates every body it
is sent the way the real API server would (the OpenAPI schema, strictly, and the field rules of
tprun.cluster.k8s_checks), answers with the API's status codes and Status objects, and records
every request. Nothing plays the Job controller: a test moves a Job along with `set_job_status`
and `add_pod`.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate

from tprun.cluster.k8s_checks import check_manifests

SCHEMA_VERSION = "1.31.0"
ROUTES = {  # (API prefix, plural) -> (apiVersion, kind)
    ("/api/v1", "configmaps"): ("v1", "ConfigMap"),
    ("/api/v1", "services"): ("v1", "Service"),
    ("/api/v1", "pods"): ("v1", "Pod"),
    ("/apis/batch/v1", "jobs"): ("batch/v1", "Job"),
    ("/apis/networking.k8s.io/v1", "networkpolicies"): ("networking.k8s.io/v1", "NetworkPolicy"),
}
PATH = re.compile(r"^(?P<prefix>/api/v1|/apis/batch/v1|/apis/networking\.k8s\.io/v1)/namespaces/(?P<ns>[^/]+)/(?P<plural>[a-z]+)"
                  r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>status|log))?$")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    content_type: str | None
    body: Any


@dataclass
class FakeApiServer:
    objects: dict[tuple[str, str, str], dict] = field(default_factory=dict)  # (plural, ns, name) -> obj
    pod_logs: dict[tuple[str, str], str] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    failures: dict[tuple[str, str], tuple[int, str, str]] = field(default_factory=dict)  # see fail()
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> FakeApiServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_PATCH(self) -> None:
                fake._handle(self, "PATCH")

            def do_DELETE(self) -> None:
                fake._handle(self, "DELETE")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    # --- what a test does in place of the Job controller and kubelet ---

    def set_job_status(self, namespace: str, name: str, status: dict) -> None:
        with self.lock:
            self.objects[("jobs", namespace, name)]["status"] = status

    def add_pod(self, namespace: str, job: dict, index: int, phase: str, log: str) -> None:
        name = f"{job['metadata']['name']}-{index}-{uuid.uuid4().hex[:5]}"
        labels = {**job["spec"]["template"]["metadata"]["labels"],
                  "batch.kubernetes.io/job-name": job["metadata"]["name"],
                  "batch.kubernetes.io/job-completion-index": str(index)}
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": namespace, "labels": labels,
                            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
               "spec": job["spec"]["template"]["spec"], "status": {"phase": phase}}
        with self.lock:
            self.objects[("pods", namespace, name)] = pod
            self.pod_logs[(namespace, name)] = log

    def fail(self, method: str, plural: str, code: int, reason: str, message: str) -> None:
        """The next `method` on `plural` is refused, as RBAC or an admission webhook would."""
        self.failures[(method, plural)] = (code, reason, message)

    def created(self, kind: str | None = None) -> list[dict]:
        return [r.body for r in self.requests if r.method == "POST"
                and (kind is None or r.body.get("kind") == kind)]

    # --- the API ---

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return self._status(h, 400, "BadRequest", "request body is not JSON")
        with self.lock:
            self.requests.append(Request(method, url.path, query, h.headers.get("Content-Type"), body))
        m = PATH.match(url.path)
        if not m or (m["prefix"], m["plural"]) not in ROUTES:
            return self._status(h, 404, "NotFound", f"the server could not find the requested resource {url.path}")
        key = (m["plural"], m["ns"], m["name"])
        with self.lock:
            if (method, m["plural"]) in self.failures:
                return self._status(h, *self.failures.pop((method, m["plural"])))
            if method == "POST" and not m["name"]:
                return self._create(h, m, body)
            if method == "GET" and not m["name"]:
                return self._list(h, m, query)
            obj = self.objects.get(key)
            if obj is None:
                return self._status(h, 404, "NotFound", f'{m["plural"]} "{m["name"]}" not found')
            if method == "GET" and m["sub"] == "log":
                return self._send(h, 200, self.pod_logs.get((m["ns"], m["name"]), ""), "text/plain")
            if method == "GET":
                return self._send(h, 200, obj)
            if method == "PATCH":
                return self._patch(h, key, obj, body, h.headers.get("Content-Type", ""))
            if method == "DELETE":
                return self._delete(h, key, obj, body, query)
        return self._status(h, 405, "MethodNotAllowed", f"{method} {url.path}")

    def _create(self, h: BaseHTTPRequestHandler, m: re.Match, body: Any) -> None:
        api_version, kind = ROUTES[(m["prefix"], m["plural"])]
        if not isinstance(body, dict) or body.get("apiVersion") != api_version or body.get("kind") != kind:
            return self._status(h, 400, "BadRequest", f"expected a {api_version} {kind}")
        meta = body.get("metadata", {})
        if meta.get("namespace", m["ns"]) != m["ns"]:
            return self._status(h, 400, "BadRequest", "the namespace of the object does not match the request")
        problems = [e.message for e in _schema_errors(body)] + check_manifests([body])
        if problems:
            return self._status(h, 422, "Invalid", "; ".join(problems))
        key = (m["plural"], m["ns"], meta["name"])
        if key in self.objects:
            return self._status(h, 409, "AlreadyExists", f'{m["plural"]} "{meta["name"]}" already exists')
        stored = json.loads(json.dumps(body))
        stored["metadata"] = {**meta, "namespace": m["ns"], "uid": str(uuid.uuid4()), "resourceVersion": "1",
                              "creationTimestamp": "2026-01-01T00:00:00Z"}
        if kind == "Job":
            stored["status"] = {}
        self.objects[key] = stored
        self._send(h, 201, stored)

    def _list(self, h: BaseHTTPRequestHandler, m: re.Match, query: dict[str, str]) -> None:
        selector = dict(term.split("=", 1) for term in query.get("labelSelector", "").split(",") if term)
        items = [o for (plural, ns, _), o in self.objects.items() if plural == m["plural"] and ns == m["ns"]
                 and all(o["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())]
        kind = ROUTES[(m["prefix"], m["plural"])][1]
        self._send(h, 200, {"apiVersion": "v1", "kind": f"{kind}List", "metadata": {"resourceVersion": "1"},
                            "items": items})

    def _patch(self, h: BaseHTTPRequestHandler, key: tuple, obj: dict, body: Any, ctype: str) -> None:
        if "merge-patch" not in ctype or not isinstance(body, dict):
            return self._status(h, 415, "UnsupportedMediaType", f"this fake takes merge patches, got {ctype!r}")
        merged = _merge(obj, body)
        problems = [e.message for e in _schema_errors(merged)] + check_manifests([merged])
        if problems:
            return self._status(h, 422, "Invalid", "; ".join(problems))
        self.objects[key] = merged
        self._send(h, 200, merged)

    def _delete(self, h: BaseHTTPRequestHandler, key: tuple, obj: dict, body: Any, query: dict) -> None:
        policy = query.get("propagationPolicy") or (body or {}).get("propagationPolicy")
        if policy not in (None, "Orphan", "Background", "Foreground"):
            return self._status(h, 400, "BadRequest", f"propagationPolicy {policy!r} is not supported")
        if key[0] == "jobs" and policy == "Foreground":
            # The garbage collector removes the Job only after its pods; until then it is "deleting".
            obj["metadata"].update(deletionTimestamp="2026-01-01T00:00:01Z", finalizers=["foregroundDeletion"])
            for pod_key in [k for k, o in self.objects.items() if k[0] == "pods" and k[1] == key[1]
                            and o["metadata"]["labels"].get("batch.kubernetes.io/job-name") == key[2]]:
                del self.objects[pod_key]
            return self._send(h, 200, obj)
        del self.objects[key]
        if key[0] == "configmaps":  # as the real server: a Status for ConfigMaps, the object for the others
            return self._send(h, 200, {"kind": "Status", "apiVersion": "v1", "status": "Success",
                                       "details": {"name": key[2], "kind": key[0]}})
        self._send(h, 200, obj)

    def _status(self, h: BaseHTTPRequestHandler, code: int, reason: str, message: str) -> None:
        self._send(h, code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                             "message": message, "reason": reason, "code": code})

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, payload: Any, ctype: str = "application/json") -> None:
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


def _schema_errors(obj: dict) -> list:
    try:
        kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)
        return []
    except kubernetes_validate.ValidationError as e:
        return [e]


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out

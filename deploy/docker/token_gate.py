"""Token gate: the pod's only client-facing port, in front of TorchServe's token-protected inference API.

Why it exists: TorchServe 0.12 generates random tokens per process at start (``key_file.json``) and
offers no way to supply them. Behind a Kubernetes Service with several replicas a client cannot know
which pod, hence which token, will answer. The gate makes token auth work across replicas:

- clients (the namespace gateway) send ``Authorization: Bearer <client token>``, where the client token
  comes from a Kubernetes Secret mounted at ``GATE_CLIENT_TOKENS_FILE`` (one token per line, so a
  rotation can accept old and new token together); the comparison is constant-time;
- the gate replaces it with this pod's current TorchServe inference token (read from the shared
  ``key_file.json`` and rotated before expiry, see ts_tokens.py) and forwards to TorchServe on loopback;
- only inference routes are forwarded: ``/predictions/*``, ``/explanations/*`` and the KServe v1 routes
  ``/v1/models/<name>[:predict|:explain]``; management is never reachable through the gate;
- ``/healthz`` (no auth) says the gate process is serving; ``/readyz`` (no auth) answers 200 only if
  TorchServe answers an authorised ``/ping`` with "Healthy". Neither reveals a token.

Environment: GATE_LISTEN (default 0.0.0.0:8090), TS_INFERENCE_URL (http://127.0.0.1:8080), TS_KEY_FILE,
TS_MANAGEMENT_URL, GATE_CLIENT_TOKENS_FILE, GATE_MAX_BODY (bytes, default TorchServe's 6553500),
GATE_TIMEOUT (seconds, default 120). Stdlib only.
"""

from __future__ import annotations

import hmac
import http.client
import json
import os
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from ts_tokens import DEFAULT_INFERENCE_URL, TokenError, TokenSource, http_request, token_source_from_env

FORWARDED_ROUTES = re.compile(
    r"^/(predictions|explanations)/[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?/?(\?.*)?$"
    r"|^/v1/models/[A-Za-z0-9][A-Za-z0-9_.\-]*(:predict|:explain)?(\?.*)?$"
    r"|^/v2/models/[A-Za-z0-9][A-Za-z0-9_.\-]*/(infer|explain)(\?.*)?$"
)
# Request headers passed on to TorchServe; everything else (Authorization, hop-by-hop, Host) is dropped.
FORWARDED_REQUEST_HEADERS = (
    "content-type", "accept", "explain", "x-request-id", "traceparent", "inference-header-content-length",
)
FORWARDED_RESPONSE_HEADERS = ("content-type", "x-request-id")


def load_client_tokens(path: str | Path) -> list[str]:
    """Accepted client tokens: one per non-empty, non-comment line. Missing file -> no token accepted."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def client_authorised(header: str | None, accepted: list[str]) -> bool:
    """Constant-time check of an ``Authorization: Bearer ...`` header against the accepted tokens."""
    match = re.fullmatch(r"Bearer\s+(\S+)", (header or "").strip())
    if not match or not accepted:
        return False
    presented = match.group(1).encode()
    # Compare against every token (no early exit) so timing does not reveal which one matched.
    results = [hmac.compare_digest(presented, token.encode()) for token in accepted]
    return any(results)


class GateHandler(BaseHTTPRequestHandler):
    server_version = "torchserve-cam-gate"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    # Set on the class by make_server().
    tokens: TokenSource
    inference_url: str
    client_tokens_file: str
    max_body: int
    timeout_s: float

    def log_message(self, fmt: str, *args) -> None:  # one line per request, no headers (they hold tokens)
        sys.stderr.write(f"gate {self.address_string()} {fmt % args}\n")

    def _reply(self, status: int, payload: dict | bytes, content_type: str = "application/json",
               extra: dict[str, str] | None = None) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, kind: str, message: str) -> None:
        self._reply(status, {"code": status, "type": kind, "message": message})

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if self.path == "/healthz":
            self._reply(200, {"status": "ok"})
        elif self.path == "/readyz":
            self._readyz()
        else:
            self._forward()

    def do_POST(self) -> None:  # noqa: N802
        self._forward()

    do_PUT = do_POST

    def _readyz(self) -> None:
        marker = Path(self.tokens.key_file).parent / "draining"  # shared run volume, see probe.py drain
        if marker.exists():  # probe.py drain (preStop) runs: leave the Service's endpoints first
            self._reply(503, {"status": "draining"})
            return
        try:
            status, body = http_request(self.inference_url, "/ping", self.tokens.get("inference"), timeout=3)
            healthy = status == 200 and json.loads(body or b"{}").get("status") == "Healthy"
        except (TokenError, OSError, ValueError):
            healthy = False
        self._reply(200 if healthy else 503, {"status": "ready" if healthy else "not ready"})

    def _forward(self) -> None:
        if not client_authorised(self.headers.get("Authorization"), load_client_tokens(self.client_tokens_file)):
            self._error(401, "Unauthorized", "missing or invalid bearer token")
            return
        if not FORWARDED_ROUTES.match(self.path):
            self._error(404, "NotFound", "only inference routes are served here")
            return
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._error(411, "LengthRequired", "send a Content-Length; chunked bodies are not accepted")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.max_body:
            self._error(413, "RequestTooLarge", f"body of {length} bytes exceeds {self.max_body}")
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else None
        headers = {name: self.headers[name] for name in FORWARDED_REQUEST_HEADERS if self.headers.get(name)}
        try:
            status, upstream_headers, payload = self._send_upstream(body, headers)
        except (TokenError, OSError) as exc:
            self.log_message("upstream failure: %s", exc)
            self._error(503, "ServiceUnavailable", "model server is not reachable")
            return
        self._reply(status, payload, upstream_headers.get("content-type", "application/json"),
                    {k: v for k, v in upstream_headers.items() if k in FORWARDED_RESPONSE_HEADERS
                     and k != "content-type"})

    def _send_upstream(self, body: bytes | None, headers: dict[str, str]):
        parts = urlsplit(self.inference_url)
        for attempt in range(2):
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.timeout_s)
            try:
                conn.request(self.command, self.path, body=body,
                             headers={**headers, "Authorization": f"Bearer {self.tokens.get('inference')}"})
                response = conn.getresponse()
                payload = response.read()
                upstream_headers = {k.lower(): v for k, v in response.getheaders()}
            finally:
                conn.close()
            # A key rotated between our read and TorchServe's check: re-read the key file and retry once.
            if attempt == 0 and response.status == 400 and b"InvalidKeyException" in payload:
                continue
            return response.status, upstream_headers, payload
        return response.status, upstream_headers, payload


def make_server(listen: str, tokens: TokenSource, inference_url: str, client_tokens_file: str,
                max_body: int = 6553500, timeout_s: float = 120.0) -> ThreadingHTTPServer:
    host, _, port = listen.rpartition(":")
    handler = type("ConfiguredGateHandler", (GateHandler,), {
        "tokens": tokens, "inference_url": inference_url, "client_tokens_file": client_tokens_file,
        "max_body": max_body, "timeout_s": timeout_s,
    })
    server = ThreadingHTTPServer((host, int(port)), handler)
    server.daemon_threads = True
    return server


def main() -> int:
    tokens_file = os.environ.get("GATE_CLIENT_TOKENS_FILE", "/var/run/secrets/torchserve-cam/client-tokens")
    if not load_client_tokens(tokens_file):
        print(f"token gate: no client token in {tokens_file}; refusing to start", file=sys.stderr)
        return 1
    server = make_server(
        os.environ.get("GATE_LISTEN", "0.0.0.0:8090"), token_source_from_env(),
        os.environ.get("TS_INFERENCE_URL", DEFAULT_INFERENCE_URL), tokens_file,
        int(os.environ.get("GATE_MAX_BODY", "6553500")), float(os.environ.get("GATE_TIMEOUT", "120")),
    )
    print(f"token gate listening on {server.server_address}", file=sys.stderr)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Health probe for TorchServe with token authorization on (exec probe, Docker HEALTHCHECK).

    python probe.py live    # GET /ping on the inference port with the inference token -> "Healthy"
    python probe.py ready   # every model (TS_MODELS, or all registered) has at least one READY worker
    python probe.py drain   # preStop: turn readiness false, wait, then until every accepted request is answered

``/ping`` answers 400 without the per-process inference token, and ``/ping`` is 200 about 1 s after
start, long before a model's worker is READY (4-5 s for EfficientNet-Lite0, longer on a cold GPU), so
readiness and startup look at worker state on the loopback management port instead.

The probe runs inside the TorchServe container, as the same user, and reads the tokens from
``key_file.json`` (``TS_KEY_FILE``); it rotates an expiring token with the API key (see ts_tokens.py).
No token ever leaves the pod or appears in the pod spec. Exit status 0 = healthy, 1 = not.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ts_tokens import (
    DEFAULT_INFERENCE_URL,
    DEFAULT_KEY_FILE,
    TokenError,
    TokenSource,
    http_request,
    token_source_from_env,
)


def _authorised_get(tokens: TokenSource, kind: str, url: str, path: str, timeout: float) -> tuple[int, bytes]:
    status, body = http_request(url, path, tokens.get(kind), timeout=timeout)
    if status in (400, 401):  # the key file may have been rotated between reading and sending: re-read once
        status, body = http_request(url, path, tokens.get(kind), timeout=timeout)
    return status, body


def check_live(tokens: TokenSource, inference_url: str, timeout: float = 3.0) -> tuple[bool, str]:
    status, body = _authorised_get(tokens, "inference", inference_url, "/ping", timeout)
    if status != 200:
        return False, f"/ping answered HTTP {status}: {body[:200]!r}"
    health = json.loads(body or b"{}").get("status")
    return health == "Healthy", f"/ping status {health!r}"


def check_ready(tokens: TokenSource, models: list[str], timeout: float = 3.0) -> tuple[bool, str]:
    if not models:
        status, body = _authorised_get(tokens, "management", tokens.management_url, "/models", timeout)
        if status != 200:
            return False, f"GET /models answered HTTP {status}: {body[:200]!r}"
        models = [entry["modelName"] for entry in json.loads(body).get("models", [])]
        if not models:
            return False, "no model is registered yet"
    for name in models:
        status, body = _authorised_get(tokens, "management", tokens.management_url, f"/models/{name}", timeout)
        if status != 200:
            return False, f"GET /models/{name} answered HTTP {status}"
        versions = json.loads(body)
        ready = sum(1 for version in versions for worker in version.get("workers", [])
                    if worker.get("status") == "READY")
        if ready == 0:
            return False, f"model {name} has no READY worker"
    return True, f"READY: {', '.join(models)}"


def drain_marker() -> Path:
    """The file whose presence makes readiness (``ready``, the gate's ``/readyz``) answer "draining"."""
    return Path(os.environ.get("TS_KEY_FILE", DEFAULT_KEY_FILE)).parent / "draining"


def drain(tokens: TokenSource, inference_url: str, delay: float, grace: float) -> tuple[bool, str]:
    """preStop: readiness turns false, ``delay`` s for the Service to stop routing here, then wait (at most
    ``grace`` s) until no request is queued and one barrier request per model (an empty body, answered 400
    by the handler at once) has come back: every request accepted before it has then been answered."""
    drain_marker().write_text("draining\n")
    time.sleep(delay)
    deadline = time.monotonic() + grace
    status, body = _authorised_get(tokens, "management", tokens.management_url, "/models", 5)
    models = [m["modelName"] for m in json.loads(body).get("models", [])] if status == 200 else []
    for name in models:
        while True:
            status, body = _authorised_get(tokens, "management", tokens.management_url, f"/models/{name}", 5)
            pending = sum(v.get("jobQueueStatus", {}).get("pendingRequests", 0) for v in json.loads(body)) if status == 200 else 0
            if pending == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        http_request(inference_url, f"/predictions/{name}", tokens.get("inference"), method="POST", body=b"",
                     headers={"Content-Type": "application/octet-stream"}, timeout=max(1.0, deadline - time.monotonic()))
    time.sleep(1.0)  # the gate relays the last answers
    return time.monotonic() <= deadline, f"drained {', '.join(models) or 'nothing'}"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in {"live", "ready", "startup", "drain"}:
        print("usage: probe.py live|ready|startup|drain", file=sys.stderr)
        return 2
    tokens = token_source_from_env()
    models = [m for m in os.environ.get("TS_MODELS", "").split(",") if m]
    try:
        if argv[0] == "live":
            ok, message = check_live(tokens, os.environ.get("TS_INFERENCE_URL", DEFAULT_INFERENCE_URL))
        elif argv[0] == "drain":
            ok, message = drain(tokens, os.environ.get("TS_INFERENCE_URL", DEFAULT_INFERENCE_URL),
                                float(os.environ.get("TS_DRAIN_DELAY_S", "5")), float(os.environ.get("TS_DRAIN_GRACE_S", "40")))
        elif argv[0] == "ready" and drain_marker().exists():
            ok, message = False, "draining: this pod is shutting down"
        else:
            ok, message = check_ready(tokens, models)
    except (TokenError, OSError, ValueError) as exc:
        ok, message = False, f"{type(exc).__name__}: {exc}"
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

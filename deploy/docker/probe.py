"""Health probe for TorchServe with token authorization on (exec probe, Docker HEALTHCHECK, the front's /readyz).

    python probe.py live    # GET /ping on the inference port with the inference token -> "Healthy"
    python probe.py ready   # ready to serve (below)
    python probe.py startup # every model has a READY worker
    python probe.py drain   # preStop: turn readiness false, wait, then until every accepted request is answered

``ready`` tells the truth about serving, not about a process being up. It is false
- while the drain marker (``<run dir>/draining``, written by ``drain``) exists;
- while an ``audit-unavailable-<model>`` file exists in ``$CAM_STATUS_DIR`` (default: the run directory,
  where key_file.json is): the worker of a model whose audit is ``durability: strict`` writes it while its
  audit cannot commit, and removes it when writes succeed again;
- when a model (``TS_MODELS``, or every registered one) has no READY worker, or (``TS_PID_CHECK``, on by
  default; off where the probe runs in another PID namespace than TorchServe) no READY worker whose process
  is alive: TorchServe keeps listing a killed worker for a while;
- when a bounded real prediction of a tiny PNG through each model (``TS_PROBE_PREDICT_TIMEOUT_S``, 5 s;
  0 switches it off) gets no answer in time, or a 5xx/404: a hung or dead worker. Any other answer (a 4xx
  from a model that wants other input) proves the worker ran it.

``/ping`` answers 400 without the per-process inference token, and ``/ping`` is 200 about 1 s after
start, long before a model's worker is READY, so readiness looks at worker state on the loopback
management port. The probe reads the tokens from ``key_file.json`` (``TS_KEY_FILE``); it rotates an
expiring token with the API key (see ts_tokens.py). No token ever leaves the pod. Exit 0 = healthy, 1 = not.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path

from ts_tokens import (
    DEFAULT_INFERENCE_URL,
    DEFAULT_KEY_FILE,
    TokenError,
    TokenSource,
    http_request,
    token_source_from_env,
)

AUDIT_UNAVAILABLE_PREFIX = "audit-unavailable-"


def _authorised_get(tokens: TokenSource, kind: str, url: str, path: str, timeout: float) -> tuple[int, bytes]:
    status, body = http_request(url, path, tokens.get(kind), timeout=timeout)
    if status in (400, 401):  # the key file may have been rotated between reading and sending: re-read once
        status, body = http_request(url, path, tokens.get(kind), timeout=timeout)
    return status, body


def tiny_png(size: int = 8) -> bytes:
    """A ``size`` x ``size`` grey 8-bit PNG (stdlib only): the probe's real prediction input."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes([128]) * size for _ in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def check_live(tokens: TokenSource, inference_url: str, timeout: float = 3.0) -> tuple[bool, str]:
    status, body = _authorised_get(tokens, "inference", inference_url, "/ping", timeout)
    if status != 200:
        return False, f"/ping answered HTTP {status}: {body[:200]!r}"
    health = json.loads(body or b"{}").get("status")
    return health == "Healthy", f"/ping status {health!r}"


def drain_marker() -> Path:
    """The file whose presence makes readiness (``ready``, the front's ``/readyz``) answer "draining"."""
    return Path(os.environ.get("TS_KEY_FILE", DEFAULT_KEY_FILE)).parent / "draining"


def status_dir(tokens: TokenSource) -> Path:
    """Where workers put ``audit-unavailable-<model>``: ``$CAM_STATUS_DIR``, else TorchServe's run directory."""
    return Path(os.environ.get("CAM_STATUS_DIR") or tokens.key_file.parent)


def check_status_files(folder: Path) -> tuple[bool, str]:
    """False while a worker reports that its strict audit cannot write (the file's first line says why)."""
    for marker in sorted(folder.glob(f"{AUDIT_UNAVAILABLE_PREFIX}*")):
        try:
            reason = marker.read_text(errors="replace").strip().splitlines()[0][:300]
        except (OSError, IndexError):
            reason = "no reason given"
        return False, f"audit of model {marker.name.removeprefix(AUDIT_UNAVAILABLE_PREFIX)} cannot write: {reason}"
    return True, "audit writable"


def _pid_alive(pid: object) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def check_workers(tokens: TokenSource, models: list[str], timeout: float = 3.0,
                  pid_check: bool = False) -> tuple[bool, str, list[str]]:  # fmt: skip
    """Every model has a READY worker (whose process is alive, with ``pid_check``): (ok, message, models)."""
    if not models:
        status, body = _authorised_get(tokens, "management", tokens.management_url, "/models", timeout)
        if status != 200:
            return False, f"GET /models answered HTTP {status}: {body[:200]!r}", []
        models = [entry["modelName"] for entry in json.loads(body).get("models", [])]
        if not models:
            return False, "no model is registered yet", []
    for name in models:
        status, body = _authorised_get(tokens, "management", tokens.management_url, f"/models/{name}", timeout)
        if status != 200:
            return False, f"GET /models/{name} answered HTTP {status}", models
        workers = [w for version in json.loads(body) for w in version.get("workers", []) if w.get("status") == "READY"]
        if not workers:
            return False, f"model {name} has no READY worker", models
        if pid_check and not any(_pid_alive(w.get("pid")) for w in workers):
            pids = ", ".join(str(w.get("pid")) for w in workers)
            return False, f"model {name}: no live worker process (PID {pids} gone)", models
    return True, f"READY: {', '.join(models)}", models


def check_prediction(tokens: TokenSource, inference_url: str, model: str, timeout: float) -> tuple[bool, str]:
    """One real prediction of a tiny PNG, bounded by ``timeout`` seconds: answered by a live worker?"""
    started = time.monotonic()
    try:
        status, body = http_request(inference_url, f"/predictions/{model}", tokens.get("inference"), method="POST",
                                    body=tiny_png(), headers={"Content-Type": "image/png"}, timeout=timeout)  # fmt: skip
    except OSError as error:  # timeouts included
        return False, f"model {model}: no answer to a prediction within {timeout:g}s ({type(error).__name__})"
    if status >= 500 or status == 404:
        return False, f"model {model}: a prediction answered HTTP {status}: {body[:200]!r}"
    return True, f"model {model} answered a prediction in {time.monotonic() - started:.2f}s"


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in {"1", "true", "yes", "on"}


def check_ready(tokens: TokenSource, models: list[str], timeout: float = 3.0, *, inference_url: str | None = None,
                pid_check: bool | None = None, predict_timeout: float | None = None) -> tuple[bool, str]:  # fmt: skip
    """The readiness of the module docstring. Without ``inference_url`` no prediction is made."""
    if drain_marker().exists() or (tokens.key_file.parent / "draining").exists():
        return False, "draining: this pod is shutting down"
    ok, message = check_status_files(status_dir(tokens))
    if not ok:
        return ok, message
    if pid_check is None:
        pid_check = _env_flag("TS_PID_CHECK", True)
    ok, message, models = check_workers(tokens, models, timeout, pid_check)
    if not ok or inference_url is None:
        return ok, message
    if predict_timeout is None:
        predict_timeout = float(os.environ.get("TS_PROBE_PREDICT_TIMEOUT_S", "5"))
    for name in models if predict_timeout > 0 else []:
        answered, detail = check_prediction(tokens, inference_url, name, predict_timeout)
        if not answered:
            return False, detail
    return True, message


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
    time.sleep(1.0)  # the front relays the last answers
    return time.monotonic() <= deadline, f"drained {', '.join(models) or 'nothing'}"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in {"live", "ready", "startup", "drain"}:
        print("usage: probe.py live|ready|startup|drain", file=sys.stderr)
        return 2
    tokens = token_source_from_env()
    models = [m for m in os.environ.get("TS_MODELS", "").split(",") if m]
    inference_url = os.environ.get("TS_INFERENCE_URL", DEFAULT_INFERENCE_URL)
    try:
        if argv[0] == "live":
            ok, message = check_live(tokens, inference_url)
        elif argv[0] == "drain":
            ok, message = drain(tokens, inference_url, float(os.environ.get("TS_DRAIN_DELAY_S", "5")),
                                float(os.environ.get("TS_DRAIN_GRACE_S", "40")))  # fmt: skip
        elif argv[0] == "ready":
            ok, message = check_ready(tokens, models, inference_url=inference_url)
        else:
            ok, message, _ = check_workers(tokens, models)
    except (TokenError, OSError, ValueError) as exc:
        ok, message = False, f"{type(exc).__name__}: {exc}"
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

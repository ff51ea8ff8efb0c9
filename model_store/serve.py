"""Start, wait for and stop a TorchServe that serves our archives (used by ``make serve`` and the tests).

    python -m model_store.serve start --model efficientnet_lite0   # from the repo root
    python -m model_store.serve stop

``start`` writes the effective config (the repo's ``config.properties`` with the ports taken from
``INFERENCE_PORT`` / ``MANAGEMENT_PORT`` / ``METRICS_PORT`` when set, and the two gRPC ports from
``GRPC_INFERENCE_PORT`` / ``GRPC_MANAGEMENT_PORT``, else free ones, printed at start) under ``logs/``, starts TorchServe
in the background in the working directory (so ``key_file.json`` lands there), then polls the
management describe until every model has a READY worker (``/ping`` answers long before that) and
prints a curl example with the inference token. TorchServe keeps its pid file in ``$TMPDIR``; each
working directory gets its own TMPDIR, so servers started from different directories (tests running
in parallel, other checkouts) never stop each other.

Like a service: ``start`` refuses when a TorchServe already runs from the working directory (its PID
and ports are printed; ``--restart`` stops it first), and fails within seconds when TorchServe exits
early (a port in use: TorchServe's bind error, from this run's log only). ``stop`` drains first: it
waits (at most ``--grace`` seconds, 30 by default, what the Kubernetes manifests allow too) until no
request is queued and a barrier request through every model has come back, then stops TorchServe, so
the requests it had accepted are answered, not reset.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Server", "start", "stop", "drain", "running", "wait_ready", "read_keys", "free_port", "PORT_VARIABLES",
           "GRPC_PORT_VARIABLES", "ports_from_env", "grpc_ports_from_env", "configured_grpc_ports", "AlreadyRunning",
           "StartupFailed", "DEFAULT_GRACE_S"]

REPO_ROOT = Path(__file__).resolve().parent.parent
PORT_VARIABLES = {"inference": "INFERENCE_PORT", "management": "MANAGEMENT_PORT", "metrics": "METRICS_PORT"}
DEFAULT_PORTS = {"inference": 8080, "management": 8081, "metrics": 8082}
# TorchServe also opens two gRPC ports (7070/7071 by default, which would collide with any other TorchServe
# here): pinned by these variables, else free ports picked at start and printed.
GRPC_PORT_VARIABLES = {"grpc_inference_port": "GRPC_INFERENCE_PORT", "grpc_management_port": "GRPC_MANAGEMENT_PORT"}
DEFAULT_GRACE_S = 30.0  # drain time on stop; deploy/kubernetes and deploy/kserve allow as much


class AlreadyRunning(RuntimeError):
    """A TorchServe started from this working directory is still running."""


class StartupFailed(RuntimeError):
    """TorchServe exited while starting (its error, from this run's log, is the message)."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A running TorchServe: its working directory, ports and tokens."""

    workdir: Path
    ports: dict[str, int]

    def url(self, api: str = "inference") -> str:
        return f"http://127.0.0.1:{self.ports[api]}"

    @property
    def keys(self) -> dict[str, str]:
        return read_keys(self.workdir)

    def headers(self, api: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[api]}"}


def _environment(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Archives are self-contained: a PYTHONPATH entry holding a checkout of this project (its handlers or
    # cam_engine) would come before the archive's own copy in the workers and run other code than was archived.
    kept = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep)
            if entry and not any((Path(entry) / package).is_dir() for package in ("handlers", "cam_engine"))]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    else:
        env.pop("PYTHONPATH", None)
    tmp = workdir / "logs" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env["TMPDIR"] = env["TEMP"] = str(tmp)  # TorchServe's pid file lives in $TMPDIR
    env["LOG_LOCATION"] = env["METRICS_LOCATION"] = str(workdir / "logs")
    return env


def _torchserve() -> str:
    candidate = Path(sys.executable).parent / "torchserve"
    return str(candidate) if candidate.exists() else "torchserve"


def read_keys(workdir: Path) -> dict[str, str]:
    """``{"inference": ..., "management": ..., "API": ...}`` from ``workdir/key_file.json``."""
    data = json.loads((Path(workdir) / "key_file.json").read_text())
    return {name: entry["key"] if isinstance(entry, dict) else entry for name, entry in data.items()}


def effective_config(workdir: Path, ports: dict[str, int], base: Path = REPO_ROOT / "config.properties",
                     grpc_ports: dict[str, int] | None = None) -> Path:
    """The repo's config.properties with the addresses set to ``ports``, written to ``workdir/logs``.

    The gRPC ports (``grpc_inference_port`` / ``grpc_management_port``) come from ``base`` when it sets
    them, else from ``grpc_ports``, else free ports.
    """
    lines = []
    for line in base.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        api = key.removesuffix("_address")
        if key.endswith("_address") and api in ports:
            line = f"{key}=http://127.0.0.1:{ports[api]}"
        lines.append(line)
    keys = {line.split("=", 1)[0].strip() for line in lines}
    for grpc in GRPC_PORT_VARIABLES:
        if grpc not in keys:
            lines.append(f"{grpc}={(grpc_ports or {}).get(grpc) or free_port()}")
    path = workdir / "logs" / "config.properties"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def ports_from_env() -> dict[str, int]:
    """The HTTP ports: ``INFERENCE_PORT`` / ``MANAGEMENT_PORT`` / ``METRICS_PORT``, else 8080 / 8081 / 8082."""
    return {api: int(os.environ.get(variable, DEFAULT_PORTS[api])) for api, variable in PORT_VARIABLES.items()}


def grpc_ports_from_env() -> dict[str, int]:
    """The gRPC ports pinned by ``GRPC_INFERENCE_PORT`` / ``GRPC_MANAGEMENT_PORT`` (those set, only)."""
    return {key: int(os.environ[variable]) for key, variable in GRPC_PORT_VARIABLES.items() if os.environ.get(variable)}


def configured_grpc_ports(workdir: Path) -> dict[str, int]:
    """The gRPC ports in the effective config of the TorchServe started from ``workdir``."""
    config = Path(workdir) / "logs" / "config.properties"
    found = {}
    for line in config.read_text().splitlines() if config.exists() else []:
        key, _, value = line.partition("=")
        if key.strip() in GRPC_PORT_VARIABLES and value.strip().isdigit():
            found[key.strip()] = int(value)
    return found


def start(
    workdir: Path,
    model_store: Path,
    models: list[str],
    ports: dict[str, int] | None = None,
    timeout: float = 180.0,
    base_config: Path = REPO_ROOT / "config.properties",
    restart: bool = False,
    grpc_ports: dict[str, int] | None = None,
    wait_for: list[str] | None = None,
) -> Server:
    """Start TorchServe in ``workdir`` serving ``models`` (archive names in ``model_store``); wait until READY.

    ``wait_for``: the models waited for (default: all of ``models``; the test suite's server starts its
    workers on demand, so it waits for none and then for the frontend's answer).

    ``ports`` (HTTP) and ``grpc_ports`` default to the environment's (:func:`ports_from_env`,
    :func:`grpc_ports_from_env`) when ``ports`` is not given; with ``ports`` given, gRPC gets free ports.

    Raises :class:`AlreadyRunning` when one runs from ``workdir`` (unless ``restart``: then it is stopped
    first), :class:`StartupFailed` as soon as TorchServe exits early, :class:`TimeoutError` otherwise.
    """
    workdir = Path(workdir).resolve()
    found = running(workdir)
    if found is not None:
        if not restart:
            pid, old_ports = found
            listed = ", ".join(f"{api} {port}" for api, port in old_ports.items())
            raise AlreadyRunning(f"TorchServe is already running from {workdir} (PID {pid}; ports {listed}): "
                                 "stop it first (make stop) or restart it (make serve RESTART=1)")  # fmt: skip
        stop(workdir)
    if grpc_ports is None:
        grpc_ports = grpc_ports_from_env() if not ports else {}
    ports = ports or ports_from_env()
    config = effective_config(workdir, ports, base_config, grpc_ports)
    key_file = workdir / "key_file.json"
    if key_file.exists():
        key_file.unlink()  # a stale file from an earlier server would hand out dead tokens
    command = [
        _torchserve(), "--start", "--ncs",
        "--model-store", str(Path(model_store).resolve()),
        "--ts-config", str(config),
        "--models", *[f"{name}={name}.mar" for name in models],
    ]  # fmt: skip
    out, model_log = workdir / "logs" / "torchserve.out", workdir / "logs" / "model_log.log"
    offset = out.stat().st_size if out.exists() else 0  # report this run's lines only
    model_offset = model_log.stat().st_size if model_log.exists() else 0
    with open(out, "ab") as log:
        subprocess.run(command, cwd=workdir, env=_environment(workdir), stdout=log, stderr=log, check=True)
    server = Server(workdir, ports)
    try:
        wait_ready(server, models if wait_for is None else wait_for, timeout, alive=lambda: _check_alive(workdir, out, offset), log_offset=model_offset)
    except BaseException:
        stop(workdir, grace=0)  # never leave a half-started server behind
        raise
    return server


def _pid_file(workdir: Path) -> Path:
    return Path(workdir) / "logs" / "tmp" / ".model_server.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def running(workdir: Path) -> tuple[int, dict[str, int]] | None:
    """``(PID, ports)`` of the TorchServe started from ``workdir`` when it is still running, else None."""
    try:
        pid = int(_pid_file(workdir).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if not _alive(pid):
        return None
    ports: dict[str, int] = {}
    config = Path(workdir) / "logs" / "config.properties"
    if config.exists():
        for line in config.read_text().splitlines():
            key, _, value = line.partition("=")
            api = key.strip().removesuffix("_address")
            if key.strip().endswith("_address") and api in DEFAULT_PORTS:
                ports[api] = int(value.rsplit(":", 1)[-1].strip("/"))
    return pid, ports


def _check_alive(workdir: Path, out: Path, offset: int) -> None:
    """Raise :class:`StartupFailed` with this run's errors once TorchServe's frontend has exited."""
    if running(workdir) is not None or not _pid_file(workdir).exists():
        return
    text = out.read_bytes()[offset:].decode("utf-8", "replace") if out.exists() else ""
    errors = [line for line in text.splitlines()
              if any(k in line for k in ("Failed to bind", "Address already in use", "Exception", "ERROR"))]  # fmt: skip
    detail = "\n".join(errors[:12]) or "\n".join(text.splitlines()[-20:]) or "(no output)"
    raise StartupFailed(f"TorchServe exited while starting; from this run's log ({out}):\n{detail}")


def wait_ready(
    server: Server, models: list[str], timeout: float = 180.0, alive: Any = None, log_offset: int = 0
) -> None:
    """Poll ``GET /models/<name>`` until each model has a READY worker; raise with the log tail if not.

    ``alive()``, called every poll, raises when the server has died (then there is no point waiting).
    """
    deadline = time.monotonic() + timeout
    pending = list(models)
    while pending:
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            log = server.workdir / "logs" / "model_log.log"
            tail = log.read_bytes()[log_offset:].decode("utf-8", "replace")[-3000:] if log.exists() else ""
            tail = tail or "(nothing in the model log from this run)"
            raise TimeoutError(f"models {pending} not READY after {timeout:.0f}s; model log tail:\n{tail}")
        try:
            headers = server.headers("management")
            name = pending[0]
            request = urllib.request.Request(f"{server.url('management')}/models/{name}", headers=headers)
            with urllib.request.urlopen(request, timeout=5) as answer:
                described = json.loads(answer.read())
            workers = [w for entry in described for w in entry.get("workers", [])]
            if any(w.get("status") == "READY" for w in workers):
                pending.pop(0)
                continue
        except (OSError, urllib.error.URLError, ValueError, KeyError):
            pass  # not up yet, or key_file.json not written yet
        time.sleep(0.5)


def _get_json(server: Server, api: str, path: str, timeout: float = 5.0) -> Any:
    request = urllib.request.Request(f"{server.url(api)}{path}", headers=server.headers(api))
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read())


def drain(server: Server, grace: float = DEFAULT_GRACE_S) -> bool:
    """Wait until every request TorchServe accepted has been answered (at most ``grace`` seconds).

    Drained when no model has a queued request and then one barrier request per model (an empty body:
    the handler answers it 400 at once) has come back: its worker took it after the batches before it.
    Returns whether it drained in time.
    """
    deadline = time.monotonic() + grace
    try:
        models = [m["modelName"] for m in _get_json(server, "management", "/models").get("models", [])]
    except (OSError, ValueError, KeyError):
        return False
    for name in models:
        while True:
            try:
                described = _get_json(server, "management", f"/models/{name}")
                pending = sum(v.get("jobQueueStatus", {}).get("pendingRequests", 0) for v in described)
            except (OSError, ValueError, KeyError):
                return False
            if pending == 0:
                break
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        left = max(0.5, deadline - time.monotonic())
        request = urllib.request.Request(f"{server.url()}/predictions/{name}", data=b"", method="POST",
                                         headers={**server.headers(), "Content-Type": "application/octet-stream"})  # fmt: skip
        try:
            urllib.request.urlopen(request, timeout=left).close()
        except urllib.error.HTTPError:
            pass  # the 400 is the answer we waited for
        except OSError:
            return False
    return time.monotonic() <= deadline


def stop(workdir: Path, grace: float = DEFAULT_GRACE_S) -> bool:
    """Drain (see :func:`drain`, ``grace`` 0 skips it), then stop the TorchServe started in ``workdir``
    (and only that one). Returns whether one was running."""
    workdir = Path(workdir).resolve()
    found = running(workdir)
    if found is not None and grace > 0:
        try:
            drain(Server(workdir, found[1]), grace)
        except (OSError, ValueError, KeyError):
            pass  # no tokens or no API: stop anyway
    subprocess.run([_torchserve(), "--stop"], cwd=workdir, env=_environment(workdir), check=False, capture_output=True)
    return found is not None


def curl_example(server: Server, model: str, image: str = "docs/chelsea.jpg") -> str:
    """The two calls ``make serve`` prints: raw bytes with their Content-Type, as every example in the docs."""
    token = server.keys["inference"]
    base = server.url()
    kind = "image/png" if image.lower().endswith(".png") else "image/jpeg"
    head = f'curl -s -H "Authorization: Bearer {token}" -H "Content-Type: {kind}" -T {image}'
    return f"{head} {base}/predictions/{model}\n{head} {base}/explanations/{model}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_store.serve")
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--model", action="append", default=None,
                        help="archive name, repeatable or space-separated (default efficientnet_lite0)")  # fmt: skip
    parser.add_argument("--model-store", type=Path, default=REPO_ROOT / "model_store")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT)
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--restart", action="store_true", help="stop a TorchServe already running here first")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, help="seconds to drain on stop")
    args = parser.parse_args(argv)
    if args.action == "stop":
        was = stop(args.workdir, grace=args.grace)
        print("TorchServe stopped." if was else "No TorchServe was running from this directory.")
        return 0
    models = [name for entry in (args.model or ["efficientnet_lite0"]) for name in entry.split()]
    started = time.perf_counter()
    try:
        server = start(args.workdir, args.model_store, models, timeout=args.timeout, restart=args.restart)
    except AlreadyRunning as error:
        print(error, file=sys.stderr)
        return 1
    except (TimeoutError, StartupFailed, subprocess.CalledProcessError) as error:
        print(f"TorchServe did not come up: {error}", file=sys.stderr)
        return 1
    print(f"TorchServe is READY in {time.perf_counter() - started:.1f}s: {', '.join(models)}")
    print(f"  inference {server.url()}  management {server.url('management')}  metrics {server.url('metrics')}/metrics")
    grpc = configured_grpc_ports(args.workdir)
    pinned = " (pin them: GRPC_INFERENCE_PORT / GRPC_MANAGEMENT_PORT)" if not grpc_ports_from_env() else ""
    print(f"  gRPC inference 127.0.0.1:{grpc.get('grpc_inference_port')}  "
          f"management 127.0.0.1:{grpc.get('grpc_management_port')}{pinned}")
    print(f"  tokens in {args.workdir / 'key_file.json'}; logs in {args.workdir / 'logs'}")
    print("Try:")
    print(curl_example(server, models[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

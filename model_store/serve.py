"""Start, wait for and stop a TorchServe that serves our archives (used by ``make serve`` and the tests).

    python -m model_store.serve start --model efficientnet_lite0   # from the repo root
    python -m model_store.serve stop

``start`` writes the effective config (the repo's ``config.properties`` with the ports taken from
``INFERENCE_PORT`` / ``MANAGEMENT_PORT`` / ``METRICS_PORT`` when set) under ``logs/``, starts TorchServe
in the background in the working directory (so ``key_file.json`` lands there), then polls the
management describe until every model has a READY worker (``/ping`` answers long before that) and
prints a curl example with the inference token. TorchServe keeps its pid file in ``$TMPDIR``; each
working directory gets its own TMPDIR, so servers started from different directories (tests running
in parallel, other checkouts) never stop each other.
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

__all__ = ["Server", "start", "stop", "wait_ready", "read_keys", "free_port", "PORT_VARIABLES"]

REPO_ROOT = Path(__file__).resolve().parent.parent
PORT_VARIABLES = {"inference": "INFERENCE_PORT", "management": "MANAGEMENT_PORT", "metrics": "METRICS_PORT"}
DEFAULT_PORTS = {"inference": 8080, "management": 8081, "metrics": 8082}


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


def effective_config(workdir: Path, ports: dict[str, int], base: Path = REPO_ROOT / "config.properties") -> Path:
    """The repo's config.properties with the addresses set to ``ports``, written to ``workdir/logs``."""
    lines = []
    for line in base.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        api = key.removesuffix("_address")
        if key.endswith("_address") and api in ports:
            line = f"{key}=http://127.0.0.1:{ports[api]}"
        lines.append(line)
    # gRPC is on by default at 7070/7071: two servers on one machine (parallel test sessions) then collide and
    # the second stops seconds after starting. Give it free loopback ports unless the base config sets them.
    for key in ("grpc_inference_port", "grpc_management_port"):
        if not any(line.split("=", 1)[0].strip() == key for line in lines):
            lines.append(f"{key}={free_port()}")
    path = workdir / "logs" / "config.properties"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def ports_from_env() -> dict[str, int]:
    return {api: int(os.environ.get(variable, DEFAULT_PORTS[api])) for api, variable in PORT_VARIABLES.items()}


def start(
    workdir: Path,
    model_store: Path,
    models: list[str],
    ports: dict[str, int] | None = None,
    timeout: float = 180.0,
    base_config: Path = REPO_ROOT / "config.properties",
) -> Server:
    """Start TorchServe in ``workdir`` serving ``models`` (archive names in ``model_store``); wait until READY."""
    workdir = Path(workdir).resolve()
    ports = ports or ports_from_env()
    config = effective_config(workdir, ports, base_config)
    key_file = workdir / "key_file.json"
    if key_file.exists():
        key_file.unlink()  # a stale file from an earlier server would hand out dead tokens
    command = [
        _torchserve(), "--start", "--ncs",
        "--model-store", str(Path(model_store).resolve()),
        "--ts-config", str(config),
        "--models", *[f"{name}={name}.mar" for name in models],
    ]  # fmt: skip
    with open(workdir / "logs" / "torchserve.out", "ab") as log:
        subprocess.run(command, cwd=workdir, env=_environment(workdir), stdout=log, stderr=log, check=True)
    server = Server(workdir, ports)
    try:
        wait_ready(server, models, timeout)
    except BaseException:
        stop(workdir)  # never leave a half-started server behind
        raise
    return server


def wait_ready(server: Server, models: list[str], timeout: float = 180.0) -> None:
    """Poll ``GET /models/<name>`` until each model has a READY worker; raise with the log tail if not."""
    deadline = time.monotonic() + timeout
    pending = list(models)
    while pending:
        if time.monotonic() > deadline:
            log = server.workdir / "logs" / "model_log.log"
            tail = log.read_text()[-3000:] if log.exists() else "(no model log)"
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


def stop(workdir: Path) -> None:
    """Stop the TorchServe started in ``workdir`` (and only that one)."""
    workdir = Path(workdir).resolve()
    subprocess.run([_torchserve(), "--stop"], cwd=workdir, env=_environment(workdir), check=False, capture_output=True)


def curl_example(server: Server, model: str, image: str = "docs/chelsea.jpg") -> str:
    token = server.keys["inference"]
    base = server.url()
    return (
        f'curl -s -H "Authorization: Bearer {token}" -T {image} {base}/predictions/{model}\n'
        f'curl -s -H "Authorization: Bearer {token}" -T {image} {base}/explanations/{model}'
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_store.serve")
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--model", action="append", default=None, help="archive name (default efficientnet_lite0)")
    parser.add_argument("--model-store", type=Path, default=REPO_ROOT / "model_store")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT)
    parser.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    if args.action == "stop":
        stop(args.workdir)
        print("TorchServe stopped.")
        return 0
    models = args.model or ["efficientnet_lite0"]
    started = time.perf_counter()
    try:
        server = start(args.workdir, args.model_store, models, timeout=args.timeout)
    except (TimeoutError, subprocess.CalledProcessError) as error:
        print(f"TorchServe did not come up: {error}", file=sys.stderr)
        stop(args.workdir)
        return 1
    print(f"TorchServe is READY in {time.perf_counter() - started:.1f}s: {', '.join(models)}")
    print(f"  inference {server.url()}  management {server.url('management')}  metrics {server.url('metrics')}/metrics")
    print(f"  tokens in {args.workdir / 'key_file.json'}; logs in {args.workdir / 'logs'}")
    print("Try:")
    print(curl_example(server, models[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stopping without losing a request: the front's drain (preStop, then SIGTERM: nginx quits gracefully) in front
of the session's TorchServe, and SIGTERM to the TorchServe container's entrypoint (deploy/docker/start.sh, run
here against its own TorchServe on loopback ports with the session's small batching archive)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from model_store import serve
from tests.helpers.front import CLIENT_TOKENS, free_port, nginx_binary, start_front
from tests.helpers.inputs import encode, square_image
from tests.helpers.serving import BATCH_MODEL

if nginx_binary() is None:
    pytest.fail("nginx is missing: run `make nginx` (tests/ensure_debian.sh; make test does)", pytrace=False)

DOCKER = Path(__file__).resolve().parents[1] / "deploy" / "docker"
IMAGE = encode(square_image(224, 224, (40, 40, 150, 150), seed=3))


def _post(port: int, token: str | None, path: str = f"/predictions/{BATCH_MODEL}") -> object:
    """One prediction; its status, or the exception that a reset or refused connection raised."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        headers = {"Content-Type": "image/png", **({"Authorization": f"Bearer {token}"} if token else {})}
        conn.request("POST", path, body=IMAGE, headers=headers)
        answer = conn.getresponse()
        body = answer.read()
        return answer.status if answer.status != 200 or json.loads(body).get("predictions") else body[:200]
    except (OSError, http.client.HTTPException) as error:
        return error
    finally:
        conn.close()


def _in_flight(submit, count: int, pending) -> list:
    """Send ``count`` requests at once; return their futures once TorchServe has some of them queued."""
    pool = ThreadPoolExecutor(count)
    futures = [pool.submit(submit) for _ in range(count)]
    deadline = time.monotonic() + 20
    while pending() == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    pool.shutdown(wait=False)
    return futures


def _pending(server, model: str = BATCH_MODEL) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", server.ports["management"], timeout=10)
    try:
        conn.request("GET", f"/models/{model}", headers=server.headers("management"))
        described = json.loads(conn.getresponse().read())
        return sum(v.get("jobQueueStatus", {}).get("pendingRequests", 0) for v in described)
    except (OSError, ValueError):
        return 0
    finally:
        conn.close()


def test_front_drain_with_requests_in_flight_answers_every_one(server, tmp_path):
    """preStop (probe.py drain: /readyz 503 at once) and then SIGTERM while 16 requests are in flight: nginx
    quits gracefully, so all 16 are answered 200 and none is reset; afterwards the port is closed."""
    front = start_front(tmp_path / "front", server.workdir / "key_file.json", server.url(), server.url("management"),
                        models=BATCH_MODEL)  # fmt: skip
    env = {**front.env, "TS_DRAIN_DELAY_S": "0", "TS_DRAIN_GRACE_S": "60"}
    try:
        futures = _in_flight(lambda: _post(front.port, CLIENT_TOKENS[0]), 16, lambda: _pending(server))
        drain = subprocess.Popen([sys.executable, str(DOCKER / "probe.py"), "drain"], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        front.wait_until(lambda: front.readyz() == 503, 5, "/readyz 503 while draining")
        front.process.send_signal(signal.SIGTERM)  # the kubelet's SIGTERM, here before the drain has finished
        outcomes = [f.result(timeout=120) for f in futures]
        assert drain.wait(60) == 0, drain.stdout.read()
        assert front.process.wait(60) == 0
    finally:
        front.stop()
    assert outcomes == [200] * 16, outcomes
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", front.port, timeout=5).connect()


def _config(tmp_path: Path, ports: dict[str, int]) -> Path:
    """The container's config.properties with every address on a free loopback port."""
    lines = []
    for line in (DOCKER / "config.properties").read_text().splitlines():
        key = line.split("=", 1)[0]
        if key in {"inference_address", "management_address", "metrics_address"}:
            line = f"{key}=http://127.0.0.1:{ports[key.removesuffix('_address')]}"
        lines.append(line)
    lines += [f"grpc_inference_port={free_port()}", f"grpc_management_port={free_port()}"]
    config = tmp_path / "config.properties"
    config.write_text("\n".join(lines) + "\n")
    return config


def test_sigterm_to_the_entrypoint_answers_every_request_in_flight(server, tmp_path):
    """docker stop: SIGTERM to start.sh with 32 requests in flight gives 32 answers (it drains as `make stop`
    does before stopping TorchServe); start.sh exits 0, TorchServe is gone, and a stale drain marker from an
    earlier run was cleared at start."""
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(server.workdir / "model_store" / f"{BATCH_MODEL}.mar", store)
    app, run = tmp_path / "app", tmp_path / "run"
    app.mkdir()
    (app / "deploy").symlink_to(DOCKER)
    (run / "tmp").mkdir(parents=True)
    (run / "draining").write_text("left over from an earlier run\n")
    ports = {api: free_port() for api in serve.PORT_VARIABLES}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "APP_DIR": str(app),
           "TS_CONFIG": str(_config(tmp_path, ports)), "MODEL_STORE": str(store), "TS_RUN_DIR": str(run),
           "TMPDIR": str(run / "tmp"), "TS_INFERENCE_URL": f"http://127.0.0.1:{ports['inference']}",
           "TS_MANAGEMENT_URL": f"http://127.0.0.1:{ports['management']}", "TS_MODELS": BATCH_MODEL}  # fmt: skip
    env.pop("CAM_STATUS_DIR", None)
    log = open(tmp_path / "start.log", "wb")
    entrypoint = subprocess.Popen(["bash", str(DOCKER / "start.sh")], env=env, stdout=log, stderr=subprocess.STDOUT)
    running = serve.Server(run, ports)
    try:
        serve.wait_ready(running, [BATCH_MODEL], timeout=180)
        assert not (run / "draining").exists()
        token = running.keys["inference"]
        futures = _in_flight(lambda: _post(ports["inference"], token), 32, lambda: _pending(running))
        entrypoint.send_signal(signal.SIGTERM)
        outcomes = [f.result(timeout=180) for f in futures]
        code = entrypoint.wait(120)
    finally:
        if entrypoint.poll() is None:
            entrypoint.kill()
            subprocess.run([str(Path(sys.executable).parent / "torchserve"), "--stop"], env=env, cwd=run,
                           capture_output=True, timeout=60)  # fmt: skip
    assert outcomes == [200] * 32, (outcomes, (tmp_path / "start.log").read_text()[-2000:])
    assert code == 0, (tmp_path / "start.log").read_text()[-2000:]
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", ports["inference"], timeout=5).connect()
    assert "draining before stopping TorchServe" in (tmp_path / "start.log").read_text()

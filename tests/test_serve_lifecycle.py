"""`make serve` / `make stop` like a service (model_store/serve.py), on short-lived TorchServes of their own.

They serve the session's tiny audit-off archive (64x64 model, batch 8) from the session's model store.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from model_store import serve
from tests.helpers.inputs import encode
from tests.helpers.serving import AUDIT_OFF, DEFAULT_MODEL


def _ports() -> dict[str, int]:
    return {api: serve.free_port() for api in serve.PORT_VARIABLES}


def test_a_taken_port_fails_in_seconds_with_the_bind_error_of_this_run(server, tmp_path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "torchserve.out").write_text("STALE LINE FROM AN EARLIER RUN: Exception\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = {**_ports(), "inference": taken.getsockname()[1]}
        started = time.monotonic()
        with pytest.raises(serve.StartupFailed) as failure:
            serve.start(tmp_path, server.workdir / "model_store", [AUDIT_OFF], ports=ports, timeout=120)
        elapsed = time.monotonic() - started
    message = str(failure.value)
    assert elapsed < 30, f"took {elapsed:.0f}s"
    assert "Address already in use" in message or "Failed to bind" in message, message
    assert "STALE LINE" not in message
    assert serve.running(tmp_path) is None


def test_grpc_ports_pinned_by_the_environment_else_free(monkeypatch, tmp_path) -> None:
    """GRPC_INFERENCE_PORT / GRPC_MANAGEMENT_PORT pin the two gRPC ports `make serve` opens; unset, each is a
    free port (never TorchServe's fixed 7070/7071, which any other TorchServe here would hold)."""
    monkeypatch.delenv("GRPC_INFERENCE_PORT", raising=False)
    monkeypatch.delenv("GRPC_MANAGEMENT_PORT", raising=False)
    assert serve.grpc_ports_from_env() == {}
    serve.effective_config(tmp_path, _ports(), grpc_ports={})
    free = serve.configured_grpc_ports(tmp_path)
    assert set(free) == {"grpc_inference_port", "grpc_management_port"} and not {7070, 7071} & set(free.values())
    monkeypatch.setenv("GRPC_INFERENCE_PORT", "17070")
    monkeypatch.setenv("GRPC_MANAGEMENT_PORT", "17071")
    serve.effective_config(tmp_path, _ports(), grpc_ports=serve.grpc_ports_from_env())
    assert serve.configured_grpc_ports(tmp_path) == {"grpc_inference_port": 17070, "grpc_management_port": 17071}


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_second_start_refuses_and_stop_drains_16_requests_in_flight(server, tmp_path) -> None:
    ports = _ports()
    store = server.workdir / "model_store"
    grpc = {"grpc_inference_port": serve.free_port(), "grpc_management_port": serve.free_port()}
    running = serve.start(tmp_path, store, [AUDIT_OFF], ports=ports, timeout=180, grpc_ports=grpc)
    try:
        pid, seen = serve.running(tmp_path)
        assert seen == ports
        assert serve.configured_grpc_ports(tmp_path) == grpc  # the pinned gRPC ports, and TorchServe holds them
        assert all(_listening(port) for port in grpc.values()), grpc
        with pytest.raises(serve.AlreadyRunning) as refused:
            serve.start(tmp_path, store, [AUDIT_OFF], ports=_ports(), timeout=30)
        assert f"PID {pid}" in str(refused.value) and str(ports["inference"]) in str(refused.value)
        assert serve.running(tmp_path)[0] == pid  # the first one still runs

        # 16 explanations of 900x900 images (heatmaps mapped back at full size): a few seconds of work
        rng = np.random.default_rng(0)
        images = [encode(rng.integers(0, 256, (900, 900, 3), dtype=np.uint8)) for _ in range(16)]
        headers = running.headers()

        def call(image: bytes):
            try:
                answer = requests.post(f"{running.url()}/explanations/{AUDIT_OFF}", data=image, headers=headers,
                                       timeout=120)  # fmt: skip
                return answer.status_code
            except requests.ConnectionError as error:
                return repr(error)

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(call, image) for image in images]
            deadline = time.monotonic() + 30
            # all 16 accepted: the worker holds at most one batch (8), so 8 waiting means every request arrived
            # (stopping earlier raced the last connections on a loaded machine: one was reset before TorchServe had it)
            while not _queued(running, at_least=8) and time.monotonic() < deadline:
                time.sleep(0.02)
            stopping = time.monotonic()
            assert serve.stop(tmp_path, grace=60) is True
            stopped_after = time.monotonic() - stopping
            results = [f.result() for f in futures]
    finally:
        serve.stop(tmp_path, grace=0)
    assert results == [200] * 16, results  # no resets
    assert stopped_after < 60
    assert serve.running(tmp_path) is None


def _queued(server: serve.Server, at_least: int = 1) -> bool:
    try:
        described = requests.get(f"{server.url('management')}/models/{AUDIT_OFF}", headers=server.headers("management"),
                                 timeout=5).json()  # fmt: skip
    except (requests.RequestException, ValueError):
        return False
    return sum(v["jobQueueStatus"]["pendingRequests"] for v in described) >= at_least


def test_the_printed_curl_examples_answer_as_printed(server) -> None:
    """What `make serve` prints is run verbatim (from the repository root, where docs/chelsea.jpg is): each
    call sends the photo's Content-Type and answers the default model's predictions."""
    import json
    import shlex
    import subprocess

    repo = serve.REPO_ROOT
    for line in serve.curl_example(server, DEFAULT_MODEL).splitlines():
        assert '-H "Content-Type: image/jpeg"' in line, line
        completed = subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=120, cwd=repo)
        answer = json.loads(completed.stdout)
        assert answer["model"] == DEFAULT_MODEL and answer["predictions"][0]["label"] == "Egyptian cat", answer
        assert ("explanations" in answer) == line.rstrip().endswith(f"/explanations/{DEFAULT_MODEL}")

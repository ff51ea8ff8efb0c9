"""The pod's front (deploy/docker/front.py: nginx + its watcher) started on loopback for the tests.

The watcher runs as it does in the container (``python front.py run``), with TorchServe's key file reached
through a symlink in a folder of its own, so that the drain marker and ``audit-unavailable-*`` files a test
writes land there, never in the session TorchServe's run directory.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

FRONT = Path(__file__).resolve().parents[2] / "deploy" / "docker" / "front.py"
CLIENT_TOKENS = ["0123456789abcdef0123456789abcdef01234567", "fedcba9876543210fedcba9876543210fedcba98"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


@dataclass
class Front:
    """A running front: its port, folders and the watcher process (nginx is the watcher's child)."""

    port: int
    folder: Path
    process: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.folder / "run"

    @property
    def tokens_file(self) -> Path:
        return self.folder / "client-tokens"

    @property
    def state(self) -> Path:
        return self.folder / "state"

    def request(self, method: str, path: str, token: str | None = CLIENT_TOKENS[0], body: bytes | None = None,
                headers: dict | None = None, timeout: float = 60) -> tuple[int, dict, bytes]:  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            all_headers = dict(headers or {})
            if token is not None:
                all_headers["Authorization"] = f"Bearer {token}"
            conn.request(method, path, body=body, headers=all_headers)
            answer = conn.getresponse()
            return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
        finally:
            conn.close()

    def wait_until(self, predicate, timeout: float = 20.0, what: str = "condition") -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if predicate():
                return time.monotonic() - started
            if self.process.poll() is not None:
                raise RuntimeError(f"front exited with {self.process.returncode}")
            time.sleep(0.1)
        raise TimeoutError(f"{what} not reached within {timeout}s")

    def readyz(self) -> int:
        try:
            return self.request("GET", "/readyz", token=None, timeout=10)[0]
        except OSError:
            return 0

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start_front(folder: Path, key_file: Path, inference_url: str, management_url: str, *,
                models: str = "", extra_env: dict | None = None, timeout: float = 30.0) -> Front:  # fmt: skip
    """Render and start the front in ``folder`` in front of the TorchServe whose key file is ``key_file``."""
    run_dir = folder / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    link = run_dir / "key_file.json"
    if not link.exists():
        link.symlink_to(key_file)
    (folder / "client-tokens").write_text("# two tokens: a rotation in progress\n" + "\n".join(CLIENT_TOKENS) + "\n")
    port = free_port()
    env = {
        **os.environ,
        "GATE_LISTEN": f"127.0.0.1:{port}", "GATE_STATE_DIR": str(folder / "state"),
        "GATE_CLIENT_TOKENS_FILE": str(folder / "client-tokens"), "TS_KEY_FILE": str(link),
        "TS_INFERENCE_URL": inference_url, "TS_MANAGEMENT_URL": management_url, "TS_MODELS": models,
        "GATE_READY_PERIOD_S": "1", "GATE_NGINX": nginx_binary() or "nginx",
        **({"GATE_NGINX_USER": "root"} if os.geteuid() == 0 else {}),
        **(extra_env or {}),
    }  # fmt: skip
    env.pop("CAM_STATUS_DIR", None)
    log = open(folder / "front.log", "ab")
    process = subprocess.Popen([sys.executable, str(FRONT), "run"], env=env, stdout=log, stderr=log)
    front = Front(port, folder, process, env)
    try:
        front.wait_until(lambda: _answers(front), timeout, "nginx answering /healthz")
    except BaseException:
        front.stop(10)
        raise
    return front


def _answers(front: Front) -> bool:
    try:
        return front.request("GET", "/healthz", token=None, timeout=2)[0] == 200
    except OSError:
        return False


def raw_exchange(port: int, data: bytes, *, timeout: float = 10.0, shutdown: bool = False) -> tuple[bytes, bool, float]:
    """Send ``data`` on a fresh connection and read until the server closes it or ``timeout`` passes:
    (what came back, whether the server closed the connection, seconds until then)."""
    started = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if shutdown:
            sock.shutdown(socket.SHUT_WR)
        while True:
            left = timeout - (time.monotonic() - started)
            if left <= 0:
                return received, False, time.monotonic() - started
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return received, False, time.monotonic() - started
            except ConnectionResetError:
                return received, True, time.monotonic() - started
            if not chunk:
                return received, True, time.monotonic() - started
            received += chunk


def statuses(data: bytes) -> list[int]:
    """The status codes of every HTTP response in ``data`` (several if a request was smuggled; a second
    status line may follow the first body without a line break)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3})", data)]

"""The front's cost: predictions through nginx (deploy/docker/front.py) against the same predictions sent to
TorchServe directly, at the same number of closed-loop clients, interleaved.

    python bench/bench_gate.py [--users 8] [--seconds 6] [--rounds 5] [--json out.json]

One TorchServe on free loopback ports serves ``efficientnet_lite0`` (the archive ``make serve`` builds, real
weights); the front runs as in the container (``front.py run``: nginx with the rendered config, the watcher)
in front of it. Each round runs ``--users`` clients for ``--seconds`` directly, then through the front (the
order alternates between rounds), each client on one keep-alive connection posting skimage's chelsea as
its 451x300 JPEG. The cost of a request is the run's seconds times clients divided by the answered
requests; the ratio front/direct of each round, and their median, is printed (the issue's goal: <= 1.05).
Only HTTP 200 answers count; any other answer fails the run.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model_store import serve  # noqa: E402
from model_store.build import ArchiveSpec, build_archive  # noqa: E402

MODEL = "efficientnet_lite0"
CLIENT_TOKEN = "be4c4b3e" * 8


def _image() -> bytes:
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_clients(port: int, users: int, seconds: float, token: str, image: bytes) -> tuple[int, list]:
    """``users`` closed-loop clients for ``seconds``: (answered 200, other outcomes)."""
    answered, others, lock = [0], [], threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/jpeg"}
        while time.monotonic() < deadline:
            try:
                conn.request("POST", f"/predictions/{MODEL}", body=image, headers=headers)
                answer = conn.getresponse()
                answer.read()
                with lock:
                    if answer.status == 200:
                        answered[0] += 1
                    else:
                        others.append(answer.status)
            except (OSError, http.client.HTTPException) as error:
                with lock:
                    others.append(repr(error))
                conn.close()
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answered[0], others


def start_front(folder: Path, server: serve.Server) -> tuple[subprocess.Popen, int]:
    (folder / "run").mkdir(parents=True)
    (folder / "run" / "key_file.json").symlink_to(server.workdir / "key_file.json")
    (folder / "client-tokens").write_text(CLIENT_TOKEN + "\n")
    port = _free_port()
    env = {**os.environ, "GATE_LISTEN": f"127.0.0.1:{port}", "GATE_STATE_DIR": str(folder / "state"),
           "GATE_CLIENT_TOKENS_FILE": str(folder / "client-tokens"), "TS_KEY_FILE": str(folder / "run" / "key_file.json"),
           "TS_INFERENCE_URL": server.url(), "TS_MANAGEMENT_URL": server.url("management"), "TS_MODELS": MODEL,
           "GATE_READY_PERIOD_S": "30", "GATE_NGINX": shutil.which("nginx") or "/usr/sbin/nginx",
           **({"GATE_NGINX_USER": "root"} if os.geteuid() == 0 else {})}  # fmt: skip
    log = open(folder / "front.log", "ab")
    process = subprocess.Popen([sys.executable, str(ROOT / "deploy" / "docker" / "front.py"), "run"], env=env,
                               stdout=log, stderr=log)  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, port
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the front did not start: {(folder / 'front.log').read_text()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    image = _image()
    with tempfile.TemporaryDirectory(prefix="bench-gate-") as folder:
        workdir = Path(folder)
        store = workdir / "model_store"
        build_archive(ArchiveSpec(config=MODEL), store, log=lambda line: None)
        server = serve.start(workdir, store, [MODEL], ports={api: _free_port() for api in serve.PORT_VARIABLES},
                             timeout=300)  # fmt: skip
        front, front_port = None, 0
        try:
            front, front_port = start_front(workdir / "front", server)
            run_clients(server.ports["inference"], args.users, 2, server.keys["inference"], image)  # warm-up
            run_clients(front_port, args.users, 2, CLIENT_TOKEN, image)
            rounds = []
            for index in range(args.rounds):
                order = ["direct", "front"] if index % 2 == 0 else ["front", "direct"]
                cost = {}
                for side in order:
                    port, token = ((server.ports["inference"], server.keys["inference"]) if side == "direct"
                                   else (front_port, CLIENT_TOKEN))  # fmt: skip
                    answered, others = run_clients(port, args.users, args.seconds, token, image)
                    if others or not answered:
                        raise RuntimeError(f"{side}: {answered} answered, other outcomes {others[:5]}")
                    cost[side] = args.seconds * args.users / answered
                rounds.append({**cost, "ratio": cost["front"] / cost["direct"]})
                print(f"round {index + 1}: direct {cost['direct'] * 1000:.1f} ms/request, front "
                      f"{cost['front'] * 1000:.1f} ms/request, ratio {rounds[-1]['ratio']:.3f}", flush=True)  # fmt: skip
        finally:
            if front is not None:
                front.send_signal(signal.SIGTERM)
                front.wait(30)
            serve.stop(workdir, grace=0)
    median = statistics.median(r["ratio"] for r in rounds)
    print(f"median cost ratio front/direct at {args.users} users: {median:.3f} (goal <= 1.05)")
    if args.json:
        args.json.write_text(json.dumps({"users": args.users, "seconds": args.seconds, "rounds": rounds,
                                         "median_ratio": median}, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

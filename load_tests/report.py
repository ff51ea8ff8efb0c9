"""Performance report: what explanations cost next to predictions under load, what batching buys, and how
far ahead of TorchServe's built-in Captum explanations we are. Runs on any machine (CPU or GPU).

    python load_tests/report.py                       # make report; a few minutes with the defaults
    python load_tests/report.py --duration 30 --users 1,4,8,16 --plot docs/performance.png

It builds three archives of EfficientNet-Lite0 (real weights) and serves them from one TorchServe on
loopback ports (``model_store.serve``): ``--inference-port`` / ``--management-port`` / ``--metrics-port``,
by default ``$INFERENCE_PORT`` / ``$MANAGEMENT_PORT`` / ``$METRICS_PORT``, else free ones; the gRPC ports
are free ones, or ``$GRPC_INFERENCE_PORT`` / ``$GRPC_MANAGEMENT_PORT``, then, for each number of concurrent users, runs closed-loop
clients (each sends its next request when the last one answered) for ``--duration`` seconds against:

- ``cam_b1``: our handler, batching off (batchSize 1);
- ``cam_b8``: our handler, batching on (batchSize 8, maxBatchDelay ``--batch-delay`` ms);
- ``stock``: TorchServe's stock ``image_classifier`` handler on the same weights (TorchScript), whose
  ``/explanations`` is Captum Integrated Gradients (n_steps=15);

``/predictions`` and ``/explanations`` each, with the same 224x224 PNG of ``skimage.data.chelsea()``.
Our answers are checked like the Locust checks (status, schema, heatmap size); a stock answer must be
200 and JSON of the expected kind. Prints the machine, a Markdown table (p50/p95/p99 latency,
throughput, bytes per response, failures), the ratios and the targets (met/missed); writes the table
to ``<out>/report.md`` and a PNG plot. Read the ratios: absolute times depend on the machine and on
whatever else runs on it (the load average before and after is printed).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from payloads import Photo, check_answer  # noqa: E402

from model_store import serve  # noqa: E402
from model_store.build import ArchiveSpec, build_archive  # noqa: E402

MODEL_CONFIG = "efficientnet_lite0"
OURS_OFF, OURS_ON, STOCK = "cam_b1", "cam_b8", "stock_lite0"
LABELS = {OURS_OFF: "ours, batching off", OURS_ON: "ours, batching on", STOCK: "stock (Captum IG)"}
MAX_REQUESTS_PER_CELL = 20_000  # a hard bound besides the time limit


@dataclass
class Cell:
    """One (model, endpoint, users) run: latencies in ms of the requests that completed, in order."""

    model: str
    endpoint: str
    users: int
    latencies: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    failures: int = 0
    failure_examples: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    @property
    def mean_bytes(self) -> float:
        return statistics.fmean(self.sizes) if self.sizes else float("nan")


def machine_description() -> str:
    """CPU model, cores, memory, GPU, torch/TorchServe versions and the load average."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
        memory_text = f", {memory:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        memory_text = ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    try:
        from importlib.metadata import version

        ts_version = version("torchserve")
    except Exception:  # noqa: BLE001
        ts_version = "?"
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs{memory_text}, {gpu}; {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, TorchServe {ts_version}"
    )


def test_image() -> Photo:
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).resize((224, 224), Image.BILINEAR).save(buffer, format="PNG")
    return Photo("chelsea", 224, 224, "PNG", buffer.getvalue())


def build_archives(store: Path, scratch: Path, batch_delay: int, log) -> None:
    from bench_serving import build_stock_archive  # bench/bench_serving.py: the stock archive, same weights

    common = {"minWorkers": 1, "maxWorkers": 1, "responseTimeout": 300}
    build_archive(ArchiveSpec(config=MODEL_CONFIG, archive_name=OURS_OFF,
                              overrides={**common, "batchSize": 1, "maxBatchDelay": 0}), store, log=log)  # fmt: skip
    build_archive(ArchiveSpec(config=MODEL_CONFIG, archive_name=OURS_ON,
                              overrides={**common, "batchSize": 8, "maxBatchDelay": batch_delay}), store, log=log)  # fmt: skip
    build_stock_archive(store, scratch)  # writes stock_lite0.mar (STOCK)


def judge(model: str, endpoint: str, status: int, body: bytes, photo: Photo) -> str | None:
    if model != STOCK:
        return check_answer(status, body, photo, model, explained=endpoint == "explanations")
    if status != 200:
        return f"HTTP {status}: {body[:200]!r}"
    opening = body.lstrip()[:1]
    wanted = b"[" if endpoint == "explanations" else b"{"  # IG: a 3x224x224 nested list; predictions: a dict
    return None if opening == wanted else f"unexpected stock body {body[:80]!r}"


def run_cell(server: serve.Server, cell: Cell, photo: Photo, duration: float) -> Cell:
    """``cell.users`` closed-loop clients for ``duration`` s (each finishes its request in flight)."""
    url = f"{server.url()}/{cell.endpoint}/{cell.model}"
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + duration
    finished: list[float] = []

    def client() -> None:
        session = requests.Session()
        while time.perf_counter() < deadline:
            with lock:
                if len(cell.latencies) + cell.failures >= MAX_REQUESTS_PER_CELL:
                    break
            sent = time.perf_counter()
            try:
                answer = session.post(url, data=photo.body, headers={**server.headers(), "Content-Type": "image/png"},
                                      timeout=300)  # fmt: skip
                status, body = answer.status_code, answer.content
            except requests.RequestException as error:
                status, body = 0, repr(error).encode()
            took = (time.perf_counter() - sent) * 1000
            problem = judge(cell.model, cell.endpoint, status, body, photo)
            with lock:
                if problem:
                    cell.failures += 1
                    if len(cell.failure_examples) < 3:
                        cell.failure_examples.append(problem)
                else:
                    cell.latencies.append(took)
                    cell.sizes.append(len(body))
                finished.append(time.perf_counter())

    threads = [threading.Thread(target=client, daemon=True) for _ in range(cell.users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=duration + 600)
    cell.elapsed = (max(finished) if finished else time.perf_counter()) - start
    return cell


def markdown(cells: list[Cell]) -> str:
    lines = [
        "| handler | endpoint | users | req/s | p50 ms | p95 ms | p99 ms | bytes/response | requests | failed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        lines.append(
            f"| {LABELS[c.model]} | /{c.endpoint} | {c.users} | {c.throughput:.1f} | {c.percentile(50):.0f} | "
            f"{c.percentile(95):.0f} | {c.percentile(99):.0f} | {c.mean_bytes:,.0f} | {len(c.latencies)} | {c.failures} |"
        )
    return "\n".join(lines)


def ratios_and_targets(cells: list[Cell], users: list[int]) -> tuple[str, list[tuple[str, bool, str]]]:
    table = {(c.model, c.endpoint, c.users): c for c in cells}

    def rate(model: str, endpoint: str, n: int) -> float:
        cell = table.get((model, endpoint, n))
        return cell.throughput if cell else float("nan")

    lines = [
        "| users | ours expl/pred throughput (batching off) | (batching on) | batching gain on /explanations "
        "| ours vs stock /explanations throughput | stock expl/pred throughput |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n in users:
        off = rate(OURS_OFF, "explanations", n) / rate(OURS_OFF, "predictions", n)
        on = rate(OURS_ON, "explanations", n) / rate(OURS_ON, "predictions", n)
        gain = rate(OURS_ON, "explanations", n) / rate(OURS_OFF, "explanations", n)
        best = max(rate(OURS_ON, "explanations", n), rate(OURS_OFF, "explanations", n))
        versus = best / rate(STOCK, "explanations", n)
        stock = rate(STOCK, "explanations", n) / rate(STOCK, "predictions", n)
        lines.append(f"| {n} | {off:.2f}x | {on:.2f}x | {gain:.2f}x | {versus:.1f}x | {stock:.3f}x |")
    top = max(users)
    expl = max(rate(OURS_ON, "explanations", top), rate(OURS_OFF, "explanations", top))
    pred = max(rate(OURS_ON, "predictions", top), rate(OURS_OFF, "predictions", top))
    gain = rate(OURS_ON, "explanations", top) / rate(OURS_OFF, "explanations", top)
    versus = expl / rate(STOCK, "explanations", top)
    failed = sum(c.failures for c in cells)
    targets = [
        (f"/explanations throughput >= 0.7x /predictions at {top} users (best batching setting)", expl / pred >= 0.7,
         f"{expl / pred:.2f}x"),
        (f"batching on raises /explanations throughput over batching off ({top} users)", gain > 1.0, f"{gain:.2f}x"),
        (f">= 20x the throughput of the stock Captum IG /explanations ({top} users)", versus >= 20, f"{versus:.1f}x"),
        ("zero failed requests", failed == 0, f"{failed} failed"),
    ]  # fmt: skip
    return "\n".join(lines), targets


# Each handler its own colour and marker; the endpoint its line style (dashed: /predictions).
STYLES = {OURS_OFF: ("tab:blue", "o"), OURS_ON: ("tab:green", "s"), STOCK: ("tab:red", "^")}
ENDPOINT_LINES = {"predictions": "--", "explanations": "-"}


def figure_of(cells: list[Cell], users: list[int], machine: str) -> Any:
    """The report's matplotlib figure: throughput (left) and p95 latency (right) against concurrent users;
    the title holds the whole machine description, wrapped (never cut)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    for model in (OURS_OFF, OURS_ON, STOCK):
        colour, marker = STYLES[model]
        for endpoint, line in ENDPOINT_LINES.items():
            series = [c for c in cells if c.model == model and c.endpoint == endpoint]
            if not series:
                continue
            label = f"{LABELS[model]} /{endpoint}"
            left.plot([c.users for c in series], [c.throughput for c in series], line, marker=marker, color=colour,
                      label=label)  # fmt: skip
            right.plot([c.users for c in series], [c.percentile(95) for c in series], line, marker=marker,
                       color=colour, label=label)  # fmt: skip
    left.set(xlabel="concurrent users", ylabel="requests / s (log)", title="Throughput", xticks=users, yscale="log")
    right.set(xlabel="concurrent users", ylabel="p95 latency (ms, log)", title="p95 latency", xticks=users,
              yscale="log")  # fmt: skip
    for axis in (left, right):
        axis.grid(alpha=0.3, which="both")
    right.legend(fontsize=7, loc="upper left")
    title = "\n".join(textwrap.wrap(f"EfficientNet-Lite0, 224x224 PNG - {machine}", width=150))
    figure.suptitle(title, fontsize=8)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.035 * (title.count("\n") + 1)))
    return figure


def plot(cells: list[Cell], users: list[int], path: Path, machine: str) -> None:
    """Write :func:`figure_of` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    figure = figure_of(cells, users, machine)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report_ports(args: argparse.Namespace) -> dict[str, int]:
    """The ports the report's own TorchServe listens on: ``--<api>-port`` (default ``$INFERENCE_PORT`` ...),
    a free loopback port for each one not given."""
    return {api: getattr(args, f"{api}_port") or serve.free_port() for api in serve.PORT_VARIABLES}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The report's options (see the module docstring); ``--<api>-port`` defaults come from the environment."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", default="1,4,8", help="concurrent users, comma-separated")
    parser.add_argument(
        "--duration", type=float, default=8.0, help="seconds per (handler, endpoint, users) cell"
    )
    parser.add_argument(
        "--batch-delay", type=int, default=5, help="maxBatchDelay (ms) of the batching archive"
    )
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of every worker, the same for all handlers (0: torch's default)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="folder for report.md and the plot")
    parser.add_argument("--plot", type=Path, default=None, help="plot path (default <out>/performance.png)")
    for api, variable in serve.PORT_VARIABLES.items():
        parser.add_argument(f"--{api}-port", type=int, default=int(os.environ.get(variable) or 0),
                            help=f"the report's TorchServe {api} port (default ${variable}, else a free port)")  # fmt: skip
    args = parser.parse_args(argv)
    args.users = [int(n) for n in args.users.split(",") if n.strip()]
    if not args.users or min(args.users) < 1 or max(args.users) > 64:
        parser.error("--users: 1..64")
    if not 1 <= args.duration <= 600:
        parser.error("--duration: 1..600 s")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    users = args.users
    out = args.out or HERE / "results" / time.strftime("report-%Y%m%dT%H%M%SZ", time.gmtime())
    plot_path = args.plot or out / "performance.png"
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every TorchServe worker

    photo = test_image()
    machine = machine_description()
    load_before = os.getloadavg()
    started = time.perf_counter()
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="cam-report-") as tmp:
        workdir = Path(tmp)
        store = workdir / "model_store"
        print("building archives ...", flush=True)
        build_archives(store, workdir, args.batch_delay, log=lambda line: None)
        ports = report_ports(args)
        print(f"starting TorchServe (ports {', '.join(f'{a} {p}' for a, p in ports.items())}) ...", flush=True)
        server = serve.start(workdir, store, [OURS_OFF, OURS_ON, STOCK], ports=ports, timeout=300,
                             grpc_ports=serve.grpc_ports_from_env())
        try:
            for model in (OURS_OFF, OURS_ON, STOCK):  # warm-up: first calls pay lazy initialisation
                for endpoint in ("predictions", "explanations"):
                    run_cell(server, Cell(model, endpoint, 1), photo, duration=0.5)
            for n in users:  # the handlers take turns at each level, so they see the same background load
                for model in (OURS_OFF, OURS_ON, STOCK):
                    for endpoint in ("predictions", "explanations"):
                        cell = run_cell(server, Cell(model, endpoint, n), photo, args.duration)
                        cells.append(cell)
                        print(f"  {LABELS[model]:>20} /{endpoint:<12} {n} users: {cell.throughput:7.2f} req/s, "
                              f"p50 {cell.percentile(50):7.0f} ms, {cell.failures} failed", flush=True)  # fmt: skip
                        for example in cell.failure_examples:
                            print(f"      failure: {example}")
        finally:
            serve.stop(workdir)
    load_after = os.getloadavg()

    ratios, targets = ratios_and_targets(cells, users)
    header = (
        f"Machine: {machine}\n\n"
        f"Workers: 1 per model, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(torch default)')}; "
        f"{args.duration:g} s per cell, closed-loop clients, 224x224 PNG of skimage's chelsea sent as raw bytes; "
        f"batching on = batchSize 8, maxBatchDelay {args.batch_delay} ms. Load average before "
        f"{load_before[0]:.1f}, after {load_after[0]:.1f}; {time.perf_counter() - started:.0f} s in all.\n"
    )
    verdicts = "\n".join(f"- [{'met' if ok else 'MISSED'}] {name}: {value}" for name, ok, value in targets)
    text = f"{header}\n{markdown(cells)}\n\n{ratios}\n\nTargets:\n{verdicts}\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    (out / "cells.json").write_text(json.dumps([
        {"model": c.model, "endpoint": c.endpoint, "users": c.users, "throughput": c.throughput,
         "p50": c.percentile(50), "p95": c.percentile(95), "p99": c.percentile(99), "bytes": c.mean_bytes,
         "requests": len(c.latencies), "failures": c.failures} for c in cells], indent=1))  # fmt: skip
    plot(cells, users, plot_path, machine)
    print()
    print(text)
    print(f"report: {out / 'report.md'}; plot: {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

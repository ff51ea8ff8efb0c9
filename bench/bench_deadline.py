"""What watching a model for the batch deadline costs (handlers.serving.deadline.watch): the forward pre-hook's
time per model call, on an empty module (the hook alone) and on the served default architecture, outside a run
(what a prediction pays) and inside one (what every explanation pass pays).

    .venv/bin/python bench/bench_deadline.py [--repeats 30] [--threads 1]

Prints microseconds per call without and with the hook, and the difference relative to one forward pass.
Bounded: a few hundred forward passes of EfficientNet-Lite0 (random weights, 224x224) on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from handlers.serving import deadline


def per_call(function: Callable[[], object], calls: int) -> float:
    """Seconds per call of ``function``, over ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls


def paired(plain: nn.Module, watched: nn.Module, x: torch.Tensor, calls: int, repeats: int, in_run: bool) -> tuple[float, float]:
    """Median seconds per call of ``plain`` and ``watched`` (interleaved rounds, so drift hits both alike)."""
    times: tuple[list[float], list[float]] = ([], [])
    due = deadline.Deadline.after(3600) if in_run else None
    with torch.inference_mode():
        for _ in range(repeats):
            for index, model in enumerate((plain, watched)):
                with deadline.active(due):
                    times[index].append(per_call(lambda model=model: model(x), calls))
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import timm

    empty, empty_watched = nn.Identity(), nn.Identity()
    deadline.watch(empty_watched)
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    watched = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    watched.load_state_dict(model.state_dict())
    deadline.watch(watched)
    tiny, image = torch.zeros(1), torch.rand(1, 3, 224, 224)
    print(f"{'module':<28} {'where':<12} {'plain us':>10} {'watched us':>11} {'hook us':>8} {'of a pass':>10}")
    forward = None
    for label, pair, x, calls in (
        ("efficientnet_lite0 224px", (model, watched), image, 2),
        ("nn.Identity (hook alone)", (empty, empty_watched), tiny, 20000),
    ):
        for in_run in (False, True):
            plain_s, watched_s = paired(*pair, x, calls, args.repeats, in_run)
            forward = forward or plain_s
            hook = watched_s - plain_s
            where = "in a run" if in_run else "prediction"
            print(f"{label:<28} {where:<12} {plain_s * 1e6:>10.1f} {watched_s * 1e6:>11.1f} {hook * 1e6:>8.2f} {hook / forward:>10.3%}")


if __name__ == "__main__":
    main()

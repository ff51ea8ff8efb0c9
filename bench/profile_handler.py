"""Where a served batch's time goes: the classifier handler in-process, stage by stage, and a cProfile.

    python bench/profile_handler.py [--batch 4] [--repeats 20] [--threads 1] [--photo jpeg|png] [--profile 15]

Builds the shipped ``efficientnet_lite0`` handler (random weights: the speed is the same) with a stand-in
TorchServe context, then times ``handle()`` on a batch of ``--batch`` identical requests (skimage's chelsea,
451x300 JPEG or a 224x224 PNG), unexplained and explained, and each stage of the explained path: parsing
(decode, resize, normalise), the model run (frozen forward / CAM run), the heatmap encode (inverse mapping,
PNG, base64) and the JSON answer. Medians of this thread's CPU time over ``--repeats`` (with one
thread, also explained against unexplained ``handle()`` interleaved: the throughput ratio a dedicated core
would give); with ``--profile N`` it also prints the N
costliest functions (cumulative) of the explained path under cProfile.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from handlers.serving import batch as serving  # noqa: E402
from handlers.tasks.classifier import ClassifierHandler  # noqa: E402
from tests.helpers.fake_context import FakeContext  # noqa: E402


def photo(kind: str) -> bytes:
    from skimage import data

    image = Image.fromarray(data.chelsea())
    buffer = io.BytesIO()
    if kind == "png":
        image.resize((224, 224)).save(buffer, "PNG")
    else:
        image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def build_handler(directory: Path) -> ClassifierHandler:
    config = yaml.safe_load((REPO_ROOT / "model_store/configs/efficientnet_lite0.yaml").read_text())
    config["handler"].update(weights=None, labels=None, num_classes=1000)
    (directory / "model-config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    handler = ClassifierHandler()
    handler.initialize(FakeContext(directory, "efficientnet_lite0"))
    return handler


def median_ms(fn, repeats: int, clock=time.thread_time) -> float:
    """Median milliseconds of ``fn()`` on ``clock``: this thread's CPU time by default, which a machine
    shared with other work inflates far less than wall time (torch runs on this thread with 1 thread)."""
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times) * 1000


def interleaved_ratio(explained, plain, repeats: int) -> tuple[float, float]:
    """``(explained ms, plain ms)``: medians of CPU time over ``repeats`` alternating calls."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in ((explained, times[0]), (plain, times[1])):
            start = time.thread_time()
            fn()
            bucket.append(time.thread_time() - start)
    return statistics.median(times[0]) * 1000, statistics.median(times[1]) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--photo", choices=("jpeg", "png"), default="jpeg")
    parser.add_argument("--no-split", action="store_true",
                        help="explanations on the eager channels-last model only (no frozen prefix), for comparison")
    parser.add_argument("--profile", type=int, default=0, help="print the N costliest functions (cProfile)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    body = photo(args.photo)
    with tempfile.TemporaryDirectory() as scratch:
        handler = build_handler(Path(scratch))
        if args.no_split and any(cam.forward_split is not None for cam in handler.cams.values()):
            for cam in handler.cams.values():
                cam.forward_split = None
            handler.channels_last = True
        torch.set_num_threads(args.threads)
        data = [{"body": bytearray(body)} for _ in range(args.batch)]
        plain = FakeContext(Path(scratch), "efficientnet_lite0", [False] * args.batch)
        explained = FakeContext(Path(scratch), "efficientnet_lite0", [True] * args.batch)

        requests = [handler.parse_request(i, {"body": body}, True) for i in range(args.batch)]
        batch = torch.stack([r.input for r in requests])
        state: dict = {}

        def run() -> None:
            state["outputs"], state["cams"] = handler.explain_batch(batch, requests)

        def encode() -> None:
            state["encoded"] = handler.encode_explanations(requests, state["cams"])

        rows = [
            ("handle, unexplained", lambda: handler.handle(data, plain)),
            ("handle, explained", lambda: handler.handle(data, explained)),
            ("  parse (decode, resize, normalise)", lambda: [handler.parse_request(i, {"body": body}, True) for i in range(args.batch)]),
            ("  frozen forward", lambda: handler.predict(batch)),
            ("  CAM run (explain_batch)", run),
            ("  encode (inverse map, PNG, base64)", encode),
            ("  answers (build_response + JSON)", lambda: [serving.json.dumps(handler.build_response(r, state["outputs"], i, e).body(handler.response_header()))
                                                       for i, (r, e) in enumerate(zip(requests, state["encoded"]))]),
        ]

        print(f"batch {args.batch}, {args.photo}, {torch.get_num_threads()} thread(s), CPU-time medians of {args.repeats}")
        for name, fn in rows:
            ms = median_ms(fn, args.repeats)
            print(f"{name:40s} {ms:8.2f} ms  ({ms / args.batch:6.2f} ms/image)")
        if torch.get_num_threads() == 1:
            ms_explained, ms_plain = interleaved_ratio(rows[1][1], rows[0][1], args.repeats)
            print(f"handle, explained / unexplained (interleaved): {ms_explained:.1f} / {ms_plain:.1f} ms = "
                  f"{ms_explained / ms_plain:.3f}x the cost; throughput ratio {ms_plain / ms_explained:.3f}")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.repeats):
                handler.handle(data, explained)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

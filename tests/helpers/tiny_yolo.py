"""A YOLOv8n saved as a real Ultralytics checkpoint: random weights, BatchNorm statistics calibrated.

Built offline from the package's own ``yolov8n.yaml`` (no hub). Straight from its initialiser a YOLOv8n
shrinks its activations ~100x per stage (BatchNorm running variance 1, eps 1e-3), so the head sees
~1e-9 and every anchor has the same score; a few forward passes in train mode over real photos set
the BatchNorm statistics, after which features, scores and CAMs vary over the image as they do in a
trained model; the class head's weights are then spread so scores range over (0, 1). :func:`session_yolo_checkpoint` builds one per process (for the session's TorchServe
archive), removed at exit. Everything here needs the optional ``ultralytics`` package.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["HAVE_ULTRALYTICS", "calibration_images", "save_yolo_checkpoint", "session_yolo_checkpoint"]

HAVE_ULTRALYTICS = importlib.util.find_spec("ultralytics") is not None


def calibration_images(size: tuple[int, int] = (160, 224)) -> torch.Tensor:
    """The four scikit-image photos and their mirror images, ``[8, 3, H, W]`` in [0, 1]."""
    from skimage import data

    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    batch = torch.cat([
        F.interpolate(torch.from_numpy(p).permute(2, 0, 1)[None].float() / 255, size=size, mode="bilinear")
        for p in photos
    ])  # fmt: skip
    return torch.cat([batch, batch.flip(-1)])


def save_yolo_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write a calibrated random-init YOLOv8n (80 classes) as an Ultralytics ``.pt`` to ``path``."""
    from handlers.models.yolo import require_ultralytics

    require_ultralytics()
    from ultralytics import YOLO

    torch.manual_seed(seed)
    yolo = YOLO("yolov8n.yaml")
    network = yolo.model
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a cumulative average over the calibration batch
            module.reset_running_stats()
    network.train()
    with torch.no_grad():
        network(calibration_images())
    network.eval()
    # The head's class priors start at ~1e-4 (Ultralytics' bias_init for 80 classes at 640): spread the
    # class logits instead, so that scores range over (0, 1) and NMS sees distinct scores, as trained.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in network.model[-1].cv3:
            last = branch[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=generator) * 0.3)
            last.bias.fill_(-4.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    yolo.save(str(path))
    return path


@functools.cache
def session_yolo_checkpoint() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="tiny-yolo-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return save_yolo_checkpoint(directory / "yolov8n-test.pt")

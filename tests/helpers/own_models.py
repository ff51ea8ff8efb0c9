"""Users' own models, built offline from small configs (no downloads): a TorchServe ``--model-file``
project (model.py CNN + state dict + index_to_name.json written with sorted keys), a random-init
Hugging Face ViT (3 classes) and a Hugging Face ResNet (4 classes), each as its ``save_pretrained``
directory. Session-cached versions are built once per process and removed at exit."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_FILE_CLASSES = [f"class_{i}" for i in range(12)]
VIT_LABELS = ["apple", "banana", "cherry"]
RESNET_LABELS = ["circle", "square", "triangle", "star"]
DETECTOR_LABELS = ["__background__", "red", "green", "blue"]
SEGMENTER_LABELS = ["__background__", "bright", "dark"]
STOCK_HANDLERS = ("image_classifier", "object_detector", "image_segmenter")

MODEL_PY = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """A user's own CNN: two conv blocks, global pooling, a 12-way head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 12)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))
'''


DETECTOR_PY = '''
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign


class TinyDetector(FasterRCNN):
    """A user's torchvision-style detector: a two-conv backbone (one stride-8 map), 4 classes."""

    def __init__(self, num_classes=4):
        backbone = nn.Sequential(nn.Conv2d(3, 16, 3, stride=4, padding=1), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        backbone.out_channels = 32
        anchors = AnchorGenerator(sizes=((32, 64, 128),), aspect_ratios=((0.5, 1.0, 2.0),))
        pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
        super().__init__(backbone, num_classes=num_classes, rpn_anchor_generator=anchors, box_roi_pool=pool,
                         box_score_thresh=0.0, box_detections_per_img=10, rpn_pre_nms_top_n_test=100,
                         rpn_post_nms_top_n_test=50)
'''

SEGMENTER_PY = '''
import torch.nn.functional as F
from torch import nn


class TinySegmenter(nn.Module):
    """A user's segmenter returning {"out": logits} (torchvision's and image_segmenter's convention)."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                     nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        logits = self.head(self.encoder(x))
        return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}
'''


def _save_project(directory: Path, source: str, class_name: str, weights: str, labels: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.py").write_text(source)
    namespace: dict = {}
    exec(compile(source, str(directory / "model.py"), "exec"), namespace)  # noqa: S102 - our own test source
    torch.manual_seed(0)
    model = namespace[class_name]()
    torch.save(model.state_dict(), directory / weights)
    (directory / "index_to_name.json").write_text(json.dumps(labels, sort_keys=True))
    return directory


def save_detector_project(directory: Path) -> Path:
    """``model.py`` (a FasterRCNN subclass, random init, seed 0), ``detector.pth``, ``index_to_name.json``."""
    return _save_project(directory, DETECTOR_PY, "TinyDetector", "detector.pth", dict(enumerate(DETECTOR_LABELS)))


def save_segmenter_project(directory: Path) -> Path:
    """``model.py`` (returns ``{"out": ...}``), ``segmenter.pth``, ``index_to_name.json``."""
    return _save_project(directory, SEGMENTER_PY, "TinySegmenter", "segmenter.pth", dict(enumerate(SEGMENTER_LABELS)))


def save_model_file_project(directory: Path) -> Path:
    """``model.py``, ``tinynet.pth`` (a state dict, seed 0) and TorchServe's ``index_to_name.json``
    (``{"0": ["n0", "class_0"], ...}`` written with ``sort_keys=True``: "10" comes before "2")."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.py").write_text(MODEL_PY)
    namespace: dict = {}
    exec(compile(MODEL_PY, str(directory / "model.py"), "exec"), namespace)  # noqa: S102 - our own test source
    torch.manual_seed(0)
    model = namespace["TinyNet"]()
    with torch.no_grad():  # distinct per-class biases, so the top class is stable
        model.fc.bias.copy_(torch.linspace(-1.0, 1.0, 12))
    torch.save(model.state_dict(), directory / "tinynet.pth")
    labels = {str(i): [f"n{i:08d}", name] for i, name in enumerate(MODEL_FILE_CLASSES)}
    (directory / "index_to_name.json").write_text(json.dumps(labels, sort_keys=True))
    return directory


def archive_model_file_project(
    project: Path, store: Path, name: str = "tinynet", handler: str = "classifier", config_file: Path | None = None
) -> Path:
    """The command of docs/own_models.md (``torch-model-archiver --model-file ... --handler
    handlers/tasks/<handler>.py``), exactly as a user runs it: the worker imports the installed
    torchserve-cam package (here the venv's editable install of this checkout). ``handler`` may also be a
    stock TorchServe handler name (``image_classifier``); ``config_file``: an optional ``--config-file``."""
    store.mkdir(parents=True, exist_ok=True)
    serialized = next(project.glob("*.pth"))
    handler_path = handler if handler in STOCK_HANDLERS else str(REPO_ROOT / "handlers" / "tasks" / f"{handler}.py")
    command = [
        sys.executable, "-m", "model_archiver.model_packaging", "--model-name", name, "--version", "1.0",
        "--model-file", str(project / "model.py"), "--serialized-file", str(serialized),
        "--extra-files", str(project / "index_to_name.json"), "--handler", handler_path,
        "--export-path", str(store), "--force",
    ]  # fmt: skip
    if config_file is not None:
        command += ["--config-file", str(config_file)]
    subprocess.run(command, check=True, capture_output=True, cwd=project, env={**os.environ, "TMPDIR": str(store)})
    return store / f"{name}.mar"


def save_hf_vit(directory: Path) -> Path:
    """A random-init ``ViTForImageClassification`` (32x32 input, 8x8 patches, 2 layers, 3 classes)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3, id2label=dict(enumerate(VIT_LABELS)),
                       label2id={name: i for i, name in enumerate(VIT_LABELS)})  # fmt: skip
    ViTForImageClassification(config).eval().save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(directory)
    return directory


def save_hf_resnet(directory: Path) -> Path:
    """A random-init ``ResNetForImageClassification`` (2 tiny stages, 4 classes), ConvNeXt image processor
    (shortest edge 64, crop_pct 0.875: resize the shorter side to 73, centre crop 64)."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=4,
                          id2label=dict(enumerate(RESNET_LABELS)), label2id={n: i for i, n in enumerate(RESNET_LABELS)})  # fmt: skip
    ResNetForImageClassification(config).eval().save_pretrained(directory)
    ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875).save_pretrained(directory)
    return directory


def _session_dir(prefix: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.cache
def session_model_file_project() -> Path:
    return save_model_file_project(_session_dir("own-model-file-") / "tinynet")


@functools.cache
def session_hf_vit() -> Path:
    return save_hf_vit(_session_dir("own-hf-vit-") / "vit")


@functools.cache
def session_hf_resnet() -> Path:
    return save_hf_resnet(_session_dir("own-hf-resnet-") / "resnet")


@functools.cache
def session_detector_project() -> Path:
    return save_detector_project(_session_dir("own-detector-") / "detector")


@functools.cache
def session_segmenter_project() -> Path:
    return save_segmenter_project(_session_dir("own-segmenter-") / "segmenter")


OWN_TORCHSERVE_FORMAT, OWN_DETECTOR, OWN_SEGMENTER = "own_tinynet_ts", "own_detector", "own_segmenter"


def _torchserve_format_archive(store: Path) -> Path:
    """The model-file archive with ``--config-file`` setting ``response_format: torchserve`` (the migration)."""
    config = _session_dir("own-ts-format-") / "model-config.yaml"
    config.write_text("handler:\n  response_format: torchserve\n")
    return archive_model_file_project(session_model_file_project(), store, OWN_TORCHSERVE_FORMAT, config_file=config)


def model_file_archives() -> list:
    """The session TorchServe's extra --model-file archives (tests/helpers/serving.py): the classifier with
    ``response_format: torchserve``, a detector and a segmenter, each made with the docs' archiver command."""
    return [
        _torchserve_format_archive,
        lambda store: archive_model_file_project(session_detector_project(), store, OWN_DETECTOR, "detection"),
        lambda store: archive_model_file_project(session_segmenter_project(), store, OWN_SEGMENTER, "segmentation"),
    ]

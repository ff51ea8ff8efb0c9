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


def archive_model_file_project(project: Path, store: Path, name: str = "tinynet", handler: str = "classifier") -> Path:
    """The command of docs/own_models.md (``torch-model-archiver --model-file ... --handler
    handlers/tasks/<handler>.py``), exactly as a user runs it: the worker imports the installed
    torchserve-cam package (here the venv's editable install of this checkout)."""
    store.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "model_archiver.model_packaging", "--model-name", name, "--version", "1.0",
        "--model-file", str(project / "model.py"), "--serialized-file", str(project / "tinynet.pth"),
        "--extra-files", str(project / "index_to_name.json"),
        "--handler", str(REPO_ROOT / "handlers" / "tasks" / f"{handler}.py"),
        "--export-path", str(store), "--force",
    ]  # fmt: skip
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

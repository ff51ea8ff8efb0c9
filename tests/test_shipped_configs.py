"""Every config in model_store/configs loads through the real handler (random weights, no archive); each in
a forked child (tests/helpers/forked.py), so pytest's memory after this file is one model's, not all of them.

``make test`` loads one config of each kind (its architecture family, task and reshape): the default
efficientnet_lite0, resnet18, DeiT and Swin (the two token-grid reshapes), every detector and segmenter and
the YOLO config. The large classifiers whose kind is already covered (vgg16, resnet50, densenet121,
mobilenet_v3_large, mnasnet1_0, vit_b_16: 60% of this file's time and its 6 GB peak) run in
``make test-peer``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from handlers.tasks.registry import TASKS
from model_store.build import CONFIG_DIR
from tests.helpers.fake_context import FakeContext  # noqa: E402
from tests.helpers.forked import in_child

CONFIGS = sorted(path.stem for path in CONFIG_DIR.glob("*.yaml") if not path.stem.startswith("clip"))  # clip: tests/test_clip.py


def test_the_issue_lists_are_all_there() -> None:
    expected = {"efficientnet_lite0", "resnet18", "resnet50", "vgg16", "densenet121", "mobilenet_v3_large",
                "mnasnet1_0", "vit_b_16", "deit", "swin"}  # fmt: skip
    assert expected <= set(CONFIGS)


#: covered in kind by a smaller config of ``make test`` (see the module docstring)
PEER_ONLY = {"vgg16", "resnet50", "densenet121", "mobilenet_v3_large", "mnasnet1_0", "vit_b_16"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.peer) if n in PEER_ONLY else n for n in CONFIGS]
)
def test_config_loads_and_explains(name: str, tmp_path: Path) -> None:
    in_child(_loads_and_explains, name, tmp_path)


def _loads_and_explains(name: str, tmp_path: Path) -> None:
    config = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    handler_section = config["handler"]
    if handler_section["architecture"].startswith("ultralytics/"):
        pytest.importorskip("ultralytics", reason="the optional [yolo] extra is not installed")
    handler_section["weights"] = None  # random init: this checks keys, layers, reshape and methods
    task = handler_section.get("task", "classifier")
    handler_section["labels"] = None
    handler_section["num_classes"] = {"detection": 91, "segmentation": 21}.get(task, 1000)
    if task == "embedding":  # concept images are staged by the build; this checks the model side
        handler_section["embedding"]["concepts"] = {}
    if task in ("detection", "segmentation"):  # keep the random-init check cheap on CPU
        handler_section["preprocessing"]["input_size"] = [160, 160]
    (tmp_path / "model-config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    handler = TASKS[task].handler_class()()
    handler.initialize(FakeContext(tmp_path, name))  # includes a warm-up CAM at the configured layers
    assert set(handler.cams) == {m.lower() for m in handler_section["methods"]}
    assert handler.config.explanation.default_method in handler.cams


def _fails() -> None:
    raise AssertionError("wrong layer")


def test_a_failure_in_the_child_fails_the_test() -> None:
    with pytest.raises(pytest.fail.Exception, match="wrong layer"):
        in_child(_fails)
    assert in_child(sum, [1, 2]) == 3

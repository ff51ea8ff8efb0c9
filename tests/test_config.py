"""Config validation: every problem fails the model load with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from handlers.config import ConfigError, HandlerConfig, PreprocessingConfig
from handlers.tasks.classifier import ClassifierHandler
from tests.helpers.fake_context import FakeContext  # noqa: E402

BASE = {
    "architecture": "resnet18",
    "labels": [f"class_{i}" for i in range(10)],
    "target_layers": ["layer4.-1"],
    "methods": ["gradcam", "eigencam"],
}


def model_dir(tmp_path: Path, **handler) -> Path:
    config = {"batchSize": 2, "handler": {**BASE, **handler}}
    (tmp_path / "model-config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_defaults_and_types() -> None:
    config = HandlerConfig.from_dict(BASE)
    assert config.preprocessing == PreprocessingConfig()
    assert config.preprocessing.crop is False and config.preprocessing.resize == "stretch"
    assert config.explanation.default_method == "gradcam"
    assert config.explanation.target_layers == ("layer4.-1",)


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({**BASE, "top_kk": 3}, "handler.top_kk"),
        ({**BASE, "preprocessing": {"meen": [0, 0, 0]}}, "handler.preprocessing.meen"),
        ({**BASE, "preprocessing": {"mean": [0, 0]}}, "handler.preprocessing.mean"),
        ({**BASE, "preprocessing": {"std": [1, 0, 1]}}, "handler.preprocessing.std"),
        ({**BASE, "preprocessing": {"resize": "squash"}}, "handler.preprocessing.resize"),
        ({**BASE, "preprocessing": {"resize": "shorter_side"}}, "handler.preprocessing.resize"),
        ({**BASE, "preprocessing": {"resize_size": 256}}, "handler.preprocessing.resize_size"),
        ({**BASE, "top_k": 0}, "handler.top_k"),
        ({**BASE, "max_targets": "five"}, "handler.max_targets"),
        ({**BASE, "explain_on_predict": "yes"}, "handler.explain_on_predict"),
        ({**BASE, "default_method": "layercam"}, "handler.default_method"),
        ({**BASE, "reshape": "conv"}, "handler.reshape"),
        ({**BASE, "heatmap_format": "png"}, "handler.heatmap_format"),  # a removed key: refused, named
        ({**BASE, "target_layers": []}, "handler.target_layers"),
        ({k: v for k, v in BASE.items() if k != "architecture"}, "handler.architecture"),
    ],
)
def test_static_errors_name_the_key(section: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        HandlerConfig.from_dict(section)
    assert str(info.value).startswith(key + ":"), str(info.value)


def test_unknown_key_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'max_targets'"):
        HandlerConfig.from_dict({**BASE, "max_target": 3})


@pytest.mark.parametrize(
    ("handler", "key", "detail"),
    [
        ({"target_layers": ["layer5.-1"]}, "handler.target_layers", "layer4"),
        ({"methods": ["gradcam", "deepdream"]}, "handler.methods", "deepdream"),
        ({"architecture": "resnet19"}, "handler.architecture", "resnet18"),
        ({"weights": "missing.pt"}, "handler.weights", "missing.pt"),
    ],
)
def test_model_load_fails_naming_the_key(tmp_path: Path, handler: dict, key: str, detail: str) -> None:
    context = FakeContext(model_dir(tmp_path, **handler))
    with pytest.raises(ConfigError) as info:
        ClassifierHandler().initialize(context)
    message = str(info.value)
    assert message.startswith(key + ":") and detail in message, message


def test_valid_config_loads_and_describes(tmp_path: Path) -> None:
    handler = ClassifierHandler()
    handler.initialize(FakeContext(model_dir(tmp_path, methods=["GradCAM", "eigencam"])))
    described = handler.describe()
    assert described["methods"] == ["gradcam", "eigencam"]  # class names map to registry names
    assert described["num_classes"] == 10 and described["target_layers"] == ["layer4.-1"]

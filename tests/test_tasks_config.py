"""Config validation for the task handlers: every mistake names its key, at load or build time."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from handlers.config import ConfigError, HandlerConfig
from handlers.tasks.detection import DetectionHandler
from model_store.build import ArchiveSpec, BuildError, build_archive
from tests.helpers.fake_context import FakeContext  # noqa: E402

DETECTION = {
    "task": "detection",
    "architecture": "fasterrcnn_mobilenet_v3_large_fpn",
    "num_classes": 3,
    "model_options": {"representation_size": 32},
    "preprocessing": {"input_size": [96, 96], "resize": "letterbox", "mean": [0, 0, 0], "std": [1, 1, 1]},
    "target_layers": ["backbone"],
    "reshape": "fasterrcnn",
    "methods": ["eigencam"],
}


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"task": "captioning"}, "handler.task"),
        ({"detection": {"score_threshold": 0.5}, "task": "segmentation"}, "handler.detection"),
        ({"detection": {"score_threshold": 1.5}}, "handler.detection.score_threshold"),
        ({"detection": {"explain_top": 0}}, "handler.detection.explain_top"),
        ({"detection": {"colour": 1}}, "handler.detection.colour"),
        ({"model_options": [1, 2]}, "handler.model_options"),
        ({"reshape": "fpn"}, "handler.reshape"),
    ],
)
def test_bad_task_keys_are_named(change: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}"):
        HandlerConfig.from_dict({**DETECTION, **change})


def test_embedding_concepts_parse() -> None:
    config = HandlerConfig.from_dict({
        "task": "embedding", "architecture": "resnet18_embedding", "target_layers": ["layer4.-1"],
        "embedding": {"concepts": {"cat": "cat.jpg", "dog": ["a.jpg", "b.jpg"]}, "max_references": 2},
    })  # fmt: skip
    assert config.embedding.concepts == (("cat", ("cat.jpg",)), ("dog", ("a.jpg", "b.jpg")))
    with pytest.raises(ConfigError, match="^handler.embedding.concepts.dog"):
        HandlerConfig.from_dict({**DETECTION, "task": "embedding", "embedding": {"concepts": {"dog": []}}})


@pytest.mark.parametrize(
    ("preprocessing", "message"),
    [
        ({"mean": [0.485, 0.456, 0.406]}, "mean / std"),
        ({"input_size": [96, 100]}, "divisible by 32"),
    ],
)
def test_detector_preprocessing_must_keep_maps_aligned(tmp_path: Path, preprocessing: dict, message: str) -> None:
    handler = {**DETECTION, "preprocessing": {**DETECTION["preprocessing"], **preprocessing}}
    (tmp_path / "model-config.yaml").write_text(yaml.safe_dump({"handler": handler}))
    with pytest.raises(ConfigError, match=message):
        DetectionHandler().initialize(FakeContext(tmp_path, "det"))


def test_build_refuses_a_missing_concept_image(tmp_path: Path) -> None:
    spec = ArchiveSpec(
        config="resnet50_embedding", archive_name="emb", allow_random_weights=True,
        overrides={"handler": {"architecture": "mobilenet_v3_small_embedding", "target_layers": ["features.-1"],
                               "embedding": {"concepts": {"ghost": ["concepts/no-such.jpg"]}}}},
    )  # fmt: skip
    with pytest.raises(BuildError, match="ghost"):
        build_archive(spec, tmp_path, log=lambda line: None)

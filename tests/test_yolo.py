"""Ultralytics YOLO (optional extra ``[yolo]``): post-processing, CAMs against the oracle, checkpoints, build.

The detector is a YOLOv8n built from the package's own YAML, saved as a real Ultralytics checkpoint
(tests/helpers/tiny_yolo.py). Serving it through TorchServe is in tests/test_serving_tasks.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cam_engine
from cam_engine import targets as ours
from handlers.models import architectures
from handlers.tasks.targets import RankedBoxTarget, ranked_detections
from tests.helpers.oracle import pearson
from tests.helpers.tiny_yolo import HAVE_ULTRALYTICS, calibration_images, session_yolo_checkpoint

pytestmark = pytest.mark.skipif(not HAVE_ULTRALYTICS, reason="the optional 'ultralytics' package is not installed")

LAYERS = ["model.model.15", "model.model.18", "model.model.21"]  # what YOLOv8's Detect head reads
R_MIN = 0.99


@pytest.fixture(scope="module")
def yolo():
    from handlers.models.yolo import read_checkpoint

    state = read_checkpoint(session_yolo_checkpoint())
    names, _ = state.pop("__names__"), state.pop("__config__")
    model = architectures.build("ultralytics/yolov8n", len(names), box_score_thresh=0.01)
    model.load_state_dict(state, strict=True)
    images = calibration_images((192, 256))[[0, 1, 5]]  # non-square, like the served images
    with torch.no_grad():
        detections = model(images)
    assert all(len(d["boxes"]) >= 3 for d in detections)
    return model, images, detections


def test_detections_are_ultralytics_nms(yolo) -> None:
    """Boxes, labels and scores equal Ultralytics' own non_max_suppression on the same head output."""
    from ultralytics.utils.nms import non_max_suppression

    model, images, detections = yolo
    with torch.no_grad():
        head = model.model(images)[0]
    reference = non_max_suppression(head, conf_thres=0.01, iou_thres=0.7, max_det=300)
    for row, (ours_, theirs) in enumerate(zip(detections, reference)):
        assert len(ours_["boxes"]) == len(theirs) > 0
        assert torch.allclose(ours_["boxes"], theirs[:, :4], atol=1e-4)
        assert torch.equal(ours_["labels"], theirs[:, 5].long())
        assert torch.allclose(ours_["scores"], theirs[:, 4])
        # the score is the head's class score at the anchor that produced the box
        assert torch.equal(ours_["scores"], head[row][4 + ours_["labels"], ours_["anchors"]])


def test_eigencam_agrees_with_the_reference(yolo, oracle) -> None:
    model, images, detections = yolo
    layers = [model.get_submodule(path) for path in LAYERS]
    targets = [oracle.utils.model_targets.FasterRCNNBoxScoreTarget(d["labels"][:1].tolist(), d["boxes"][:1].numpy())
               for d in detections]  # fmt: skip
    with oracle.EigenCAM(model, layers) as reference:
        expected = reference(images, targets)
    got = cam_engine.create("eigencam", model, LAYERS).explain(images)
    assert got.shape == (3, 192, 256)
    r = pearson(got.numpy(), expected)
    assert (r >= R_MIN).all(), r


@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_box_score_gradients_agree_with_the_reference(yolo, oracle, method: str) -> None:
    """FasterRCNNBoxScoreTarget of the 2nd best box through the whole YOLO, at the three head inputs."""
    model, images, detections = yolo
    picks = [ranked_detections(d)[1] for d in detections]
    labels = [[int(d["labels"][i])] for d, i in zip(detections, picks)]
    boxes = [d["boxes"][i : i + 1].detach() for d, i in zip(detections, picks)]
    reference_class = {"gradcam": oracle.GradCAM, "hirescam": oracle.HiResCAM}[method]
    with reference_class(model, [model.get_submodule(path) for path in LAYERS]) as reference:
        expected = reference(images, [oracle.utils.model_targets.FasterRCNNBoxScoreTarget(lab, box.numpy())
                                      for lab, box in zip(labels, boxes)])  # fmt: skip
    cam = cam_engine.create(method, model, LAYERS)
    got = cam.explain(images, [ours.FasterRCNNBoxScoreTarget(lab, box) for lab, box in zip(labels, boxes)])
    assert got.amax(dim=(1, 2)).min() > 0
    r = pearson(got.numpy(), expected)
    assert (r >= R_MIN).all(), r
    # the serving target for "the box of rank 1" is the same target
    ranked = cam.explain(images, [RankedBoxTarget(1)] * len(images))
    assert torch.allclose(ranked, got, atol=1e-5)


def test_gradients_after_a_prediction_of_the_same_shape(yolo) -> None:
    """The head caches its anchors per input shape; a prediction under inference_mode must not leave
    tensors that a later gradient CAM of the same shape cannot use (TorchServe: predict, then explain)."""
    model, images, _ = yolo
    with torch.inference_mode():
        model(images[:1])
    got = cam_engine.create("gradcam", model, LAYERS).explain(images[:1], [RankedBoxTarget(0)])
    assert got.max() > 0


def test_one_forward_explains_several_boxes(yolo) -> None:
    """Several boxes of one image: one batched backward, each CAM equal to explaining that box alone."""
    model, images, _ = yolo
    cam = cam_engine.create("gradcam", model, LAYERS)
    together = cam.run(images[:1], [[RankedBoxTarget(0), RankedBoxTarget(2)]]).cams
    alone = torch.cat([cam.explain(images[:1], [RankedBoxTarget(rank)]) for rank in (0, 2)])
    assert torch.allclose(together, alone, atol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-2)  # different boxes, different evidence


def test_checkpoint_formats_and_class_names(tmp_path: Path) -> None:
    from handlers.models.yolo import coco80_labels, read_checkpoint

    state = read_checkpoint(session_yolo_checkpoint())
    names = state.pop("__names__")
    assert state.pop("__config__") == "yolov8n"
    assert names == [str(i) for i in range(80)]  # a model built from the YAML names classes by index
    model = architectures.build("ultralytics/yolov8n", 80)
    assert set(state) == set(model.state_dict())
    torch.save(model.state_dict(), tmp_path / "wrapped.pt")  # plain state dicts load too, with or without prefix
    torch.save(model.model.state_dict(), tmp_path / "bare.pt")
    for file in ("wrapped.pt", "bare.pt"):
        plain = read_checkpoint(tmp_path / file)
        assert "__names__" not in plain and all(torch.equal(plain[k], v) for k, v in model.state_dict().items())
    labels = coco80_labels()
    assert len(labels) == 80 and labels[:3] == ["person", "bicycle", "car"]


def test_importing_it_leaves_pil_and_torch_alone() -> None:
    """Ultralytics patches PIL.Image.open (a non-image would raise ModuleNotFoundError for pi-heif, or try
    to install it) and torch.save on import; the handlers undo both."""
    import io

    from PIL import Image, UnidentifiedImageError

    from handlers.models.yolo import require_ultralytics

    require_ultralytics()
    assert Image.open.__module__ == "PIL.Image" and torch.save.__module__ == "torch.serialization"
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(b"not an image"))


def test_unsupported_configs_fail_clearly() -> None:
    with pytest.raises(KeyError, match="no model config"):
        architectures.build("ultralytics/yolov8nope", 80)
    with pytest.raises(KeyError, match="NMS head"):
        architectures.build("ultralytics/yolov8n-seg", 80)


def test_build_checks_classes_and_input_size(tmp_path: Path) -> None:
    from model_store.build import ArchiveSpec, BuildError, build_archive

    checkpoint = str(session_yolo_checkpoint())
    with pytest.raises(BuildError, match="has 80 classes"):
        build_archive(ArchiveSpec(config="yolov8n", weights=checkpoint, overrides={"handler": {"labels": ["a", "b"]}}),
                      tmp_path, log=lambda line: None)  # fmt: skip
    from handlers.config import ConfigError

    with pytest.raises(ConfigError, match="divisible by 32"):
        build_archive(ArchiveSpec(config="yolov8n", weights=checkpoint,
                                  overrides={"handler": {"preprocessing": {"input_size": [200, 200]}}}),
                      tmp_path, log=lambda line: None)  # fmt: skip
    with pytest.raises(BuildError, match=r"built from yolov8n.yaml: set handler.architecture"):
        build_archive(ArchiveSpec(config="yolov8n", weights=checkpoint,
                                  overrides={"handler": {"architecture": "ultralytics/yolo11n"}}),
                      tmp_path, log=lambda line: None)  # fmt: skip
    with pytest.raises(BuildError, match="labels: checkpoint needs --weights"):
        build_archive(ArchiveSpec(config="yolov8n", allow_random_weights=True,
                                  overrides={"handler": {"labels": "checkpoint"}}), tmp_path, log=lambda line: None)  # fmt: skip
    assert not list(tmp_path.glob("*.mar"))

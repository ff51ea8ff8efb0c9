"""The archive builder refuses to build without weights unless told that random weights are wanted."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_store.build import ArchiveSpec, BuildError, build_archive, main


def test_no_weights_no_archive(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="--allow-random-weights"):
        build_archive(ArchiveSpec(config="resnet18"), tmp_path, log=lambda line: None)
    assert main(["resnet18", "--output", str(tmp_path)]) == 1
    assert not list(tmp_path.glob("*.mar"))


def test_unknown_config_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="efficientnet_lite0"):
        build_archive(ArchiveSpec(config="resnet19"), tmp_path, log=lambda line: None)

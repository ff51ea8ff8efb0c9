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


def test_the_test_archive_cache_keeps_the_newest_versions_of_each_name_only(tmp_path: Path) -> None:
    """tests/helpers/archive_cache.py: every code change builds each test archive anew; prune keeps the three
    most recently used versions per name and touches no other name (one that merely starts the same)."""
    import os

    from tests.helpers.archive_cache import prune

    for age in range(5):
        version = tmp_path / f"own_tinynet-{age:024d}.mar"
        version.write_bytes(b"x")
        os.utime(version, (1000 + age, 1000 + age))
    (tmp_path / "own_tinynet_ts-000.mar").write_bytes(b"y")
    prune(tmp_path, {"own_tinynet"})
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        *(f"own_tinynet-{age:024d}.mar" for age in (2, 3, 4)), "own_tinynet_ts-000.mar"
    ]

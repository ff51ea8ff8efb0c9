"""handlers.serving.threads: the intra-op thread count from fake cgroup files, affinity, workers and models,
and (through the session TorchServe) the count a real worker logged and used."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from handlers.serving import threads


def _cgroup(tmp_path: Path, files: dict[str, str], membership: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(membership)
    return root, proc


def test_cgroup_v2_quota_in_the_process_own_group(tmp_path):
    root, proc = _cgroup(tmp_path, {"kubepods/pod1/cpu.max": "150000 100000\n", "cpu.max": "max 100000\n"},
                         "0::/kubepods/pod1\n")  # fmt: skip
    assert threads.cgroup_cpu_limit(root, proc) == pytest.approx(1.5)


def test_cgroup_v2_unlimited(tmp_path):
    root, proc = _cgroup(tmp_path, {"cpu.max": "max 100000\n"}, "0::/\n")
    assert threads.cgroup_cpu_limit(root, proc) is None


def test_cgroup_v1_quota_and_period(tmp_path):
    root, proc = _cgroup(
        tmp_path,
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        },
        "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n",
    )
    assert threads.cgroup_cpu_limit(root, proc) == pytest.approx(3.0)


def test_cgroup_v1_no_quota(tmp_path):
    root, proc = _cgroup(
        tmp_path, {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "1:cpu:/\n"
    )
    assert threads.cgroup_cpu_limit(root, proc) is None


def test_usable_cpus_is_the_quota_when_below_the_affinity(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    root, proc = _cgroup(tmp_path, {"cpu.max": "50000 100000\n"}, "0::/\n")
    assert threads.usable_cpus(root, proc) == pytest.approx(min(affinity, 0.5))
    root, proc = _cgroup(tmp_path / "big", {"cpu.max": f"{(affinity + 8) * 100000} 100000\n"}, "0::/\n")
    assert threads.usable_cpus(root, proc) == affinity


@pytest.mark.parametrize(
    ("cpus", "workers", "models", "expected"),
    [
        (2, 1, 1, 1),  # a 2-core machine: one core to the frontend, one thread
        (16, 1, 1, 15),
        (16, 2, 1, 7),
        (16, 1, 4, 3),
        (1.5, 1, 1, 1),  # fractional quota below 2: never zero
        (0.5, 2, 3, 1),
        (64, 4, 4, 3),
    ],
)
def test_sized_count(cpus, workers, models, expected):
    plan = threads.plan_threads({"minWorkers": workers}, environ={}, cpus=cpus, models=models)
    assert (plan.threads, plan.source, plan.workers) == (expected, "sized", workers)


def test_explicit_settings_win_in_order():
    config = {"maxWorkers": 2, "minWorkers": 1}
    assert threads.plan_threads(config, 5, environ={"OMP_NUM_THREADS": "3"}, cpus=16, models=1).threads == 3
    plan = threads.plan_threads(config, 5, environ={"OMP_NUM_THREADS": ""}, cpus=16, models=1)
    assert (plan.threads, plan.source) == (5, "handler.threads")
    plan = threads.plan_threads(config, None, environ={"OMP_NUM_THREADS": "junk"}, cpus=16, models=1)
    assert (plan.threads, plan.workers) == (7, 2)  # maxWorkers counts: the worst case of the scaling range


def test_models_from_the_frontend_command_line(tmp_path):
    base = ["java", "-cp", "x", "org.pytorch.serve.ModelServer", "--python", "py", "-f", "c.properties"]
    assert threads.models_served(base + ["-s", str(tmp_path), "-m", "a=a.mar", "b=b.mar", "-ncs"]) == 2
    for name in ("a.mar", "b.mar", "c.mar"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "unpacked_model").mkdir()
    (tmp_path / "notes.txt").write_text("")
    assert threads.models_served(base + ["-s", str(tmp_path), "-m", "all"]) == 4
    assert threads.models_served(base + ["-s", str(tmp_path)]) == 1  # no models at start-up
    assert threads.models_served(["bash", "-c", "x"]) == 1  # not started by TorchServe


def test_configure_sets_and_reports_torch_threads(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        plan = threads.configure({"minWorkers": 1})
        assert (plan.threads, plan.source, torch.get_num_threads()) == (1, "OMP_NUM_THREADS", 1)
    finally:
        torch.set_num_threads(before)


def test_handler_threads_key_is_validated():
    from handlers.config import ConfigError, HandlerConfig

    base = {"architecture": "resnet18", "num_classes": 2, "target_layers": ["layer4"]}
    assert HandlerConfig.from_dict(base).threads is None
    assert HandlerConfig.from_dict({**base, "threads": 2}).threads == 2
    with pytest.raises(ConfigError, match="handler.threads"):
        HandlerConfig.from_dict({**base, "threads": 0})


def test_served_worker_logged_and_used_the_sized_count(server):
    """The session TorchServe's default-model worker sized its threads as plan_threads does here."""
    from tests.helpers.serving import DEFAULT_MODEL, TEST_ARCHIVES

    log = (server.workdir / "logs" / "model_log.log").read_text()
    lines = [line for line in log.splitlines() if "torch threads:" in line and f"-{DEFAULT_MODEL}_" in line]
    assert lines, log[-2000:]
    expected = threads.plan_threads({"minWorkers": 1, "maxWorkers": 1}, None, models=len(TEST_ARCHIVES))
    found = re.search(r"torch threads: (\d+) .*torch.get_num_threads\(\) = (\d+)", lines[0])
    assert found, lines[0]
    assert int(found.group(1)) == int(found.group(2)) == expected.threads, (lines[0], expected)
    if expected.source == "sized":
        assert f"shared by 1 worker(s) x {len(TEST_ARCHIVES)} model(s)" in lines[0], lines[0]

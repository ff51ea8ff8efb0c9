"""`make gpu-check` on a machine without CUDA: it says why it skipped, writes that in its report, exits 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="a CUDA device is present: the full check runs via make gpu-check"
)
def test_gpu_check_skips_cleanly_without_cuda(tmp_path):
    report = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--report", str(report)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    written = json.loads(report.read_text())
    assert written["status"] == "skipped" and written["steps"] == {}
    assert "CUDA" in written["reason"]
    assert done.stdout.startswith(f"gpu-check: skipped ({written['reason']})"), done.stdout
    assert written["machine"]["torch"] == torch.__version__

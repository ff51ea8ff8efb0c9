"""One-shot GPU check (``make gpu-check``): everything the CUDA path needs to show, in one command.

    .venv/bin/python bench/gpu_check.py [--report load_tests/results/gpu_check.json] [--budget 480]

On a machine where ``torch.cuda.is_available()``, within ``--budget`` seconds (8 minutes by default):

1. ``tests``: the tests marked ``cuda`` (``tests/test_cuda.py``): every cam_engine method on the GPU;
   fp32/fp16/bf16 on the GPU against fp32 on the CPU; no device-to-host copy in ``run()`` (profiler);
2. ``engine``: ResNet-50 (random init, no download), batch 64, 224x224, fp16 and bf16: forward
   throughput (``inference_mode``) and GradCAM explanation throughput at ``layer4`` (the same forward
   plus the truncated backward); goal: explanation / forward >= 0.8 in fp16;
3. ``serving``: the real EfficientNet-Lite0 archive served by TorchServe on the GPU (free loopback ports),
   the worker's device read back from the management describe, then a ``--locust-seconds`` Locust run
   (``--users`` users, the ``mix`` scenario, every answer checked, the SLO file enforced).

It writes one JSON report (per step: status, seconds, figures, the output's tail) and prints a summary.
Exit status 1 when a step failed. On a machine without CUDA it writes a report with ``"status":
"skipped"`` and the reason, and exits 0 (``tests/test_gpu_check.py`` runs it so in the default suite).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

MODEL = "efficientnet_lite0"
DEFAULT_REPORT = REPO_ROOT / "load_tests" / "results" / "gpu_check.json"


def cuda_missing_reason() -> str | None:
    """Why this machine cannot run the check (None when a CUDA device is usable)."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return f"no CUDA device: torch.cuda.is_available() is False{hint}"
    return None


def _tail(text: str, limit: int = 3000) -> str:
    return text[-limit:]


def step_tests(seconds: float) -> dict[str, Any]:
    """The ``cuda``-marked tests in a subprocess; passes when none fails or errors."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "cuda",
        "tests/test_cuda.py",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    try:
        done = subprocess.run(
            command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=seconds
        )
    except subprocess.TimeoutExpired as error:
        return {
            "status": "failed",
            "reason": f"timed out after {seconds:.0f}s",
            "output": _tail(str(error.stdout or "")),
        }
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    return {
        "status": "passed" if done.returncode == 0 else "failed",
        "summary": summary,
        "output": _tail(done.stdout + done.stderr),
    }


def _throughput(call, batch: int, repeats: int) -> float:
    """Images per second of ``call()`` (median of ``repeats`` synchronised timings, after 3 warm-ups)."""
    import torch

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def _engine_row(dtype: Any, batch: int, repeats: int, device: str = "cuda") -> dict[str, float]:
    """Forward and GradCAM throughput of ResNet-50 in ``dtype`` on the GPU, and their ratio."""
    import torch
    import torchvision

    import cam_engine

    torch.manual_seed(0)
    model = torchvision.models.resnet50(zero_init_residual=True).eval().to(device, dtype)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    cam = cam_engine.create("gradcam", model, ["layer4"])

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    forward_rate = _throughput(forward, batch, repeats)
    explain_rate = _throughput(lambda: cam.run(x), batch, repeats)
    return {
        "forward_images_per_s": round(forward_rate, 1),
        "explanation_images_per_s": round(explain_rate, 1),
        "ratio": round(explain_rate / forward_rate, 3),
    }


def step_engine(batch: int = 64, repeats: int = 10) -> dict[str, Any]:
    """ResNet-50 forward vs GradCAM explanation throughput on the GPU, fp16 and bf16."""
    import torch

    rows = {}
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        rows[name] = _engine_row(dtype, batch, repeats)
        torch.cuda.empty_cache()
    ratio = rows["fp16"]["ratio"]
    return {
        "status": "passed" if ratio >= 0.8 else "failed",
        "setting": f"ResNet-50, batch {batch}, 224x224, GradCAM at layer4, median of {repeats}",
        "goal": "fp16 explanation / forward throughput >= 0.8",
        "results": rows,
    }


def _locust_stats(path: Path) -> dict[str, Any]:
    rows = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            rows[row["Name"]] = {
                "requests": int(row["Request Count"]),
                "failures": int(row["Failure Count"]),
                "requests_per_s": round(float(row["Requests/s"]), 2),
                "p50_ms": float(row["50%"] or "nan"),
                "p95_ms": float(row["95%"] or "nan"),
            }
    return rows


def step_serving(seconds: float, users: int, locust_seconds: int) -> dict[str, Any]:
    """Lite0 from TorchServe on the GPU, its device from the describe, then a Locust run."""
    import requests

    from model_store import serve
    from model_store.build import ArchiveSpec, build_archive

    result: dict[str, Any] = {"status": "failed"}
    deadline = time.monotonic() + seconds
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        workdir = Path(tmp)
        store = workdir / "model_store"
        build_archive(ArchiveSpec(config=MODEL), store, log=lambda line: None)
        ports = {api: serve.free_port() for api in serve.PORT_VARIABLES}
        server = serve.start(
            workdir,
            store,
            [MODEL],
            ports=ports,
            timeout=max(30.0, deadline - time.monotonic() - locust_seconds - 60),
        )
        try:
            described = requests.get(
                f"{server.url('management')}/models/{MODEL}?customized=true",
                headers=server.headers("management"),
                timeout=30,
            ).json()
            metadata = described[0].get("customizedMetadata", "{}")
            device = (json.loads(metadata) if isinstance(metadata, str) else metadata).get("device")
            result["worker_device"] = device
            locust = Path(sys.executable).parent / "locust"
            command = [
                str(locust), "-f", str(REPO_ROOT / "load_tests" / "locustfile.py"), "--headless", "--only-summary",
                "--host", server.url(), "--management-url", server.url("management"),
                "--key-file", str(workdir / "key_file.json"), "--tags", "mix", "--model", MODEL,
                "-u", str(users), "-r", str(users), "-t", f"{locust_seconds}s", "--stop-timeout", "30",
                "--csv", str(workdir / "locust"),
            ]  # fmt: skip
            remaining = max(10.0, deadline - time.monotonic())
            done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=remaining)
            result["locust_exit_code"] = done.returncode
            result["output"] = _tail(done.stdout + done.stderr)
            stats = workdir / "locust_stats.csv"
            result["locust"] = _locust_stats(stats) if stats.exists() else {}
            on_gpu = isinstance(device, str) and device.startswith("cuda")
            if not on_gpu:
                result["reason"] = f"the worker runs on {device!r}, not on the GPU"
            elif done.returncode != 0:
                result["reason"] = "Locust reported failed requests or an SLO breach (see output)"
            else:
                result["status"] = "passed"
        finally:
            serve.stop(workdir)
    result["setting"] = f"{MODEL} (real weights), {users} users, mix scenario, {locust_seconds}s"
    return result


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    info["cpus"] = os.cpu_count()
    return info


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"gpu-check: {report['status']}" + (f" ({report['reason']})" if report.get("reason") else "")]
    for name, step in report.get("steps", {}).items():
        detail = step.get("summary") or step.get("reason") or ""
        lines.append(f"- {name}: {step['status']} in {step.get('seconds', 0):.0f}s {detail}".rstrip())
        if name == "engine" and "results" in step:
            for dtype, row in step["results"].items():
                lines.append(
                    f"    {dtype}: forward {row['forward_images_per_s']} img/s, explanation "
                    f"{row['explanation_images_per_s']} img/s, ratio {row['ratio']} (goal >= 0.8 in fp16)"
                )
        if name == "serving" and step.get("locust"):
            total = step["locust"].get("Aggregated", {})
            lines.append(
                f"    worker on {step.get('worker_device')}: {total.get('requests_per_s')} req/s, "
                f"p50 {total.get('p50_ms')} ms, p95 {total.get('p95_ms')} ms, {total.get('failures')} failures"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT, help="the JSON report to write")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--locust-seconds", type=int, default=60)
    args = parser.parse_args(argv)
    started = time.monotonic()
    report: dict[str, Any] = {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
    }
    reason = cuda_missing_reason()
    if reason is not None:
        report.update(status="skipped", reason=reason, steps={})
    else:
        steps: dict[str, Any] = {}
        report["steps"] = steps
        plan = [
            ("tests", lambda left: step_tests(min(210.0, left - 170))),
            ("engine", lambda left: step_engine()),
            ("serving", lambda left: step_serving(left - 5, args.users, args.locust_seconds)),
        ]
        for name, run in plan:
            left = args.budget - (time.monotonic() - started)
            begin = time.monotonic()
            try:
                steps[name] = run(left)
            except Exception as error:  # noqa: BLE001 - recorded in the report, the next step still runs
                steps[name] = {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
            steps[name]["seconds"] = round(time.monotonic() - begin, 1)
        failed = [name for name, step in steps.items() if step["status"] != "passed"]
        report["status"] = "failed" if failed else "passed"
        if failed:
            report["reason"] = f"failed: {', '.join(failed)}"
    report["seconds"] = round(time.monotonic() - started, 1)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(summary_lines(report)))
    print(f"report: {args.report}")
    return 1 if report["status"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())

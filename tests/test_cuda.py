"""cam_engine on a CUDA device (marker ``cuda``; skipped without a GPU; ``make gpu-check`` runs them).

- every registered method runs on the GPU and gives CAMs on the GPU, in [0, 1], of the input's size;
- fp32/fp16/bf16 on the GPU against fp32 on the CPU: same top class, CAMs within a precision bound;
- the hot path makes no device-to-host copy: ``run()`` of the one-pass methods is profiled with
  ``torch.profiler`` and the ``Memcpy DtoH`` events are counted.

``CAM_CUDA_TEST_DEVICE=cpu`` runs the same comparisons on the CPU (fp32/bf16 only, no profiler check),
to check the tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import cam_engine
from cam_engine.targets import ClassifierOutputTarget

DEVICE = os.environ.get("CAM_CUDA_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE.startswith("cuda")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        ON_CUDA and not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"
    ),
]

LAYER = ["features.-1"]
ONE_PASS = [
    "gradcam",
    "hirescam",
    "gradcam++",
    "xgradcam",
    "layercam",
    "gradcam_elementwise",
    "eigencam",
    "fem",
]
# Mean |CAM difference| (CAMs are in [0, 1]) allowed against fp32 on the CPU.
TOLERANCE = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    from tests.helpers.synthetic import make_shapes

    return make_shapes(8, size=64, seed=3)[0]


@pytest.fixture(autouse=True)
def _exact_fp32():
    """No TF32 inside the fp32 comparison (Ampere and later would use it for convolutions)."""
    if not torch.cuda.is_available():
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _on(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return copy.deepcopy(model).to(device=DEVICE, dtype=dtype).eval()


@pytest.mark.parametrize("method", cam_engine.methods())
def test_every_method_runs_on_the_device(trained_cnn, images, method):
    model = _on(trained_cnn, torch.float32)
    x = images[:4].to(DEVICE)
    result = cam_engine.create(method, model, LAYER).run(
        x, [[ClassifierOutputTarget(c)] for c in (0, 1, 2, 0)]
    )
    cams = result.cams
    assert cams.device.type == torch.device(DEVICE).type
    assert tuple(cams.shape) == (4, 64, 64) and cams.dtype == torch.float32
    assert bool(torch.isfinite(cams).all()) and float(cams.min()) >= 0.0 and float(cams.max()) <= 1.0 + 1e-6


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize("method", ONE_PASS)
def test_device_precision_matches_cpu_fp32(trained_cnn, images, method, dtype):
    if dtype == torch.float16 and not ON_CUDA:
        pytest.skip("fp16 convolutions are a GPU feature")
    reference_model = copy.deepcopy(trained_cnn).float().eval()
    targets = [[ClassifierOutputTarget(int(c))] for c in reference_model(images).argmax(1)]
    expected = cam_engine.create(method, reference_model, LAYER).run(images, targets)
    result = cam_engine.create(method, _on(trained_cnn, dtype), LAYER).run(images.to(DEVICE, dtype), targets)
    assert result.cams.dtype == torch.float32
    assert torch.equal(result.outputs.float().argmax(1).cpu(), expected.outputs.argmax(1))
    difference = (result.cams.cpu() - expected.cams).abs().mean().item()
    assert difference <= TOLERANCE[dtype], f"{method} {dtype}: mean |difference| {difference:.4f}"


@pytest.mark.skipif(not ON_CUDA, reason="counts CUDA memcpy events")
@pytest.mark.parametrize(
    "method", ["gradcam", "hirescam", "layercam"]
)  # SVD methods: cuSOLVER reads its status back
def test_hot_path_makes_no_device_to_host_copy(trained_cnn, images, method):
    from torch.profiler import ProfilerActivity, profile

    model = _on(trained_cnn, torch.float16)
    cam = cam_engine.create(method, model, LAYER)
    x = images.to(DEVICE, torch.float16)
    targets = [[ClassifierOutputTarget(1)] for _ in range(len(x))]
    cam.run(x, targets)  # warm-up: cuDNN autotuning, allocator
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = cam.run(x, targets)
        torch.cuda.synchronize()
    copies = [e.name for e in prof.events() if "Memcpy DtoH" in e.name or "memcpy dtoh" in e.name.lower()]
    assert result.cams.is_cuda
    assert copies == [], f"{method}: {len(copies)} device-to-host copies in run(): {copies[:5]}"

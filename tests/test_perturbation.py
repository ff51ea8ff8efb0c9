"""ScoreCAM, AblationCAM, FullGrad and RandomCAM against grad-cam 1.5.7, plus memory and safety checks.

Oracle cases: random-init torchvision resnet18 at layer3 and layer4, and a ViT-Tiny (a residual
stream bypasses every target) through ``vit_reshape_transform``. Inputs are small (48x48 / 64x64)
so that the reference's hundreds of forward passes stay cheap; agreement is Pearson r >= 0.99 per
image (|r| for eigen_smooth, whose sign is arbitrary in the reference).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from torch import nn

import cam_engine
from cam_engine.perturbation import ablation_order
from cam_engine.reshape import vit_reshape_transform
from cam_engine.targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

pg = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.ablation_layer import AblationLayerVit  # noqa: E402

R_MIN = 0.99


def pearson(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(np.corrcoef(x.ravel(), y.ravel())[0, 1]) for x, y in zip(a, b)]


def quiet(fn, *args, **kwargs):
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _vit_reference_reshape(grid: int):
    def reshape(tensor: torch.Tensor) -> torch.Tensor:
        result = tensor[:, 1:, :].reshape(tensor.size(0), grid, grid, tensor.size(2))
        return result.permute(0, 3, 1, 2)

    return reshape



@pytest.fixture(scope="module")
def vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # ViT-Tiny widths, 3 blocks, 32x32 input (2x2 patch grid + class token): small enough for the
    # reference's one-forward-per-channel loops, and every target is bypassed by the residual stream.
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, depth=3).eval()


def tiny_cnn(channels: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 4),
    ).eval()


def _case(name: str, resnet: nn.Module, vit: nn.Module, batch: int = 2):
    """(our model, reference model, our layers, reference layers, our reshape, reference reshape, input)."""
    generator = torch.Generator().manual_seed(1)
    if name == "vit":
        x = torch.randn(batch, 3, 32, 32, generator=generator)
        ref = copy.deepcopy(vit)
        return vit, ref, ["blocks.-1.norm1"], [ref.blocks[-1].norm1], vit_reshape_transform, _vit_reference_reshape(2), x
    layer = {"resnet-layer4": "layer4", "resnet-layer3": "layer3"}[name]
    # layer4 is 2x2 at 48x48, layer3 2x2 at 32x32
    x = torch.randn(batch, 3, 48 if layer == "layer4" else 32, 48 if layer == "layer4" else 32, generator=generator)
    ref = copy.deepcopy(resnet)
    return resnet, ref, [layer], [getattr(ref, layer)[-1]], None, None, x


CASES = ["resnet-layer4", "resnet-layer3", "vit"]


@pytest.mark.parametrize("name", CASES)
def test_scorecam_matches_reference(name, resnet, vit):
    # One image: the reference runs a forward pass per channel (512 at layer4).
    model, ref_model, layers, ref_layers, reshape, ref_reshape, x = _case(name, resnet, vit, batch=1)
    ours = cam_engine.ScoreCAM(model, layers, reshape_transform=reshape, batch_size=24)(x)
    reference = pg.ScoreCAM(ref_model, ref_layers, reshape_transform=ref_reshape)
    reference.batch_size = 32
    expected = quiet(reference, x, None)
    assert ours.shape == expected.shape == (1, *x.shape[2:])
    assert min(pearson(ours, expected)) >= R_MIN
    np.testing.assert_allclose(ours, expected, atol=1e-3)


@pytest.mark.parametrize("name", CASES)
def test_ablationcam_matches_reference(name, resnet, vit):
    model, ref_model, layers, ref_layers, reshape, ref_reshape, x = _case(name, resnet, vit)
    cam = cam_engine.AblationCAM(model, layers, reshape_transform=reshape, batch_size=16)
    targets = [ClassifierOutputTarget(3), ClassifierOutputTarget(7)]
    ours = cam(x, targets)
    # ViT: grad-cam's documented ablation layer for token outputs ablates a channel in every token.
    extra = {"ablation_layer": AblationLayerVit()} if name == "vit" else {}
    expected = quiet(pg.AblationCAM(ref_model, ref_layers, reshape_transform=ref_reshape, batch_size=16, **extra),
                     x, targets)
    assert min(pearson(ours, expected)) >= R_MIN
    np.testing.assert_allclose(ours, expected, atol=1e-3)
    # Only the downstream part ran: ResNet needs no upstream pass at all; the ViT's residual stream
    # (x + attn(norm1(x))) is fed by the one image and broadcast over the ablated copies.
    assert cam.last_modes == {0: "broadcast" if name == "vit" else "empty"}


@pytest.mark.parametrize("name", ["resnet-layer4", "vit"])
def test_fullgrad_matches_reference(name, resnet, vit):
    model, ref_model, _, _, _, _, x = _case(name, resnet, vit)
    ours = cam_engine.FullGrad(model)(x)
    expected = quiet(pg.FullGrad(ref_model, []), x, None)
    assert min(pearson(ours, expected)) >= R_MIN
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    smooth = cam_engine.FullGrad(model)(x, eigen_smooth=True)
    expected_smooth = quiet(pg.FullGrad(ref_model, []), x, None, eigen_smooth=True)
    assert min(abs(r) for r in pearson(smooth, expected_smooth)) >= R_MIN


def test_fullgrad_uses_every_bias_layer_and_fills_no_parameter_grad(resnet):
    cam = cam_engine.FullGrad(resnet, ["layer4"])  # target layers are ignored, as in the reference
    assert len(cam.target_layers) == sum(isinstance(m, nn.BatchNorm2d) for m in resnet.modules())
    cam(torch.randn(1, 3, 48, 48))
    assert all(p.grad is None for p in resnet.parameters())


def test_randomcam_matches_reference_with_numpy_seed(resnet):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    np.random.seed(5)
    ours = cam_engine.RandomCAM(resnet, ["layer3"])(x)
    np.random.seed(5)
    ref_model = copy.deepcopy(resnet)
    expected = quiet(pg.RandomCAM(ref_model, [ref_model.layer3[-1]]), x, None)
    # grad-cam's RandomCAM takes gradients only to know the shape; the weights are the same draw.
    assert all(cam.std() > 0 for cam in expected)
    assert min(pearson(ours, expected)) >= R_MIN
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    seeded = [cam_engine.RandomCAM(resnet, ["layer4"], seed=3)(x) for _ in range(2)]
    np.testing.assert_array_equal(seeded[0], seeded[1])


def test_ablationcam_modes_agree_and_ratio_matches_reference():
    model = tiny_cnn(channels=24)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    cams = {mode: cam_engine.AblationCAM(model, ["2"], batch_size=5, mode=mode)(x) for mode in ("empty", "broadcast", "full")}
    np.testing.assert_allclose(cams["empty"], cams["full"], atol=1e-5)
    np.testing.assert_allclose(cams["broadcast"], cams["full"], atol=1e-5)
    ours = cam_engine.AblationCAM(model, ["3"], batch_size=5, ratio_channels_to_ablate=0.25)(x)
    ref_model = copy.deepcopy(model)
    expected = quiet(pg.AblationCAM(ref_model, [ref_model[3]], batch_size=5, ratio_channels_to_ablate=0.25), x, None)
    assert min(pearson(ours, expected)) >= R_MIN
    assert len(ablation_order(torch.rand(24, 8, 8), 0.25)) == 12


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_batch_equals_single_and_several_targets(method):
    model = tiny_cnn()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    cam = cam_engine.create(method, model, ["3"], batch_size=7)
    targets = [ClassifierOutputTarget(1), ClassifierOutputSoftmaxTarget(2), ClassifierOutputTarget(0)]
    batched = cam(x, targets)
    singles = np.concatenate([cam(x[i : i + 1], [targets[i]]) for i in range(3)])
    np.testing.assert_allclose(batched, singles, atol=1e-5)
    result = cam.run(x, [[ClassifierOutputTarget(0), ClassifierOutputTarget(1)], [], [ClassifierOutputTarget(3)]])
    assert result.pairs == [(0, 0), (0, 1), (2, 0)]
    for row, (image, category) in zip(result.cams, [(0, 0), (0, 1), (2, 3)]):
        single = cam(x[image : image + 1], [ClassifierOutputTarget(category)])[0]
        np.testing.assert_allclose(row.numpy(), single, atol=1e-5)


def _peak_allocated_bytes(fn, trace_path) -> int:
    """Peak of live bytes in torch's CPU allocator while ``fn`` runs.

    Every allocation and free is a ``[memory]`` event (signed ``Bytes``) in the profiler's trace;
    the running sum in time order is the live total, its maximum the peak.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(trace_path))
    with open(trace_path) as handle:
        events = [e for e in json.load(handle)["traceEvents"] if e.get("name") == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e["ts"]):
        if event["args"].get("Device Type", 0) == 0:  # CPU
            live += event["args"]["Bytes"]
            peak = max(peak, live)
    return peak


def test_scorecam_peak_memory_grows_with_batch_size_not_channels(tmp_path):
    """Counted with the profiler's allocator events: every tensor torch allocates on the CPU."""
    size = 192
    image_bytes = 3 * size * size * 4  # one masked input

    def model_with(channels: int) -> nn.Module:
        # A pooling stem and a 1x1 conv: per-row activations ([C, 6, 6]) and weights stay small next
        # to a masked input, so what the peak counts is the masked inputs.
        torch.manual_seed(0)
        return nn.Sequential(nn.AvgPool2d(32), nn.Conv2d(3, channels, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(channels, 2)).eval()

    x = torch.randn(2, 3, size, size)

    def peak(channels: int, batch_size: int) -> int:
        cam = cam_engine.ScoreCAM(model_with(channels), ["2"], batch_size=batch_size)
        return _peak_allocated_bytes(lambda: cam(x, [ClassifierOutputTarget(0)] * 2), tmp_path / "trace.json")

    small, wide, wide_big_batch = peak(16, 4), peak(256, 4), peak(256, 16)
    print(f"peak bytes: 16 ch bs 4: {small}, 256 ch bs 4: {wide}, 256 ch bs 16: {wide_big_batch}; "
          f"one masked input: {image_bytes}")
    # 16x more channels: far less than even 16 more masked inputs (the reference builds all 2 * 256).
    assert wide - small < 2 * image_bytes, (small, wide)
    assert wide < 0.05 * (2 * 256 * image_bytes)
    # 12 more rows per chunk: at least 12 more masked inputs live at the peak.
    assert wide_big_batch - wide > 12 * image_bytes, (wide, wide_big_batch)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "fullgrad", "randomcam"])
def test_model_unchanged_and_hooks_removed(method):
    model = tiny_cnn().train()
    before = copy.deepcopy(model.state_dict())
    modules_before = [type(m) for m in model.modules()]
    cam = cam_engine.create(method, model, ["3"])
    out = cam(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 16, 16) and out.min() >= 0 and out.max() <= 1
    assert model.training and all(m.training for m in model.modules())
    assert [type(m) for m in model.modules()] == modules_before
    assert _hooks(model) == 0
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(RuntimeError):
        cam(torch.randn(2, 5, 16, 16))  # a failing call leaves no hook behind either
    assert _hooks(model) == 0


def test_registry_names():
    for name, cls in [("scorecam", cam_engine.ScoreCAM), ("ablationcam", cam_engine.AblationCAM),
                      ("fullgrad", cam_engine.FullGrad), ("randomcam", cam_engine.RandomCAM)]:
        assert name in cam_engine.methods()
        assert cam_engine.get_method(name) is cls
        assert cam_engine.get_method(cls.__name__) is cls


def test_ablationcam_probe_uses_an_image_with_targets():
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    cam = cam_engine.AblationCAM(model, ["3"], batch_size=6)
    result = cam.run(x, [[], [ClassifierOutputTarget(2)]])
    assert result.pairs == [(1, 0)]
    assert cam.last_modes == {0: "empty"}  # the probe checked image 1, the one with a target
    np.testing.assert_allclose(result.cams[0].numpy(), cam(x[1:], [ClassifierOutputTarget(2)])[0], atol=1e-6)


def _unfuse_batch_norm_act(module: nn.Module) -> nn.Module:
    """timm's BatchNormAct2d -> Sequential(exact BatchNorm2d with the same state, drop, act), in place."""
    from cam_engine.fullgrad import fused_activation

    for name, child in module.named_children():
        if fused_activation(child) is not None:
            plain = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum)
            plain.load_state_dict(child.state_dict())
            setattr(module, name, nn.Sequential(plain, child.drop, child.act).eval())
        else:
            _unfuse_batch_norm_act(child)
    return module


def test_fullgrad_reads_batch_norms_fused_with_their_activation():
    """EfficientNet (timm) fuses every BatchNorm with its activation and has no conv bias: the
    reference finds no bias layer there. Ours reads each fused BatchNorm where it enters its
    activation, which equals the reference on the same network with the BatchNorms un-fused."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=10).eval()
    for module in model.modules():  # non-trivial running statistics, so every effective bias differs
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    unfused = _unfuse_batch_norm_act(copy.deepcopy(model))
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
        assert torch.allclose(model(x), unfused(x), atol=1e-5)  # the same function
    fused = sum(1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    conv_biases = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.bias is not None)  # SE blocks
    assert len(cam_engine.FullGrad(model).target_layers) == fused + conv_biases and fused > 0
    ours = cam_engine.FullGrad(model)(x)
    expected = quiet(pg.FullGrad(unfused, []), x, None)
    assert min(pearson(ours, expected)) >= R_MIN
    np.testing.assert_allclose(ours, expected, atol=1e-4)

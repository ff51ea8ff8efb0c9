"""The engine's guarantees: no side effects, truncated backward, batching, dtypes, output types."""

from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

import cam_engine
from cam_engine import LayerNotFoundError, reshape
from cam_engine.targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
from tests.helpers.oracle import pearson
from tests.helpers.synthetic import SmallCNN

GRADIENT_METHODS = ["gradcam", "hirescam", "gradcam++", "xgradcam", "layercam", "gradcam_elementwise",
                    "eigengradcam", "shapleycam", "finercam"]
ALL_METHODS = GRADIENT_METHODS + ["eigencam", "kpca_cam", "fem"]



def snapshot(model: nn.Module):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        "modules": [type(m) for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["hooks"] == before["hooks"], "a hook survived the call"
    assert after["modules"] == before["modules"]
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key
    assert all(p.grad is None for p in model.parameters()), "a parameter gradient was filled"


def test_registry_names_and_lookup():
    assert cam_engine.methods()[:12] == ["gradcam", "hirescam", "gradcam++", "xgradcam", "layercam",
                                         "gradcam_elementwise", "eigencam", "eigengradcam", "kpca_cam",
                                         "fem", "shapleycam", "finercam"]
    assert cam_engine.get_method("GradCAM") is cam_engine.GradCAM
    assert cam_engine.get_method("GRADCAM++") is cam_engine.GradCAMPlusPlus
    assert cam_engine.get_method("kpca_cam") is cam_engine.KPCA_CAM
    with pytest.raises(ValueError, match="unknown CAM method 'gradcan'.*gradcam"):
        cam_engine.create("gradcan", nn.Linear(1, 1), [])


@pytest.mark.parametrize("name", ALL_METHODS)
def test_model_unchanged_and_no_hooks_left(resnet, name):
    resnet.layer2.train()  # mixed modes must come back exactly as they were
    resnet.layer1[0].conv1.weight.requires_grad_(False)
    before = snapshot(resnet)
    try:
        cams = cam_engine.create(name, resnet, ["layer4.-1"]).explain(torch.randn(2, 3, 64, 64))
        assert cams.shape == (2, 64, 64) and torch.isfinite(cams).all()
        assert_unchanged(resnet, before)
    finally:
        resnet.eval()
        resnet.layer1[0].conv1.weight.requires_grad_(True)


def test_model_unchanged_after_exceptions(resnet):
    before = snapshot(resnet)

    def broken_target(output):
        raise IndexError("target failed")

    cam = cam_engine.GradCAM(resnet, [resnet.layer4[-1]])
    with pytest.raises(IndexError, match="target failed"):
        with cam:  # unlike the reference, the context manager swallows nothing
            cam(torch.randn(1, 3, 64, 64), [broken_target])
    assert_unchanged(resnet, before)
    with pytest.raises(RuntimeError):
        cam(torch.randn(1, 5, 64, 64))  # wrong channel count fails inside the forward pass
    assert_unchanged(resnet, before)
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        cam(torch.randn(1, 3, 64, 64), [ClassifierOutputTarget(0)] * 2)
    assert_unchanged(resnet, before)


def test_backward_stops_at_target_layer(resnet):
    """Nothing upstream of the target records a graph; gradient-free methods run in inference mode."""
    seen = {}
    upstream = resnet.layer3.register_forward_hook(
        lambda m, i, o: seen.update(upstream_requires_grad=o.requires_grad, upstream_grad_mode=torch.is_grad_enabled())
    )
    downstream = resnet.fc.register_forward_hook(lambda m, i, o: seen.update(downstream_requires_grad=o.requires_grad))
    try:
        cam_engine.GradCAM(resnet, ["layer4.-1"]).explain(torch.randn(1, 3, 64, 64))
        assert seen == {"upstream_requires_grad": False, "upstream_grad_mode": False, "downstream_requires_grad": True}
        seen.clear()
        cam_engine.EigenCAM(resnet, ["layer4.-1"]).explain(torch.randn(1, 3, 64, 64))
        assert seen["downstream_requires_grad"] is False
        flags = {}
        probe = resnet.layer4.register_forward_hook(lambda m, i, o: flags.update(inference=torch.is_inference_mode_enabled()))
        cam_engine.FEM(resnet, ["layer4.-1"]).explain(torch.randn(1, 3, 64, 64))
        probe.remove()
        assert flags["inference"] is True
    finally:
        upstream.remove()
        downstream.remove()


@pytest.mark.parametrize("name", ALL_METHODS)
def test_batch_equals_single_images(resnet, name):
    torch.manual_seed(1)
    x = torch.randn(3, 3, 64, 64)
    targets = [ClassifierOutputTarget(c) for c in (1, 4, 9)]
    cam = cam_engine.create(name, resnet, ["layer4.-1"])
    batched = cam.explain(x, None if name == "finercam" else targets)
    for i in range(3):
        single = cam.explain(x[i : i + 1], None if name == "finercam" else targets[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single, atol=2e-5, rtol=1e-4)


def test_several_targets_per_image_reuse_one_forward(resnet):
    calls = []
    hook = resnet.conv1.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        x = torch.randn(2, 3, 64, 64)
        cam = cam_engine.GradCAM(resnet, ["layer4.-1"])
        result = cam.run(x, [[ClassifierOutputTarget(1), ClassifierOutputTarget(2)], [ClassifierOutputTarget(3)]])
        assert len(calls) == 1
        assert result.pairs == [(0, 0), (0, 1), (1, 0)]
        assert result.cams.shape == (3, 64, 64)
        assert result.outputs.shape == (2, 10)
        torch.testing.assert_close(result.outputs, resnet(x))
        for row, (image, target) in zip([0, 1, 2], [(0, 1), (0, 2), (1, 3)]):
            single = cam.explain(x[image : image + 1], [ClassifierOutputTarget(target)])
            torch.testing.assert_close(result.cams[row : row + 1], single, atol=2e-5, rtol=1e-4)
        empty = cam.run(x, [[], [ClassifierOutputTarget(3)]])  # image 0: predictions only
        assert empty.pairs == [(1, 0)]
        torch.testing.assert_close(empty.cams, result.cams[2:], atol=2e-5, rtol=1e-4)
    finally:
        hook.remove()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_memory_flat_over_500_calls():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    cam = cam_engine.GradCAM(model, ["features.-1"])
    x = torch.randn(2, 3, 32, 32)
    targets = [ClassifierOutputSoftmaxTarget(0), ClassifierOutputSoftmaxTarget(1)]

    def tensors_alive() -> int:
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    for _ in range(50):
        cam(x, targets)
    rss_warm, alive_warm = _rss_bytes(), tensors_alive()
    for _ in range(450):
        cam(x, targets)
    rss_end, alive_end = _rss_bytes(), tensors_alive()
    assert alive_end == alive_warm, f"tensors alive grew from {alive_warm} to {alive_end}"
    assert rss_end - rss_warm < 16 * 2**20, f"RSS grew by {(rss_end - rss_warm) / 2**20:.1f} MiB"


def test_dotted_paths(resnet):
    assert cam_engine.resolve_layer(resnet, "layer4.-1") is resnet.layer4[-1]
    assert cam_engine.resolve_layer(resnet, "layer4.0.conv1") is resnet.layer4[0].conv1
    vit = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    assert cam_engine.resolve_layer(vit, "blocks.-1.norm1") is vit.blocks[-1].norm1
    with pytest.raises(LayerNotFoundError) as error:
        cam_engine.resolve_layer(resnet, "layer5.-1")
    assert "layer4" in str(error.value) and "'layer5'" in str(error.value)
    with pytest.raises(LayerNotFoundError, match="layer4.-1.conv1"):
        cam_engine.resolve_layer(resnet, "layer4.-1.conv0")
    with pytest.raises(LayerNotFoundError, match="no sub-module '7'"):
        cam_engine.GradCAM(resnet, ["layer4.7"])
    with pytest.raises(LayerNotFoundError, match="blocks.-1.norm1|blocks.1.norm1"):
        cam_engine.resolve_layer(vit, "blocks.-1.norm")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_give_finite_float32_cams(resnet, dtype):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 128, 128)
    targets = [ClassifierOutputTarget(c) for c in resnet(x).argmax(1).tolist()]
    reference = cam_engine.GradCAM(resnet, ["layer4.-1"]).explain(x, targets)
    assert (reference.flatten(1).std(1) > 0.05).all()  # a non-degenerate map to compare with
    low = torchvision.models.resnet18(num_classes=10).eval()
    low.load_state_dict(resnet.state_dict())
    low = low.to(dtype)
    cams = cam_engine.GradCAM(low, ["layer4.-1"]).explain(x, targets)  # float32 input is cast
    assert cams.dtype == torch.float32 and torch.isfinite(cams).all()
    assert (pearson(cams.numpy(), reference.numpy()) > 0.95).all()


class TupleOutput(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x), {"aux": x.mean()}


class DictOutput(TupleOutput):
    def forward(self, x):
        return {"logits": self.model(x), "features": x}


class HFOutput(TupleOutput):
    def forward(self, x):
        from transformers.modeling_outputs import ImageClassifierOutput

        return ImageClassifierOutput(logits=self.model(x))


@pytest.mark.parametrize("wrapper", [TupleOutput, DictOutput, HFOutput])
def test_structured_outputs(resnet, wrapper):
    x = torch.randn(2, 3, 64, 64)
    expected = cam_engine.GradCAM(resnet, ["layer4.-1"]).explain(x)
    wrapped = wrapper(resnet)
    torch.testing.assert_close(cam_engine.GradCAM(wrapped, ["model.layer4.-1"]).explain(x), expected)


@pytest.mark.parametrize(
    "tokens,size,expected",
    [
        (257, (224, 224), (1, 16, 16)),  # ViT-L/14 at 224
        (50, (224, 224), (1, 7, 7)),  # ViT-B/32
        (577, (336, 336), (1, 24, 24)),  # ViT-L/14 at 336
        (197, (224, 224), (1, 14, 14)),  # ViT-B/16
        (198, (224, 224), (2, 14, 14)),  # distilled DeiT: class + distillation tokens
        (281, (224, 320), (1, 14, 20)),  # non-square input to a /16 model
        (196, (224, 224), (0, 14, 14)),  # no class token
    ],
)
def test_token_grid(tokens, size, expected):
    assert reshape.token_grid(tokens, size) == expected


def test_vit_non_square_end_to_end():
    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(img_size=(48, 80), patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                        num_classes=5).eval()
    x = torch.randn(2, 3, 48, 80)
    inferred = cam_engine.GradCAM(vit, ["blocks.-1.norm1"], reshape_transform=reshape.vit_reshape_transform).explain(x)
    explicit = cam_engine.GradCAM(
        vit, ["blocks.-1.norm1"], reshape_transform=lambda t: reshape.vit_reshape_transform(t, 6, 10)
    ).explain(x)
    assert inferred.shape == (2, 48, 80)
    torch.testing.assert_close(inferred, explicit)
    with pytest.raises(ValueError, match="reshape_transform"):
        cam_engine.GradCAM(vit, ["blocks.-1.norm1"]).explain(x)


def test_swin_nhwc_reshape():
    maps = torch.randn(2, 7, 5, 16)
    assert torch.equal(reshape.swin_reshape_transform(maps), maps.permute(0, 3, 1, 2))
    tokens = torch.randn(2, 49, 16)
    assert reshape.swin_reshape_transform(tokens).shape == (2, 16, 7, 7)


def test_shapleycam_matches_its_formula_on_a_vit():
    """ShapleyCAM weights = spatial mean of (g - H A / 2), computed here with a full-graph autograd pass."""
    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                        num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    targets = [ClassifierOutputSoftmaxTarget(1), ClassifierOutputSoftmaxTarget(3)]
    got = cam_engine.ShapleyCAM(vit, ["blocks.-1.norm1"], reshape_transform=reshape.vit_reshape_transform)(x, targets)

    captured = {}
    hook = vit.blocks[-1].norm1.register_forward_hook(lambda m, i, o: captured.update(a=o))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        out = vit(x.requires_grad_(True))
    hook.remove()
    activations = captured["a"]
    score = sum(t(o) for t, o in zip(targets, out))
    (grads,) = torch.autograd.grad(score, activations, create_graph=True)
    (hvp,) = torch.autograd.grad(grads, activations, grad_outputs=activations)
    maps = lambda t: t[:, 1:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2).detach()  # noqa: E731
    weights = maps(grads - 0.5 * hvp).mean(dim=(2, 3))
    assert maps(hvp).abs().max() > 0  # the second-order term is really exercised
    cam = (weights[:, :, None, None] * maps(activations)).sum(1).clamp_min(0)
    cam = cam_engine.functional.scale_per_image(cam)
    cam = torch.nn.functional.interpolate(cam[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    expected = cam_engine.functional.scale_per_image(cam).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_several_targets_take_one_batched_backward():
    """T targets per image: one vmapped backward (is_grads_batched), equal to T separate passes."""
    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                        num_classes=6).eval()
    x = torch.randn(2, 3, 32, 32)
    targets = [[ClassifierOutputTarget(c) for c in (0, 2, 4, 5)], [ClassifierOutputTarget(1)]]
    cam = cam_engine.GradCAM(vit, ["blocks.-1.norm1"], reshape_transform=reshape.vit_reshape_transform)
    backward_calls = []
    original = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        backward_calls.append(kwargs.get("is_grads_batched", False))
        return original(*args, **kwargs)

    torch.autograd.grad = counting_grad
    try:
        batched = cam.run(x, targets).cams
        assert backward_calls == [True]
        backward_calls.clear()
        cam.batch_target_gradients = False
        looped = cam.run(x, targets).cams
        assert backward_calls == [False] * 4
    finally:
        torch.autograd.grad = original
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-4)

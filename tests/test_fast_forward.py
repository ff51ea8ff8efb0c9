"""handlers.serving.fast_forward: the frozen prediction copy and the batch-norm fold change speed, never answers."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torchvision
from torch import nn

import cam_engine
from handlers.serving import fast_forward


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine terms, so a wrong fold shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval().requires_grad_(False)


class ConvNormReadTwice(nn.Module):
    """The conv's output feeds the batch norm *and* a residual sum: folding would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return (self.bn(y) + y).mean(dim=(2, 3))


class DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": self.conv(x).mean(dim=(2, 3))}


def test_frozen_predictor_matches_the_eager_model_at_any_batch_size() -> None:
    torch.manual_seed(0)
    model = _randomise_norms(torchvision.models.resnet18(num_classes=10))
    predictor = fast_forward.build_predictor(model, (64, 64), torch.device("cpu"))
    assert predictor is not None
    x = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        expected, got = model(x), predictor(x)
    assert got.shape == (3, 10)
    assert torch.allclose(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_no_frozen_predictor_for_a_model_without_one_output_tensor() -> None:
    assert fast_forward.build_predictor(DictOutput().eval(), (16, 16), torch.device("cpu")) is None


def test_folded_resnet_gives_the_same_outputs_and_cams_under_the_same_layer_names() -> None:
    torch.manual_seed(1)
    original = _randomise_norms(torchvision.models.resnet18(num_classes=10))
    model = _randomise_norms(torchvision.models.resnet18(num_classes=10))
    model.load_state_dict(original.state_dict())
    assert fast_forward.fold_batch_norms(model, (64, 64)) == 20  # every conv -> bn pair, downsamples included
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert fast_forward.to_channels_last(model)
    x = torch.rand(2, 3, 64, 64)
    targets = [[cam_engine.targets.ClassifierOutputTarget(3)], [cam_engine.targets.ClassifierOutputTarget(7)]]
    expected = cam_engine.create("gradcam", original, [cam_engine.resolve_layer(original, "layer4.-1.bn2")]).run(x, targets)
    got = cam_engine.create("gradcam", model, [cam_engine.resolve_layer(model, "layer4.-1.bn2")]).run(
        x.contiguous(memory_format=torch.channels_last), targets
    )
    assert torch.allclose(got.outputs, expected.outputs, atol=1e-4)
    assert got.cams.shape == expected.cams.shape == (2, 64, 64)
    assert float((got.cams - expected.cams).abs().max()) < 1e-4


def test_a_conv_output_read_elsewhere_is_not_folded() -> None:
    torch.manual_seed(2)
    model = _randomise_norms(ConvNormReadTwice())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fast_forward.fold_batch_norms(model, (8, 8)) == 0
    assert isinstance(model.bn, nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _handler(model: nn.Module, layers: dict[str, list[str]], size: tuple[int, int]) -> SimpleNamespace:
    cams = {name: cam_engine.create(name, model, [cam_engine.resolve_layer(model, p) for p in paths])
            for name, paths in layers.items()}  # fmt: skip
    config = SimpleNamespace(preprocessing=SimpleNamespace(input_size=list(size)))
    return SimpleNamespace(model=model, cams=cams, device=torch.device("cpu"), config=config,
                           fast_forward=True, channels_last=True)  # fmt: skip


def _split(handler: SimpleNamespace) -> bool:
    """``fast_forward.split_explanations`` as ``CamHandler.initialize`` calls it, channels-last off on a split."""
    size = tuple(handler.config.preprocessing.input_size)
    split = fast_forward.split_explanations(handler.cams.values(), handler.model, size, handler.device, True)
    handler.channels_last = handler.channels_last and not split
    return split


def test_explanations_through_the_frozen_prefix_give_the_same_cams_and_outputs() -> None:
    torch.manual_seed(3)
    model = _randomise_norms(torchvision.models.resnet18(num_classes=10))
    reference = _randomise_norms(torchvision.models.resnet18(num_classes=10))
    reference.load_state_dict(model.state_dict())
    fast_forward.fold_batch_norms(model, (64, 64))
    handler = _handler(model, {"gradcam": ["layer4"], "eigencam": ["layer4"]}, (64, 64))
    assert _split(handler)
    assert handler.channels_last is False  # the frozen prefix takes the default memory format
    assert all(isinstance(cam.forward_split.prefix, torch.jit.ScriptModule) for cam in handler.cams.values())
    x = torch.rand(3, 3, 64, 64)
    targets = [[cam_engine.targets.ClassifierOutputTarget(c)] for c in (2, 5, 8)]
    for name in ("gradcam", "eigencam"):
        expected = cam_engine.create(name, reference, [reference.layer4]).run(x, targets)
        got = handler.cams[name].run(x, targets)
        scale = float(expected.outputs.abs().max())
        assert float((got.outputs - expected.outputs).abs().max()) < 1e-4 * scale
        assert float((got.cams - expected.cams).abs().max()) < 1e-3


def test_no_frozen_prefix_without_one_shared_cleanly_cut_layer() -> None:
    torch.manual_seed(4)
    model = torchvision.models.resnet18(num_classes=10).eval().requires_grad_(False)
    for layers in ({"gradcam": ["layer4"], "eigencam": ["layer3"]},  # two layers
                   {"gradcam": ["layer4.0.conv1"]}):  # a shortcut crosses the cut  # fmt: skip
        handler = _handler(model, layers, (32, 32))
        assert not _split(handler)
        assert handler.channels_last is True
        assert all(cam.forward_split is None for cam in handler.cams.values())


def test_captum_methods_beside_the_cams_keep_the_eager_model_and_the_cams_still_split() -> None:
    """A config listing Captum attributions beside CAMs (the default archive does): the attributions have no
    target-layer hooks and run the eager model; the cam_engine CAMs still get the frozen prefix."""
    torch.manual_seed(5)
    model = torchvision.models.resnet18(num_classes=10).eval().requires_grad_(False)
    handler = _handler(model, {"gradcam": ["layer4"]}, (32, 32))
    handler.cams["integrated_gradients"] = SimpleNamespace(run=lambda x, targets, **options: None)
    assert _split(handler)
    assert handler.cams["gradcam"].forward_split is not None
    assert not hasattr(handler.cams["integrated_gradients"], "forward_split")


def test_the_folded_model_stays_entirely_in_eval_mode() -> None:
    """Replacement modules are built in training mode by default; left so, every CAM call would switch
    (and restore) them, and a train()-only consumer would see a mixed model."""
    model = _randomise_norms(torchvision.models.resnet18(num_classes=10))
    assert fast_forward.fold_batch_norms(model, (32, 32)) == 20
    assert [name for name, module in model.named_modules() if module.training] == []

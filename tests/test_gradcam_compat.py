"""The drop-in surface added for grad-cam 1.5.7 users, against the oracle (pytorch-grad-cam 1.5.7).

New methods (SegEigenCAM, RefineCAM, SESS, DFF, sobel_cam), metrics (ARCC and its parts),
utilities, grad-cam's BaseCAM extension points for user subclasses, and signatures/behaviours
(AblationCAM's positional order and custom ablation layers, FinerCAM's positional eigen_smooth,
OpenCV colour maps, 3-D resize). Random-init models; thresholds: Pearson r >= 0.99 or exact.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import cam_engine
from cam_engine.targets import ClassifierOutputTarget
from tests.helpers.oracle import pearson


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


def agree(got: np.ndarray, expected: np.ndarray, r: float = 0.99) -> bool:
    """Per image: Pearson r >= ``r``, or the same map (constant maps have no correlation)."""
    same = np.abs(got - expected).reshape(len(got), -1).max(axis=1) <= 1e-4
    return bool(((pearson(got, expected) >= r) | same).all())


def _no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ------------------------------------------------------------------------------------ new methods
def test_seg_eigen_cam_matches_reference(oracle, resnet, batch):
    targets = [ClassifierOutputTarget(3), ClassifierOutputTarget(7)]
    got = cam_engine.SegEigenCAM(resnet, [resnet.layer4[-1]])(batch, targets)
    expected = oracle.SegEigenCAM(resnet, [resnet.layer4[-1]])(batch, targets)
    assert agree(got, expected)


@pytest.mark.parametrize("base", ["GradCAM", "GradCAMPlusPlus", "EigenCAM"])
def test_refine_cam_matches_reference(oracle, resnet, batch, base):
    from pytorch_grad_cam.refine_cam import RefineCAM as ReferenceRefineCAM

    layers = [resnet.layer4[-1], resnet.layer3[-1]]
    targets = [ClassifierOutputTarget(3), ClassifierOutputTarget(7)]
    got = cam_engine.RefineCAM(resnet, layers, base_method=getattr(cam_engine, base))(batch, targets)
    expected = ReferenceRefineCAM(resnet, layers, base_method=getattr(oracle, base))(batch, targets)
    assert got.shape == (2, 64, 64)
    assert agree(got, expected)


@pytest.mark.parametrize("options", [{}, {"pool": "max", "smooth": False}, {"pre_filter_ratio": 0.5, "theta": 0.2}])
def test_sess_matches_reference(oracle, resnet, options):
    torch.manual_seed(2)
    x = torch.randn(1, 3, 64, 80)
    kwargs = dict(num_scales=2, step_size=32, **options)
    got = cam_engine.SESS(resnet, [resnet.layer4[-1]], **kwargs)(x, [ClassifierOutputTarget(4)])
    expected = oracle.SESS(resnet, [resnet.layer4[-1]], **kwargs)(x, [ClassifierOutputTarget(4)])
    assert got.shape == expected.shape == (1, 64, 80)
    assert agree(got, expected)


def test_sliding_window_matches_reference():
    from pytorch_grad_cam.sess import sliding_window as reference

    from cam_engine.sess import sliding_window

    for args in [(224, 224, 224, 224), (288, 300, 100, 224), (224, 448, 112, 224), (50, 70, 16, 32)]:
        assert sliding_window(*args) == reference(*args)


def test_deep_feature_factorization_matches_reference(oracle, resnet, batch):
    from pytorch_grad_cam import DeepFeatureFactorization as Reference

    head = resnet.fc
    got = cam_engine.DeepFeatureFactorization(resnet, resnet.layer4, None, head)(batch, 3)
    expected = Reference(resnet, resnet.layer4, None, head)(batch, 3)
    for ours, theirs in zip(got, expected):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=1e-5)


def test_sobel_cam_is_the_references():
    from pytorch_grad_cam.sobel_cam import sobel_cam as reference

    from cam_engine.sobel_cam import sobel_cam

    image = np.random.default_rng(0).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    np.testing.assert_array_equal(sobel_cam(image), reference(image))


# ------------------------------------------------------------------------------------ metrics
def test_arcc_and_its_parts_match_reference(oracle, resnet, batch):
    from pytorch_grad_cam.metrics import arcc as reference

    from cam_engine.metrics import arcc

    cams = cam_engine.GradCAM(resnet, [resnet.layer4[-1]])(batch, None)
    other = np.random.default_rng(0).random(cams.shape).astype(np.float32)
    np.testing.assert_allclose(arcc.batch_pearson_coherency(cams, other),
                               reference.batch_pearson_coherency(cams, other), rtol=1e-5)
    np.testing.assert_allclose(arcc.Complexity()(cams), reference.Complexity()(cams), rtol=1e-6)
    targets = [ClassifierOutputTarget(3), ClassifierOutputTarget(7)]
    torch.manual_seed(5)
    got = arcc.ARCC(cam_engine.GradCAM(resnet, [resnet.layer4[-1]]), road_percentiles=[30, 70])(batch, cams, targets, resnet)
    torch.manual_seed(5)
    expected = reference.ARCC(oracle.GradCAM(resnet, [resnet.layer4[-1]]), road_percentiles=[30, 70])(
        batch, cams, targets, resnet)
    assert got.shape == (2,)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------ utilities
def test_projections_match_reference(oracle):
    from pytorch_grad_cam.utils import svd_on_activations as reference

    from cam_engine.utils import svd_on_activations as ours
    from tests.helpers.oracle import sign_aligned_projection

    a = np.random.default_rng(0).normal(size=(2, 6, 5, 4)).astype(np.float32)
    a[0, 0, 0, 0] = np.nan
    snapshot = a.copy()
    np.testing.assert_allclose(ours.get_2d_projection(a), sign_aligned_projection(a), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(ours.get_2d_projection_with_sign_correction(a),
                               reference.get_2d_projection_with_sign_correction(a), rtol=1e-3, atol=1e-4)
    kernel = ours.get_2d_projection_kernel(a)
    expected = reference.get_2d_projection_kernel(a)
    assert (np.abs(pearson(kernel, expected)) >= 0.99).all()
    np.testing.assert_array_equal(a, snapshot)


def test_find_layers_match_reference(resnet):
    from pytorch_grad_cam.utils import find_layers as reference

    from cam_engine.utils import find_layers as ours

    for types in ([nn.ReLU], [nn.Conv2d, nn.BatchNorm2d]):
        assert ours.find_layer_types_recursive(resnet, types) == reference.find_layer_types_recursive(resnet, types)


def test_activations_and_gradients_match_reference(resnet, batch):
    from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients as Reference

    recorded = []
    for cls in (cam_engine.ActivationsAndGradients, Reference):
        model = torchvision.models.resnet18(num_classes=10).eval()
        model.load_state_dict(resnet.state_dict())
        recorder = cls(model, [model.layer3, model.layer4], None)
        recorder(batch)[:, 3].sum().backward()
        recorded.append((recorder.activations, recorder.gradients))
        recorder.release()
        assert _no_hooks_left(model)
    for ours, theirs in zip(*recorded):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)


def test_guided_backprop_relu_matches_reference():
    from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUasModule as Reference

    x = torch.randn(4, 5, requires_grad=True)
    g = torch.randn(4, 5)
    (ours,) = torch.autograd.grad(cam_engine.guided_backprop.GuidedBackpropReLUasModule()(x), x, g)
    (theirs,) = torch.autograd.grad(Reference()(x), x, g)
    torch.testing.assert_close(ours, theirs)


def test_show_cam_on_image_honours_opencv_colormaps():
    from pytorch_grad_cam.utils.image import show_cam_on_image as reference

    from cam_engine.utils.image import show_cam_on_image

    rng = np.random.default_rng(0)
    img = rng.random((20, 30, 3)).astype(np.float32)
    mask = rng.random((20, 30)).astype(np.float32)
    for colormap in (cv2.COLORMAP_JET, cv2.COLORMAP_VIRIDIS, cv2.COLORMAP_HOT):
        for use_rgb in (False, True):
            got = show_cam_on_image(img, mask, use_rgb=use_rgb, colormap=colormap)
            expected = reference(img, mask, use_rgb=use_rgb, colormap=colormap)
            assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


# ------------------------------------------------------------------------------------ extension points
def _mean_abs_grad_cam(base):
    class MeanAbsGradCAM(base):
        def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
            return np.abs(np.asarray(grads)).mean(axis=(2, 3))

    return MeanAbsGradCAM


def test_subclass_overriding_get_cam_weights_matches_reference(oracle, resnet, batch):
    targets = [ClassifierOutputTarget(3), ClassifierOutputTarget(7)]
    for p in resnet.parameters():
        p.grad = None
    resnet.train()
    ours_cam = _mean_abs_grad_cam(cam_engine.BaseCAM)(resnet, [resnet.layer4[-1], resnet.layer3[-1]])
    assert ours_cam.uses_extension_path()
    got = ours_cam(batch, targets)
    assert resnet.training and all(m.training for m in resnet.modules())  # mode restored
    assert _no_hooks_left(resnet)
    assert all(p.grad is None for p in resnet.parameters())  # no parameter gradients
    recorded = ours_cam.activations_and_grads  # grad-cam's order: forward order (layer3 first)
    assert [tuple(g.shape) for g in recorded.gradients] == [(2, 256, 4, 4), (2, 512, 2, 2)]
    resnet.eval()
    expected = _mean_abs_grad_cam(oracle.base_cam.BaseCAM)(resnet, [resnet.layer4[-1], resnet.layer3[-1]])(batch, targets)
    for p in resnet.parameters():
        p.grad = None
    assert agree(got, expected)


def test_subclass_of_a_method_overriding_aggregation_matches_reference(oracle, resnet, batch):
    def with_max(base):
        class MaxLayers(base):
            def aggregate_multi_layers(self, cam_per_target_layer):
                return np.max(np.concatenate(cam_per_target_layer, axis=1), axis=1)

        return MaxLayers

    layers = [resnet.layer4[-1], resnet.layer3[-1]]
    assert not cam_engine.GradCAMPlusPlus(resnet, layers).uses_extension_path()
    got = with_max(cam_engine.GradCAMPlusPlus)(resnet, layers)(batch, None, aug_smooth=True)
    expected = with_max(oracle.GradCAMPlusPlus)(resnet, layers)(batch, None, aug_smooth=True)
    for p in resnet.parameters():
        p.grad = None
    assert agree(got, expected)


def test_compute_input_gradient_subclass_matches_reference(oracle, resnet, batch):
    def input_grad_cam(base):
        class InputGradient(base):
            def __init__(self, model, target_layers):
                super().__init__(model, target_layers, compute_input_gradient=True)

            def get_cam_image(self, input_tensor, target_layer, targets, activations, grads, eigen_smooth=False):
                grad = input_tensor.grad.detach().cpu().numpy()
                return np.abs(grad * input_tensor.detach().cpu().numpy()).sum(axis=1)[:, ::32, ::32]

        return InputGradient

    got = input_grad_cam(cam_engine.BaseCAM)(resnet, [resnet.layer4[-1]])(batch, None)
    expected = input_grad_cam(oracle.base_cam.BaseCAM)(resnet, [resnet.layer4[-1]])(batch, None)
    for p in resnet.parameters():
        p.grad = None
    assert agree(got, expected)


def test_get_cam_weights_takes_numpy_without_an_instance():
    a = np.random.default_rng(0).random((1, 2, 3, 4, 5)).astype(np.float32)
    g = np.random.default_rng(1).normal(size=a.shape).astype(np.float32)
    for name in ("GradCAM", "GradCAMPlusPlus", "XGradCAM"):
        import pytorch_grad_cam

        got = getattr(cam_engine, name).get_cam_weights(None, None, None, None, a, g)
        expected = getattr(pytorch_grad_cam, name).get_cam_weights(None, None, None, None, a, g)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------ signatures, behaviour
def test_volumetric_cams_resize_like_reference(oracle):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3, stride=2, padding=1),
                          nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(2, 1, 6, 8, 10)
    got = cam_engine.GradCAM(model, [model[2]])(x, None)
    expected = oracle.GradCAM(model, [model[2]])(x, None)
    assert got.shape == expected.shape == (2, 6, 8, 10)
    assert agree(got, expected, 0.999)


def test_ablation_cam_positional_order_and_custom_layer(oracle, resnet, batch):
    targets = [ClassifierOutputTarget(3), ClassifierOutputTarget(7)]
    default = cam_engine.AblationCAM(resnet, [resnet.layer4[-1]])(batch, targets)
    positional = cam_engine.AblationCAM(resnet, [resnet.layer4[-1]], None, cam_engine.AblationLayer(), 8, 1.0)
    assert positional.batch_size == 8
    np.testing.assert_allclose(positional(batch, targets), default, atol=1e-5)

    def constant_ablation(base):
        class ConstantAblation(base):
            def __call__(self, x):
                output = self.activations
                for i in range(output.size(0)):
                    output[i, self.indices[i], :] = -5.0
                return output

        return ConstantAblation

    got = cam_engine.AblationCAM(resnet, [resnet.layer4[-1]], None, constant_ablation(cam_engine.AblationLayer)(),
                                 16)(batch, targets)
    expected = oracle.AblationCAM(resnet, [resnet.layer4[-1]], None, constant_ablation(oracle.AblationLayer)(),
                                  16)(batch, targets)
    assert _no_hooks_left(resnet)
    assert agree(got, expected)
    assert not (pearson(got, default) >= 0.999).all()  # the custom layer was used


def test_finer_cam_third_positional_argument_is_eigen_smooth(resnet, batch):
    cam = cam_engine.FinerCAM(resnet, [resnet.layer4[-1]])
    np.testing.assert_allclose(cam(batch, None, True), cam(batch, None, eigen_smooth=True))
    assert not np.allclose(cam(batch, None, True), cam(batch, None, False))


def test_engine_hooks_for_user_subclasses_stay_on_the_fast_path(resnet, batch):
    """A method written against the engine's own hook (cam_image) runs on the fast path and equals the
    same weights through grad-cam's hook (get_cam_weights) on the extension path."""

    class FastAbsGrad(cam_engine.BaseCAM):
        def cam_image(self, activations, gradients, eigen_smooth):
            return (gradients.abs().mean(dim=(2, 3))[:, :, None, None] * activations).sum(dim=1)

    fast = FastAbsGrad(resnet, [resnet.layer4[-1]])
    slow = _mean_abs_grad_cam(cam_engine.BaseCAM)(resnet, [resnet.layer4[-1]])
    assert not fast.uses_extension_path() and slow.uses_extension_path()
    np.testing.assert_allclose(fast(batch, None), slow(batch, None), atol=1e-4)


def test_volume_resize_choice(resnet):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, stride=2, padding=1), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    x = torch.randn(1, 1, 6, 8, 10)
    cam = cam_engine.GradCAM(model, [model[0]])
    zoomed = cam(x, None)
    cam.volume_resize = "trilinear"
    trilinear = cam(x, None)
    assert zoomed.shape == trilinear.shape == (1, 6, 8, 10)
    assert not np.allclose(zoomed, trilinear, atol=1e-3)
    assert agree(zoomed, trilinear, 0.9)

"""Detection, segmentation and embedding CAMs: agreement with pytorch-grad-cam 1.5.7, and localisation.

Same random-init models, same inputs, same targets: Pearson r >= 0.99 per image against the
reference wherever the reference can run. The reference captures gradients only from layers that
return a tensor, so at a detector's ``backbone`` (an FPN dict) it runs gradient-free methods only;
the gradient path through the detector is compared at ``backbone.body.16`` (a tensor), and our
gradient CAM at ``backbone`` (which the reference cannot compute) is checked against the formula.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cam_engine
from cam_engine import targets as ours
from cam_engine.reshape import fasterrcnn_reshape_transform
from handlers.models import architectures
from handlers.tasks.targets import PredictedRegionTarget, RankedBoxTarget, ranked_detections
from tests.helpers.oracle import pearson
from tests.helpers.synthetic import make_shapes, peak_in_box

R_MIN = 0.99


def assert_agrees(got: torch.Tensor, expected: np.ndarray) -> None:
    """Pearson r >= 0.99 per image; an image whose reference map is flat (all 0: every weighted
    activation negative, which random-init detectors give) must be flat in ours too."""
    got = got.detach().cpu().numpy()
    flat = expected.reshape(expected.shape[0], -1).std(1) < 1e-6
    assert not flat.all(), "every reference map is flat: the comparison would be empty"
    assert np.allclose(got[flat], expected[flat], atol=1e-5)
    r = pearson(got[~flat], expected[~flat])
    assert (r >= R_MIN).all(), r


def _reference(oracle, method: str):
    return {
        "gradcam": oracle.GradCAM,
        "hirescam": oracle.HiResCAM,
        "layercam": oracle.LayerCAM,
        "gradcam++": oracle.GradCAMPlusPlus,
        "xgradcam": oracle.XGradCAM,
        "eigencam": oracle.EigenCAM,
    }[method]


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    model = architectures.build(
        "fasterrcnn_mobilenet_v3_large_fpn", 4, box_score_thresh=0.0, representation_size=128,
        min_size=128, max_size=160, box_detections_per_img=10,
    )  # fmt: skip
    images = torch.rand(2, 3, 128, 160)
    with torch.no_grad():
        detections = model(images)
    assert all(len(d["boxes"]) > 0 for d in detections)
    return model, images, detections


def calibrate_batch_norm(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Set BatchNorm running statistics from ``images`` (no gradient step). A random-init DeepLabV3
    with unit running statistics predicts one class everywhere and every CAM is 0; calibrated, its
    maps vary over the image, which is what a comparison needs."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    model = architectures.build("deeplabv3_mobilenet_v3_large", 21)
    images, _, _ = make_shapes(8, size=96, seed=1)
    calibrate_batch_norm(model, images)
    return model, images[:2, :, :, :]


@pytest.fixture(scope="module")
def embedder():
    torch.manual_seed(0)
    model = architectures.build("resnet18_embedding", 0)
    images = torch.randn(3, 3, 96, 128)
    with torch.no_grad():
        concept = model(torch.randn(2, 3, 96, 128)).mean(0)
    return model, images, concept


def test_detector_eigencam_at_fpn_backbone(detector, oracle) -> None:
    model, images, detections = detector
    boxes = [d["boxes"][:1].numpy() for d in detections]
    labels = [d["labels"][:1].tolist() for d in detections]
    with oracle.EigenCAM(model, [model.backbone], reshape_transform=oracle.utils.reshape_transforms.fasterrcnn_reshape_transform
                         if hasattr(oracle.utils, "reshape_transforms") else fasterrcnn_reshape_transform) as reference:  # fmt: skip
        expected = reference(
            images, [oracle.utils.model_targets.FasterRCNNBoxScoreTarget(lab, box) for lab, box in zip(labels, boxes)]
        )
    cam = cam_engine.create("eigencam", model, ["backbone"], reshape_transform=fasterrcnn_reshape_transform)
    got = cam.explain(images, [ours.FasterRCNNBoxScoreTarget(lab, box) for lab, box in zip(labels, boxes)])
    assert got.shape == (2, 128, 160)
    assert_agrees(got, expected)
    # a gradient-free CAM needs no target: targets=None gives one CAM per image on a detector too
    assert torch.allclose(cam.explain(images), got)
    with pytest.raises(ValueError, match="explicit targets"):
        cam_engine.create("gradcam", model, ["backbone"], reshape_transform=fasterrcnn_reshape_transform).explain(images)


@pytest.mark.peer  # a ResNet-50-FPN detector, the reference's hard-coded layer: `make test-peer`
def test_detector_ablationcam_at_the_fpn_dict_agrees(oracle) -> None:
    """AblationCAM at a detector's FPN ``backbone`` (a dict), against the reference's documented
    ``AblationLayerFasterRCNN`` (channel c of the reshaped maps = channel c % 256 of level c // 256,
    set to -1000). That layer hard-codes ResNet-50-FPN's five 256-channel levels, hence this model; a
    few channels (ratio 0.015, chosen the reference's way) keep it fast."""
    from pytorch_grad_cam.ablation_layer import AblationLayerFasterRCNN

    torch.manual_seed(0)
    model = architectures.build("fasterrcnn_resnet50_fpn", 4, box_score_thresh=0.0, representation_size=64,
                                min_size=96, max_size=128, box_detections_per_img=10)  # fmt: skip
    images = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (detections,) = model(images)
    labels, boxes = detections["labels"][:1].tolist(), detections["boxes"][:1]
    with oracle.AblationCAM(model, [model.backbone], reshape_transform=fasterrcnn_reshape_transform,
                            ablation_layer=AblationLayerFasterRCNN(), ratio_channels_to_ablate=0.015) as reference:  # fmt: skip
        expected = reference(images, [oracle.utils.model_targets.FasterRCNNBoxScoreTarget(labels, boxes.numpy())])
    cam = cam_engine.create("ablationcam", model, ["backbone"], reshape_transform=fasterrcnn_reshape_transform)
    cam.ratio_channels_to_ablate = 0.015
    got = cam.explain(images, [ours.FasterRCNNBoxScoreTarget(labels, boxes)])
    assert cam.last_modes == {0: "shrunk"}  # the backbone's own work is skipped for the ablated copies
    assert_agrees(got, expected)
    assert np.abs(got.numpy() - expected).max() < 1e-4


@pytest.mark.parametrize("method", ["gradcam"])
def test_detector_box_score_gradients_agree(detector, oracle, method: str) -> None:
    """FasterRCNNBoxScoreTarget through the whole detector, at a tensor layer the reference can hook."""
    model, images, detections = detector
    boxes = [d["boxes"][:1].numpy() for d in detections]
    labels = [d["labels"][:1].tolist() for d in detections]
    layer = model.backbone.body["16"]
    with _reference(oracle, method)(model, [layer]) as reference:
        expected = reference(
            images, [oracle.utils.model_targets.FasterRCNNBoxScoreTarget(lab, box) for lab, box in zip(labels, boxes)]
        )
    got = cam_engine.create(method, model, ["backbone.body.16"]).explain(
        images, [ours.FasterRCNNBoxScoreTarget(lab, box) for lab, box in zip(labels, boxes)]
    )
    assert_agrees(got, expected)


def test_ranked_box_target_is_the_box_score_target_of_that_box(detector) -> None:
    model, images, detections = detector
    cam = cam_engine.create("gradcam", model, ["backbone"], reshape_transform=fasterrcnn_reshape_transform)
    rank = 1
    explicit = []
    for d in detections:
        index = ranked_detections(d)[rank]
        explicit.append(ours.FasterRCNNBoxScoreTarget([int(d["labels"][index])], [d["boxes"][index]]))
    expected = cam.explain(images, explicit)
    got = cam.explain(images, [RankedBoxTarget(rank), RankedBoxTarget(rank)])
    assert torch.allclose(got, expected, atol=1e-5)


def test_box_gradients_through_the_detections_rows_only_change_nothing(detector) -> None:
    """The detector builder swaps in DetectionGradientRoIHeads (a box's graph through its own row, not
    all proposals): detections equal torchvision's RoIHeads bit for bit, with and without a graph, and
    so do the gradient CAMs of several boxes."""
    import copy

    from torchvision.models.detection.roi_heads import RoIHeads

    from handlers.models.rcnn_heads import DetectionGradientRoIHeads

    model, images, detections = detector
    assert type(model.roi_heads) is DetectionGradientRoIHeads
    plain = copy.deepcopy(model)
    plain.roi_heads.__class__ = RoIHeads
    with torch.no_grad():
        expected = plain(images)
    with torch.enable_grad():
        got = model(images)
    for ours_, theirs in zip(got, expected):
        assert all(torch.equal(ours_[key].detach(), theirs[key]) for key in ("boxes", "labels", "scores"))
    assert got[0]["scores"].requires_grad and got[0]["boxes"].requires_grad
    targets = [[RankedBoxTarget(0), RankedBoxTarget(2)], [RankedBoxTarget(1)]]
    fast = cam_engine.create("gradcam", model, ["backbone"], reshape_transform=fasterrcnn_reshape_transform)
    slow = cam_engine.create("gradcam", plain, ["backbone"], reshape_transform=fasterrcnn_reshape_transform)
    fast_cams, slow_cams = fast.run(images, targets).cams, slow.run(images, targets).cams
    assert slow_cams.amax(dim=(1, 2)).min() > 0
    assert torch.allclose(fast_cams, slow_cams, atol=1e-5)


def test_box_gradients_when_an_image_has_no_detection(detector) -> None:
    """The second image's detections dropped (then every image's): the CAMs equal torchvision's
    RoIHeads' under the same drop, the empty image's is 0 and no autograd error is raised."""
    import copy

    from torchvision.models.detection.roi_heads import RoIHeads

    model, images, _ = detector

    def dropping(heads: torch.nn.Module, keep: int) -> None:
        original = heads.postprocess_detections

        def postprocess(*args, **kwargs):
            outputs = original(*args, **kwargs)
            return tuple([t if i < keep else t[:0] for i, t in enumerate(items)] for items in outputs)

        heads.postprocess_detections = postprocess

    for keep in (1, 0):
        fast, plain = copy.deepcopy(model), copy.deepcopy(model)
        plain.roi_heads.__class__ = RoIHeads
        for detector_copy in (fast, plain):
            dropping(detector_copy.roi_heads, keep)
        with torch.no_grad():
            assert [len(d["boxes"]) > 0 for d in fast(images)] == [keep > 0, False]
        targets = [[RankedBoxTarget(0)], [RankedBoxTarget(0)]]
        got = cam_engine.create("gradcam", fast, ["backbone"], reshape_transform=fasterrcnn_reshape_transform).run(images, targets).cams
        expected = cam_engine.create("gradcam", plain, ["backbone"], reshape_transform=fasterrcnn_reshape_transform).run(images, targets).cams
        assert torch.allclose(got, expected, atol=1e-5)
        assert [bool(c.max() > 0) for c in got] == [keep > 0, False]


def test_gradcam_at_the_fpn_dict_follows_the_formula(detector) -> None:
    """GradCAM at ``backbone`` (an FPN dict, beyond the reference): mean-pooled gradients of the
    reshaped gradient dict weight the reshaped activations; ReLU, min-max, bilinear resize."""
    model, images, detections = detector
    image = images[:1]
    target = RankedBoxTarget(0)
    captured = {}

    def hook(module, inputs, output):
        leaves = {k: v.detach().requires_grad_(True) for k, v in output.items()}
        captured["features"] = leaves
        return type(output)(leaves)

    handle = model.backbone.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            output = model(image)
            score = target(output[0]).sum()
            grads = torch.autograd.grad(score, list(captured["features"].values()), allow_unused=True)
    finally:
        handle.remove()
    features = captured["features"]
    gradients = type(features)((k, torch.zeros_like(v) if g is None else g) for (k, v), g in zip(features.items(), grads))
    activations = fasterrcnn_reshape_transform(features).detach()
    weights = fasterrcnn_reshape_transform(gradients).mean(dim=(2, 3), keepdim=True)
    expected = (weights * activations).sum(1).clamp_min(0)
    expected = (expected - expected.min()) / (expected.max() - expected.min() + 1e-7)
    expected = torch.nn.functional.interpolate(expected[:, None], size=image.shape[-2:], mode="bilinear")[:, 0]
    cam = cam_engine.create("gradcam", model, ["backbone"], reshape_transform=fasterrcnn_reshape_transform)
    got = cam.explain(image, [target])
    assert got.max() > 0
    assert pearson(got.numpy(), expected.detach().numpy())[0] >= 0.999


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "eigencam"])
def test_semantic_segmentation_target_agrees(segmenter, oracle, method: str) -> None:
    model, images = segmenter
    with torch.no_grad():
        logits = model(images)
    categories = [int(logits[i].argmax(0).flatten().mode().values) for i in range(2)]
    masks = [(logits[i].argmax(0) == c).float().numpy() for i, c in zip(range(2), categories)]
    with _reference(oracle, method)(model, [model.backbone["16"]]) as reference:
        expected = reference(
            images, [oracle.utils.model_targets.SemanticSegmentationTarget(c, m) for c, m in zip(categories, masks)]
        )
    got = cam_engine.create(method, model, ["backbone.16"]).explain(
        images, [PredictedRegionTarget(c, background=None) for c in categories]
    )
    assert got.shape == (2, 96, 96)
    assert_agrees(got, expected)


class TutorialSimilarityToConceptTarget:
    """grad-cam 1.5.7 ships these two targets only in its embeddings tutorial
    (``tutorials/Pixel Attribution for embeddings.ipynb``); this is that definition."""

    def __init__(self, features):
        self.features = features

    def __call__(self, model_output):
        cos = torch.nn.CosineSimilarity(dim=0)
        return cos(model_output, self.features)


class TutorialDifferenceFromConceptTarget(TutorialSimilarityToConceptTarget):
    def __call__(self, model_output):
        cos = torch.nn.CosineSimilarity(dim=0)
        return 1 - cos(model_output, self.features)


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "eigencam"])
@pytest.mark.parametrize("difference", [False, True])
def test_similarity_to_concept_target_agrees(embedder, oracle, method: str, difference: bool) -> None:
    model, images, concept = embedder
    reference_target = TutorialDifferenceFromConceptTarget if difference else TutorialSimilarityToConceptTarget
    our_target = ours.DifferenceFromConceptTarget if difference else ours.SimilarityToConceptTarget
    with _reference(oracle, method)(model, [model.layer4[-1]]) as reference:
        expected = reference(images, [reference_target(concept) for _ in range(3)])
    got = cam_engine.create(method, model, ["layer4.-1"]).explain(images, [our_target(concept) for _ in range(3)])
    assert_agrees(got, expected)


@pytest.mark.parametrize("method", ["gradcam", "eigencam"])
def test_similarity_through_a_clip_image_tower_agrees(oracle, method: str) -> None:
    """The embedding handler's CLIP tower (ClipImageEncoder) with the token-grid reshape, against the
    reference with the reshape of its CLIP example."""
    from transformers import CLIPModel

    from cam_engine.reshape import clip_reshape_for
    from handlers.models.clip import DEFAULT_TARGET_LAYER, ClipImageEncoder
    from tests.helpers.tiny_clip import session_tiny_clip

    clip = CLIPModel.from_pretrained(str(session_tiny_clip())).eval()
    model = ClipImageEncoder(clip).eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        concept = model(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))).mean(0)

    def seed_reshape(tensor: torch.Tensor) -> torch.Tensor:  # 16x16 patches of 14 px
        return tensor[:, 1:, :].reshape(tensor.size(0), 16, 16, tensor.size(2)).permute(0, 3, 1, 2)

    layer = cam_engine.resolve_layer(model, DEFAULT_TARGET_LAYER)
    with _reference(oracle, method)(model, [layer], reshape_transform=seed_reshape) as reference:
        expected = reference(images, [TutorialSimilarityToConceptTarget(concept) for _ in range(2)])
    cam = cam_engine.create(method, model, [DEFAULT_TARGET_LAYER], reshape_transform=clip_reshape_for(clip.config.vision_config))
    got = cam.explain(images, [ours.SimilarityToConceptTarget(concept) for _ in range(2)])
    assert_agrees(got, expected)


class _TinySegmenter(torch.nn.Module):
    """Three conv blocks (one stride 2) and a 1x1 classifier, logits upsampled to the input:
    ``[B, 3, H, W]`` -> ``[B, 1 + classes, H, W]`` (class 0: background)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> torch.nn.Module:
            return torch.nn.Sequential(
                torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False), torch.nn.BatchNorm2d(cout), torch.nn.ReLU()
            )

        self.features = torch.nn.Sequential(block(3, 16, 1), block(16, 32, 2), block(32, 32, 1))
        self.classifier = torch.nn.Conv2d(32, classes + 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.features(x))
        return torch.nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _pixel_labels(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-pixel classes of :func:`make_shapes` images: the grey background has equal channels, the
    object a colour; ``[N, H, W]`` with 0 background and ``1 + label`` on the object."""
    on_object = images.std(dim=1) > 1e-3
    return torch.where(on_object, labels[:, None, None] + 1, torch.zeros_like(labels)[:, None, None])


def test_segmentation_heatmap_falls_on_the_object() -> None:
    """A tiny segmenter trained here on synthetic shapes: the CAM of the predicted class over its
    predicted region (the handler's target) peaks on the object for >= 90% of held-out images."""
    torch.manual_seed(0)
    model = _TinySegmenter()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(60):
        images, labels, _ = make_shapes(32, size=48, seed=5000 + step, shape_size=(10, 16))
        loss = torch.nn.functional.cross_entropy(model(images), _pixel_labels(images, labels))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    images, labels, boxes = make_shapes(60, size=48, seed=777, shape_size=(10, 16))
    with torch.no_grad():
        predicted = model(images).argmax(1)
    truth = _pixel_labels(images, labels)
    on_object = truth > 0
    assert float((predicted[on_object] == truth[on_object]).float().mean()) >= 0.8, "the segmenter did not learn"
    cams = cam_engine.create("gradcam", model, ["features.-1"]).explain(
        images, [PredictedRegionTarget(int(c) + 1) for c in labels]
    )
    hit_rate = float(peak_in_box(cams, boxes).float().mean())
    assert hit_rate >= 0.9, f"segmentation heatmap peak on the object for {hit_rate:.0%} of images"
    # the check has teeth: a class the image does not contain has an empty region and no heatmap
    absent = cam_engine.create("gradcam", model, ["features.-1"]).explain(
        images[:8], [PredictedRegionTarget((int(c) + 1) % 3 + 1) for c in labels[:8]]
    )
    assert float(absent.max()) == 0.0


def test_class_of_names_the_explained_class_for_the_audit_and_captum() -> None:
    """One place says which class a target explains: a given class is its category; "the top class" is each
    image's own arg-max (not the batch's); a non-class target (a box) names none."""
    from cam_engine.targets import ClassifierOutputTarget
    from handlers.tasks.targets import RankedBoxTarget, TopClassTarget, class_of

    scores = torch.tensor([[0.1, 2.0, 0.3], [5.0, 0.2, 0.1]])
    assert [class_of(TopClassTarget(), scores, row) for row in (0, 1)] == [1, 0]
    assert class_of(ClassifierOutputTarget(2), scores, 0) == 2
    assert class_of(RankedBoxTarget(0), scores, 0) is None
    assert class_of(TopClassTarget(), {"boxes": scores}, 0) is None  # scores that are not class scores

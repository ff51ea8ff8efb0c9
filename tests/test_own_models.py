"""Bring your own model (issue 24): TorchServe --model-file archives, Hugging Face classifiers, TorchServe's
label files, target_layers: auto, top_k defaults, and one-line build errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from handlers.models.auto_layers import find_target_layer
from handlers.models.labels import LabelError, read_labels
from model_store.build import main
from tests.helpers import own_models
from tests.helpers.answers import heatmap, post
from tests.helpers.inputs import b64, encode, square_image
from tests.helpers.own_models import OWN_TORCHSERVE_FORMAT
from tests.helpers.serving import OWN_HF_RESNET, OWN_HF_VIT, OWN_MODEL_FILE

# the session models the served tests use (the auto-layer table names efficientnet_lite0 as an architecture)
pytestmark = pytest.mark.serves(OWN_MODEL_FILE, OWN_TORCHSERVE_FORMAT, OWN_HF_VIT, OWN_HF_RESNET)


# ------------------------------------------------------------------------------------------- labels
def test_label_reader_reads_keys_pairs_and_refuses_gaps(tmp_path: Path) -> None:
    names = [f"class_{i}" for i in range(12)]
    (tmp_path / "sorted.json").write_text(json.dumps({str(i): [f"n{i}", n] for i, n in enumerate(names)}, sort_keys=True))
    assert read_labels("sorted.json", tmp_path) == names  # "10" before "2" in the file, index 2 is class_2
    assert read_labels({"1": "b", "0": "a"}) == ["a", "b"]
    with pytest.raises(LabelError, match=r"missing 1, 3"):
        read_labels({"0": "a", "2": "c", "4": "e"})
    with pytest.raises(LabelError, match=r"duplicate class indices \[1\]"):
        read_labels({"0": "a", "1": "b", "01": "b again"})


# ------------------------------------------------------------------------------------------- auto layers
@pytest.mark.parametrize(
    ("architecture", "layer", "reshape"),
    [("resnet18", "layer4", "none"), ("efficientnet_lite0", "bn2", "none"),
     ("deit_small", "blocks.11.norm1", "vit"), ("swin_tiny", "layers.3.blocks.1.norm1", "swin")],
)  # fmt: skip
def test_auto_layer_matches_the_documented_choice(architecture: str, layer: str, reshape: str) -> None:
    from handlers.models import architectures

    chosen = find_target_layer(architectures.build(architecture, 10), (224, 224))
    assert (chosen.path, chosen.reshape) == (layer, reshape)
    assert f"| `{architecture}` | `{layer}` |" in (Path(__file__).parents[1] / "docs" / "own_models.md").read_text()


@pytest.mark.parametrize(
    ("architecture", "task", "layer", "reshape", "documented"),
    [("deeplabv3_mobilenet_v3_large", "segmentation", "backbone.16", "none", "`deeplabv3_mobilenet_v3_large`: `backbone.16`"),
     ("fasterrcnn_mobilenet_v3_large_fpn", "detection", "backbone", "fasterrcnn", "auto is its `backbone` (reshape `fasterrcnn`")],
)  # fmt: skip
def test_auto_layer_per_task_matches_the_docs(architecture: str, task: str, layer: str, reshape: str, documented: str) -> None:
    """A segmenter's auto layer is the backbone's last map (not the logits); a detector's is its backbone."""
    from handlers.models import architectures

    chosen = find_target_layer(architectures.build(architecture, 5).eval(), (128, 128), task=task)
    assert (chosen.path, chosen.reshape) == (layer, reshape)
    assert documented in " ".join((Path(__file__).parents[1] / "docs" / "own_models.md").read_text().split())


# ------------------------------------------------------------------------------------------- build errors
def _project(tmp_path: Path) -> Path:
    project = own_models.save_model_file_project(tmp_path / "mynet")
    (project / "config.yaml").write_text(
        "handler:\n  architecture: model_file\n  model_file: model.py\n  labels: index_to_name.json\n"
    )
    return project


def _build(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_config_anywhere_builds_with_the_auto_layer(tmp_path: Path, capsys) -> None:
    project = _project(tmp_path)
    code, out, err = _build(capsys, str(project / "config.yaml"), "--weights", str(project / "tinynet.pth"),
                            "--output", str(tmp_path / "store"))  # fmt: skip
    assert code == 0, err
    assert "target layer: features (auto: last 28x28 map before pooling)" in out
    assert "a default /predictions and /explanations answer 200" in out
    assert (tmp_path / "store" / "config.mar").is_file()


def _bad_inputs(project: Path) -> dict[str, tuple[list[str], str]]:
    script = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))
    script.save(str(project / "scripted.pt"))
    (project / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).state_dict(), project / "other.pth")
    gap = json.loads((project / "index_to_name.json").read_text())
    del gap["5"]
    (project / "gap.json").write_text(json.dumps(gap))
    (project / "gap.yaml").write_text("handler:\n  architecture: model_file\n  labels: gap.json\n")
    (project / "topk.yaml").write_text("handler:\n  architecture: transformers\n  top_k: 5\n")
    config, weights = str(project / "config.yaml"), str(project / "tinynet.pth")
    return {
        "directory": ([config, "--weights", str(project)], "is a directory: for a Hugging Face save_pretrained directory set architecture: transformers"),
        "torchscript": ([config, "--weights", str(project / "scripted.pt")], "TorchScript cannot be explained; save the eager model's state dict"),
        "onnx": ([config, "--weights", str(project / "model.onnx")], "ONNX cannot be explained; save the eager model's state dict"),
        "other architecture": ([config, "--weights", str(project / "other.pth")], "6 missing keys (features.0.weight, features.0.bias, features.2.weight (+3 more)); 4 unexpected keys (0.weight, 0.bias, 1.weight (+1 more))"),
        "labels with a gap": ([str(project / "gap.yaml"), "--weights", weights], "missing 5"),
        "top_k above the classes": ([str(project / "topk.yaml"), "--weights", str(own_models.session_hf_vit())], "handler.top_k: 5, but the model has 3 classes"),
    }  # fmt: skip


def test_bad_build_inputs_fail_with_one_line_naming_the_fix(tmp_path: Path, capsys) -> None:
    project = _project(tmp_path)
    cases = _bad_inputs(project)
    capsys.readouterr()  # the session ViT's save_pretrained progress bars
    for case, (argv, fix) in cases.items():
        code, _, err = _build(capsys, *argv, "--output", str(tmp_path / "store"))
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1 and len(lines) == 1, (case, err)
        assert fix in lines[0], (case, lines[0])
        assert len(lines[0]) < 400, (case, lines[0])
    assert not list((tmp_path / "store").glob("*.mar")) if (tmp_path / "store").exists() else True


# ------------------------------------------------------------------------------------------- served
def _image(height: int, width: int, seed: int = 1) -> np.ndarray:
    return square_image(height, width, (height // 4, width // 4, height // 2, width // 2), seed=seed)


def test_model_file_archive_serves_like_the_stock_handler(server) -> None:
    """torch-model-archiver --model-file, no model-config.yaml: the stock image_classifier's preprocessing,
    labels from index_to_name.json by key, the auto layer; targets by name and index explain those classes."""
    from torchvision.transforms import v2

    image = _image(240, 320)
    answer = post(server, f"predictions/{OWN_MODEL_FILE}", encode(image))
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    project = own_models.session_model_file_project()
    namespace: dict = {}
    exec(compile((project / "model.py").read_text(), "model.py", "exec"), namespace)  # noqa: S102 - the test's own file
    model = namespace["TinyNet"]().eval()
    model.load_state_dict(torch.load(project / "tinynet.pth", weights_only=True))
    stock = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224), v2.ToDtype(torch.float32, scale=True),
                        v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])  # fmt: skip
    with torch.no_grad():
        expected = torch.softmax(model(stock(torch.from_numpy(image).permute(2, 0, 1))[None]), -1)[0]
    scores, indices = expected.topk(5)
    assert [p["index"] for p in predictions] == indices.tolist()
    assert [p["label"] for p in predictions] == [f"class_{i}" for i in indices.tolist()]
    assert np.allclose([p["score"] for p in predictions], scores.tolist(), atol=5e-3)
    explained = post(server, f"explanations/{OWN_MODEL_FILE}", {"image": b64(encode(image)), "targets": ["class_2", 11]})
    assert explained.status_code == 200, explained.text
    explanations = explained.json()["explanations"]
    assert [(e["target"], e["label"], e["layers"]) for e in explanations] == [(2, "class_2", ["features"]), (11, "class_11", ["features"])]
    assert heatmap(explanations[0]).shape == (240, 320)


def test_hf_vit_serves_its_id2label_and_explains_like_cam_engine(server) -> None:
    """A 3-class HF ViT with no top_k: 3 predictions by default; its served heatmap equals cam_engine's
    GradCAM at the auto layer on the same model (a 32x32 image: the processor's resize is the identity)."""
    from transformers import ViTForImageClassification

    import cam_engine
    from cam_engine.targets import ClassifierOutputTarget

    image = _image(32, 32, seed=3)
    answer = post(server, f"predictions/{OWN_HF_VIT}", encode(image))
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert sorted(p["label"] for p in predictions) == sorted(own_models.VIT_LABELS)
    explained = post(server, f"explanations/{OWN_HF_VIT}", {"image": b64(encode(image)), "targets": ["cherry", 0]})
    assert explained.status_code == 200, explained.text
    explanations = explained.json()["explanations"]
    assert [(e["target"], e["label"]) for e in explanations] == [(2, "cherry"), (0, "apple")]
    assert explanations[0]["layers"] == ["vit.layers.1.layernorm_before"]
    model = ViTForImageClassification.from_pretrained(str(own_models.session_hf_vit()), local_files_only=True).eval()
    x = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    with cam_engine.GradCAM(model=model, target_layers=[cam_engine.resolve_layer(model, "vit.layers.1.layernorm_before")],
                            reshape_transform=cam_engine.reshape.vit_reshape_transform) as cam:  # fmt: skip
        direct = cam(x[None], targets=[ClassifierOutputTarget(2)])[0]
    served = heatmap(explanations[0]).astype(np.float64) / 255
    assert np.abs(served - np.asarray(direct)).max() <= 2 / 255


def test_hf_conv_classifier_defaults_top_k_to_its_classes(server) -> None:
    image = _image(80, 96, seed=5)
    answer = post(server, f"explanations/{OWN_HF_RESNET}", {"image": b64(encode(image)), "targets": ["square", 3]})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["predictions"]) == 4 and {p["label"] for p in body["predictions"]} == set(own_models.RESNET_LABELS)
    assert [(e["target"], e["label"]) for e in body["explanations"]] == [(1, "square"), (3, "star")]
    assert heatmap(body["explanations"][0]).shape == (80, 96)


# ------------------------------------------------------------------------------------------- response_format
def test_response_format_is_checked_at_load(tmp_path: Path) -> None:
    from handlers.config import ConfigError
    from handlers.models.loading import read_config

    given = {"architecture": "resnet18", "num_classes": 3}
    assert read_config({"handler": given}, tmp_path).response_format == "torchserve_cam"
    assert read_config({"handler": {**given, "response_format": "TorchServe"}}, tmp_path).response_format == "torchserve"
    refused = {
        "json": ({**given, "response_format": "json"}, None, "handler.response_format: must be one of torchserve_cam, torchserve, got 'json'"),
        "detection": ({**given, "response_format": "torchserve"}, "detection", "for classifiers only; this archive's task is detection"),
        "explain_on_predict": ({**given, "response_format": "torchserve", "explain_on_predict": True}, None, "explain_on_predict: true"),
    }  # fmt: skip
    for case, (handler, task, message) in refused.items():
        with pytest.raises(ConfigError, match=None) as error:
            read_config({"handler": handler}, tmp_path, task=task)
        assert message in str(error.value), case


def test_stock_predictions_equal_map_class_to_label(tmp_path: Path) -> None:
    """For the same probabilities, exactly what TorchServe's image_classifier answers: its label mapping
    (index_to_name.json with [wnid, name] pairs, sorted keys) and map_class_to_label over torch.topk."""
    from ts.utils.util import load_label_mapping, map_class_to_label

    from handlers.tasks.torchserve_format import stock_predictions

    project = own_models.save_model_file_project(tmp_path / "p")
    labels = read_labels("index_to_name.json", project)
    probabilities = torch.softmax(torch.randn(3, len(labels), generator=torch.Generator().manual_seed(0)), -1)
    values, classes = torch.topk(probabilities, 5, dim=1)
    stock = map_class_to_label(values.tolist(), load_label_mapping(str(project / "index_to_name.json")), classes.tolist())
    ours = [stock_predictions(row, labels, 5) for row in probabilities]
    assert ours == stock and [list(o) for o in ours] == [list(s) for s in stock]  # same keys, values and order
    assert json.dumps(ours[0]) == json.dumps(stock[0])  # the bytes a client reads


def _stock_image_classifier(project: Path):
    """TorchServe's own ImageClassifier, loaded in-process from the project's model.py + state dict."""
    from types import SimpleNamespace

    from ts.torch_handler.image_classifier import ImageClassifier

    manifest = {"model": {"modelName": "stock", "modelFile": "model.py", "serializedFile": "tinynet.pth",
                          "handler": "image_classifier"}}  # fmt: skip
    context = SimpleNamespace(system_properties={"model_dir": str(project), "gpu_id": None, "batch_size": 1},
                              manifest=manifest, model_yaml_config={}, metrics=None)  # fmt: skip
    handler = ImageClassifier()
    sys.path.insert(0, str(project))  # as TorchServe's worker has the model directory on its path
    try:
        handler.initialize(context)  # imports model.py as the module "model"
    finally:
        sys.path.remove(str(project))
        sys.modules.pop("model", None)
    return handler


def test_torchserve_format_answers_like_the_stock_image_classifier(server) -> None:
    """The migration: the same --model-file archive plus --config-file (response_format: torchserve) answers
    /predictions as TorchServe's image_classifier does for the same image; /explanations keeps our answer."""
    image = _image(240, 320)
    answer = post(server, f"predictions/{OWN_TORCHSERVE_FORMAT}", encode(image))
    assert answer.status_code == 200, answer.text
    served = answer.json()
    stock_handler = _stock_image_classifier(own_models.session_model_file_project())
    stock = stock_handler.postprocess(stock_handler.inference(stock_handler.preprocess([{"body": encode(image)}])))[0]
    assert list(served) == list(stock) and len(served) == 5  # the same labels, best first
    assert np.allclose(list(served.values()), list(stock.values()), atol=5e-3)  # our resize vs PIL's
    native = post(server, f"predictions/{OWN_MODEL_FILE}", encode(image)).json()["predictions"]
    assert served == {p["label"]: pytest.approx(p["score"], abs=1e-6) for p in native}  # same model, same numbers
    explained = post(server, f"explanations/{OWN_TORCHSERVE_FORMAT}", {"image": b64(encode(image)), "targets": ["class_3"]})
    assert explained.status_code == 200, explained.text
    body = explained.json()
    assert [p["label"] for p in body["predictions"]] == list(stock)
    assert [(e["target"], e["label"]) for e in body["explanations"]] == [(3, "class_3")]
    assert heatmap(body["explanations"][0]).shape == (240, 320)


def test_cli_follows_inference_port(monkeypatch) -> None:
    from torchserve_cam_cli.main import build_parser

    monkeypatch.delenv("TORCHSERVE_CAM_URL", raising=False)
    monkeypatch.setenv("INFERENCE_PORT", "18123")
    assert build_parser().parse_args(["predict", "x.png", "--model", "m"]).url == "http://127.0.0.1:18123"
    monkeypatch.setenv("TORCHSERVE_CAM_URL", "http://127.0.0.1:9")
    assert build_parser().parse_args(["predict", "x.png", "--model", "m"]).url == "http://127.0.0.1:9"

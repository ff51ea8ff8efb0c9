"""The CLIP handler: in-process (oracle agreement, one image forward per batch, cache) and served by the
session's TorchServe (the tiny CLIP archived from a save_pretrained directory)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
import yaml

from cam_engine.reshape import clip_reshape_for
from handlers.models.clip import TextEmbeddingCache, TextEntry
from handlers.serving.preprocess import preprocess
from handlers.tasks.clip import ClipHandler
from model_store.build import CONFIG_DIR
from tests.helpers.answers import heatmap as decode  # noqa: E402
from tests.helpers.answers import post  # noqa: E402
from tests.helpers.fake_context import FakeContext  # noqa: E402
from tests.helpers.inputs import b64, encode, square_image  # noqa: E402
from tests.helpers.oracle import pearson  # noqa: E402
from tests.helpers.serving import CLIP_LABELS, CLIP_MODEL  # noqa: E402
from tests.helpers.tiny_clip import session_tiny_clip  # noqa: E402


# ---------------------------------------------------------------------------------------------- in-process
@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory) -> ClipHandler:
    """The shipped clip_vit_b32 config, loaded over the tiny CLIP directory."""
    directory = tmp_path_factory.mktemp("clip-archive")
    shutil.copytree(session_tiny_clip(), directory / "clip")
    config = yaml.safe_load((CONFIG_DIR / "clip_vit_b32.yaml").read_text())
    (directory / "model-config.yaml").write_text(yaml.safe_dump(config))
    instance = ClipHandler()
    instance.initialize(FakeContext(directory, "clip"))
    return instance


def call(handler: ClipHandler, bodies: list[dict], explain: list[bool]) -> tuple[list[dict], FakeContext]:
    context = FakeContext(Path(handler.context.system_properties["model_dir"]), "clip", explain)
    return [json.loads(r) for r in handler.handle([{"body": body} for body in bodies], context)], context


def test_shipped_config_loads_with_the_grid_from_the_vision_config(handler: ClipHandler) -> None:
    described = handler.describe()
    assert described["grid"] == [16, 16]  # 224 / 14
    assert described["input_size"] == [224, 224] and described["resize"] == "shorter_side" and described["crop"]
    assert described["target_layers"] == ["vision_model.encoder.layers.-1.layer_norm1"]
    assert described["text_cache"]["size"] == 1  # the default prompts, encoded at load time


@pytest.mark.parametrize(("image_size", "patch_size", "side"), [(224, 32, 7), (224, 16, 14), (224, 14, 16), (336, 14, 24)])
def test_clip_reshape_grid_from_vision_config(image_size: int, patch_size: int, side: int) -> None:
    reshape = clip_reshape_for(SimpleNamespace(image_size=image_size, patch_size=patch_size))
    tokens = torch.arange(2 * (side * side + 1) * 3, dtype=torch.float32).reshape(2, side * side + 1, 3)
    maps = reshape(tokens)
    assert maps.shape == (2, 3, side, side)
    assert torch.equal(maps[:, :, 0, 1], tokens[:, 2, :])  # class token dropped, row-major patches


def test_oracle_agreement_with_the_seed_wrapper(handler: ClipHandler, oracle) -> None:
    """grad-cam 1.5.7 used as its CLIP example does: a module returning softmax probabilities over the
    prompts (re-encoding them), layer_norm1, a 16x16 reshape, ClassifierOutputTarget per prompt."""
    from transformers import CLIPModel, CLIPProcessor

    prompts = ["a photo of a cat", "a dog", "two red squares"]
    clip = CLIPModel.from_pretrained(str(session_tiny_clip())).eval()
    processor = CLIPProcessor.from_pretrained(str(session_tiny_clip()))

    class SeedWrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = clip

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            text = processor(text=prompts, return_tensors="pt", padding=True)
            outputs = self.clip(pixel_values=x, input_ids=text["input_ids"], attention_mask=text["attention_mask"])
            return outputs.logits_per_image.softmax(dim=1)

    def seed_reshape(tensor: torch.Tensor, height: int = 16, width: int = 16) -> torch.Tensor:
        result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)

    image = torch.from_numpy(square_image(180, 260, (40, 60, 120, 160), seed=3)).permute(2, 0, 1).contiguous()
    x, _ = preprocess(image, handler.config.preprocessing)
    x = x[None]
    seed = SeedWrapper()
    reference = oracle.GradCAM(
        model=seed, target_layers=[clip.vision_model.encoder.layers[-1].layer_norm1], reshape_transform=seed_reshape
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    expected = np.concatenate([reference(input_tensor=x, targets=[ClassifierOutputTarget(j)]) for j in range(3)])
    ((entry, _),) = handler._text_entries([tuple(prompts)])
    request = SimpleNamespace(task={"text": entry, "targets": [0, 1, 2]})
    result = handler.cams["gradcam"].run(x, [handler.targets_for(request)])
    ours = result.cams.cpu().numpy()
    assert ours.shape == expected.shape == (3, 224, 224)
    assert pearson(ours, expected).min() >= 0.99, pearson(ours, expected)
    # and the probabilities are the seed's
    with torch.no_grad():
        seed_probabilities = seed(x)[0]
    ours_probabilities = torch.softmax(handler.logit_scale * entry.embeddings @ result.outputs[0], dim=-1)
    torch.testing.assert_close(ours_probabilities, seed_probabilities, atol=1e-5, rtol=1e-4)


def test_a_batch_with_its_own_label_sets_takes_one_image_forward(handler: ClipHandler) -> None:
    calls = {"vision": 0, "text": 0}
    hooks = [
        handler.model.vision_model.register_forward_hook(lambda *_: calls.__setitem__("vision", calls["vision"] + 1)),
        handler.text_encoder.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1)),
    ]
    images = [b64(encode(square_image(90 + 10 * i, 140, (10, 10, 50, 60), seed=i))) for i in range(3)]
    bodies = [
        {"image": images[0], "labels": ["one", "two"], "targets": ["one", "two"]},
        {"image": images[1], "labels": ["three", "four", "five"]},
        {"image": images[2]},  # the default prompts
    ]
    try:
        batched, context = call(handler, bodies, [True, True, False])
    finally:
        for hook in hooks:
            hook.remove()
    assert context.status == {}
    assert calls == {"vision": 1, "text": 1}  # one image forward (explanations included), one text forward
    assert [len(r.get("explanations", [])) for r in batched] == [2, 1, 0]
    for body, together, explain in zip(bodies, batched, [True, True, False]):
        (alone,), _ = call(handler, [body], [explain])
        assert alone["text_embeddings"]["cache"] == "hit"
        assert [p["index"] for p in alone["predictions"]] == [p["index"] for p in together["predictions"]]
        for a, b in zip(alone["predictions"], together["predictions"]):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        for a, b in zip(alone.get("explanations", []), together.get("explanations", [])):
            assert a["target"] == b["target"]
            difference = np.abs(decode(a).astype(int) - decode(b).astype(int))
            assert difference.max() <= 2


def test_text_cache_is_lru_keyed_by_the_exact_prompts() -> None:
    cache = TextEmbeddingCache(capacity=2)
    entry = TextEntry(torch.zeros(1, 4), ())
    cache.put(("m", ("a",)), entry)
    cache.put(("m", ("b",)), entry)
    assert cache.get(("m", ("a",))) is entry  # "a" is now the most recent
    cache.put(("m", ("c",)), entry)  # evicts "b"
    assert cache.get(("m", ("b",))) is None and cache.get(("m", ("a", "b"))) is None
    assert cache.get(("other", ("a",))) is None and cache.get(("m", ("a",))) is entry
    assert (cache.hits, cache.misses, len(cache)) == (2, 3, 2)


# ---------------------------------------------------------------------------------------------- served
def test_served_predictions_sum_to_one_and_the_cache_is_hit(server) -> None:
    image = b64(encode(square_image(120, 120, (20, 20, 80, 80))))
    body = {"image": image, "labels": ["a yellow square", "grey noise", "a cat"]}
    first = post(server, f"predictions/{CLIP_MODEL}", body)
    assert first.status_code == 200, first.text
    result = first.json()
    assert result["model"] == CLIP_MODEL and result["weights"].startswith("dir:clip (sha256:")
    assert sorted(p["label"] for p in result["predictions"]) == sorted(body["labels"])
    assert sum(p["score"] for p in result["predictions"]) == pytest.approx(1.0, abs=1e-4)
    assert all(body["labels"][p["index"]] == p["label"] for p in result["predictions"])
    assert result["text_embeddings"]["cache"] == "miss" and "explanations" not in result
    second = post(server, f"predictions/{CLIP_MODEL}", {**body, "image": b64(encode(square_image(60, 90, (5, 5, 30, 30))))})
    cached = second.json()["text_embeddings"]
    assert cached["cache"] == "hit" and cached["hits"] > result["text_embeddings"]["hits"]
    assert cached["misses"] == result["text_embeddings"]["misses"]
    defaults = post(server, f"predictions/{CLIP_MODEL}", {"image": image}).json()
    assert sorted(p["label"] for p in defaults["predictions"]) == sorted(CLIP_LABELS)
    assert defaults["text_embeddings"]["cache"] == "hit"  # encoded at load time
    metrics = requests.get(f"{server.url('metrics')}/metrics", timeout=30).text
    for name in ("TextEmbeddingCacheHits", "TextEmbeddingCacheMisses"):
        lines = [line for line in metrics.splitlines() if line.startswith(name + "{") and CLIP_MODEL in line]
        assert lines and float(lines[0].rsplit(" ", 1)[1]) >= 1, (name, lines)


def test_served_heatmap_per_prompt_aligned_on_a_non_square_image(server) -> None:
    """A 100x300 image: shorter side to 224 (672 wide), centre crop 224: the model sees columns 100..200
    only, so each heatmap is 300x100 and zero outside that band."""
    image = square_image(100, 300, (30, 130, 70, 170))
    body = {"image": b64(encode(image)), "labels": CLIP_LABELS, "targets": ["a red square", "a photo of a dog", 0]}
    answer = post(server, f"explanations/{CLIP_MODEL}", body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert [(e["target"], e["label"]) for e in result["explanations"]] == [
        (2, "a red square"), (1, "a photo of a dog"), (0, "a photo of a cat")
    ]  # fmt: skip
    for explanation in result["explanations"]:
        assert explanation["method"] == "gradcam"
        assert explanation["layers"] == ["vision_model.encoder.layers.-1.layer_norm1"]
        cam = decode(explanation)
        assert cam.shape == (100, 300)
        assert cam[:, :99].max() == 0 and cam[:, 201:].max() == 0  # cropped away: never seen
        assert cam[:, 101:199].max() > 0
    default = post(server, f"explanations/{CLIP_MODEL}", {"image": body["image"]}).json()
    (explanation,) = default["explanations"]
    assert explanation["target"] == default["predictions"][0]["index"]


def test_served_bad_inputs_and_truncation(server) -> None:
    image = b64(encode(square_image(64, 64, (10, 10, 40, 40))))
    bad = {
        "empty_labels": {"labels": []},
        "labels_not_a_list": {"labels": "a cat"},
        "non_string_label": {"labels": ["a cat", 7]},
        "blank_label": {"labels": ["a cat", "  "]},
        "too_many_labels": {"labels": [f"label {i}" for i in range(7)]},
        "duplicate_labels": {"labels": ["a cat", "a cat"]},
        "unknown_target": {"labels": ["a cat", "a dog"], "targets": ["a horse"]},
        "target_out_of_range": {"labels": ["a cat", "a dog"], "targets": [2]},
        "target_not_a_label": {"targets": [{"label": "a cat"}]},
    }
    for name, options in bad.items():
        answer = post(server, f"explanations/{CLIP_MODEL}", {"image": image, **options})
        assert answer.status_code == 400, (name, answer.status_code, answer.text[:300])
        error = answer.json()
        assert error["code"] == 400 and error["type"] == "InvalidInput" and error["message"], name
    long_prompt = "a very long prompt " * 20  # 380 byte-level tokens > 77
    answer = post(server, f"predictions/{CLIP_MODEL}", {"image": image, "labels": ["a cat", long_prompt]})
    assert answer.status_code == 200, answer.text
    (truncated,) = answer.json()["truncated"]
    assert truncated["index"] == 1 and truncated["tokens"] > truncated["max_tokens"] == 77
    assert post(server, f"predictions/{CLIP_MODEL}", {"image": image}).status_code == 200  # worker alive

"""The CLIP handler's path against the seed's wrapper approach, on a tiny CLIP and a ViT-B/16-shaped CLIP.

The seed (pytorch-grad-cam's CLIP example) wraps ``CLIPModel`` in a module whose forward re-tokenises
and re-encodes every prompt and returns softmax probabilities, and explains it with pytorch-grad-cam
(full backward, one call per prompt). Ours (``handlers.tasks.clip``) encodes the prompts once (LRU cache),
runs the vision tower alone, scores each image against its cached text embeddings in the target, and
takes the gradients for several prompts from one vmapped backward pass (cam_engine).

Both models are random-init (no download): ``tiny`` = the test CLIP (vision hidden 64, 2 layers, patch 14),
``vit_b16`` = a CLIP whose vision tower has ViT-B/16's shape (hidden 768, 12 layers, 12 heads, patch 16,
224) with the tiny text tower. Images are 224x224 (already preprocessed), batch ``--batch``.
Three ratios, medians of ``--repeats`` after one warm-up, all measured in one run:

1. latency per image with 8 prompts, explaining the top prompt: seed (grad-cam 1.5.7 on the wrapper)
   vs ours (also: predictions only, no CAM);
2. the speed-up from caching text embeddings alone: the same cam_engine GradCAM on the seed's wrapper
   (prompts re-encoded every forward) vs on the image encoder with cached text (also: uncached cost of
   encoding the prompts once);
3. 4 prompts explained per image: one forward + one vmapped backward vs one forward + 4 backward
   passes (loop) vs 4 separate forward+backward passes (the seed's way, cam_engine).

    .venv/bin/python bench/bench_clip.py [--models tiny vit_b16] [--repeats 3] [--batch 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cam_engine  # noqa: E402
from cam_engine.reshape import clip_reshape_for  # noqa: E402
from handlers.models.clip import DEFAULT_TARGET_LAYER, ClipImageEncoder, ClipTextEncoder, PromptTarget  # noqa: E402
from tests.helpers.tiny_clip import TINY_VISION, VIT_B16_VISION, save_tiny_clip  # noqa: E402

PROMPTS = [f"a photo of a {name}" for name in ("cat", "dog", "car", "tree", "house", "person", "bird", "boat")]
MODELS = {"tiny": TINY_VISION, "vit_b16": VIT_B16_VISION}


def median_seconds(function: Callable[[], object], repeats: int, device: torch.device) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class SeedWrapper(torch.nn.Module):
    """The seed's ``ImageClassifier``: re-tokenises and re-encodes the prompts on every forward."""

    def __init__(self, clip: torch.nn.Module, processor, prompts: list[str]) -> None:
        super().__init__()
        self.clip = clip
        self.processor = processor
        self.prompts = prompts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        text = self.processor(text=self.prompts, return_tensors="pt", padding=True)
        outputs = self.clip(
            pixel_values=x,
            input_ids=text["input_ids"].to(x.device),
            attention_mask=text["attention_mask"].to(x.device),
        )
        return outputs.logits_per_image.softmax(dim=1)


def bench_model(name: str, directory: Path, batch: int, repeats: int, device: torch.device) -> dict:
    from pytorch_grad_cam import GradCAM as SeedGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as SeedTarget
    from transformers import AutoTokenizer, CLIPModel, CLIPProcessor

    clip = CLIPModel.from_pretrained(str(directory)).to(device).eval()
    processor = CLIPProcessor.from_pretrained(str(directory))
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    vision = clip.config.vision_config
    side = vision.image_size // vision.patch_size
    torch.manual_seed(0)
    x = torch.randn(batch, 3, vision.image_size, vision.image_size, device=device)
    results: dict[str, float | str | int] = {"grid": f"{side}x{side}", "batch": batch}

    # ---- the seed: wrapper + pytorch-grad-cam (parameters require grad, as the seed leaves them)
    seed = SeedWrapper(clip, processor, PROMPTS)

    def seed_reshape(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[:, 1:, :].reshape(tensor.size(0), side, side, tensor.size(2)).permute(0, 3, 1, 2)

    seed_layer = clip.vision_model.encoder.layers[-1].layer_norm1
    seed_cam = SeedGradCAM(model=seed, target_layers=[seed_layer], reshape_transform=seed_reshape)
    results["seed_gradcam_8_prompts_top_s"] = median_seconds(lambda: seed_cam(input_tensor=x, targets=None), repeats, device)

    # ---- ours: the handler's pieces (image encoder, cached text, PromptTarget, cam_engine)
    image_encoder = ClipImageEncoder(clip).eval()
    text_encoder = ClipTextEncoder(clip).eval()
    scale = float(clip.logit_scale.detach().exp())

    def encode_text() -> torch.Tensor:
        tokens = tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():  # not inference_mode: the embeddings enter the CAM's autograd graph
            return text_encoder(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))

    results["ours_encode_8_prompts_once_s"] = median_seconds(encode_text, repeats, device)
    text = encode_text()  # what the cache holds
    for parameter in clip.parameters():  # what the handler does at load time
        parameter.requires_grad_(False)
    ours_cam = cam_engine.create("gradcam", image_encoder, [DEFAULT_TARGET_LAYER], reshape_transform=clip_reshape_for(vision))

    def ours_top() -> None:
        ours_cam.run(x, [[PromptTarget(text, scale, None, True)] for _ in range(batch)])

    def ours_predict() -> None:
        with torch.inference_mode():
            torch.softmax(scale * image_encoder(x) @ text.T, dim=-1)

    def seed_predict() -> None:
        with torch.inference_mode():
            seed(x)

    results["ours_gradcam_8_prompts_top_s"] = median_seconds(ours_top, repeats, device)
    results["seed_predict_8_prompts_s"] = median_seconds(seed_predict, repeats, device)
    results["ours_predict_8_prompts_s"] = median_seconds(ours_predict, repeats, device)

    # ---- caching alone: the same cam_engine GradCAM on the seed's wrapper (re-encodes text each forward)
    wrapper_cam = cam_engine.create("gradcam", seed, ["clip." + DEFAULT_TARGET_LAYER], reshape_transform=clip_reshape_for(vision))
    results["engine_on_seed_wrapper_top_s"] = median_seconds(lambda: wrapper_cam.run(x, None), repeats, device)

    # ---- 4 prompts per image: one vmapped backward vs a loop of backward passes vs 4 separate calls
    four = [[PromptTarget(text, scale, j, True) for j in range(4)] for _ in range(batch)]
    used = {"batched": None}
    original = ours_cam._batched_gradients

    def spy(losses, tensors):
        grads = original(losses, tensors)
        used["batched"] = grads is not None
        return grads

    ours_cam._batched_gradients = spy
    results["ours_4_prompts_one_vmapped_backward_s"] = median_seconds(lambda: ours_cam.run(x, four), repeats, device)
    results["vmapped_backward_used"] = bool(used["batched"])
    ours_cam._batched_gradients = original
    ours_cam.batch_target_gradients = False
    results["ours_4_prompts_4_backward_passes_s"] = median_seconds(lambda: ours_cam.run(x, four), repeats, device)
    ours_cam.batch_target_gradients = True

    def separate() -> None:
        for j in range(4):
            ours_cam.run(x, [[four[i][j]] for i in range(batch)])

    results["ours_4_prompts_4_separate_calls_s"] = median_seconds(separate, repeats, device)
    for parameter in clip.parameters():
        parameter.requires_grad_(True)

    def seed_four() -> None:
        for j in range(4):
            seed_cam(input_tensor=x, targets=[SeedTarget(j)] * batch)

    results["seed_4_prompts_4_gradcam_calls_s"] = median_seconds(seed_four, repeats, device)

    ratios = {
        "8 prompts, explain top: seed / ours (per image)": results["seed_gradcam_8_prompts_top_s"]
        / results["ours_gradcam_8_prompts_top_s"],
        "8 prompts, predictions only: seed / ours": results["seed_predict_8_prompts_s"] / results["ours_predict_8_prompts_s"],
        "text cache alone (cam_engine on seed wrapper / cached)": results["engine_on_seed_wrapper_top_s"]
        / results["ours_gradcam_8_prompts_top_s"],
        "4 prompts: 4 backward passes / one vmapped": results["ours_4_prompts_4_backward_passes_s"]
        / results["ours_4_prompts_one_vmapped_backward_s"],
        "4 prompts: 4 separate calls / one vmapped": results["ours_4_prompts_4_separate_calls_s"]
        / results["ours_4_prompts_one_vmapped_backward_s"],
        "4 prompts: seed (4 grad-cam calls) / ours": results["seed_4_prompts_4_gradcam_calls_s"]
        / results["ours_4_prompts_one_vmapped_backward_s"],
    }
    results["per_image_ms"] = {
        "seed_8_prompts_top": 1000 * results["seed_gradcam_8_prompts_top_s"] / batch,
        "ours_8_prompts_top": 1000 * results["ours_gradcam_8_prompts_top_s"] / batch,
    }
    results["ratios"] = ratios
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-clip-") as tmp:
        for name in args.models:
            directory = save_tiny_clip(Path(tmp) / name, vision=MODELS[name])
            started = time.perf_counter()
            report["models"][name] = bench_model(name, directory, args.batch, args.repeats, device)
            report["models"][name]["bench_wall_s"] = time.perf_counter() - started
            print(f"== {name} ({report['models'][name]['grid']} grid, batch {args.batch}, {device})", flush=True)
            for key, value in report["models"][name].items():
                if key == "ratios":
                    for label, ratio in value.items():
                        print(f"   {label:58s} {ratio:6.2f}x", flush=True)
                elif isinstance(value, float):
                    print(f"   {key:58s} {value * 1000:9.1f} ms", flush=True)
                else:
                    print(f"   {key:58s} {value}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

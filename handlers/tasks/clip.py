"""TorchServe handler for CLIP: zero-shot predictions over text prompts and a heatmap per prompt.

The archive carries a HuggingFace ``CLIPModel`` + ``CLIPProcessor`` directory in ``save_pretrained``
layout (or the config names a mounted directory). JSON options beyond the common ones
(see :mod:`handlers.serving.base`):

- ``labels``: the prompts to score this image against (default: the config's ``labels``), at most
  ``clip.max_labels``, distinct non-empty strings;
- ``targets``: the prompts to explain, by text (or index into ``labels``); default the top one.

Response (``explanations`` only when the request is explained)::

    {"model": "clip", "version": "1.0", "weights": "...",
     "predictions": [{"index": 1, "label": "a photo of a cat", "score": 0.91}, ...],   # all prompts
     "text_embeddings": {"cache": "hit", "hits": 12, "misses": 3},
     "truncated": [{"index": 0, "tokens": 93, "max_tokens": 77}],                     # only if any
     "explanations": [{"target": 1, "label": "a photo of a cat", "method": "gradcam",
                       "layers": ["vision_model.encoder.layers.-1.layer_norm1"],
                       "heatmap": {"format": "png", "width": 640, "height": 480, "data": "<base64>"}}]}

How the work is shared (the reason this is not the seed's wrapper):

- **Text once.** Prompt embeddings ``[L, D]`` (L2-normalised) live in an LRU cache keyed by the model
  and the exact prompt tuple; the label sets a batch misses are encoded together in one text forward.
  Images never re-encode text.
- **Images once.** The CAM model is the vision tower alone (:class:`ClipImageEncoder`: pixel values
  ``[B, 3, H, W]`` -> normalised image embeddings ``[B, D]``), so a batch whose requests carry
  different label sets still takes one forward pass. Each request's label set enters only through
  its targets (:class:`PromptTarget`), which score that image's embedding against that request's
  cached text embeddings: ``softmax(exp(logit_scale) * T @ e)[j]``, the seed's probability.
- **One backward for several prompts.** Several prompts of one image need separate gradients of the
  same activations. ``cam_engine``'s ``run(x, targets=[[t1, t2, ...], ...])`` takes them from ONE
  vmapped backward pass, ``torch.autograd.grad(stack(losses), activations, grad_outputs=eye(T),
  is_grads_batched=True)`` (``BaseCAM._batched_gradients``), truncated at the target layer, instead of
  T backward passes; it falls back to a loop only where an op has no batching rule. We chose that
  over stacking the image once per prompt because stacking repeats the forward pass T times, while
  the vmapped backward shares one forward and batches only the (cheap, truncated) backward.

This module defines exactly one handler class, as TorchServe's class-based handler loading requires.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from handlers.config import ConfigError, HandlerConfig
from handlers.models.clip import (
    ClipConfig,
    ClipImageEncoder,
    ClipTextEncoder,
    PromptTarget,
    TextEmbeddingCache,
    TextEntry,
    clip_reshape,
    clip_section,
    load_clip,
)
from handlers.serving.base import CamHandler, ParsedRequest, RequestError
from handlers.serving.metrics import metrics_cache
from handlers.tasks.registry import TaskResult, get_task

__all__ = ["ClipHandler"]

class ClipHandler(CamHandler):
    """Zero-shot CLIP: softmax over prompts, one image-aligned heatmap per explained prompt."""

    task = get_task("clip")
    task_options = task.options

    def __init__(self) -> None:
        super().__init__()
        self.clip_config = ClipConfig()
        self.clip_dir = Path()
        self.text_encoder: ClipTextEncoder | None = None
        self.tokenizer: Any = None
        self.vision_config: Any = None
        self.logit_scale = 1.0
        self.max_tokens = 77
        self.text_cache = TextEmbeddingCache(ClipConfig.text_cache_size)
        self._cache_key = ""
        self._cache_metrics: tuple[Any, Any] | None = None

    # ------------------------------------------------------------------ loading
    def load_config(self, yaml_config: Mapping[str, Any] | None, model_dir: Path) -> HandlerConfig:
        """Read ``handler.clip``; default the target layer and take preprocessing from the image processor."""
        handler = dict((yaml_config or {}).get("handler") or {})
        self.clip_config, self.clip_dir = clip_section(handler, model_dir)
        handler.setdefault("architecture", "clip")
        config = HandlerConfig.from_dict(handler)
        labels = config.labels
        if isinstance(labels, tuple) and len(labels) > self.clip_config.max_labels:
            raise ConfigError(f"handler.labels: {len(labels)} default prompts, clip.max_labels is {self.clip_config.max_labels}")
        self.text_cache = TextEmbeddingCache(self.clip_config.text_cache_size)
        return config

    def load_model(self, model_dir: Path) -> nn.Module:
        """The vision tower as the CAM model; the text tower and tokenizer are kept beside it."""
        clip, self.tokenizer = load_clip(self.clip_dir, tokenizer=True)
        self.vision_config = clip.config.vision_config
        self.logit_scale = float(clip.logit_scale.detach().exp())
        limit = getattr(self.tokenizer, "model_max_length", None) or 10**9
        self.max_tokens = int(min(limit, clip.config.text_config.max_position_embeddings))
        self.text_encoder = ClipTextEncoder(clip).to(self.device).eval()
        for parameter in self.text_encoder.parameters():
            parameter.requires_grad_(False)
        self._cache_key = f"{self.model_name}:{self.version}:{self.clip_dir}"
        if not self.build_info.get("weights_source"):
            self.build_info["weights_source"] = f"dir:{self.clip_dir}"
        return ClipImageEncoder(clip)

    def reshape_transform(self) -> Any:
        """cam_engine's CLIP reshape with the grid from ``vision_config`` (B/32, B/16, L/14, L/14@336)."""
        return clip_reshape(self.vision_config, self.config.explanation.reshape)

    def _load_labels(self, model_dir: Path) -> list[str]:
        labels = super()._load_labels(model_dir)
        if len(labels) > self.clip_config.max_labels:
            raise ConfigError(f"handler.labels: {len(labels)} default prompts, clip.max_labels is {self.clip_config.max_labels}")
        return labels

    def _warm_up(self) -> None:
        super()._warm_up()
        self._text_entries([tuple(self.labels)])  # the default prompts are encoded at load time

    # ------------------------------------------------------------------ text embeddings
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """Unit text embeddings ``[L, D]`` for ``prompts`` (one text forward) and each prompt's token
        count before truncation to ``max_tokens``."""
        counts = [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        with torch.inference_mode():
            embeddings = self.text_encoder(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
        return embeddings.clone(), counts

    def _text_entries(self, label_sets: Sequence[tuple[str, ...]]) -> list[tuple[TextEntry, bool]]:
        """Per label set, its cached entry and whether it was a cache hit. The sets missing from the
        cache are encoded together: one text forward over their distinct prompts."""
        found: dict[tuple[str, ...], TextEntry] = {}
        hits: list[bool] = []
        missing: list[tuple[str, ...]] = []
        for labels in label_sets:
            entry = found.get(labels) or self.text_cache.get((self._cache_key, labels))
            if entry is None and labels not in missing:
                missing.append(labels)
            hits.append(entry is not None)
            if entry is not None:
                found[labels] = entry
        if missing:
            prompts = list(dict.fromkeys(p for labels in missing for p in labels))
            embeddings, counts = self.encode_prompts(prompts)
            position = {p: i for i, p in enumerate(prompts)}
            for labels in missing:
                rows = [position[p] for p in labels]
                truncated = tuple((i, counts[r]) for i, r in enumerate(rows) if counts[r] > self.max_tokens)
                entry = TextEntry(embeddings[rows], truncated)
                self.text_cache.put((self._cache_key, labels), entry)
                found[labels] = entry
        self._metrics_cache(sum(hits), len(hits) - sum(hits))
        return [(found[labels], hit) for labels, hit in zip(label_sets, hits)]

    def _metrics_cache(self, hits: int, misses: int) -> None:
        """Counters ``TextEmbeddingCacheHits`` / ``TextEmbeddingCacheMisses`` (by ModelName); no-op without TorchServe."""
        if self._cache_metrics is None:
            found = metrics_cache(self.context)
            if found is None:
                return
            cache, MetricTypes = found
            self._cache_metrics = tuple(
                cache.add_metric_to_cache(name, "count", ["ModelName"], MetricTypes.COUNTER)
                for name in ("TextEmbeddingCacheHits", "TextEmbeddingCacheMisses")
            )
        for metric, value in zip(self._cache_metrics, (hits, misses)):
            if value:
                metric.add_or_update(value, [self.model_name])

    # ------------------------------------------------------------------ task hooks
    def parse_task_options(self, request: ParsedRequest, options: Mapping[str, Any]) -> None:
        """``labels`` -> a tuple of distinct prompts; ``targets`` -> prompt indices (None: the top one)."""
        labels = options.get("labels")
        if labels is None:
            labels = list(self.labels)
        else:
            if not isinstance(labels, list) or not labels:
                raise RequestError(f"labels must be a non-empty list of strings, got {labels!r}"[:300])
            bad = [label for label in labels if not isinstance(label, str) or not label.strip()]
            if bad:
                raise RequestError(f"every label must be a non-empty string, got {bad[0]!r}"[:300])
            limit = self.clip_config.max_labels
            if len(labels) > limit:
                raise RequestError(f"{len(labels)} labels sent, this model allows at most {limit} per request")
            if len(set(labels)) != len(labels):
                raise RequestError("labels must be distinct")
        request.task = {"labels": tuple(labels), "targets": self._target_indices(options.get("targets"), labels)}

    def _target_indices(self, targets: Any, labels: Sequence[str]) -> list[int] | None:
        if targets is None:
            return None
        if isinstance(targets, (int, str)) and not isinstance(targets, bool):
            targets = [targets]
        if not isinstance(targets, list) or not targets:
            raise RequestError(f"targets must be a non-empty list of labels, got {targets!r}"[:300])
        limit = self.config.explanation.max_targets
        if len(targets) > limit:
            raise RequestError(f"{len(targets)} targets asked, this model allows at most {limit} per request")
        folded = {label.strip().lower(): i for i, label in reversed(list(enumerate(labels)))}
        indices = []
        for target in targets:
            if isinstance(target, int) and not isinstance(target, bool):
                if not 0 <= target < len(labels):
                    raise RequestError(f"target {target} is out of range: there are {len(labels)} labels")
                indices.append(target)
            elif isinstance(target, str):
                index = labels.index(target) if target in labels else folded.get(target.strip().lower())
                if index is None:
                    raise RequestError(f"target {target!r} is not one of the labels")
                indices.append(index)
            else:
                raise RequestError(f"a target must be a label (or its index), got {target!r}"[:300])
        return indices

    def explain_batch(self, batch: torch.Tensor, requests: list[ParsedRequest]) -> tuple[Any, list[torch.Tensor | None]]:
        """Resolve every request's text embeddings (cache, then one text forward), then the base's one
        image forward (and one vmapped backward per CAM call) for the whole batch."""
        for request, (entry, hit) in zip(requests, self._text_entries([r.task["labels"] for r in requests])):
            request.task["text"] = entry
            request.task["cache"] = "hit" if hit else "miss"
        return super().explain_batch(batch, requests)

    def target_count(self, request: ParsedRequest) -> int:
        return len(request.task.get("targets") or [None])  # targets_for needs the text embeddings of the batch

    def targets_for(self, request: ParsedRequest) -> list[Any]:
        entry: TextEntry = request.task["text"]
        softmax = self.clip_config.score == "softmax" and entry.embeddings.shape[0] > 1
        indices = request.task.get("targets") or [None]
        return [PromptTarget(entry.embeddings, self.logit_scale, index, softmax) for index in indices]

    def build_response(
        self, request: ParsedRequest, outputs: Any, row: int, explanations: list[dict[str, Any]] | None
    ) -> TaskResult:
        entry: TextEntry = request.task["text"]
        labels = request.task["labels"]
        logits = self.logit_scale * (entry.embeddings.float() @ outputs[row].float())
        probabilities = torch.softmax(logits, dim=-1)
        order = probabilities.argsort(descending=True).tolist()
        values = probabilities.tolist()
        predictions = [{"index": i, "label": labels[i], "score": round(values[i], 6)} for i in order]
        extra: dict[str, Any] = {}
        extra["text_embeddings"] = {
            "cache": request.task["cache"],
            "hits": self.text_cache.hits,
            "misses": self.text_cache.misses,
        }
        if entry.truncated:
            extra["truncated"] = [
                {"index": i, "label": labels[i], "tokens": count, "max_tokens": self.max_tokens}
                for i, count in entry.truncated
            ]
        if explanations is None:
            return TaskResult(self.task.name, predictions, None, extra)
        targets = request.task.get("targets") or [order[0]]
        meta = self.explanation_meta(request)
        explained = [
            {"target": target, "label": labels[target], **meta, **pictures}
            for target, pictures in zip(targets, explanations)
        ]
        return TaskResult(self.task.name, predictions, explained, extra)

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described.update(
            clip_dir=str(self.clip_dir),
            default_labels=list(self.labels),
            max_labels=self.clip_config.max_labels,
            score=self.clip_config.score,
            grid=[int(self.vision_config.image_size) // int(self.vision_config.patch_size)] * 2,
            text_cache={"size": len(self.text_cache), "hits": self.text_cache.hits, "misses": self.text_cache.misses},
        )
        return described

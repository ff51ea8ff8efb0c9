"""TorchServe handler for embedding models: cosine similarity to a concept, and what makes it so.

The model maps an image to an embedding ``[D]``: a classifier backbone with its head removed, or a
CLIP image tower (``architecture: clip`` with a ``clip:`` section as for the CLIP handler: the
``save_pretrained`` directory, preprocessing from its image processor, the token-grid reshape from its
vision config; the text tower is not loaded). A request names stored concepts (their embeddings
computed when the model loads, from the images the config lists and the archive carries) or sends its
own reference images. JSON options beyond the common ones (see :mod:`handlers.serving.base`):

- ``concept``: a stored concept name, or a list of names (at most ``max_targets``);
- ``references``: a list of base64 images (at most ``embedding.max_references``); their mean
  L2-normalised embedding is compared as the concept ``"references"``;
- ``target``: ``similarity`` (default: ``SimilarityToConceptTarget``, where the image looks like the
  concept) or ``difference`` (``DifferenceFromConceptTarget``, where it does not).

Exactly one of ``concept`` and ``references`` is required. Response::

    {"model": "resnet18_embedding", "version": "1.0", "weights": "...",
     "similarities": [{"concept": "red", "similarity": 0.91}],
     "explanations": [{"concept": "red", "target": "similarity", "method": "gradcam",
                       "layers": ["layer4.-1"], "heatmap": {...}}]}

This module defines exactly one class, as TorchServe's class-based handler loading requires.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cam_engine.targets import DifferenceFromConceptTarget, SimilarityToConceptTarget
from handlers.config import ConfigError, HandlerConfig
from handlers.models.clip import ClipImageEncoder, clip_reshape, clip_section, load_clip
from handlers.models.loading import LoadedModel
from handlers.serving.base import CamHandler, ParsedRequest, RequestError
from handlers.serving.codec import decode_base64, decode_image
from handlers.serving.preprocess import preprocess
from handlers.tasks.registry import TaskResult, get_task
from handlers.tasks.targets import SumTarget

__all__ = ["EmbeddingHandler"]

TARGETS = {"similarity": SimilarityToConceptTarget, "difference": DifferenceFromConceptTarget}
REFERENCES = "references"


class EmbeddingHandler(CamHandler):
    """Cosine similarity of an image's embedding to concepts, with a CAM of the similarity."""

    task = get_task("embedding")
    task_options = task.options

    def __init__(self) -> None:
        super().__init__()
        self.concepts: dict[str, torch.Tensor] = {}
        self.clip_dir: Path | None = None  # set for a CLIP image tower
        self.vision_config: Any = None

    def load_config(self, yaml_config: Mapping[str, Any] | None, model_dir: Path) -> HandlerConfig:
        """For ``architecture: clip``: read ``handler.clip`` and default the layer and preprocessing to
        the CLIP directory's, as the CLIP handler does."""
        handler = dict((yaml_config or {}).get("handler") or {})
        if handler.get("architecture") != "clip":
            return super().load_config(yaml_config, model_dir)
        _, self.clip_dir = clip_section(handler, model_dir)
        return HandlerConfig.from_dict(handler)

    def load_model(self, model_dir: Path) -> LoadedModel | torch.nn.Module:
        """A CLIP image tower (unit image embeddings) from the directory, else the registered architecture."""
        if self.clip_dir is None:
            return super().load_model(model_dir)
        clip, _ = load_clip(self.clip_dir)
        self.vision_config = clip.config.vision_config
        if not self.build_info.get("weights_source"):
            self.build_info["weights_source"] = f"dir:{self.clip_dir}"
        return ClipImageEncoder(clip)  # the text tower is dropped with ``clip``

    def reshape_transform(self) -> Any:
        if self.clip_dir is None:
            return super().reshape_transform()
        return clip_reshape(self.vision_config, self.config.explanation.reshape)

    def _load_labels(self, model_dir: Path) -> list[str]:
        return []  # an embedding model has no classes

    def warm_up_targets(self) -> list[Any]:
        return [SumTarget()]

    def initialize(self, context: Any) -> None:
        """Load the model (base), then embed every configured concept's images once."""
        super().initialize(context)
        model_dir = Path(context.system_properties.get("model_dir") or ".")
        for name, files in self.config.embedding.concepts:
            inputs = []
            for file in files:
                path = model_dir / file
                if not path.exists():
                    raise ConfigError(f"handler.embedding.concepts.{name}: file {file!r} is not in the archive")
                with Image.open(path) as picture:
                    array = torch.from_numpy(np.asarray(picture.convert("RGB")).copy())
                inputs.append(preprocess(array.permute(2, 0, 1).contiguous(), self.config.preprocessing)[0])
            self.concepts[name] = self._concept(torch.stack(inputs).to(self.device))

    def _concept(self, inputs: torch.Tensor) -> torch.Tensor:
        """Mean of the L2-normalised embeddings of ``inputs`` ``[N, 3, H, W]``: ``[D]``."""
        with torch.inference_mode():
            embeddings = self.model(inputs).float().reshape(inputs.shape[0], -1)
        return F.normalize(embeddings, dim=1).mean(dim=0).clone()

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["concepts"] = sorted(self.concepts)
        described["max_references"] = self.config.embedding.max_references
        return described

    def parse_task_options(self, request: ParsedRequest, options: Mapping[str, Any]) -> None:
        """``concept`` -> names; ``references`` -> preprocessed inputs ``[R, 3, H, W]``; ``target``."""
        target = options.get("target", "similarity")
        if target not in TARGETS:
            raise RequestError(f"target must be 'similarity' or 'difference', got {target!r}")
        concept = options.get("concept")
        references = options.get("references")
        if (concept is None) == (references is None):
            raise RequestError("send exactly one of 'concept' (a stored concept name) and 'references' (images)")
        names: list[str] = []
        reference_inputs = None
        if concept is not None:
            names = [concept] if isinstance(concept, str) else concept
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise RequestError(f"concept must be a name or a list of names, got {concept!r}")
            if len(names) > self.config.explanation.max_targets:
                raise RequestError(
                    f"{len(names)} concepts asked, this model explains at most {self.config.explanation.max_targets}"
                )
            unknown = [n for n in names if n not in self.concepts]
            if unknown:
                known = ", ".join(sorted(self.concepts)) or "none"
                raise RequestError(f"unknown concept {unknown[0]!r}; this model knows: {known}")
        else:
            if not isinstance(references, list) or not references:
                raise RequestError("references must be a non-empty list of base64 images")
            limit = self.config.embedding.max_references
            if len(references) > limit:
                raise RequestError(f"{len(references)} reference images sent, this model allows at most {limit}")
            pictures = []
            for position, value in enumerate(references):
                try:
                    pictures.append(decode_image(decode_base64(value, f"references[{position}]"), self.config.max_image_pixels))
                except RequestError as error:
                    raise RequestError(f"references[{position}]: {error.message}", error.code, error.kind) from None
            reference_inputs = torch.stack([preprocess(p, self.config.preprocessing)[0] for p in pictures])
            names = [REFERENCES]
        request.task = {"concepts": names, "target": target, "reference_inputs": reference_inputs}

    def explain_batch(self, batch: torch.Tensor, requests: list[ParsedRequest]) -> tuple[Any, list]:
        """Embed every request's reference images in one pass, then explain the batch (base)."""
        with_references = [r for r in requests if r.task["reference_inputs"] is not None]
        if with_references:
            stacked = torch.cat([r.task["reference_inputs"] for r in with_references]).to(self.device)
            with torch.inference_mode():
                embeddings = F.normalize(self.model(stacked).float().reshape(stacked.shape[0], -1), dim=1)
            start = 0
            for request in with_references:
                count = request.task["reference_inputs"].shape[0]
                request.task["features"] = {REFERENCES: embeddings[start : start + count].mean(dim=0).clone()}
                start += count
        for request in requests:
            if request.task["reference_inputs"] is None:
                request.task["features"] = {name: self.concepts[name] for name in request.task["concepts"]}
        return super().explain_batch(batch, requests)

    def target_count(self, request: ParsedRequest) -> int:
        return len(request.task["concepts"])  # targets_for needs the batch's concept features

    def targets_for(self, request: ParsedRequest) -> list[Any]:
        target = TARGETS[request.task["target"]]
        return [target(request.task["features"][name]) for name in request.task["concepts"]]

    def build_response(
        self, request: ParsedRequest, outputs: Any, row: int, explanations: list[dict[str, Any]] | None
    ) -> TaskResult:
        embedding = outputs[row].float().reshape(-1)
        similarities = [
            {
                "concept": name,
                "similarity": round(float(F.cosine_similarity(embedding, request.task["features"][name].to(embedding.device), dim=0)), 6),
            }
            for name in request.task["concepts"]
        ]
        if explanations is None:
            return TaskResult(self.task.name, similarities)
        meta = self.explanation_meta(request)
        explained = [
            {"concept": name, "target": request.task["target"], **meta, **pictures}
            for name, pictures in zip(request.task["concepts"], explanations)
        ]
        return TaskResult(self.task.name, similarities, explained)

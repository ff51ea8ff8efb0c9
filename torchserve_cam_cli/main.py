"""``torchserve-cam``: predict and explain with a running TorchServe, or compare CAM methods offline.

    torchserve-cam predict cat.jpg dog.jpg --model efficientnet_lite0 --top-k 3
    torchserve-cam explain cat.jpg --model efficientnet_lite0 --target "Egyptian cat" --target 281 --out out/
    torchserve-cam explain street.jpg --model yolov8n -o boxes=[0,2] -o score_threshold=0.4 --method gradcam
    torchserve-cam explain dog.jpg --model resnet50_embedding -o concept=cat
    torchserve-cam gallery docs/chelsea.jpg --out docs/gallery_chelsea.jpg       # no server: cam_engine locally

Exit codes: 0 success, 1 the server refused at least one image (its message is printed), 2 a usage or
setup problem (no token, server unreachable, unreadable file).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from handlers.tasks.registry import TaskResult

from .client import (
    DEFAULT_URL,
    KEY_FILE_ENV,
    TOKEN_ENV,
    URL_ENV,
    Client,
    CliError,
    Outcome,
    ServerError,
    default_url,
    parse_target,
    resolve_token,
)

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_SERVER, EXIT_USAGE = 0, 1, 2
DEFAULT_DETECTIONS_SHOWN = 5  # a detector answers up to its max_detections (100): the table lists the best few


# ---------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchserve-cam",
        description="Predictions and CAM heatmaps from a torchserve-cam TorchServe, and an offline method gallery.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def server_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="JPEG/PNG/WebP files")
        sub.add_argument("--model", required=True, help="the served model name (e.g. efficientnet_lite0)")
        sub.add_argument("--url", default=default_url(),
                         help=f"inference address (default ${URL_ENV}, else 127.0.0.1:$INFERENCE_PORT, else {DEFAULT_URL})")
        sub.add_argument("--token", help=f"inference token (default ${TOKEN_ENV}, else the key file)")
        sub.add_argument("--key-file", help=f"TorchServe's key_file.json (default ${KEY_FILE_ENV} or ./key_file.json)")
        sub.add_argument("--no-token", action="store_true", help="send no token (a server with token auth off)")
        sub.add_argument("--top-k", type=_positive, default=None,
                         help="predictions to show (default: the model's top_k); detections to list (default "
                              f"{DEFAULT_DETECTIONS_SHOWN})")
        sub.add_argument("--concurrency", type=_positive, default=4, help="requests in flight at once (default 4)")
        sub.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each answer (default 120)")
        sub.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                         help="progress on stderr: auto = for more than one image")
        sub.add_argument("-o", "--option", action="append", default=[], type=parse_option, metavar="KEY=VALUE",
                         help="any request option of the model's task, repeatable; VALUE is JSON when it parses "
                              "(boxes=[0,2], score_threshold=0.4, classes=person, concept=cat)")

    predict = commands.add_parser("predict", help="top-k predictions for each image, as a table")
    server_options(predict)

    explain = commands.add_parser("explain", help="write heatmap PNGs and overlay JPEGs for each image and target")
    server_options(explain)
    explain.add_argument("--target", action="append", default=None, metavar="LABEL_OR_INDEX",
                         help="class to explain, repeatable (default: the top-1 class)")
    explain.add_argument("--method", default=None, help="CAM method (default: the model's default_method)")
    explain.add_argument("--out", type=Path, default=Path("cam_out"), help="output folder (default ./cam_out)")
    explain.add_argument("--colormap", default=None, metavar="NAME",
                         help="overlay colour map, an OpenCV name: jet, viridis, inferno, turbo, magma, ... "
                              "(default: the model's overlay_colormap)")
    explain.add_argument("--alpha", type=_unit, default=None,
                         help="overlay colour map weight in [0, 1] (default: the model's overlay_alpha)")

    from .gallery import add_gallery_parser  # the gallery's own options live next to its code

    add_gallery_parser(commands)
    return parser


def parse_option(text: str) -> tuple[str, Any]:
    """``"boxes=[0,2]"`` -> ``("boxes", [0, 2])``; a VALUE that is not JSON stays a string (``concept=cat``)."""
    key, separator, value = text.partition("=")
    if not separator or not key.strip():
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


def _unit(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# ---------------------------------------------------------------------------------------- output
def slug(text: str) -> str:
    """A file-name-safe form of a label: ``"Egyptian cat"`` -> ``"egyptian_cat"``."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "class"


def prediction_table(predictions: Sequence[dict[str, Any]], indent: str = "  ") -> str:
    """A fixed-width table: rank, class index, label, score (and a bar)."""
    if not predictions:
        return f"{indent}(no predictions)"
    width = max(5, *(len(str(p.get("label", ""))) for p in predictions))
    lines = [f"{indent}{'#':>2}  {'class':>5}  {'label':<{width}}  {'score':>7}"]
    for rank, entry in enumerate(predictions, start=1):
        score = float(entry.get("score", 0.0))
        bar = "#" * round(score * 20)
        lines.append(f"{indent}{rank:>2}  {entry.get('index', ''):>5}  {str(entry.get('label', '')):<{width}}  {score:>7.4f}  {bar}")
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str, right: Sequence[bool]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    def line(cells: Sequence[str]) -> str:
        return indent + "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()
    return "\n".join([line(header), *(line(r) for r in rows)])


def summary_table(body: dict[str, Any], indent: str = "  ", top_k: int | None = None) -> str:
    """What the model answered, whatever its task (read through the task registry): class predictions,
    detections, the classes of a segmentation mask, or similarities to concepts. Detections: the
    ``top_k`` best (default :data:`DEFAULT_DETECTIONS_SHOWN`) and a line counting the others."""
    try:
        result = TaskResult.from_body(body)
    except ValueError:
        return prediction_table([], indent)
    if result.task == "detection":
        detections = result.results
        if not detections:
            return f"{indent}(no detections above the score threshold)"
        shown = detections[: top_k or DEFAULT_DETECTIONS_SHOWN]
        rows = [[str(d.get("index", "")), str(d.get("label", "")), f"{float(d.get('score', 0)):.4f}",
                 "[" + ", ".join(f"{v:.0f}" for v in d.get("box", [])) + "]"] for d in shown]  # fmt: skip
        table = _table(["#", "label", "score", "box [x0, y0, x1, y1]"], rows, indent, [True, False, True, False])
        hidden = len(detections) - len(shown)
        return table + (f"\n{indent}... {hidden} more detection(s) (--top-k N to show more)" if hidden > 0 else "")
    if result.task == "segmentation":
        if not result.results:
            return f"{indent}(no classes)"
        rows = [[str(c.get("index", "")), str(c.get("label", "")), f"{float(c.get('fraction', 0)):.1%}",
                 str(c.get("pixels", ""))] for c in result.results]  # fmt: skip
        return _table(["class", "label", "area", "pixels"], rows, indent, [True, False, True, True])
    if result.task == "embedding":
        rows = [[str(e.get("concept", "")), f"{float(e.get('similarity', 0)):+.4f}"] for e in result.results]
        return _table(["concept", "cosine"], rows, indent, [False, True]) if rows else f"{indent}(no similarities)"
    return prediction_table(result.results, indent)


def empty_explanation_note(explanation: dict[str, Any]) -> str | None:
    """Why an explanation shows nothing, or None: a segmentation class that covers no pixel of the mask
    (its heatmap is all zero by construction), or any heatmap that is zero everywhere."""
    label = explanation.get("label", explanation.get("target", ""))
    if explanation.get("pixels") == 0:
        return (f"class {label!r} covers no pixel of the mask (absent from this image), so its heatmap is all "
                "zero: there is nothing to explain; pick a class from the table above (-o classes=[INDEX])")
    heatmap = explanation.get("heatmap")
    if isinstance(heatmap, dict) and heatmap.get("format") == "png" and heatmap.get("data"):
        from PIL import Image

        with Image.open(io.BytesIO(base64.b64decode(heatmap["data"]))) as picture:
            if picture.getextrema() in ((0, 0), ((0, 0),)):
                return f"the heatmap of {label!r} is all zero: the method found no evidence for it"
    return None


def explanation_name(explanation: dict[str, Any]) -> str:
    """The file-name part naming one explanation, by task: ``285_egyptian_cat``, ``box0_person``,
    ``cat_similarity``."""
    label = str(explanation.get("label", ""))
    if "box_index" in explanation:
        return f"box{explanation['box_index']}_{slug(label)}"
    if "concept" in explanation:
        return f"{slug(str(explanation['concept']))}_{slug(str(explanation.get('target', 'similarity')))}"
    return f"{explanation.get('target', 'cam')}_{slug(label)}"


def explanation_subject(explanation: dict[str, Any]) -> str:
    label = explanation.get("label", "")
    if "box_index" in explanation:
        return f"box {explanation['box_index']} {label!r} ({float(explanation.get('score', 0)):.2f})"
    if "concept" in explanation:
        return f"{explanation.get('target', 'similarity')} to {explanation['concept']!r}"
    return f"{explanation.get('target', '')} {label!r}"


BOX_COLOUR = (0, 255, 0)


def draw_box(jpeg: bytes, box: Sequence[float], label: str, score: float | None = None) -> bytes:
    """The overlay JPEG with the explained box outlined and labelled ``label`` and ``score`` (the server's
    overlay has no box). The text scales with the picture; the score stands half a character height
    apart from the label (the default font's space is 2 pixels: "elephant 0.53" read "elephant0.53")."""
    from PIL import Image, ImageDraw, ImageFont

    with Image.open(io.BytesIO(jpeg)) as opened:
        picture = opened.convert("RGB")
    draw = ImageDraw.Draw(picture)
    width = max(3, round(min(picture.size) / 100))
    size = max(11, round(min(picture.size) / 28))
    font = ImageFont.load_default(size=size)
    x0, y0, x1, y1 = box
    draw.rectangle([x0, y0, x1, y1], outline=BOX_COLOUR, width=width)
    origin = (x0 + width + 2, y0 + width + 1)
    pieces = [label] + ([f"{score:.2f}"] if score is not None else [])
    gap = size // 2
    left, top, right, bottom = draw.textbbox(origin, pieces[0], font=font)
    spans = [(origin[0], pieces[0])]
    for piece in pieces[1:]:
        spans.append((right + gap, piece))
        right = draw.textbbox((right + gap, origin[1]), piece, font=font)[2]
        bottom = max(bottom, draw.textbbox((spans[-1][0], origin[1]), piece, font=font)[3])
    draw.rectangle([left - 2, top - 1, right + 2, bottom + 1], fill=BOX_COLOUR)
    for x, piece in spans:
        draw.text((x, origin[1]), piece, fill=(0, 0, 0), font=font)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90, subsampling=0)  # 4:4:4 keeps the thin outline green
    return buffer.getvalue()


def mask_picture(png: bytes) -> bytes:
    """A class-index mask as a palette PNG: the same indices, shown in the PASCAL VOC colours."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as opened:
        indices = opened.convert("L")
    palette = []
    for index in range(256):
        red = green = blue = 0
        value = index
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette += [red, green, blue]
    coloured = indices.copy()
    coloured.putpalette(palette)  # an "L" image with a palette becomes "P": indices kept, colours shown
    buffer = io.BytesIO()
    coloured.save(buffer, format="PNG")
    return buffer.getvalue()


class Progress:
    """``[done/total]`` on stderr: one rewritten line on a terminal, one line per image otherwise."""

    def __init__(self, total: int, mode: str, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.enabled = mode == "on" or (mode == "auto" and total > 1)
        self.tty = stream.isatty() if hasattr(stream, "isatty") else False
        self.done = self.failed = 0
        self.started = time.perf_counter()
        self._lock = threading.Lock()  # called from the request threads

    def __call__(self, outcome: Outcome) -> None:
        with self._lock:
            self._update(outcome)

    def _update(self, outcome: Outcome) -> None:
        self.done += 1
        self.failed += not outcome.ok
        if not self.enabled:
            return
        rate = self.done / max(time.perf_counter() - self.started, 1e-9)
        status = "ok" if outcome.ok else "failed"
        line = f"[{self.done}/{self.total}] {self.failed} failed, {rate:.1f} img/s"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if self.done == self.total else ""))
        else:
            self.stream.write(f"{line}  {outcome.image.name}: {status} ({outcome.seconds * 1000:.0f} ms)\n")
        self.stream.flush()


def _unique_stems(images: Sequence[Path]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for image in images:
        stem = slug(image.stem) if image.stem else "image"
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        stems.append(stem if count == 0 else f"{stem}_{count + 1}")
    return stems


def _write_explanations(body: dict[str, Any], out: Path, stem: str) -> list[tuple[str, Path]]:
    written = []
    mask = body.get("mask")
    if isinstance(mask, dict) and mask.get("data"):
        path = out / f"{stem}.mask.png"
        path.write_bytes(mask_picture(base64.b64decode(mask["data"])))
        written.append(("mask", path))
    for explanation in body.get("explanations", []):
        name = f"{stem}.{explanation_name(explanation)}.{slug(explanation.get('method', 'cam'))}"
        for kind, suffix in (("heatmap", "heatmap"), ("overlay", "overlay")):
            picture = explanation.get(kind)
            if not picture:
                continue
            extension = {"png": "png", "jpeg": "jpg"}.get(picture.get("format", "png"), picture.get("format", "bin"))
            path = out / f"{name}.{suffix}.{extension}"
            data = base64.b64decode(picture["data"])
            if kind == "overlay" and "box" in explanation and extension == "jpg":
                data = draw_box(data, explanation["box"], str(explanation.get("label", "")),
                                float(explanation.get("score", 0)))
            path.write_bytes(data)
            written.append((kind, path))
    return written


# ---------------------------------------------------------------------------------------- commands
def _request_options(args: argparse.Namespace, explain: bool) -> dict[str, Any]:
    """The request options the flags ask for; ``-o KEY=VALUE`` last, so it may override the named flags."""
    named: dict[str, Any] = {"top_k": args.top_k}
    if explain:
        named.update(output="both", targets=[parse_target(t) for t in args.target] if args.target else None,
                     method=args.method or None, colormap=args.colormap, alpha=args.alpha)
    options = {key: value for key, value in named.items() if value is not None}
    options.update(dict(args.option))
    return options


def _print_outcome(outcome: Outcome, model: str, top_k: int | None, explain: bool, stdout: TextIO) -> None:
    """One answered image: its predictions, what each explanation explains, the files written."""
    body = outcome.response or {}
    print(f"{outcome.image}  [{body.get('model', model)}]", file=stdout)
    print(summary_table(body, top_k=top_k), file=stdout)
    for explanation in body.get("explanations", []) if explain else []:
        print(f"  explained {explanation_subject(explanation)} with "
              f"{explanation.get('method')} at {', '.join(explanation.get('layers', []))}", file=stdout)
        note = empty_explanation_note(explanation)
        if note:
            print(f"  WARNING: {note}", file=stdout)
    for kind, path in outcome.written:
        print(f"    {kind:<8} {path}", file=stdout)


def _serve_command(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    explain = args.command == "explain"
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise CliError(f"no such file: {', '.join(missing)}")
    token = resolve_token(args.token, args.key_file, args.no_token)
    client = Client(args.url, token, timeout=args.timeout)
    options = _request_options(args, explain)
    stems = _unique_stems(args.images)
    if explain:
        args.out.mkdir(parents=True, exist_ok=True)

    def work(index: int, image: Path) -> Outcome:
        outcome = Outcome(index, image)
        started = time.perf_counter()
        try:
            body = client.post("explanations" if explain else "predictions", args.model, image.read_bytes(),
                               image.name, options)
            outcome.response = body
            if explain:
                outcome.written = _write_explanations(body, args.out, stems[index])
        except ServerError as error:
            outcome.error = error
        outcome.seconds = time.perf_counter() - started
        return outcome

    progress = Progress(len(args.images), args.progress, stderr)
    failed = 0
    for outcome in client.map(args.images, work, args.concurrency, on_done=progress):
        if not outcome.ok:
            failed += 1
            print(f"error: {outcome.image}: {outcome.error}", file=stderr)
            continue
        _print_outcome(outcome, args.model, args.top_k, explain, stdout)
    stdout.flush()
    if failed:
        print(f"{failed} of {len(args.images)} image(s) failed", file=stderr)
        return EXIT_SERVER
    return EXIT_OK


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run the CLI; returns the exit code. Errors are one line on stderr, never a traceback."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("predict", "explain"):
            return _serve_command(args, stdout, stderr)
        from .gallery import run_gallery_command

        return run_gallery_command(args, stdout, stderr)
    except CliError as error:
        print(f"error: {error}", file=stderr)
        return EXIT_USAGE
    except ServerError as error:
        print(f"error: {error}", file=stderr)
        return EXIT_SERVER
    except KeyboardInterrupt:
        print("interrupted", file=stderr)
        return 130


def entry_point() -> None:
    """The console script ``torchserve-cam``."""
    sys.exit(main())

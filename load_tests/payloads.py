"""What the load tests send and how they judge an answer; shared by the Locust file, the report and tests.

No Locust import here (Locust monkey-patches the process with gevent), so ``report.py`` and the tests
import this module freely.

- :func:`photos`: real photos from scikit-image, resized to several sizes and encoded once.
- :func:`request_kwargs`: one photo as raw bytes, a multipart field ``data`` or JSON ``{"image": b64}``.
- :func:`check_answer`: status, schema (of any task's answer) and heatmap dimensions; returns what is wrong.
- :class:`TokenKeeper`: TorchServe's inference token from ``key_file.json``, renewed before it expires.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from handlers.tasks.registry import TASKS, task_of_body

__all__ = [
    "Photo",
    "photos",
    "parse_sizes",
    "request_kwargs",
    "check_answer",
    "answer_kind",
    "is_token_rejection",
    "TokenKeeper",
    "ENCODINGS",
    "PHOTO_NAMES",
]

PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket")
ENCODINGS = ("raw", "multipart", "json")


@dataclass(frozen=True)
class Photo:
    """One encoded photo: ``body`` holds the file bytes of an RGB image of ``width`` x ``height`` pixels."""

    name: str
    width: int
    height: int
    format: str  # "JPEG" or "PNG"
    body: bytes

    @property
    def content_type(self) -> str:
        return f"image/{self.format.lower()}"


def parse_sizes(text: str) -> list[tuple[int, int] | None]:
    """``"224x224,451x300,native"`` -> ``[(224, 224), (451, 300), None]`` (``None``: the photo's own size)."""
    sizes: list[tuple[int, int] | None] = []
    for item in (part.strip().lower() for part in text.split(",")):
        if not item:
            continue
        if item == "native":
            sizes.append(None)
            continue
        width, _, height = item.partition("x")
        size = (int(width), int(height))
        if not (16 <= size[0] <= 4096 and 16 <= size[1] <= 4096):
            raise ValueError(f"image size {item!r} outside 16..4096 pixels")
        sizes.append(size)
    if not sizes:
        raise ValueError("no image size given")
    return sizes


def photos(sizes: list[tuple[int, int] | None], names: tuple[str, ...] = PHOTO_NAMES) -> list[Photo]:
    """Every photo in every size; JPEG (quality 90) and PNG alternate so that both decoders are exercised."""
    from skimage import data

    encoded = []
    for index, name in enumerate(names):
        pixels = getattr(data, name)()
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        picture = Image.fromarray(np.ascontiguousarray(pixels[..., :3]))
        for size in sizes:
            resized = picture if size is None else picture.resize(size, Image.BILINEAR)
            fmt = "JPEG" if (index + len(encoded)) % 2 == 0 else "PNG"
            buffer = io.BytesIO()
            resized.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            encoded.append(Photo(name, resized.width, resized.height, fmt, buffer.getvalue()))
    return encoded


def request_kwargs(photo: Photo, encoding: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``requests``/Locust ``post``: the photo sent as ``encoding``, with ``options``."""
    options = options or {}
    if encoding == "raw":
        if options:
            raise ValueError("raw bytes carry no options; use multipart or json")
        return {"data": photo.body, "headers": {"Content-Type": photo.content_type}}
    if encoding == "multipart":
        files: dict[str, Any] = {
            "data": (f"{photo.name}.{photo.format.lower()}", photo.body, photo.content_type)
        }
        if options:
            files["options"] = (None, json.dumps(options), "application/json")
        return {"files": files}
    if encoding == "json":
        return {"json": {"image": base64.b64encode(photo.body).decode("ascii"), **options}}
    raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


def is_token_rejection(status: int, body: bytes) -> bool:
    """TorchServe's answer to a missing, wrong or expired token: 400 with type InvalidKeyException."""
    return status in (400, 401) and b"InvalidKeyException" in body[:300]


def _check_png(entry: Any, photo: Photo, name: str = "heatmap") -> str | None:
    """An 8-bit grayscale PNG entry (a heatmap, a class mask) of the submitted image's size."""
    if not isinstance(entry, dict) or entry.get("format") != "png":
        return f"{name} is not a PNG entry: {str(entry)[:80]}"
    if (entry.get("width"), entry.get("height")) != (photo.width, photo.height):
        return f"{name} says {entry.get('width')}x{entry.get('height')}, image is {photo.width}x{photo.height}"
    try:
        raw = base64.b64decode(entry["data"], validate=True)
        with Image.open(io.BytesIO(raw)) as picture:
            size, mode, fmt = picture.size, picture.mode, picture.format
            picture.verify()  # CRCs and chunk structure
    except Exception as error:  # noqa: BLE001 - any decode error is a wrong body
        return f"{name} data is not a valid PNG: {type(error).__name__}: {error}"
    if fmt != "PNG" or mode != "L":
        return f"{name} is {fmt} {mode}, expected 8-bit grayscale PNG"
    if size != (photo.width, photo.height):
        return f"{name} PNG is {size[0]}x{size[1]}, image is {photo.width}x{photo.height}"
    return None


#: what each task's answer lists, and the key naming each explanation's subject (from the task registry)
SUBJECTS = {task.results: task.subject for task in TASKS.values()}


def answer_kind(answer: Any) -> str | None:
    """Which task answered: ``predictions`` (classifier, CLIP), ``detections``, ``classes`` (a
    segmenter's mask) or ``similarities`` (an embedding model); None for anything else."""
    if not isinstance(answer, dict):
        return None
    task = task_of_body(answer)
    return task.results if task else None


def _is_score(value: Any, low: float = 0.0, high: float = 1.0) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def _unsorted(entries: list[dict], noun: str) -> str | None:
    """``"<noun> are not sorted by score"`` unless ``entries`` come best first."""
    scores = [entry["score"] for entry in entries]
    return None if scores == sorted(scores, reverse=True) else f"{noun} are not sorted by score"


def _check_predictions(answer: dict, photo: Photo) -> str | None:
    predictions = answer["predictions"]
    if not isinstance(predictions, list) or not predictions:
        return "no predictions"
    for entry in predictions:
        if not (isinstance(entry, dict) and isinstance(entry.get("index"), int)
                and isinstance(entry.get("label"), str) and _is_score(entry.get("score"))):  # fmt: skip
            return f"malformed prediction {str(entry)[:120]}"
    return _unsorted(predictions, "predictions")


def _check_detections(answer: dict, photo: Photo) -> str | None:
    detections = answer["detections"]
    if not isinstance(detections, list):
        return "detections is not a list"
    for rank, entry in enumerate(detections):
        box = entry.get("box") if isinstance(entry, dict) else None
        if not (isinstance(box, list) and len(box) == 4 and entry.get("index") == rank
                and isinstance(entry.get("label"), str) and _is_score(entry.get("score"))):  # fmt: skip
            return f"malformed detection {str(entry)[:120]}"
        x0, y0, x1, y1 = box
        if not (0 <= x0 <= x1 <= photo.width + 0.01 and 0 <= y0 <= y1 <= photo.height + 0.01):
            return f"box {box} is not inside the {photo.width}x{photo.height} image"
    return _unsorted(detections, "detections")


def _check_mask(answer: dict, photo: Photo) -> str | None:
    classes, mask = answer["classes"], answer.get("mask")
    if not isinstance(classes, list) or not all(
        isinstance(c, dict) and isinstance(c.get("index"), int) and isinstance(c.get("label"), str)
        and isinstance(c.get("pixels"), int) for c in classes
    ):  # fmt: skip
        return f"malformed classes {str(classes)[:120]}"
    problem = _check_png(mask, photo, "mask")
    if problem:
        return problem
    if sum(c["pixels"] for c in classes) != photo.width * photo.height:
        return "the classes' pixels do not add up to the image"
    return None


def _check_similarities(answer: dict, photo: Photo) -> str | None:
    similarities = answer["similarities"]
    if not isinstance(similarities, list) or not similarities or not all(
        isinstance(e, dict) and isinstance(e.get("concept"), str) and _is_score(e.get("similarity"), -1.0001, 1.0001)
        for e in similarities
    ):  # fmt: skip
        return f"malformed similarities {str(similarities)[:120]}"
    return None


_TASK_CHECKS = {"predictions": _check_predictions, "detections": _check_detections, "classes": _check_mask,
                "similarities": _check_similarities}  # fmt: skip


def check_answer(
    status: int, body: bytes, photo: Photo, model: str, explained: bool, expected_targets: int | None = 1
) -> str | None:
    """``None`` when the answer is right, else a one-line reason.

    Right means: HTTP 200; a JSON object naming ``model``; the task's own part well formed:
    ``predictions`` sorted by score (int ``index``, str ``label``, score in [0, 1]), ``detections``
    ranked by score with boxes inside the image, a segmentation ``mask`` PNG of the image's size whose
    ``classes`` count every pixel, or cosine ``similarities`` to named concepts; ``explanations``
    present exactly when ``explained``, each naming its subject (target, box or concept), method and
    layers, and carrying an 8-bit grayscale PNG heatmap whose declared and decoded size equal the
    submitted image's width and height. ``expected_targets`` explanations (None: any number, at
    least one); a detector explains between one box and all of them (none when it found none).
    """
    if status != 200:
        return f"HTTP {status}: {body[:200]!r}"
    try:
        answer = json.loads(body)
    except ValueError:
        return f"body is not JSON: {body[:120]!r}"
    if not isinstance(answer, dict) or answer.get("model") != model:
        return f"answer does not name model {model!r}: {str(answer)[:120]}"
    kind = answer_kind(answer)
    if kind is None:
        return f"no predictions, detections, classes or similarities: {str(answer)[:120]}"
    problem = _TASK_CHECKS[kind](answer, photo)
    if problem:
        return problem
    explanations = answer.get("explanations")
    if not explained:
        return None if explanations is None else "a prediction carried explanations it did not ask for"
    if kind == "detections":
        count = len(answer["detections"])
        if not isinstance(explanations, list) or not (min(count, 1) <= len(explanations) <= count):
            return f"expected 1 to {count} box explanation(s), got {str(explanations)[:120]}"
    elif not isinstance(explanations, list) or not explanations or (
        expected_targets is not None and len(explanations) != expected_targets
    ):
        return f"expected {expected_targets or 'some'} explanation(s), got {str(explanations)[:120]}"
    subject = SUBJECTS[kind]
    for explanation in explanations:
        if not isinstance(explanation, dict) or not isinstance(explanation.get(subject), str if kind == "similarities" else int):
            return f"malformed explanation {str(explanation)[:120]}"
        if kind == "detections" and not explanation[subject] < len(answer["detections"]):
            return f"explanation of box {explanation[subject]}, which is not among the detections"
        if not isinstance(explanation.get("method"), str) or not isinstance(explanation.get("layers"), list):
            return "explanation lacks method or layers"
        problem = _check_png(explanation.get("heatmap"), photo)
        if problem:
            return problem
    return None


def _parse_expiry(value: str | None) -> dt.datetime | None:
    """Java's ``Instant.toString`` ("2026-11-26T22:44:15.642200556Z") -> aware datetime (microseconds)."""
    if not value:
        return None
    value = value.strip().replace("Z", "+00:00")
    head, dot, rest = value.partition(".")
    if dot:
        digits = "".join(ch for ch in rest if ch.isdigit())
        value = f"{head}.{digits[:6].ljust(6, '0')}{rest[len(digits) :]}"
    parsed = dt.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


class TokenKeeper:
    """TorchServe's inference token, read from ``key_file.json`` and renewed before it expires.

    TorchServe 0.12 expires inference tokens after ``token_expiration_min``. ``GET
    <management>/token?type=inference`` with the (non-expiring) API key issues a new one, rewrites the
    key file and invalidates the old token at once (checked against TorchServe 0.12.0), so every user
    of one keeper shares one token: :meth:`token` renews it ``margin`` before expiry, and
    :meth:`rejected` handles a token another process renewed (re-read the file; renew only if the
    file still holds the rejected key). Thread- and greenlet-safe (one lock; gevent patches it).
    A ``static_token`` (a deployed server behind a gateway) is handed out as is and never renewed.
    """

    def __init__(
        self,
        key_file: str | Path = "key_file.json",
        management_url: str = "http://127.0.0.1:8081",
        margin_s: float = 60.0,
        static_token: str | None = None,
        clock=lambda: dt.datetime.now(dt.timezone.utc),
    ) -> None:
        self.key_file = Path(key_file)
        self.management_url = management_url.rstrip("/")
        self.margin = dt.timedelta(seconds=margin_s)
        self.static_token = static_token
        self.renewals = 0
        self._clock = clock
        self._lock = threading.Lock()
        self._key: str | None = static_token
        self._expires: dt.datetime | None = None
        if static_token is None:
            self._read()

    def _read(self) -> None:
        entries = json.loads(self.key_file.read_text())
        self._key = entries["inference"]["key"]
        self._expires = _parse_expiry(entries["inference"].get("expiration time"))
        self._api_key = entries["API"]["key"]

    def _renew(self) -> None:
        request = urllib.request.Request(
            f"{self.management_url}/token?type=inference",
            headers={"Authorization": f"Bearer {self._api_key}"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()
        deadline = time.monotonic() + 5.0  # the file is rewritten before the answer; allow a slow disk anyway
        old = self._key
        while True:
            self._read()
            if self._key != old or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.renewals += 1

    @property
    def expires(self) -> dt.datetime | None:
        return self._expires

    def token(self) -> str:
        """A token that is valid for at least ``margin`` more (renewed here when it would not be)."""
        if self.static_token is not None:
            return self.static_token
        with self._lock:
            if self._expires is not None and self._expires - self.margin <= self._clock():
                self._read()  # another process may have renewed it already
                if self._expires is not None and self._expires - self.margin <= self._clock():
                    self._renew()
            assert self._key is not None
            return self._key

    def rejected(self, key: str) -> str:
        """The server refused ``key``: return a fresh token (from the file, or renewed)."""
        if self.static_token is not None:
            return self.static_token
        with self._lock:
            if self._key == key:
                self._read()
                if self._key == key:
                    self._renew()
            assert self._key is not None
            return self._key

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

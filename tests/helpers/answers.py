"""Talking to the session TorchServe and reading its answers: one ``post`` and the picture decoders the
integration tests share."""

from __future__ import annotations

import base64
import io

import numpy as np
import requests
from PIL import Image


def post(server, path: str, body=None, *, headers: dict | None = None, timeout: float = 180, **kwargs) -> requests.Response:
    """POST ``body`` to ``server``'s inference API at ``path`` with its token: a dict as JSON, bytes as the raw
    body; ``json=``, ``data=`` or ``files=`` pass through, ``headers`` are added to the token's."""
    headers = {**server.headers(), **(headers or {})}
    if isinstance(body, dict):
        kwargs["json"] = body
    elif body is not None:
        kwargs["data"] = body
    return requests.post(f"{server.url()}/{path}", headers=headers, timeout=timeout, **kwargs)


def decode_png(data: str | bytes, mode: str | None = "L") -> np.ndarray:
    """A PNG (base64 text, or bytes) as an array; ``mode`` (grey by default) is asserted unless None."""
    raw = base64.b64decode(data) if isinstance(data, str) else bytes(data)
    picture = Image.open(io.BytesIO(raw))
    assert picture.format == "PNG", picture.format
    assert mode is None or picture.mode == mode, picture.mode
    return np.asarray(picture)


def heatmap(explanation: dict) -> np.ndarray:
    """An explanation's ``heatmap`` picture (a grey PNG whose size the answer states) as an array."""
    picture = explanation["heatmap"]
    array = decode_png(picture["data"])
    assert (array.shape[1], array.shape[0]) == (picture["width"], picture["height"])
    return array

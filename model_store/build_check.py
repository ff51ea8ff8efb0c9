"""The builder's last check: the staged archive loaded through the real handler, then one default
``/predictions`` and one default ``/explanations`` request sent through it, as TorchServe would.

An archive is only called valid when a plain request (no options) gets a 200: a config default that
every request would trip on (``top_k`` above the class count, a method the model cannot run) fails the
build, not the first client.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from handlers.tasks.registry import TASKS

__all__ = ["CheckContext", "check_archive", "check_image", "NO_PLAIN_REQUEST"]

#: tasks with no plain request (an embedding request names a concept or sends reference images)
NO_PLAIN_REQUEST = ("embedding",)


class CheckContext:
    """Enough of TorchServe's ``Context`` for one handler in-process: properties, headers, statuses."""

    def __init__(self, model_dir: Path, name: str, config: Mapping[str, Any], manifest: Mapping[str, Any] | None = None):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None, "batch_size": config.get("batchSize", 1)}
        self.model_name = name
        self.manifest = {"model": {"modelVersion": "1.0", **dict((manifest or {}).get("model") or {})}}
        self.model_yaml_config = dict(config)
        self.metrics = None
        self.explain = False
        self.status: dict[int, tuple[int, str]] = {}

    def get_request_header(self, idx: int, key: str) -> Any:
        return str(self.explain) if key == "explain" else None

    def set_response_status(self, code: int, phrase: str, idx: int = 0) -> None:
        self.status[idx] = (code, phrase)

    def set_response_content_type(self, idx: int, value: str) -> None:
        pass


def check_image(width: int = 96, height: int = 64) -> bytes:
    """A small PNG with some structure (a gradient and a square), so a CAM has something to rank."""
    import numpy as np
    from PIL import Image

    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    pixels[height // 4 : height // 2, width // 4 : width // 2] = (40, 200, 90)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def check_archive(
    model_dir: Path, config: Mapping[str, Any], name: str, task: str, manifest: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Load ``model_dir`` through the task's handler and send one default /predictions and one default
    /explanations request. Returns the handler's describe; raises ``ConfigError`` from the load and
    ``RuntimeError`` naming the endpoint when a default request is refused."""
    # The check must not create audit directories or writer threads on the build machine.
    handler_section = {**dict(config.get("handler") or {}), "audit": {"enabled": False}}
    config = {**dict(config), "handler": handler_section}
    context = CheckContext(model_dir, name, config, manifest)
    handler = TASKS[task].handler_class()()
    handler.initialize(context)
    image = check_image()
    if task in NO_PLAIN_REQUEST:
        return handler.describe()
    for endpoint, explain in (("/predictions", False), ("/explanations", True)):
        context.explain, context.status = explain, {}
        answer = handler.handle([{"body": bytearray(image)}], context)[0]
        status = context.status.get(0, (200, "OK"))[0]
        if status != 200:
            try:
                message = json.loads(answer).get("message", answer)
            except (ValueError, AttributeError):
                message = str(answer)
            raise RuntimeError(f"a default {endpoint} request gets {status}: {message}")
    return handler.describe()

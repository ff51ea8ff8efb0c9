"""A stand-in for TorchServe's Context, enough for handlers in-process (headers, per-request status)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class FakeContext:
    """Mimics ``ts.context.Context``: system properties, headers per request, status per request."""

    def __init__(self, model_dir: Path, model_name: str = "model", explain: list[bool] | None = None) -> None:
        config_path = Path(model_dir) / "model-config.yaml"
        self.model_yaml_config = yaml.safe_load(config_path.read_text()) if config_path.exists() else None
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None, "batch_size": 8}
        self.model_name = model_name
        self.manifest = {"model": {"modelVersion": "1.0"}}
        self.metrics = None
        self.explain = explain or []
        self.status: dict[int, tuple[int, str]] = {}
        self.content_types: dict[int, str] = {}

    def get_request_header(self, idx: int, key: str) -> Any:
        if key == "explain":
            return "True" if idx < len(self.explain) and self.explain[idx] else "False"
        return None

    def set_response_status(self, code: int, phrase: str, idx: int = 0) -> None:
        self.status[idx] = (code, phrase)

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_types[idx] = value

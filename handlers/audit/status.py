"""The strict audit's health, told to the readiness probe through a file.

With ``durability: strict`` a worker whose audit sink cannot commit answers 503 ``AuditUnavailable``;
the pod should leave the Service meanwhile. The worker writes ``audit-unavailable-<model>`` (one line:
the reason) into ``$CAM_STATUS_DIR`` (default: the worker's working directory, TorchServe's run
directory, where ``key_file.json`` lives) when a write or the sink's health check fails, and removes it
as soon as one succeeds again. The probe (``deploy/docker/probe.py``) fails readiness while such a file
exists.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

__all__ = ["UnavailableMarker", "status_directory", "MARKER_PREFIX"]

logger = logging.getLogger(__name__)

MARKER_PREFIX = "audit-unavailable-"


def status_directory() -> Path:
    """``$CAM_STATUS_DIR``, else the current working directory."""
    return Path(os.environ.get("CAM_STATUS_DIR") or os.getcwd())


class UnavailableMarker:
    """``<directory>/audit-unavailable-<model_name>``: present while the model's strict audit cannot commit."""

    def __init__(self, model_name: str, directory: Path | None = None) -> None:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)
        self.path = (directory or status_directory()) / f"{MARKER_PREFIX}{safe}"
        self.raised = self.path.exists()  # a marker a dead predecessor left: cleared by the first commit

    def set(self, reason: str) -> None:
        if self.raised:
            return
        line = " ".join(reason.split())[:500]
        try:
            temporary = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
            temporary.write_text(line + "\n", encoding="utf-8")
            os.replace(temporary, self.path)  # the probe never reads half a line
            self.raised = True
        except OSError as error:
            logger.error("cannot write the audit status file %s: %s", self.path, error)

    def clear(self) -> None:
        if not self.raised:
            return
        try:
            self.path.unlink(missing_ok=True)
            self.raised = False
        except OSError as error:
            logger.error("cannot remove the audit status file %s: %s", self.path, error)

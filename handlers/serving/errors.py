"""The error a single request gets: ``{"code", "type", "message"}`` with a 4xx status (the batch goes on)."""

from __future__ import annotations

from typing import Any

__all__ = ["RequestError", "error_body"]


class RequestError(Exception):
    """A problem with one request: answered as ``{"code", "type", "message"}`` with a 4xx status."""

    def __init__(self, message: str, code: int = 400, kind: str = "InvalidInput") -> None:
        super().__init__(message)
        self.code = code
        self.kind = kind
        self.message = message

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.kind, self.message)


def error_body(code: int, kind: str, message: str) -> dict[str, Any]:
    """The documented error object ``{"code", "type", "message"}``."""
    return {"code": code, "type": kind, "message": message}

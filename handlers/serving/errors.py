"""The error a single request gets: ``{"code", "type", "message"}`` with a 4xx status (the batch goes on)."""

from __future__ import annotations

from typing import Any

__all__ = ["RequestError", "error_body", "quote", "QUOTE_LIMIT", "MAX_MESSAGE"]

#: the most characters of a client's own input an error message quotes
QUOTE_LIMIT = 200
#: the longest error message (our words plus quoted input): a longer one keeps its first 250 and last 200
#: characters (where our words are: what was wrong, what is allowed) and says how much was cut from the middle
#: (where a message built with ``{value!r}`` holds the client's value), so a request never gets a megabyte
#: echo of itself, which TorchServe's frontend resets or truncates
MAX_MESSAGE = 500


class RequestError(Exception):
    """A problem with one request: answered as ``{"code", "type", "message"}`` with a 4xx status."""

    def __init__(self, message: str, code: int = 400, kind: str = "InvalidInput") -> None:
        if len(message) > MAX_MESSAGE:
            message = f"{message[:250]} ... ({len(message) - 450} characters cut) ... {message[-200:]}"
        super().__init__(message)
        self.code = code
        self.kind = kind
        self.message = message

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.kind, self.message)


def error_body(code: int, kind: str, message: str) -> dict[str, Any]:
    """The documented error object ``{"code", "type", "message"}``."""
    return {"code": code, "type": kind, "message": message}


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters (the full length said after the cut)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"

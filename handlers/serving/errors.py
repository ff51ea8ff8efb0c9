"""The error a single request gets: ``{"code", "type", "message"}`` with its own status (the batch goes on).

:class:`RequestError` is what the request path raises for one request. :func:`as_request_error` turns any other
exception raised while reading or computing one request into that request's own answer, so that nothing a
request sends can fail its batch-mates (``handlers.serving.batch``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["RequestError", "as_request_error", "error_body", "quote", "QUOTE_LIMIT", "MAX_MESSAGE"]

#: the most characters of a client's own input an error message quotes
QUOTE_LIMIT = 200
#: the longest error message (our words plus quoted input): a longer one keeps its first 250 and last 200
#: characters (where our words are: what was wrong, what is allowed) and says how much was cut from the middle
#: (where a message built with ``{value!r}`` holds the client's value), so a request never gets a megabyte
#: echo of itself, which TorchServe's frontend resets or truncates
MAX_MESSAGE = 500


class RequestError(Exception):
    """A problem with one request: answered as ``{"code", "type", "message"}`` with status ``code``."""

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


def as_request_error(error: BaseException, reading: bool) -> RequestError:
    """The answer of the one request whose reading (``reading``: parsing, decoding) or computing raised ``error``.

    - a :class:`RequestError` is itself;
    - ``RecursionError`` while reading: 400 ``InvalidInput`` (the request is nested too deeply to read);
    - ``MemoryError`` or a device's out-of-memory error: 507 ``OutOfMemory`` (TorchServe's own status for
      it; the request may fit alone or later);
    - anything else: 500 ``InternalError``, naming the exception (our fault: the request path missed a case).
    """
    if isinstance(error, RequestError):
        return error
    if isinstance(error, RecursionError) and reading:
        return RequestError("the request is nested too deeply to read", 400, "InvalidInput")
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return RequestError("out of memory while answering this request: retry it, or send a smaller one", 507, "OutOfMemory")
    stage = "reading" if reading else "computing"
    return RequestError(f"internal error while {stage} this request: {type(error).__name__}: {error}"[:300], 500, "InternalError")


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters (the full length said after the cut).

    A value nested too deeply for ``repr`` is named by its type."""
    try:
        text = repr(value)
    except RecursionError:
        return f"a {type(value).__name__} nested too deeply to show"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"

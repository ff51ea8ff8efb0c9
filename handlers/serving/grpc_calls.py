"""TorchServe 0.12's gRPC inference calls (``InferenceAPIsService``) as a worker sees them, answered safely.

A gRPC call reaches the handler like an HTTP one: the call's input map becomes the request's fields (``data``
or ``body`` for the image, ``options`` for JSON options, ``explain`` for explanations; see
:func:`handlers.serving.protocols.expand`). Unlike an HTTP request it carries no ``explain`` header (the HTTP
inference API always adds one), which is how :func:`is_grpc` tells them apart. What each RPC needs:

- ``Predictions``: one answer, sent as the response's ``prediction`` bytes (an error too: TorchServe's gRPC
  frontend ignores the status of a worker's answer, so errors are the JSON error object with status OK).
- ``StreamPredictions``: the frontend ends the call on the answer whose ``ts_stream_next`` response header is
  ``false``. Without that header its ``GRPCJob.response`` throws a NullPointerException, and the worker is
  restarted (~16 s; its whole batch fails). Every gRPC answer here carries ``ts_stream_next: false``, so a
  ``StreamPredictions`` call gets exactly one, final message (``Predictions`` ignores the header).
- ``StreamPredictions2``: TorchServe's stateful-sequence RPC (its requests carry the ``ts_request_sequence_id``
  header; without a ``sequence_id`` the frontend refuses them itself). The frontend completes the response
  stream as soon as the client closes its side, and a worker answer that arrives after that throws an
  IllegalStateException in the frontend's worker thread, whose clean-up throws again: the worker is never
  restarted and the model is left with no worker. Whether the client has already closed its side cannot be
  known here, so these requests are refused without an answer: they are taken out of the batch's response
  (``context.request_ids``, the map TorchServe's ``create_predict_response`` iterates) and the frontend drops
  them with the batch's other jobs. The client's stream ends with no message; the worker lives on.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["is_grpc", "sequence_requests", "settle", "SEQUENCE_HEADER", "STREAM_NEXT"]

logger = logging.getLogger(__name__)

SEQUENCE_HEADER = "ts_request_sequence_id"  # TorchServe's default ts_header_key_sequence_id
STREAM_NEXT = "ts_stream_next"


def _header(context: Any, index: int, key: str) -> str | None:
    try:
        return context.get_request_header(index, key)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def is_grpc(context: Any, index: int) -> bool:
    """Whether request ``index`` came through gRPC (no ``explain`` header, which HTTP inference always sets)."""
    return context is not None and hasattr(context, "get_request_header") and _header(context, index, "explain") is None


def sequence_requests(context: Any, count: int) -> set[int]:
    """The requests of a batch of ``count`` that came through ``StreamPredictions2`` (refused unanswered)."""
    found = {i for i in range(count) if is_grpc(context, i) and _header(context, i, SEQUENCE_HEADER) is not None}
    for index in sorted(found):
        logger.warning(
            "request %d came through gRPC StreamPredictions2 (sequence %s): not supported by this stateless model, "
            "refused without an answer (use Predictions or StreamPredictions)",
            index,
            _header(context, index, SEQUENCE_HEADER),
        )
    return found


def settle(context: Any, count: int, refused: set[int]) -> None:
    """Mark every gRPC answer of the batch final (``ts_stream_next: false``) and take ``refused`` ones out of
    the response (see the module doc)."""
    if context is None:
        return
    for index in range(count):
        if index in refused:
            request_ids = getattr(context, "request_ids", None)
            if isinstance(request_ids, dict):
                request_ids.pop(index, None)
        elif is_grpc(context, index) and hasattr(context, "set_response_header"):
            context.set_response_header(index, STREAM_NEXT, "false")

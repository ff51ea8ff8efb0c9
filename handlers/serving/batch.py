"""The request path of :class:`handlers.serving.base.CamHandler`: TorchServe batch -> images -> one model run -> answers.

:func:`handle_batch` reads every TorchServe request of the batch on its own (native, KServe v1 or v2,
:mod:`handlers.serving.protocols`), answers all their images with one batched run (:func:`answer_units`), and
returns exactly one response string per request, with its own status and content type; an answer over
TorchServe's response limit becomes a 413 JSON error for that request alone (:mod:`handlers.serving.limits`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from handlers.serving import budget, cost, grpc_calls, limits, protocols
from handlers.serving.protocols import RequestError

__all__ = ["BatchHandler", "handle_batch", "answer_units", "header"]

logger = logging.getLogger(__name__)


class BatchHandler(cost.CostedHandler, Protocol):
    """What the request path needs of a loaded handler (:class:`handlers.serving.base.CamHandler` is one):
    read-only attributes fixed at load, the per-request stages, and the auditor it was given (and what the cost
    budgets read, :class:`handlers.serving.cost.CostedHandler`)."""

    model_name: str
    version: str
    device: torch.device
    config: Any  # handlers.config.HandlerConfig: the pixel budgets (handlers.serving.budget)
    audit: Any  # handlers.audit.Auditor: sample(requests), record(requests, batch, outputs, cams, results)

    @property
    def response_limit(self) -> tuple[int, str]: ...

    def describe(self) -> dict[str, Any]: ...

    def response_header(self) -> dict[str, Any]: ...

    def parse_request(self, index: int, item: Mapping[str, Any], explain_header: bool) -> Any: ...

    def explain_batch(self, batch: torch.Tensor, requests: list[Any]) -> tuple[Any, list[torch.Tensor | None]]: ...

    def encode_explanations(
        self, requests: list[Any], cams: list[torch.Tensor | None]
    ) -> list[list[dict[str, Any]] | None]: ...

    def build_response(
        self, request: Any, outputs: Any, row: int, explanations: list[dict[str, Any]] | None
    ) -> Any: ...


def header(context: Any, index: int, key: str) -> str | None:
    """HTTP header ``key`` of request ``index`` of the batch, or None."""
    if context is None or not hasattr(context, "get_request_header"):
        return None
    try:
        return context.get_request_header(index, key)
    except (IndexError, KeyError, AttributeError, TypeError):
        return None


def _content_type(context: Any, index: int) -> None:
    if context is not None and hasattr(context, "set_response_content_type"):
        context.set_response_content_type(index, "application/json")


def handle_batch(handler: BatchHandler, data: Sequence[Mapping[str, Any]], context: Any) -> list[str]:
    """One JSON string per request of ``data`` (TorchServe's batch), statuses set on ``context``."""
    get = lambda index, key: header(context, index, key)  # noqa: E731
    if limits.is_management_describe(data, get):
        return [json.dumps(handler.describe())]
    envelopes, units = [], []
    unanswered = grpc_calls.sequence_requests(context, len(data))  # gRPC StreamPredictions2: see grpc_calls
    for index, item in enumerate(data):
        try:
            if index in unanswered:
                raise RequestError("gRPC StreamPredictions2 is not supported", 501, "NotImplemented")
            envelope, found = protocols.expand(index, item, get(index, "explain") == "True", lambda key, i=index: get(i, key))
        except RequestError as error:
            envelope, found = protocols.Envelope(error=error), []
        envelopes.append(envelope)
        units.extend(found)
    audit_later: list[tuple[Any, ...]] = []
    answers = answer_units(handler, units, audit_later)
    limit, source = handler.response_limit
    responses, undelivered = [], set()
    for index, envelope in enumerate(envelopes):
        mine = [answer for unit, answer in zip(units, answers) if unit.request == index]
        code, body = protocols.respond(envelope, mine, handler.model_name, handler.version)
        text = json.dumps(body)
        size = len(text.encode("utf-8"))
        if size > limit:
            code, kind, message = limits.too_large(size, limit, source)
            text = json.dumps(protocols.error_body(code, kind, message))
            undelivered.add(index)
        if code != 200 and context is not None and hasattr(context, "set_response_status"):
            context.set_response_status(code, protocols.REASONS.get(code, "Bad Request"), index)
        _content_type(context, index)
        responses.append(text)
    unrecorded: set[int] = set()  # strict durability: committed before we return, or the answer is a 503
    for requests, batch, outputs, cams, results in audit_later:
        delivered = {p: r for p, r in results.items() if units[p].request not in undelivered}
        unrecorded |= {units[p].request for p in handler.audit.record(requests, batch, outputs, cams, delivered)}
    for index in sorted(unrecorded):
        message = "the audit record of this answer could not be committed (handler.audit.durability: strict)"
        responses[index] = json.dumps(protocols.error_body(503, "AuditUnavailable", message))
        if context is not None and hasattr(context, "set_response_status"):
            context.set_response_status(503, "Service Unavailable", index)
    grpc_calls.settle(context, len(data), unanswered)
    return responses


def answer_units(
    handler: BatchHandler, units: Sequence[protocols.Unit], audit_later: list[tuple[Any, ...]] | None = None
) -> list[tuple[int, dict[str, Any]]]:
    """``(status, answer)`` per unit (one image each): parsed, run as one batch, audited.

    With ``audit_later`` the audit call's arguments are appended there instead, so that the caller
    records only the answers that are delivered (not those replaced by a response-size error).
    """
    answers: list[tuple[int, dict[str, Any]] | None] = [None] * len(units)
    requests = []
    over_budget = budget.refusals(units, handler.config)  # pixel budgets, from the headers, before any decoding
    for position, unit in enumerate(units):
        try:
            if "error" in unit.item:
                raise unit.item["error"]
            if position in over_budget:
                raise over_budget[position]
            request = handler.parse_request(position, unit.item, unit.explain)
            request.request_index = unit.request
            requests.append(request)
        except RequestError as error:
            answers[position] = (error.code, error.body())
    logger.info(
        "batch of %d image(s): %d valid, %d explained", len(units), len(requests), sum(r.explain for r in requests)
    )
    requests = cost.admit(handler, requests, answers)  # forward-pass budgets, before any compute; starts the deadline
    if requests:
        handler.audit.sample(requests)
        batch = torch.stack([r.input for r in requests]).to(handler.device)
        outputs, cams = handler.explain_batch(batch, requests)
        encoded = handler.encode_explanations(requests, cams)
        results: dict[int, Any] = {}  # position -> the task's TaskResult
        header = handler.response_header()
        for row, (request, explanations) in enumerate(zip(requests, encoded)):
            try:
                if request.failure is not None:
                    raise request.failure
                results[request.index] = handler.build_response(request, outputs, row, explanations)
                answers[request.index] = (200, results[request.index].body(header))
            except RequestError as error:
                answers[request.index] = (error.code, error.body())
        if audit_later is None:
            handler.audit.record(requests, batch, outputs, cams, results)
        else:
            audit_later.append((requests, batch, outputs, cams, results))
    missing = (500, protocols.error_body(500, "InternalError", "no answer was built for this image"))
    return [answer if answer is not None else missing for answer in answers]

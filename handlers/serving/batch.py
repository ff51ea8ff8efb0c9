"""The request path of :class:`handlers.serving.base.CamHandler`: TorchServe batch -> images -> one model run -> answers.

:func:`handle_batch` reads every TorchServe request of the batch on its own (native, KServe v1 or v2,
:mod:`handlers.serving.protocols`), answers all their images with one batched run (:func:`answer_units`), and
returns exactly one response string per request, with its own status and content type; an answer over
TorchServe's response limit becomes a 413 JSON error for that request alone (:mod:`handlers.serving.limits`).

Per-request isolation: whatever one request makes raise while it is read (protocol, options, decoding) or
computed becomes that request's own JSON error (:func:`handlers.serving.errors.as_request_error`: 4xx for what
the client sent, 507 out of memory, 500 for our own fault) and its batch-mates are answered normally. When the
batched model/CAM/attribution run raises, its requests are run again one by one, so that only the culprit fails
(logged with its traceback); a :class:`RequestError` raised by the batched run (a deliberate refusal of the
whole run, such as a deadline) answers every request of that run instead, without a retry. Nothing escapes
:func:`handle_batch`: a failure outside any one request's part answers every request of the batch 500
``InternalError`` in JSON (TorchServe itself would answer them all 503 "Prediction failed").
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from handlers.serving import budget, cost, grpc_calls, limits, protocols
from handlers.serving.errors import as_request_error
from handlers.serving.protocols import RequestError, header

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


def _content_type(context: Any, index: int) -> None:
    if context is not None and hasattr(context, "set_response_content_type"):
        context.set_response_content_type(index, "application/json")


def _set_status(context: Any, index: int, code: int) -> None:
    if context is not None and hasattr(context, "set_response_status"):
        context.set_response_status(code, protocols.reason(code), index)


def handle_batch(handler: BatchHandler, data: Sequence[Mapping[str, Any]], context: Any) -> list[str]:
    """One JSON string per request of ``data`` (TorchServe's batch), statuses set on ``context``; never raises
    (see the module doc)."""
    unanswered = grpc_calls.sequence_requests(context, len(data))  # gRPC StreamPredictions2: see grpc_calls
    try:
        return _handle_batch(handler, data, context, unanswered)
    except Exception as error:  # noqa: BLE001 - the last resort: JSON errors, never TorchServe's batch-wide 503
        logger.exception("batch of %d request(s) failed outside any one request: answering each 500", len(data))
        answer = as_request_error(error, reading=False)
        if answer.code < 500:  # a refusal raised outside any one request is still not the client's doing
            answer = RequestError(answer.message, 500, "InternalError")
        for index in range(len(data)):
            _set_status(context, index, answer.code)
            _content_type(context, index)
        try:
            grpc_calls.settle(context, len(data), unanswered)
        except Exception:  # noqa: BLE001 - the answers above still go out
            logger.exception("marking the gRPC answers final failed")
        return [json.dumps(answer.body())] * len(data)


def _handle_batch(
    handler: BatchHandler, data: Sequence[Mapping[str, Any]], context: Any, unanswered: set[int]
) -> list[str]:
    if protocols.is_management_describe(data, context):
        return [json.dumps(handler.describe())]
    envelopes, units = [], []
    for index, item in enumerate(data):
        try:
            if index in unanswered:
                raise RequestError("gRPC StreamPredictions2 is not supported", 501, "NotImplemented")
            explain = header(context, index, "explain") == "True"
            envelope, found = protocols.expand(index, item, explain, functools.partial(header, context, index))
        except Exception as error:  # noqa: BLE001 - this request's own answer (errors.as_request_error)
            envelope, found = protocols.Envelope(error=_failed(error, index, reading=True)), []
        envelopes.append(envelope)
        units.extend(found)
    audit_later: list[tuple[Any, ...]] = []
    answers = answer_units(handler, units, audit_later)
    limit, source = handler.response_limit
    responses, undelivered = [], set()
    for index, envelope in enumerate(envelopes):
        mine = [answer for unit, answer in zip(units, answers) if unit.request == index]
        try:
            code, body = protocols.respond(envelope, mine, handler.model_name, handler.version)
            text = json.dumps(body)
        except Exception as error:  # noqa: BLE001 - an answer that cannot be written is this request's 500
            failure = _failed(error, index, reading=False)
            code, text = failure.code, json.dumps(failure.body())
            undelivered.add(index)
        size = len(text.encode("utf-8"))
        if size > limit:
            code, kind, message = limits.too_large(size, limit, source)
            text = json.dumps(protocols.error_body(code, kind, message))
            undelivered.add(index)
        if code != 200:
            _set_status(context, index, code)
        _content_type(context, index)
        responses.append(text)
    unrecorded: set[int] = set()  # strict durability: committed before we return, or the answer is a 503
    for requests, batch, outputs, cams, results in audit_later:
        delivered = {p: r for p, r in results.items() if units[p].request not in undelivered}
        unrecorded |= {units[p].request for p in handler.audit.record(requests, batch, outputs, cams, delivered)}
    for index in sorted(unrecorded):
        message = "the audit record of this answer could not be committed (handler.audit.durability: strict)"
        responses[index] = json.dumps(protocols.error_body(503, "AuditUnavailable", message))
        _set_status(context, index, 503)
    grpc_calls.settle(context, len(data), unanswered)
    return responses


def _failed(error: BaseException, where: int, reading: bool) -> RequestError:
    """``error`` as the answer of the one request (or image) ``where``, logged as what it is."""
    answer = as_request_error(error, reading)
    if answer is not error:
        log = logger.error if answer.code >= 500 else logger.warning
        log("request/image %d: %s answered %d %s", where, type(error).__name__, answer.code, answer.kind,
            exc_info=answer.code >= 500)  # fmt: skip
    return answer


def _compute(handler: BatchHandler, requests: list[Any]) -> tuple[Any, ...]:
    """``(requests, batch, outputs, cams, encoded)``: one model/CAM run over ``requests``, explanations encoded."""
    batch = torch.stack([r.input for r in requests]).to(handler.device)
    outputs, cams = handler.explain_batch(batch, requests)
    return requests, batch, outputs, cams, handler.encode_explanations(requests, cams)


def _runs(handler: BatchHandler, requests: list[Any], answers: list[Any]) -> list[tuple[Any, ...]]:
    """The runs that answer ``requests``: one batched run or, when it raises, one run per request, so that only
    the culprit fails (its error in ``answers``); a :class:`RequestError` from the batched run answers them all."""
    try:
        return [_compute(handler, requests)]
    except RequestError as error:  # a refusal of the whole run (a deadline): retrying would repeat it
        for request in requests:
            answers[request.index] = (error.code, error.body())
        return []
    except Exception as error:  # noqa: BLE001 - isolated below
        if len(requests) == 1:
            failure = _failed(error, requests[0].index, reading=False)
            answers[requests[0].index] = (failure.code, failure.body())
            return []
        logger.warning(
            "the batched run of %d image(s) raised %s: %s; running them one by one",
            len(requests), type(error).__name__, str(error)[:300], exc_info=True,
        )  # fmt: skip
    runs = []
    for request in requests:
        try:
            runs.append(_compute(handler, [request]))
        except Exception as error:  # noqa: BLE001 - this image's own answer
            failure = _failed(error, request.index, reading=False)
            answers[request.index] = (failure.code, failure.body())
    return runs


def answer_units(
    handler: BatchHandler, units: Sequence[protocols.Unit], audit_later: list[tuple[Any, ...]] | None = None
) -> list[tuple[int, dict[str, Any]]]:
    """``(status, answer)`` per unit (one image each): parsed, run as one batch (isolated, see the module doc),
    audited.

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
        except Exception as error:  # noqa: BLE001 - this image's own answer (errors.as_request_error)
            failure = _failed(error, position, reading=True)
            answers[position] = (failure.code, failure.body())
    logger.info(
        "batch of %d image(s): %d valid, %d explained", len(units), len(requests), sum(r.explain for r in requests)
    )
    requests = cost.admit(handler, requests, answers)  # forward-pass budgets, before any compute; starts the deadline
    runs: list[tuple[Any, ...]] = []
    if requests:
        handler.audit.sample(requests)
        runs = _runs(handler, requests, answers)
    header = handler.response_header() if runs else {}
    for run, batch, outputs, cams, encoded in runs:
        results: dict[int, Any] = {}  # position -> the task's TaskResult
        for row, (request, explanations) in enumerate(zip(run, encoded)):
            try:
                if request.failure is not None:
                    raise request.failure
                results[request.index] = handler.build_response(request, outputs, row, explanations)
                answers[request.index] = (200, results[request.index].body(header))
            except Exception as error:  # noqa: BLE001 - this image's own answer
                results.pop(request.index, None)
                failure = _failed(error, request.index, reading=False)
                answers[request.index] = (failure.code, failure.body())
        if audit_later is None:
            handler.audit.record(run, batch, outputs, cams, results)
        else:
            audit_later.append((run, batch, outputs, cams, results))
    missing = (500, protocols.error_body(500, "InternalError", "no answer was built for this image"))
    return [answer if answer is not None else missing for answer in answers]

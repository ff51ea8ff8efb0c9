"""The Auditor: samples requests before the batched run and records the audited ones after it.

See :mod:`handlers.audit` for what a record holds and how it reaches the disk.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from cam_engine.core import model_scores
from cam_engine.targets import ClassifierOutputTarget
from handlers.config import AUDIT_SINKS, AuditConfig, HandlerConfig
from handlers.serving.batch import header
from handlers.tasks.registry import TaskResult
from handlers.tasks.targets import class_of

from .metrics import FAITHFULNESS_SECONDS, OVERHEAD_SECONDS, AuditMetrics
from .postgres import PostgresSink, resolve_dsn
from .sinks import PendingRecord, SqliteSink, StdoutSink, resolve_directory
from .status import UnavailableMarker
from .summary import REMOVED_FRACTION, confidence, remove_top_pixels, summarise
from .writer import SHUTDOWN_FLUSH_S, AuditWriter

__all__ = ["AuditedHandler", "Auditor", "SINK_VARIABLE", "deployed_config"]

logger = logging.getLogger(__name__)

#: the environment variable that switches every audited model's sink (the Kubernetes component audit-postgres)
SINK_VARIABLE = "CAM_AUDIT_SINK"


def deployed_config(config: AuditConfig) -> AuditConfig:
    """``config`` with ``sink`` replaced by ``$CAM_AUDIT_SINK`` when that is set: a deployment moves the records
    of archives built for one machine (SQLite) to a shared database without rebuilding them. It switches where
    records go, never whether a model audits. ValueError for an unknown sink or one that cannot hold the inputs
    the config stores."""
    wanted = os.environ.get(SINK_VARIABLE, "").strip()
    if not wanted or wanted == config.sink:
        return config
    if wanted not in AUDIT_SINKS:
        raise ValueError(f"${SINK_VARIABLE}={wanted!r}: not a sink; choose one of {', '.join(AUDIT_SINKS)}")
    if wanted == "stdout" and config.store_inputs:
        raise ValueError(f"${SINK_VARIABLE}=stdout: handler.audit.store_inputs is on, and log lines hold no images")
    return replace(config, sink=wanted, dsn=config.dsn if wanted == "postgres" else None)


def _utc_now() -> tuple[str, float]:
    now = time.time()
    stamp = dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return stamp, now


def _request_id(context: Any, index: int) -> str | None:
    getter = getattr(context, "get_request_id", None)
    if getter is None:
        return None
    try:
        value = getter(index)
    except (IndexError, KeyError, AttributeError, TypeError):
        return None
    return str(value) if value else None


def _to_host(cams: list[torch.Tensor]) -> list[torch.Tensor]:
    """``cams`` detached on the CPU: as they are when already there (no copy), else one device-to-host copy."""
    cams = [c.detach() for c in cams]
    if not cams or all(c.device.type == "cpu" for c in cams):
        return cams
    host = torch.cat([c.reshape(-1) for c in cams]).cpu()
    return [part.reshape(c.shape) for part, c in zip(host.split([c.numel() for c in cams]), cams)]


@dataclass
class _Pair:
    """One audited (request, target): its batch row, its model-input CAM ``[H, W]`` and its target."""

    row: int
    record: int
    target: Any
    cam: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


class AuditedHandler(Protocol):
    """What the :class:`Auditor` reads of the handler it observes (all fixed at load)."""

    config: HandlerConfig
    model_name: str
    version: str
    labels: list[str]
    model: Any  # torch.nn.Module
    context: Any

    @property
    def weights_source(self) -> str: ...

    def targets_for(self, request: Any) -> list[Any]: ...

    def explanation_meta(self, request: Any) -> dict[str, Any]: ...


class Auditor:
    """The audit observer a handler is given (see :mod:`handlers.audit`).

    ``handler``: the handler it observes, read through these attributes only: ``config`` (its
    ``audit`` and ``explanation`` sections), ``model_name``, ``version``, ``weights_source``,
    ``labels``, ``model``, ``context``, ``targets_for(request)`` and ``explanation_meta(request)``.
    ``metrics``: ``(cache, MetricTypes)`` of TorchServe, or None. A record names the class a target explained
    (:func:`~handlers.tasks.targets.class_of`: the image's own top class for "the top class").

    Disabled (``handler.audit.enabled: false``, the default), both calls return at once.
    """

    def __init__(
        self,
        handler: AuditedHandler,
        context: Any = None,
        rng: random.Random | None = None,
        metrics: tuple[Any, Any] | None = None,
    ) -> None:
        self.handler = handler
        self.config: AuditConfig = handler.config.audit
        self.enabled = self.config.enabled
        if self.enabled:
            self.config = deployed_config(self.config)
        self.rng = rng or random.Random()
        self.writer: AuditWriter | None = None
        self._warned: set[str] = set()
        if not self.enabled:
            return
        self.strict = self.config.durability == "strict"
        busy = self.config.busy_timeout_ms
        if self.config.sink == "stdout":
            sink: Any = StdoutSink()
        elif self.config.sink == "postgres":
            sink = PostgresSink(resolve_dsn(self.config.dsn), strict=self.strict, busy_timeout_ms=busy)
        else:
            sink = SqliteSink(resolve_directory(self.config.directory), "FULL" if self.strict else "NORMAL", busy)
        #: strict: how long an answer waits for its record's commit before it becomes a 503
        self.commit_timeout = 2 * busy / 1000 + 1.0
        self.metrics = AuditMetrics(metrics, handler.model_name, sink.name, self.config.drift)
        self.road: Any = None
        if self.config.faithfulness == "road":
            from cam_engine.metrics import ROADMostRelevantFirst

            # keeps the pixels below the 80th percentile of the CAM: imputes the same top 20% remove_top removes
            self.road = ROADMostRelevantFirst(percentile=100 * (1 - REMOVED_FRACTION))
        retention = self.config.retention_days
        self.writer = AuditWriter(
            sink, self.config.queue_size, handler.model_name, retry=not self.strict,
            marker=UnavailableMarker(handler.model_name) if self.strict else None,
            retention_s=None if retention is None else retention * 86400.0,
            prepare=self._prepare, observe=lambda records: self.metrics.drift([r.fields for r in records]),
        )  # fmt: skip
        logger.info(
            "auditing %s: %.0f%% of requests to %r (heatmaps %s, faithfulness %s, inputs %s)",
            handler.model_name, 100 * self.config.sample_rate, sink, self.config.store_heatmaps,
            self.config.faithfulness, self.config.store_inputs,
        )  # fmt: skip

    # ------------------------------------------------------------------ before the batched run
    def sample(self, requests: Sequence[Any]) -> None:
        """Mark each valid request as audited with probability ``sample_rate``.

        An audited request that asked for no explanation keeps its response unchanged; it only drops
        ``aug_smooth`` for its audit heatmap (six extra passes for a picture nobody asked for).
        """
        if not self.enabled:
            return
        rate = self.config.sample_rate
        for request in requests:
            request.audited = rate >= 1.0 or (rate > 0.0 and self.rng.random() < rate)
            if request.audited and not request.explain:
                request.aug_smooth = False

    # ------------------------------------------------------------------ after the responses are built
    def record(
        self,
        requests: Sequence[Any],
        batch: torch.Tensor,
        outputs: Any,
        cams: Sequence[torch.Tensor | None],
        results: Mapping[int, TaskResult],
    ) -> set[int]:
        """Queue one record per audited request that got a response (the task's ``results`` by request index).

        On this (the request) path: the record's fields from the answer, the faithfulness check (it needs the
        model) and one device-to-host copy of the audited CAMs; the heatmap summaries, PNGs and drift
        metrics are the writer thread's (:meth:`_prepare`, :meth:`AuditMetrics.drift`).

        Returns the indexes (``request.index``, keys of ``results``) of the answers that must not be
        released: with ``durability: strict``, those whose record was not committed within
        :attr:`commit_timeout` (the caller answers them 503 ``AuditUnavailable``); always empty in ``async``.
        Never raises: an error is logged and counted.
        """
        if not self.enabled or self.writer is None:
            return set()
        started = time.perf_counter()
        audited = {r.index for r in requests if getattr(r, "audited", False) and r.index in results}
        pending: list[tuple[int, PendingRecord]] = []
        try:
            pending = self._record(requests, batch, outputs, cams, results)
        except Exception as error:  # noqa: BLE001 - auditing must never fail a prediction (strict: a 503)
            self._warn_once("record", f"audit record failed for model {self.handler.model_name}: {error!r}")
            self.writer.count_write_errors(len(audited))
        failed: set[int] = set()
        try:
            for _, record in pending:
                self.writer.submit(record)
            if self.strict:
                committed = self.writer.wait([record for _, record in pending], self.commit_timeout)
                failed = audited - {index for (index, _), ok in zip(pending, committed) if ok}
                if failed:
                    self._warn_once("strict", f"audit records of {self.handler.model_name} not committed: "
                                    f"{len(failed)} answer(s) refused (503 AuditUnavailable)")  # fmt: skip
        finally:
            self.metrics.observe(OVERHEAD_SECONDS, (time.perf_counter() - started) * 1000)
            self.metrics.publish(self.writer.counters())
        return failed

    def _record(
        self,
        requests: Sequence[Any],
        batch: torch.Tensor,
        outputs: Any,
        cams: Sequence[torch.Tensor | None],
        results: Mapping[int, TaskResult],
    ) -> list[tuple[int, PendingRecord]]:
        """The records of the audited requests, with their ``request.index`` (not yet submitted)."""
        handler = self.handler
        context = handler.context
        audited = [(row, r) for row, r in enumerate(requests) if getattr(r, "audited", False) and r.index in results]
        if not audited:
            return []
        scores = model_scores(outputs)
        records: list[PendingRecord] = []
        owners: list[int] = []  # request.index of each record
        pairs: list[_Pair] = []
        audited_cams: list[tuple[int, torch.Tensor]] = []  # (record, its CAMs [T, H, W])
        stamp, epoch = _utc_now()
        layers = list(handler.config.explanation.target_layers)
        for row, request in audited:
            result = results[request.index]
            predictions = list(result.results[: self.config.top_k])
            top = result.top
            subjects = result.subjects
            meta = handler.explanation_meta(request)
            request_index = getattr(request, "request_index", request.index)
            explain_header = header(context, request_index, "explain")
            fields: dict[str, Any] = {
                "record_id": None,  # the writer's (_prepare)
                "request_id": _request_id(context, request_index),
                "timestamp": stamp,
                "epoch": epoch,
                "model": handler.model_name,
                "version": handler.version,
                "weights": handler.weights_source,
                "image_width": int(request.image.shape[-1]),
                "image_height": int(request.image.shape[-2]),
                "explained": bool(request.explain),
                # the endpoint: TorchServe sets the explain header for /explanations and KServe's :explain
                "endpoint": None if explain_header is None else
                ("explanations" if str(explain_header).lower() == "true" else "predictions"),
                "predictions": predictions,
                "top_index": top.get("index"),
                "top_label": top.get("label"),
                "top_score": top.get("score"),
                "method": meta.get("method", request.method),
                "layers": meta.get("layers", layers),
                "targets": [],
                "explanations": [],
                "batch_size": len(requests),
                "worker_pid": os.getpid(),
            }
            record = PendingRecord(fields, bytes(request.raw), None, self.config.store_inputs)
            request_cams = cams[row] if row < len(cams) else None
            if request_cams is not None:
                targets = list(handler.targets_for(request))[: request_cams.shape[0]]
                for position, target in enumerate(targets):
                    resolved, described = self._describe_target(target, scores, row)
                    if described["label"] is None and position < len(subjects):  # the answer names it
                        described = subjects[position]
                    fields["targets"].append(described)
                    fields["explanations"].append(dict(described))  # the writer adds the heatmap's summary
                    pairs.append(_Pair(row, len(records), resolved, request_cams[position], fields["explanations"][-1]))
                if targets:
                    audited_cams.append((len(records), request_cams[: len(targets)]))
                    record.geometry = request.geometry
            records.append(record)
            owners.append(request.index)
        if self.config.faithfulness and pairs:
            self._faithfulness(batch, scores, pairs, records)
        for index, host in zip((index for index, _ in audited_cams), _to_host([c for _, c in audited_cams])):
            records[index].cams = host
        return list(zip(owners, records))

    def _prepare(self, record: PendingRecord) -> None:
        """The writer thread's share of a record (:class:`~handlers.audit.writer.AuditWriter`'s ``prepare``):
        its id, its heatmaps' summaries and PNGs (:func:`~handlers.audit.summary.summarise`)."""
        record.fields["record_id"] = record.fields.get("record_id") or uuid.uuid4().hex
        summarise(record, self.config.store_heatmaps)

    def _describe_target(self, target: Any, scores: Any, row: int) -> tuple[Any, dict[str, Any]]:
        """(a target fixed to a class where it named "the top class", its JSON description)."""
        labels = self.handler.labels
        index = class_of(target, scores, row)
        if index is not None:
            target = ClassifierOutputTarget(index)
            label = labels[index] if 0 <= index < len(labels) else None
            return target, {"target": index, "label": label}
        return target, {"target": repr(target), "label": None}

    def _faithfulness(
        self, batch: torch.Tensor, scores: Any, pairs: list[_Pair], records: list[PendingRecord]
    ) -> None:
        """One extra forward pass for every audited (image, target): confidence before and after
        removing the top 20% of its heatmap (``remove_top``: set to the mean colour; ``road``: imputed by
        ROAD's noisy linear imputation, one sparse solve per heatmap on the CPU). Its cost (ms, for the
        whole batch) goes into each record of the batch; where the scores are class scores, the class on
        top once the pixels are removed (``after_top``) and the record's predicted classes before and after
        (``shifts``) go with it: where the probability went."""
        started = time.perf_counter()
        try:
            rows = torch.tensor([p.row for p in pairs], device=batch.device)
            cam_stack = torch.stack([p.cam.to(batch.device) for p in pairs])
            if self.road is not None:
                perturbed = self.road.perturb(batch[rows], cam_stack)
            else:
                perturbed = remove_top_pixels(batch[rows], cam_stack)
            with torch.inference_mode():
                perturbed_scores = model_scores(self.handler.model(perturbed))
            results = []
            for position, pair in enumerate(pairs):
                before, basis = confidence(scores, pair.row, pair.target)
                after, _ = confidence(perturbed_scores, position, pair.target)
                moved = self._after_top(scores, perturbed_scores, pair.row, position, records[pair.record])
                results.append((before, after, basis, moved))
            if batch.device.type == "cuda":
                torch.cuda.synchronize(batch.device)
        except Exception as error:  # noqa: BLE001 - a task whose outputs do not fit: no score, no failure
            self._warn_once("faithfulness", f"faithfulness check skipped for {self.handler.model_name}: {error!r}")
            return
        cost = (time.perf_counter() - started) * 1000
        for pair, (before, after, basis, after_top) in zip(pairs, results):
            pair.info["faithfulness"] = {
                "before": round(before, 6), "after": round(after, 6), "drop": round(before - after, 6), "basis": basis,
                "perturbation": self.config.faithfulness, **(after_top or {}),
            }  # fmt: skip
        for record in records:
            explanations = record.fields["explanations"]
            if explanations and "faithfulness" in explanations[0]:
                record.fields["faithfulness"] = explanations[0]["faithfulness"]["drop"]
                record.fields["faithfulness_ms"] = round(cost, 3)
        self.metrics.observe(FAITHFULNESS_SECONDS, cost)

    def _after_top(self, scores: Any, perturbed: Any, row: int, position: int, record: PendingRecord) -> dict[str, Any]:
        """For [B, C] class scores: ``after_top`` (``{"index", "label", "score"}``, the top class once
        perturbed) and ``shifts`` (``[{"index", "label", "before", "after"}]``, softmax, for the record's
        predicted classes). Empty for other outputs."""
        if not isinstance(perturbed, torch.Tensor) or perturbed.ndim != 2 or not isinstance(scores, torch.Tensor):
            return {}
        before, after = torch.softmax(scores[row].float(), dim=-1), torch.softmax(perturbed[position].float(), dim=-1)
        labels = self.handler.labels
        index = int(after.argmax())
        top = {"index": index, "label": labels[index] if 0 <= index < len(labels) else None, "score": round(float(after[index]), 6)}
        shifts = [
            {"index": p["index"], "label": p.get("label"), "before": round(float(before[p["index"]]), 6),
             "after": round(float(after[p["index"]]), 6)}
            for p in record.fields["predictions"] if isinstance(p, Mapping) and isinstance(p.get("index"), int)
            and 0 <= p["index"] < after.shape[0]
        ]  # fmt: skip
        return {"after_top": top, "shifts": shifts}

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.error(message)

    def flush(self, timeout: float = SHUTDOWN_FLUSH_S) -> bool:
        return self.writer.flush(timeout) if self.writer is not None else True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

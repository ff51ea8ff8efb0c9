"""The task registry: every task registers once, here, and everything else reads it.

A :class:`Task` names its handler (module and class, which TorchServe loads from the archive), the
``handler:`` config section that belongs to it, the request options it adds, and the shape of its
answer: the list its results go in, the fields of its best result and the field naming what each
explanation is about. A handler's ``build_response`` returns a :class:`TaskResult`; the base handler
serialises it, the audit reads it as it is, and clients (the CLI, the load tests) rebuild the same
typed result from a response body with :meth:`TaskResult.from_body`.

A new task is its module under ``handlers/tasks/`` plus one :func:`register` call below.
This module imports nothing heavy (no torch), so configs, the archive builder and clients can read it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Task", "TaskResult", "TASKS", "register", "get_task", "task_of_body", "PICTURE_FIELDS"]

#: fields of an explanation that carry its pictures and how they were made, not what it is about
PICTURE_FIELDS = ("heatmap", "overlay", "attribution", "method", "layers")


@dataclass(frozen=True)
class Task:
    """One task.

    - ``name``: the archive's task (``handler.task``, or implied by ``handler.architecture``);
    - ``handler``: ``"module:Class"`` of its handler;
    - ``results``: the response key listing its results, best first;
    - ``top``: the fields of a result giving ``(index, label, score)`` (None where the task has none);
    - ``subject``: the explanation field naming what it explains (a class, a box, a concept);
    - ``section``: its own ``handler:`` config section (a :class:`handlers.config.HandlerConfig` field), if any;
    - ``options``: the request options it adds to the common ones;
    - ``config_task``: whether ``handler.task`` may name it (CLIP is chosen by its architecture instead).
    """

    name: str
    handler: str
    results: str
    top: tuple[str | None, str | None, str | None]
    subject: str = "target"
    section: str | None = None
    options: tuple[str, ...] = ()
    config_task: bool = True

    @property
    def module(self) -> str:
        return self.handler.partition(":")[0]

    @property
    def handler_file(self) -> str:
        """The handler's source file, relative to the repository root (what an archive's handler is)."""
        return self.module.replace(".", "/") + ".py"

    def handler_class(self) -> type:
        module, _, name = self.handler.partition(":")
        return getattr(importlib.import_module(module), name)


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add ``task`` to :data:`TASKS` (a name registers once)."""
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; registered: {', '.join(TASKS)}") from None


def task_of_body(body: Any) -> Task | None:
    """The task whose answer ``body`` is (by the list it holds; classifier before CLIP, which answers alike)."""
    if not isinstance(body, Mapping):
        return None
    found = [task for task in TASKS.values() if isinstance(body.get(task.results), list)]
    return found[0] if found else None


def _number(value: Any) -> float | int | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass
class TaskResult:
    """What a task answered for one image.

    ``results``: its result list, best first (predictions, detections, mask classes, similarities);
    ``explanations``: per explained subject, the subject's fields plus its pictures (None: not explained);
    ``extra``: other top-level fields of the answer (a segmentation ``mask``).
    """

    task: str
    results: list[dict[str, Any]]
    explanations: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def body(self, header: Mapping[str, Any]) -> dict[str, Any]:
        """The JSON answer: ``header`` (model, version), the extra fields, the results, the explanations."""
        body = {**header, **self.extra, get_task(self.task).results: self.results}
        if self.explanations is not None:
            body["explanations"] = self.explanations
        return body

    @property
    def top(self) -> dict[str, Any]:
        """``{"index", "label", "score"}`` of the best result (None values where the task has none)."""
        empty = {"index": None, "label": None, "score": None}
        if not self.results or not isinstance(self.results[0], Mapping):
            return empty
        best = self.results[0]
        index, label, score = (best.get(key) if key else None for key in get_task(self.task).top)
        return {
            "index": index if isinstance(index, int) and not isinstance(index, bool) else None,
            "label": label if isinstance(label, str) else None,
            "score": _number(score),
        }

    @property
    def subjects(self) -> list[dict[str, Any]]:
        """Per explanation, what it is about: ``{"target": <the task's subject>, "label", **its own fields}``
        without the pictures (a concept's explanation keeps what it measures as ``kind``)."""
        subject = get_task(self.task).subject
        described = []
        for explanation in self.explanations or []:
            fields = {k: v for k, v in explanation.items() if k not in PICTURE_FIELDS}
            kind = fields.pop("target", None)
            target = fields.pop(subject) if subject != "target" else kind
            if subject != "target" and subject != "box_index":
                fields["kind"] = kind
            described.append({"target": target, "label": fields.pop("label", None), **fields})
        return described

    @classmethod
    def from_body(cls, body: Mapping[str, Any], task: str | None = None) -> TaskResult:
        """The typed result of a response body (``task``: known from the model's describe, else inferred)."""
        found = get_task(task) if task else task_of_body(body)
        if found is None:
            raise ValueError(f"not a task answer: none of {[t.results for t in TASKS.values()]} in {list(body)[:8]}")
        explanations = body.get("explanations")
        skip = {found.results, "explanations", "model", "version"}
        return cls(
            found.name,
            list(body.get(found.results) or []),
            list(explanations) if isinstance(explanations, list) else None,
            {k: v for k, v in body.items() if k not in skip},
        )


register(Task("classifier", "handlers.tasks.classifier:ClassifierHandler", "predictions", ("index", "label", "score"),
              options=("targets", "top_k")))
register(Task("detection", "handlers.tasks.detection:DetectionHandler", "detections", ("class", "label", "score"),
              subject="box_index", section="detection", options=("score_threshold", "boxes")))
register(Task("segmentation", "handlers.tasks.segmentation:SegmentationHandler", "classes",
              ("index", "label", "fraction"), section="segmentation", options=("classes",)))
register(Task("embedding", "handlers.tasks.embedding:EmbeddingHandler", "similarities",
              (None, "concept", "similarity"), subject="concept", section="embedding",
              options=("concept", "references", "target")))
register(Task("clip", "handlers.tasks.clip:ClipHandler", "predictions", ("index", "label", "score"),
              section="clip", options=("labels", "targets"), config_task=False))

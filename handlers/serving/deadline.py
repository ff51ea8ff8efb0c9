"""The deadline of the batch being computed: long explanation loops stop at it with a 503 for their requests.

:func:`handlers.serving.cost.admit` sets each batch's :class:`Deadline` at what the model's
``responseTimeout`` leaves (its :data:`SHARE`, so that the answers still leave in time); the handler runs
each explanation under it (:func:`active`), and every model evaluation of that run after its first checks it
(:func:`watch`: a forward pre-hook on the handler's model, so every loop that calls the model is covered,
cam_engine's ScoreCAM/AblationCAM chunks and Captum's attribution chunks alike, without cam_engine knowing of
deadlines) and raises :class:`DeadlineExceeded`, which answers the requests of that run with 503
``{"type": "DeadlineExceeded"}`` instead of letting TorchServe kill the worker at ``responseTimeout``.

A run's first evaluation is never stopped: a stopped run still predicts its batch (one pass), so refusing the
first saves nothing, and a one-pass run (Grad-CAM) that starts after an expensive batch-mate used up the
deadline is answered. Outside a batch (loading, warm-up, tests calling a method directly) there is no
deadline. The hook costs a Python call per whole-model evaluation (``bench/bench_deadline.py``).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from handlers.serving.errors import RequestError

__all__ = ["SHARE", "Deadline", "DeadlineExceeded", "active", "check", "remaining", "watch"]

#: the share of ``responseTimeout`` a batch's computation may take (the rest: decoding, encoding, the answer)
SHARE = 0.8


class DeadlineExceeded(RequestError):
    """A request's computation ran out of its share of ``responseTimeout``: 503, retryable later or with a
    cheaper request."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"this explanation did not finish within its {seconds:.3g} s share of the model's responseTimeout and "
            "was stopped; ask for fewer passes (n_steps, nt_samples, a larger occlusion stride, fewer targets, a "
            "method that costs one pass) or retry later",
            503,
            "DeadlineExceeded",
        )


@dataclass(frozen=True)
class Deadline:
    """A batch's end (``time.monotonic()`` seconds) and the share of ``responseTimeout`` it was given."""

    end: float
    seconds: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        """The deadline ``seconds`` from now."""
        return cls(time.monotonic() + seconds, seconds)


@dataclass
class _Run:
    """One run under a deadline, and the model evaluations it has made."""

    deadline: Deadline
    passes: int = field(default=0)


_RUN: ContextVar[_Run | None] = ContextVar("cam_batch_deadline", default=None)
_WATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@contextmanager
def active(deadline: Deadline | None) -> Iterator[None]:
    """Within the block (one run), :func:`check` and the watched models' evaluations enforce ``deadline``
    (None: no deadline)."""
    token = _RUN.set(None if deadline is None else _Run(deadline))
    try:
        yield
    finally:
        _RUN.reset(token)


def remaining() -> float | None:
    """Seconds left to the current deadline (None: no deadline)."""
    run = _RUN.get()
    return None if run is None else run.deadline.end - time.monotonic()


def check() -> None:
    """Raise :class:`DeadlineExceeded` if the current deadline has passed."""
    run = _RUN.get()
    if run is not None and time.monotonic() > run.deadline.end:
        raise DeadlineExceeded(run.deadline.seconds)


def _on_evaluation(module: nn.Module, args: Any) -> None:
    run = _RUN.get()
    if run is not None:
        run.passes += 1
        if run.passes > 1:
            check()


def watch(model: nn.Module) -> None:
    """Every evaluation of ``model`` (its ``__call__``) inside :func:`active` after the run's first checks the
    deadline: one forward pre-hook, registered once per model, kept for the model's life (outside a run it
    returns at once). Whatever loop calls the model, in cam_engine or Captum, stops between two of its calls."""
    if model not in _WATCHED:
        model.register_forward_pre_hook(_on_evaluation)
        _WATCHED.add(model)

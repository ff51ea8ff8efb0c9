"""The deadline of the batch being computed: long explanation loops stop at it with a 503 for their requests.

:func:`handlers.serving.cost.admit` sets each batch's :class:`Deadline` at what the model's
``responseTimeout`` leaves (its :data:`SHARE`, so that the answers still leave in time); the handler runs
each explanation under it (:func:`active`), and the loops that can run long check it between chunks (:func:`check`: every model evaluation of a Captum attribution goes
through one, :mod:`handlers.serving.attributions`) and raise :class:`DeadlineExceeded`, which answers the
requests of that run with 503 ``{"type": "DeadlineExceeded"}`` instead of letting TorchServe kill the
worker at ``responseTimeout``. Outside a batch (loading, warm-up, tests calling a method directly) there
is no deadline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from handlers.serving.errors import RequestError

__all__ = ["SHARE", "Deadline", "DeadlineExceeded", "active", "check", "remaining"]

#: the share of ``responseTimeout`` a batch's computation may take (the rest: decoding, encoding, the answer)
SHARE = 0.8

_DEADLINE: ContextVar[Deadline | None] = ContextVar("cam_batch_deadline", default=None)


class DeadlineExceeded(RequestError):
    """A request's computation ran out of its share of ``responseTimeout``: 503, retryable later or with a
    cheaper request."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"this explanation did not finish within its {seconds:.3g} s share of the model's responseTimeout and "
            "was stopped; ask for fewer passes (n_steps, nt_samples, a larger occlusion stride) or retry later",
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


@contextmanager
def active(deadline: Deadline | None) -> Iterator[None]:
    """Within the block, :func:`check` enforces ``deadline`` (None: no deadline)."""
    token = _DEADLINE.set(deadline)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def remaining() -> float | None:
    """Seconds left to the current deadline (None: no deadline)."""
    deadline = _DEADLINE.get()
    return None if deadline is None else deadline.end - time.monotonic()


def check() -> None:
    """Raise :class:`DeadlineExceeded` if the current deadline has passed."""
    deadline = _DEADLINE.get()
    if deadline is not None and time.monotonic() > deadline.end:
        raise DeadlineExceeded(deadline.seconds)

"""Run one test's heavy body in a forked child, so the memory it leaves behind goes with the child.

Building a large model and freeing it returns the tensors, not the process's heap: after
``test_shipped_configs`` (every shipped architecture, one after the other) pytest kept ~3.6 GB although
a weak reference to each model was dead. :func:`in_child` forks (cheap: nothing is re-imported), runs the
function there and hands back its (picklable) result, or fails the test with the child's traceback.

The child runs torch single-threaded: GNU OpenMP's thread pool does not survive ``fork`` (a parallel op in
the child would hang), and ``torch.set_num_threads(1)`` keeps every op out of it.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import torch

__all__ = ["in_child"]

T = TypeVar("T")


def _child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    try:
        conn.send(("ok", fn(*args)))
    except pytest.skip.Exception as skip:
        conn.send(("skip", str(skip)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test with it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def in_child(fn: Callable[..., T], *args: Any, timeout: float = 600) -> T:
    """``fn(*args)`` in a forked child: its return value, or the test fails (or skips) as the child did."""
    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(child, fn, args), daemon=True)
    process.start()
    child.close()
    try:
        if not parent.poll(timeout):
            pytest.fail(f"{getattr(fn, '__name__', fn)} did not finish in {timeout:g} s in its child process")
        outcome, value = parent.recv()
    except EOFError:
        process.join(5)
        pytest.fail(f"{getattr(fn, '__name__', fn)}'s child process died (exit code {process.exitcode}) before answering")
    finally:
        if process.is_alive():
            process.kill()
        process.join(5)
    if outcome == "skip":
        pytest.skip(value)
    if outcome == "error":
        pytest.fail(f"in the child process:\n{value}", pytrace=False)
    return value

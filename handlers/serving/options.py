"""Request options as frozen dataclasses, read by the config's own machinery (:mod:`handlers.settings`).

Each group of options is a dataclass whose fields declare their check with ``setting(default, check,
default_from=..., limit=...)``: :class:`CommonOptions` here, :class:`handlers.serving.render.RenderOptions`
and :class:`handlers.serving.attributions.AttributionOptions`. :func:`read_options` reads one group from a
request's JSON object with :func:`handlers.settings.read_values`, the reader of the model config: the same
checks, their neutral :class:`handlers.settings.InvalidValue` worded as a 400 naming the option and what is
allowed (``alpha must be a number in [0, 1], got 1.5``) where the config reader words it as a
:class:`handlers.settings.ConfigError` (``handler.overlay_alpha: must be ...``). Checks that involve the
model or several options (a method the model serves, ``stride`` over ``window``) stay with their group.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from handlers.serving.errors import RequestError, quote
from handlers.settings import InvalidValue, boolean, integer, read_values, section_keys, setting, text

__all__ = ["OUTPUTS", "CommonOptions", "TopKOptions", "option_names", "read_options", "outputs"]

OUTPUTS = ("heatmap", "overlay")


def outputs(value: Any, key: str) -> tuple[str, ...]:
    """``heatmap``, ``overlay``, ``both`` or a non-empty list of the first two -> a tuple without repeats."""
    if isinstance(value, str):
        value = list(OUTPUTS) if value == "both" else [value]
    if not isinstance(value, list) or not value or not all(isinstance(o, str) and o in OUTPUTS for o in value):
        raise InvalidValue(key, f"must be 'heatmap', 'overlay', 'both' or a list of those, got {quote(value)}")
    return tuple(dict.fromkeys(value))


@dataclass(frozen=True)
class CommonOptions:
    """The options every task takes (defaults from the model's :class:`handlers.config.ExplanationConfig`).

    - ``explain``: explain this request (default ``explain_on_predict``; ``/explanations`` always does);
    - ``method``: a method the model serves (default ``default_method``; checked against the model's list);
    - ``aug_smooth``/``eigen_smooth``: grad-cam's smoothing, where the model enables it;
    - ``output``: ``heatmap``, ``overlay``, ``both`` or a list.
    """

    explain: bool = setting(False, boolean, default_from="explain_on_predict")
    method: str = setting("gradcam", text("a method name"), default_from="default_method")
    aug_smooth: bool = setting(False, boolean)
    eigen_smooth: bool = setting(False, boolean)
    output: tuple[str, ...] = setting(("heatmap",), outputs)


@dataclass(frozen=True)
class TopKOptions:
    """A classifier's ``top_k``: how many predictions to return, from 1 up to the limit ``classes`` (the
    model's number of classes; default: the config's ``top_k``). Task modules hold exactly one class each
    (TorchServe's handler loading), so the group lives here."""

    top_k: int = setting(5, integer(1), default_from="top_k", limit="classes")


@functools.cache
def option_names(*groups: type) -> tuple[str, ...]:
    """The option names the dataclasses ``groups`` accept, in field order."""
    return tuple(name for group in groups for name in section_keys(group))


#: (group, id(defaults)) -> (defaults, the group read with no option given): a request that gives none of a
#: group's options gets the model's defaults, read once, not re-validated per request (the group is frozen)
_DEFAULTS: dict[tuple[type, int], tuple[Any, Any]] = {}


def read_options(
    cls: type, options: Mapping[str, Any], defaults: Any = None, limits: Mapping[str, tuple[Any, str]] | None = None
) -> Any:
    """The options group ``cls`` from a request's ``options`` (keys of other groups are ignored here; the
    handler refuses unknown ones). A refused value is a :class:`RequestError` 400 naming the option."""
    mine = {key: options[key] for key in option_names(cls) if key in options}
    if not mine:  # defaults never meet a limit: only given values are bounded
        stored = _DEFAULTS.get((cls, id(defaults)))
        if stored is not None and stored[0] is defaults:
            return stored[1]
    try:
        parsed = read_values(cls, mine, "", defaults, limits)
    except InvalidValue as error:
        raise RequestError(f"{error.key} {error.problem}") from None
    if not mine:
        if len(_DEFAULTS) >= 256:  # a process serves one model: only many test handlers fill it
            _DEFAULTS.clear()
        _DEFAULTS[(cls, id(defaults))] = (defaults, parsed)
    return parsed

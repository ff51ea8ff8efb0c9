"""A generic reader of settings written as frozen dataclasses: model config sections and request options.

A field declares its own check with :func:`setting` (``setting(default, check)``); :func:`read_section`
walks any such dataclass: an unknown key is refused with the closest valid key suggested, each given
value is checked and named by its dotted key (``handler.preprocessing.mean: ...``), nested sections are
read recursively (or from the parent's own keys with ``flat=True``), and a section's ``finish(where,
data)`` hook runs the checks that involve several keys. The checks below each take ``(value, dotted
key)`` and return the parsed value or raise the neutral :class:`InvalidValue`.

The same fields serve request options (:func:`read_values`, wrapped by
:func:`handlers.serving.options.read_options`): a field may also name the model setting its default comes
from (``default_from``) and the model limit it may not exceed (``limit``). :func:`read_section` turns an
:class:`InvalidValue` into a :class:`ConfigError` (``handler.top_k: must be ...``) at load;
the request side turns it into a 400 naming the option (``n_steps must be ...``).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field, fields
from typing import Any

from handlers.serving.errors import quote

__all__ = [
    "Check",
    "ConfigError",
    "InvalidValue",
    "read_section",
    "read_values",
    "section_keys",
    "setting",
    "integer",
    "boolean",
    "choice",
    "floats",
    "unit",
    "size",
    "text",
    "optional",
    "names",
    "file_or_names",
    "keyword_arguments",
    "concept_files",
]


class ConfigError(ValueError):
    """A model config is invalid; the message names the offending key (``handler.top_k: ...``)."""


class InvalidValue(ValueError):
    """A check refused a value: ``key`` (dotted for a config, the option's name for a request) and
    ``problem`` (``must be an integer >= 1, got 0``). Neither a config nor a request error: the reader
    that called the check words it as one or the other."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


# --- checks: each takes (value, dotted key) and returns the parsed value or raises InvalidValue -------------

Check = Callable[[Any, str], Any]


def integer(minimum: int = 0, maximum: int | None = None) -> Check:
    def check(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InvalidValue(key, f"must be an integer >= {minimum}, got {quote(value)}")
        if maximum is not None and value > maximum:
            raise InvalidValue(key, f"must be in {minimum}..{maximum}, got {quote(value)}")
        return value

    return check


def boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidValue(key, f"must be true or false, got {quote(value)}")
    return value


def choice(*choices: str) -> Check:
    def check(value: Any, key: str) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise InvalidValue(key, f"must be one of {', '.join(choices)}, got {quote(value)}")
        return value.lower()

    return check


def floats(length: int, positive: bool = False) -> Check:
    def check(value: Any, key: str) -> tuple[float, ...]:
        if (
            not isinstance(value, Sequence)
            or isinstance(value, str)
            or len(value) != length
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            raise InvalidValue(key, f"must be a list of {length} numbers, got {quote(value)}")
        if positive and any(v <= 0 for v in value):
            raise InvalidValue(key, f"every value must be > 0, got {quote(value)}")
        return tuple(float(v) for v in value)

    return check


def unit(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise InvalidValue(key, f"must be a number in [0, 1], got {quote(value)}")
    return float(value)


def size(value: Any, key: str) -> tuple[int, int]:
    """An int (square) or ``[height, width]``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise InvalidValue(key, f"must be a positive int or [height, width], got {quote(value)}")
    return int(value[0]), int(value[1])


def text(what: str) -> Check:
    def check(value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise InvalidValue(key, f"must be {what}, got {quote(value)}")
        return value

    return check


def optional(inner: Check) -> Check:
    """``None`` stays ``None``; anything else goes through ``inner``."""
    return lambda value, key: None if value is None else inner(value, key)


def names(what: str, lower: bool = False) -> Check:
    """A name or a non-empty list of names -> a tuple."""

    def check(value: Any, key: str) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not value or not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
            raise InvalidValue(key, f"must be a non-empty list of {what}, got {quote(value)}")
        return tuple(v.lower() if lower else v for v in value)

    return check


def file_or_names(value: Any, key: str) -> str | tuple[str, ...] | None:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not all(isinstance(label, str) for label in value):
            raise InvalidValue(key, "must be a file name or a list of names")
        return tuple(value)
    if value is not None and not isinstance(value, str):
        raise InvalidValue(key, f"must be a file name or a list of names, got {quote(value)}")
    return value


def keyword_arguments(value: Any, key: str) -> tuple[tuple[str, Any], ...]:
    value = value or {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise InvalidValue(key, "must be a mapping of builder keyword arguments")
    return tuple(value.items())


def concept_files(value: Any, key: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    value = value or {}
    if not isinstance(value, Mapping):
        raise InvalidValue(key, "must map concept names to lists of image files")
    parsed = []
    for name, files in value.items():
        if isinstance(files, str):
            files = [files]
        if not isinstance(name, str) or not name or not isinstance(files, Sequence) or not files or not all(
            isinstance(f, str) and f for f in files
        ):
            raise InvalidValue(f"{key}.{name}", "must be a non-empty list of image files")
        parsed.append((name, tuple(files)))
    return tuple(parsed)


# --- the generic reader ----------------------------------------------------------------------------------


def setting(default: Any = dataclasses.MISSING, check: Check | None = None, **meta: Any) -> Any:
    """A dataclass field read by :func:`read_section`: ``check(value, dotted_key)`` parses a given value
    (defaults are trusted). ``meta``: ``only_for_task``/``only_for_architecture`` refuse a section given
    for another task/architecture; ``flat=True`` reads a nested section from the parent's own keys; for
    request options (:func:`read_values`), ``default_from`` names the model setting that gives the default
    and ``limit`` the model limit a value may not exceed."""
    metadata = {"check": check, **meta}
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section_keys(cls: type) -> list[str]:
    """The keys a section accepts (a ``flat`` nested section's keys count as the parent's own)."""
    keys: list[str] = []
    for f in fields(cls):
        if f.metadata.get("flat"):
            keys += section_keys(_section_type(f))
        else:
            keys.append(f.name)
    return keys


def _section_type(f: dataclasses.Field) -> type | None:
    return f.default_factory if dataclasses.is_dataclass(f.default_factory) else None  # type: ignore[arg-type]


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _check_keys(section: Any, allowed: Sequence[str], where: str) -> None:
    if not isinstance(section, Mapping):
        raise InvalidValue(where, f"must be a mapping, got {type(section).__name__}")
    for key in section:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; allowed keys: {', '.join(allowed)}"
            raise InvalidValue(_key(where, str(key)), f"unknown key{hint}")


def read_values(
    cls: type,
    data: Mapping[str, Any] | None,
    where: str = "",
    defaults: Any = None,
    limits: Mapping[str, tuple[Any, str]] | None = None,
) -> Any:
    """The dataclass ``cls`` read from ``data``; raises :class:`InvalidValue` (the offending key and the problem).

    ``defaults``: an object whose attribute named by a field's ``default_from`` is that field's default
    (a model's configured default for a request option); ``limits``: limit name -> ``(maximum, how the
    limit is named)`` for the fields that declare a ``limit``. A section's ``finish`` hook is not run here.
    """
    data = {} if data is None else data
    _check_keys(data, section_keys(cls), where)
    values: dict[str, Any] = {}
    for f in fields(cls):
        nested = _section_type(f)
        key = _key(where, f.name)
        if f.metadata.get("flat"):
            values[f.name] = read_section(nested, {k: data[k] for k in section_keys(nested) if k in data}, where)
        elif nested is not None:
            values[f.name] = read_section(nested, data.get(f.name), key)
        elif f.name in data:
            check = f.metadata.get("check")
            values[f.name] = _bounded(check(data[f.name], key) if check else data[f.name], key, f.metadata.get("limit"), limits)
        elif defaults is not None and f.metadata.get("default_from"):
            values[f.name] = getattr(defaults, f.metadata["default_from"])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InvalidValue(key, "missing")
    for f in fields(cls):
        for meta, attribute, what in (("only_for_task", "task", "task"), ("only_for_architecture", "architecture", "architecture")):
            wanted = f.metadata.get(meta)
            if wanted is None or data.get(f.name) is None:
                continue
            actual = values.get(attribute, getattr(cls, attribute, None))
            if actual != wanted:
                raise InvalidValue(_key(where, f.name), f"only applies to {what} {wanted}, this config's {what} is {actual}")
    return cls(**values)


def _bounded(value: Any, key: str, limit: str | None, limits: Mapping[str, tuple[Any, str]] | None) -> Any:
    if limit is None or limits is None or limit not in limits:
        return value
    maximum, name = limits[limit]
    if value > maximum:
        raise InvalidValue(key, f"{quote(value)} is over this model's limit {name} = {maximum}")
    return value


def read_section(cls: type, data: Mapping[str, Any] | None, where: str) -> Any:
    """Parse and validate the mapping ``data`` into the section dataclass ``cls``; every error is a
    :class:`ConfigError` whose message starts with the dotted key (``handler.preprocessing.mean: ...``)."""
    try:
        config = read_values(cls, data, where)
    except InvalidValue as error:
        raise ConfigError(str(error)) from None
    finish = getattr(config, "finish", None)
    return finish(where, {} if data is None else data) if finish else config

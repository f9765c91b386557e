"""The quality gate: checks on a workflow output before synthesis, as data (pure functions).

The checks come from ``[[pipeline.gate.checks]]`` (:class:`pipeline.config.Check`). Each names
one or more paths into the output (``content``, ``data.title``, ``images[]``, ``clips[0].url``);
a JSON string met on the way is decoded, so ``{"Output": "<JSON string>"}`` is read as the object
it holds. Kinds:

- ``required``: every path leads to a value that is not null;
- ``non_empty``: every value found is not null, ``""`` (or only spaces), ``[]`` or ``{}``, and
  at least one is found;
- ``text_length``: every value is text of ``min``..``max`` characters;
- ``url``: every value is an ``http(s)`` URL, and it answered (see :mod:`pipeline.urlprobe`: the
  answers are passed in, so this module stays pure);
- ``duration``: every value is a number (the output's own stated duration, in ``unit``) between
  ``min`` and ``max`` seconds. Durations are not measured from the media here.

:func:`evaluate` returns the first :class:`Failure` (checks in their configured order, paths in
order, items in order), or None when the output passes. :func:`urls_to_probe` lists the URLs the
``url`` checks need answers for. A failed gate raises nothing itself; the worker turns a failure
into :class:`GateFailed` (``code`` = the check's kind, ``node`` = the check's name).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .config import DURATION_UNITS, Check, parse_path
from .errors import PipelineError

__all__ = ["Failure", "GateFailed", "evaluate", "resolve", "urls_to_probe", "MISSING"]

VALUE_SHOWN = 120   # characters of an offending value quoted in a failure message


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


@dataclass(frozen=True)
class Failure:
    """One failed check: which check, where in the output, the value found and why."""

    check: str
    kind: str
    path: str
    value: Any
    reason: str

    @property
    def message(self) -> str:
        """One line for the task's error and the alert card (the value cut and quoted)."""
        return (f"quality check {self.check!r} ({self.kind}) failed: {self.path} = "
                f"{shown(self.value)}: {self.reason}")


class GateFailed(PipelineError):
    """A workflow output failed a quality check (scope ``run``: the run's content is bad)."""

    def __init__(self, failure: Failure) -> None:
        self.failure = failure
        self.code = failure.kind
        self.message = failure.message
        self.node = failure.check
        self.scope = "run"
        super().__init__(failure.message)


def shown(value: Any) -> str:
    """``value`` as short text: a string quoted (JSON style), a structure as JSON; cut after
    VALUE_SHOWN characters with "…"."""
    if value is MISSING:
        return "(missing)"
    if isinstance(value, str):
        cut = value[:VALUE_SHOWN]
        return json.dumps(cut, ensure_ascii=False) + ("…" if len(value) > VALUE_SHOWN else "")
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= VALUE_SHOWN else text[:VALUE_SHOWN] + "…"


def _decoded(value: Any) -> Any:
    """A JSON object or list held in a string, decoded; anything else unchanged."""
    if isinstance(value, str) and value.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def resolve(output: Any, path: str) -> list[tuple[str, Any]]:
    """Every ``(concrete path, value)`` that ``path`` names in ``output``.

    A missing key or index gives one ``(path, MISSING)``; ``[]`` over an empty list gives no
    entry. A JSON string on the way (and at the end, when it is an object or list) is decoded.
    """
    found: list[tuple[str, Any]] = [("", output)]
    for step in parse_path(path):
        nxt: list[tuple[str, Any]] = []
        for where, value in found:
            value = _decoded(value)
            if value is MISSING:
                nxt.append((_join(where, step), MISSING))
            elif step is None:
                if isinstance(value, list):
                    nxt += [(f"{where}[{i}]", item) for i, item in enumerate(value)]
                else:
                    nxt.append((f"{where}[]", MISSING))
            elif isinstance(step, int):
                ok = isinstance(value, list) and step < len(value)
                nxt.append((f"{where}[{step}]", value[step] if ok else MISSING))
            else:
                ok = isinstance(value, dict) and step in value
                nxt.append((_join(where, step), value[step] if ok else MISSING))
        found = nxt
    return [(where or path, _decoded(value)) for where, value in found]


def _join(where: str, step: Any) -> str:
    if isinstance(step, int):
        return f"{where}[{step}]"
    if step is None:
        return f"{where}[]"
    return f"{where}.{step}" if where else str(step)


def _empty(value: Any) -> bool:
    return value is None or value is MISSING or value in ({}, []) or (
        isinstance(value, str) and not value.strip())


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and re.match(r"^https?://[^\s/]+", value.strip()) is not None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _bounds(check: Check, x: float, unit: str = "") -> str | None:
    if check.min is not None and x < check.min:
        return f"{x:g}{unit} is below the minimum {check.min:g}{unit}"
    if check.max is not None and x > check.max:
        return f"{x:g}{unit} is above the maximum {check.max:g}{unit}"
    return None


def _judge(check: Check, value: Any, url_status: Mapping[str, str | None]) -> str | None:
    """Why ``value`` fails ``check`` (None: it passes)."""
    if check.kind == "required":
        return "missing" if value is MISSING else "null" if value is None else None
    if value is MISSING:
        return "missing"
    if check.kind == "non_empty":
        return "empty" if _empty(value) else None
    if check.kind == "text_length":
        if not isinstance(value, str):
            return f"not text ({type(value).__name__})"
        return _bounds(check, len(value), " characters")
    if check.kind == "url":
        if not _is_url(value):
            return "not an http(s) URL"
        problem = url_status.get(value.strip(), "not checked")
        return None if problem is None else f"did not answer: {problem}"
    if check.kind == "duration":
        number = _number(value)
        if number is None:
            return "not a number"
        return _bounds(check, number * DURATION_UNITS[check.unit], "s")
    raise ValueError(f"unknown check kind {check.kind!r}")


def evaluate(output: Any, checks: Iterable[Check],
             url_status: Mapping[str, str | None] | None = None) -> Failure | None:
    """The first failure of ``output`` against ``checks``, or None when every check passes.

    ``url_status`` maps each URL of :func:`urls_to_probe` to None (it answered) or a short
    reason ("HTTP 404", "timed out"); a URL without an entry fails as "not checked".
    """
    status = url_status or {}
    for check in checks:
        for path in check.fields:
            entries = resolve(output, path)
            if not entries and check.kind != "required":
                return Failure(check.name, check.kind, path, [], "no items")
            for where, value in entries:
                reason = _judge(check, value, status)
                if reason is not None:
                    return Failure(check.name, check.kind, where, value, reason)
    return None


def urls_to_probe(output: Any, checks: Iterable[Check]) -> list[str]:
    """The distinct URLs that the ``url`` checks name in ``output``, in order."""
    urls: dict[str, None] = {}
    for check in checks:
        if check.kind != "url":
            continue
        for path in check.fields:
            for _, value in resolve(output, path):
                if _is_url(value):
                    urls[value.strip()] = None
    return list(urls)

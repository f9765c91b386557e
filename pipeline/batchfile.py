"""Reading a batch from a CSV or JSONL file: column ``task_id``, other columns are parameters.

Every problem is a :class:`BatchFileError` naming the file, the line and what is wrong, raised
before anything is queued, so a bad file never leaves half a batch behind.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable

from .errors import PipelineError

MAX_TASKS = 100_000


class BatchFileError(PipelineError):
    """The batch file cannot be used as it is."""


def read_batch_file(path: str | Path) -> list[dict[str, Any]]:
    """Return ``[{"task_key": str, "params": dict}]`` in file order."""
    p = Path(path)
    if not p.exists():
        raise BatchFileError(f"{p}: no such file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise BatchFileError(f"{p}: not UTF-8 text") from None
    kind = "jsonl" if p.suffix.lower() in (".jsonl", ".ndjson", ".json") else "csv"
    rows = _jsonl(p, text) if kind == "jsonl" else _csv(p, text)
    tasks = [_task(p, line, row) for line, row in rows]
    if not tasks:
        raise BatchFileError(f"{p}: no tasks in the file")
    if len(tasks) > MAX_TASKS:
        raise BatchFileError(f"{p}: {len(tasks)} tasks; at most {MAX_TASKS} per batch")
    seen: dict[str, int] = {}
    for i, t in enumerate(tasks):
        if t["task_key"] in seen:
            raise BatchFileError(f"{p}: task_id {t['task_key']!r} appears twice")
        seen[t["task_key"]] = i
    return tasks


def _csv(p: Path, text: str) -> Iterable[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "task_id" not in [f.strip() for f in reader.fieldnames]:
        raise BatchFileError(f"{p}: the header needs a task_id column "
                             f"(found: {', '.join(reader.fieldnames or []) or 'nothing'})")
    try:
        for row in reader:
            if None in row:
                raise BatchFileError(f"{p}:{reader.line_num}: more values than header columns")
            clean = {k.strip(): (v if v is not None else "") for k, v in row.items()}
            if not any(str(v).strip() for v in clean.values()):
                continue  # blank line
            yield reader.line_num, clean
    except csv.Error as exc:
        raise BatchFileError(f"{p}:{reader.line_num}: {exc}") from None


def _jsonl(p: Path, text: str) -> Iterable[tuple[int, dict[str, Any]]]:
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise BatchFileError(f"{p}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise BatchFileError(f"{p}:{n}: each line must be a JSON object")
        yield n, row


def _task(p: Path, line: int, row: dict[str, Any]) -> dict[str, Any]:
    key = row.get("task_id")
    if key is None or str(key).strip() == "":
        raise BatchFileError(f"{p}:{line}: task_id is empty")
    key = str(key).strip()
    if len(key) > 200:
        raise BatchFileError(f"{p}:{line}: task_id longer than 200 characters")
    params = {k: v for k, v in row.items() if k != "task_id"}
    return {"task_key": key, "params": params}


def select(tasks: list[dict[str, Any]], include: Iterable[str] | None = None,
           exclude: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Keep the included ids (all when none given), then drop the excluded; unknown ids raise."""
    known = {t["task_key"] for t in tasks}
    inc = _ids(include)
    exc = _ids(exclude)
    unknown = sorted((inc | exc) - known)
    if unknown:
        raise BatchFileError(f"unknown task_id in --include/--exclude: {', '.join(unknown[:10])}")
    return [t for t in tasks if (not inc or t["task_key"] in inc) and t["task_key"] not in exc]


def _ids(values: Iterable[str] | None) -> set[str]:
    out: set[str] = set()
    for v in values or ():
        out.update(x.strip() for x in str(v).split(",") if x.strip())
    return out

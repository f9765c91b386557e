"""The storage seam: SQL lives in ``storage/`` only; ``bot/`` and ``pipeline/`` call named
functions. A later backend (PostgreSQL) then has one package to implement.

The check reads every module's source: SQL statements in string literals and ``.execute(``,
``.executemany(``, ``.executescript(``, ``.query(`` calls or sqlite-utils table lookups
(``db["tasks"]``) fail the test, naming file and line.
"""
from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bot", "pipeline")

#: Modules that still hold SQL. Shrinks to empty; never grows.
ALLOWED: set[str] = set()

SQL_IN_STRING = re.compile(
    r"\bSELECT\b[\s\S]*?\bFROM\b|\bSELECT\s+(1|\d|COUNT|MAX|MIN|SUM)\b|\bINSERT\s+(OR\s+\w+\s+)?INTO\b"
    r"|\bUPDATE\s+\w+\s+SET\b|\bDELETE\s+FROM\b|\bCREATE\s+(UNIQUE\s+)?(TABLE|INDEX|VIEW|TRIGGER)\b"
    r"|\bPRAGMA\s+\w+|\bBEGIN\s+(IMMEDIATE|EXCLUSIVE|DEFERRED|TRANSACTION)\b|^\s*(COMMIT|ROLLBACK)\s*$"
    r"|\bON\s+CONFLICT\b|\bjson_each\s*\(|\bGROUP\s+BY\b|\bORDER\s+BY\s+\w+(\s+(ASC|DESC))?\s*(,|LIMIT|$)")
SQL_CALL = re.compile(r"\.(execute|executemany|executescript|query)\s*\(")
TABLE_LOOKUP = re.compile(r"""\bdb\s*\[\s*['"]\w+['"]\s*\]|\.table\(\s*['"]""")


def _docstring_lines(source: str) -> set[int]:
    """Lines of module/class/function docstrings: prose, not statements."""
    import ast
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def sql_findings(source: str) -> list[tuple[int, str]]:
    """(line, text) of every SQL string, SQL call or table lookup in ``source``."""
    found: list[tuple[int, str]] = []
    doc = _docstring_lines(source)
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for tok in tokens:
        if tok.type == tokenize.STRING and tok.start[0] not in doc:
            if SQL_IN_STRING.search(tok.string):
                found.append((tok.start[0], tok.string.strip()[:80]))
    code_lines = source.splitlines()
    for i, line in enumerate(code_lines, start=1):
        code = line.split("#", 1)[0]
        if i in doc:
            continue
        if SQL_CALL.search(code) or TABLE_LOOKUP.search(code):
            found.append((i, line.strip()[:80]))
    return found


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_no_sql_outside_storage(path: Path) -> None:
    if _name(path) in ALLOWED:
        pytest.skip("still on the allow-list of modules holding SQL")
    found = sql_findings(path.read_text(encoding="utf-8"))
    assert not found, f"{_name(path)} holds SQL; move it into a storage/ function:\n" + "\n".join(
        f"  line {n}: {text}" for n, text in found)


def test_allow_list_only_names_modules_that_still_hold_sql() -> None:
    """An allowed module that no longer holds SQL must leave the list (so it cannot regress)."""
    for name in ALLOWED:
        path = ROOT / name
        assert path.exists(), f"{name} is on the allow-list but does not exist"
        assert sql_findings(path.read_text(encoding="utf-8")), f"{name} is clean; drop it from ALLOWED"


@pytest.mark.parametrize("snippet", [
    'db.execute("SELECT 1")',
    'x = "SELECT id FROM tasks WHERE status = ?"',
    'x = ("UPDATE tasks SET status = ?"\n     " WHERE id = ?")',
    'x = "INSERT OR IGNORE INTO inbox (key) VALUES (?)"',
    "x = 'DELETE FROM outbox WHERE id = ?'",
    'x = f"PRAGMA busy_timeout = {n}"',
    'rows = db.query(sql)',
    'db["tasks"].insert({})',
    'conn.executemany(sql, rows)',
])
def test_the_check_catches_sql(snippet: str) -> None:
    assert sql_findings(snippet + "\n")


@pytest.mark.parametrize("snippet", [
    '"""Select a task and update its row (one INSERT, no PRAGMA)."""\n',
    'card = execute(ctx, cmd)\n',
    'text = "Select the batch to update"\n',
    'x = settings["tasks"]\n',
    '# db.execute("SELECT 1")\n',
])
def test_the_check_leaves_prose_and_other_calls_alone(snippet: str) -> None:
    assert not sql_findings(snippet)


def test_column_and_stage_names_never_reach_sql_unchecked(db_path) -> None:
    """The two seam functions that put a name into SQL text refuse anything but known names."""
    from storage import queue, reports
    from storage.db import open_db

    db = open_db(db_path)
    batch_id = queue.create_batch(db, [{"task_key": "k1", "params": {}}], now=1.0, source="chat")
    assert queue.batch_field(db, batch_id, "source") == "chat"
    assert queue.batch_field(db, "b-missing", "status") is None
    with pytest.raises(ValueError):
        queue.batch_field(db, batch_id, "status FROM batches; --")
    assert reports.task_stage_seconds(db, "coze", 0.0, 10.0) == []
    with pytest.raises(ValueError):
        reports.task_stage_seconds(db, "coze_seconds FROM tasks; --", 0.0, 10.0)

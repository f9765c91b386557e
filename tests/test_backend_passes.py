"""The two backend passes (tests/conftest.py): which tests each pass selects, and the check that
a test's store goes through the ``db_path`` fixture. Each case runs pytest on a small generated
suite that uses this project's conftest, in a process of its own."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SUITE = textwrap.dedent('''
    import sqlite3, subprocess, sys

    import pytest

    from storage import kv
    from storage.db import open_db


    def test_no_store():
        assert 1 + 1 == 2


    def test_through_the_fixture(db):
        kv.put(db, "k", "v", now=1)
        assert kv.get(db, "k") == "v"


    def test_a_store_of_its_own(tmp_path):
        open_db(tmp_path / "own.db").conn.close()


    def test_raw_sqlite(tmp_path):
        sqlite3.connect(str(tmp_path / "raw.db")).close()


    def test_a_process_with_a_store_of_its_own(tmp_path):
        env = {"OPSBOT_DB": str(tmp_path / "child.db")}
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)


    @pytest.mark.backend("sqlite", reason="about a SQLite file")
    def test_marked_sqlite(tmp_path):
        open_db(tmp_path / "marked.db").conn.close()


    @pytest.mark.backend("postgresql")
    def test_marked_postgresql(db_path):
        assert str(db_path).startswith("postgresql://")
''')


def _pytest(tmp_path, backend, *args):
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    backend: one pass only\n")
    (tmp_path / "test_suite.py").write_text(SUITE)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "OPSBOT_TEST_BACKEND")}
    env.update(PYTHONPATH=str(ROOT), OPSBOT_TEST_BACKEND=backend)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA",
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_sqlite_pass_fails_a_test_that_opens_a_store_around_db_path(tmp_path):
    out = _pytest(tmp_path, "sqlite").stdout
    for name in ("test_no_store", "test_through_the_fixture", "test_marked_sqlite"):
        assert f"PASSED test_suite.py::{name}" in out, out
    errors = out.split("= ERRORS =")[1].split("= PASSES =")[0]
    for name, seen in (("test_a_store_of_its_own", "/own.db)"), ("test_raw_sqlite", "/raw.db)"),
                       ("test_a_process_with_a_store_of_its_own", "OPSBOT_DB=")):
        assert f"ERROR test_suite.py::{name} - Failed: this te" in out, out
        [section] = [s for s in errors.split("ERROR at teardown of ")[1:] if s.startswith(name)]
        assert "this test opened a store without the db_path fixture (" in section
        assert seen in section
    assert "test_marked_postgresql" not in out.split("short test summary")[-1]
    assert "sqlite pass: deselected 1 PostgreSQL-only" in out


def test_the_postgresql_pass_selects_the_tests_that_use_a_store(tmp_path):
    out = _pytest(tmp_path, "postgresql", "--collect-only", "-q").stdout
    selected = sorted(line.split("::")[1] for line in out.splitlines() if "::" in line)
    assert selected == ["test_marked_postgresql", "test_through_the_fixture"], out
    assert "postgresql pass: deselected 1 SQLite-only, 4 that use no store" in out


def test_an_unknown_backend_is_refused(tmp_path):
    proc = _pytest(tmp_path, "mysql", "--collect-only")
    assert proc.returncode != 0
    assert "OPSBOT_TEST_BACKEND='mysql': expected one of" in proc.stdout + proc.stderr

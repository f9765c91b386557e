"""Shared fixtures: the store of a test (a SQLite file, or a PostgreSQL database in the
PostgreSQL pass); the fake Feishu's strictness; which tests run in which backend pass.

The suite runs once per store backend (see README, Development):

- ``python -m pytest``: the SQLite pass, every test.
- ``OPSBOT_TEST_BACKEND=postgresql python -m pytest``: the PostgreSQL pass. Every test that uses
  a store runs again, its ``db_path`` a new database on the test PostgreSQL server
  (tests/pg_server.py), copied from a migrated template (see ``db_path``). Tests that use no store are deselected: running them twice proves
  nothing.

"Uses a store" is decided by the fixtures a test takes: ``db_path`` (directly, or through
``db``, ``settings``... which take it) or ``make_db_path`` (for fixtures wider than a test).
That choice is checked, not trusted: while a test runs, an audit hook sees every SQLite
connection the test process opens and every process started with ``OPSBOT_DB``. A test that
opens a store without taking ``db_path`` fails (it would silently never run on PostgreSQL),
and so does a test that opens SQLite in the PostgreSQL pass. The few tests that are about one
backend itself carry ``@pytest.mark.backend("sqlite", reason=...)`` or
``@pytest.mark.backend("postgresql")`` and run in that pass only.
"""
from __future__ import annotations

import os
import sys

import pytest

from bot.standins.fake_feishu import unexpected_refusals
from storage.db import open_db

BACKENDS = ("sqlite", "postgresql")
_NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
BACKEND = os.environ.get("OPSBOT_TEST_BACKEND", "sqlite") or "sqlite"


def _cjk_font_missing() -> str | None:
    """Why no CJK font is found for burned subtitles, or None when there is one."""
    from pipeline.errors import SynthesisError
    from pipeline.video import fonts
    try:
        fonts.find_font()
    except SynthesisError as exc:
        return exc.message
    return None


def pytest_configure(config):
    if BACKEND not in BACKENDS:
        raise pytest.UsageError(f"OPSBOT_TEST_BACKEND={BACKEND!r}: expected one of {BACKENDS}")
    config._opsbot_backend_deselected = {}
    sys.addaudithook(_audit)


def pytest_report_header(config):
    if BACKEND == "postgresql":
        return ("store backend: postgresql (tests that use no store are deselected; "
                "they run in the SQLite pass)")
    return "store backend: sqlite (OPSBOT_TEST_BACKEND=postgresql runs the PostgreSQL pass)"


STORE_FIXTURES = ("db_path", "make_db_path")


def uses_store(item) -> bool:
    """Whether ``item`` takes a store fixture (directly or through another fixture)."""
    return any(name in getattr(item, "fixturenames", ()) for name in STORE_FIXTURES)


def _left_out(item) -> str:
    """Why this pass leaves ``item`` out ("" when it runs here)."""
    marker = item.get_closest_marker("backend")
    if marker is not None:
        return "" if BACKEND in marker.args else f"{_NAMES[marker.args[0]]}-only"
    return "" if BACKEND == "sqlite" or uses_store(item) else "that use no store"


def pytest_collection_modifyitems(config, items):
    """Select this backend pass's tests (see the module docstring). Tests that burn Chinese
    subtitles need a CJK font (``.ci/run`` installs one): without it they skip with the reason
    on a developer's machine, and fail in CI (CI=true), where a skip would hide that the
    subtitles were never tested."""
    why = {item.nodeid: _left_out(item) for item in items}
    dropped = [item for item in items if why[item.nodeid]]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        for item in dropped:
            counts = config._opsbot_backend_deselected
            counts[why[item.nodeid]] = counts.get(why[item.nodeid], 0) + 1
        items[:] = [item for item in items if not why[item.nodeid]]
    marked = [item for item in items if item.get_closest_marker("cjk_font")]
    if not marked or os.environ.get("CI", "").lower() == "true":
        return
    missing = _cjk_font_missing()
    if missing:
        skip = pytest.mark.skip(reason=f"no CJK font for burned subtitles: {missing}")
        for item in marked:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, config):
    counts = getattr(config, "_opsbot_backend_deselected", {})
    if counts:
        parts = ", ".join(f"{n} {why}" for why, n in sorted(counts.items()))
        terminalreporter.write_line(f"{BACKEND} pass: deselected {parts}")


# --- the check that a test's store goes through ``db_path`` ---------------------------------------

_seen: list[str] | None = None   # what the running test opened (None between tests)


def _audit(event: str, args: tuple) -> None:
    if _seen is None:
        return
    if event == "sqlite3.connect":
        _seen.append(f"sqlite3.connect({args[0]!s})")
    elif event == "subprocess.Popen" and args[3] is not None:   # an environment of its own
        store = args[3].get("OPSBOT_DB")
        if store:
            _seen.append(f"a process started with OPSBOT_DB={store}")


@pytest.fixture(autouse=True)
def store_goes_through_db_path(request):
    """Fail a test that opens a store the backend passes cannot see (see the module docstring).
    The Python SQLite module is what the store's SQLite side uses, so a connection of it in the
    PostgreSQL pass is SQLite under test; in the SQLite pass it is fine where the test took
    ``db_path``."""
    global _seen
    item = request.node
    marked = item.get_closest_marker("backend") is not None
    _seen = []
    try:
        yield
    finally:
        seen, _seen = _seen, None
    if marked or not seen:
        return
    if BACKEND == "postgresql":
        bad = [s for s in seen if "postgresql://" not in s and "postgres://" not in s]
        if bad:
            pytest.fail("this test used SQLite in the PostgreSQL pass (" + "; ".join(bad[:3])
                        + "): give it the store from the db_path fixture, or mark it "
                        "@pytest.mark.backend('sqlite', reason=...)", pytrace=False)
    elif not uses_store(item):
        pytest.fail("this test opened a store without the db_path fixture (" + "; ".join(seen[:3])
                    + "), so the PostgreSQL pass would skip it: take db_path (or db), or mark "
                    "it @pytest.mark.backend('sqlite', reason=...)", pytrace=False)


@pytest.fixture
def db_path(request, tmp_path):
    """The store of a test: a SQLite file path in the SQLite pass; in the PostgreSQL pass
    (``OPSBOT_TEST_BACKEND=postgresql``) the URL of a database on the test PostgreSQL
    server (tests/pg_server.py: skipped with the reason when there is none, failed with
    ``CI=true``). Pass ``str(db_path)`` as ``OPSBOT_DB`` to processes a test starts.

    The PostgreSQL database is a copy of a template that already holds every migration
    (copying is faster than migrating each test's store), so ``open_db`` finds nothing to
    migrate. A test about migrating or an unopened store carries
    ``@pytest.mark.empty_database`` and gets an empty database instead, as the SQLite pass's
    new file is (``tests.helpers.store_at_version`` refuses a store that is not empty)."""
    if BACKEND == "postgresql":
        from tests.pg_server import fresh_database, migrated_template, server_url
        server = server_url(request)
        if request.node.get_closest_marker("empty_database"):
            return fresh_database(server)
        return fresh_database(server, migrated_template(request, server))
    return tmp_path / "opsbot.db"


@pytest.fixture(scope="session")
def make_db_path(request, tmp_path_factory):
    """``make_db_path()`` gives a new store, as ``db_path`` does, for fixtures wider than one
    test (a gunicorn started once per module)."""
    def make():
        if BACKEND == "postgresql":
            from tests.pg_server import fresh_database, migrated_template, server_url
            server = server_url(request)
            return fresh_database(server, migrated_template(request, server))
        return tmp_path_factory.mktemp("store") / "opsbot.db"
    return make


@pytest.fixture
def db(db_path):
    database = open_db(db_path)
    yield database
    database.conn.close()


@pytest.fixture(autouse=True)
def feishu_refuses_nothing():
    """Fail the test during which a fake Feishu refused a card (as real Feishu would have),
    unless the test took the refusal itself with ``FakeFeishu.take_refusals()``."""
    unexpected_refusals()  # refusals of fakes outliving an earlier test are that test's
    yield
    refused = unexpected_refusals()
    if refused:
        lines = [f"{r['route']} to {r['chat_id'] or r['message_id']}: {r['code']} "
                 f"{'; '.join(r['violations'][:5])}" for r in refused]
        pytest.fail("the fake Feishu refused card(s) the bot sent:\n" + "\n".join(lines),
                    pytrace=False)

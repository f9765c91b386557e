"""Shared fixtures: real SQLite files in a temporary folder; the fake Feishu's strictness."""
from __future__ import annotations

import os

import pytest

from bot.standins.fake_feishu import unexpected_refusals
from storage.db import open_db


def _cjk_font_missing() -> str | None:
    """Why no CJK font is found for burned subtitles, or None when there is one."""
    from pipeline.errors import SynthesisError
    from pipeline.video import fonts
    try:
        fonts.find_font()
    except SynthesisError as exc:
        return exc.message
    return None


def pytest_collection_modifyitems(config, items):
    """Tests that burn Chinese subtitles need a CJK font (``.ci/run`` installs one). Without it
    they skip with the reason on a developer's machine, and fail in CI (CI=true), where a skip
    would hide that the subtitles were never tested."""
    marked = [item for item in items if item.get_closest_marker("cjk_font")]
    if not marked or os.environ.get("CI", "").lower() == "true":
        return
    missing = _cjk_font_missing()
    if missing:
        skip = pytest.mark.skip(reason=f"no CJK font for burned subtitles: {missing}")
        for item in marked:
            item.add_marker(skip)


@pytest.fixture
def db_path(request, tmp_path):
    """The store of a test: a SQLite file; with ``OPSBOT_TEST_BACKEND=postgresql``, an empty
    database on the test PostgreSQL server instead (see tests/pg_server.py)."""
    if os.environ.get("OPSBOT_TEST_BACKEND", "sqlite") == "postgresql":
        from tests.pg_server import fresh_database, server_url
        return fresh_database(server_url(request))
    return tmp_path / "opsbot.db"


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


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_path(request, tmp_path):
    """Where a store lives, once per backend: a SQLite file, then an empty PostgreSQL database
    (see tests/pg_server.py; skipped with the reason when no server is available)."""
    if request.param == "sqlite":
        return tmp_path / "opsbot.db"
    from tests.pg_server import fresh_database, server_url
    return fresh_database(server_url(request))

"""Shared fixtures: real SQLite files in a temporary folder."""
from __future__ import annotations

import pytest

from storage.db import open_db


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "opsbot.db"


@pytest.fixture
def db(db_path):
    database = open_db(db_path)
    yield database
    database.conn.close()

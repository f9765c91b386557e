"""Test helpers. The Feishu request builders live in :mod:`bot.devtools` (``opsbot demo`` uses
them too) and are re-exported here, so tests keep importing ``tests.helpers``."""
from __future__ import annotations

from bot.devtools import *  # noqa: F401,F403
from bot.devtools import (ADMIN, CHAT, ENCRYPT_KEY, TOKEN, USER, _ids,  # noqa: F401
                          card_action_event, encrypt, legacy_card_action, message_event, sign,
                          sign_legacy, signed_event, url_verification)


def table_counts(db) -> dict[str, int]:
    """Rows per table that a rejected request must never touch."""
    return {name: db.execute(f"SELECT COUNT(*) FROM {name}").fetchone()[0]
            for name in ("inbox", "outbox", "batches", "tasks", "silences")}

"""Test helpers. The Feishu request builders live in :mod:`bot.standins.events` (``opsbot demo`` uses
them too) and are re-exported here, so tests keep importing ``tests.helpers``."""
from __future__ import annotations

import re

from bot.standins.card_rules import check_answer
from bot.standins.events import *  # noqa: F401,F403
from bot.standins.events import (ADMIN, CHAT, DIRECTORY, ENCRYPT_KEY, TOKEN, USER, _ids,  # noqa: F401
                          card_action_event, encrypt, legacy_card_action, message_event, sign,
                          sign_legacy, signed_event, url_verification)


def table_counts(db) -> dict[str, int]:
    """Rows per table that a rejected request must never touch."""
    return {name: db.execute(f"SELECT COUNT(*) FROM {name}").fetchone()[0]
            for name in ("inbox", "outbox", "batches", "tasks", "silences")}


_MARKUP = re.compile(r"&#?[0-9A-Za-z]+;|\*\*|`")


def checked_answer(answer):
    """``answer`` (a card-callback answer) after asserting Feishu would take it: the same rules
    as the fake Feishu applies to cards (:func:`bot.standins.card_rules.check_answer`, mentions of the
    fake's directory only, no ``<at id=all>``), and a toast that is plain text (Feishu shows
    toast content as typed: no markdown, no entities). Tests that press buttons call this."""
    problems = [str(v) for v in check_answer(answer, users=DIRECTORY)]
    content = ((answer or {}).get("toast") or {}).get("content") or ""
    if _MARKUP.search(content):
        problems.append(f"toast is not plain text: {content!r}")
    assert not problems, f"Feishu would refuse or mis-show this answer: {problems}"
    return answer

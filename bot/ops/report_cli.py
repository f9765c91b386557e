"""``opsbot report [--date YYYY-MM-DD] [--send] [--pipeline NAME]``: print the daily report, or
send it. With ``--pipeline``, the report of that pipeline's batches, sent to its alert chat.

Without ``--date`` the report is for yesterday in ``settings.timezone``. With ``--send`` the card
is enqueued in the outbox for the alert chat and delivered at once by the real outbox sender.

Exit codes: 0 done; 1 sending was asked for but Feishu is not configured or the send failed
(the message says which and what to set); 2 a malformed ``--date``.
"""
from __future__ import annotations

import sys
import time as _time
from datetime import date as Date
from typing import TextIO

from pipeline.clock import Clock
from storage import outbox
from storage.db import open_db

from bot.alerting.report import (compute_report, mark_sent, parse_day,  # noqa: F401 - parse_day: was here
                                 report_card, report_text)

SEND_TIMEOUT = 20.0   # seconds to wait for the card to go out (rate limits postpone it)


def run_report(settings, *, date: str | None, send: bool, clock=None, out: TextIO | None = None,
               err: TextIO | None = None, feishu_client=None,
               send_timeout: float = SEND_TIMEOUT, pipeline: str | None = None) -> int:
    """Print the report for ``date`` (default yesterday); with ``send``, post it. Exit code."""
    out, err, clock = out or sys.stdout, err or sys.stderr, clock or Clock()
    try:
        day = parse_day(date, settings, clock.now())
    except ValueError as exc:
        print(f"opsbot report: {exc}", file=err)
        return 2
    only = None
    if pipeline is not None:
        spec = settings.find_pipeline(pipeline)
        if spec is None:
            names = ", ".join(s.name for s in settings.pipelines)
            print(f"opsbot report: no pipeline is called {pipeline!r} (pipelines: {names})",
                  file=err)
            return 2
        settings, only = settings.scoped(spec.name), (spec.name,)
    if send:
        # with --pipeline the chat is the pipeline's alert_chat_id (whose default is
        # FEISHU_ALERT_CHAT_ID): name what to set for that pipeline
        chat_key = ("FEISHU_ALERT_CHAT_ID" if only is None or only[0] == "default" else
                    f"alert_chat_id in the [[pipelines]] entry {only[0]!r} (or "
                    f"FEISHU_ALERT_CHAT_ID, its default)")
        missing = [n for n, v in (("FEISHU_APP_ID", settings.feishu.app_id),
                                  ("FEISHU_APP_SECRET", settings.feishu.app_secret),
                                  (chat_key, settings.feishu.alert_chat_id)) if not v]
        if missing:
            print(f"opsbot report --send: Feishu is not configured; set {', '.join(missing)}",
                  file=err)
            return 1
    db = open_db(settings.db_path)
    try:
        report = compute_report(db, day, settings.tz, only)
        out.write(report_text(report, settings.language))
        if not send:
            return 0
        return _send(db, settings, report_card(report, settings.language), day, clock, err,
                     feishu_client, send_timeout)
    finally:
        db.conn.close()


def _send(db, settings, card, day: Date, clock, err: TextIO, feishu_client,
          send_timeout: float) -> int:
    from bot.feishu.client import FeishuClient
    from bot.feishu.sender import OutboxSender
    from pipeline.worker import make_owner

    now = clock.now()
    uid = outbox.enqueue(db, "send", settings.feishu.alert_chat_id, {"card": card}, now=now,
                         ref=f"report:{day.isoformat()}")
    # Only this row: other due rows (alerts, Bitable writes) belong to the worker, which has
    # the notifier and the per-table writer; a CLI run must not deliver them on the side.
    sender = OutboxSender(db, feishu_client or FeishuClient(settings.feishu), clock=clock,
                          owner=make_owner(), uuids=(uid,))
    deadline = _time.monotonic() + send_timeout
    while True:
        sender.deliver_due()
        status, error, next_at = outbox.row_state(db, uid)
        if status == "sent":
            mark_sent(db, now=clock.now())
            return 0
        if status == "dead" or _time.monotonic() >= deadline:
            print(f"opsbot report --send: sending to {settings.feishu.alert_chat_id} failed: "
                  f"{error or 'timed out'}", file=err)
            if status != "dead":  # do not let the worker send it later, unasked
                outbox.mark_dead(db, _row_id(db, uid), now=clock.now(),
                                 error=f"report --send gave up: {error}")
            return 1
        _time.sleep(min(1.0, max(0.05, next_at - clock.now())))


def _row_id(db, uid: str) -> int:
    return outbox.id_of(db, uid)

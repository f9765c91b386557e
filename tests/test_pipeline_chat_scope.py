"""Many pipelines, seen from the chats: commands without a batch id act on the pipelines of the
chat they come from, and a command about one pipeline's alert needs that pipeline's admins.
Three chats' worth of people on two Coze accounts, through the real parser and handlers, the
fake Feishu over loopback with the real lark-oapi client, real SQLite (the ``world`` of
tests/test_many_pipelines.py)."""
from __future__ import annotations

import io
import time

from bot.feishu.client import FeishuClient
from bot.service import build_notifier
from pipeline.clock import Clock
from storage import breakers, queue
from storage import alerts as store_alerts
from tests.test_many_pipelines import (DRAMA_ADMIN, NEWS_ADMIN, _finished, card_text,  # noqa: F401
                                       say, world)


def _task(db, batch_id: str, key: str) -> dict:
    [task] = [t for t in queue.tasks_of(db, batch_id) if t["task_key"] == key]
    return task


def test_retry_of_a_task_key_in_a_pipelines_chat_takes_that_pipelines_task(db, world):
    """Bitable row ids are numbers in every table: task "7" exists in both pipelines. In the
    news chat, `retry 7` is news's task 7, even when drama's task 7 is newer."""
    fake, gate, settings, loop = world
    client = FeishuClient(settings.feishu)
    at = time.time() - 100
    news = _finished(db, "news", ["7", "8"], failed={"7"}, at=at)
    drama = _finished(db, "drama", ["7"], failed={"7"}, at=at + 10)     # the newer "7"
    n = [0]
    reply = card_text(say(db, settings, client, "retry 7", chat="oc_news", sender=NEWS_ADMIN,
                          n=n))
    assert "没有权限" not in reply, reply
    assert _task(db, news, "7")["status"] == "queued"
    assert _task(db, drama, "7")["status"] == "failed"
    # drama's admin in drama's chat gets drama's task
    say(db, settings, client, "重试 7", chat="oc_drama", sender=DRAMA_ADMIN, n=n)
    assert _task(db, drama, "7")["status"] == "queued"
    # outside any pipeline's chat a key still names the newest task with it (as before)
    other = _finished(db, "news", ["9"], failed={"9"}, at=at + 20)
    say(db, settings, client, "retry 9", chat="oc_elsewhere", sender=NEWS_ADMIN, n=n)
    assert _task(db, other, "9")["status"] == "queued"
    # a key only the other pipeline has is not found in this chat, and nothing moves
    lone = _finished(db, "drama", ["d-only"], failed={"d-only"}, at=at + 30)
    reply = card_text(say(db, settings, client, "retry d-only", chat="oc_news",
                          sender=NEWS_ADMIN, n=n))
    assert "找不到任务" in reply and _task(db, lone, "d-only")["status"] == "failed"


def test_resume_without_a_batch_in_a_pipelines_chat_resumes_only_that_chats_batches(db, world):
    """`resume` alone in the news chat must not resume drama's blocked batch (news's admin is
    no admin of drama), nor close the breaker of drama's Coze account."""
    fake, gate, settings, loop = world
    client = FeishuClient(settings.feishu)
    now = time.time()
    drama = queue.create_batch(db, [{"task_key": "d1"}], now=now - 50, source="chat",
                               pipeline="drama")
    queue.set_batch_status(db, drama, "blocked", now=now - 40, reason="4100: token")
    breakers.put(db, service="coze:alpha", state="open", failures=1, successes=0,
                 opened_at=now - 40, reason="4100: token", submit_failures=0, now=now - 40)
    n = [0]
    reply = card_text(say(db, settings, client, "resume", chat="oc_news", sender=NEWS_ADMIN,
                          n=n))
    assert queue.get_batch(db, drama)["status"] == "blocked", reply
    assert dict(breakers.states(db))["coze:alpha"] == "open", reply
    assert "无需恢复" in reply, reply       # nothing stopped in news, news's breaker closed
    # news's own paused batch is what `resume` there resumes
    news = queue.create_batch(db, [{"task_key": "n1"}], now=now - 30, source="chat",
                              pipeline="news")
    queue.set_batch_status(db, news, "paused", now=now - 20)
    say(db, settings, client, "恢复", chat="oc_news", sender=NEWS_ADMIN, n=n)
    assert queue.get_batch(db, news)["status"] == "running"
    assert queue.get_batch(db, drama)["status"] == "blocked"
    assert dict(breakers.states(db))["coze:alpha"] == "open"
    # in drama's chat, drama's admin resumes drama's blocked batch: alpha's breaker closes
    say(db, settings, client, "resume", chat="oc_drama", sender=DRAMA_ADMIN, n=n)
    assert queue.get_batch(db, drama)["status"] == "running"
    assert dict(breakers.states(db))["coze:alpha"] == "closed"


def test_resume_of_a_running_batch_closes_only_its_accounts_breaker(db, world):
    """`resume BATCH` of a batch that is not stopped, with breakers open and nothing blocked,
    closes the breakers so that new batches run: with several pipelines, only the batch's
    account's breaker."""
    fake, gate, settings, loop = world
    client = FeishuClient(settings.feishu)
    now = time.time()
    news = queue.create_batch(db, [{"task_key": "n1"}], now=now - 30, source="chat",
                              pipeline="news")
    for service in ("coze:alpha", "coze:beta"):
        breakers.put(db, service=service, state="open", failures=5, successes=0,
                     opened_at=now - 40, reason="5000: server error", submit_failures=0,
                     now=now - 40)
    say(db, settings, client, f"resume {news}", chat="oc_news", sender=NEWS_ADMIN, n=[0])
    states = dict(breakers.states(db))
    assert states["coze:beta"] == "closed" and states["coze:alpha"] == "open"


def test_silencing_another_pipelines_alert_needs_that_pipelines_admin(db, world):
    """The Silence button on drama's card needs drama's admin; so does `silence KEY` typed in
    the news chat."""
    fake, gate, settings, loop = world
    client = FeishuClient(settings.feishu)
    drama = _finished(db, "drama", ["d1"], failed={"d1"}, at=time.time() - 60)
    _, router = build_notifier(db, settings, Clock())
    key = f"{drama}:coze:bad_request"
    router.raise_alert(key, "MEDIUM", {"kind": "task_failed", "batch_id": drama},
                       batch_id=drama)
    assert store_alerts.get(db, key)["details"]["pipeline"] == "drama"
    n = [0]
    refused = card_text(say(db, settings, client, f"silence {key} 2h", chat="oc_news",
                            sender=NEWS_ADMIN, n=n))
    assert "没有权限" in refused and DRAMA_ADMIN in refused, refused
    assert not store_alerts.active_silences(db, time.time())
    # a pipeline's own alert key (failure_rate:drama), by name
    refused = card_text(say(db, settings, client, "silence failure_rate:drama", chat="oc_news",
                            sender=NEWS_ADMIN, n=n))
    assert "没有权限" in refused, refused
    say(db, settings, client, f"静默 {key} 2h", chat="oc_news", sender=DRAMA_ADMIN, n=n)
    assert [k for k, _ in store_alerts.active_silences(db, time.time())] == [key]


def test_report_send_with_a_pipeline_names_its_chat_setting(db, world):
    """`opsbot report --send --pipeline news` when news has no alert chat names the TOML key
    to set, not FEISHU_ALERT_CHAT_ID."""
    import dataclasses

    from bot.ops.report_cli import run_report
    fake, gate, settings, loop = world
    specs = tuple(dataclasses.replace(s, alert_chat_id="") if s.name == "news" else s
                  for s in settings.listed_pipelines)
    settings = dataclasses.replace(settings, listed_pipelines=specs)
    out, err = io.StringIO(), io.StringIO()
    assert run_report(settings, date="2026-03-01", send=True, out=out, err=err,
                      pipeline="news") == 1
    assert "set alert_chat_id in the [[pipelines]] entry 'news'" in err.getvalue(), \
        err.getvalue()
    # without --pipeline (and one pipeline) the message is as before
    out, err = io.StringIO(), io.StringIO()
    assert run_report(settings.scoped("news"), date="2026-03-01", send=True, out=out,
                      err=err) == 1
    assert err.getvalue().rstrip().endswith("set FEISHU_ALERT_CHAT_ID"), err.getvalue()


def test_plain_run_in_a_chat_shared_by_two_pipelines_asks_which(db, world):
    """Two pipelines report to one chat: `run` there does not guess; it lists the names (in
    Chinese, or English with language = en) and creates nothing. `run NAME` runs that one."""
    import dataclasses

    from bot.settings import PipelineSpec
    fake, gate, settings, loop = world
    fake.seed_records("bascApp", "tblSports", [{"task_id": "s1", "状态": "待处理"}])
    sports = PipelineSpec(name="sports", workflow_id="wf-sports", coze_account="alpha",
                          aliases=("体育",), bitable_app_token="bascApp",
                          bitable_table_id="tblSports", alert_chat_id="oc_news",
                          admin_ids=(NEWS_ADMIN,))
    settings = dataclasses.replace(settings,
                                   listed_pipelines=(*settings.listed_pipelines, sports))
    client = FeishuClient(settings.feishu)
    n = [0]
    which = card_text(say(db, settings, client, "运行", chat="oc_news", sender=NEWS_ADMIN, n=n))
    assert "请指定一条" in which and "news" in which and "sports &#40;体育&#41;" in which, which
    assert queue.list_batches(db) == []
    english = dataclasses.replace(settings, language="en")
    which = card_text(say(db, english, client, "run", chat="oc_news", sender=NEWS_ADMIN, n=n))
    assert "say which" in which and "sports" in which, which
    assert queue.list_batches(db) == []
    say(db, settings, client, "运行 体育", chat="oc_news", sender=NEWS_ADMIN, n=n)
    [batch] = queue.list_batches(db)
    assert batch["pipeline"] == "sports" and batch["workflow_id"] == "wf-sports"
    assert [t["task_key"] for t in queue.tasks_of(db, batch["id"])] == ["s1"]

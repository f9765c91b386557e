"""Many pipelines end to end: two [[pipelines]] on two Coze accounts (two tokens), run from their
chats through the real handlers and the fake Feishu, worked by the real worker against the Coze
simulator (behind a gate that accepts both accounts' tokens and records which token made each
request), with real SQLite. Each account's run limit and QPS budget hold, each pipeline's
alerts reach its own chat, and a bad token stops only the pipelines on its account."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest
from aiohttp import web
from multidict import CIMultiDict

from bot.chat.commands import parse
from bot.feishu.client import FeishuClient
from bot.chat.handlers import Context, execute, pipeline_words
from bot.service import build_notifier, open_routing
from bot.settings import load_settings
from pipeline.clock import Clock
from pipeline.standins.simulator import CozeSimulator, Script, max_in_window
from pipeline.worker import Worker
from storage import breakers, queue
from tests.fake_feishu import FakeFeishu

APP = "bascApp"
TOKENS = {"alpha": "pat_alpha_token", "beta": "pat_beta_token"}
LIMITS = {"alpha": (2, 10), "beta": (3, 15)}           # (max_runs, qps)
DRAMA_ADMIN, NEWS_ADMIN, NEWS_ONCALL = "ou_drama_admin", "ou_news_admin", "ou_news_oncall"


class TwoAccountCoze:
    """The simulator behind a gate that accepts each account's token (as Coze does for two
    accounts) and refuses any other with 401 / 4100. It records the token of every request
    (at arrival) and the token of every run it created."""

    def __init__(self, sim: CozeSimulator, tokens: dict[str, str]) -> None:
        self.sim = sim
        self.tokens = {token: name for name, token in tokens.items()}
        self.revoked: set[str] = set()
        self.calls: list[tuple[str, str, float]] = []       # (account, path, arrived)
        self.run_account: dict[str, str] = {}              # execute_id -> account
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    @web.middleware
    async def gate(self, request: web.Request, handler):
        arrived = time.time()
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        account = self.tokens.get(token, "?")
        self.calls.append((account, request.path, arrived))
        if account == "?" or account in self.revoked:
            return web.json_response({"code": 4100, "msg": "authentication is invalid"},
                                     status=401)
        headers = CIMultiDict(request.headers)
        headers["Authorization"] = f"Bearer {self.sim.token}"
        response = await handler(request.clone(headers=headers))
        if request.path == "/v1/workflow/run" and response.status == 200:
            execute_id = json.loads(response.body).get("execute_id")
            if execute_id:
                self.run_account[str(execute_id)] = account
        return response

    async def start(self) -> str:
        app = web.Application(middlewares=[self.gate, self.sim._record])
        app.router.add_post("/v1/workflow/run", self.sim._handle_run)
        app.router.add_get("/v1/workflows/{workflow_id}/run_histories/{execute_id}",
                           self.sim._handle_history)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- what was recorded -----------------------------------------------------------------

    def peak_in_flight(self, account: str | None = None) -> int:
        """The most runs of ``account`` (None: of both) running at once at Coze."""
        edges = []
        for execute_id, run in self.sim.runs.items():
            if account is None or self.run_account.get(execute_id) == account:
                edges += [(run.submitted, 1), (run.submitted + run.duration, -1)]
        peak = now = 0
        for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
            now += step
            peak = max(peak, now)
        return peak

    def max_rps(self, account: str | None = None, window: float = 1.0) -> int:
        return max_in_window([t for a, _, t in self.calls if account is None or a == account],
                             window)


def write_config(tmp_path, base_url: str) -> dict[str, str]:
    """Two accounts and two pipelines; returns the environment for load_settings."""
    (a_runs, a_qps), (b_runs, b_qps) = LIMITS["alpha"], LIMITS["beta"]
    cfg = tmp_path / "opsbot.toml"
    cfg.write_text(f"""
[pipeline]
max_coze = 16
skip_synthesis = true
idle_interval = 0.02
lease_seconds = 5
output_dir = "{tmp_path / 'out'}"
[pipeline.poll]
first = 0.05
multiplier = 1.5
maximum = 0.1
[pipeline.retry]
max_attempts = 4
initial = 0.01
maximum = 0.05
max_total = 5

[coze.accounts.alpha]
api_token_env = "COZE_TOKEN_ALPHA"
base_url = "{base_url}"
max_runs = {a_runs}
qps = {a_qps}

[coze.accounts.beta]
api_token_env = "COZE_TOKEN_BETA"
base_url = "{base_url}"
max_runs = {b_runs}
qps = {b_qps}

[[pipelines]]
name = "drama"
aliases = ["短剧"]
workflow_id = "wf-drama"
coze_account = "alpha"
bitable_table_id = "tblDrama"
alert_chat_id = "oc_drama"
admin_ids = ["{DRAMA_ADMIN}"]

[[pipelines]]
name = "news"
workflow_id = "wf-news"
coze_account = "beta"
bitable_table_id = "tblNews"
alert_chat_id = "oc_news"
admin_ids = ["{NEWS_ADMIN}"]
oncall_ids = ["{NEWS_ONCALL}"]
""", encoding="utf-8")
    return {"OPSBOT_CONFIG": str(cfg), "COZE_TOKEN_ALPHA": TOKENS["alpha"],
            "COZE_TOKEN_BETA": TOKENS["beta"], "BITABLE_APP_TOKEN": APP}


def say(db, settings, fake_client, text: str, *, chat: str, sender: str, n: list[int]):
    """One chat message through the real parser and handlers; returns the reply card."""
    n[0] += 1
    ctx = Context(db, settings, fake_client, Clock(), sender=sender, chat_id=chat,
                  message_id=f"om_{n[0]}")
    return execute(ctx, parse(text, pipeline_words(settings)))


def card_text(card) -> str:
    return json.dumps(card, ensure_ascii=False)


async def work(db, settings, clock) -> None:
    """The service's worker for these settings, drained; the alert router flushed."""
    notifier, router = build_notifier(db, settings, clock)
    limiters: list = []
    try:
        async with contextlib.AsyncExitStack() as clients:
            routing = await open_routing(settings, clock, clients, limiters)
            worker = Worker(db, settings.pipeline, None, "", clock=clock, routing=routing,
                            notifier=notifier)
            await asyncio.wait_for(worker.run(drain=True), 60)
            worker.synth.close()
    finally:
        for limiter in limiters:
            limiter.close()
    router.flush()


def sends_to(db, chat: str) -> list[dict]:
    return [dict(r, payload=json.loads(r["payload"])) for r in db.query(
        "SELECT * FROM outbox WHERE kind = 'send' AND target = ? ORDER BY id", [chat])]


@pytest.fixture
def world(db_path, db, tmp_path):
    """The fake Feishu with both tables seeded, the gated simulator, the settings."""
    with FakeFeishu() as fake:
        fake.seed_records(APP, "tblDrama", [{"task_id": f"d{i}", "状态": "待处理"}
                                            for i in range(8)])
        fake.seed_records(APP, "tblNews", [{"task_id": f"n{i}", "状态": "待处理"}
                                           for i in range(9)])
        sim = CozeSimulator(default_duration=0.4)
        sim.script("d3", Script(outcome="Fail", error_code="4000",
                                error_message="invalid parameter: topic", duration=0.05))
        gate = TwoAccountCoze(sim, TOKENS)
        loop = asyncio.new_event_loop()
        base_url = loop.run_until_complete(gate.start())
        env = write_config(tmp_path, base_url)
        env.update({"FEISHU_APP_ID": fake.app_id, "FEISHU_APP_SECRET": fake.app_secret,
                    "FEISHU_DOMAIN": fake.base_url, "OPSBOT_DB": str(db_path)})
        settings = load_settings(env)
        try:
            yield fake, gate, settings, loop
        finally:
            loop.run_until_complete(gate.stop())
            loop.close()


def test_two_pipelines_on_two_accounts_keep_each_accounts_limits_and_alert_their_own_chat(
        db, world):
    fake, gate, settings, loop = world
    client = FeishuClient(settings.feishu)
    n = [0]
    # `run` without a name in the news chat runs the news pipeline; the alias names drama
    news_card = say(db, settings, client, "run", chat="oc_news", sender=NEWS_ADMIN, n=n)
    drama_card = say(db, settings, client, "运行 短剧", chat="oc_other", sender=DRAMA_ADMIN,
                     n=n)
    assert "9" in card_text(news_card) and "8" in card_text(drama_card)
    batches = {b["pipeline"]: b for b in db.query("SELECT * FROM batches")}
    assert set(batches) == {"drama", "news"}
    assert batches["news"]["workflow_id"] == "wf-news"
    assert batches["drama"]["workflow_id"] == "wf-drama"

    loop.run_until_complete(work(db, settings, Clock()))

    # every run went to its pipeline's workflow with its account's token
    assert len(gate.run_account) == 17
    for execute_id, account in gate.run_account.items():
        run = gate.sim.runs[execute_id]
        assert (account, run.workflow_id, run.task[0]) in (("alpha", "wf-drama", "d"),
                                                           ("beta", "wf-news", "n")), run
    # each account's run limit held, and was reached: the limits are the accounts' own
    for account, (max_runs, qps) in LIMITS.items():
        assert gate.peak_in_flight(account) == max_runs, account
        assert gate.max_rps(account) <= qps, (account, gate.max_rps(account))
    # not one limit and one budget for both: together they went past either alone
    assert gate.peak_in_flight() > max(r for r, _ in LIMITS.values())
    assert gate.max_rps() > max(q for _, q in LIMITS.values())
    # the store: each batch's runs on its workflow; drama's failure is drama's alone
    counts = {p: queue.batch_counts(db, b["id"]) for p, b in batches.items()}
    assert counts["news"]["succeeded"] == 9 and counts["drama"]["succeeded"] == 7
    assert counts["drama"]["failed"] == 1
    for pipeline, workflow in (("drama", "wf-drama"), ("news", "wf-news")):
        ran = {r["run_workflow_id"] for r in queue.tasks_of(db, batches[pipeline]["id"])}
        assert ran == {workflow}
    drama_alerts = [s for s in sends_to(db, "oc_drama") if "card" in s["payload"]]
    assert len(drama_alerts) == 1
    assert "d3" in card_text(drama_alerts[0]) and "4000" in card_text(drama_alerts[0])
    assert "**流水线**：`drama`" in card_text(drama_alerts[0])   # which pipeline, on the card
    assert sends_to(db, "oc_news") == []
    [alert] = list(db.query("SELECT * FROM alerts"))
    assert json.loads(alert["details"])["pipeline"] == "drama"
    # the write-back went to each row's own table
    loop.run_until_complete(asyncio.sleep(0))
    from bot.feishu.sender import OutboxSender
    OutboxSender(db, client, clock=Clock(), owner="t").deliver_due()
    drama_rows = fake.records(APP, "tblDrama").values()
    news_rows = fake.records(APP, "tblNews").values()
    assert sorted(r["状态"] for r in drama_rows) == ["失败"] + ["已完成"] * 7
    assert {r["状态"] for r in news_rows} == {"已完成"}


def test_a_bad_token_stops_only_the_pipelines_on_its_account(db, world):
    fake, gate, settings, loop = world
    client = FeishuClient(settings.feishu)
    n = [0]
    say(db, settings, client, "run", chat="oc_news", sender=NEWS_ADMIN, n=n)
    say(db, settings, client, "run drama", chat="oc_drama", sender=DRAMA_ADMIN, n=n)
    gate.revoked.add("beta")

    loop.run_until_complete(work(db, settings, Clock()))

    batches = {b["pipeline"]: b for b in db.query("SELECT * FROM batches")}
    assert batches["news"]["status"] == "blocked"
    assert batches["drama"]["status"] == "done"
    assert queue.batch_counts(db, batches["drama"]["id"])["succeeded"] == 7
    states = dict(breakers.states(db))
    assert states["coze:beta"] == "open" and states.get("coze:alpha", "closed") == "closed"
    assert not any(a == "beta" for a in gate.run_account.values())
    [high] = [s["payload"]["card"] for s in sends_to(db, "oc_news") if "card" in s["payload"]]
    text = card_text(high)
    assert "[HIGH]" in text and "4100" in text and f"<at id={NEWS_ONCALL}></at>" in text
    assert "[HIGH]" not in "".join(card_text(s["payload"]) for s in sends_to(db, "oc_drama"))

    # the token is fixed; resuming news closes beta's breaker only (alpha's, opened here by
    # hand, stays open: a human vouched for beta's cause, not alpha's)
    gate.revoked.discard("beta")
    breakers.put(db, service="coze:alpha", state="open", failures=5, successes=0,
                 opened_at=time.time(), reason="5000: server error", submit_failures=0,
                 now=time.time())
    refused = say(db, settings, client, f"resume {batches['news']['id']}", chat="oc_news",
                  sender=DRAMA_ADMIN, n=n)
    assert "没有权限" in card_text(refused)
    say(db, settings, client, f"resume {batches['news']['id']}", chat="oc_news",
        sender=NEWS_ADMIN, n=n)
    states = dict(breakers.states(db))
    assert states["coze:beta"] == "closed" and states["coze:alpha"] == "open"
    loop.run_until_complete(work(db, settings, Clock()))
    assert queue.batch_counts(db, batches["news"]["id"])["succeeded"] == 9
    assert all(a == "beta" for e, a in gate.run_account.items()
               if gate.sim.runs[e].task.startswith("n"))


def test_opsbot_run_takes_the_pipeline_to_run_on(tmp_path, db_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from storage.db import open_db

    root = Path(__file__).resolve().parent.parent
    csv = tmp_path / "b.csv"
    csv.write_text("task_id\nx1\nx2\n", encoding="utf-8")
    cfg = tmp_path / "two.toml"
    cfg.write_text('[pipeline]\nidle_interval = 0.02\nskip_synthesis = true\n'
                   '[pipeline.poll]\nfirst = 0.05\nmaximum = 0.2\n'
                   '[coze.accounts.beta]\napi_token_env = "COZE_TOKEN_BETA"\n'
                   '[[pipelines]]\nname = "drama"\nworkflow_id = "wf-drama"\n'
                   '[[pipelines]]\nname = "news"\naliases = ["新闻"]\nworkflow_id = "wf-news"\n'
                   'coze_account = "beta"\n', encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FEISHU_", "COZE_", "OPSBOT_", "BITABLE_"))}
    env.update(OPSBOT_DB=str(db_path), OPSBOT_CONFIG=str(cfg),
               COZE_TOKEN_BETA="pat_beta", PYTHONPATH=str(root))

    def opsbot(*args):
        return subprocess.run([sys.executable, "-m", "bot.ops.cli", "run", str(csv), *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    several = opsbot("--simulate")
    assert several.returncode == 2 and "--pipeline NAME" in several.stderr
    assert "drama, news" in several.stderr
    ghost = opsbot("--pipeline", "sports", "--simulate")
    assert ghost.returncode == 2 and "'sports'" in ghost.stderr and "drama, news" in ghost.stderr
    ok = opsbot("--pipeline", "新闻", "--simulate")
    assert ok.returncode == 0, ok.stderr[-2000:]
    db = open_db(db_path)
    try:
        [batch] = list(db.query("SELECT pipeline, workflow_id, source FROM batches"))
    finally:
        db.conn.close()
    assert batch == {"pipeline": "news", "workflow_id": "wf-news", "source": "cli"}


def _finished(db, pipeline: str, keys: list[str], *, failed: set[str], at: float) -> str:
    """A batch of ``pipeline`` whose tasks ended at ``at`` (those in ``failed`` failed)."""
    batch = queue.create_batch(db, [{"task_key": k} for k in keys], now=at - 60, source="chat",
                               chat_id=None, pipeline=pipeline)
    for task in queue.tasks_of(db, batch):
        queue.update_task(db, task["id"], status="failed" if task["task_key"] in failed
                          else "succeeded", started_at=at - 30, finished_at=at)
    queue.set_batch_status(db, batch, "done", now=at)
    return batch


def test_status_report_and_the_daily_report_are_per_pipeline(db, world):
    from datetime import datetime, timedelta

    from bot.alerting.scheduler import Scheduler
    from pipeline.clock import FakeClock

    fake, gate, settings, loop = world
    client = FeishuClient(settings.feishu)
    day = datetime(2026, 3, 2, 9, 5, tzinfo=settings.tz)
    yesterday_noon = (day - timedelta(hours=21)).timestamp()
    drama = _finished(db, "drama", ["d1", "d2", "d3"], failed={"d2"}, at=yesterday_noon)
    news = _finished(db, "news", ["n1", "n2"], failed=set(), at=yesterday_noon)
    n = [0]
    # status in a chat shows that chat's pipeline's batch; status NAME names one
    assert news in card_text(say(db, settings, client, "status", chat="oc_news", sender="ou_x",
                                 n=n))
    status_drama = card_text(say(db, settings, client, "状态 短剧", chat="oc_news",
                                 sender="ou_x", n=n))
    assert drama in status_drama and news not in status_drama
    report = card_text(say(db, settings, client, "report drama --date 2026-03-01",
                           chat="oc_news", sender="ou_x", n=n))
    assert "drama" in report and "3" in report and "news" not in report
    # admins are the pipeline's: drama's admin may not run news, nor cancel its batch
    refused = card_text(say(db, settings, client, "run news", chat="oc_news",
                            sender=DRAMA_ADMIN, n=n))
    assert NEWS_ADMIN in refused and len(queue.list_batches(db)) == 2
    # without a name, outside any pipeline's chat: which one?
    which = card_text(say(db, settings, client, "run", chat="oc_elsewhere", sender=NEWS_ADMIN,
                          n=n))
    assert "drama &#40;短剧&#41;, news" in which      # markdown-escaped parentheses
    unknown = card_text(say(db, settings, client, "run sports", chat="oc_news",
                            sender=NEWS_ADMIN, n=n))
    assert "sports" in unknown and "drama, news" in unknown
    help_card = card_text(say(db, settings, client, "help", chat="oc_news", sender="ou_x", n=n))
    assert "drama &#40;短剧&#41;, news" in help_card

    # opsbot report --pipeline NAME: that pipeline's tasks only; an unknown name is refused
    import io

    from bot.ops.report_cli import run_report
    out, err = io.StringIO(), io.StringIO()
    assert run_report(settings, date="2026-03-01", send=False, out=out, err=err,
                      pipeline="news") == 0
    assert "news" in out.getvalue() and "2" in out.getvalue() and "drama" not in out.getvalue()
    assert run_report(settings, date="2026-03-01", send=False, out=out, err=err,
                      pipeline="sports") == 2
    assert "'sports'" in err.getvalue() and "drama, news" in err.getvalue()

    # 09:05: one report card per alert chat, each of its own pipeline's tasks
    sent = Scheduler(db, settings, FakeClock(day.timestamp())).send_due_report()
    assert sent == "2026-03-01"
    [to_drama] = [s["payload"]["card"] for s in sends_to(db, "oc_drama")]
    [to_news] = [s["payload"]["card"] for s in sends_to(db, "oc_news")]
    assert "drama" in card_text(to_drama) and "3" in card_text(to_drama)
    assert "news" in card_text(to_news) and "news" not in card_text(to_drama)
    assert "1 failed" in card_text(to_drama).replace("失败 1", "1 failed") or \
        "失败 1" in card_text(to_drama)
    assert "失败 0" in card_text(to_news)


@pytest.mark.empty_database
def test_batches_stored_before_pipelines_belong_to_the_default_one(db_path):
    from storage.db import apply_migrations, open_db, schema_version
    from storage.migrations import MIGRATIONS
    from tests.helpers import store_at_version

    mine = next(i for i, m in enumerate(MIGRATIONS) if any("ADD COLUMN pipeline" in sql
                                                           for sql in m))
    old = store_at_version(db_path, mine)
    old.execute("INSERT INTO batches (id, source, created_at) VALUES ('bold0001', 'chat', 1)")
    old.conn.close()
    db = open_db(db_path, migrate=False)
    try:
        assert apply_migrations(db) == schema_version(db) == len(MIGRATIONS)
        assert queue.batch_field(db, "bold0001", "pipeline") == "default"
        assert queue.create_batch(db, [{"task_key": "t"}], now=2, source="cli",
                                  pipeline="news")
        assert [b["id"] for b in queue.list_batches(db, pipelines=("default",))] == ["bold0001"]
    finally:
        db.conn.close()


def test_the_failure_rate_critical_is_per_pipeline_and_goes_to_its_chat(db, world):
    from bot.alerting.router import AlertRouter

    fake, gate, settings, loop = world
    now = time.time()
    _finished(db, "drama", [f"d{i}" for i in range(10)], failed={f"d{i}" for i in range(8)},
              at=now - 5)
    _finished(db, "news", [f"n{i}" for i in range(10)], failed={"n0"}, at=now - 5)
    router = AlertRouter(db, settings, Clock())
    router._check_failure_rate()
    keys = {a["key"]: a for a in db.query("SELECT * FROM alerts WHERE status = 'open'")}
    assert set(keys) == {"failure_rate:drama"}
    [critical] = [s["payload"]["card"] for s in sends_to(db, "oc_drama")]
    assert "[CRITICAL]" in card_text(critical) and f"<at id={DRAMA_ADMIN}></at>" in \
        card_text(critical)
    assert sends_to(db, "oc_news") == []

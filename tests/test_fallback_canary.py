"""Fallback workflow (switch, alert, switch back) and the scheduled canary."""
from __future__ import annotations

import asyncio
import dataclasses
import json

from bot.alerting.router import AlertRouter
from bot.alerting.canary import Canary
from bot.settings import AlertSettings, FeishuSettings, Settings
from pipeline.clock import FakeClock
from pipeline.coze import CozeClient
from pipeline.fallback import WorkflowSelector
from pipeline.standins.simulator import CozeSimulator, Script
from pipeline.worker import Worker
from storage import queue
from tests.test_worker import FAST


def test_selector_switches_at_the_threshold_and_back_after_the_cool_down():
    sel = WorkflowSelector("wf_main", "wf_backup", failure_rate=0.6, window=100, min_runs=5,
                           cooldown=50)
    for t, ok in enumerate([True, False, False, False]):
        assert sel.record("wf_main", ok, float(t)) is None       # 4 runs: too few to judge
    switch = sel.record("wf_main", False, 4.0)                   # 4 of 5 failed >= 60 %
    assert switch is not None and switch.to_fallback and "4 of the last 5" in switch.reason
    assert sel.current(10.0) == ("wf_backup", None)
    assert sel.record("wf_backup", False, 11.0) is None          # the fallback is not judged
    workflow, back = sel.current(54.0)
    assert workflow == "wf_main" and back is not None and not back.to_fallback
    assert sel.current(55.0) == ("wf_main", None)


def test_selector_forgets_old_runs_and_does_nothing_without_a_fallback():
    sel = WorkflowSelector("a", "b", failure_rate=0.5, window=10, min_runs=2, cooldown=5)
    sel.record("a", False, 0.0)
    assert sel.record("a", False, 20.0) is None                  # the first is out of the window
    none = WorkflowSelector("a", "", min_runs=1)
    assert none.record("a", False, 0.0) is None and none.current(1.0) == ("a", None)


def _alert_settings(tmp_path, **alerts):
    return Settings(feishu=FeishuSettings(alert_chat_id="oc_alerts", oncall_ids=("ou_oncall",)),
                    alerts=AlertSettings(**alerts), db_path=tmp_path / "x.db")


def test_worker_moves_to_the_fallback_alerts_once_and_polls_the_right_workflow(db, tmp_path):
    settings = _alert_settings(tmp_path)
    cfg = dataclasses.replace(FAST, max_coze=1, output_dir=str(tmp_path),
                              fallback_workflow_id="wf_backup", fallback_min_runs=3,
                              fallback_failure_rate=0.6, fallback_cooldown=3600)

    async def go():
        sim = CozeSimulator(default_duration=0.02)
        for i in range(3):
            sim.script(f"p{i}", Script(outcome="Fail", error_code="4000",
                                       error_message="node crashed", duration=0.02))
        await sim.start()
        try:
            queue.create_batch(db, [{"task_key": k} for k in ("p0", "p1", "p2", "f0", "f1")],
                               now=0, source="cli")
            async with CozeClient(sim.base_url, sim.token) as coze:
                router = AlertRouter(db, settings, FakeClock())
                await Worker(db, cfg, coze, "wf_main", notifier=router).run(drain=True)
            return sim
        finally:
            await sim.stop()

    sim = asyncio.run(go())
    by_task = {run.task: run.workflow_id for run in sim.runs.values()}
    assert [by_task[k] for k in ("p0", "p1", "p2")] == ["wf_main"] * 3
    assert by_task["f0"] == by_task["f1"] == "wf_backup"
    polled = {r.path for r in sim.requests if "run_histories" in r.path}
    assert any("/workflows/wf_backup/" in p for p in polled)
    assert queue.find_task(db, "f0")["run_workflow_id"] == "wf_backup"
    alerts = list(db.query("SELECT * FROM alerts WHERE key = 'workflow:fallback'"))
    assert len(alerts) == 1 and alerts[0]["tier"] == "HIGH"
    sends = [json.loads(r["payload"]) for r in db.query(
        "SELECT payload FROM outbox WHERE kind = 'send' AND ref = 'workflow:fallback'")]
    assert len(sends) == 1
    text = json.dumps(sends[0], ensure_ascii=False)
    assert "wf_backup" in text and "ou_oncall" in text


def _finish(db, batch_id, status, **fields):
    [task] = queue.claim_tasks(db, owner="w", now=0, lease=100, limit=1)
    assert task["batch_id"] == batch_id
    queue.update_task(db, task["id"], status=status, **fields)
    queue.finish_batches(db, now=0)


def test_canary_is_queued_on_schedule_alerts_on_failure_and_resolves_on_success(db, tmp_path):
    settings = _alert_settings(tmp_path, canary_interval=600, canary_timeout=300,
                               canary_params={"topic": "canary"})
    clock = FakeClock(start=1_000_000)
    canary = Canary(db, settings, clock, AlertRouter(db, settings, clock))
    first = canary.tick()
    assert first and queue.tasks_of(db, first)[0]["params"] == '{"topic": "canary"}'
    clock.advance(60)
    assert canary.tick() is None                                 # not due, and one at a time
    _finish(db, first, "failed", error_class="auth", error_code="4100",
            error_message="token invalid")
    canary.tick()
    canary.tick()                                                # judged once, alerted once
    [alert] = list(db.query("SELECT * FROM alerts WHERE key = 'canary'"))
    assert alert["tier"] == "HIGH" and alert["status"] == "open" and alert["count"] == 1
    clock.advance(600)
    second = canary.tick()
    assert second and second != first
    _finish(db, second, "succeeded")
    clock.advance(1)
    canary.tick()
    assert db.execute("SELECT status FROM alerts WHERE key = 'canary'").fetchone()[0] == \
        "resolved"


def test_a_canary_that_hangs_is_reported_and_no_canary_runs_when_off(db, tmp_path):
    settings = _alert_settings(tmp_path, canary_interval=600, canary_timeout=300)
    clock = FakeClock(start=1_000_000)
    canary = Canary(db, settings, clock, AlertRouter(db, settings, clock))
    canary.tick()
    clock.advance(301)
    canary.tick()
    [alert] = list(db.query("SELECT * FROM alerts WHERE key = 'canary'"))
    assert "仍未完成" in json.loads(alert["details"])["reason"]
    off = Canary(db, _alert_settings(tmp_path), clock, AlertRouter(db, settings, clock))
    assert off.tick() is None

"""The operator's side end to end: the real worker and alert router against the Coze simulator,
cards read from the outbox, and their buttons pressed through signed card.action.trigger
requests to the real Flask app."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import pytest

from bot.app import create_app
from bot.chat.cards import button_values
from bot.standins.events import ADMIN, ENCRYPT_KEY, TOKEN, card_action_event, signed_event
from bot.service import build_notifier
from bot.settings import FeishuSettings, Secret, Settings
from pipeline.coze import CozeClient
from pipeline.standins.simulator import CozeSimulator, Script
from pipeline.worker import Worker
from storage import queue
from tests.helpers import checked_answer
from tests.test_worker import FAST

CHAT = "oc_alerts"


@pytest.fixture
def settings(db_path):
    return Settings(feishu=FeishuSettings(verification_token=Secret(TOKEN),
                                          encrypt_key=Secret(ENCRYPT_KEY), admin_ids=(ADMIN,),
                                          alert_chat_id=CHAT),
                    db_path=db_path)


@pytest.fixture
def app(settings, db):
    return create_app(settings, db=db, dispatch=False).test_client()


def drain(db, settings, sim, tmp_path, config=FAST):
    async def go():
        async with CozeClient(sim.base_url, sim.token) as coze:
            notifier, router = build_notifier(db, settings, _Clock())
            worker = Worker(db, dataclasses.replace(config, output_dir=str(tmp_path)), coze,
                            "wf", notifier=notifier)
            await worker.run(drain=True)
            router.flush()
            worker.synth.close()
    asyncio.run(go())


class _Clock:
    def now(self):
        return time.time()

    def monotonic(self):
        return time.monotonic()

    async def sleep(self, seconds):
        await asyncio.sleep(seconds)


def sends(db, ref_prefix=""):
    return [dict(r, payload=json.loads(r["payload"])) for r in db.query(
        "SELECT * FROM outbox WHERE kind = 'send' AND target = ? AND ref LIKE ? ORDER BY id",
        [CHAT, ref_prefix + "%"])]


def cards(db, ref_prefix=""):
    return [s["payload"]["card"] for s in sends(db, ref_prefix) if "card" in s["payload"]]


def buttons(card):
    return {value["action"]: value for value in button_values(card)}


def press(app, value, operator=ADMIN):
    body, headers = signed_event(card_action_event(value, operator=operator))
    resp = app.post("/webhook/event", data=body, headers=headers)
    assert resp.status_code == 200
    return checked_answer(resp.get_json())


def test_bad_token_one_high_card_within_a_second_blocks_until_resume(db, settings, app,
                                                                      tmp_path):
    sim = CozeSimulator(default_duration=0.03)
    sim.set_token_valid(False)
    sim.start_in_thread()
    try:
        batch = queue.create_batch(db, [{"task_key": f"t{i}"} for i in range(6)], now=0,
                                   source="cli")
        started = time.monotonic()
        drain(db, settings, sim, tmp_path)
        assert time.monotonic() - started < 1.0
        assert queue.get_batch(db, batch)["status"] == "blocked"
        [high] = cards(db)
        text = json.dumps(high, ensure_ascii=False)
        assert "[HIGH]" in text and f"<at id={ADMIN}></at>" in text and "4100" in text
        resume = buttons(high)["resume"]
        assert set(buttons(high)) == {"resume", "cancel"}

        sim.set_token_valid(True)
        answer = press(app, resume)
        assert answer["toast"]["type"] == "success"
        assert queue.get_batch(db, batch)["status"] == "running"
        again = press(app, resume)                       # a double click acts once
        assert again["toast"]["type"] == "info"
        drain(db, settings, sim, tmp_path)
        assert queue.batch_counts(db, batch)["succeeded"] == 6
        assert db.execute("SELECT status FROM alerts WHERE tier = 'HIGH'").fetchone()[0] == \
            "resolved"
        assert len(cards(db)) == 1                       # no second HIGH card
    finally:
        sim.stop_thread()


def test_fifty_identical_failures_make_one_grouped_card(db, settings, tmp_path):
    sim = CozeSimulator(default_duration=0.01)
    sim.default_script = Script(code_on_submit=4000)
    sim.start_in_thread()
    try:
        batch = queue.create_batch(db, [{"task_key": f"t{i}"} for i in range(50)], now=0,
                                   source="cli")
        drain(db, settings, sim, tmp_path, config=dataclasses.replace(FAST, max_coze=8))
    finally:
        sim.stop_thread()
    assert queue.batch_counts(db, batch)["failed"] == 50
    alert_sends = sends(db, batch)
    assert len(alert_sends) == 1
    [alert] = list(db.query("SELECT * FROM alerts WHERE key LIKE ?", [batch + "%"]))
    assert alert["count"] == 50 and alert["tier"] == "MEDIUM"
    patches = list(db.query("SELECT payload FROM outbox WHERE kind = 'patch' AND target = ?",
                            [alert_sends[0]["uuid"]]))
    assert patches                                        # the card is updated in place
    assert "50" in json.dumps(json.loads(patches[-1]["payload"]), ensure_ascii=False)


def test_each_button_of_a_medium_card_does_what_it_says(db, settings, app, tmp_path):
    sim = CozeSimulator(default_duration=0.01)
    sim.script("a", Script(outcome="Fail", error_code="720701002", duration=0.01))
    sim.script("b", Script(code_on_submit=4000))
    sim.start_in_thread()
    try:
        batch = queue.create_batch(db, [{"task_key": "a"}, {"task_key": "b"}], now=0,
                                   source="cli")
        drain(db, settings, sim, tmp_path)
        by_class = {}
        for card in cards(db, batch):
            text = json.dumps(card, ensure_ascii=False)
            by_class["plugin_timeout" if "plugin_timeout" in text else "bad_request"] = card
        assert set(by_class) == {"plugin_timeout", "bad_request"}
        retry = buttons(by_class["plugin_timeout"])
        assert {"retry", "ignore", "silence"} <= set(retry)

        # Ignore the bad-request task: it is marked, and pressing Retry on it now says so
        ignore = buttons(by_class["bad_request"])["ignore"]
        assert press(app, ignore)["toast"]["type"] == "success"
        assert queue.find_task(db, "b")["status"] == "ignored"

        # Silence the plugin-timeout key for an hour
        silence = retry["silence"]
        assert press(app, silence)["toast"]["type"] == "success"
        key = db.execute("SELECT key FROM silences").fetchone()[0]
        assert key and "plugin_timeout" in key

        # Retry: the plugin is back; the task runs again and the alert resolves
        sim.script("a", Script(duration=0.01))
        assert press(app, retry["retry"])["toast"]["type"] == "success"
        assert queue.find_task(db, "a")["status"] == "queued"
        assert press(app, retry["retry"])["toast"]["type"] == "info"   # moved on: no action
        drain(db, settings, sim, tmp_path)
        assert queue.find_task(db, "a")["status"] == "succeeded"
        assert sim.task("a").submits == 3                  # 2 failed runs, 1 after Retry
        status = db.execute("SELECT status FROM alerts WHERE key LIKE '%plugin_timeout%'")
        assert status.fetchone()[0] == "resolved"

        # a non-admin's press changes nothing
        assert press(app, retry["ignore"], operator="ou_stranger")["toast"]["type"] == "error"
        assert queue.find_task(db, "a")["status"] == "succeeded"
    finally:
        sim.stop_thread()

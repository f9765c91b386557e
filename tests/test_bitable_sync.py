"""Outcomes go back to Bitable: the worker's results reach the fake Feishu table, coalesced."""
from __future__ import annotations

import asyncio
import dataclasses

from bot.feishu.bitable_sync import BitableWriteBack, mark_running
from bot.feishu.client import FeishuClient
from bot.feishu.sender import OutboxSender
from bot.settings import Settings
from pipeline.clock import Clock
from pipeline.coze import CozeClient
from pipeline.standins.simulator import CozeSimulator, Script
from pipeline.worker import Worker
from storage import queue
from tests.fake_feishu import FakeFeishu
from tests.test_worker import FAST

APP, TABLE = "bascApp", "tblTasks"


def test_each_outcome_is_written_back_to_its_record(db, tmp_path):
    with FakeFeishu() as fake:
        ids = fake.seed_records(APP, TABLE, [
            {"task_id": "good", "状态": "待处理", "topic": "猫"},
            {"task_id": "bad", "状态": "待处理", "topic": "狗"},
        ])
        settings = Settings(feishu=fake.settings(bitable_app_token=APP, bitable_table_id=TABLE))
        batch = queue.create_batch(
            db, [{"task_key": "good", "record_id": ids[0], "params": {"topic": "猫"}},
                 {"task_key": "bad", "record_id": ids[1], "params": {"topic": "狗"}}],
            now=0, source="chat")
        clock = Clock()
        assert mark_running(db, settings, batch, clock.now()) == 2

        async def go():
            sim = CozeSimulator(default_duration=0.02)
            sim.script("bad", Script(outcome="Fail", error_code="4000",
                                     error_message="invalid parameter: topic", duration=0.02))
            await sim.start()
            try:
                async with CozeClient(sim.base_url, sim.token) as coze:
                    worker = Worker(db, dataclasses.replace(FAST, output_dir=str(tmp_path)),
                                    coze, "wf", notifier=BitableWriteBack(db, settings, clock))
                    await worker.run(drain=True)
                    worker.synth.close()
            finally:
                await sim.stop()

        asyncio.run(go())
        sender = OutboxSender(db, FeishuClient(settings.feishu), clock=clock, owner="t")
        assert sender.deliver_due() == 4            # 2 "running" marks + 2 outcomes
        rows = fake.records(APP, TABLE)
        good, bad = rows[ids[0]], rows[ids[1]]
        assert good["状态"] == "已完成" and good["execute_id"] and "耗时(秒)" in good
        assert good["输出"] and good["topic"] == "猫"
        assert bad["状态"] == "失败"
        assert "4000" in bad["错误"] and "invalid parameter" in bad["错误"]
        # the "running" mark and the outcome of each record were merged into ONE call
        assert len(fake.batch_updates) == 1
        assert len(fake.batch_updates[0]["records"]) == 2


def test_a_busy_table_is_retried_later_and_nothing_is_lost(db):
    with FakeFeishu() as fake:
        [rid] = fake.seed_records(APP, TABLE, [{"task_id": "a", "状态": "待处理"}])
        settings = Settings(feishu=fake.settings(bitable_app_token=APP, bitable_table_id=TABLE))
        fake.fail("batch_update", code=1254291, msg="write conflict", times=1)
        batch = queue.create_batch(db, [{"task_key": "a", "record_id": rid}], now=0,
                                   source="chat")
        now = [100.0]

        class Fixed(Clock):
            def now(self):
                return now[0]

        mark_running(db, settings, batch, now[0])
        sender = OutboxSender(db, FeishuClient(settings.feishu), clock=Fixed(), owner="t")
        assert sender.deliver_due() == 0
        assert fake.records(APP, TABLE)[rid]["状态"] == "待处理"
        now[0] += 400                               # past any backoff
        assert sender.deliver_due() == 1
        assert fake.records(APP, TABLE)[rid]["状态"] == "处理中"

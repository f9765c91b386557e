"""The result where the team looks: the finished video goes back to the task's Bitable row
(uploaded as an attachment through the outbox, or a link), the batch summary card says where
the videos are, and every attempt can be mirrored to a Bitable log table (500 rows a call).

Real parts: the worker against the Coze simulator, the real lark-oapi client against the fake
Feishu on loopback, the real outbox sender, real SQLite files."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from bot.alerting.router import batch_card
from bot.feishu.bitable_sync import (LOG_BATCH, LOG_FIELDS, BitableWriteBack, batch_outputs,
                              log_record, mirror_attempts, video_link)
from bot.feishu.client import FeishuClient
from bot.feishu.sender import OutboxSender
from bot.settings import Settings, SettingsError, load_settings
from pipeline.clock import Clock
from pipeline.coze import CozeClient
from pipeline.standins.simulator import CozeSimulator
from pipeline.worker import Worker
from storage import outbox, queue
from storage.db import open_db
from tests.fake_feishu import FakeFeishu
from tests.test_worker import FAST

APP, TABLE, LOG = "bascApp", "tblTasks", "tblLog"
VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40   # an MP4-ish file, ~10 KB


def render_video(task_key: str, params: dict, coze_output, output_dir: str) -> dict:
    """A synthesis callable (run in the process pool) that 'renders' a small MP4."""
    path = Path(output_dir) / f"{task_key}.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(VIDEO)
    return {"video": str(path), "duration": 3.0}


class Fixed(Clock):
    def __init__(self, t: float = 1000.0) -> None:
        super().__init__()
        self.t = t

    def now(self) -> float:
        return self.t


def run_batch(db, tmp_path, settings, keys=("v1",), synthesis="tests.test_bitable_results:"
              "render_video", fake=None) -> str:
    rows = fake.seed_records(APP, TABLE, [{"task_id": k, "状态": "待处理"} for k in keys])
    batch = queue.create_batch(db, [{"task_key": k, "record_id": r, "params": {}}
                                    for k, r in zip(keys, rows)], now=0, source="chat")
    cfg = dataclasses.replace(FAST, output_dir=str(tmp_path / "out"),
                              synthesis_command=synthesis)

    async def go():
        sim = CozeSimulator(default_duration=0.02)
        await sim.start()
        try:
            async with CozeClient(sim.base_url, sim.token) as coze:
                worker = Worker(db, cfg, coze, "wf",
                                notifier=BitableWriteBack(db, settings, Clock()))
                await worker.run(drain=True)
                worker.synth.close()
        finally:
            await sim.stop()

    asyncio.run(go())
    return batch


def make_settings(fake, tmp_path, **feishu) -> Settings:
    values = {"bitable_app_token": APP, "bitable_table_id": TABLE, "bitable_video_field": "视频"}
    values.update(feishu)
    return Settings(feishu=fake.settings(**values),
                    pipeline=dataclasses.replace(FAST, output_dir=str(tmp_path / "out")))


def test_the_video_is_uploaded_into_the_bitable_and_attached_to_its_row(db, tmp_path):
    with FakeFeishu(strict_records=True) as fake:
        settings = make_settings(fake, tmp_path)
        batch = run_batch(db, tmp_path, settings, keys=("v1", "v2"), fake=fake)
        sender = OutboxSender(db, FeishuClient(settings.feishu), clock=Clock(), owner="t")
        assert sender.deliver_due() == 3          # 2 outcome updates + 1 attachment
        assert sender.deliver_due() == 1          # one upload per pass
        assert len(fake.uploads) == 2
        for up in fake.uploads:
            assert (up["parent_type"], up["parent_node"]) == ("bitable_file", APP)
            assert up["data"] == VIDEO and up["size"] == len(VIDEO)
        by_name = {u["file_name"]: u["file_token"] for u in fake.uploads}
        rows = {f["task_id"]: f for f in fake.records(APP, TABLE).values()}
        for key in ("v1", "v2"):
            assert rows[key]["视频"] == [{"file_token": by_name[f"{key}.mp4"]}]
            assert rows[key]["状态"] == "已完成"
        # the summary card says where the videos are
        card = json.dumps(batch_card(db, settings, batch, now=0), ensure_ascii=False)
        folder = os.path.join(str(tmp_path / "out"), batch)
        assert f"2 个视频，在 `{folder}`" in card


def test_an_upload_that_fails_is_retried_and_a_failed_field_write_does_not_upload_again(
        db, tmp_path):
    with FakeFeishu() as fake:
        settings = make_settings(fake, tmp_path)
        run_batch(db, tmp_path, settings, fake=fake)
        clock = Fixed(time.time())
        sender = OutboxSender(db, FeishuClient(settings.feishu), clock=clock, owner="t",
                              rng=lambda: 0.0)
        fake.fail("upload_all", status=502)                        # a gateway hiccup
        sender.deliver_due()
        [row] = outbox_rows(db, "bitable_attach")
        assert row["status"] == "pending" and "http=502" in row["last_error"]
        assert fake.uploads == []
        fake.fail("batch_update", code=1254291, msg="write conflict")  # after the upload
        clock.t += 10
        sender.deliver_due()
        assert len(fake.uploads) == 1
        [row] = outbox_rows(db, "bitable_attach")
        assert row["status"] == "pending"
        assert json.loads(row["payload"])["file_token"] == fake.uploads[0]["file_token"]
        clock.t += 100
        sender.deliver_due()
        [row] = outbox_rows(db, "bitable_attach")
        assert row["status"] == "sent" and row["result"] == fake.uploads[0]["file_token"]
        assert len(fake.uploads) == 1                              # uploaded once in all
        [fields] = fake.records(APP, TABLE).values()
        assert fields["视频"] == [{"file_token": fake.uploads[0]["file_token"]}]


def test_an_upload_in_backoff_does_not_hold_back_the_rows_status_writes(db, tmp_path):
    with FakeFeishu() as fake:
        settings = make_settings(fake, tmp_path)
        run_batch(db, tmp_path, settings, fake=fake)
        clock = Fixed(time.time())
        sender = OutboxSender(db, FeishuClient(settings.feishu), clock=clock, owner="t",
                              rng=lambda: 1.0, base_backoff=60.0)
        fake.fail("upload_all", status=502, times=10)
        sender.deliver_due()
        [attach] = outbox_rows(db, "bitable_attach")
        assert attach["status"] == "pending" and attach["next_at"] >= clock.t + 60
        assert attach["target"] == f"{APP}/{TABLE}#files"
        [rid] = fake.records(APP, TABLE)
        clock.t += 1
        u = outbox.enqueue(db, "bitable_update", f"{APP}/{TABLE}",
                           {"record_id": rid, "fields": {"状态": "已归档"}}, now=clock.t)
        assert sender.deliver_due() == 1
        assert outbox.status_of(db, u) == "sent"
        assert fake.records(APP, TABLE)[rid]["状态"] == "已归档"
        assert fake.uploads == [] and outbox_rows(db, "bitable_attach")[0]["status"] == "pending"


def test_an_upload_that_outlasts_the_claims_lease_is_not_uploaded_twice(db, tmp_path):
    import threading
    with FakeFeishu() as fake:
        settings = make_settings(fake, tmp_path)
        run_batch(db, tmp_path, settings, fake=fake)
        clock = Fixed(time.time())
        client = FeishuClient(settings.feishu)
        first = OutboxSender(db, client, clock=clock, owner="s1", lease=60, rng=lambda: 1.0)
        second = OutboxSender(open_db(db_path(db)), client, clock=clock, owner="s2", lease=60)
        fake.fail("upload_all", status=502, delay=1.0)        # a slow upload (then a 502)
        worker = threading.Thread(target=first.deliver_due)
        worker.start()
        assert fake.wait_for(lambda: any("upload_all" in r["path"] for r in fake.requests))
        clock.t += 61                                          # past the claim's lease
        second.deliver_due()
        worker.join(10)
        assert len(fake.requests_to("upload_all")) == 1       # nobody uploaded it meanwhile
        [row] = outbox_rows(db, "bitable_attach")
        assert row["status"] == "pending" and "http=502" in row["last_error"]


def test_a_video_gone_from_disk_or_a_wrong_app_token_is_given_up_with_the_reason(db, tmp_path):
    with FakeFeishu() as fake:
        settings = make_settings(fake, tmp_path)
        run_batch(db, tmp_path, settings, keys=("v1",), fake=fake)
        [row] = outbox_rows(db, "bitable_attach")
        os.remove(json.loads(row["payload"])["path"])
        sender = OutboxSender(db, FeishuClient(settings.feishu), clock=Clock(), owner="t")
        sender.deliver_due()
        [row] = outbox_rows(db, "bitable_attach")
        assert row["status"] == "dead" and row["last_error"].startswith("cannot read ")
        assert "FileNotFoundError" in row["last_error"]
        # an attachment aimed at another Bitable: Feishu (and the fake) refuse the parent node
        path = tmp_path / "x.mp4"
        path.write_bytes(VIDEO)
        outbox.enqueue(db, "bitable_attach", f"bascOther/{TABLE}",
                       {"record_id": "rec1", "field": "视频", "path": str(path),
                        "file_name": "x.mp4"}, now=0)
        sender.deliver_due()
        dead = [r for r in outbox_rows(db, "bitable_attach") if r["target"].startswith("bascO")]
        assert dead[0]["status"] == "dead" and "1061044" in dead[0]["last_error"]
        assert fake.uploads == []


def test_a_result_without_a_video_attaches_nothing(db, tmp_path):
    with FakeFeishu() as fake:
        settings = make_settings(fake, tmp_path)
        run_batch(db, tmp_path, settings, synthesis="", fake=fake)   # the manifest step
        assert outbox_rows(db, "bitable_attach") == []
        OutboxSender(db, FeishuClient(settings.feishu), clock=Clock(), owner="t").deliver_due()
        [fields] = fake.records(APP, TABLE).values()
        assert fields["状态"] == "已完成" and "视频" not in fields


def test_link_mode_writes_the_served_url_instead_of_uploading(db, tmp_path):
    with FakeFeishu() as fake:
        settings = make_settings(fake, tmp_path, bitable_video_mode="link",
                                 video_link_base="https://media.example.com/opsbot/")
        batch = run_batch(db, tmp_path, settings, keys=("视频 1",), fake=fake)
        OutboxSender(db, FeishuClient(settings.feishu), clock=Clock(), owner="t").deliver_due()
        [fields] = fake.records(APP, TABLE).values()
        assert fields["视频"] == (f"https://media.example.com/opsbot/{batch}/"
                                  "%E8%A7%86%E9%A2%91%201.mp4")
        assert fake.uploads == [] and outbox_rows(db, "bitable_attach") == []
        card = json.dumps(batch_card(db, settings, batch, now=0), ensure_ascii=False)
        assert f"[视频 1](https://media.example.com/opsbot/{batch}/%E8%A7%86" in card


def test_video_links(tmp_path):
    out = tmp_path / "out"
    s = Settings(pipeline=dataclasses.replace(FAST, output_dir=str(out)))
    assert video_link(s, str(out / "b1" / "t.mp4")) == str(out / "b1" / "t.mp4")
    s = Settings(feishu=s.feishu.__class__(video_link_base="https://m.example/v"),
                 pipeline=s.pipeline)
    assert video_link(s, str(out / "b1" / "a b#.mp4")) == "https://m.example/v/b1/a%20b%23.mp4"
    elsewhere = str(tmp_path / "other" / "t.mp4")
    assert video_link(s, elsewhere) == elsewhere          # outside the served folder: the path
    with pytest.raises(SettingsError, match="bitable_video_mode must be 'upload' or 'link'"):
        load_settings({}, overrides={"feishu.bitable_video_mode": "attach"})


def test_a_larger_video_goes_up_in_parts(db, tmp_path):
    with FakeFeishu() as fake:
        fake.seed_records(APP, TABLE, [{"task_id": "big"}])
        big = tmp_path / "big.mp4"
        big.write_bytes(os.urandom(21 * 1024 * 1024))
        client = FeishuClient(fake.settings())
        token = client.upload_media(big, parent_node=APP)
        [up] = fake.uploads
        assert up["file_token"] == token and up["data"] == big.read_bytes()
        paths = [r["path"].rsplit("/", 1)[1] for r in fake.requests_to("/drive/v1/medias/")]
        assert paths == ["upload_prepare"] + ["upload_part"] * 6 + ["upload_finish"]
        assert fake.requests_to("upload_all") == []


def test_the_fake_refuses_uploads_like_feishu(tmp_path):
    with FakeFeishu() as fake:
        fake.seed_records(APP, TABLE, [{"task_id": "a"}])
        client = FeishuClient(fake.settings())
        empty = tmp_path / "empty.mp4"
        empty.write_bytes(b"")
        from bot.errors import FeishuError
        with pytest.raises(FeishuError) as err:
            client.upload_media(empty, parent_node=APP)
        assert err.value.code == 1061002 and not err.value.retryable
        small = tmp_path / "s.mp4"
        small.write_bytes(b"abc")
        with pytest.raises(FeishuError) as err:
            client.upload_media(small, parent_node=APP, parent_type="explorer")
        assert err.value.code == 1061002
        fake.fail("upload_all", code=1061045, msg="can retry")
        with pytest.raises(FeishuError) as err:
            client.upload_media(small, parent_node=APP)
        assert err.value.retryable
        assert client.upload_media(small, parent_node=APP).startswith("boxcn")


# --- the attempt log table ---------------------------------------------------------------------

def test_every_attempt_is_mirrored_in_batches_of_at_most_500(db, tmp_path):
    with FakeFeishu() as fake:
        fake.set_fields(APP, LOG, list(LOG_FIELDS))
        settings = Settings(feishu=fake.settings(bitable_app_token=APP, bitable_table_id=TABLE,
                                                 bitable_log_table_id=LOG))
        batch = queue.create_batch(db, [{"task_key": f"t{i}"} for i in range(3)], now=0,
                                   source="cli")
        tasks = queue.tasks_of(db, batch)
        for i in range(1203):
            task = tasks[i % 3]
            queue.record_attempt(db, task, stage="coze", started_at=100.0 + i,
                                 ended_at=101.5 + i, outcome="retry" if i % 2 else "success",
                                 error_class="server" if i % 2 else None,
                                 execute_id=f"e{i}", output_bytes=None if i % 2 else 42)
        assert mirror_attempts(db, settings, now=0) == 1203
        assert mirror_attempts(db, settings, now=0) == 0          # nothing twice
        rows = outbox_rows(db, "bitable_create")
        assert [len(json.loads(r["payload"])["records"]) for r in rows] == [500, 500, 203]
        assert {r["target"] for r in rows} == {f"{APP}/{LOG}"}
        sender = OutboxSender(db, FeishuClient(settings.feishu), clock=Clock(), owner="t")
        assert sender.deliver_due() == 3
        assert [len(c["records"]) for c in fake.batch_creates] == [500, 500, 203]
        stored = fake.records(APP, LOG)
        assert len(stored) == 1203
        first = fake.batch_creates[0]["records"][0]["fields"]
        assert first == {"task_id": "t0", "batch_id": batch, "stage": "coze",
                         "outcome": "success", "started_at": 100000, "seconds": 1.5,
                         "input_bytes": 2, "output_bytes": 42, "execute_id": "e0"}
        queue.record_attempt(db, tasks[0], stage="synthesis", started_at=5000, ended_at=5003,
                             outcome="fail", error_class="synthesis", error_code="exit")
        assert mirror_attempts(db, settings, now=0) == 1


def test_a_log_row_performed_again_after_a_lost_answer_adds_its_records_once(db):
    with FakeFeishu() as fake:
        fake.set_fields(APP, LOG, list(LOG_FIELDS))
        settings = Settings(feishu=fake.settings(bitable_app_token=APP, bitable_log_table_id=LOG))
        batch = queue.create_batch(db, [{"task_key": "a"}], now=0, source="cli")
        (task,) = queue.tasks_of(db, batch)
        for i in range(3):
            queue.record_attempt(db, task, stage="coze", started_at=10.0 + i, ended_at=11.0 + i,
                                 outcome="success")
        assert mirror_attempts(db, settings, now=0) == 3
        client = FeishuClient(settings.feishu)
        assert OutboxSender(db, client, clock=Clock(), owner="s1").deliver_due() == 1
        # Feishu added the rows, but the sender died before mark_sent: the lease runs out and
        # another sender performs the same row again
        db.execute("UPDATE outbox SET status = 'pending', sent_at = NULL, result = NULL")
        db.conn.commit()
        assert OutboxSender(db, client, clock=Clock(), owner="s2").deliver_due() == 1
        assert len(fake.records(APP, LOG)) == 3
        calls = fake.requests_to("/records/batch_create", "POST")
        assert len(calls) == 2
        tokens = {c["query"].get("client_token") for c in calls}
        assert len(tokens) == 1 and None not in tokens


def test_the_fake_honours_client_token_like_feishu(db):
    import uuid
    from bot.errors import FeishuError
    with FakeFeishu() as fake:
        fake.set_fields(APP, LOG, ["task_id"])
        client = FeishuClient(fake.settings())
        token = str(uuid.uuid4())
        first = client.batch_create_records(APP, LOG, [{"task_id": "a"}], client_token=token)
        again = client.batch_create_records(APP, LOG, [{"task_id": "a"}], client_token=token)
        assert first == again and len(fake.records(APP, LOG)) == 1
        other = client.batch_create_records(APP, LOG, [{"task_id": "a"}],
                                            client_token=str(uuid.uuid4()))
        assert other != first and len(fake.records(APP, LOG)) == 2
        client.batch_create_records(APP, LOG, [{"task_id": "b"}])      # no token: always adds
        client.batch_create_records(APP, LOG, [{"task_id": "b"}])
        assert len(fake.records(APP, LOG)) == 4
        with pytest.raises(FeishuError) as err:
            client.batch_create_records(APP, LOG, [{"task_id": "c"}], client_token="row-1")
        assert err.value.code == 1254001 and len(fake.records(APP, LOG)) == 4


def test_the_log_table_refuses_an_unknown_column_and_the_row_is_dead_not_lost_silently(db):
    with FakeFeishu() as fake:
        fake.set_fields(APP, LOG, ["task_id", "stage"])         # a table missing columns
        settings = Settings(feishu=fake.settings(bitable_app_token=APP, bitable_log_table_id=LOG))
        batch = queue.create_batch(db, [{"task_key": "a"}], now=0, source="cli")
        queue.record_attempt(db, queue.tasks_of(db, batch)[0], stage="coze", started_at=1,
                             ended_at=2, outcome="success")
        mirror_attempts(db, settings, now=0)
        OutboxSender(db, FeishuClient(settings.feishu), clock=Clock(), owner="t").deliver_due()
        [row] = outbox_rows(db, "bitable_create")
        assert row["status"] == "dead" and "1254045" in row["last_error"]


def test_the_worker_mirrors_its_attempts_when_a_batch_finishes(db, tmp_path):
    with FakeFeishu() as fake:
        settings = make_settings(fake, tmp_path, bitable_log_table_id=LOG)
        fake.set_fields(APP, LOG, list(LOG_FIELDS))
        batch = run_batch(db, tmp_path, settings, keys=("v1", "v2"), fake=fake)
        router = BitableWriteBack(db, settings, Clock())
        router.batch_finished(batch)      # what the worker's notifier does at the end
        OutboxSender(db, FeishuClient(settings.feishu), clock=Clock(), owner="t").deliver_due()
        logged = list(fake.records(APP, LOG).values())
        assert sorted((r["task_id"], r["stage"]) for r in logged) == [
            ("v1", "coze"), ("v1", "synthesis"), ("v2", "coze"), ("v2", "synthesis")]
        synth = next(r for r in logged if r["stage"] == "synthesis")
        assert synth["output_bytes"] == len(VIDEO)     # the video's size


def test_log_record_leaves_out_empty_values():
    rec = log_record({"task_key": "k", "batch_id": "b", "stage": "gate", "outcome": "resubmit",
                      "error_class": "quality", "error_code": "url", "node": "video",
                      "started_at": 1.2345, "ended_at": None, "input_bytes": 10,
                      "output_bytes": None, "execute_id": ""})
    assert rec == {"task_id": "k", "batch_id": "b", "stage": "gate", "outcome": "resubmit",
                   "error_class": "quality", "error_code": "url", "node": "video",
                   "started_at": 1234, "input_bytes": 10}


def outbox_rows(db, kind):
    return list(db.query("SELECT * FROM outbox WHERE kind = ? ORDER BY id", [kind]))


def test_batch_outputs_counts_only_videos_on_disk(db, tmp_path):
    settings = Settings(pipeline=dataclasses.replace(FAST, output_dir=str(tmp_path)))
    batch = queue.create_batch(db, [{"task_key": "<a>"}, {"task_key": "b"}], now=0,
                               source="cli")
    a, b = queue.tasks_of(db, batch)
    video = tmp_path / batch / "a.mp4"
    video.parent.mkdir()
    video.write_bytes(b"x")
    for task, path in ((a, video), (b, tmp_path / "gone.mp4")):
        queue.update_task(db, task["id"], status="succeeded",
                          output={"synthesis": {"video": str(path)}})
    out = batch_outputs(db, settings, batch)
    assert out["count"] == 1 and out["videos"] == [("<a>", str(video))]


def test_one_upload_per_delivery_pass_so_messages_are_not_held_up(db, tmp_path):
    with FakeFeishu() as fake:
        settings = make_settings(fake, tmp_path)
        run_batch(db, tmp_path, settings, keys=("v1", "v2", "v3"), fake=fake)
        clock = Fixed(time.time() + 1)
        sender = OutboxSender(db, FeishuClient(settings.feishu), clock=clock, owner="t")
        outbox.enqueue(db, "send", "oc_ops", {"text": "hello"}, now=clock.t)
        sender.deliver_due()
        assert len(fake.uploads) == 1 and len(fake.messages) == 1
        sender.deliver_due()
        sender.deliver_due()
        assert len(fake.uploads) == 3
        assert {r["status"] for r in outbox_rows(db, "bitable_attach")} == {"sent"}


def test_an_expired_token_during_an_upload_is_refreshed_and_the_file_sent_again_whole(tmp_path):
    with FakeFeishu() as fake:
        fake.seed_records(APP, TABLE, [{"task_id": "a"}])
        client = FeishuClient(fake.settings())
        client.check_token()
        fake.expire_tokens()
        video = tmp_path / "v.mp4"
        video.write_bytes(VIDEO)
        token = client.upload_media(video, parent_node=APP)
        [up] = fake.uploads
        assert up["file_token"] == token and up["data"] == VIDEO   # the retry re-read the file
        assert len(fake.requests_to("upload_all")) == 2


def db_path(db) -> str:
    return db.execute("PRAGMA database_list").fetchone()[2]

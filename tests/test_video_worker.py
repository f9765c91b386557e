"""The worker with the default synthesis: a video workflow's tasks end with MP4s on disk, a
text workflow's with manifests, and a bad asset fails the task with its failure class."""
from __future__ import annotations

import pytest
import asyncio
import dataclasses
import json
from pathlib import Path

from pipeline.config import PipelineConfig, PollPolicy, RetryPolicy, SynthesisConfig
from pipeline.coze import CozeClient
from pipeline.ratelimit import RateLimiter
from pipeline.standins.sim_assets import video_output
from pipeline.standins.simulator import CozeSimulator, Script
from pipeline.synthesis import file_name
from pipeline.worker import Worker
from storage import queue

CFG = PipelineConfig(
    max_coze=4, max_synthesis=2, coze_qps=500, lease_seconds=5, idle_interval=0.02,
    poll=PollPolicy(first=0.02, multiplier=1.5, maximum=0.1),
    retry=RetryPolicy(max_attempts=2, initial=0.01, maximum=0.05, max_total=5),
    synthesis=SynthesisConfig(width=180, height=320, fps=15, preset="ultrafast", crf=30),
)


def drain(db, tmp_path, outputs: dict, config=CFG):
    async def go():
        sim = CozeSimulator(default_duration=0.05)
        await sim.start()
        try:
            for key, make in outputs.items():
                sim.script(key, Script(output=make(sim.base_url)))
            async with CozeClient(sim.base_url, sim.token,
                                  limiter=RateLimiter(config.coze_qps, burst=50)) as coze:
                cfg = dataclasses.replace(config, output_dir=str(tmp_path / "out"))
                worker = Worker(db, cfg, coze, "wf1")
                try:
                    await asyncio.wait_for(worker.run(drain=True), 60)
                finally:
                    worker.synth.close()
        finally:
            await sim.stop()
    batch = queue.create_batch(db, [{"task_key": k} for k in outputs], now=0, source="cli")
    asyncio.run(go())
    return batch


def task(db, key):
    row = queue.find_task(db, key)
    return row, json.loads(row["output"]) if row["output"] else None


@pytest.mark.cjk_font
def test_video_tasks_end_with_mp4s_and_text_tasks_with_manifests(db, tmp_path):
    batch = drain(db, tmp_path, {
        "v1": lambda base: video_output(base, "v1", shape="arrays", scenes=2, seconds=0.8),
        "v2": lambda base: {"output": json.dumps(video_output(base, "v2", shape="jianying",
                                                              seconds=0.8))},
        "txt": lambda base: {"output": "一段生成的脚本"},
    })
    assert queue.batch_counts(db, batch)["succeeded"] == 3
    for key in ("v1", "v2"):
        row, out = task(db, key)
        video = out["synthesis"]["video"]
        assert Path(video).is_absolute() and Path(video).is_file()
        assert Path(video).name == f"{file_name(key)}.mp4" and Path(video).parent.name == batch
        assert Path(video).name.startswith(f"{key}-")
        assert out["synthesis"]["duration"] > 1.5 and out["synthesis"]["size"] > 0
    row, out = task(db, "txt")
    assert "video" not in out["synthesis"] and out["synthesis"]["manifest"].endswith(
        f"{file_name('txt')}.json")


def test_a_bad_asset_fails_the_task_with_its_class(db, tmp_path):
    drain(db, tmp_path, {
        "gone": lambda base: video_output(base, "gone", scenes=1, query="fault=404"),
    })
    row, _ = task(db, "gone")
    assert row["status"] == "failed" and row["error_class"] == "synthesis"
    assert row["error_code"] == "asset_not_found" and "HTTP 404" in row["error_message"]
    attempts = db.execute("SELECT outcome, error_code FROM attempts WHERE task_id = ? AND "
                          "stage = 'synthesis' ORDER BY id", [row["id"]]).fetchall()
    assert attempts == [("retry", "asset_not_found"), ("fail", "asset_not_found")]
    assert not list((tmp_path / "out").rglob("*.mp4"))


def test_mode_video_refuses_an_output_without_media(db, tmp_path):
    cfg = dataclasses.replace(CFG, synthesis=dataclasses.replace(CFG.synthesis, mode="video"))
    drain(db, tmp_path, {"txt": lambda base: {"output": "只有文字"}}, config=cfg)
    row, _ = task(db, "txt")
    assert row["status"] == "failed" and row["error_code"] == "no_timeline"


def test_mode_manifest_never_renders(db, tmp_path):
    cfg = dataclasses.replace(CFG, synthesis=dataclasses.replace(CFG.synthesis,
                                                                 mode="manifest"))
    drain(db, tmp_path, {"v": lambda base: video_output(base, "v", scenes=1)}, config=cfg)
    row, out = task(db, "v")
    assert row["status"] == "succeeded" and out["synthesis"]["manifest"].endswith(f"{file_name('v')}.json")
    assert out["synthesis"]["assets"] == 3 and not list((tmp_path / "out").rglob("*.mp4"))


@pytest.mark.cjk_font
def test_assets_are_downloaded_while_every_synthesis_slot_is_busy(tmp_path):
    """Signed URLs expire: a task waiting for a render slot has its files already."""
    from pipeline.synthesis import Synthesizer

    async def go():
        sim = CozeSimulator()
        base = await sim.start()
        synth = Synthesizer("", workers=1, output_dir=tmp_path, video=CFG.synthesis,
                            coze_base_url=base)
        try:
            out = video_output(base, "w", scenes=2, seconds=0.8)
            await synth.semaphore.acquire()          # the only slot is busy
            job = asyncio.create_task(synth.run("b", "w", {}, out))
            assets = tmp_path / "b" / f".work-{file_name('w')}" / "assets"
            for _ in range(500):
                downloaded = len([p for p in assets.glob("*.*") if p.suffix != ".part"])
                if downloaded == 5:
                    break
                await asyncio.sleep(0.02)
            rendered_early = list(tmp_path.rglob("*.mp4"))
            synth.semaphore.release()
            result = await asyncio.wait_for(job, 60)
            return downloaded, rendered_early, result
        finally:
            synth.close()
            await sim.stop()

    downloaded, rendered_early, result = asyncio.run(go())
    assert downloaded == 5 and rendered_early == []
    assert Path(result["video"]).is_file()


def test_an_output_folder_that_cannot_be_written_is_a_synthesis_failure(tmp_path):
    from pipeline.errors import SynthesisError
    from pipeline.synthesis import Synthesizer

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    async def go():
        sim = CozeSimulator()
        base = await sim.start()
        synth = Synthesizer("", workers=1, output_dir=blocker, video=CFG.synthesis,
                            coze_base_url=base)
        try:
            return await synth.run("b", "t", {}, video_output(base, "t", scenes=1))
        finally:
            await sim.stop()

    try:
        asyncio.run(go())
    except SynthesisError as exc:
        assert exc.code == "io" and "NotADirectoryError" in exc.message
    else:
        raise AssertionError("no error")


def test_a_task_that_fails_for_good_leaves_no_work_folder(db, tmp_path):
    """A timeout keeps the downloads for the second try; after that try the task has failed
    for good and its folder goes."""
    cfg = dataclasses.replace(CFG, synthesis=dataclasses.replace(CFG.synthesis,
                                                                 asset_timeout=0.3))
    drain(db, tmp_path, {"slow": lambda base: video_output(base, "slow", scenes=1,
                                                             query="fault=slow")}, config=cfg)
    row, _ = task(db, "slow")
    assert row["status"] == "failed" and row["error_code"] == "asset_timeout"
    attempts = db.execute("SELECT outcome FROM attempts WHERE task_id = ? AND "
                          "stage = 'synthesis' ORDER BY id", [row["id"]]).fetchall()
    assert attempts == [("retry",), ("fail",)]
    assert not list((tmp_path / "out").rglob(".work-*"))

"""Which files belong to which task: distinct names for distinct task keys, an MP4 reused
only for the same workflow output and settings, leftovers of failed or killed jobs removed."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from pipeline.clock import FakeClock
from pipeline.config import PipelineConfig, RetryPolicy, SynthesisConfig
from pipeline.standins.sim_assets import video_output
from pipeline.standins.simulator import CozeSimulator
from pipeline.synthesis import Synthesizer, builtin_synthesize, file_name, sweep
from pipeline.video.errors import AssetError
from pipeline.video.job import make_video

TINY = SynthesisConfig(width=180, height=320, fps=15, preset="ultrafast", crf=30,
                       scene_padding=0.2, asset_timeout=5.0)
RULES = PipelineConfig().rules
RETRY = RetryPolicy(max_attempts=2, initial=0.01, maximum=0.05, max_total=5)


@pytest.mark.parametrize("a,b", [
    ("视频1", "任务1"),                  # both were "__1"
    ("x" * 100 + "a", "x" * 100 + "b"),  # both were cut to the same 100 characters
    ("a b", "a_b"),                      # both were "a_b"
])
def test_task_keys_that_used_to_collide_get_distinct_names(a, b):
    assert file_name(a) != file_name(b)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=300), st.text(min_size=0, max_size=300))
def test_file_names_are_safe_bounded_readable_and_distinct(a, b):
    name = file_name(a)
    assert re.fullmatch(r"[A-Za-z0-9_.\-]{1,80}-[0-9a-f]{10}", name)
    assert name == file_name(a)                      # stable across runs and processes
    ascii_part = re.sub(r"[^A-Za-z0-9_.\-]", "_", a)[:80] or "task"
    assert name.startswith(ascii_part + "-")         # the key stays readable
    if a != b:
        assert file_name(a) != file_name(b)


@pytest.mark.cjk_font
def test_two_chinese_task_keys_in_one_batch_get_two_videos(tmp_path):
    """Rendered at once, as the worker does: each keeps its own video, work folder and
    subtitles, and neither overwrites the other's."""
    async def go():
        sim = CozeSimulator()
        base = await sim.start()
        synth = Synthesizer("", workers=2, output_dir=tmp_path, video=TINY, retry=RETRY,
                            coze_base_url=base)
        try:
            one = video_output(base, "one", scenes=1, seconds=0.8, texts=["第一条视频"])
            two = video_output(base, "two", scenes=3, seconds=0.8, texts=["第二条视频"])
            return await asyncio.gather(synth.run("b1", "视频1", {}, one),
                                        synth.run("b1", "任务1", {}, two))
        finally:
            synth.close()
            await sim.stop()

    first, second = asyncio.run(go())
    assert first["video"] != second["video"]
    assert Path(first["video"]).is_file() and Path(second["video"]).is_file()
    assert first["scenes"] == 1 and second["scenes"] == 3
    assert second["duration"] > first["duration"] + 1.5
    srts = {Path(r["subtitles"]).read_text(encoding="utf-8") for r in (first, second)}
    assert any("第一条视频" in s for s in srts) and any("第二条视频" in s for s in srts)
    assert sorted(p.name for p in (tmp_path / "b1").glob("*.mp4")) == sorted(
        [f"{file_name('视频1')}.mp4", f"{file_name('任务1')}.mp4"])


def test_two_chinese_task_keys_get_two_manifests(tmp_path):
    a = builtin_synthesize("视频1", {}, {"output": "甲"}, str(tmp_path))
    b = builtin_synthesize("任务1", {}, {"output": "乙"}, str(tmp_path))
    assert a["manifest"] != b["manifest"]
    assert json.loads(Path(a["manifest"]).read_text(encoding="utf-8"))["task_id"] == "视频1"
    assert json.loads(Path(b["manifest"]).read_text(encoding="utf-8"))["task_id"] == "任务1"


def _make(base: str, out_dir: Path, output: dict, cfg: SynthesisConfig = TINY):
    return make_video("t", "t", output, out_dir, cfg=cfg, rules=RULES, policy=RETRY,
                      clock=FakeClock(), allow_loopback=True)


@pytest.mark.cjk_font
def test_an_unchanged_output_is_reused_and_a_changed_one_rendered_again(tmp_path):
    """A chat retry gets a new run with a new output: its video is the new one."""
    async def go():
        sim = CozeSimulator()
        base = await sim.start()
        try:
            old = video_output(base, "old", scenes=1, seconds=0.8)
            new = video_output(base, "new", scenes=3, seconds=0.8)
            first = await _make(base, tmp_path, old)
            requests_after_first = sum(sim.assets.requests.values())
            again = await _make(base, tmp_path, old)
            requests_after_again = sum(sim.assets.requests.values())
            retried = await _make(base, tmp_path, new)
            louder = await _make(base, tmp_path, new, dataclasses.replace(TINY, crf=40))
            return (first, again, retried, louder, requests_after_first,
                    requests_after_again)
        finally:
            await sim.stop()

    first, again, retried, louder, n1, n2 = asyncio.run(go())
    assert first["reused"] is False and again["reused"] is True
    assert n2 == n1                                   # reused: nothing downloaded again
    assert again["duration"] == first["duration"]
    assert retried["reused"] is False and retried["video"] == first["video"]
    assert retried["scenes"] == 3 and retried["duration"] > first["duration"] + 1.5
    assert louder["reused"] is False                  # other render settings: rendered again
    assert not list(tmp_path.glob(".*rendering*")) and not list(tmp_path.glob("*.tmp"))


@pytest.mark.cjk_font
def test_a_video_without_its_sidecar_is_rendered_again(tmp_path):
    """An MP4 whose record is missing (an older version, or a crash between the rename and
    the record) cannot prove which output it shows."""
    async def go():
        sim = CozeSimulator()
        base = await sim.start()
        try:
            out = video_output(base, "s", scenes=1, seconds=0.8)
            await _make(base, tmp_path, out)
            sidecars = list(tmp_path.glob(".t.mp4.*"))
            for p in sidecars:
                p.unlink()
            return sidecars, await _make(base, tmp_path, out)
        finally:
            await sim.stop()

    sidecars, result = asyncio.run(go())
    assert len(sidecars) == 1 and result["reused"] is False


def test_a_failure_that_makes_the_downloads_useless_removes_the_work_folder(tmp_path):
    async def go(query: str):
        sim = CozeSimulator()
        base = await sim.start()
        try:
            out = video_output(base, "w", scenes=2, seconds=0.8)
            out["mp3_urls"][1] += "&" + query   # one bad asset among good ones
            with pytest.raises(AssetError) as err:
                await _make(base, tmp_path, out)
            return err.value
        finally:
            await sim.stop()

    err = asyncio.run(go("fault=404"))
    assert err.code == "asset_not_found"
    assert not list(tmp_path.glob(".work-*"))          # a new run brings new URLs


def test_a_task_that_fails_for_good_leaves_no_work_folder(tmp_path):
    synth = Synthesizer("", output_dir=tmp_path, video=TINY)
    work = tmp_path / "b1" / f".work-{file_name('视频1')}" / "assets"
    work.mkdir(parents=True)
    (work / "x.png").write_bytes(b"x")
    other = tmp_path / "b1" / f".work-{file_name('任务1')}"
    other.mkdir()
    synth.discard("b1", "视频1")
    assert not work.parent.exists() and other.is_dir()


def test_sweep_removes_old_leftovers_and_keeps_young_ones(tmp_path):
    now = 1_800_000_000.0
    batch = tmp_path / "b1"
    batch.mkdir()

    def make(path: Path, age: float, folder: bool = False) -> Path:
        if folder:
            (path / "assets").mkdir(parents=True)
            (path / "assets" / "a.png").write_bytes(b"x")
            for p in [path / "assets" / "a.png", path / "assets", path]:
                os.utime(p, (now - age, now - age))
        else:
            path.write_bytes(b"x")
            os.utime(path, (now - age, now - age))
        return path

    old_render = make(batch / ".t1-abc.rendering-123.mp4", 4000)
    young_render = make(batch / ".t2-abc.rendering-456.mp4", 30)
    old_work = make(batch / ".work-t3-abc", 90_000, folder=True)
    young_work = make(batch / ".work-t4-abc", 600, folder=True)
    video = make(batch / "t5-abc.mp4", 90_000)
    removed = sweep(tmp_path, 86_400, 900, now=now)
    assert sorted(removed) == sorted([old_render, old_work])
    assert not old_render.exists() and not old_work.exists()
    assert young_render.exists() and young_work.is_dir() and video.exists()
    assert sweep(tmp_path / "missing", 86_400, 900, now=now) == []


def test_the_synthesizer_sweeps_when_it_starts(tmp_path):
    batch = tmp_path / "b1"
    batch.mkdir()
    stale = batch / ".t1-abc.rendering-1.mp4"
    stale.write_bytes(b"x")
    os.utime(stale, (1.0, 1.0))
    synth = Synthesizer("", output_dir=tmp_path,
                        video=dataclasses.replace(TINY, mode="manifest"))
    asyncio.run(synth.run("b1", "t", {}, {"output": "文字"}))
    assert not stale.exists()


@pytest.mark.parametrize("key,value", [
    ("asset_max_count", 0), ("asset_total_bytes", 1000), ("download_deadline", 0),
    ("asset_private_addresses", "sometimes"), ("work_max_age", 5),
])
def test_bad_limits_are_refused_at_startup(key, value):
    from pipeline.config import check_synthesis
    check_synthesis(SynthesisConfig())
    with pytest.raises(ValueError, match=key):
        check_synthesis(dataclasses.replace(SynthesisConfig(), **{key: value}))


def test_sweep_removes_half_built_drafts(tmp_path):
    now = 1_800_000_000.0
    drafts = tmp_path / "drafts"
    names = {".t1-abc.building-77": 4000, ".t2-abc.old-78": 4000,
             ".t3-abc.building-79": 30, "t4-abc": 90_000}
    for name, age in names.items():
        (drafts / name).mkdir(parents=True)
        os.utime(drafts / name, (now - age, now - age))
    removed = sweep(tmp_path / "out", 86_400, 900, now=now, drafts_dir=drafts)
    assert sorted(p.name for p in removed) == [".t1-abc.building-77", ".t2-abc.old-78"]
    assert sorted(p.name for p in drafts.iterdir()) == [".t3-abc.building-79", "t4-abc"]

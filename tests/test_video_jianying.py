"""JianYing drafts (opt-in): built with pyjianyingdraft 0.3.1 from the same plan as the MP4,
media copied into the draft, paths rewritten for the editors' machines."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from pipeline.clock import FakeClock
from pipeline.config import PipelineConfig, RetryPolicy, SynthesisConfig
from pipeline.standins.sim_assets import video_output
from pipeline.standins.simulator import CozeSimulator
from pipeline.video.jianying import map_path
from pipeline.video.job import make_video

import pyJianYingDraft  # noqa: F401,E402 - the test extra installs it: never skipped


@pytest.mark.parametrize("path,mapping,expected", [
    ("/srv/opsbot/var/jianying/t1/materials/000.png", {"/srv/opsbot/var/jianying": "D:/Drafts"},
     "D:/Drafts/t1/materials/000.png"),
    ("/srv/a/b.png", {"/srv": "X:/s", "/srv/a": "Y:/a"}, "Y:/a/b.png"),     # longest prefix
    ("/srv/ab/c.png", {"/srv/a": "Y:/a"}, "/srv/ab/c.png"),                 # whole segments only
    ("/srv/a/c.png", {"/srv/a/": "/Users/ed/Movies/JianyingPro/"},
     "/Users/ed/Movies/JianyingPro/c.png"),
    ("/x/y.png", {}, "/x/y.png"),
])
def test_map_path(path, mapping, expected):
    assert map_path(path, mapping) == expected


@pytest.mark.cjk_font
def test_a_draft_is_built_beside_the_video(tmp_path):
    drafts = tmp_path / "drafts"
    cfg = SynthesisConfig(width=180, height=320, fps=15, preset="ultrafast", jianying=True,
                          jianying_dir=str(drafts),
                          jianying_path_map={str(drafts): "D:/JianyingPro Drafts"})

    async def go():
        sim = CozeSimulator()
        base = await sim.start()
        try:
            return await make_video("t1", "t1", video_output(base, "j", scenes=2, seconds=1.0),
                                    tmp_path / "out", cfg=cfg, rules=PipelineConfig().rules,
                                    policy=RetryPolicy(), clock=FakeClock(),
                                    allow_loopback=True)
        finally:
            await sim.stop()

    result = asyncio.run(go())
    folder = Path(result["draft"])
    assert folder == drafts / "t1" and Path(result["video"]).is_file()
    assert result["draft_on_editors_machines"] == "D:/JianyingPro Drafts/t1"
    content = json.loads((folder / "draft_content.json").read_text(encoding="utf-8"))
    assert (folder / "draft_meta_info.json").is_file()
    paths = [m["path"] for kind in ("videos", "audios") for m in content["materials"][kind]]
    assert len(paths) == 5 and all(p.startswith("D:/JianyingPro Drafts/t1/materials/")
                                   for p in paths)
    for p in paths:  # every referenced file was copied into the draft
        assert (folder / "materials" / Path(p).name).is_file()
    kinds = sorted(t["type"] for t in content["tracks"])
    assert kinds == ["audio", "audio", "text", "video"]
    video = next(t for t in content["tracks"] if t["type"] == "video")
    assert [s["target_timerange"]["duration"] for s in video["segments"]] == [1_300_000,
                                                                             1_550_000]
    text = next(t for t in content["tracks"] if t["type"] == "text")
    assert len(text["segments"]) >= 2
    assert content["canvas_config"]["width"] == 180 and content["fps"] == 15


@pytest.mark.cjk_font
def test_a_draft_problem_is_a_synthesis_failure_with_its_class(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = SynthesisConfig(width=180, height=320, fps=15, preset="ultrafast", jianying=True,
                          jianying_dir=str(blocker / "drafts"))

    async def go():
        sim = CozeSimulator()
        base = await sim.start()
        try:
            return await make_video("t2", "t2", video_output(base, "k", scenes=1),
                                    tmp_path / "out", cfg=cfg, rules=PipelineConfig().rules,
                                    policy=RetryPolicy(), clock=FakeClock(),
                                    allow_loopback=True)
        finally:
            await sim.stop()

    from pipeline.video.errors import VideoError
    with pytest.raises(VideoError) as err:
        asyncio.run(go())
    assert err.value.code == "jianying_failed"


@pytest.mark.cjk_font
def test_a_draft_build_that_fails_midway_leaves_the_finished_draft_alone(tmp_path):
    """The second build fails after its media are copied and laid out (the subtitles cannot
    be read): the draft from the first build is still whole, nothing half-built is left, and
    a later good build replaces it."""
    from pipeline.video.errors import VideoError
    from pipeline.video.jianying import DONE_MARKER

    drafts = tmp_path / "drafts"
    cfg = SynthesisConfig(width=180, height=320, fps=15, preset="ultrafast", jianying=True,
                          jianying_dir=str(drafts))

    async def go():
        sim = CozeSimulator()
        base = await sim.start()
        out = video_output(base, "m", scenes=2, seconds=1.0)

        def make():
            return make_video("t3", "t3", out, tmp_path / "out", cfg=cfg,
                              rules=PipelineConfig().rules, policy=RetryPolicy(),
                              clock=FakeClock(), allow_loopback=True)
        try:
            first = await make()
            folder = Path(first["draft"])
            before = (folder / "draft_content.json").read_bytes()
            srt = Path(first["subtitles"])
            good_srt = srt.read_text(encoding="utf-8")
            (folder / DONE_MARKER).unlink()             # ask for the draft again …
            srt.write_text("not subtitles at all\n", encoding="utf-8")  # … and break it
            with pytest.raises(VideoError) as err:
                await make()
            after_failure = sorted(p.name for p in drafts.iterdir())
            kept = (folder / "draft_content.json").read_bytes()
            srt.write_text(good_srt, encoding="utf-8")
            again = await make()
            return folder, before, err.value, after_failure, kept, again
        finally:
            await sim.stop()

    folder, before, err, after_failure, kept, again = asyncio.run(go())
    assert err.code == "jianying_failed" and "ValueError" in err.message
    assert after_failure == ["t3"]                      # no half-built folder beside it
    assert kept == before and (folder / "materials").is_dir()
    assert again["reused"] is True and (folder / DONE_MARKER).is_file()
    assert sorted(p.name for p in drafts.iterdir()) == ["t3"]


@pytest.mark.cjk_font
def test_a_draft_folder_without_the_marker_is_built_again(tmp_path):
    """A folder left by a crash mid-build (or by an older version) beside a finished video is
    not taken for a finished draft."""
    from pipeline.video.jianying import DONE_MARKER

    drafts = tmp_path / "drafts"
    cfg = SynthesisConfig(width=180, height=320, fps=15, preset="ultrafast", jianying=True,
                          jianying_dir=str(drafts))

    async def go():
        sim = CozeSimulator()
        base = await sim.start()
        out = video_output(base, "h", scenes=1, seconds=1.0)

        def make():
            return make_video("t4", "t4", out, tmp_path / "out", cfg=cfg,
                              rules=PipelineConfig().rules, policy=RetryPolicy(),
                              clock=FakeClock(), allow_loopback=True)
        try:
            await make()
            half = drafts / "t4"
            (half / "draft_content.json").unlink()       # as a crash before save() left it
            (half / DONE_MARKER).unlink(missing_ok=True)
            return half, await make()
        finally:
            await sim.stop()

    half, result = asyncio.run(go())
    assert result["reused"] is True                     # the MP4 itself was fine
    assert result["draft"] == str(half.resolve())
    content = json.loads((half / "draft_content.json").read_text(encoding="utf-8"))
    assert len(content["tracks"]) >= 2 and (half / DONE_MARKER).is_file()
    assert sorted(p.name for p in drafts.iterdir()) == ["t4"]

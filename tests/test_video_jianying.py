"""JianYing drafts (opt-in): built with pyjianyingdraft 0.3.1 from the same plan as the MP4,
media copied into the draft, paths rewritten for the editors' machines."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from pipeline.clock import FakeClock
from pipeline.config import PipelineConfig, RetryPolicy, SynthesisConfig
from pipeline.sim_assets import video_output
from pipeline.simulator import CozeSimulator
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

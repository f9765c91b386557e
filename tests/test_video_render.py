"""The video step end to end through the real ffmpeg binary, with assets served by the Coze
simulator over real HTTP: duration, streams, burned CJK subtitles, reuse, fonts, timeouts."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
from pathlib import Path

import pytest

from pipeline.clock import FakeClock
from pipeline.config import PipelineConfig, RetryPolicy, SynthesisConfig
from pipeline.standins.sim_assets import video_output
from pipeline.standins.simulator import CozeSimulator
from pipeline.video import fonts
from pipeline.video.errors import VideoError
from pipeline.video.job import make_video
from pipeline.video.media import ffmpeg_exe, probe

TINY = SynthesisConfig(width=180, height=320, fps=15, preset="ultrafast", crf=30,
                       scene_padding=0.2, asset_timeout=5.0)
RULES = PipelineConfig().rules
RETRY = RetryPolicy(max_attempts=3, initial=0.5, maximum=1.0, max_total=10)
DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def _video(output, out_dir: Path, cfg: SynthesisConfig = TINY, name: str = "t1",
           clock=None):
    return make_video(name, name, output, out_dir, cfg=cfg, rules=RULES, policy=RETRY,
                      clock=clock or FakeClock(), allow_loopback=True)


def serve(test):
    """Run ``test(sim, base_url)`` (a coroutine function) with a started simulator."""
    async def go():
        sim = CozeSimulator()
        base = await sim.start()
        try:
            return await test(sim, base)
        finally:
            await sim.stop()
    return asyncio.run(go())


def streams(path: str) -> str:
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", path], capture_output=True,
                         text=True)
    return out.stderr


def frame(path: str, at: float) -> bytes:
    """The frame at ``at`` seconds as 8-bit gray pixels."""
    return subprocess.run([ffmpeg_exe(), "-v", "error", "-ss", str(at), "-i", path,
                           "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "gray", "-"],
                          capture_output=True, check=True).stdout


def no_leftovers(out_dir: Path) -> None:
    assert not list(out_dir.glob("*.mp4")), "a video was published"
    assert not list(out_dir.glob(".*rendering*")), "a half-written video was left"


@pytest.mark.cjk_font
def test_a_short_video_with_burned_chinese_subtitles(tmp_path):
    async def test(sim, base):
        out = video_output(base, "v1", scenes=2, seconds=1.0)
        on = await _video(out, tmp_path / "on")
        off = await _video(out, tmp_path / "off", dataclasses.replace(TINY, subtitles="off"))
        return on, off

    on, off = serve(test)
    # narration drives the length: 1.0 + 0.2 padding, then 1.25 + 0.2
    assert on["duration"] == pytest.approx(2.65, abs=0.1)
    assert (on["width"], on["height"]) == (180, 320) and on["size"] > 1000
    assert Path(on["video"]).is_absolute() and Path(on["video"]).is_file()
    info = streams(on["video"])
    assert "Video: h264" in info and "Audio: aac" in info
    assert on["shape"] == "arrays" and on["scenes"] == 2 and on["assets"] == 5
    srt = Path(on["subtitles"]).read_text(encoding="utf-8")
    assert "清晨，" in srt and "00:00:01,200 -->" in srt
    # the same picture with and without subtitles: only the subtitle band differs
    a, b = frame(on["video"], 0.5), frame(off["video"], 0.5)
    rows = [sum(x != y and abs(x - y) > 40 for x, y in zip(a[r * 180:(r + 1) * 180],
                                                              b[r * 180:(r + 1) * 180]))
            for r in range(320)]
    assert sum(rows[:200]) == 0, "pixels above the subtitle band changed"
    assert sum(rows[250:]) > 50, "no subtitle was drawn at the bottom"


@pytest.mark.parametrize("shape,audio,duration", [
    ("jianying", "wav", 2.25),   # timed lists: 1.0 + 1.25, no padding
    ("single", "mp3", 2.2),      # one narration of 2.0 s (+0.2) over a 1 s clip that loops
])
@pytest.mark.cjk_font
def test_the_other_shapes_render(tmp_path, shape, audio, duration):
    async def test(sim, base):
        return await _video(video_output(base, "s", shape=shape, audio=audio, seconds=1.0),
                            tmp_path)

    result = serve(test)
    assert result["shape"] == shape
    assert result["duration"] == pytest.approx(duration, abs=0.12)
    info = streams(result["video"])
    assert "Video: h264" in info and "Audio: aac" in info


@pytest.mark.cjk_font
def test_a_video_that_exists_is_not_rendered_or_downloaded_again(tmp_path):
    async def test(sim, base):
        out = video_output(base, "again", scenes=1, seconds=1.0)
        first = await _video(out, tmp_path)
        before = dict(sim.assets.requests)
        mtime = Path(first["video"]).stat().st_mtime_ns
        second = await _video(out, tmp_path)
        return first, second, before, dict(sim.assets.requests), mtime

    first, second, before, after, mtime = serve(test)
    assert not first["reused"] and second["reused"]
    assert before == after, "assets were downloaded again"
    assert Path(second["video"]).stat().st_mtime_ns == mtime
    assert second["video"] == first["video"] and second["duration"] == first["duration"]
    assert not list(tmp_path.glob(".work-*")), "work files were not cleaned up"


def test_no_cjk_font_is_a_clear_error_naming_the_fix(tmp_path):
    with pytest.raises(VideoError) as err:
        fonts.find_font("", candidates=())
    assert err.value.code == "font_missing"
    assert "apt-get install fonts-wqy-microhei" in err.value.message
    assert "font_file" in err.value.message and 'subtitles = "off"' in err.value.message
    with pytest.raises(VideoError, match="does not exist") as err:
        fonts.find_font(str(tmp_path / "nope.ttf"))
    assert err.value.code == "font_missing"


@pytest.mark.cjk_font
def test_the_default_font_has_the_glyphs_the_demo_shows():
    font = fonts.find_font()  # CI installs fonts-wqy-microhei: this must not be skipped
    fonts.check_glyphs(font, "清晨，橘猫在窗台上伸了个懒腰。Hello 世界！")
    assert font.family


def test_a_font_without_chinese_glyphs_fails_before_rendering(tmp_path):
    assert Path(DEJAVU).is_file()
    cfg = dataclasses.replace(TINY, font_file=DEJAVU)

    async def test(sim, base):
        with pytest.raises(VideoError) as err:
            await _video(video_output(base, "f", scenes=1), tmp_path, cfg)
        return err.value

    err = serve(test)
    assert err.code == "font_glyphs" and "清" in err.message and "DejaVu" in err.message
    no_leftovers(tmp_path)


def test_subtitles_off_needs_no_font(tmp_path):
    cfg = dataclasses.replace(TINY, subtitles="off", font_file=str(tmp_path / "missing.ttf"))

    async def test(sim, base):
        return await _video(video_output(base, "o", scenes=1), tmp_path, cfg)

    result = serve(test)
    assert Path(result["video"]).is_file() and Path(result["subtitles"]).is_file()


@pytest.mark.cjk_font
def test_a_render_past_its_timeout_is_killed_and_leaves_no_video(tmp_path):
    cfg = dataclasses.replace(TINY, render_timeout=0.05, width=1080, height=1920,
                              preset="veryslow")

    async def test(sim, base):
        with pytest.raises(VideoError) as err:
            await _video(video_output(base, "slow", scenes=2, seconds=3.0), tmp_path, cfg)
        return err.value

    err = serve(test)
    assert err.code == "render_timeout"
    no_leftovers(tmp_path)
    assert list(tmp_path.glob(".work-*/assets/*")), "downloads are kept for the next attempt"


@pytest.mark.cjk_font
def test_the_result_duration_is_measured_from_the_file(tmp_path):
    async def test(sim, base):
        result = await _video(video_output(base, "m", scenes=1, seconds=1.5), tmp_path)
        measured = await probe(ffmpeg_exe(), result["video"])
        return result, measured

    result, measured = serve(test)
    assert measured.kind == "video" and measured.has_audio
    assert result["duration"] == pytest.approx(measured.duration)


@pytest.mark.cjk_font
def test_pictures_and_clips_mixed_in_one_timed_list(tmp_path):
    async def test(sim, base):
        a = f"{base}/_sim/assets"
        out = {"image_infos": json.dumps([{"image_url": f"{a}/img-m1.png", "start": 0,
                                           "end": 1000}]),
               "video_infos": json.dumps([{"video_url": f"{a}/clip-m2.mp4?seconds=1",
                                           "start": 1000, "end": 2500}]),
               "audio_infos": json.dumps([{"audio_url": f"{a}/tone-m3.wav?seconds=2.5",
                                           "start": 0, "end": 2500}]),
               "captions": json.dumps([{"start": 0, "end": 2500, "text": "图片接视频"}],
                                      ensure_ascii=False)}
        return await _video(out, tmp_path)

    result = serve(test)
    assert result["shape"] == "jianying" and result["scenes"] == 2
    assert result["duration"] == pytest.approx(2.5, abs=0.1)
    a, b = frame(result["video"], 0.5), frame(result["video"], 2.0)
    assert a[:180 * 100] != b[:180 * 100], "the clip did not follow the picture"


def test_pictures_alone_get_a_silent_sound_track(tmp_path):
    async def test(sim, base):
        a = f"{base}/_sim/assets"
        return await _video({"images": [f"{a}/img-s1.png", f"{a}/img-s2.png"],
                             "durations": [1.0, 0.5]}, tmp_path)

    result = serve(test)
    assert result["duration"] == pytest.approx(1.5, abs=0.1) and result["subtitles"] is None
    info = streams(result["video"])
    assert "Video: h264" in info and "Audio: aac" in info

"""Bad assets give clear failure classes and never a half-written video.

The Coze simulator serves the assets over real HTTP with scripted faults; the retry waits run
on a FakeClock (nothing sleeps), only the slow-server case waits for the real download timeout.
"""
from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from pipeline.clock import FakeClock
from pipeline.config import PipelineConfig, RetryPolicy, SynthesisConfig
from pipeline.sim_assets import video_output
from pipeline.simulator import CozeSimulator
from pipeline.video.errors import AssetError
from pipeline.video.job import make_video

TINY = SynthesisConfig(width=180, height=320, fps=15, preset="ultrafast", crf=30,
                       asset_timeout=5.0)
RULES = PipelineConfig().rules
RETRY = RetryPolicy(max_attempts=3, initial=0.5, maximum=1.0, max_total=10)


def attempt(tmp_path: Path, query: str, cfg: SynthesisConfig = TINY, shape: str = "arrays"):
    """Make a one-scene video whose every asset URL carries ``query``; returns
    (result or AssetError, requests per asset path, the clock)."""
    clock = FakeClock()

    async def go():
        sim = CozeSimulator()
        base = await sim.start()
        try:
            out = video_output(base, "bad", scenes=1, seconds=1.0, query=query, shape=shape)
            try:
                result = await make_video("bad", "bad", out, tmp_path, cfg=cfg, rules=RULES,
                                          policy=RETRY, clock=clock, allow_loopback=True)
            except AssetError as exc:
                result = exc
            return result, dict(sim.assets.requests)
        finally:
            await sim.stop()
    result, requests = asyncio.run(go())
    return result, requests, clock


def assert_no_video(tmp_path: Path) -> None:
    assert not list(tmp_path.glob("*.mp4"))
    assert not list(tmp_path.glob(".*rendering*"))
    assert not list(tmp_path.glob(".work-*/assets/*.part"))


@pytest.mark.parametrize("query,code,needle,tries", [
    ("fault=404", "asset_not_found", "HTTP 404", 1),
    ("x-expires=1700000000", "asset_expired", "x-expires 2023-11-14", 1),
    ("fault=403", "asset_expired", "run the workflow again", 1),
    ("fault=html", "asset_bad_type", "'text/html'", 1),
    ("fault=huge", "asset_too_large", "300,000,000 bytes", 1),
    ("fault=corrupt", "asset_corrupt", "not a readable", 1),
])
def test_bad_assets_fail_with_their_class(tmp_path, query, code, needle, tries):
    err, requests, clock = attempt(tmp_path, query)
    assert isinstance(err, AssetError), err
    assert err.code == code and needle in err.message, err.message
    assert "/_sim/assets/" in err.url and "?" not in err.url  # the signature is not logged
    assert max(requests.values()) == tries, requests       # not retried
    assert clock.slept == []
    assert_no_video(tmp_path)


def test_a_stream_without_length_is_cut_at_the_limit(tmp_path):
    cfg = dataclasses.replace(TINY, asset_max_bytes=200_000)
    err, _, _ = attempt(tmp_path, "fault=endless", cfg)
    assert err.code == "asset_too_large" and "200,000 bytes" in err.message
    assert_no_video(tmp_path)


def test_a_slow_server_times_out_after_the_retries(tmp_path):
    cfg = dataclasses.replace(TINY, asset_timeout=0.4)
    err, requests, clock = attempt(tmp_path, "fault=slow", cfg)
    assert err.code == "asset_timeout" and "0.4 s" in err.message
    # a timeout is a network error to the classifier: retried with backoff, then given up
    assert max(requests.values()) == RETRY.max_attempts
    assert len(clock.slept) >= RETRY.max_attempts - 1  # waited on the fake clock
    assert_no_video(tmp_path)


def test_a_server_error_is_retried_and_the_video_made(tmp_path):
    result, requests, clock = attempt(tmp_path, "fault=500once")
    assert isinstance(result, dict), result
    assert Path(result["video"]).is_file()
    assert sorted(set(requests.values())) == [2]   # each asset: a 500, then the file
    assert len(clock.slept) >= 1


def test_an_image_where_audio_was_expected_is_refused(tmp_path):
    out_dir = tmp_path

    async def go():
        sim = CozeSimulator()
        base = await sim.start()
        try:
            a = f"{base}/_sim/assets"
            out = {"images": [f"{a}/img-x.png"], "mp3_urls": [f"{a}/img-y.png"]}
            with pytest.raises(AssetError) as err:
                await make_video("w", "w", out, out_dir, cfg=TINY, rules=RULES, policy=RETRY,
                                 clock=FakeClock(), allow_loopback=True)
            return err.value
        finally:
            await sim.stop()

    err = asyncio.run(go())
    # served as image/png for an audio slot: refused by its type before it is probed
    assert err.code == "asset_bad_type" and "expected audio" in err.message
    assert_no_video(out_dir)

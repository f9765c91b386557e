"""Bad assets give clear failure classes and never a half-written video.

The Coze simulator serves the assets over real HTTP with scripted faults; the retry waits run
on a FakeClock (nothing sleeps), only the slow-server case waits for the real download timeout.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from urllib.parse import quote

import pytest

from pipeline.clock import FakeClock
from pipeline.config import PipelineConfig, RetryPolicy, SynthesisConfig
from pipeline.standins.sim_assets import video_output
from pipeline.standins.simulator import CozeSimulator
from pipeline.video.assets import Limits, address_allowed
from pipeline.video.errors import AssetError, VideoError
from pipeline.video.job import make_video

TINY = SynthesisConfig(width=180, height=320, fps=15, preset="ultrafast", crf=30,
                       asset_timeout=5.0)
RULES = PipelineConfig().rules
RETRY = RetryPolicy(max_attempts=3, initial=0.5, maximum=1.0, max_total=10)


def attempt(tmp_path: Path, query: str, cfg: SynthesisConfig = TINY, shape: str = "arrays",
            *, allow_loopback: bool = True, edit=None, scenes: int = 1):
    """Make a video whose every asset URL carries ``query``; returns (result or
    VideoError, requests per asset path, the clock). ``edit(out, base)`` changes the output
    first."""
    clock = FakeClock()

    async def go():
        sim = CozeSimulator()
        base = await sim.start()
        try:
            out = video_output(base, "bad", scenes=scenes, seconds=1.0, query=query,
                               shape=shape)
            if edit is not None:
                edit(out, base)
            try:
                result = await make_video("bad", "bad", out, tmp_path, cfg=cfg, rules=RULES,
                                          policy=RETRY, clock=clock,
                                          allow_loopback=allow_loopback)
            except VideoError as exc:
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


@pytest.mark.cjk_font
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


# ---- limits per task --------------------------------------------------------------------


@pytest.mark.cjk_font
def test_more_assets_than_allowed_are_refused_before_any_download(tmp_path):
    cfg = dataclasses.replace(TINY, asset_max_count=4)
    err, requests, _ = attempt(tmp_path, "", cfg, scenes=2)   # 2 pictures, 2 voices, music
    assert isinstance(err, VideoError) and err.code == "bad_timeline"
    assert "5 assets" in err.message and "asset_max_count (4)" in err.message
    assert requests == {}
    ok, _, _ = attempt(tmp_path, "", dataclasses.replace(TINY, asset_max_count=5), scenes=2)
    assert isinstance(ok, dict), ok


def test_the_task_s_downloads_share_one_byte_budget(tmp_path):
    """Every asset is far below asset_max_bytes; together they pass asset_total_bytes."""
    cfg = dataclasses.replace(TINY, asset_total_bytes=60_000, download_concurrency=1)
    err, requests, _ = attempt(tmp_path, "", cfg, scenes=3)
    assert isinstance(err, AssetError) and err.code == "asset_too_large"
    assert "60,000 bytes (asset_total_bytes)" in err.message
    assert max(requests.values()) == 1          # a limit, not a blip: not retried
    assert_no_video(tmp_path)
    assert not list(tmp_path.glob(".work-*"))   # nothing worth keeping for another try


def test_all_downloads_together_stop_at_the_deadline(tmp_path):
    """Each download is within asset_timeout; the task's downloads together are not."""
    cfg = dataclasses.replace(TINY, asset_timeout=30.0, download_deadline=0.5)
    err, requests, _ = attempt(tmp_path, "fault=slow", cfg)
    assert isinstance(err, AssetError) and err.code == "asset_timeout"
    assert "0.5 s together (download_deadline)" in err.message
    assert_no_video(tmp_path)


@pytest.mark.parametrize("shape,edit", [
    ("arrays", lambda out, base: out.update(mp3_durations=[700.0])),
    ("jianying", lambda out, base: out.update(captions=json.dumps(
        [{"start": 0, "end": 900_000_000, "text": "很长"}]))),
])
def test_declared_durations_past_max_duration_are_refused_before_downloading(tmp_path, shape,
                                                                              edit):
    err, requests, _ = attempt(tmp_path, "", TINY, shape, edit=edit)
    assert isinstance(err, VideoError) and err.code == "bad_timeline"
    assert "longer than max_duration (600 s)" in err.message
    assert requests == {}


# ---- private and loopback addresses -----------------------------------------------------


@pytest.mark.parametrize("address,auto,auto_loopback,refuse", [
    ("93.184.216.34", True, True, True),
    ("2606:2800:220:1::1", True, True, True),
    ("127.0.0.1", False, True, False),
    ("::1", False, True, False),
    ("::ffff:127.0.0.1", False, True, False),
    ("10.0.0.5", False, False, False),
    ("172.16.3.4", False, False, False),
    ("192.168.1.1", False, False, False),
    ("169.254.169.254", False, False, False),    # cloud metadata
    ("100.64.0.1", False, False, False),         # carrier-grade NAT
    ("fd00::1", False, False, False),
    ("fe80::1%eth0", False, False, False),
    ("0.0.0.0", False, False, False),
    ("224.0.0.1", False, False, False),
])
def test_address_allowed(address, auto, auto_loopback, refuse):
    assert address_allowed(address, Limits(private="auto")) is auto
    assert address_allowed(address, Limits(private="auto", allow_loopback=True)) is auto_loopback
    assert address_allowed(address, Limits(private="refuse", allow_loopback=True)) is refuse
    assert address_allowed(address, Limits(private="allow")) is True


def test_loopback_assets_are_refused_unless_coze_itself_is_on_loopback(tmp_path):
    err, requests, _ = attempt(tmp_path, "", allow_loopback=False)
    assert isinstance(err, AssetError) and err.code == "asset_blocked"
    assert "127.0.0.1" in err.message and "asset_private_addresses" in err.message
    assert requests == {}


def test_a_name_that_resolves_to_loopback_is_refused_at_connect_time(tmp_path):
    """``localhost`` is not an address literal: the resolver's answer is checked."""
    def by_name(out, base):
        for key in ("images", "mp3_urls"):
            out[key] = [u.replace("127.0.0.1", "localhost") for u in out[key]]
        out["bg_audio"] = out["bg_audio"].replace("127.0.0.1", "localhost")
    err, requests, _ = attempt(tmp_path, "", allow_loopback=False, edit=by_name)
    assert isinstance(err, AssetError) and err.code == "asset_blocked", err
    assert "localhost" in err.message and requests == {}


def test_a_redirect_to_a_private_address_is_not_followed(tmp_path):
    """The first hop is allowed (the simulator, on loopback like Coze); where it bounces to
    (the cloud metadata address) is not."""
    target = "http://169.254.169.254/latest/meta-data/iam"
    err, requests, _ = attempt(tmp_path, "fault=redirect&to=" + target)
    assert isinstance(err, AssetError) and err.code == "asset_blocked"
    assert "169.254.169.254" in err.message
    assert max(requests.values()) == 1


@pytest.mark.cjk_font
def test_a_redirect_to_an_allowed_address_is_followed(tmp_path):
    def bounce(out, base):
        real = out["images"][0]
        out["images"][0] = (f"{base}/_sim/assets/img-hop.png?fault=redirect&to="
                            + quote(real, safe=""))
    result, requests, _ = attempt(tmp_path, "", edit=bounce)
    assert isinstance(result, dict), result
    assert any("fault=redirect" in p for p in requests)


def test_refuse_also_refuses_loopback_when_coze_is_there(tmp_path):
    cfg = dataclasses.replace(TINY, asset_private_addresses="refuse")
    err, requests, _ = attempt(tmp_path, "", cfg, allow_loopback=True)
    assert isinstance(err, AssetError) and err.code == "asset_blocked" and requests == {}

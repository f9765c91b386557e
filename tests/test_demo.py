"""``opsbot demo``: the whole loop on loopback, asserted on the printed transcript."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import _cjk_font_missing

from bot.ops import demo
from pipeline.video.media import ffmpeg_exe
from pipeline.synthesis import file_name

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = SimpleNamespace(language="en", timezone="Asia/Shanghai")


def _threads_settle(before: set[int], timeout: float = 10.0) -> list[threading.Thread]:
    """Threads started since ``before`` that are still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _today() -> str:
    """Today in the demo's time zone: its report card is today's, with the batch it ran."""
    from datetime import datetime
    from zoneinfo import ZoneInfo
    return datetime.now(ZoneInfo(SETTINGS.timezone)).date().isoformat()


def _after(text: str, *parts: str) -> None:
    """Each part occurs in ``text``, in this order."""
    at = 0
    for part in parts:
        found = text.find(part, at)
        assert found >= 0, f"{part!r} not found after position {at}:\n{text}"
        at = found + len(part)


def test_demo_plays_the_whole_loop_in_process(tmp_path):
    before = {t.ident for t in threading.enumerate()}
    handlers = list(logging.getLogger().handlers)
    out = io.StringIO()
    started = time.monotonic()
    code = demo.run_demo(SETTINGS, out=out, base_dir=tmp_path, pace=0.5, color=False)
    took = time.monotonic() - started
    text = out.getvalue()
    assert code == 0, text
    assert took < 60, took
    _after(text,
           "张三: @opsbot help", "replying to 张三's “@opsbot help”", "[blue] opsbot help",
           "张三: @opsbot run", "[green] Batch queued", "Queued 8 tasks",
           "[orange] [MEDIUM] Task failed: plugin_timeout", "V003", "[ Retry ]",
           "the plugin is back", "张三 presses [ Retry ]", "⟨toast success⟩",
           "(card updated)", "[green] [MEDIUM] Task failed: plugin_timeout", "Resolved",
           "[red] [HIGH] Batch blocked: auth", "@张三", "[ Resume ]",
           "张三 presses [ Resume ]", "⟨toast success⟩", "[green] [HIGH] Batch blocked: auth",
           "Batch finished", "8 tasks: 8 succeeded, 0 failed",
           "张三: @opsbot status", "done",
           "张三: @opsbot report --date " + _today(), "Daily report " + _today(),
           "Runs 8: 8 succeeded, 0 failed", "chart: bar, count by hour", "█",
           "Done", "database", "results", "output files", "video V001", ".mp4 (",
           "video V008", "FEISHU_APP_ID")
    if os.environ.get("CI", "").lower() == "true" or _cjk_font_missing() is None:
        # with a CJK font (CI installs one) the videos carry subtitles
        assert "Subtitles are off" not in text
    else:   # a machine without one: the demo says so and makes the videos without them
        assert "Subtitles are off" in text
    assert "\033[" not in text
    # the files it points to
    run_dir = next(tmp_path.glob("demo-*"))
    assert (run_dir / "opsbot.db").exists() and (run_dir / "opsbot.log").exists()
    results = json.loads(next((run_dir / "results").glob("*.json")).read_text())
    assert results["counts"]["succeeded"] == 8 and len(results["tasks"]) == 8
    # every task ends with a playable video (h264 + aac) whose path the outro prints
    videos = sorted((run_dir / "output").rglob("*.mp4"))
    assert [v.stem for v in videos] == [file_name(f"V00{i}") for i in range(1, 9)]
    for v in videos:
        assert f"{v}" in text
    info = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(videos[0])],
                          capture_output=True, text=True).stderr
    assert "Video: h264" in info and "Audio: aac" in info and "360x640" in info
    assert (run_dir / "transcript.txt").read_text(encoding="utf-8").strip() == text.strip()
    # nothing left running, logging given back
    assert _threads_settle(before) == []
    assert logging.getLogger().handlers == handlers


def test_a_step_that_does_not_happen_ends_the_demo_with_a_clear_message(tmp_path, monkeypatch):
    before = {t.ident for t in threading.enumerate()}
    monkeypatch.setattr(demo, "STEP_TIMEOUT", 6.0)
    monkeypatch.setattr(demo.Demo, "_card_titled", lambda self, prefix: None)
    out = io.StringIO()
    code = demo.run_demo(SETTINGS, out=out, base_dir=tmp_path, pace=0.3, color=False)
    text = out.getvalue()
    assert code == 1
    assert "opsbot demo: step timed out after 6 s waiting for the MEDIUM alert card" in text
    assert "opsbot.log" in text and "Done" not in text
    assert _threads_settle(before) == []


@pytest.mark.slow
def test_opsbot_demo_from_another_directory_as_a_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEISHU_", "COZE_",
                                                                      "OPSBOT_", "BITABLE_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bot.ops.cli", "demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert took < 90, took
    _after(proc.stdout, "@opsbot help", "@opsbot run", "[MEDIUM]", "presses [ 重试 ]",
           "[HIGH]", "presses [ 恢复 ]", "@opsbot status", "@opsbot report", "chart: bar",
           "Done", "video V008", str(tmp_path))
    assert "Traceback" not in proc.stderr
    assert list((tmp_path / "var").glob("demo-*/opsbot.db"))

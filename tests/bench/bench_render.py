"""Benchmark (prints figures, asserts nothing): the built-in video step on a 30 s video.

Each video: 6 scenes of 5 s narration (WAV) over 1080x1920 PNG pictures, background music,
12 burned Chinese subtitle lines, 1080x1920 at 30 fps, libx264 ``veryfast`` crf 23 (the
defaults), assets served by the Coze simulator over loopback HTTP. Measured end to end through
:class:`pipeline.synthesis.Synthesizer` (download, probe, normalise, subtitles, render):

- ``one``: four videos one after another: seconds per video;
- ``four``: four videos at once (``max_synthesis`` 4): wall time for the four, seconds per
  video, and the peak memory of all ffmpeg processes together.

Memory is sampled every 50 ms from ``/proc`` (resident set of every descendant process) and
reported as the peak sum; ``ru_maxrss`` of the children is the largest single process. CPU
seconds of the ffmpeg processes per video are printed too: unlike wall time, they barely change
when other programs share the machine.

    python -m tests.bench.bench_render [--seconds 30] [--videos 4] [--preset veryfast]
                                       [--no-subtitles] [--size 1080x1920]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

from pipeline.config import SynthesisConfig
from pipeline.standins.sim_assets import TEXTS, video_output
from pipeline.standins.simulator import CozeSimulator
from pipeline.synthesis import Synthesizer


class TreeMemory:
    """Peak summed RSS (bytes) of this process's descendants, sampled from /proc."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        me = os.getpid()
        while not self._stop.wait(0.05):
            parents: dict[int, int] = {}
            rss: dict[int, int] = {}
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                    parents[int(entry)] = int(stat[1])
                    rss[int(entry)] = int(stat[21]) * page
                except (OSError, IndexError, ValueError):
                    continue
            total = 0
            for pid in rss:
                p, seen = pid, 0
                while p in parents and p != me and seen < 64:
                    p, seen = parents[p], seen + 1
                if p == me and pid != me:
                    total += rss[pid]
            self.peak = max(self.peak, total)


def _child_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes (every ffmpeg run)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


async def one_batch(base: str, cfg: SynthesisConfig, out: Path, n: int, seconds: float,
                    at_once: bool) -> list[float]:
    scene = seconds / 6
    synth = Synthesizer("", workers=4 if at_once else 1, output_dir=out, video=cfg,
                        timeout=3600, coze_base_url=base)
    texts = [t for t in TEXTS for _ in range(3)]

    async def job(i: int) -> float:
        started = time.monotonic()
        output = video_output(base, f"b{i}-{time.monotonic_ns()}", scenes=6,
                              seconds=scene - 0.25 * 2.5, texts=texts)
        result = await synth.run("bench", f"v{i}", {}, output)
        assert Path(result["video"]).is_file()
        return time.monotonic() - started

    if at_once:
        return list(await asyncio.gather(*(job(i) for i in range(n))))
    return [await job(i) for i in range(n)]


async def main(args: argparse.Namespace) -> None:
    w, h = (int(x) for x in args.size.split("x"))
    cfg = SynthesisConfig(width=w, height=h, preset=args.preset,
                          subtitles="off" if args.no_subtitles else "burn", scene_padding=0.0,
                          subtitle_max_chars=16)
    sim = CozeSimulator()
    sim.assets.image_size = (w, h)
    base = await sim.start()
    tmp = Path(tempfile.mkdtemp(prefix="opsbot-bench-render-"))
    try:
        print(f"{args.videos} videos of {args.seconds:g} s, {w}x{h} @ {cfg.fps} fps, x264 "
              f"{cfg.preset} crf {cfg.crf}, subtitles {cfg.subtitles}, {os.cpu_count()} cores")
        for mode, at_once in (("one", False), ("four", True)):
            out = tmp / mode
            cpu0 = _child_cpu()
            with TreeMemory() as mem:
                started = time.monotonic()
                times = await one_batch(base, cfg, out, args.videos, args.seconds, at_once)
                wall = time.monotonic() - started
            cpu = (_child_cpu() - cpu0) / args.videos
            videos = sorted(out.rglob("*.mp4"))
            size = sum(v.stat().st_size for v in videos) / len(videos) / 1e6
            print(f"{mode:>4} at a time: wall {wall:6.1f} s for {len(videos)}, "
                  f"{wall / len(videos):5.1f} s per video (each job {min(times):.1f}-"
                  f"{max(times):.1f} s), peak memory of all ffmpeg processes "
                  f"{mem.peak / 1e6:6.0f} MB, {size:.1f} MB per video, ffmpeg CPU "
                  f"{cpu:.1f} s per video")
        maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"largest single ffmpeg process: {maxrss:.0f} MB (ru_maxrss)")
    finally:
        await sim.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m tests.bench.bench_render")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--preset", default="veryfast")
    ap.add_argument("--size", default="1080x1920")
    ap.add_argument("--no-subtitles", action="store_true")
    asyncio.run(main(ap.parse_args()))

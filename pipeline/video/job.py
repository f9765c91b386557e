"""One task's video: timeline, downloads, probes, plan, subtitles, render, draft, result.

:func:`make_video` returns None when the output carries no media (``mode = "auto"`` then
writes a manifest instead) and otherwise the result dict the worker stores and the Bitable
upload reads::

    {"video": "/abs/path/TASK.mp4", "duration": 9.48, "size": 123456, "width": 1080,
     "height": 1920, "subtitles": "/abs/path/TASK.srt" or None, "shape": "arrays",
     "scenes": 2, "assets": 5, "reused": False,
     "draft": "/abs/drafts/TASK", "draft_on_editors_machines": "D:/drafts/TASK"}  # drafts on

``NAME`` is :func:`pipeline.synthesis.file_name` of the task key (distinct per key). An
existing MP4 is reused (nothing downloaded or rendered) only when its sidecar
``.NAME.mp4.done.json``, written atomically after the MP4 was renamed into place, records the
same :func:`fingerprint` (the workflow output and the settings that change the picture or
sound); otherwise the video is rendered again and renamed over the old one. Downloads and
intermediate files live in ``<out_dir>/.work-NAME/`` and are removed after success (kept with
``keep_work_files``), and after a failure the next attempt cannot use them for (see
``_KEEP_AFTER``); :meth:`pipeline.synthesis.Synthesizer.discard` removes them when the task
fails for good.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..clock import Clock
from ..config import RetryPolicy, Rule, SynthesisConfig
from . import adapters, fonts, media, render, subtitles
from .assets import Limits, download_all
from .errors import AssetError, VideoError
from .timeline import Layout, Media, Plan, Timeline, plan as make_plan


async def make_video(task_key: str, name: str, coze_output: Any, out_dir: Path, *,
                     cfg: SynthesisConfig, rules: tuple[Rule, ...], policy: RetryPolicy,
                     clock: Clock, require: bool = False, slot: Any = None,
                     timeout: float | None = None, allow_loopback: bool = False) -> dict | None:
    """Render ``coze_output`` to ``out_dir/NAME.mp4``; see the module docstring.
    ``require``: an output without media is an error (``no_timeline``) instead of None.

    The downloads start at once (signed URLs expire); only the work after them waits for
    ``slot`` (an async context manager: the synthesis workers) and is bounded by ``timeout``
    seconds (:class:`VideoError` ``timeout``). ``allow_loopback``: asset URLs on loopback are
    fetched under ``asset_private_addresses = "auto"`` (Coze itself is on loopback)."""
    timeline = adapters.to_timeline(coze_output, cfg.mapping or None, cfg.time_unit)
    if timeline is None:
        if require:
            raise VideoError("no_timeline", "the workflow output has no images, clips or audio "
                                            "that a known shape or the mapping names")
        return None
    check_declared(timeline, cfg)
    ffmpeg = media.ffmpeg_exe(cfg.ffmpeg)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = (out_dir / f"{name}.mp4").resolve()
    stamp = fingerprint(coze_output, cfg)
    reuse = final.is_file() and _read_done(final) == stamp
    if reuse and not (cfg.jianying and not draft_ready(cfg, name)):
        return await _result(ffmpeg, final, timeline, reused=True)
    if not reuse:  # another output (a retry's new run) or other settings: render again
        _done_path(final).unlink(missing_ok=True)
    work = out_dir / f".work-{name}"
    work.mkdir(parents=True, exist_ok=True)
    kinds = _kinds(timeline)
    try:
        paths = await download_all(
            kinds, work / "assets", rules=rules, policy=policy, clock=clock,
            limits=Limits(cfg.asset_max_bytes, cfg.asset_timeout, cfg.download_concurrency,
                          max_count=cfg.asset_max_count, total_bytes=cfg.asset_total_bytes,
                          deadline=cfg.download_deadline,
                          private=cfg.asset_private_addresses, allow_loopback=allow_loopback))
        async with (slot or contextlib.nullcontext()):
            try:
                result = await asyncio.wait_for(
                    _build(ffmpeg, timeline, paths, kinds, work, final, name, cfg, reuse,
                           stamp), timeout)
            except asyncio.TimeoutError:
                raise VideoError("timeout", f"synthesis timed out after {timeout:g}s") from None
    except VideoError as exc:
        if not _reusable(exc):  # the next attempt cannot use these files: do not keep them
            shutil.rmtree(work, ignore_errors=True)
        raise
    if not cfg.keep_work_files:
        shutil.rmtree(work, ignore_errors=True)
    return result


# Failures after which the downloads are worth keeping for the next attempt (the same URLs
# fetched again): a dropped connection, a timeout, a failed render. After the others (the URL
# is gone or expired, the output is unusable, a limit was passed) the next attempt needs a new
# run or a new configuration, and the files are only disk space.
_KEEP_AFTER = {"asset_timeout", "asset_network", "asset_http", "render_failed",
               "render_timeout", "timeout", "font_missing", "font_glyphs",
               "jianying_unavailable", "jianying_failed"}


def _reusable(exc: VideoError) -> bool:
    return exc.code in _KEEP_AFTER


def check_declared(timeline: Timeline, cfg: SynthesisConfig) -> None:
    """Refuse, before any download, an output whose declared times already pass
    ``max_duration`` or whose asset count passes ``asset_max_count``."""
    count = len(timeline.urls())
    if count > cfg.asset_max_count:
        raise VideoError("bad_timeline", f"the output names {count} assets, more than "
                                         f"asset_max_count ({cfg.asset_max_count})")
    scenes = sum(s.duration or 0.0 for s in timeline.scenes if s.start is None)
    ends = [s.start + (s.duration or 0.0) for s in timeline.scenes if s.start is not None]
    ends += [c.end if c.end is not None else c.start for c in timeline.cues]
    ends += [c.end for c in timeline.captions]
    declared = max([scenes] + ends)
    if declared > cfg.max_duration:
        raise VideoError("bad_timeline", f"the output declares {declared:.1f} s, longer than "
                                         f"max_duration ({cfg.max_duration:g} s)")


# Settings that change what the MP4 looks or sounds like (a change renders it again).
_RENDER_KEYS = ("width", "height", "fps", "crf", "preset", "audio_bitrate", "fit", "subtitles",
                "font_file", "subtitle_size", "subtitle_color", "subtitle_outline_color",
                "subtitle_outline", "subtitle_margin", "subtitle_max_chars", "music_volume",
                "narration_volume", "scene_padding", "scene_seconds", "max_duration",
                "time_unit", "mapping")


def fingerprint(coze_output: Any, cfg: SynthesisConfig) -> str:
    """A hash of the workflow output and the render settings: the MP4 is reused only when
    its sidecar records the same one."""
    doc = {"output": coze_output, "settings": {k: getattr(cfg, k) for k in _RENDER_KEYS}}
    text = json.dumps(doc, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _done_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.done.json")


def _read_done(final: Path) -> str | None:
    try:
        return json.loads(_done_path(final).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _write_done(final: Path, stamp: str) -> None:
    """Written after the MP4 (and its SRT) is in place, atomically."""
    done = _done_path(final)
    tmp = done.with_name(done.name + ".tmp")
    tmp.write_text(json.dumps({"fingerprint": stamp, "video": final.name}), encoding="utf-8")
    os.replace(tmp, done)


def draft_ready(cfg: SynthesisConfig, name: str) -> bool:
    from .jianying import DONE_MARKER
    return (_draft_dir(cfg, name) / DONE_MARKER).is_file()


async def _build(ffmpeg: str, timeline: Timeline, paths: dict[str, str], kinds: dict[str, str],
                 work: Path, final: Path, name: str, cfg: SynthesisConfig, reuse: bool,
                 stamp: str) -> dict:
    """Probe, plan, subtitles, render (unless the video exists), draft: the CPU-heavy part."""
    found = await _measure(ffmpeg, paths, kinds, work, cfg)
    plan = make_plan(timeline, found, Layout(cfg.scene_padding, cfg.scene_seconds,
                                             cfg.subtitle_max_chars, cfg.max_duration,
                                             cfg.narration_volume))
    srt_path = final.with_suffix(".srt") if plan.captions else None
    if not reuse:  # (a reused video got here only because its draft was missing)
        # reading the font's character map takes ~0.1 s: off the event loop
        burn, fonts_dir, names = await asyncio.to_thread(_subtitle_files, plan, work, cfg)
        enc = render.Encoding(cfg.width, cfg.height, cfg.fps, cfg.crf, cfg.preset,
                              cfg.audio_bitrate, cfg.ffmpeg_threads, cfg.music_volume, cfg.fit)
        await render.render(ffmpeg, plan, final, enc, workdir=work, timeout=cfg.render_timeout,
                            subtitles=burn, fonts_dir=fonts_dir, font_names=names)
        if srt_path is not None:
            _publish(work / "subs.srt", srt_path)
        else:  # an earlier render's subtitles do not belong to this video
            final.with_suffix(".srt").unlink(missing_ok=True)
        _write_done(final, stamp)
    result = await _result(ffmpeg, final, timeline, reused=reuse,
                           srt=str(srt_path) if srt_path and srt_path.is_file() else None)
    if cfg.jianying:
        from .jianying import build_draft, map_path
        draft = await asyncio.to_thread(build_draft, name, plan, srt_path, cfg)
        result["draft"] = draft
        result["draft_on_editors_machines"] = map_path(draft, cfg.jianying_path_map)
    return result


def _draft_dir(cfg: SynthesisConfig, name: str) -> Path:
    return Path(cfg.jianying_dir) / name


def _kinds(timeline: Timeline) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for s in timeline.scenes:
        if s.clip:
            kinds.setdefault(s.clip, "video")
        if s.image:
            kinds.setdefault(s.image, "image")
        if s.narration:
            kinds.setdefault(s.narration, "audio")
    for url in [c.url for c in timeline.cues] + [timeline.narration, timeline.music]:
        if url:
            kinds.setdefault(url, "audio")
    return kinds


async def _measure(ffmpeg: str, paths: dict[str, str], kinds: dict[str, str], work: Path,
                   cfg: SynthesisConfig) -> dict[str, Media]:
    """Probe every download (a corrupt file fails here) and normalise the still images."""
    gate = asyncio.Semaphore(max(1, cfg.download_concurrency))

    async def one(url: str) -> tuple[str, Media]:
        async with gate:
            m = await media.probe(ffmpeg, paths[url], url=url)
            want = kinds[url]
            if want == "audio" and m.kind != "audio" and not m.has_audio:
                raise AssetError("asset_corrupt", f"expected audio, found {m.kind}", url=url)
            if want in ("image", "video") and m.kind == "audio":
                raise AssetError("asset_corrupt", f"expected {want}, found audio only", url=url)
            if m.kind == "image":
                dst = str(work / (Path(paths[url]).stem + ".png"))
                await media.normalise_image(ffmpeg, paths[url], dst, width=cfg.width,
                                            height=cfg.height, fit=cfg.fit, url=url)
                m = Media(dst, "image", None, False, cfg.width, cfg.height)
            return url, m

    return dict(await asyncio.gather(*(one(u) for u in paths)))


def _subtitle_files(plan: Plan, work: Path, cfg: SynthesisConfig) -> tuple[str, str, tuple]:
    """Write subs.srt (always, when there are captions) and, when burning, subs.ass and the
    font folder; returns (ass name, fonts dir name, font names) or empty values."""
    if not plan.captions:
        return "", "", ()
    (work / "subs.srt").write_text(subtitles.srt(plan.captions), encoding="utf-8")
    if cfg.subtitles == "off":
        return "", "", ()
    font = fonts.find_font(cfg.font_file)
    fonts.check_glyphs(font, "".join(subtitles.display_text(c.text) for c in plan.captions))
    style = subtitles.Style(font.family, cfg.subtitle_size, cfg.subtitle_color,
                            cfg.subtitle_outline_color, cfg.subtitle_outline, cfg.subtitle_margin)
    (work / "subs.ass").write_text(subtitles.ass(plan.captions, style, width=cfg.width,
                                                 height=cfg.height), encoding="utf-8")
    fdir = work / "fonts"
    shutil.rmtree(fdir, ignore_errors=True)
    fdir.mkdir()
    link = fdir / Path(font.path).name
    try:
        link.symlink_to(Path(font.path).resolve())
    except OSError:  # no symlinks (some Windows setups): copy
        shutil.copyfile(font.path, link)
    return "subs.ass", "fonts", (font.family, font.postscript)


def _publish(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


async def _result(ffmpeg: str, final: Path, timeline: Timeline, *, reused: bool,
                  srt: str | None = None) -> dict:
    probed = await media.probe(ffmpeg, str(final))
    if srt is None and final.with_suffix(".srt").is_file():
        srt = str(final.with_suffix(".srt"))
    return {"video": str(final), "duration": round(probed.duration or 0.0, 3),
            "size": final.stat().st_size, "width": probed.width, "height": probed.height,
            "subtitles": srt, "shape": timeline.shape, "scenes": len(timeline.scenes),
            "assets": len(timeline.urls()), "reused": reused}

"""JianYing (CapCut China) drafts for teams that finish their videos in JianYing (opt-in).

Built with ``pyjianyingdraft`` 0.3.1 (the ``jianying`` extra), whose 0.3 API is
``DraftFolder(folder).create_draft(name, width, height, fps, allow_replace=True)`` returning a
``ScriptFile``; tracks come from ``append_track(TrackSpec(TrackType.video, name))``; media are
``VideoMaterial`` / ``AudioMaterial`` (durations read with pymediainfo) placed as
``VideoSegment`` / ``AudioSegment`` on a ``Timerange`` in microseconds; subtitles come in with
``import_srt``; ``save()`` writes ``draft_content.json``.

The same :class:`~.timeline.Plan` the MP4 was rendered from is laid out: pictures on the video
track, narration on audio tracks (a new track where two sounds overlap), the background music
looped on its own track at the configured volume, the SRT on a text track. Every media file
is copied into ``<draft>/materials/`` first, and the paths stored in the draft are rewritten
through ``jianying_path_map`` (longest matching local prefix wins), so the draft opens on the
editors' machines once the drafts folder is synced there. JianYing stores absolute paths, so
the map must name where the folder lands on their side, written as their JianYing writes it.
Drafts can be built on Linux but only exported to video by JianYing itself (Windows/macOS).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..config import SynthesisConfig
from .errors import VideoError
from .timeline import Plan

US = 1_000_000
DONE_MARKER = ".opsbot-draft-complete"  # written last into a finished draft
MUSIC_MAX_SEGMENTS = 200


def map_path(path: str, prefix_map: dict[str, str]) -> str:
    """``path`` with its longest matching local prefix replaced by the editors' prefix."""
    for local in sorted(prefix_map, key=len, reverse=True):
        root = local.rstrip("/\\")
        if path == root or path.startswith(root + "/") or path.startswith(root + "\\"):
            return prefix_map[local].rstrip("/\\") + path[len(root):]
    return path


def build_draft(name: str, plan: Plan, srt: Path | None, cfg: SynthesisConfig) -> str:
    """Write the draft ``<jianying_dir>/<name>``; returns its absolute local path.

    The draft is built in a hidden folder beside it and swapped in after ``save()``, with
    :data:`DONE_MARKER` written last: a folder at the target is always a finished draft, and
    one without the marker (an older build) is built again."""
    try:
        import pyJianYingDraft as jy
    except ImportError as exc:
        raise VideoError("jianying_unavailable", "JianYing drafts need pyjianyingdraft: pip "
                                                 "install 'opsbot[jianying]'") from exc
    root = Path(cfg.jianying_dir).resolve()
    folder = root / name
    building = root / f".{name}.building-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        script = jy.DraftFolder(str(root)).create_draft(building.name, cfg.width, cfg.height,
                                                        cfg.fps, allow_replace=True)
        copies = _copy_media(plan, building / "materials")
        _lay_out(jy, script, plan, copies, cfg)
        if srt is not None and srt.is_file():
            script.import_srt(str(srt), track_name="subtitles")
        for material in list(script.materials.videos) + list(script.materials.audios):
            final_path = _moved(material.path, building, folder)
            material.path = map_path(final_path, cfg.jianying_path_map)
        script.save()
        (building / DONE_MARKER).write_text(name, encoding="utf-8")
        _swap(building, folder)
    except VideoError:
        shutil.rmtree(building, ignore_errors=True)
        raise
    except Exception as exc:  # the library raises ValueError, NameError, its own types …
        shutil.rmtree(building, ignore_errors=True)
        raise VideoError("jianying_failed", f"building the JianYing draft failed: "
                                            f"{type(exc).__name__}: {exc}") from exc
    return str(folder)


def _moved(path: str, building: Path, folder: Path) -> str:
    """Where a file inside the folder being built will be once it is swapped in."""
    try:
        return str(folder / Path(path).relative_to(building))
    except ValueError:
        return path


def _swap(building: Path, folder: Path) -> None:
    """Put the finished draft at ``folder``; an earlier one is moved aside first and removed
    after (a folder cannot be renamed over a non-empty one)."""
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(building, folder)
    shutil.rmtree(old, ignore_errors=True)


def _copy_media(plan: Plan, dest: Path) -> dict[str, str]:
    dest.mkdir(parents=True, exist_ok=True)
    copies: dict[str, str] = {}
    files = [s.path for s in plan.shots] + [s.path for s in plan.sounds] + \
        ([plan.music] if plan.music else [])
    for i, src in enumerate(dict.fromkeys(files)):
        target = dest / f"{i:03d}{Path(src).suffix}"
        shutil.copyfile(src, target)
        copies[src] = str(target)
    return copies


def _lay_out(jy, script, plan: Plan, copies: dict[str, str], cfg: SynthesisConfig) -> None:
    T = jy.TrackType
    video_track = script.append_track(jy.TrackSpec(T.video, "pictures"))
    materials: dict[str, object] = {}

    def video_material(path: str):
        if path not in materials:
            materials[path] = jy.VideoMaterial(copies[path])
        return materials[path]

    for shot in plan.shots:
        m = video_material(shot.path)
        start, left = round(shot.start * US), round(shot.duration * US)
        while left > 0:  # a clip shorter than its shot is laid again, as the render loops it
            piece = min(left, m.duration) if shot.kind == "video" else left
            script.add_segment(jy.VideoSegment(m, jy.Timerange(start, piece),
                                               volume=0.0 if _voiced(plan) else 1.0),
                               video_track)
            start, left = start + piece, left - piece
    ends: list[int] = []   # per narration track: where its last sound ends
    tracks = []
    for sound in plan.sounds:
        if sound.path in materials or sound.path.endswith((".mp4", ".mov", ".webm")):
            continue  # a clip's own sound stays with the clip on the video track
        start, length = round(sound.start * US), round(sound.duration * US)
        i = next((k for k, end in enumerate(ends) if end <= start), None)
        if i is None:
            tracks.append(script.append_track(jy.TrackSpec(T.audio, f"narration{len(tracks) + 1}")))
            ends.append(0)
            i = len(tracks) - 1
        material = jy.AudioMaterial(copies[sound.path])
        length = min(length, material.duration)
        script.add_segment(jy.AudioSegment(material, jy.Timerange(start, length),
                                           volume=sound.volume), tracks[i])
        ends[i] = start + length
    if plan.music and cfg.music_volume > 0:
        track = script.append_track(jy.TrackSpec(T.audio, "music"))
        material = jy.AudioMaterial(copies[plan.music])
        start, total = 0, round(plan.duration * US)
        for _ in range(MUSIC_MAX_SEGMENTS):
            if start >= total:
                break
            piece = min(material.duration, total - start)
            script.add_segment(jy.AudioSegment(material, jy.Timerange(start, piece),
                                               volume=cfg.music_volume), track)
            start += piece


def _voiced(plan: Plan) -> bool:
    """True when narration is laid on audio tracks (the clips' own sound is then muted, as in
    the render, which uses a clip's sound only where a scene has no narration)."""
    return any(not s.path.endswith((".mp4", ".mov", ".webm")) for s in plan.sounds)

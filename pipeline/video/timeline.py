"""The typed timeline of one video, and :func:`plan`, which puts it on the clock.

A :class:`Timeline` is what an adapter read from a workflow output: URLs and texts, with the
times the workflow declared (seconds). It knows nothing of files. :func:`plan` takes the
timeline, the local files the assets were downloaded to and their measured durations, and
returns a :class:`Plan` with every start and length fixed, in seconds:

- a scene with narration lasts as long as its narration really is (measured, not declared),
  plus ``scene_padding``; narration drives the scene lengths;
- a scene without narration keeps its declared duration, else ``scene_seconds``; a video clip
  without either lasts as long as the clip;
- timed cues (JianYing-style lists) keep their declared starts, and the video lasts until the
  last picture or sound ends;
- one narration for the whole video (the ``Output`` shape) sets the length of the video, and
  the scenes share it evenly;
- captions come from the workflow when it gives timed ones, else from the scene texts, split
  into lines of at most ``max_chars`` characters, each shown for a share of its scene's time
  in proportion to its length.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import VideoError


@dataclass(frozen=True)
class Scene:
    """One picture (an image or a video clip) with what is said and shown over it."""

    image: str = ""               # URL of a still image
    clip: str = ""                # URL of a video clip (used instead of the image)
    narration: str = ""           # URL of the narration audio
    text: str = ""                # subtitle text
    duration: float | None = None  # declared by the workflow (s); narration overrides it
    start: float | None = None     # declared start (s), for timed (JianYing-style) lists
    volume: float = 1.0            # narration volume factor from the workflow

    @property
    def visual(self) -> str:
        return self.clip or self.image


@dataclass(frozen=True)
class Cue:
    """A sound placed at a declared time, independent of the scenes (JianYing audio_infos)."""

    url: str
    start: float
    end: float | None = None
    volume: float = 1.0


@dataclass(frozen=True)
class Caption:
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Timeline:
    scenes: tuple[Scene, ...]
    music: str = ""                       # background music URL, looped under the video
    narration: str = ""                   # one narration for the whole video
    cues: tuple[Cue, ...] = ()            # timed sounds (then scenes carry no narration)
    captions: tuple[Caption, ...] = ()    # timed captions from the workflow
    shape: str = ""                       # which adapter read it (for logs and results)

    def urls(self) -> list[str]:
        """Every asset URL, each once, in the order they appear."""
        seen: dict[str, None] = {}
        for s in self.scenes:
            for u in (s.clip or s.image, s.narration):
                if u:
                    seen.setdefault(u, None)
        for u in [c.url for c in self.cues] + [self.narration, self.music]:
            if u:
                seen.setdefault(u, None)
        return list(seen)

    def texts(self) -> str:
        return "".join([s.text for s in self.scenes] + [c.text for c in self.captions])


@dataclass(frozen=True)
class Media:
    """A downloaded asset: its file and what probing found."""

    path: str
    kind: str                  # image | audio | video
    duration: float | None     # seconds; None for still images
    has_audio: bool = False
    width: int = 0
    height: int = 0


@dataclass(frozen=True)
class Shot:
    path: str
    kind: str                  # image | video
    start: float
    duration: float
    loop: bool = False         # a clip shorter than its shot loops


@dataclass(frozen=True)
class Sound:
    path: str
    start: float
    duration: float
    volume: float = 1.0


@dataclass(frozen=True)
class Plan:
    shots: tuple[Shot, ...]
    sounds: tuple[Sound, ...]
    captions: tuple[Caption, ...]
    duration: float
    music: str = ""            # local file, looped and trimmed to ``duration``


@dataclass(frozen=True)
class Layout:
    """The knobs of :func:`plan` (from :class:`pipeline.config.SynthesisConfig`)."""

    scene_padding: float = 0.3
    scene_seconds: float = 3.0
    max_chars: int = 16
    max_duration: float = 600.0
    narration_volume: float = 1.0


def plan(timeline: Timeline, media: dict[str, Media], layout: Layout) -> Plan:
    """Fix every start and length; raises :class:`VideoError` (``bad_timeline``) when the
    timeline has no picture, a URL was not downloaded, or the video would be too long."""
    if not timeline.scenes or not any(s.visual for s in timeline.scenes):
        raise VideoError("bad_timeline", "the timeline has no image or video clip")
    missing = [u for u in timeline.urls() if u not in media]
    if missing:
        raise VideoError("bad_timeline", f"{len(missing)} asset(s) were not downloaded")
    if timeline.cues or any(s.start is not None for s in timeline.scenes):
        shots, sounds, total = _timed(timeline, media, layout)
    elif timeline.narration:
        shots, sounds, total = _one_narration(timeline, media, layout)
    else:
        shots, sounds, total = _scene_driven(timeline, media, layout)
    if total <= 0:
        raise VideoError("bad_timeline", "the timeline lasts no time at all")
    if total > layout.max_duration:
        raise VideoError("bad_timeline", f"the video would last {total:.0f} s, more than "
                                         f"max_duration {layout.max_duration:.0f} s")
    captions = _captions(timeline, shots, total, layout.max_chars)
    music = media[timeline.music].path if timeline.music else ""
    return Plan(tuple(shots), tuple(sounds), captions, round(total, 3), music)


def _shot(scene: Scene, media: dict[str, Media], start: float, duration: float) -> Shot:
    m = media[scene.visual]
    loop = m.kind == "video" and (m.duration or 0) + 0.05 < duration
    return Shot(m.path, "video" if m.kind == "video" else "image", round(start, 3),
                round(duration, 3), loop)


def _scene_driven(timeline: Timeline, media: dict[str, Media], layout: Layout):
    shots, sounds, t = [], [], 0.0
    for scene in timeline.scenes:
        if not scene.visual:
            continue
        voice = media[scene.narration] if scene.narration else None
        clip = media[scene.visual]
        if voice is not None and voice.duration:
            length = voice.duration + layout.scene_padding
            sounds.append(Sound(voice.path, round(t, 3), voice.duration,
                                scene.volume * layout.narration_volume))
        elif scene.duration and scene.duration > 0:
            length = scene.duration
        elif clip.kind == "video" and clip.duration:
            length = clip.duration
        else:
            length = layout.scene_seconds
        if voice is None and clip.kind == "video" and clip.has_audio:
            sounds.append(Sound(clip.path, round(t, 3), min(length, clip.duration or length)))
        shots.append(_shot(scene, media, t, length))
        t += length
    return shots, sounds, t


def _one_narration(timeline: Timeline, media: dict[str, Media], layout: Layout):
    voice = media[timeline.narration]
    visuals = [s for s in timeline.scenes if s.visual]
    if voice.duration:
        total = voice.duration + layout.scene_padding
    else:
        total = sum(s.duration or media[s.visual].duration or layout.scene_seconds
                    for s in visuals)
    each = total / len(visuals)
    shots = [_shot(s, media, i * each, each) for i, s in enumerate(visuals)]
    sounds = [Sound(voice.path, 0.0, voice.duration or total, layout.narration_volume)]
    return shots, sounds, total


def _timed(timeline: Timeline, media: dict[str, Media], layout: Layout):
    shots, sounds, t, end = [], [], 0.0, 0.0
    for scene in timeline.scenes:
        if not scene.visual:
            continue
        start = scene.start if scene.start is not None else t
        length = scene.duration if scene.duration and scene.duration > 0 else layout.scene_seconds
        shots.append(_shot(scene, media, start, length))
        t = start + length
        end = max(end, t)
    for cue in timeline.cues:
        m = media[cue.url]
        declared = (cue.end - cue.start) if cue.end is not None else None
        length = min(x for x in (declared, m.duration) if x) if (declared or m.duration) else 0
        if length > 0:
            sounds.append(Sound(m.path, round(cue.start, 3), round(length, 3),
                                cue.volume * layout.narration_volume))
            end = max(end, cue.start + length)
    shots = _close_gaps(sorted(shots, key=lambda s: s.start), end)
    return shots, sounds, end


def _close_gaps(shots: list[Shot], end: float) -> list[Shot]:
    """Each picture stays until the next one starts (and the last until the end), so a timed
    list never shows black between pictures; overlapping pictures are cut at the next start."""
    out = []
    for i, s in enumerate(shots):
        nxt = shots[i + 1].start if i + 1 < len(shots) else end
        start = 0.0 if i == 0 else s.start
        if nxt - start > 0.001:
            out.append(Shot(s.path, s.kind, round(start, 3), round(nxt - start, 3),
                            s.kind == "video"))
    return out


_BREAK = re.compile(r"(?<=[。！？!?；;，,、…\n])")


def split_text(text: str, max_chars: int) -> list[str]:
    """``text`` cut into lines of at most ``max_chars`` characters, at punctuation where it can."""
    text = " ".join(text.split())
    parts = [p.strip() for p in _BREAK.split(text) if p.strip()]
    lines: list[str] = []
    for part in parts:
        while len(part) > max_chars:
            lines.append(part[:max_chars])
            part = part[max_chars:]
        if lines and len(lines[-1]) + len(part) <= max_chars and not _ends_sentence(lines[-1]):
            lines[-1] += part
        elif part:
            lines.append(part)
    return lines


def _ends_sentence(line: str) -> bool:
    return line[-1:] in "。！？!?"


def _timed_lines(text: str, start: float, end: float, max_chars: int) -> list[Caption]:
    lines = split_text(text, max_chars)
    weight = sum(len(x) for x in lines)
    out, t = [], start
    for line in lines:
        d = (end - start) * len(line) / weight
        out.append(Caption(round(t, 3), round(t + d, 3), line))
        t += d
    return out


def _captions(timeline: Timeline, shots: list[Shot], total: float,
              max_chars: int) -> tuple[Caption, ...]:
    if timeline.captions:
        out = []
        for c in timeline.captions:
            out += _timed_lines(c.text, c.start, min(c.end, total), max_chars) \
                if c.end > c.start and c.start < total else []
        return tuple(out)
    texts = [s.text for s in timeline.scenes if s.visual]
    if timeline.narration and not any(texts[1:]) and texts and texts[0]:
        return tuple(_timed_lines(texts[0], 0.0, total, max_chars))
    out = []
    for shot, text in zip(shots, texts):
        if text.strip():
            out += _timed_lines(text, shot.start, shot.start + shot.duration, max_chars)
    return tuple(out)

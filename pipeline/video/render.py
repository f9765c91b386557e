"""Build the ffmpeg argument list for a :class:`~.timeline.Plan`, run it, and publish the MP4.

The command, in the words of the ffmpeg docs:

- pictures: when every shot is a still image (already normalised to the output size), one
  input through the concat demuxer with a ``duration`` per picture (listed in one-second
  pieces, which keeps ffmpeg's memory flat, see :func:`_concat_list`); with video clips, one
  input per shot (a clip loops with ``-stream_loop -1``, bounded by ``-t``), scaled, padded and
  joined by the ``concat`` filter;
- sound: a silent bed as long as the video, each narration placed at its start (``adelay``),
  background music looped and turned down, all mixed without normalisation (``amix
  normalize=0``), so the levels are the configured ones;
- subtitles: the ``ass`` filter with the font's folder as ``fontsdir``; ffmpeg runs in the
  work folder so the filter arguments are plain relative names (no escaping);
- output: libx264 (``crf``, ``preset``), yuv420p, AAC, ``+faststart``, an explicit ``-t``, into
  a temporary name that is renamed over the final one only after ffmpeg succeeded and the
  subtitle check passed. A failed or killed render leaves no video.

With subtitles burned, ffmpeg runs at ``-v verbose`` so libass reports which font it selected
and every glyph it could not find; :func:`check_font_log` fails the render on either problem.
"""
from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import VideoError
from .media import run
from .timeline import Plan

SAMPLE_RATE = 48000
PIECE = 1.0  # seconds of a still picture per concat entry (bounds ffmpeg's frame queue)
_GLYPH = re.compile(r"Glyph 0x([0-9A-Fa-f]+) not found")
_SELECT = re.compile(r"fontselect: \((.*?), \d+, \d+\) -> (.*?), \d+, (\S+)")


@dataclass(frozen=True)
class Encoding:
    width: int = 1080
    height: int = 1920
    fps: int = 30
    crf: int = 23
    preset: str = "veryfast"
    audio_bitrate: str = "128k"
    threads: int = 0
    music_volume: float = 0.15
    fit: str = "contain"


def build_args(ffmpeg: str, plan: Plan, out: str, enc: Encoding, *, workdir: Path,
               subtitles: str = "", fonts_dir: str = "") -> list[str]:
    """The argument list; ``subtitles`` / ``fonts_dir`` are names relative to ``workdir``."""
    args = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-v",
            "verbose" if subtitles else "error"]
    filters: list[str] = []
    inputs = 0
    if all(s.kind == "image" for s in plan.shots):
        listing = workdir / "shots.ffconcat"
        listing.write_text(_concat_list(plan), encoding="utf-8")
        args += ["-f", "concat", "-safe", "0", "-i", listing.name]
        filters.append(f"[0:v]fps={enc.fps},format=yuv420p[vcat]")
        inputs = 1
    else:
        labels = []
        for shot in plan.shots:
            if shot.kind == "image":
                args += ["-loop", "1", "-framerate", str(enc.fps), "-t", _t(shot.duration)]
            else:
                args += ["-stream_loop", "-1", "-t", _t(shot.duration)]
            args += ["-i", shot.path]
            filters.append(f"[{inputs}:v]{_fit(enc)},fps={enc.fps},format=yuv420p,"
                           f"trim=duration={_t(shot.duration)},setpts=PTS-STARTPTS[v{inputs}]")
            labels.append(f"[v{inputs}]")
            inputs += 1
        filters.append(f"{''.join(labels)}concat=n={len(labels)}:v=1:a=0[vcat]")
    if subtitles:
        filters.append(f"[vcat]ass={subtitles}:fontsdir={fonts_dir}[vout]")
    else:
        filters.append("[vcat]null[vout]")
    args += ["-f", "lavfi", "-t", _t(plan.duration), "-i",
             f"anullsrc=r={SAMPLE_RATE}:cl=stereo"]
    mix = [f"[{inputs}:a]"]
    inputs += 1
    fmt = f"aresample={SAMPLE_RATE},aformat=sample_fmts=fltp:channel_layouts=stereo"
    for sound in plan.sounds:
        args += ["-i", sound.path]
        delay = round(sound.start * 1000)
        filters.append(f"[{inputs}:a]{fmt},atrim=0:{_t(sound.duration)},asetpts=PTS-STARTPTS,"
                       f"volume={sound.volume:g},adelay={delay}:all=1[a{inputs}]")
        mix.append(f"[a{inputs}]")
        inputs += 1
    if plan.music and enc.music_volume > 0:
        args += ["-stream_loop", "-1", "-i", plan.music]
        filters.append(f"[{inputs}:a]{fmt},volume={enc.music_volume:g},"
                       f"atrim=0:{_t(plan.duration)}[a{inputs}]")
        mix.append(f"[a{inputs}]")
        inputs += 1
    filters.append(f"{''.join(mix)}amix=inputs={len(mix)}:duration=first:normalize=0:"
                   f"dropout_transition=0[aout]")
    args += ["-filter_complex", ";".join(filters), "-map", "[vout]", "-map", "[aout]",
             "-c:v", "libx264", "-preset", enc.preset, "-crf", str(enc.crf),
             "-pix_fmt", "yuv420p", "-r", str(enc.fps),
             "-c:a", "aac", "-b:a", enc.audio_bitrate, "-ar", str(SAMPLE_RATE),
             "-movflags", "+faststart", "-t", _t(plan.duration)]
    if enc.threads:
        args += ["-threads", str(enc.threads)]
    return args + ["-f", "mp4", "-y", out]


def _fit(enc: Encoding) -> str:
    w, h = enc.width, enc.height
    if enc.fit == "cover":
        return f"scale={w}:{h}:force_original_aspect_ratio=increase,crop={w}:{h},setsar=1"
    return (f"scale={w}:{h}:force_original_aspect_ratio=decrease,"
            f"pad={w}:{h}:(ow-iw)/2:(oh-ih)/2:color=black,setsar=1")


def _concat_list(plan: Plan) -> str:
    """The pictures for the concat demuxer, each listed once per :data:`PIECE` seconds.

    The ``fps`` filter turns one input picture into every frame until the next one, at once,
    and ffmpeg queues them all in front of the encoder: a 15 s picture held 450 full frames
    (1.7 GB at 1080x1920). Listed in pieces, no more than ``PIECE * fps`` frames wait, at the
    cost of decoding the picture once per piece."""
    lines = ["ffconcat version 1.0"]
    for shot in plan.shots:
        left = shot.duration
        while left > 1e-6:
            piece = PIECE if left > PIECE * 1.5 else left
            lines += [f"file {_quote(shot.path)}", f"duration {_t(piece)}"]
            left -= piece
    lines.append(f"file {_quote(plan.shots[-1].path)}")  # the demuxer needs the last one twice
    return "\n".join(lines) + "\n"


def _quote(path: str) -> str:
    return "'" + str(path).replace("'", "'\\''") + "'"


def _t(seconds: float) -> str:
    return f"{max(0.0, seconds):.3f}"


async def render(ffmpeg: str, plan: Plan, final: Path, enc: Encoding, *, workdir: Path,
                 timeout: float, subtitles: str = "", fonts_dir: str = "",
                 font_names: tuple[str, ...] = ()) -> None:
    """Render ``plan`` to ``final`` (atomically); :class:`VideoError` ``render_failed`` /
    ``render_timeout`` / ``font_glyphs``, with no file left at ``final`` on any failure."""
    # unique per render: on a shared output volume, containers can share a PID
    tmp = final.with_name(f".{final.stem}.rendering-{os.getpid()}-{uuid.uuid4().hex[:12]}.mp4")
    args = build_args(ffmpeg, plan, str(tmp.resolve()), enc, workdir=workdir,
                      subtitles=subtitles, fonts_dir=fonts_dir)
    try:
        code, err = await run(args, timeout=timeout, cwd=str(workdir), what="the render")
        if code != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            raise VideoError("render_failed", f"ffmpeg exited with {code}: {_tail(err)}")
        if subtitles:
            check_font_log(err, font_names)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def check_font_log(err: str, font_names: tuple[str, ...]) -> None:
    """Fail when libass missed a glyph or selected a font other than ours."""
    glyphs = sorted({chr(int(g, 16)) for g in _GLYPH.findall(err)})
    if glyphs:
        raise VideoError("font_glyphs", "libass found no glyph for " + "".join(glyphs[:12]))
    selected = _SELECT.findall(err)
    if not selected:
        raise VideoError("render_failed", "the subtitle filter selected no font (libass said "
                                          "nothing): subtitles were not burned")
    wanted = {n.replace(" ", "").lower() for n in font_names}
    for _, target, ps in selected:
        if ps.replace(" ", "").lower() not in wanted and \
                Path(target).stem.replace(" ", "").lower() not in wanted:
            raise VideoError("font_glyphs", f"libass used the font {ps} ({target}) instead of "
                                            f"{', '.join(font_names)}")


def _tail(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip() and "Parsed_ass" not in x]
    return " | ".join(lines[-3:])[-400:]

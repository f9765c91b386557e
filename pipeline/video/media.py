"""ffmpeg as a subprocess: find the binary, probe a file, normalise an image, run a command.

imageio-ffmpeg ships a static ffmpeg (libx264, AAC, libass) but no ffprobe, so :func:`probe`
reads what ``ffmpeg -i FILE`` prints (``Duration:`` and the ``Stream`` lines). When ffmpeg says
it estimated the duration from the bitrate (MP3s without a header), the audio is decoded to
measure it exactly. Every command is an argument list (never a shell) in its own session, and
:func:`run` kills the whole session on timeout or cancellation: only that command dies.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

from .errors import AssetError, VideoError
from .timeline import Media

_DURATION = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
_STREAM = re.compile(r"Stream #\d+:\d+.*?: (Video|Audio): (\w+)([^\n]*)")
_SIZE = re.compile(r", (\d{2,5})x(\d{2,5})[ ,\[]")
_TIME = re.compile(r"time=(\d+):(\d\d):(\d\d(?:\.\d+)?)")
_IMAGE_CODECS = {"png", "mjpeg", "webp", "bmp", "gif", "tiff", "jpegls", "jpeg2000", "avif"}


def ffmpeg_exe(configured: str = "") -> str:
    """The ffmpeg to run: ``configured``, else imageio-ffmpeg's static binary."""
    if configured:
        if not Path(configured).is_file():
            raise VideoError("ffmpeg_missing", f"[pipeline.synthesis] ffmpeg {configured!r} "
                                               "is not a file")
        return configured
    try:
        import imageio_ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as exc:
        raise VideoError("ffmpeg_missing", f"no ffmpeg: {exc}; install the imageio-ffmpeg "
                                           "package or set [pipeline.synthesis] ffmpeg") from exc


async def run(argv: list[str], *, timeout: float, cwd: str | None = None,
              what: str = "ffmpeg") -> tuple[int, str]:
    """Run ``argv``; returns (exit code, stderr text). On timeout the command's whole session
    is killed and :class:`VideoError` ``render_timeout`` raised; cancellation kills it too."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, cwd=cwd, start_new_session=True)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        await kill(proc)
        raise VideoError("render_timeout", f"{what} took longer than {timeout:g} s and was "
                                           "stopped") from None
    except BaseException:  # cancelled: the batch stopped, the lease was lost, shutdown
        await kill(proc)
        raise
    return proc.returncode or 0, err.decode("utf-8", "replace")


async def kill(proc: asyncio.subprocess.Process) -> None:
    """Kill the process and everything it started (its own session), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    await proc.wait()


async def probe(ffmpeg: str, path: str, *, url: str = "", timeout: float = 60.0) -> Media:
    """What ``path`` holds; :class:`AssetError` ``asset_corrupt`` when ffmpeg cannot read it."""
    _, err = await run([ffmpeg, "-hide_banner", "-nostdin", "-i", path], timeout=timeout,
                       what="probing a file")
    streams = _STREAM.findall(err)
    video = [s for s in streams if s[0] == "Video" and "attached pic" not in s[2]]
    audio = [s for s in streams if s[0] == "Audio"]
    if not streams:
        reason = _last_line(err) or "no audio or video stream"
        raise AssetError("asset_corrupt", f"not a readable image, audio or video file: {reason}",
                         url=url)
    duration = _duration(err)
    size = _SIZE.search(video[0][2]) if video else None
    w, h = (int(size.group(1)), int(size.group(2))) if size else (0, 0)
    still = video and video[0][1] in _IMAGE_CODECS and not audio and (
        video[0][1] != "gif" or duration is None or duration <= 0.05)
    if still:
        return Media(path, "image", None, False, w, h)
    if video:
        return Media(path, "video", duration, bool(audio), w, h)
    if "Estimating duration from bitrate" in err or duration is None:
        duration = await _decoded_duration(ffmpeg, path, url, timeout)
    if not duration or duration <= 0:
        raise AssetError("asset_corrupt", "the audio has no length", url=url)
    return Media(path, "audio", duration, True)


async def _decoded_duration(ffmpeg: str, path: str, url: str, timeout: float) -> float:
    code, err = await run([ffmpeg, "-hide_banner", "-nostdin", "-i", path, "-vn", "-f", "null",
                           "-"], timeout=timeout, what="measuring an audio file")
    times = _TIME.findall(err)
    if code != 0 or not times:
        raise AssetError("asset_corrupt", f"the audio cannot be decoded: {_last_line(err)}",
                         url=url)
    h, m, s = times[-1]
    return int(h) * 3600 + int(m) * 60 + float(s)


def _duration(err: str) -> float | None:
    match = _DURATION.search(err)
    if not match:
        return None
    h, m, s = match.groups()
    return int(h) * 3600 + int(m) * 60 + float(s)


def _last_line(err: str) -> str:
    lines = [x.strip() for x in err.strip().splitlines() if x.strip()]
    return lines[-1][:200] if lines else ""


async def normalise_image(ffmpeg: str, src: str, dst: str, *, width: int, height: int,
                          fit: str, url: str = "", timeout: float = 60.0) -> None:
    """Write ``src`` as a ``width`` x ``height`` PNG (letterboxed or cropped), so the concat
    demuxer gets pictures of one size and codec; a file that does not decode is corrupt."""
    if fit == "cover":
        vf = (f"scale={width}:{height}:force_original_aspect_ratio=increase,"
              f"crop={width}:{height},setsar=1")
    else:
        vf = (f"scale={width}:{height}:force_original_aspect_ratio=decrease,"
              f"pad={width}:{height}:(ow-iw)/2:(oh-ih)/2:color=black,setsar=1")
    tmp = dst + ".part.png"
    code, err = await run([ffmpeg, "-hide_banner", "-nostdin", "-v", "error", "-i", src,
                           "-vf", vf, "-frames:v", "1", "-pix_fmt", "rgb24", "-y", tmp],
                          timeout=timeout, what="converting an image")
    if code != 0 or not Path(tmp).is_file() or Path(tmp).stat().st_size == 0:
        Path(tmp).unlink(missing_ok=True)
        raise AssetError("asset_corrupt", f"the image cannot be decoded: {_last_line(err)}",
                         url=url)
    os.replace(tmp, dst)

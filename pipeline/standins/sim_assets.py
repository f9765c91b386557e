"""Generated media for the Coze simulator: the images, narration and clips a video workflow's
output links to, served on the simulator's own port, with scriptable faults.

Routes (under ``/_sim/``, so they need no Coze token, like the signed CDN links they stand for):

- ``GET /_sim/assets/img-KEY.png``: a small picture (pure Python PNG), colour taken from KEY;
- ``GET /_sim/assets/tone-KEY.wav?seconds=S`` (or ``.mp3``): a tone of S seconds (WAV in pure
  Python; MP3 through ffmpeg);
- ``GET /_sim/assets/clip-KEY.mp4?seconds=S``: a test-pattern clip with sound (ffmpeg).

Faults, per URL: ``x-expires=UNIX`` in the past answers 403 with the XML body object stores
send; ``fault=404`` | ``403`` | ``500once`` (500 on the first request of that URL, then the
asset) | ``html`` (a 200 HTML page) | ``huge`` (Content-Length of 10 GB) | ``endless``
(chunked, no length, never ends) | ``slow`` (a byte a second) | ``corrupt`` (right type,
garbage bytes) | ``redirect`` (302 to the URL in ``to``, which may be anywhere: the case of a
CDN link that bounces to an internal address). Every request is counted in ``requests`` by path.

:func:`video_output` builds a workflow output in one of the shapes the adapters read
(``arrays``, ``jianying``, ``single``) whose URLs point here.
"""
from __future__ import annotations

import asyncio
import json
import math
import struct
import subprocess
import tempfile
import threading
import time
import wave
import zlib
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

__all__ = ["AssetServer", "png", "wav", "video_output"]

TEXTS = ["清晨，橘猫在窗台上伸了个懒腰。", "它盯着窗外的麻雀，尾巴轻轻摆动。",
         "阳光洒进屋里，新的一天开始了。", "Hello 世界，短视频自动合成！"]


def png(width: int, height: int, key: str) -> bytes:
    """A ``width`` x ``height`` RGB PNG: two bands of colours derived from ``key``."""
    seed = zlib.crc32(key.encode("utf-8"))
    top = bytes([(seed >> 16) & 255, (seed >> 8) & 255, seed & 255])
    bottom = bytes(255 - b for b in top)
    rows = []
    for y in range(height):
        colour = top if y < height // 2 else bottom
        rows.append(b"\x00" + colour * width)
    raw = zlib.compress(b"".join(rows), 6)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(
            ">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + \
        chunk(b"IEND", b"")


def wav(seconds: float, freq: float = 440.0, rate: int = 22050) -> bytes:
    """A mono 16-bit sine tone of ``seconds``."""
    n = int(seconds * rate)
    frames = b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * freq * i / rate)))
                      for i in range(n))
    buf = BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)
    return buf.getvalue()


class AssetServer:
    """The asset routes; ``now`` is the simulator's clock (for ``x-expires``)."""

    def __init__(self, now: Callable[[], float] = time.time, *, image_size=(180, 320)) -> None:
        self.now = now
        self.image_size = image_size
        self.requests: dict[str, int] = {}
        self._cache: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._dir = tempfile.mkdtemp(prefix="opsbot-sim-assets-")

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/_sim/assets/{name}", self._handle)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        with self._lock:
            self.requests[request.path_qs] = self.requests.get(request.path_qs, 0) + 1
            count = self.requests[request.path_qs]
        q = request.query
        expires = q.get("x-expires", "")
        fault = q.get("fault", "")
        if (expires.isdigit() and int(expires) < self.now()) or fault == "403":
            return web.Response(status=403, content_type="application/xml",
                                text="<?xml version=\"1.0\"?><Error><Code>AccessDenied</Code>"
                                     "<Message>Request has expired</Message></Error>")
        if fault == "redirect":
            raise web.HTTPFound(q.get("to", "/"))
        if fault == "404":
            return web.Response(status=404, content_type="application/xml",
                                text="<Error><Code>NoSuchKey</Code></Error>")
        if fault == "500once" and count == 1:
            return web.Response(status=500, text="internal error")
        if fault == "html":
            return web.Response(status=200, content_type="text/html",
                                text="<html><body>登录已过期</body></html>")
        try:
            body, ctype = await asyncio.to_thread(self._make, name, q)
        except (ValueError, KeyError) as exc:
            return web.Response(status=404, text=str(exc))
        if fault == "corrupt":
            body = b"\x00\x01garbage" * 64
        if fault in ("huge", "endless", "slow"):
            return await self._stream(request, fault, ctype)
        return web.Response(body=body, content_type=ctype)

    async def _stream(self, request: web.Request, fault: str, ctype: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": ctype})
        if fault == "huge":
            resp.content_length = 10 * 1024 ** 3
        await resp.prepare(request)
        try:
            for _ in range(20_000 if fault != "slow" else 600):
                if fault == "slow":
                    await asyncio.sleep(1.0)
                    await resp.write(b"\x00")
                else:
                    await resp.write(b"\x00" * 65536)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return resp

    def _make(self, name: str, q: Any) -> tuple[bytes, str]:
        stem, _, ext = name.rpartition(".")
        kind, _, key = stem.partition("-")
        seconds = min(60.0, max(0.2, float(q.get("seconds", "2"))))
        cache_key = f"{name}:{seconds}"
        ctype = {"png": "image/png", "wav": "audio/wav", "mp3": "audio/mpeg",
                 "mp4": "video/mp4"}[ext]
        with self._lock:
            if cache_key in self._cache:
                return self._cache[cache_key], ctype
        if kind == "img" and ext == "png":
            body = png(*self.image_size, key)
        elif kind == "tone" and ext == "wav":
            body = wav(seconds, 330 + zlib.crc32(key.encode()) % 440)
        elif kind == "tone" and ext == "mp3":
            body = self._ffmpeg(["-f", "lavfi", "-i", f"sine=f=440:d={seconds}",
                                 "-c:a", "libmp3lame", "-b:a", "64k"], "mp3")
        elif kind == "clip" and ext == "mp4":
            w, h = self.image_size
            body = self._ffmpeg(["-f", "lavfi", "-i", f"testsrc2=s={w}x{h}:r=15:d={seconds}",
                                 "-f", "lavfi", "-i", f"sine=f=550:d={seconds}",
                                 "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt",
                                 "yuv420p", "-c:a", "aac", "-shortest"], "mp4")
        else:
            raise KeyError(f"no such asset {name}")
        with self._lock:
            self._cache[cache_key] = body
        return body, ctype

    def _ffmpeg(self, args: list[str], ext: str) -> bytes:
        from pipeline.video.media import ffmpeg_exe

        out = Path(self._dir) / f"{time.monotonic_ns()}.{ext}"
        subprocess.run([ffmpeg_exe(), "-hide_banner", "-v", "error", "-nostdin", *args, "-y",
                        str(out)], check=True, timeout=60)
        try:
            return out.read_bytes()
        finally:
            out.unlink(missing_ok=True)


def video_output(base_url: str, task: str, *, shape: str = "arrays", scenes: int = 2,
                 seconds: float = 1.5, audio: str = "wav", query: str = "",
                 texts: list[str] | None = None) -> dict:
    """A workflow output of ``shape`` whose assets are served at ``base_url``; scene ``i``
    has ``seconds + 0.25 * i`` of narration and the ``i``-th of ``texts`` (default
    :data:`TEXTS`)."""
    a = f"{base_url.rstrip('/')}/_sim/assets"
    q = ("&" + query) if query else ""
    imgs = [f"{a}/img-{task}-{i}.png?x-sig=s{i}{q}" for i in range(scenes)]
    voices = [f"{a}/tone-{task}-{i}.{audio}?seconds={seconds + 0.25 * i:g}{q}"
              for i in range(scenes)]
    texts = [(texts or TEXTS)[i % len(texts or TEXTS)] for i in range(scenes)]
    if shape == "arrays":
        return {"images": imgs, "mp3_urls": voices,
                "mp3_durations": [seconds + 0.25 * i for i in range(scenes)], "texts": texts,
                "bg_audio": f"{a}/tone-{task}-bgm.{audio}?seconds=4{q}"}
    if shape == "jianying":
        us, t, image_infos, audio_infos, captions = 1_000_000, 0, [], [], []
        for i in range(scenes):
            d = int((seconds + 0.25 * i) * us)
            image_infos.append({"image_url": imgs[i], "start": t, "end": t + d})
            audio_infos.append({"audio_url": voices[i], "start": t, "end": t + d, "volume": 1.0})
            captions.append({"start": t, "end": t + d, "text": texts[i]})
            t += d
        return {"image_infos": json.dumps(image_infos), "audio_infos": json.dumps(audio_infos),
                "captions": json.dumps(captions, ensure_ascii=False)}
    if shape == "single":
        inner = {"audioUrl": f"{a}/tone-{task}-all.{audio}?seconds={seconds * scenes:g}{q}",
                 "videoUrl": f"{a}/clip-{task}.mp4?seconds={seconds:g}{q}",
                 "content": "".join(texts)}
        return {"Output": json.dumps(inner, ensure_ascii=False)}
    raise ValueError(f"unknown shape {shape!r}")

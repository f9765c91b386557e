"""The simulator's generated media are real files of their type, and its faults are real."""
from __future__ import annotations

import asyncio
import struct
import wave
import zlib
from io import BytesIO

import aiohttp

from pipeline.standins.sim_assets import png, video_output, wav
from pipeline.standins.simulator import CozeSimulator


def test_png_is_a_valid_image_of_the_size_asked():
    data = png(12, 8, "k")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, tag = struct.unpack(">I4s", data[8:16])
    width, height = struct.unpack(">II", data[16:24])
    assert (tag, width, height) == (b"IHDR", 12, 8)
    crc = struct.unpack(">I", data[16 + length:20 + length])[0]
    assert crc == zlib.crc32(data[12:16 + length]) & 0xFFFFFFFF


def test_wav_lasts_as_long_as_asked():
    with wave.open(BytesIO(wav(1.5, rate=8000))) as w:
        assert w.getnframes() == 12000 and w.getframerate() == 8000


def test_routes_serve_media_and_faults_without_a_coze_token():
    async def go():
        sim = CozeSimulator()
        base = await sim.start()
        try:
            out = video_output(base, "t", scenes=1)
            async with aiohttp.ClientSession() as s:
                got = {}
                for url in (out["images"][0], out["mp3_urls"][0], out["images"][0] + "&fault=404",
                            out["images"][0] + "&x-expires=1000", out["images"][0] + "&fault=html"):
                    async with s.get(url) as r:
                        got[url] = (r.status, r.headers["Content-Type"].split(";")[0],
                                    await r.read())
                return out, got, sim.assets.requests
        finally:
            await sim.stop()

    out, got, requests = asyncio.run(go())
    image, audio, missing, expired, html = got.values()
    assert image[:2] == (200, "image/png") and image[2][:4] == b"\x89PNG"
    assert audio[:2] == (200, "audio/wav") and audio[2][:4] == b"RIFF"
    assert missing[0] == 404
    assert expired[:2] == (403, "application/xml") and b"Request has expired" in expired[2]
    assert html[:2] == (200, "text/html")
    assert sum(requests.values()) == 5

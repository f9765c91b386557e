"""Does a URL answer? The network half of the quality gate's ``url`` check (aiohttp).

Each URL gets a ``HEAD`` (redirects followed). Signed object-store URLs often refuse ``HEAD``
(the signature covers the method) with 403 or 405, so any 4xx answer but 404 and 410 is asked
again with a one-byte ``GET`` (``Range: bytes=0-0``), whose body is not read. A final status
below 400 means the URL answers. Everything is bounded by ``timeout`` seconds per URL and at
most ``concurrency`` URLs at a time.
"""
from __future__ import annotations

import asyncio
from typing import Iterable

import aiohttp

__all__ = ["probe_urls"]

_GONE = (404, 410)


async def probe_urls(urls: Iterable[str], *, timeout: float,
                     concurrency: int = 8) -> dict[str, str | None]:
    """``{url: None}`` for each URL that answered, else ``{url: reason}`` ("HTTP 404",
    "timed out after 10s", "connection failed (ClientConnectorError)")."""
    wanted = list(dict.fromkeys(urls))
    if not wanted:
        return {}
    gate = asyncio.Semaphore(max(1, concurrency))
    limit = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=limit) as session:
        async def one(url: str) -> tuple[str, str | None]:
            async with gate:
                return url, await _probe(session, url, timeout)
        return dict(await asyncio.gather(*(one(u) for u in wanted)))


async def _probe(session: aiohttp.ClientSession, url: str, timeout: float) -> str | None:
    try:
        async with session.head(url, allow_redirects=True) as resp:
            status = resp.status
        if 400 <= status < 500 and status not in _GONE:
            async with session.get(url, allow_redirects=True,
                                   headers={"Range": "bytes=0-0"}) as resp:
                status = resp.status
    except asyncio.TimeoutError:
        return f"timed out after {timeout:g}s"
    except aiohttp.InvalidURL:
        return "invalid URL"
    except aiohttp.ClientError as exc:
        return f"connection failed ({type(exc).__name__})"
    return None if status < 400 else f"HTTP {status}"

"""Does a URL answer? The network half of the quality gate's ``url`` check (aiohttp).

Each URL gets a ``HEAD`` (redirects followed). Signed object-store URLs often refuse ``HEAD``
(the signature covers the method) with 403 or 405, so any 4xx answer but 404 and 410 is asked
again with a one-byte ``GET`` (``Range: bytes=0-0``), whose body is not read. A final status
below 400 means the URL answers. One try (the HEAD and its GET together) is bounded by
``timeout`` seconds; at most ``concurrency`` URLs are probed at a time.

Only a definite answer fails a URL: 404 or 410, or another 4xx after the GET. A blip (a 5xx,
429, a timeout, a failed connection) is tried again, up to ``tries`` tries in all, after
``backoff`` seconds doubling each time on the injected clock; its reason is kept only when every
try failed. Good content is not resubmitted because a CDN hiccupped.
"""
from __future__ import annotations

import asyncio
from typing import Any, Iterable

import aiohttp

__all__ = ["probe_urls", "TRIES", "BACKOFF"]

_GONE = (404, 410)
TRIES = 3        # tries per URL when the answer is a blip
BACKOFF = 1.0    # seconds before the second try; doubled before each later one


class _Blip(Exception):
    """A transient answer: worth another try (the message is the reason)."""


async def probe_urls(urls: Iterable[str], *, timeout: float, concurrency: int = 8,
                     tries: int = TRIES, backoff: float = BACKOFF,
                     clock: Any = None) -> dict[str, str | None]:
    """``{url: None}`` for each URL that answered, else ``{url: reason}`` ("HTTP 404",
    "timed out after 10s", "connection failed (ClientConnectorError)"). ``clock`` (with an
    async ``sleep``) waits between tries; asyncio's sleep when None."""
    wanted = list(dict.fromkeys(urls))
    if not wanted:
        return {}
    sleep = clock.sleep if clock is not None else asyncio.sleep
    gate = asyncio.Semaphore(max(1, concurrency))
    async with aiohttp.ClientSession() as session:
        async def one(url: str) -> tuple[str, str | None]:
            async with gate:
                for n in range(max(1, tries)):
                    if n:
                        await sleep(backoff * 2 ** (n - 1))
                    try:
                        return url, await _probe(session, url, timeout)
                    except _Blip as blip:
                        reason = str(blip)
                return url, reason
        return dict(await asyncio.gather(*(one(u) for u in wanted)))


async def _probe(session: aiohttp.ClientSession, url: str, timeout: float) -> str | None:
    """One try: None (answers), a reason (a definite failure), or :class:`_Blip`."""
    try:
        status = await asyncio.wait_for(_head_then_get(session, url), timeout)
    except asyncio.TimeoutError:
        raise _Blip(f"timed out after {timeout:g}s") from None
    except aiohttp.InvalidURL:
        return "invalid URL"
    except aiohttp.ClientError as exc:
        raise _Blip(f"connection failed ({type(exc).__name__})") from None
    if status >= 500 or status == 429:
        raise _Blip(f"HTTP {status}")
    return None if status < 400 else f"HTTP {status}"


async def _head_then_get(session: aiohttp.ClientSession, url: str) -> int:
    async with session.head(url, allow_redirects=True) as resp:
        status = resp.status
    if 400 <= status < 500 and status not in _GONE and status != 429:
        async with session.get(url, allow_redirects=True,
                               headers={"Range": "bytes=0-0"}) as resp:
            status = resp.status
    return status

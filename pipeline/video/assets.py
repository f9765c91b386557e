"""Download a timeline's assets with aiohttp, at once (their signed URLs expire), with limits.

Each URL is fetched to ``<work dir>/<hash>.<ext>`` through a ``.part`` file that is renamed
only when complete, so a file that exists is whole: a second attempt reuses it. Limits:
``max_bytes`` per asset (checked against Content-Length first, then while reading),
``total_bytes`` for all of the task's assets together (one budget shared by its downloads; a
failed try gives its bytes back), ``max_count`` URLs, ``timeout`` seconds per download (connect
to last byte), ``deadline`` seconds for all of them together, ``concurrency`` at once.

Redirects are followed here, not by aiohttp (at most :data:`MAX_REDIRECTS`), and no host at a
private, link-local, shared or loopback address is contacted unless ``private`` allows it
(:func:`address_allowed`): address literals are checked before each request, names by the
session's resolver when the connection is made (``asset_blocked``).

Failures go through the classifier (:func:`pipeline.retry.call_with_retry` with the pipeline's
rules and retry policy): dropped connections, timeouts, HTTP 429 (Retry-After honoured) and
5xx are retried with backoff; anything else fails at once. What is left is raised as an
:class:`~.errors.AssetError` whose code names the class: ``asset_not_found`` (404, 410),
``asset_expired`` (401, 403: a signed URL past its ``x-expires``, or not signed for us),
``asset_http`` (other statuses), ``asset_too_large``, ``asset_bad_type`` (an HTML or JSON page,
or a type of the wrong kind), ``asset_timeout``, ``asset_network``, ``asset_blocked``,
``asset_too_many``.
"""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from ..clock import Clock
from ..config import RetryPolicy, Rule
from ..errors import PipelineError
from ..retry import call_with_retry
from .errors import AssetError

__all__ = ["Limits", "download_all"]

_EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp",
               "image/gif": ".gif", "audio/mpeg": ".mp3", "audio/mp3": ".mp3",
               "audio/wav": ".wav", "audio/x-wav": ".wav", "audio/wave": ".wav",
               "audio/aac": ".aac", "audio/mp4": ".m4a", "audio/ogg": ".ogg",
               "video/mp4": ".mp4", "video/quicktime": ".mov", "video/webm": ".webm"}
_NEUTRAL = {"", "application/octet-stream", "binary/octet-stream", "application/binary"}
_ACCEPT = {"image": ("image/",), "audio": ("audio/", "video/"), "video": ("video/",)}


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 300_000_000
    timeout: float = 60.0
    concurrency: int = 4
    max_count: int = 200               # URLs one task may fetch
    total_bytes: int = 1_000_000_000   # every download of the task together
    deadline: float = 600.0            # all downloads of the task, retries included
    private: str = "auto"              # auto | allow | refuse: see :func:`address_allowed`
    allow_loopback: bool = False       # (auto) loopback hosts are fine: the Coze simulator


MAX_REDIRECTS = 10
_REDIRECTS = (301, 302, 303, 307, 308)
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not on the internet


def address_allowed(address: str, limits: Limits) -> bool:
    """May an asset be fetched from ``address`` (an IP)? ``private = "allow"``: always;
    ``"refuse"``: only public addresses; ``"auto"``: public ones, and loopback when
    ``allow_loopback`` (the Coze base URL is itself on loopback: the simulator)."""
    if limits.private == "allow":
        return True
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return limits.private == "auto" and limits.allow_loopback
    return ip.is_global and not ip.is_multicast and ip not in _SHARED


def _refused(host: str, address: str, url: str) -> AssetError:
    return AssetError("asset_blocked", f"the host {host} is at the private or loopback address "
                                       f"{address}, which asset downloads refuse "
                                       "(asset_private_addresses)", url=url)


def check_literal(target: URL, limits: Limits, url: str) -> None:
    """A URL whose host is an IP address skips the resolver: checked here."""
    host = (target.host or "").strip("[]")
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return  # a name: the resolver checks what it resolves to, at connect time
    if not address_allowed(host, limits):
        raise _refused(host, host, url)


class _GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing names that resolve to an address not allowed (checked
    where the connection is made, so a redirect or a DNS answer cannot get around it)."""

    def __init__(self, limits: Limits) -> None:
        self._inner = DefaultResolver()
        self._limits = limits

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        for info in found:
            if not address_allowed(info["host"], self._limits):
                raise _refused(host, info["host"], host)
        return found

    async def close(self) -> None:
        await self._inner.close()


class _Budget:
    """The task's byte budget, shared by its downloads (one event loop: no lock needed)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0

    def take(self, n: int, url: str) -> None:
        self.used += n
        if self.used > self.total:
            raise self.exceeded(url)

    def exceeded(self, url: str) -> AssetError:
        return AssetError("asset_too_large", f"the task's assets together are larger than the "
                                             f"limit of {self.total:,} bytes (asset_total_bytes)",
                          url=url)

    def give_back(self, n: int) -> None:
        self.used -= n


class _HttpStatus(PipelineError):
    """An HTTP error answer, in the shape the classifier reads (``http_status``)."""

    def __init__(self, status: int, retry_after: float | None) -> None:
        self.code = str(status)
        self.http_status = status
        self.retry_after = retry_after
        self.message = f"HTTP {status}"
        self.scope = "call"
        super().__init__(self.message)


async def download_all(urls: dict[str, str], dest: Path, *, limits: Limits,
                       rules: tuple[Rule, ...], policy: RetryPolicy,
                       clock: Clock) -> dict[str, str]:
    """Fetch every ``url -> kind`` (image | audio | video) into ``dest``; returns url -> path.
    The first failure cancels the other downloads and is raised. At most ``max_count`` URLs,
    ``total_bytes`` together and ``deadline`` seconds for all of them."""
    if len(urls) > limits.max_count:
        raise AssetError("asset_too_many", f"the output names {len(urls)} assets, more than "
                                           f"the limit of {limits.max_count} (asset_max_count)")
    dest.mkdir(parents=True, exist_ok=True)
    gate = asyncio.Semaphore(limits.concurrency)
    budget = _Budget(limits.total_bytes)
    result: dict[str, str] = {}
    resolver = _GuardedResolver(limits)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver)) \
            as session:
        async def one(url: str, kind: str) -> None:
            async with gate:
                result[url] = await _download(session, url, kind, dest, limits, rules, policy,
                                              clock, budget)
        tasks = [asyncio.create_task(one(u, k)) for u, k in urls.items()]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), limits.deadline)
        except asyncio.TimeoutError:
            raise AssetError("asset_timeout", f"the downloads took longer than "
                                              f"{limits.deadline:g} s together "
                                              "(download_deadline)") from None
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return result


def _name(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:20]


async def _download(session: aiohttp.ClientSession, url: str, kind: str, dest: Path,
                    limits: Limits, rules: tuple[Rule, ...], policy: RetryPolicy,
                    clock: Clock, budget: _Budget) -> str:
    done = [p for p in dest.glob(_name(url) + ".*") if not p.name.endswith(".part")]
    if done:  # fetched whole by an earlier attempt
        budget.take(done[0].stat().st_size, url)
        return str(done[0])
    try:
        return await call_with_retry(lambda: _fetch(session, url, kind, dest, limits, budget),
                                     rules=rules, policy=policy, clock=clock)
    except AssetError:
        raise
    except _HttpStatus as exc:
        raise _status_error(url, exc.http_status) from exc
    except asyncio.TimeoutError as exc:
        raise AssetError("asset_timeout", f"the download took longer than {limits.timeout:g} s",
                         url=url) from exc
    except (aiohttp.ClientError, ConnectionError, OSError) as exc:
        raise AssetError("asset_network", f"the download failed: {type(exc).__name__}: {exc}",
                         url=url) from exc


def _status_error(url: str, status: int) -> AssetError:
    if status in (404, 410):
        return AssetError("asset_not_found", f"HTTP {status}: the asset is gone", url=url,
                          http_status=status)
    if status in (401, 403):
        expires = parse_qs(urlsplit(url).query).get("x-expires", [""])[0]
        when = ""
        if expires.isdigit():
            when = time.strftime(" (x-expires %Y-%m-%d %H:%M:%S UTC)", time.gmtime(int(expires)))
        return AssetError("asset_expired", f"HTTP {status}: the signed URL has expired or is not "
                                           f"valid{when}; run the workflow again for fresh URLs",
                          url=url, http_status=status)
    return AssetError("asset_http", f"HTTP {status}", url=url, http_status=status)


async def _fetch(session: aiohttp.ClientSession, url: str, kind: str, dest: Path,
                 limits: Limits, budget: _Budget) -> str:
    """One try: the URL and its redirects (each hop's address checked), then the body."""
    timeout = aiohttp.ClientTimeout(total=limits.timeout, sock_connect=min(10.0, limits.timeout))
    target = URL(url)
    try:
        for _ in range(MAX_REDIRECTS + 1):
            check_literal(target, limits, url)
            async with session.get(target, timeout=timeout, allow_redirects=False) as resp:
                if resp.status in _REDIRECTS and "Location" in resp.headers:
                    target = resp.url.join(URL(resp.headers["Location"]))
                    if target.scheme not in ("http", "https"):
                        raise AssetError("asset_http", f"redirected to a {target.scheme!r} URL",
                                         url=url)
                    continue
                return await _save(resp, url, kind, dest, limits, budget)
        raise AssetError("asset_http", f"more than {MAX_REDIRECTS} redirects", url=url)
    except aiohttp.ClientPayloadError as exc:  # the connection dropped mid-body
        raise ConnectionError(f"connection dropped during the download: {exc}") from exc


async def _save(resp: aiohttp.ClientResponse, url: str, kind: str, dest: Path, limits: Limits,
        budget: _Budget) -> str:
    if resp.status >= 400:
        raise _HttpStatus(resp.status, _retry_after(resp.headers.get("Retry-After")))
    ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
    _check_type(url, kind, ctype)
    if resp.content_length is not None and resp.content_length > limits.max_bytes:
        raise _too_large(url, resp.content_length, limits)
    if resp.content_length is not None and \
            budget.used + resp.content_length > budget.total:
        raise budget.exceeded(url)
    path = dest / (_name(url) + _extension(url, ctype))
    part = path.with_name(path.name + ".part")
    size = 0
    try:
        with part.open("wb") as fh:
            async for chunk in resp.content.iter_chunked(1 << 16):
                size += len(chunk)
                budget.take(len(chunk), url)
                if size > limits.max_bytes:
                    raise _too_large(url, size, limits)
                fh.write(chunk)
        if size == 0:
            raise AssetError("asset_corrupt", "the asset is empty", url=url)
        os.replace(part, path)
        size = -1  # kept: its bytes stay on the budget
    finally:
        part.unlink(missing_ok=True)
        if size >= 0:  # a failed attempt gives its bytes back (a retry counts again)
            budget.give_back(size)
    return str(path)


def _too_large(url: str, size: int, limits: Limits) -> AssetError:
    return AssetError("asset_too_large", f"the asset is larger than the limit of "
                                         f"{limits.max_bytes:,} bytes (asset_max_bytes)", url=url)


def _check_type(url: str, kind: str, ctype: str) -> None:
    if ctype in _NEUTRAL or ctype.startswith(_ACCEPT.get(kind, ())):
        return
    raise AssetError("asset_bad_type", f"expected {kind}, the server sent {ctype!r} "
                                       "(an error page or a wrong link)", url=url)


def _extension(url: str, ctype: str) -> str:
    if ctype in _EXTENSIONS:
        return _EXTENSIONS[ctype]
    suffix = Path(urlsplit(url).path.split("~", 1)[0]).suffix.lower()
    return suffix if suffix and len(suffix) <= 5 and suffix[1:].isalnum() else ".bin"


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None

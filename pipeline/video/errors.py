"""Errors of the video step: every one is a :class:`~pipeline.errors.SynthesisError`.

``code`` names the failure class (the worker records it as the attempt's error code)::

    SynthesisError
    └── VideoError          no_timeline, bad_timeline, font_missing, font_glyphs, ffmpeg_missing,
        │                   timeout (the job, after its downloads),
        │                   render_failed, render_timeout, jianying_unavailable, jianying_failed
        └── AssetError      asset_not_found, asset_expired, asset_http, asset_too_large,
                            asset_bad_type, asset_timeout, asset_network, asset_corrupt,
                            asset_blocked, asset_too_many
"""
from __future__ import annotations

from ..errors import SynthesisError


class VideoError(SynthesisError):
    """The video step failed; ``code`` is the failure class."""


class AssetError(VideoError):
    """One asset could not be used; ``url`` is the asset's URL with its query cut off."""

    def __init__(self, code: str, message: str, *, url: str = "",
                 http_status: int | None = None) -> None:
        self.url = url.split("?", 1)[0]
        self.http_status = http_status
        super().__init__(code, f"{message} ({self.url})" if self.url else message)

"""Find a subtitle font that has a glyph for every character to be shown.

libass draws an empty box for a character its font lacks. So before a render, the font's
character map is read (fontTools) and every subtitle character is looked up: a missing glyph
is an error that names the characters and the fix, never a video with boxes. The font is the
configured ``font_file``, else the first of :data:`CANDIDATES` that exists.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from .errors import VideoError

CANDIDATES = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",            # Debian: fonts-wqy-microhei
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",              # fonts-wqy-zenhei
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",    # fonts-noto-cjk
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",         # Arch, Fedora
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/System/Library/Fonts/PingFang.ttc",                        # macOS
    "/System/Library/Fonts/STHeiti Medium.ttc",
    "C:/Windows/Fonts/msyh.ttc",                                 # Windows: Microsoft YaHei
)
FIX = ("install a CJK font (Debian/Ubuntu: apt-get install fonts-wqy-microhei) or set "
       "[pipeline.synthesis] font_file to a .ttf/.otf/.ttc with Chinese glyphs, or set "
       "subtitles = \"off\"")


@dataclass(frozen=True)
class Font:
    path: str
    family: str      # the name ASS styles use (name table, family)
    postscript: str  # the name libass reports when it selects the font


def find_font(configured: str = "", candidates: tuple[str, ...] = CANDIDATES) -> Font:
    """The configured font, else the first candidate present; :class:`VideoError`
    ``font_missing`` naming the fix when there is none."""
    if configured:
        if not Path(configured).is_file():
            raise VideoError("font_missing", f"font_file {configured!r} does not exist; {FIX}")
        return _load(configured)
    for path in candidates:
        if Path(path).is_file():
            return _load(path)
    raise VideoError("font_missing", f"no CJK font found for the subtitles; {FIX}")


def check_glyphs(font: Font, text: str) -> None:
    """:class:`VideoError` ``font_glyphs`` when ``font`` lacks a glyph for a character of
    ``text`` (white space and control characters aside)."""
    cmap = _cmap(font.path)
    missing = sorted({c for c in text if not c.isspace() and ord(c) >= 32
                      and ord(c) not in cmap})
    if missing:
        shown = "".join(missing[:12]) + ("…" if len(missing) > 12 else "")
        raise VideoError("font_glyphs", f"the font {font.family} ({font.path}) has no glyph for "
                                        f"{len(missing)} character(s): {shown}; {FIX}")


@functools.lru_cache(maxsize=8)
def _load(path: str) -> Font:
    try:
        from fontTools.ttLib import TTFont
        with TTFont(path, fontNumber=0, lazy=True) as tt:
            names = tt["name"]
            family = names.getBestFamilyName() or Path(path).stem
            ps = names.getDebugName(6) or family.replace(" ", "")
    except Exception as exc:  # fontTools raises many kinds on a broken file
        raise VideoError("font_missing", f"cannot read the font {path}: {exc}; {FIX}") from exc
    return Font(path, family, ps)


@functools.lru_cache(maxsize=8)
def _cmap(path: str) -> frozenset[int]:
    from fontTools.ttLib import TTFont
    with TTFont(path, fontNumber=0, lazy=True) as tt:
        return frozenset(tt.getBestCmap() or {})

"""SRT and ASS subtitle files from timed captions.

The ASS file is what ffmpeg's ``ass`` filter burns in; its ``PlayResY`` is 1920 whatever the
video's height (``PlayResX`` follows the aspect ratio), so ``size``, ``margin`` and ``outline``
are pixels of a 1920-pixel-high frame and libass scales them to the real one. The SRT file
is written beside the video for people and for JianYing's subtitle import.
"""
from __future__ import annotations

from dataclasses import dataclass

from .timeline import Caption

REFERENCE_HEIGHT = 1920


@dataclass(frozen=True)
class Style:
    font: str = "WenQuanYi Micro Hei"
    size: int = 64
    color: str = "#FFFFFF"
    outline_color: str = "#000000"
    outline: float = 3.0
    margin: int = 160


def srt(captions: tuple[Caption, ...] | list[Caption]) -> str:
    blocks = []
    for i, c in enumerate(captions, 1):
        blocks.append(f"{i}\n{_srt_time(c.start)} --> {_srt_time(c.end)}\n{_one_line(c.text)}\n")
    return "\n".join(blocks)


def ass(captions: tuple[Caption, ...] | list[Caption], style: Style, *, width: int,
        height: int) -> str:
    play_x = max(1, round(REFERENCE_HEIGHT * width / height))
    head = [
        "[Script Info]", "ScriptType: v4.00+", f"PlayResX: {play_x}",
        f"PlayResY: {REFERENCE_HEIGHT}", "WrapStyle: 0", "ScaledBorderAndShadow: yes", "",
        "[V4+ Styles]",
        "Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, "
        "BackColour, Bold, Italic, Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, "
        "BorderStyle, Outline, Shadow, Alignment, MarginL, MarginR, MarginV, Encoding",
        f"Style: Default,{style.font.replace(',', ' ')},{style.size},{_ass_color(style.color)},"
        f"{_ass_color(style.color)},{_ass_color(style.outline_color)},&H80000000,0,0,0,0,100,"
        f"100,0,0,1,{style.outline:g},0,2,{round(play_x * 0.06)},{round(play_x * 0.06)},"
        f"{style.margin},1",
        "", "[Events]",
        "Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text",
    ]
    lines = [f"Dialogue: 0,{_ass_time(c.start)},{_ass_time(c.end)},Default,,0,0,0,,"
             f"{display_text(c.text)}" for c in captions if c.end > c.start]
    return "\n".join(head + lines) + "\n"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def display_text(text: str) -> str:
    """Text as ASS shows it literally: braces would start override tags, a backslash an escape."""
    text = _one_line(text).replace("\\", "\uff3c").replace("{", "\uff5b").replace("}", "\uff5d")
    return text


def _ass_color(hex_rgb: str) -> str:
    r, g, b = hex_rgb[1:3], hex_rgb[3:5], hex_rgb[5:7]
    return f"&H00{b}{g}{r}".upper()


def _srt_time(seconds: float) -> str:
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def _ass_time(seconds: float) -> str:
    cs = max(0, round(seconds * 100))
    h, cs = divmod(cs, 360_000)
    m, cs = divmod(cs, 6000)
    s, cs = divmod(cs, 100)
    return f"{h:d}:{m:02d}:{s:02d}.{cs:02d}"

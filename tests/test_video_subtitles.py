"""SRT and ASS files: times, escaping, colours, and the sizes of a 1920-high reference frame."""
from __future__ import annotations

from hypothesis import given, strategies as st

from pipeline.video.subtitles import Style, ass, display_text, srt
from pipeline.video.timeline import Caption


def test_srt_blocks_and_times():
    text = srt([Caption(0.0, 1.5, "第一行"), Caption(61.25, 3723.004, "a  b\nc")])
    assert text == ("1\n00:00:00,000 --> 00:00:01,500\n第一行\n\n"
                    "2\n00:01:01,250 --> 01:02:03,004\na b c\n")


def test_ass_style_and_events():
    doc = ass([Caption(0.0, 1.5, "你好{\\b1}"), Caption(2.0, 2.0, "empty")],
              Style("WenQuanYi Micro Hei", 72, "#FFCC00", "#102030", 2.5, 200),
              width=1080, height=1920)
    assert "PlayResX: 1080\nPlayResY: 1920" in doc
    assert "Style: Default,WenQuanYi Micro Hei,72,&H0000CCFF,&H0000CCFF,&H00302010," in doc
    assert ",1,2.5,0,2,65,65,200,1" in doc
    # braces and backslashes cannot become override tags; zero-length events are dropped
    assert "Dialogue: 0,0:00:00.00,0:00:01.50,Default,,0,0,0,,你好｛＼b1｝" in doc
    assert "empty" not in doc


def test_ass_reference_width_follows_the_aspect_ratio():
    assert "PlayResX: 1080\n" in ass([], Style(), width=180, height=320)
    assert "PlayResX: 3413\n" in ass([], Style(), width=1920, height=1080)


@given(st.text(max_size=60))
def test_display_text_never_opens_an_override_block(text):
    shown = display_text(text)
    assert "{" not in shown and "}" not in shown and "\\" not in shown and "\n" not in shown

"""plan(): narration drives scene lengths; timed lists keep their times; captions are split."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from pipeline.video.errors import VideoError
from pipeline.video.timeline import (Caption, Cue, Layout, Media, Scene, Timeline, plan,
                                     split_text)

I1, I2, A1, A2, M, C = "http://x/i1.png", "http://x/i2.png", "http://x/a1.mp3", \
    "http://x/a2.mp3", "http://x/m.mp3", "http://x/c.mp4"
MEDIA = {I1: Media("/w/i1.png", "image", None), I2: Media("/w/i2.png", "image", None),
         A1: Media("/w/a1.mp3", "audio", 2.0, True), A2: Media("/w/a2.mp3", "audio", 3.5, True),
         M: Media("/w/m.mp3", "audio", 60.0, True), C: Media("/w/c.mp4", "video", 1.0, True)}
LAYOUT = Layout(scene_padding=0.5, scene_seconds=3.0, max_chars=8, max_duration=600)


def test_measured_narration_beats_the_declared_duration():
    t = Timeline((Scene(image=I1, narration=A1, text="第一句", duration=9.0),
                  Scene(image=I2, narration=A2, text="第二句", duration=1.0)), music=M)
    p = plan(t, MEDIA, LAYOUT)
    assert [(s.start, s.duration) for s in p.shots] == [(0.0, 2.5), (2.5, 4.0)]
    assert [(s.path, s.start, s.duration) for s in p.sounds] == [("/w/a1.mp3", 0.0, 2.0),
                                                                 ("/w/a2.mp3", 2.5, 3.5)]
    assert p.duration == 6.5 and p.music == "/w/m.mp3"
    assert p.captions == (Caption(0.0, 2.5, "第一句"), Caption(2.5, 6.5, "第二句"))


def test_scenes_without_narration_use_their_duration_or_the_default():
    t = Timeline((Scene(image=I1, duration=1.25), Scene(image=I2)))
    p = plan(t, MEDIA, LAYOUT)
    assert [s.duration for s in p.shots] == [1.25, 3.0] and p.sounds == ()


def test_a_clip_without_narration_keeps_its_length_and_its_sound():
    p = plan(Timeline((Scene(clip=C),)), MEDIA, LAYOUT)
    assert p.shots[0].kind == "video" and p.shots[0].duration == 1.0
    assert p.sounds[0].path == "/w/c.mp4"


def test_one_narration_sets_the_length_and_a_clip_loops_under_it():
    t = Timeline((Scene(clip=C, text="一二三四五六七八九十"),), narration=A2)
    p = plan(t, MEDIA, LAYOUT)
    assert p.duration == 4.0 and p.shots[0].loop and p.shots[0].duration == 4.0
    assert [c.text for c in p.captions] == ["一二三四五六七八", "九十"]
    assert p.captions[-1].end == pytest.approx(4.0)


def test_timed_lists_keep_their_starts_and_close_gaps():
    t = Timeline((Scene(image=I1, start=0.0, duration=2.0), Scene(image=I2, start=3.0,
                                                                  duration=1.0)),
                 cues=(Cue(A1, 0.0, 2.0), Cue(A2, 2.5, 9.0, 0.5)),
                 captions=(Caption(0.0, 2.0, "你好"),))
    p = plan(t, MEDIA, LAYOUT)
    # the second audio lasts 3.5 s measured (declared 6.5): the video ends when it ends
    assert p.duration == 6.0
    assert [(s.start, s.duration) for s in p.shots] == [(0.0, 3.0), (3.0, 3.0)]
    assert p.sounds[1].volume == 0.5 and p.sounds[1].start == 2.5
    assert p.captions == (Caption(0.0, 2.0, "你好"),)


@pytest.mark.parametrize("timeline,media,needle", [
    (Timeline(()), MEDIA, "no image or video clip"),
    (Timeline((Scene(narration=A1),)), MEDIA, "no image or video clip"),
    (Timeline((Scene(image="http://x/missing.png"),)), MEDIA, "were not downloaded"),
    (Timeline((Scene(image=I1, duration=601.0),)), MEDIA, "more than max_duration"),
])
def test_unusable_timelines(timeline, media, needle):
    with pytest.raises(VideoError, match=needle) as err:
        plan(timeline, media, LAYOUT)
    assert err.value.code == "bad_timeline"


@pytest.mark.parametrize("text,lines", [
    ("清晨，橘猫在窗台上伸了个懒腰。", ["清晨，", "橘猫在窗台上伸了", "个懒腰。"]),
    ("短句。再来。", ["短句。", "再来。"]),
    ("a  b\nc", ["a b c"]),
    ("", []),
])
def test_split_text(text, lines):
    assert split_text(text, 8) == lines


@given(st.text(min_size=1, max_size=200), st.integers(4, 30))
def test_split_text_keeps_every_character_and_the_limit(text, n):
    lines = split_text(text, n)
    assert all(len(x) <= n for x in lines)
    assert "".join(lines).replace(" ", "") == "".join(text.split())

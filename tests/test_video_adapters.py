"""Adapters: real-shaped Coze outputs in, the typed timeline out (tables, good and bad input)."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from pipeline.video.adapters import time_factor, to_timeline, unwrap
from pipeline.video.errors import VideoError
from pipeline.video.timeline import Caption, Cue, Scene

IMG1 = "https://p3-bot-sign.byteimg.com/tos-cn-i-xxx/scene1.png~tplv-x.png?x-expires=1767225600&x-signature=abc"
IMG2 = "https://p3-bot-sign.byteimg.com/tos-cn-i-xxx/scene2.png~tplv-x.png?x-expires=1767225600&x-signature=def"
MP3_1 = "https://lf-bot-studio-plugin-resource.coze.cn/obj/tts/scene1.mp3"
MP3_2 = "https://lf-bot-studio-plugin-resource.coze.cn/obj/tts/scene2.mp3"
BGM = "https://lf-bot-studio-plugin-resource.coze.cn/obj/bgm/calm.mp3"
T1, T2 = "清晨，橘猫在窗台上伸了个懒腰。", "它盯着窗外的麻雀，尾巴轻轻摆动。"

# the parallel-array shape (samples/coze_video_output_arrays.json), durations in seconds
ARRAYS = {"images": [IMG1, IMG2], "mp3_urls": [MP3_1, MP3_2], "mp3_durations": [5.112, 4.368],
          "texts": [T1, T2], "bg_audio": BGM}


def _jianying(factor: int) -> dict:
    """samples/coze_video_output_jianying_lists.json, times scaled to ``factor`` per second."""
    a, b, c = 0, int(5.112 * factor), int(9.48 * factor)
    return {
        "image_infos": json.dumps([{"image_url": IMG1, "start": a, "end": b},
                                   {"image_url": IMG2, "start": b, "end": c}]),
        "audio_infos": json.dumps([{"audio_url": MP3_1, "start": a, "end": b, "volume": 1.0},
                                   {"audio_url": MP3_2, "start": b, "end": c, "volume": 0.8}]),
        "captions": json.dumps([{"start": a, "end": b, "text": T1, "keyword": "橘猫"},
                                {"start": b, "end": c, "text": T2, "keyword": "麻雀"}],
                               ensure_ascii=False),
    }


# run_histories output of samples/coze_run_histories_video_nested.json, as the worker gets it
NESTED_RAW = ("{\"Output\": \"{\\\"audioUrl\\\": \\\"https://lf-bot-studio-plugin-resource.coze.cn"
              "/obj/tts/full.mp3\\\", \\\"videoUrl\\\": \\\"https://lf3-static.bytednsdoc.com/obj/"
              "avatar/clip-123.mp4\\\", \\\"content\\\": \\\"清晨，橘猫在窗台上伸了个懒腰。它盯着窗外"
              "的麻雀，尾巴轻轻摆动。\\\"}\"}")


def test_parallel_arrays_pair_by_index_with_durations_in_seconds():
    t = to_timeline(ARRAYS)
    assert t.shape == "arrays" and t.music == BGM
    assert t.scenes == (Scene(image=IMG1, narration=MP3_1, text=T1, duration=5.112),
                        Scene(image=IMG2, narration=MP3_2, text=T2, duration=4.368))
    assert t.urls() == [IMG1, MP3_1, IMG2, MP3_2, BGM]


@pytest.mark.parametrize("wrap", [
    lambda d: d,
    lambda d: json.dumps(d, ensure_ascii=False),                         # JSON string
    lambda d: {"output": json.dumps(d, ensure_ascii=False)},            # {"output": "<JSON>"}
    lambda d: {"Output": json.dumps(json.dumps(d))},                     # JSON inside JSON twice
    lambda d: {"data": d},
    lambda d: {"output": d, "debug": "x"},                               # a wrapper among others
])
def test_wrappers_are_unwrapped_at_any_depth(wrap):
    assert to_timeline(wrap(ARRAYS)).scenes == to_timeline(ARRAYS).scenes


@pytest.mark.parametrize("key_images,key_audio,key_texts,key_music", [
    ("image_list", "audio_list", "text_list", "bgm"),
    ("pics", "voice_urls", "subtitles", "bg_music"),
])
def test_array_aliases(key_images, key_audio, key_texts, key_music):
    t = to_timeline({key_images: [IMG1], key_audio: [MP3_1], key_texts: [T1], key_music: BGM})
    assert t.scenes[0] == Scene(image=IMG1, narration=MP3_1, text=T1) and t.music == BGM


def test_arrays_of_different_lengths_leave_the_missing_parts_empty():
    t = to_timeline({"images": [IMG1, IMG2], "mp3_urls": [MP3_1], "texts": [T1]})
    assert t.scenes[1] == Scene(image=IMG2)


def test_durations_in_milliseconds_are_recognised():
    t = to_timeline(dict(ARRAYS, mp3_durations=[5112, 4368]))
    assert [s.duration for s in t.scenes] == pytest.approx([5.112, 4.368])


@pytest.mark.parametrize("factor", [1_000_000, 1000])  # microseconds, milliseconds
def test_jianying_lists_as_json_strings_in_us_or_ms(factor):
    t = to_timeline(_jianying(factor))
    assert t.shape == "jianying"
    assert [(s.image, s.start, s.duration) for s in t.scenes] == [
        (IMG1, 0.0, pytest.approx(5.112)), (IMG2, pytest.approx(5.112), pytest.approx(4.368))]
    assert t.cues == (Cue(MP3_1, 0.0, pytest.approx(5.112), 1.0),
                      Cue(MP3_2, pytest.approx(5.112), pytest.approx(9.48), 0.8))
    assert [c.text for c in t.captions] == [T1, T2]
    assert t.captions[1].end == pytest.approx(9.48)


def test_jianying_time_unit_can_be_forced():
    t = to_timeline({"image_infos": [{"image_url": IMG1, "start": 0, "end": 4}]}, time_unit="s")
    assert t.scenes[0].duration == 4


def test_the_double_encoded_output_shape_from_run_histories():
    t = to_timeline(NESTED_RAW)
    assert t.shape == "single"
    assert t.scenes == (Scene(clip="https://lf3-static.bytednsdoc.com/obj/avatar/clip-123.mp4",
                              text=T1 + T2),)
    assert t.narration == "https://lf-bot-studio-plugin-resource.coze.cn/obj/tts/full.mp3"


@pytest.mark.parametrize("output", [
    None, "", "result t0", {"output": "result t0"}, {"output": "一段脚本文字"}, [1, 2],
    {"Output": "{\"title\": \"标题\", \"script\": \"正文\"}"}, 42,
])
def test_outputs_without_media_give_none(output):
    assert to_timeline(output) is None


@pytest.mark.parametrize("output,needle", [
    ({"images": ["not a url"]}, "images[0] is not an http(s) URL"),
    ({"images": [IMG1], "mp3_urls": ["ftp://x/y.mp3"]}, "narrations[0]"),
    ({"images": [IMG1], "mp3_durations": ["five"]}, "not a number"),
    ({"images": [IMG1], "mp3_durations": [-1]}, "zero or more"),
    ({"image_infos": "[1, 2]"}, "image_infos[0] is not an object"),
    ({"image_infos": [{"image_url": IMG1, "start": 9, "end": 3}]}, "before it starts"),
    ({"image_infos": [{"image_url": 7, "start": 0, "end": 3}]}, "not an http(s) URL"),
    ({"images": {"a": 1}}, "expected a list"),
])
def test_unusable_content_of_a_known_shape_is_a_clear_error(output, needle):
    with pytest.raises(VideoError) as err:
        to_timeline(output)
    assert err.value.code == "bad_timeline" and needle in err.value.message


MAPPED = {"code": 0, "data": json.dumps({"scenes": [
    {"picture": IMG1, "voice": MP3_1, "line": T1, "seconds": 5},
    {"picture": IMG2, "voice": MP3_2, "line": T2, "seconds": 4}], "bgm": BGM},
    ensure_ascii=False)}
MAPPING = {"images": "data.scenes[].picture", "narrations": "data.scenes[].voice",
           "texts": "data.scenes[].line", "durations": "data.scenes[].seconds",
           "music": "data.bgm", "time_unit": "s"}


def test_a_configured_mapping_reads_any_other_shape():
    t = to_timeline(MAPPED, MAPPING)
    assert t.shape == "mapping" and t.music == BGM
    assert t.scenes == (Scene(image=IMG1, narration=MP3_1, text=T1, duration=5.0),
                        Scene(image=IMG2, narration=MP3_2, text=T2, duration=4.0))


def test_a_mapping_for_one_clip_and_one_narration():
    out = {"result": {"clip": "https://cdn.example.com/a.mp4",
                      "voice": "https://cdn.example.com/a.mp3", "script": T1}}
    t = to_timeline(out, {"video": "result.clip", "narration": "result.voice",
                          "text": "result.script"})
    assert t.scenes == (Scene(clip="https://cdn.example.com/a.mp4", text=T1),)
    assert t.narration == "https://cdn.example.com/a.mp3"


def test_a_mapping_with_an_unknown_key_names_the_known_ones():
    with pytest.raises(VideoError, match="unknown keys \\['pictures'\\]"):
        to_timeline(MAPPED, {"pictures": "data.scenes[].picture"})


def test_a_mapping_whose_paths_find_nothing_has_no_picture():
    t = to_timeline(MAPPED, {"images": "data.nothing[].x"})
    assert t.scenes == ()


@pytest.mark.parametrize("values,factor", [
    ([5.112, 4.368], 1.0), ([5112, 4368], 1e-3), ([5_112_000, 9_480_000], 1e-6), ([], 1.0),
    ([0, 999.9], 1.0), ([0, 1000], 1e-3),
])
def test_time_factor_guesses_from_the_largest_value(values, factor):
    assert time_factor(values) == factor


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                        max_size=3),
                    max_leaves=12))
def test_any_json_gives_a_timeline_none_or_a_video_error(value):
    for candidate in (value, json.dumps(value)):
        try:
            t = to_timeline(candidate)
        except VideoError as exc:
            assert exc.code == "bad_timeline"
        else:
            assert t is None or t.shape


def test_unwrap_stops_at_plain_text():
    assert unwrap({"output": "result t0"}) == "result t0"
    assert unwrap("\"quoted\"") == "quoted"


def test_captions_are_kept_as_given():
    t = to_timeline(_jianying(1000))
    assert t.captions[0] == Caption(0.0, pytest.approx(5.112), T1)

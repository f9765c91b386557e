"""Adapters: a workflow output, whatever its shape, in; one :class:`~.timeline.Timeline` out.

:func:`to_timeline` first unwraps the output (JSON inside JSON strings, ``{"Output": "<JSON>"}``
and similar one-key wrappers, any depth up to 6), then tries, in order:

1. ``mapping`` from the config (``[pipeline.synthesis.mapping]``), when one is set;
2. JianYing-helper lists: ``image_infos`` / ``video_infos`` / ``audio_infos`` / ``captions``,
   each a list or a JSON string of one, with ``start`` / ``end`` (or ``duration``) in seconds,
   milliseconds or microseconds (see :func:`time_factor`);
3. parallel arrays: ``images``, ``mp3_urls``, ``mp3_durations``, ``texts``, ``bg_audio`` (and
   the common aliases in :data:`ARRAY_KEYS`), paired by index;
4. one clip or image with one narration: ``videoUrl`` / ``imageUrl``, ``audioUrl``,
   ``content``.

It returns None when nothing matches (a text-only workflow: the caller writes a manifest) and
raises :class:`~.errors.VideoError` ``bad_timeline`` when a shape matches but its content is
unusable (a URL that is not a URL, a time that is not a number).

A mapping names where each part lives, as dotted paths from the top of the output (no wrapper
is skipped: write ``Output.images`` for ``{"Output": ...}``). ``[]`` after a key maps over a
list; JSON strings met on the way are decoded::

    [pipeline.synthesis.mapping]
    images = "data.scenes[].picture"     # list of image URLs (or clips = ... for video clips)
    narrations = "data.scenes[].voice"   # list of narration URLs, one per scene
    texts = "data.scenes[].line"         # list of subtitle texts
    durations = "data.scenes[].seconds"  # list of scene lengths (narration wins when present)
    music = "data.bgm"                   # one background-music URL
    narration = "data.voice_over"        # one narration for the whole video
    text = "data.script"                 # one text for the whole video
    time_unit = "s"                      # unit of durations: s | ms | us (default: guessed)
"""
from __future__ import annotations

import json
import re
from typing import Any

from .errors import VideoError
from .timeline import Caption, Cue, Scene, Timeline

__all__ = ["to_timeline", "unwrap", "time_factor", "ARRAY_KEYS", "MAPPING_KEYS"]

ARRAY_KEYS = {
    "images": ("images", "image_list", "image_urls", "imgs", "pics", "pictures"),
    "clips": ("videos", "video_list", "video_urls", "clips"),
    "narrations": ("mp3_urls", "audio_urls", "audios", "audio_list", "voice_urls", "voices",
                   "mp3s"),
    "durations": ("mp3_durations", "audio_durations", "durations", "duration_list"),
    "texts": ("texts", "text_list", "subtitles", "sentences", "lines"),
    "music": ("bg_audio", "bgm", "bg_music", "bgm_url", "background_music", "music",
              "music_url"),
}
MAPPING_KEYS = ("images", "clips", "narrations", "texts", "durations", "music", "narration",
                "text", "video", "image", "time_unit")
_WRAPPERS = ("Output", "output", "data", "result", "Result", "res")
_URL = re.compile(r"^https?://\S+$")


def to_timeline(output: Any, mapping: dict[str, str] | None = None,
                time_unit: str = "auto") -> Timeline | None:
    """The timeline in ``output``, or None when it has no media (see the module docstring)."""
    if mapping:  # paths start at the output itself, only JSON strings are decoded
        return _from_mapping(_decoded(output), mapping, time_unit)
    data = unwrap(output)
    if not isinstance(data, dict):
        return None
    if any(k in data for k in ("image_infos", "video_infos", "audio_infos")):
        return _from_jianying(data, time_unit)
    if any(k in data for k in ARRAY_KEYS["images"] + ARRAY_KEYS["clips"]):
        return _from_arrays(data, time_unit)
    if any(k in data for k in ("videoUrl", "video_url", "imageUrl", "image_url")):
        return _from_single(data)
    return None


def unwrap(value: Any, depth: int = 6) -> Any:
    """Decode JSON strings and step into one-key wrappers until something else shows."""
    for _ in range(depth):
        if isinstance(value, str):
            decoded = _json(value)
            if decoded is None or decoded == value:
                return value
            value = decoded
        elif isinstance(value, dict) and len(value) == 1 and next(iter(value)) in _WRAPPERS:
            value = next(iter(value.values()))
        elif isinstance(value, dict) and any(k in value for k in _WRAPPERS) and not _media(value):
            inner = next(value[k] for k in _WRAPPERS if k in value)
            if not isinstance(inner, (dict, str)) or not _media(unwrap(inner, 2)):
                return value
            value = inner
        else:
            return value
    return value


def _decoded(value: Any) -> Any:
    for _ in range(6):
        decoded = _json(value) if isinstance(value, str) else None
        if decoded is None:
            return value
        value = decoded
    return value


def _media(value: Any) -> bool:
    keys = [k for group in ARRAY_KEYS.values() for k in group] + [
        "image_infos", "video_infos", "audio_infos", "videoUrl", "video_url", "imageUrl",
        "image_url", "audioUrl"]
    return isinstance(value, dict) and any(k in value for k in keys)


def _json(text: str) -> Any:
    text = text.strip()
    if not text or text[0] not in "[{\"":
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def time_factor(values: list[float], unit: str = "auto") -> float:
    """Seconds per unit of ``values``: given, or guessed from the largest value (at least
    1,000,000: microseconds; at least 1,000: milliseconds; else seconds). A video of 1 s or more
    has an end of at least 1,000,000 in microseconds, and short videos last under 1,000 s."""
    if unit != "auto":
        return {"s": 1.0, "ms": 1e-3, "us": 1e-6}[unit]
    top = max((abs(v) for v in values), default=0.0)
    return 1e-6 if top >= 1e6 else 1e-3 if top >= 1000 else 1.0


# -- shapes ---------------------------------------------------------------------------------

def _from_arrays(data: dict, unit: str) -> Timeline:
    images = _urls(data, "images")
    clips = _urls(data, "clips")
    voices = _urls(data, "narrations")
    texts = [str(t) for t in _list(_first(data, "texts") or [])]
    raw = [_number(d, "durations") for d in _list(_first(data, "durations") or [])]
    factor = time_factor([d for d in raw if d is not None], unit)
    visuals = clips or images
    scenes = []
    for i, visual in enumerate(visuals):
        d = raw[i] if i < len(raw) else None
        scenes.append(Scene(image="" if clips else visual, clip=visual if clips else "",
                            narration=voices[i] if i < len(voices) else "",
                            text=texts[i] if i < len(texts) else "",
                            duration=d * factor if d is not None else None))
    music = _first(data, "music")
    return Timeline(tuple(scenes), music=_url(music, "music") if music else "", shape="arrays")


def _from_jianying(data: dict, unit: str) -> Timeline:
    images = [dict(x, _kind="image") for x in _items(data, "image_infos")]
    clips = [dict(x, _kind="video") for x in _items(data, "video_infos")]
    audios = _items(data, "audio_infos")
    captions = _items(data, "captions")
    times = [v for item in images + clips + audios + captions
             for v in (_time(item, "start"), _time(item, "end"), _time(item, "duration"))
             if v is not None]
    f = time_factor(times, unit)
    scenes = []
    for item in sorted(images + clips, key=lambda x: _time(x, "start") or 0):
        url = _url(item.get("image_url") or item.get("video_url") or item.get("url"),
                   f"{item['_kind']}_infos url")
        start, end = _span(item, f)
        scenes.append(Scene(image=url if item["_kind"] == "image" else "",
                            clip=url if item["_kind"] == "video" else "",
                            start=start, duration=(end - start) if end is not None else None))
    cues = []
    for item in audios:
        start, end = _span(item, f)
        volume = _number(item.get("volume", 1.0), "audio_infos volume")
        cues.append(Cue(_url(item.get("audio_url") or item.get("url"), "audio_infos url"),
                        start, end, 1.0 if volume is None else volume))
    caps = []
    for item in captions:
        start, end = _span(item, f)
        if str(item.get("text") or "").strip() and end is not None:
            caps.append(Caption(start, end, str(item["text"])))
    music = _first(data, "music")
    return Timeline(tuple(scenes), music=_url(music, "music") if music else "", cues=tuple(cues),
                    captions=tuple(caps), shape="jianying")


def _from_single(data: dict) -> Timeline:
    clip = data.get("videoUrl") or data.get("video_url") or ""
    image = "" if clip else (data.get("imageUrl") or data.get("image_url") or "")
    audio = data.get("audioUrl") or data.get("audio_url") or ""
    text = data.get("content") or data.get("text") or ""
    scene = Scene(clip=_url(clip, "videoUrl") if clip else "",
                  image=_url(image, "imageUrl") if image else "", text=str(text))
    return Timeline((scene,), narration=_url(audio, "audioUrl") if audio else "",
                    shape="single")


def _from_mapping(data: Any, mapping: dict[str, str], unit: str) -> Timeline:
    unknown = set(mapping) - set(MAPPING_KEYS)
    if unknown:
        raise VideoError("bad_timeline", f"[pipeline.synthesis.mapping] has unknown keys "
                                         f"{sorted(unknown)}; known: {', '.join(MAPPING_KEYS)}")
    got = {k: _path(data, p) for k, p in mapping.items() if k != "time_unit"}
    unit = mapping.get("time_unit", unit)
    if unit not in ("auto", "s", "ms", "us"):
        raise VideoError("bad_timeline", f"mapping time_unit must be s, ms or us, got {unit!r}")
    fields: dict[str, Any] = {
        "images": [_url(u, "images") for u in _list(got.get("images") or [])],
        "mp3_urls": [_url(u, "narrations") for u in _list(got.get("narrations") or [])],
        "texts": [str(t) for t in _list(got.get("texts") or [])],
        "durations": _list(got.get("durations") or []),
        "videos": [_url(u, "clips") for u in _list(got.get("clips") or [])],
    }
    single = any(got.get(k) for k in ("video", "image", "narration"))
    if single and not (fields["images"] or fields["videos"]):
        t = _from_single({"videoUrl": got.get("video"), "imageUrl": got.get("image"),
                          "audioUrl": got.get("narration"), "content": got.get("text") or ""})
    else:
        t = _from_arrays({k: v for k, v in fields.items() if v}, unit)
        if got.get("narration"):
            t = Timeline(t.scenes, narration=_url(got["narration"], "narration"))
    music = got.get("music")
    return Timeline(t.scenes, music=_url(music, "music") if music else "",
                    narration=t.narration, shape="mapping")


# -- field access ---------------------------------------------------------------------------

def _path(data: Any, path: str) -> Any:
    """Follow a dotted path (``a.b[].c``); missing keys give None."""
    value: Any = data
    parts = [p for p in path.split(".") if p]
    for i, part in enumerate(parts):
        many = part.endswith("[]")
        key = part[:-2] if many else part
        value = _step(value, key)
        if many:
            rest = ".".join(parts[i + 1:])
            items = _list(value or [])
            return [_path(unwrap(item, 3), rest) if rest else item for item in items]
    return value


def _step(value: Any, key: str) -> Any:
    value = unwrap(value, 3) if isinstance(value, str) else value
    if isinstance(value, dict):
        return value.get(key)
    if isinstance(value, list) and key.isdigit() and int(key) < len(value):
        return value[int(key)]
    return None


def _first(data: dict, group: str) -> Any:
    return next((data[k] for k in ARRAY_KEYS[group] if k in data and data[k] not in ("", None)),
                None)


def _list(value: Any) -> list:
    if isinstance(value, str):
        decoded = _json(value)
        if isinstance(decoded, list):
            return decoded
        return [value] if value.strip() else []
    if isinstance(value, list):
        return value
    raise VideoError("bad_timeline", f"expected a list, got {type(value).__name__}")


def _items(data: dict, key: str) -> list[dict]:
    items = _list(data.get(key) or [])
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise VideoError("bad_timeline", f"{key}[{i}] is not an object")
    return items


def _urls(data: dict, group: str) -> list[str]:
    value = _first(data, group)
    return [_url(u, f"{group}[{i}]") for i, u in enumerate(_list(value or []))]


def _url(value: Any, where: str) -> str:
    if isinstance(value, dict):  # {"url": ...} items seen in some plugins
        value = value.get("url") or value.get("image_url") or value.get("audio_url")
    if not isinstance(value, str) or not _URL.match(value.strip()):
        raise VideoError("bad_timeline", f"{where} is not an http(s) URL: {str(value)[:80]!r}")
    return value.strip()


def _number(value: Any, where: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise VideoError("bad_timeline", f"{where} is not a number: {str(value)[:40]!r}") from None
    if number != number or number < 0:
        raise VideoError("bad_timeline", f"{where} must be zero or more, got {value!r}")
    return number


def _time(item: dict, key: str) -> float | None:
    return _number(item.get(key), key)


def _span(item: dict, factor: float) -> tuple[float, float | None]:
    start = (_time(item, "start") or 0.0) * factor
    end = _time(item, "end")
    if end is None and _time(item, "duration") is not None:
        return start, start + _time(item, "duration") * factor
    if end is not None and end * factor < start:
        raise VideoError("bad_timeline", f"an item ends ({end}) before it starts")
    return start, end * factor if end is not None else None

"""Pipeline configuration: limits, polling, retry budgets and classifier rules as data.

Built once at the entry point (see ``bot.settings``) and passed down; nothing in ``pipeline``
reads the environment. Durations are in seconds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Rule:
    """One classifier rule: when it matches, the error gets ``action``.

    ``action`` is one of ``retry`` (backoff and try again), ``resubmit`` (end the wait at once and
    submit the run again, at most ``max_resubmits`` times), ``fail`` (stop this task now) or
    ``fatal`` (stop the batch, open the breaker, alert a human).
    Match fields are OR-ed inside a rule: any listed code, any HTTP status, or any message
    substring (case-insensitive) matches.
    """

    name: str
    action: str
    codes: tuple[str, ...] = ()
    http_statuses: tuple[int, ...] = ()
    messages: tuple[str, ...] = ()
    http_range: tuple[int, int] | None = None  # inclusive, e.g. (500, 599)
    tier: str | None = None  # alert tier override: LOW / MEDIUM / HIGH / CRITICAL
    scope: str = "any"       # "run": only a run that ended in Fail; "call": only an API call


ACTIONS = ("retry", "resubmit", "fail", "fatal")


DEFAULT_RULES: tuple[Rule, ...] = (
    # Order matters: the first matching rule wins.
    # Fatal rules judge API calls only: a run that ended in Fail because a plugin inside the
    # workflow got "permission denied" from a third party says nothing about opsbot's token.
    Rule("auth", "fatal", codes=("4100", "4101", "401", "403", "99991663", "99991661", "99991672"),
         http_statuses=(401, 403),
         messages=("token invalid", "invalid token", "token expired", "unauthorized",
                   "permission denied"), scope="call"),
    Rule("balance", "fatal", codes=("4011", "4019", "4022", "4008", "6003"),
         messages=("insufficient balance", "quota exhausted", "quota exceeded", "arrears"),
         scope="call"),
    Rule("risk_control", "fail", codes=("4102",)),  # a verdict on this input, not on the account
    Rule("plugin_timeout", "resubmit", codes=("720701002", "720701001"),
         messages=("timeout", "timed out", "access plugin", "server error"), scope="run"),
    Rule("rate_limited", "retry", codes=("4009", "4013", "4020", "429"), http_statuses=(429,),
         messages=("rate limit", "too many requests")),
    Rule("server", "retry", codes=("5000",), http_range=(500, 599)),
    Rule("network", "retry", codes=("network",)),
    Rule("bad_request", "fail", codes=("4000", "4200", "4314", "400", "404"),
         http_statuses=(400, 404), messages=("invalid parameter", "validation")),
)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter."""

    max_attempts: int = 5          # tries of one call, including the first
    initial: float = 1.0           # first wait
    maximum: float = 30.0          # cap on one wait
    multiplier: float = 2.0
    max_total: float = 300.0       # give up once this much time was spent waiting
    max_resubmits: int = 1         # for ``resubmit`` rules: new runs after the first


@dataclass(frozen=True)
class PollPolicy:
    """Adaptive polling of a running workflow: soon at first, then spaced out, capped."""

    first: float = 1.0
    multiplier: float = 1.5
    maximum: float = 10.0


@dataclass(frozen=True)
class BreakerPolicy:
    failure_threshold: int = 5
    open_seconds: float = 60.0
    success_threshold: int = 3


@dataclass(frozen=True)
class SynthesisConfig:
    """The built-in synthesis step (TOML ``[pipeline.synthesis]``); see :mod:`pipeline.video`.

    Sizes in pixels, times in seconds, volumes as factors (1.0 = unchanged). Subtitle sizes and
    margins are in pixels of a 1920-pixel-high frame and scale with the real height.
    """

    mode: str = "auto"            # auto: video when the output has media, else manifest | video | manifest
    width: int = 1080
    height: int = 1920
    fps: int = 30
    crf: int = 23                 # x264 quality: lower is better and bigger
    preset: str = "veryfast"      # x264 speed/size trade-off
    audio_bitrate: str = "128k"
    fit: str = "contain"          # contain: letterbox the whole image | cover: fill and crop
    subtitles: str = "burn"       # burn: into the picture | off: none burned (SRT/ASS still written)
    font_file: str = ""           # a TTF/OTF/TTC with CJK glyphs; "" = search the usual places
    subtitle_size: int = 64
    subtitle_color: str = "#FFFFFF"
    subtitle_outline_color: str = "#000000"
    subtitle_outline: float = 3.0
    subtitle_margin: int = 160    # from the bottom edge
    subtitle_max_chars: int = 16  # longer texts are split into timed lines
    music_volume: float = 0.15
    narration_volume: float = 1.0
    scene_padding: float = 0.3    # silence after each narration before the next scene
    scene_seconds: float = 3.0    # a scene with neither narration nor a duration
    max_duration: float = 600.0   # longer timelines are refused
    time_unit: str = "auto"       # times in JianYing-style lists: auto | s | ms | us
    asset_max_bytes: int = 300_000_000
    asset_timeout: float = 60.0   # one download, start to end
    download_concurrency: int = 4  # downloads at once per task
    asset_max_count: int = 200     # assets one output may name
    asset_total_bytes: int = 1_000_000_000  # all of one task's downloads together
    download_deadline: float = 600.0  # all of one task's downloads, retries included
    asset_private_addresses: str = "auto"  # auto | allow | refuse: asset URLs (and redirects) to private/loopback hosts
    render_timeout: float = 300.0  # one ffmpeg run; it alone is killed past this
    ffmpeg: str = ""              # the ffmpeg binary; "" = imageio-ffmpeg's
    ffmpeg_threads: int = 0       # per render; 0 = ffmpeg decides
    keep_work_files: bool = False  # keep downloads and intermediate files after success
    work_max_age: float = 86400.0  # leftover .work-* folders older than this go at start
    mapping: dict = field(default_factory=dict)  # field paths for other output shapes
    jianying: bool = False        # also build a JianYing draft (needs the jianying extra)
    jianying_dir: str = "var/jianying"  # drafts folder
    jianying_path_map: dict = field(default_factory=dict)  # local prefix -> editors' prefix


SYNTHESIS_MODES = ("auto", "video", "manifest")
_COLOR = re.compile(r"^#[0-9A-Fa-f]{6}$")
_BITRATE = re.compile(r"^[1-9][0-9]{1,3}k$")
_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
            "veryslow")


def check_synthesis(cfg: SynthesisConfig) -> None:
    """Raise ValueError naming the first bad ``[pipeline.synthesis]`` key and its expected form."""
    problems = [
        ("mode", cfg.mode in SYNTHESIS_MODES, f"one of {', '.join(SYNTHESIS_MODES)}"),
        ("width", 16 <= cfg.width <= 7680 and cfg.width % 2 == 0, "an even number, 16..7680"),
        ("height", 16 <= cfg.height <= 7680 and cfg.height % 2 == 0, "an even number, 16..7680"),
        ("fps", 1 <= cfg.fps <= 120, "1..120"),
        ("crf", 0 <= cfg.crf <= 51, "0..51"),
        ("preset", cfg.preset in _PRESETS, f"an x264 preset ({', '.join(_PRESETS)})"),
        ("audio_bitrate", bool(_BITRATE.match(cfg.audio_bitrate)), "like 128k"),
        ("fit", cfg.fit in ("contain", "cover"), "contain or cover"),
        ("subtitles", cfg.subtitles in ("burn", "off"), "burn or off"),
        ("subtitle_size", 8 <= cfg.subtitle_size <= 400, "8..400"),
        ("subtitle_color", bool(_COLOR.match(cfg.subtitle_color)), "#RRGGBB"),
        ("subtitle_outline_color", bool(_COLOR.match(cfg.subtitle_outline_color)), "#RRGGBB"),
        ("subtitle_outline", 0 <= cfg.subtitle_outline <= 20, "0..20"),
        ("subtitle_margin", 0 <= cfg.subtitle_margin <= 1900, "0..1900"),
        ("subtitle_max_chars", 4 <= cfg.subtitle_max_chars <= 200, "4..200"),
        ("music_volume", 0 <= cfg.music_volume <= 4, "0..4"),
        ("narration_volume", 0 <= cfg.narration_volume <= 4, "0..4"),
        ("scene_padding", 0 <= cfg.scene_padding <= 10, "0..10 seconds"),
        ("scene_seconds", 0.1 <= cfg.scene_seconds <= 600, "0.1..600 seconds"),
        ("max_duration", 1 <= cfg.max_duration <= 86400, "1..86400 seconds"),
        ("time_unit", cfg.time_unit in ("auto", "s", "ms", "us"), "auto, s, ms or us"),
        ("asset_max_bytes", cfg.asset_max_bytes >= 1024, "at least 1024"),
        ("asset_timeout", cfg.asset_timeout > 0, "positive seconds"),
        ("download_concurrency", cfg.download_concurrency >= 1, "at least 1"),
        ("asset_max_count", 1 <= cfg.asset_max_count <= 100_000, "1..100000"),
        ("asset_total_bytes", cfg.asset_total_bytes >= cfg.asset_max_bytes,
         "at least asset_max_bytes"),
        ("download_deadline", cfg.download_deadline > 0, "positive seconds"),
        ("asset_private_addresses", cfg.asset_private_addresses in ("auto", "allow", "refuse"),
         "auto, allow or refuse"),
        ("render_timeout", cfg.render_timeout > 0, "positive seconds"),
        ("work_max_age", cfg.work_max_age >= 60, "at least 60 seconds"),
        ("ffmpeg_threads", cfg.ffmpeg_threads >= 0, "0 (auto) or more"),
        ("mapping", isinstance(cfg.mapping, dict) and all(
            isinstance(v, str) for v in cfg.mapping.values()), "a table of field paths"),
        ("jianying_path_map", isinstance(cfg.jianying_path_map, dict) and all(
            isinstance(v, str) for v in cfg.jianying_path_map.values()),
         "a table of local prefix = editors' prefix"),
    ]
    from .video.adapters import MAPPING_KEYS  # the adapters own the mapping's vocabulary
    problems.append(("mapping", set(cfg.mapping) <= set(MAPPING_KEYS),
                     f"a table with keys among {', '.join(MAPPING_KEYS)}"))
    for key, ok, expected in problems:
        if not ok:
            raise ValueError(f"[pipeline.synthesis] {key} must be {expected}, got "
                             f"{getattr(cfg, key)!r}")


@dataclass(frozen=True)
class PipelineConfig:
    max_coze: int = 16
    max_synthesis: int = 4
    coze_qps: float = 20.0              # shared by submit and poll
    run_timeout: float = 3600.0         # a run still Running after this is failed
    lease_seconds: float = 60.0
    synthesis_command: str = ""         # shell-free argv template; "" = built-in synthesis
    skip_synthesis: bool = False
    output_dir: str = "var/output"      # where synthesis writes its files
    task_id_param: str = "task_id"      # workflow parameter carrying the task id ("" = none)
    idle_interval: float = 0.2          # how often an idle worker looks for new work
    fallback_workflow_id: str = ""      # used while the primary's runs keep failing ("" = none)
    fallback_failure_rate: float = 0.5
    fallback_window: float = 600.0
    fallback_min_runs: int = 5
    fallback_cooldown: float = 600.0    # then the primary gets the traffic back
    synthesis_timeout: float = 600.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    poll: PollPolicy = field(default_factory=PollPolicy)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    rules: tuple[Rule, ...] = DEFAULT_RULES
    gate: "GatePolicy" = field(default_factory=lambda: GatePolicy())


def rules_from_data(items: list[Mapping[str, Any]]) -> tuple[Rule, ...]:
    """Build rules from TOML ``[[pipeline.rules]]`` tables; raises ValueError on a bad rule."""
    rules = []
    for i, item in enumerate(items):
        action = item.get("action")
        if action not in ACTIONS:
            raise ValueError(f"pipeline.rules[{i}].action must be one of {ACTIONS}, got {action!r}")
        http_range = item.get("http_range")
        if http_range is not None:
            if not (isinstance(http_range, list) and len(http_range) == 2):
                raise ValueError(f"pipeline.rules[{i}].http_range must be [low, high]")
            http_range = (int(http_range[0]), int(http_range[1]))
        rules.append(Rule(
            name=str(item.get("name", f"rule{i}")),
            action=action,
            codes=tuple(str(c) for c in item.get("codes", ())),
            http_statuses=tuple(int(s) for s in item.get("http_statuses", ())),
            messages=tuple(str(m).lower() for m in item.get("messages", ())),
            http_range=http_range,
            tier=item.get("tier"),
            scope=str(item.get("scope", "any")),
        ))
        if rules[-1].scope not in ("any", "run", "call"):
            raise ValueError(f"pipeline.rules[{i}].scope must be any, run or call")
    return tuple(rules)


# ---- quality gate ------------------------------------------------------------------------------

CHECK_KINDS = ("required", "non_empty", "text_length", "url", "duration")
DURATION_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


@dataclass(frozen=True)
class Check:
    """One quality check on a workflow output (see :mod:`pipeline.quality`).

    ``fields`` are paths into the output: ``a.b`` for keys, ``a[]`` for every item of a list,
    ``a[0]`` for one item; a JSON string met on the way is decoded. ``min`` / ``max`` bound a
    text's length in characters (``text_length``) or a duration in seconds (``duration``, whose
    stated values are in ``unit``: ``s``, ``ms`` or ``us``).
    """

    name: str
    kind: str                      # required | non_empty | text_length | url | duration
    fields: tuple[str, ...]
    min: float | None = None
    max: float | None = None
    unit: str = "s"


@dataclass(frozen=True)
class GatePolicy:
    """The quality gate between the Coze stage and synthesis (no checks: no gate)."""

    max_resubmits: int = 1         # new runs after a failed check, then the task fails (MEDIUM)
    url_timeout: float = 10.0      # seconds one URL check may take (HEAD, then a 1-byte GET)
    checks: tuple[Check, ...] = ()


def gate_from_data(data: Mapping[str, Any]) -> GatePolicy:
    """Build the gate from the TOML ``[pipeline.gate]`` table; raises ValueError when malformed."""
    if not isinstance(data, Mapping):
        raise ValueError("[pipeline.gate] must be a table")
    unknown = set(data) - {"max_resubmits", "url_timeout", "checks"}
    if unknown:
        raise ValueError(f"[pipeline.gate] has unknown keys: {', '.join(sorted(unknown))}")
    max_resubmits = data.get("max_resubmits", GatePolicy.max_resubmits)
    if isinstance(max_resubmits, bool) or not isinstance(max_resubmits, int) or max_resubmits < 0:
        raise ValueError(f"[pipeline.gate] max_resubmits must be a whole number >= 0, "
                         f"got {max_resubmits!r}")
    timeout = data.get("url_timeout", GatePolicy.url_timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"[pipeline.gate] url_timeout must be a positive number, got {timeout!r}")
    items = data.get("checks", [])
    if not isinstance(items, list):
        raise ValueError("[[pipeline.gate.checks]] must be an array of tables")
    checks = tuple(_check_from_data(i, item) for i, item in enumerate(items))
    names = [c.name for c in checks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"pipeline.gate.checks: duplicate name(s) {', '.join(dupes)}")
    return GatePolicy(max_resubmits=max_resubmits, url_timeout=float(timeout), checks=checks)


def _check_from_data(i: int, item: Any) -> Check:
    where = f"pipeline.gate.checks[{i}]"
    if not isinstance(item, Mapping):
        raise ValueError(f"{where} must be a table")
    unknown = set(item) - {"name", "kind", "fields", "min", "max", "unit"}
    if unknown:
        raise ValueError(f"{where} has unknown keys: {', '.join(sorted(unknown))}")
    kind = item.get("kind")
    if kind not in CHECK_KINDS:
        raise ValueError(f"{where}.kind must be one of {CHECK_KINDS}, got {kind!r}")
    fields = item.get("fields")
    if isinstance(fields, str):
        fields = [fields]
    if not (isinstance(fields, list) and fields
            and all(isinstance(f, str) and f.strip() for f in fields)):
        raise ValueError(f"{where}.fields must be a non-empty list of paths like \"content\" "
                         f"or \"images[]\"")
    bounds = {}
    for key in ("min", "max"):
        value = item.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value < 0):
            raise ValueError(f"{where}.{key} must be a number >= 0, got {value!r}")
        bounds[key] = None if value is None else float(value)
    if bounds["min"] is not None and bounds["max"] is not None and bounds["min"] > bounds["max"]:
        raise ValueError(f"{where}: min {bounds['min']:g} is above max {bounds['max']:g}")
    if kind in ("text_length", "duration") and bounds["min"] is None and bounds["max"] is None:
        raise ValueError(f"{where}: a {kind} check needs min, max or both")
    for path in fields:
        parse_path(path)  # raises ValueError naming the bad part
    unit = str(item.get("unit", "s"))
    if unit not in DURATION_UNITS:
        raise ValueError(f"{where}.unit must be one of {tuple(DURATION_UNITS)}, got {unit!r}")
    return Check(name=str(item.get("name") or f"{kind}{i}"), kind=kind,
                 fields=tuple(f.strip() for f in fields), min=bounds["min"], max=bounds["max"],
                 unit=unit)


_STEP = re.compile(r"([^.\[\]\s][^.\[\]]*)|\[(\d*)\]")


def parse_path(path: str) -> list[str | int | None]:
    """``a.b[0].c[]`` -> ``["a", "b", 0, "c", None]`` (None: every item); ValueError if bad."""
    steps: list[str | int | None] = []
    text = path.strip()
    pos = 0
    while pos < len(text):
        dot = text[pos] == "." and pos > 0
        m = _STEP.match(text, pos + 1 if dot else pos)
        if m is None or (dot and m.group(1) is None):
            raise ValueError(f"bad field path {path!r} at {text[pos:]!r}: use keys joined by "
                             f"dots, [] for every item, [N] for one item (e.g. images[].url)")
        key, index = m.group(1), m.group(2)
        steps.append(key.strip() if key is not None else (int(index) if index else None))
        pos = m.end()
    if not steps:
        raise ValueError(f"empty field path {path!r}")
    return steps

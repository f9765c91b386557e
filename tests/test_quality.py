"""The quality gate: checks as data (table tests), URL probing over real HTTP, and the worker's
gate between the Coze stage and synthesis against the Coze simulator on a real SQLite file."""
from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from aiohttp import web
from hypothesis import given, settings as hsettings, strategies as st

from bot.settings import SettingsError, load_settings
from pipeline.config import Check, GatePolicy, SynthesisConfig, gate_from_data
from pipeline.coze import CozeClient
from pipeline.notify import NullNotifier
from pipeline.quality import MISSING, evaluate, resolve, urls_to_probe
from pipeline.standins.simulator import CozeSimulator, Script
from pipeline.clock import FakeClock
from pipeline.urlprobe import probe_urls
from pipeline.worker import Worker
from storage import queue
from tests.test_worker import FAST

# real-shaped outputs (see /work/shared/samples)
NESTED = {"Output": json.dumps({"audioUrl": "https://cdn.example/full.mp3",
                                "videoUrl": "https://cdn.example/clip.mp4",
                                "content": "清晨，橘猫在窗台上伸了个懒腰。"}, ensure_ascii=False)}
ARRAYS = {"images": ["https://cdn.example/1.png", "https://cdn.example/2.png"],
          "mp3_urls": ["https://cdn.example/1.mp3", "https://cdn.example/2.mp3"],
          "mp3_durations": [3.2, 4.1], "texts": ["第一句", "第二句"], "bg_audio": ""}
JIANYING = {"audio_infos": json.dumps([{"audio_url": "https://cdn.example/a.mp3", "start": 0,
                                        "end": 3200000, "volume": 1}]),
            "captions": json.dumps([{"start": 0, "end": 3200000, "text": "你好"}])}


def c(kind, *fields, **kw):
    return Check(name=kw.pop("name", kind), kind=kind, fields=tuple(fields), **kw)


@pytest.mark.parametrize("output, path, expected", [
    (NESTED, "Output.content", [("Output.content", "清晨，橘猫在窗台上伸了个懒腰。")]),
    (json.dumps(NESTED), "Output.videoUrl", [("Output.videoUrl", "https://cdn.example/clip.mp4")]),
    (ARRAYS, "mp3_durations[]", [("mp3_durations[0]", 3.2), ("mp3_durations[1]", 4.1)]),
    (ARRAYS, "images[1]", [("images[1]", "https://cdn.example/2.png")]),
    (ARRAYS, "images[5]", [("images[5]", MISSING)]),
    (ARRAYS, "nope.deeper", [("nope.deeper", MISSING)]),
    (JIANYING, "captions[].text", [("captions[0].text", "你好")]),
    (JIANYING, "audio_infos[0].end", [("audio_infos[0].end", 3200000)]),
    ({"a": []}, "a[]", []),
    ({"a": "text"}, "a[]", [("a[]", MISSING)]),
    ([{"x": 1}], "[0].x", [("[0].x", 1)]),
])
def test_paths_resolve_through_lists_and_json_strings(output, path, expected):
    assert resolve(output, path) == expected


PASS, FAIL = None, "fail"


@pytest.mark.parametrize("check, output, verdict", [
    # required
    (c("required", "content"), {"content": ""}, PASS),
    (c("required", "content"), {"content": None}, ("content", "null")),
    (c("required", "content"), {"text": "x"}, ("content", "missing")),
    (c("required", "Output.videoUrl"), NESTED, PASS),
    (c("required", "Output.title"), NESTED, ("Output.title", "missing")),
    # non_empty
    (c("non_empty", "texts[]"), ARRAYS, PASS),
    (c("non_empty", "bg_audio"), ARRAYS, ("bg_audio", "empty")),
    (c("non_empty", "t"), {"t": "   "}, ("t", "empty")),
    (c("non_empty", "t"), {"t": {}}, ("t", "empty")),
    (c("non_empty", "t"), {"t": 0}, PASS),
    (c("non_empty", "t[]"), {"t": []}, ("t[]", "no items")),
    (c("non_empty", "texts[]"), {"texts": ["a", ""]}, ("texts[1]", "empty")),
    # text_length (characters, not bytes)
    (c("text_length", "Output.content", min=10, max=20), NESTED, PASS),
    (c("text_length", "t", min=3), {"t": "猫猫"}, ("t", "2 characters is below the minimum 3 "
                                                     "characters")),
    (c("text_length", "t", max=3), {"t": "abcd"}, ("t", "4 characters is above the maximum 3 "
                                                     "characters")),
    (c("text_length", "t", min=1), {"t": 5}, ("t", "not text (int)")),
    (c("text_length", "t", min=1), {}, ("t", "missing")),
    # duration (stated by the output, converted to seconds)
    (c("duration", "mp3_durations[]", min=1, max=10), ARRAYS, PASS),
    (c("duration", "mp3_durations[]", max=4), ARRAYS, ("mp3_durations[1]",
                                                       "4.1s is above the maximum 4s")),
    (c("duration", "audio_infos[].end", max=3, unit="us"), JIANYING,
     ("audio_infos[0].end", "3.2s is above the maximum 3s")),
    (c("duration", "d", min=1, unit="ms"), {"d": "1500"}, PASS),
    (c("duration", "d", min=1), {"d": "long"}, ("d", "not a number")),
    (c("duration", "d", min=1), {"d": True}, ("d", "not a number")),
    (c("duration", "d", min=1), {"d": float("nan")}, ("d", "not a number")),
    # url (form only here; answers come from the probe)
    (c("url", "u"), {"u": "ftp://x/y"}, ("u", "not an http(s) URL")),
    (c("url", "u"), {"u": "javascript:alert(1)"}, ("u", "not an http(s) URL")),
    (c("url", "u"), {"u": "https://cdn.example/unknown"}, ("u", "did not answer: not checked")),
])
def test_each_check_kind(check, output, verdict):
    failure = evaluate(output, [check])
    if verdict is PASS:
        assert failure is None
    else:
        assert failure is not None and (failure.path, failure.reason) == verdict
        assert failure.check == check.name and failure.kind == check.kind


def test_url_answers_decide_the_url_check_and_the_first_failure_wins():
    checks = [c("url", "images[]", name="images"), c("non_empty", "bg_audio", name="bgm")]
    assert urls_to_probe(ARRAYS, checks) == ["https://cdn.example/1.png",
                                              "https://cdn.example/2.png"]
    ok = {u: None for u in urls_to_probe(ARRAYS, checks)}
    assert evaluate(ARRAYS, checks, ok).check == "bgm"
    broken = {**ok, "https://cdn.example/2.png": "HTTP 404"}
    failure = evaluate(ARRAYS, checks, broken)
    assert (failure.check, failure.path, failure.reason) == ("images", "images[1]",
                                                             "did not answer: HTTP 404")
    assert failure.message == ('quality check \'images\' (url) failed: images[1] = '
                               '"https://cdn.example/2.png": did not answer: HTTP 404')


def test_a_long_or_hostile_value_is_cut_in_the_message():
    failure = evaluate({"t": "<at id=all></at>" + "x" * 500}, [c("text_length", "t", max=10)])
    assert len(failure.message) < 300 and failure.message.count("x") < 130
    assert "<at id=all></at>" in failure.message  # escaping is the card's job (see below)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda kids: st.lists(kids, max_size=3)
                    | st.dictionaries(st.text(max_size=5), kids, max_size=3), max_leaves=10),
       st.sampled_from(["a", "a[]", "a.b", "[0]", "a[].b", "[]"]))
@hsettings(max_examples=150, deadline=None)
def test_any_output_gives_a_verdict_never_an_exception(output, path):
    checks = [c(kind, path, min=0, max=5) if kind in ("text_length", "duration")
              else c(kind, path) for kind in ("required", "non_empty", "text_length", "url",
                                              "duration")]
    for check in checks:
        failure = evaluate(output, [check])
        assert failure is None or isinstance(failure.message, str)


# --- configuration --------------------------------------------------------------------------

def test_gate_from_toml_data():
    gate = gate_from_data({"max_resubmits": 2, "url_timeout": 3, "checks": [
        {"name": "script", "kind": "text_length", "fields": ["Output.content"], "min": 10},
        {"kind": "url", "fields": "images[]"}]})
    assert gate == GatePolicy(max_resubmits=2, url_timeout=3.0, checks=(
        Check("script", "text_length", ("Output.content",), min=10.0),
        Check("url1", "url", ("images[]",))))
    s = load_settings({}, overrides={"pipeline.gate": {"checks": [
        {"name": "v", "kind": "required", "fields": ["videoUrl"]}]}})
    assert s.pipeline.gate.checks[0].name == "v" and s.pipeline.gate.max_resubmits == 1
    assert load_settings({}).pipeline.gate == GatePolicy()


@pytest.mark.parametrize("data, message", [
    ({"checks": [{"kind": "lenght", "fields": ["a"]}]}, "kind must be one of"),
    ({"checks": [{"kind": "required"}]}, "fields must be a non-empty list"),
    ({"checks": [{"kind": "required", "fields": ["a..b"]}]}, "bad field path 'a..b'"),
    ({"checks": [{"kind": "text_length", "fields": ["a"]}]}, "needs min, max or both"),
    ({"checks": [{"kind": "text_length", "fields": ["a"], "min": 5, "max": 1}]}, "above max"),
    ({"checks": [{"kind": "duration", "fields": ["a"], "max": 1, "unit": "min"}]}, "unit must"),
    ({"checks": [{"kind": "duration", "fields": ["a"], "max": "10"}]}, "max must be a number"),
    ({"checks": [{"kind": "url", "fields": ["a"], "timeout": 3}]}, "unknown keys: timeout"),
    ({"checks": [{"name": "x", "kind": "url", "fields": ["a"]},
                 {"name": "x", "kind": "required", "fields": ["b"]}]}, "duplicate name(s) x"),
    ({"max_resubmits": -1}, "max_resubmits must be"),
    ({"url_timeout": 0}, "url_timeout must be"),
    ({"retries": 1}, "unknown keys: retries"),
    ({"checks": {"kind": "url"}}, "must be an array of tables"),
])
def test_bad_gate_configuration_is_refused_naming_the_key(data, message):
    with pytest.raises(ValueError, match=None) as err:
        gate_from_data(data)
    assert message in str(err.value)
    with pytest.raises(SettingsError) as err2:
        load_settings({}, overrides={"pipeline.gate": data})
    assert message in str(err2.value)


# --- URL probing over real HTTP ---------------------------------------------------------------

class Assets:
    """A tiny asset server: /ok, /gone (404), /signed (HEAD 403, GET 206), /slow, /moved."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path, request.headers.get("Range")))
        if request.path == "/ok":
            return web.Response(body=b"x" * 100)
        if request.path == "/signed":
            if request.method == "HEAD":
                return web.Response(status=403)
            return web.Response(status=206, body=b"x")
        if request.path == "/slow":
            await asyncio.sleep(5)
            return web.Response(body=b"late")
        if request.path == "/moved":
            raise web.HTTPFound("/ok")
        return web.Response(status=404)

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


def test_probe_urls_over_real_http():
    async def go():
        assets = Assets()
        async with assets as base:
            import socket
            with socket.socket() as s:   # a port nobody listens on
                s.bind(("127.0.0.1", 0))
                closed = f"http://127.0.0.1:{s.getsockname()[1]}/x"
            status = await probe_urls([f"{base}/ok", f"{base}/gone", f"{base}/signed",
                                       f"{base}/slow", f"{base}/moved", closed], timeout=0.5,
                                      clock=clock)
            return base, closed, status, assets.seen

    clock = FakeClock()
    base, closed, status, seen = asyncio.run(go())
    assert status == {f"{base}/ok": None, f"{base}/gone": "HTTP 404", f"{base}/signed": None,
                      f"{base}/slow": "timed out after 0.5s", f"{base}/moved": None,
                      closed: "connection failed (ClientConnectorError)"}
    # a 404 is not asked again; a refused HEAD is retried as a one-byte GET
    assert ("GET", "/gone", "bytes=0-0") not in seen
    assert ("GET", "/signed", "bytes=0-0") in seen
    # a timeout and a refused connection are blips: tried 3 times, 1 s then 2 s apart
    assert [m for m, p, _ in seen if p == "/slow"] == ["HEAD"] * 3
    assert [m for m, p, _ in seen if p == "/gone"] == ["HEAD"]
    assert sorted(clock.slept) == [1.0, 1.0, 2.0, 2.0]


class Flaky(Assets):
    """/flaky answers 503 twice, then 200; /busy always 503; /limited 429 then 200; /forbidden
    HEAD and GET 403; /gateway HEAD 403 then a 502 GET."""

    def __init__(self) -> None:
        super().__init__()
        self.count: dict[str, int] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path, request.headers.get("Range")))
        n = self.count[request.path] = self.count.get(request.path, 0) + 1
        if request.path == "/flaky":
            return web.Response(status=503 if n <= 2 else 200)
        if request.path == "/busy":
            return web.Response(status=503)
        if request.path == "/limited":
            return web.Response(status=429 if n == 1 else 200)
        if request.path == "/forbidden":
            return web.Response(status=403)
        if request.path == "/gateway":
            return web.Response(status=403 if request.method == "HEAD" else 502)
        return web.Response(status=404)


def test_probe_retries_blips_and_fails_only_definite_answers():
    async def go():
        flaky = Flaky()
        async with flaky as base:
            status = await probe_urls([f"{base}/{p}" for p in ("flaky", "busy", "limited",
                                                                "forbidden", "gateway")],
                                      timeout=2.0, clock=clock)
            return base, status, flaky.seen

    clock = FakeClock()
    base, status, seen = asyncio.run(go())
    assert status == {f"{base}/flaky": None, f"{base}/busy": "HTTP 503",
                      f"{base}/limited": None, f"{base}/forbidden": "HTTP 403",
                      f"{base}/gateway": "HTTP 502"}
    heads = {p: sum(1 for m, q, _ in seen if q == p and m == "HEAD")
             for p in ("/flaky", "/busy", "/limited", "/forbidden", "/gateway")}
    assert heads == {"/flaky": 3, "/busy": 3, "/limited": 2, "/forbidden": 1, "/gateway": 3}
    assert ("GET", "/forbidden", "bytes=0-0") in seen


def test_one_try_is_bounded_as_a_whole_head_and_get_together():
    class Slowish(Assets):
        async def handle(self, request):
            self.seen.append((request.method, request.path, None))
            await asyncio.sleep(0.4)                           # each request alone is in time
            return web.Response(status=403 if request.method == "HEAD" else 206)

    async def go():
        slow = Slowish()
        async with slow as base:
            return await probe_urls([f"{base}/x"], timeout=0.6, tries=1)

    assert list(asyncio.run(go()).values()) == ["timed out after 0.6s"]


# --- the gate in the worker ---------------------------------------------------------------------

class Recorder(NullNotifier):
    def __init__(self, on_retry=None) -> None:
        self.retrying, self.finished = [], []
        self.on_retry = on_retry

    def task_retrying(self, task, decision, error) -> None:
        self.retrying.append((task["task_key"], decision, error))
        if self.on_retry:
            self.on_retry(task)

    def task_finished(self, task, decision, error) -> None:
        self.finished.append((task["task_key"], task["status"], decision, error))


def _run(db, tmp_path, scripts, gate, notifier, tasks=("t1",)):
    batch = queue.create_batch(db, [{"task_key": k, "params": {"topic": "猫"}} for k in tasks],
                               now=0, source="cli")
    # the gate is under test, not the renderer: synthesis writes the manifest of the output
    cfg = dataclasses.replace(FAST, output_dir=str(tmp_path), gate=gate,
                              synthesis=SynthesisConfig(mode="manifest"))

    async def go():
        async with Assets() as base:
            sim = CozeSimulator(default_duration=0.02)
            for key, output in scripts.items():
                sim.script(key, Script(duration=0.02,
                                       output=json.loads(json.dumps(output).replace("BASE", base))))
            notifier.sim, notifier.base = sim, base
            await sim.start()
            try:
                async with CozeClient(sim.base_url, sim.token) as coze:
                    worker = Worker(db, cfg, coze, "wf", notifier=notifier)
                    await worker.run(drain=True)
                    worker.synth.close()
            finally:
                await sim.stop()
            return sim

    return batch, asyncio.run(go())


GATE = GatePolicy(max_resubmits=1, url_timeout=2.0, checks=(
    Check("script", "text_length", ("content",), min=4),
    Check("video", "url", ("videoUrl",)),
))


def test_a_passing_output_goes_on_to_synthesis(db, tmp_path):
    out = {"content": "一段足够长的文案", "videoUrl": "BASE/ok"}
    batch, sim = _run(db, tmp_path, {"t1": out}, GATE, Recorder())
    [task] = queue.tasks_of(db, batch)
    assert task["status"] == "succeeded" and task["stage"] == "done"
    stages = [(r["stage"], r["outcome"]) for r in db.query(
        "SELECT stage, outcome FROM attempts ORDER BY id")]
    assert stages == [("coze", "success"), ("gate", "success"), ("synthesis", "success")]
    assert len(sim.task("t1").runs) == 1
    # the per-node log: bytes in and out of each stage
    sizes = {r["stage"]: (r["input_bytes"], r["output_bytes"]) for r in db.query(
        "SELECT stage, input_bytes, output_bytes FROM attempts")}
    params = len(task["params"].encode("utf-8"))
    coze_out = len(json.dumps(json.loads(task["coze_output"]), ensure_ascii=False).encode())
    assert sizes["coze"][0] == params and sizes["coze"][1] >= coze_out > 0
    assert sizes["gate"] == (coze_out, coze_out)
    assert sizes["synthesis"][0] == len(task["coze_output"].encode("utf-8"))
    result = json.loads(task["output"])["synthesis"]
    assert sizes["synthesis"][1] == len(json.dumps(result, ensure_ascii=False).encode("utf-8"))


def test_a_failed_check_resubmits_once_and_a_good_run_passes(db, tmp_path):
    bad = {"content": "一段足够长的文案", "videoUrl": "BASE/gone"}
    good = {"content": "一段足够长的文案", "videoUrl": "BASE/ok"}

    def fix(task):   # the next run of the workflow produces a working video URL
        rec.sim.script("t1", Script(duration=0.02, output={**good,
                                                           "videoUrl": rec.base + "/ok"}))

    rec = Recorder(on_retry=fix)
    batch, sim = _run(db, tmp_path, {"t1": bad}, GATE, rec)
    [task] = queue.tasks_of(db, batch)
    assert task["status"] == "succeeded" and task["error_class"] is None
    [(key, decision, error)] = rec.retrying
    assert (decision.action, decision.tier, decision.error_class) == ("resubmit", "LOW", "quality")
    assert error.node == "video" and "HTTP 404" in error.message
    assert len(sim.task("t1").runs) == 2
    rows = list(db.query("SELECT stage, outcome, node, error_code FROM attempts ORDER BY id"))
    assert [(r["stage"], r["outcome"]) for r in rows] == [
        ("coze", "success"), ("gate", "resubmit"), ("coze", "success"), ("gate", "success"),
        ("synthesis", "success")]
    assert (rows[1]["node"], rows[1]["error_code"]) == ("video", "url")


def test_a_check_that_keeps_failing_fails_the_task_medium_naming_check_and_value(db, tmp_path):
    bad = {"content": "短", "videoUrl": "BASE/ok"}
    rec = Recorder()
    batch, sim = _run(db, tmp_path, {"t1": bad}, GATE, rec)
    [task] = queue.tasks_of(db, batch)
    assert task["status"] == "failed" and task["error_class"] == "quality"
    assert task["error_node"] == "script" and task["error_code"] == "text_length"
    assert task["error_message"] == ('quality check \'script\' (text_length) failed: content = '
                                     '"短": 1 characters is below the minimum 4 characters')
    assert len(sim.task("t1").runs) == 2      # the first run and one resubmit
    [(_, status, decision, error)] = rec.finished
    assert (status, decision.action, decision.tier) == ("failed", "fail", "MEDIUM")
    assert not list(db.query("SELECT 1 FROM attempts WHERE stage = 'synthesis'"))
    # a human Retry starts with a fresh gate budget
    assert queue.requeue_tasks(db, [task["id"]], now=1) == 1
    w = Worker(db, FAST, None, "wf")
    assert w._gate_resubmits(task["id"]) == 0


def test_no_checks_no_gate(db, tmp_path):
    batch, _ = _run(db, tmp_path, {"t1": {"content": ""}}, GatePolicy(), Recorder())
    assert queue.tasks_of(db, batch)[0]["status"] == "succeeded"
    assert not list(db.query("SELECT 1 FROM attempts WHERE stage = 'gate'"))


def test_the_medium_alert_names_check_and_value_escaped(db, tmp_path):
    from bot.alerting.router import AlertRouter
    from bot.settings import Settings, FeishuSettings
    from pipeline.clock import Clock

    hostile = {"content": "<at id=all></at>", "videoUrl": "BASE/ok"}
    settings = Settings(feishu=FeishuSettings(alert_chat_id="oc_ops"))
    router = AlertRouter(db, settings, Clock())
    router.sim = router.base = None
    gate = GatePolicy(max_resubmits=0, checks=(Check("script", "text_length", ("content",),
                                                     max=5),))
    batch, _ = _run(db, tmp_path, {"t1": hostile}, gate, router)
    [alert] = list(db.query("SELECT * FROM alerts"))
    assert alert["tier"] == "MEDIUM" and alert["key"] == f"{batch}:gate:quality"
    assert json.loads(alert["details"])["stage"] == "gate"
    [row] = list(db.query("SELECT payload FROM outbox WHERE kind = 'send'"))
    text = json.dumps(json.loads(row["payload"])["card"], ensure_ascii=False)
    # the batch's summary card advises on the quality gate, not "unknown error"
    from bot.alerting.cards import advice
    from bot.alerting.router import batch_card
    summary = json.dumps(batch_card(db, settings, batch, now=0), ensure_ascii=False)
    assert advice("quality", "zh") in summary and advice(None, "zh") not in summary
    assert advice("quality", "en") not in (advice(None, "en"), "advice.quality")
    from bot.chat.mdtext import escape
    assert escape("quality check 'script' (text_length) failed: content") in text
    assert "<at id=all>" not in text and escape("<at id=all></at>") in text


def test_a_rendered_video_counts_as_its_file_size(tmp_path):
    from pipeline.worker import _bytes_of

    video = tmp_path / "t1.mp4"
    video.write_bytes(b"\0" * 12345)
    assert _bytes_of({"video": str(video), "manifest": "m.json"}) == 12345
    gone = {"video": str(tmp_path / "gone.mp4")}
    assert _bytes_of(gone) == len(json.dumps(gone).encode())
    assert _bytes_of("猫") == 3 and _bytes_of(None) is None


def test_the_readme_example_loads(tmp_path):
    from pathlib import Path
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("```toml\n[pipeline.gate]", 1)[1].split("```", 1)[0]
    path = tmp_path / "gate.toml"
    path.write_text("[pipeline.gate]" + block, encoding="utf-8")
    gate = load_settings({"OPSBOT_CONFIG": str(path)}).pipeline.gate
    assert [(c.name, c.kind) for c in gate.checks] == [("script", "text_length"), ("assets", "url"),
                                                        ("narration", "duration")]
    assert gate.checks[1].fields == ("images[]", "mp3_urls[]", "Output.videoUrl")
    assert evaluate(ARRAYS, gate.checks[2:]) is None


@pytest.mark.parametrize("value, text", [
    ("短", '"短"'), ("x" * 121, '"' + "x" * 120 + '"…'), ([1, 2], "[1, 2]"),
    ({"k": "v" * 200}, '{"k": "' + "v" * 113 + "…"), (MISSING, "(missing)"), (None, "null"),
])
def test_values_are_shown_short(value, text):
    from pipeline.quality import shown
    assert shown(value) == text

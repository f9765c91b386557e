"""``opsbot demo``: the whole loop on this machine, no Feishu or Coze account needed.

What runs, all on 127.0.0.1 with ephemeral ports, in this one process:

- the Coze simulator (:class:`pipeline.standins.simulator.CozeSimulator`, its own thread) with scripted
  outcomes: most runs succeed after a few seconds, ``V003`` hits a plugin timeout
  (720701002) on its run and on its resubmit, and later the Coze token stops working;
- a stand-in for the Feishu OpenAPI (:class:`bot.standins.fake_feishu.FakeFeishu`, its own thread) that
  issues tenant tokens, records every message, reply and card patch, and serves a Bitable
  table seeded with eight pending rows;
- the real web app (:func:`bot.app.create_app`) served by werkzeug's ``make_server`` in a
  thread; production serves the same app with gunicorn (see the Procfile). As in the default
  deployment it verifies, decrypts and records events and answers button presses;
- the real worker (:func:`bot.service.run_worker`: pipeline worker, command handling, outbox
  sender, alert router, scheduler) on its own asyncio loop in a thread, stopped through its
  stop event.

Settings are built with :func:`bot.settings.load_settings` from an explicit mapping (the
environment is neither read nor changed for the app); the verification token and the encrypt
key are set, so every event below is encrypted and signed exactly like Feishu's.

The scripted session POSTs events to the web app like Feishu would: ``@opsbot help``,
``@opsbot run``; the MEDIUM alert card arrives, the plugin comes back and Retry is pressed; the
token breaks (HIGH card, batch blocked), is fixed, and Resume is pressed; then ``status`` and
``report --date <today>``, whose card must count this batch's tasks. The transcript is printed from what the fake Feishu received, in arrival order
(messages, replies, card updates), plus the toasts the web app answered button presses with.

Cards are in the language of the caller's settings (``OPSBOT_LANGUAGE=en opsbot demo`` for
English); colours only when stdout is a terminal (``NO_COLOR`` turns them off).

Every wait is bounded (:data:`STEP_TIMEOUT` seconds, scaled by ``pace``); a step that does not
happen in time ends the demo with exit code 1 and says which step. Everything started is
stopped before returning. The database, results, output files, log and transcript stay in
``./var/demo-<timestamp>/`` (a temporary directory when the working directory is read-only).
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import secrets
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, TextIO

from bot.ops.render import Style, button_labels, render_card, render_message, render_toast, use_color

log = logging.getLogger("opsbot.demo")

STEP_TIMEOUT = 30.0        # seconds one step may take at pace 1
CHAT = "oc_demo_ops"       # the group chat: commands and alerts
ADMIN = "ou_demo_zhangsan"
PEOPLE = {ADMIN: "张三"}
APP_TOKEN = "bascnDemoApp"
TABLE_ID = "tblDemoTasks"
WORKFLOW_ID = "7431040978805850999"

# task_id, topic, style, Coze run seconds at pace 1
ROWS = [
    ("V001", "春季新品开箱", "轻松", 2.0),
    ("V002", "露营装备清单", "干货", 2.5),
    ("V003", "城市夜跑路线", "纪录片", 1.0),   # plugin timeout twice -> MEDIUM alert
    ("V004", "三分钟早餐", "轻松", 3.0),
    ("V005", "旧物改造", "教程", 2.0),
    ("V006", "咖啡拉花入门", "教程", 2.5),
    ("V007", "周末短途自驾", "vlog", 14.0),     # still running when the token breaks
    ("V008", "办公室健身操", "vlog", 14.0),
]
PLUGIN_TASK = "V003"


class StepTimeout(Exception):
    """A scripted step did not happen in time."""


def run_demo(settings: Any = None, *, out: TextIO | None = None, base_dir: Path | None = None,
             pace: float = 1.0, color: bool | None = None) -> int:
    """Run the demo; return 0 when the loop went as scripted, 1 when a step failed.

    ``settings`` (from the entry point) only lends its language and time zone. ``pace``
    scales the simulated run times and the pauses between steps (tests use less than 1).
    """
    out = out or sys.stdout
    demo = Demo(out=out, base_dir=base_dir, pace=pace,
                color=use_color(out) if color is None else color,
                language=getattr(settings, "language", "zh"),
                timezone=getattr(settings, "timezone", "Asia/Shanghai"))
    return demo.run()


class Demo:
    def __init__(self, *, out: TextIO, base_dir: Path | None, pace: float, color: bool,
                 language: str, timezone: str) -> None:
        self.out = out
        self.pace = max(0.05, float(pace))
        self.color = color
        self.st = Style(color)
        self.lang = language
        self.timezone = timezone
        self.dir = _demo_dir(base_dir)
        self.transcript = io.StringIO()
        self.started = time.monotonic()
        self.fake: Any = None
        self.sim: Any = None
        self.settings: Any = None
        self.web_url = ""
        self._server: Any = None
        self._server_thread: threading.Thread | None = None
        self._app: Any = None
        self._worker_thread: threading.Thread | None = None
        self._worker_loop: asyncio.AbstractEventLoop | None = None
        self._worker_stop: asyncio.Event | None = None
        self._worker_result: list[Any] = []
        self._seen = 0                             # entries of fake.chat_log printed
        self._cards: dict[str, tuple[str, str]] = {}  # message_id -> (title, template) shown
        self._user_messages: dict[str, str] = {}   # our message ids -> text
        self._n = 0
        self._log_handlers: list[logging.Handler] | None = None
        self._log_level = logging.INFO
        self.batch_id = ""

    # -- the whole run ---------------------------------------------------------------------------

    def run(self) -> int:
        code = 1
        try:
            self._quiet_logs()
            self.start()
            self.play()
            self._check_refusals()
            code = 0
        except StepTimeout as exc:
            self.pump()
            self.say("")
            self.say(self.st(f"opsbot demo: {exc}", "1;31"))
            self.say(f"The log of every component is in {self.dir / 'opsbot.log'}.")
        except Exception as exc:  # noqa: BLE001 - report, clean up, exit non-zero
            log.exception("demo failed")
            self.pump()
            self.say(self.st(f"opsbot demo failed: {type(exc).__name__}: {exc}", "1;31"))
            self.say(f"The log of every component is in {self.dir / 'opsbot.log'}.")
        finally:
            self.stop()
            self._restore_logs()
        if code == 0:
            self.outro()
        with contextlib.suppress(OSError):
            (self.dir / "transcript.txt").write_text(self.transcript.getvalue(), encoding="utf-8")
        return code

    # -- setup -------------------------------------------------------------------------------

    def start(self) -> None:
        from pipeline.standins.simulator import CozeSimulator, Script

        from bot.standins.fake_feishu import FakeFeishu
        from bot.settings import load_settings

        self.say(self.st("opsbot demo", "1") + " — the whole loop on this machine: the real web app"
                 " and worker, a Coze simulator and a stand-in for Feishu, all on 127.0.0.1.")
        self.say(f"Files of this run: {self.dir}")
        self.fake = FakeFeishu(app_id="cli_demo", app_secret=secrets.token_urlsafe(16),
                               users=PEOPLE)
        self.fake.start()
        self.fake.seed_records(APP_TOKEN, TABLE_ID, [
            {"task_id": key, "topic": topic, "style": style, "状态": "待处理"}
            for key, topic, style, _ in ROWS])
        durations = {key: seconds * self.pace for key, _, _, seconds in ROWS}
        self.sim = CozeSimulator(token="pat_demo_" + secrets.token_hex(8), workflow_id=WORKFLOW_ID,
                                 default_duration=lambda key: durations.get(key, 2.0 * self.pace))
        self.sim.script(PLUGIN_TASK, Script(outcome="Fail", duration=durations[PLUGIN_TASK],
                                            error_code="720701002", node="视频生成插件",
                                            error_message="Access plugin server url timed out"))
        self.sim.start_in_thread()
        for i, (key, topic, style, _) in enumerate(ROWS):  # each run ends with a video output
            if key != PLUGIN_TASK:
                self.sim.script(key, Script(output=self._video_output(i, key, topic)))
        env = {
            "FEISHU_APP_ID": self.fake.app_id, "FEISHU_APP_SECRET": self.fake.app_secret,
            "FEISHU_VERIFICATION_TOKEN": "v_" + secrets.token_hex(8),
            "FEISHU_ENCRYPT_KEY": "e_" + secrets.token_hex(8),
            "FEISHU_DOMAIN": self.fake.base_url, "FEISHU_ALERT_CHAT_ID": CHAT,
            "FEISHU_ADMIN_IDS": ADMIN, "BITABLE_APP_TOKEN": APP_TOKEN,
            "BITABLE_TABLE_ID": TABLE_ID, "COZE_API_TOKEN": self.sim.token,
            "COZE_WORKFLOW_ID": WORKFLOW_ID, "COZE_BASE_URL": self.sim.base_url,
            "OPSBOT_DB": str(self.dir / "opsbot.db"), "OPSBOT_TIMEZONE": self.timezone,
            "OPSBOT_LANGUAGE": self.lang,
        }
        poll = round(0.3 * min(1.0, self.pace), 3)
        self.settings = load_settings(env, overrides={
            "pipeline.max_coze": 4, "pipeline.idle_interval": 0.1,
            "pipeline.poll": {"first": poll, "multiplier": 1.0, "maximum": poll},
            "pipeline.output_dir": str(self.dir / "output"),
            "pipeline.synthesis": self._synthesis_settings(),
        })
        from bot.logs import register_settings_secrets
        register_settings_secrets(self.settings)
        self._prepare_store()
        self._start_web()
        self._start_worker()
        self.say(f"Coze simulator {self.sim.base_url} · fake Feishu {self.fake.base_url} · "
                 f"web app {self.web_url} · worker running")
        self.say(f"Bitable table {TABLE_ID}: {len(ROWS)} rows with 状态 = 待处理 "
                 f"({', '.join(r[0] for r in ROWS)})")

    def _video_output(self, i: int, key: str, topic: str) -> dict:
        """A video workflow's output, in the three shapes the adapters read, with its images
        and narration served by the simulator."""
        from pipeline.standins.sim_assets import TEXTS, video_output

        shape = ("arrays", "jianying", "single")[i % 3]
        return video_output(self.sim.base_url, key, shape=shape, scenes=2 + i % 2,
                            seconds=1.2, texts=[f"{topic}。"] + TEXTS[i % 2:])

    def _synthesis_settings(self) -> dict:
        """Small, quick videos (360x640, 15 fps: the demo renders eight while the rest of the
        loop runs) with burned subtitles when a CJK font is installed; without one the videos
        are made without them and the fix is printed."""
        from pipeline.video.errors import VideoError
        from pipeline.video.fonts import find_font

        settings = {"width": 360, "height": 640, "fps": 15, "preset": "ultrafast", "crf": 26}
        try:
            find_font()
        except VideoError as exc:
            self.say(self.st(f"  Subtitles are off for this demo: {exc.message}", "33"))
            settings["subtitles"] = "off"
        return settings

    def _prepare_store(self) -> None:
        """A fresh store, as if yesterday's daily report already went out (else the scheduler
        would send an empty one at once), and lark-oapi imported before the clock matters."""
        from datetime import timedelta

        from storage.db import open_db

        from bot.feishu import client as feishu  # noqa: F401 - imports lark-oapi, which takes a few seconds
        from bot.alerting.report import mark_sent

        db = open_db(self.settings.db_path)
        try:
            yesterday = datetime.now(self.settings.tz).date() - timedelta(days=1)
            mark_sent(db, now=time.time(), day=yesterday)
        finally:
            db.conn.close()

    def _start_web(self) -> None:
        from werkzeug.serving import make_server

        from bot.app import create_app

        self._app = create_app(self.settings)
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.web_url = f"http://127.0.0.1:{self._server.server_port}"
        self._server_thread = threading.Thread(target=self._server.serve_forever,
                                               name="demo-web", daemon=True)
        self._server_thread.start()

    def _start_worker(self) -> None:
        from bot.service import run_worker

        ready = threading.Event()

        async def main() -> int:
            self._worker_loop = asyncio.get_running_loop()
            self._worker_stop = asyncio.Event()
            ready.set()
            return await run_worker(self.settings, stop=self._worker_stop,
                                    tick_interval=0.5)

        def thread() -> None:
            try:
                self._worker_result.append(asyncio.run(main()))
            except BaseException as exc:  # noqa: BLE001 - reported by the steps that wait
                log.exception("demo worker failed")
                self._worker_result.append(exc)
            finally:
                ready.set()

        self._worker_thread = threading.Thread(target=thread, name="demo-worker", daemon=True)
        self._worker_thread.start()
        if not ready.wait(10 * max(1.0, self.pace)):
            raise StepTimeout("the worker did not start within 10 s")

    def stop(self) -> None:
        """Stop everything started, newest first; each part is bounded and independent."""
        if self._worker_thread is not None and self._worker_loop is not None:
            with contextlib.suppress(RuntimeError):
                self._worker_loop.call_soon_threadsafe(self._worker_stop.set)
            self._worker_thread.join(20)
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.shutdown()
                self._server.server_close()
            if self._server_thread is not None:
                self._server_thread.join(10)
        if self.sim is not None:
            with contextlib.suppress(Exception):
                self.sim.stop_thread()
        if self.fake is not None:
            with contextlib.suppress(Exception):
                self.fake.stop()

    def _quiet_logs(self) -> None:
        """Logs go to ``opsbot.log`` in the demo directory, not between the chat lines."""
        from bot.logs import JsonFormatter

        root = logging.getLogger()
        self._log_handlers, self._log_level = list(root.handlers), root.level
        handler = logging.FileHandler(self.dir / "opsbot.log", encoding="utf-8")
        handler.setFormatter(JsonFormatter())
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)
        for noisy in ("Lark", "urllib3", "aiohttp.access", "werkzeug"):
            logging.getLogger(noisy).setLevel(logging.WARNING)

    def _restore_logs(self) -> None:
        if self._log_handlers is None:
            return
        root = logging.getLogger()
        for h in root.handlers:
            with contextlib.suppress(Exception):
                h.close()
        root.handlers[:] = self._log_handlers
        root.setLevel(self._log_level)

    # -- the scripted session ----------------------------------------------------------------

    def play(self) -> None:
        from pipeline.standins.simulator import Script

        self.section("1. Ask for help")
        help_id = self.user_says("help")
        self.wait_for("the help card", lambda: self._reply_to(help_id))

        self.section("2. Run the pending rows of the Bitable table")
        run_id = self.user_says("run")
        queued = self.wait_for("the run command's answer", lambda: self._reply_to(run_id))
        self.batch_id = _find_value(queued["content"], "batch_id") or ""
        if not self.batch_id:
            raise StepTimeout("the run command's answer names no batch: "
                              + json.dumps(queued["content"], ensure_ascii=False)[:300])

        self.section(f"3. {PLUGIN_TASK}'s plugin times out twice: a MEDIUM alert")
        medium = self.wait_for("the MEDIUM alert card", lambda: self._card_titled("[MEDIUM]"))
        self.beat()
        self.narrate(f"(the plugin is back: the simulator now lets {PLUGIN_TASK} succeed)")
        self.sim.script(PLUGIN_TASK, Script(duration=1.5 * self.pace, output=self._video_output(
            [r[0] for r in ROWS].index(PLUGIN_TASK), PLUGIN_TASK,
            next(r[1] for r in ROWS if r[0] == PLUGIN_TASK))))
        self.press(medium, "retry")
        medium_id = medium["message_id"]
        self.wait_for("the MEDIUM alert card turning resolved (green)",
                      lambda: self._patched(medium_id, "green"))
        self.wait_for("the resolved notice", lambda: self._text_containing("✅"))

        self.section("4. The Coze token stops working: a HIGH alert blocks the batch")
        self.beat()
        self._check_unfinished()
        self.narrate("(someone revoked the Coze token: every Coze call now answers 401 / 4100)")
        self.sim.set_token_valid(False)
        high = self.wait_for("the HIGH alert card", lambda: self._card_titled("[HIGH]"))
        self.beat()
        self.narrate("(a new token is in place: Coze accepts calls again; now press Resume)")
        self.sim.set_token_valid(True)
        self.press(high, "resume")
        high_id = high["message_id"]
        self.wait_for("the HIGH alert card turning resolved (green)",
                      lambda: self._patched(high_id, "green"))
        self.wait_for("the batch summary card", lambda: self._reply_to(run_id, nth=2),
                      factor=2)

        self.section("5. Status and the daily report")
        self.beat()
        status_id = self.user_says("status")
        self.wait_for("the status card", lambda: self._reply_to(status_id))
        self.beat()
        today = datetime.now(self.settings.tz).date().isoformat()
        report_id = self.user_says(f"report --date {today}")   # today's: the batch just run
        report = self.wait_for("the report card", lambda: self._reply_to(report_id))
        if '"chart"' not in json.dumps(report["content"]):
            raise StepTimeout("the report card has no chart")
        self._check_report(report["content"])
        self.pump()
        self._check_outcome()

    def _check_report(self, card: Any) -> None:
        """The report card counts this batch's tasks (the demo's store holds no other)."""
        from storage import queue
        from storage.db import open_db

        from bot.alerting.report import _r

        db = open_db(self.settings.db_path, migrate=False)
        try:
            c = queue.batch_counts(db, self.batch_id)
        finally:
            db.conn.close()
        line = _r("runs", self.lang, runs=c["succeeded"] + c["failed"] + c["ignored"],
                  succeeded=c["succeeded"], failed=c["failed"] + c["ignored"],
                  ignored=c["ignored"], cancelled=c["cancelled"])
        if line not in json.dumps(card, ensure_ascii=False):
            raise StepTimeout(f"the report card does not show this batch's numbers ({line})")

    def _check_unfinished(self) -> None:
        """The token must break while tasks are still running, or nothing would be blocked."""
        from storage import queue
        from storage.db import open_db

        db = open_db(self.settings.db_path, migrate=False)
        try:
            counts = queue.batch_counts(db, self.batch_id)
        finally:
            db.conn.close()
        if counts["running"] + counts["queued"] + counts.get("retrying", 0) == 0:
            raise StepTimeout(f"the batch finished before the token could break ({counts}); "
                              "is the machine very busy? try again")

    def _check_refusals(self) -> None:
        """The stand-in applies Feishu's card rules: a card it refused would not have shown."""
        refused = self.fake.take_refusals()
        if refused:
            raise StepTimeout("Feishu would have refused these cards: " + "; ".join(
                f"{r['route']} {r['code']} {r['violations'][0]}" for r in refused))

    def _check_outcome(self) -> None:
        from storage import queue
        from storage.db import open_db

        db = open_db(self.settings.db_path)
        try:
            counts = queue.batch_counts(db, self.batch_id)
            batch = queue.get_batch(db, self.batch_id)
            from pipeline.runner import summary_table, write_results

            self.results = self.dir / "results" / f"{self.batch_id}.json"
            write_results(db, self.batch_id, self.results)
            self.summary = summary_table(db, self.batch_id)
        finally:
            db.conn.close()
        if batch["status"] != "done" or counts["succeeded"] != len(ROWS):
            raise StepTimeout(f"the batch ended {batch['status']} with {counts}, expected all "
                              f"{len(ROWS)} tasks succeeded")
        self.videos = _videos(self.results)
        if len(self.videos) != len(ROWS):
            raise StepTimeout(f"{len(self.videos)} of {len(ROWS)} tasks have a video on disk")

    # -- acting like Feishu ------------------------------------------------------------------

    def user_says(self, command: str) -> str:
        from bot.standins.events import message_event

        self._n += 1
        message_id = f"om_demo_{self._n:04d}_{secrets.token_hex(3)}"
        text = f"@opsbot {command}"
        self._user_messages[message_id] = text
        self.pump()
        self.say("")
        self.say(self.st(f"{PEOPLE[ADMIN]}:", "1;32") + f" {text}")
        event = message_event(command, sender=ADMIN, message_id=message_id, chat_id=CHAT,
                              token=self.settings.feishu.verification_token.get(),
                              event_id=f"ev_demo_{secrets.token_hex(8)}")
        status, answer = self._post("/webhook/event", event)
        if status != 200:
            raise StepTimeout(f"the web app answered {status} {answer} to {text!r}")
        return message_id

    def press(self, message: dict[str, Any], action: str) -> dict[str, Any]:
        """Press the button whose value has ``action`` on the card ``message``."""
        from bot.standins.events import card_action_event

        value, label = _find_button(message["content"], action)
        if value is None:
            raise StepTimeout(f"no {action!r} button on the card: {button_labels(message['content'])}")
        self.pump()
        self.say("")
        self.say(self.st(f"{PEOPLE[ADMIN]}", "1;32") + f" presses [ {label} ] on the card above")
        event = card_action_event(value, operator=ADMIN, message_id=message["message_id"],
                                  token=self.settings.feishu.verification_token.get(),
                                  event_id=f"cev_demo_{secrets.token_hex(8)}")
        status, answer = self._post("/webhook/card", event)
        if status != 200 or not isinstance(answer, dict):
            raise StepTimeout(f"the web app answered {status} {answer} to the {label} press")
        refused = self.fake.check_answer(answer, CHAT)
        if refused:
            raise StepTimeout(f"Feishu would refuse the answer to the {label} press: "
                              + "; ".join(map(str, refused[:3])))
        toast = answer.get("toast")
        self.say("  " + render_toast(toast, color=self.color))
        if isinstance(answer.get("card"), dict) and isinstance(answer["card"].get("data"), dict):
            card = answer["card"]["data"]
            self.show_update(message["message_id"], card, how="(card updated by the button's "
                                                              "answer)")
        if not isinstance(toast, dict) or toast.get("type") != "success":
            raise StepTimeout(f"the {label} press was not accepted: {toast}")
        return answer

    def _post(self, path: str, payload: dict[str, Any]) -> tuple[int, Any]:
        from bot.standins.events import signed_event

        body, headers = signed_event(payload,
                                     encrypt_key=self.settings.feishu.encrypt_key.get())
        req = urllib.request.Request(self.web_url + path, data=body, headers=headers,
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw or b"null")
        except ValueError:
            return status, raw[:200]

    # -- waiting on what the fake Feishu received ---------------------------------------------

    def wait_for(self, what: str, find: Callable[[], Any], *, factor: float = 1.0) -> Any:
        """Print chat traffic until ``find()`` returns something; StepTimeout after
        ``factor * STEP_TIMEOUT`` seconds (longer at a slower pace)."""
        limit = factor * STEP_TIMEOUT * max(1.0, self.pace)
        deadline = time.monotonic() + limit
        while True:
            self.pump()
            found = find()
            if found:
                return found
            if self._worker_result:
                raise StepTimeout(f"the worker stopped ({self._worker_result[0]!r}) while "
                                  f"waiting for {what}")
            if time.monotonic() >= deadline:
                raise StepTimeout(f"step timed out after {limit:.0f} s waiting for {what}")
            time.sleep(0.05)

    def _log(self) -> list[tuple[str, dict[str, Any]]]:
        with self.fake._lock:
            return list(self.fake.chat_log)

    def _reply_to(self, message_id: str, nth: int = 1) -> dict[str, Any] | None:
        replies = [m for kind, m in self._log() if kind == "message"
                   and m.get("reply_to") == message_id]
        return replies[nth - 1] if len(replies) >= nth else None

    def _card_titled(self, prefix: str) -> dict[str, Any] | None:
        for kind, m in self._log():
            if kind == "message" and m.get("msg_type") == "interactive" \
                    and _title(m["content"]).startswith(prefix):
                return m
        return None

    def _patched(self, message_id: str, template: str) -> dict[str, Any] | None:
        for kind, p in self._log():
            if kind == "patch" and p["message_id"] == message_id \
                    and _template(p["content"]) == template:
                return p
        return None

    def _text_containing(self, text: str) -> dict[str, Any] | None:
        for kind, m in self._log():
            if kind == "message" and m.get("msg_type") == "text" \
                    and text in str((m.get("content") or {}).get("text", "")):
                return m
        return None

    # -- printing ----------------------------------------------------------------------------

    def pump(self) -> None:
        """Print what the fake Feishu received since the last call, in arrival order."""
        if self.fake is None:
            return
        entries = self._log()
        for kind, entry in entries[self._seen:]:
            if kind == "message":
                self.show_message(entry)
            else:
                self.show_update(entry["message_id"], entry["content"], how="(card updated)")
        self._seen = len(entries)

    def show_message(self, m: dict[str, Any]) -> None:
        self.say("")
        who = self.st("opsbot", "1;35")
        if m.get("reply_to") in self._user_messages:
            asked = self._user_messages[m["reply_to"]]
            head = f"{who} ↳ replying to {PEOPLE[ADMIN]}'s “{asked}”:"
        elif m.get("reply_to"):
            head = f"{who} ↳ replying to {m['reply_to']}:"
        else:
            head = f"{who} in the group:"
        self.say(f"{self._clock()} {head}")
        self.say(render_message(m.get("msg_type"), m.get("content"), color=self.color,
                                names=PEOPLE, indent="  "))
        if m.get("msg_type") == "interactive":
            self._cards[m["message_id"]] = (_title(m["content"]), _template(m["content"]))

    def show_update(self, message_id: str, card: Any, *, how: str) -> None:
        """A card changed in place: in full when its title or colour changed, else one line."""
        shape = (_title(card), _template(card))
        before = self._cards.get(message_id)
        self._cards[message_id] = shape
        if before == shape:
            first = _first_line(card)
            self.say(f"{self._clock()} {self.st(how, '2')} [{shape[1]}] {shape[0]}"
                     + (f" · {first}" if first else ""))
            return
        self.say("")
        self.say(f"{self._clock()} {self.st(how, '2')}")
        self.say(render_card(card, color=self.color, names=PEOPLE, indent="  "))

    def section(self, title: str) -> None:
        self.pump()
        self.say("")
        self.say(self.st(f"── {title} " + "─" * max(0, 60 - len(title)), "1"))

    def narrate(self, text: str) -> None:
        self.pump()
        self.say(self.st(f"  {text}", "3;2"))

    def beat(self, seconds: float = 2.0) -> None:
        """A short pause so a reader can follow; chat traffic keeps printing meanwhile."""
        deadline = time.monotonic() + seconds * self.pace
        while time.monotonic() < deadline:
            self.pump()
            time.sleep(0.05)

    def _clock(self) -> str:
        return self.st(f"[{time.monotonic() - self.started:5.1f}s]", "2")

    def say(self, text: str) -> None:
        plain = _strip_ansi(text)
        self.transcript.write(plain + "\n")
        try:
            self.out.write(text + "\n")
        except UnicodeEncodeError:
            enc = getattr(self.out, "encoding", None) or "ascii"
            self.out.write(text.encode(enc, "replace").decode(enc) + "\n")
        with contextlib.suppress(Exception):
            self.out.flush()

    def outro(self) -> None:
        took = time.monotonic() - self.started
        rows = self.fake.records(APP_TOKEN, TABLE_ID) if self.fake else {}
        states: dict[str, int] = {}
        for fields in rows.values():
            value = fields.get("状态")
            states[str(value)] = states.get(str(value), 0) + 1
        self.say("")
        self.say(self.st("── Done " + "─" * 55, "1"))
        self.say(f"The whole loop ran in {took:.0f} s: {len(self.fake.messages)} messages and "
                 f"{len(self.fake.patches)} card updates reached the chat; Bitable rows now "
                 + ", ".join(f"{v} × {n}" for v, n in sorted(states.items())) + ".")
        self.say(getattr(self, "summary", ""))
        self.say("")
        self.say(f"  database     {self.settings.db_path}")
        self.say(f"  results      {getattr(self, 'results', '-')}")
        self.say(f"  output files {Path(self.settings.pipeline.output_dir) / self.batch_id}/")
        self.say(f"  log          {self.dir / 'opsbot.log'}")
        for key, video, seconds in getattr(self, "videos", []):
            self.say(f"  video {key:<6} {video} ({seconds:.1f} s)")
        self.say(f"  transcript   {self.dir / 'transcript.txt'}")
        self.say(f"  look around: OPSBOT_DB={self.settings.db_path} opsbot report "
                 f"--date {datetime.now(self.settings.tz).date().isoformat()}")
        self.say("")
        self.say("Try the real thing: create a Feishu app with a bot (scopes im:message, "
                 "im:message:send_as_bot, bitable:app), subscribe im.message.receive_v1 and "
                 "card.action.trigger to https://YOUR-HOST/webhook/event, then set")
        self.say("  FEISHU_APP_ID FEISHU_APP_SECRET FEISHU_VERIFICATION_TOKEN FEISHU_ENCRYPT_KEY "
                 "FEISHU_ALERT_CHAT_ID FEISHU_ADMIN_IDS")
        self.say("  BITABLE_APP_TOKEN BITABLE_TABLE_ID COZE_API_TOKEN COZE_WORKFLOW_ID "
                 "[OPSBOT_DB]")
        self.say("and start both processes (Procfile): gunicorn \"bot.app:create_app()\" and "
                 "opsbot worker. `opsbot doctor` checks the settings.")


# --- helpers ------------------------------------------------------------------------------------

def _demo_dir(base: Path | None) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidates = [base] if base is not None else [Path.cwd() / "var"]
    for root in candidates:
        try:
            path = Path(root) / f"demo-{stamp}"
            n = 1
            while path.exists():
                n += 1
                path = Path(root) / f"demo-{stamp}-{n}"
            path.mkdir(parents=True)
            return path.resolve()
        except OSError:
            continue
    return Path(tempfile.mkdtemp(prefix=f"opsbot-demo-{stamp}-"))


def _videos(results: Path) -> list[tuple[str, str, float]]:
    """(task, MP4 path, seconds) of every task in the results file whose video is on disk."""
    data = json.loads(results.read_text(encoding="utf-8"))
    found = []
    for t in data.get("tasks", []):
        synth = ((t.get("output") or {}).get("synthesis") or {})
        if synth.get("video") and Path(synth["video"]).is_file():
            found.append((t.get("task_id") or t.get("task_key") or "?", synth["video"],
                          float(synth.get("duration") or 0)))
    return found


def _title(card: Any) -> str:
    try:
        return str(card["header"]["title"]["content"])
    except (KeyError, TypeError):
        return ""


def _template(card: Any) -> str:
    try:
        return str(card["header"].get("template") or "")
    except (KeyError, TypeError, AttributeError):
        return ""


def _first_line(card: Any) -> str:
    from bot.ops.render import render_markdown

    try:
        for el in card["body"]["elements"]:
            if el.get("tag") == "markdown":
                lines = [x for x in render_markdown(el["content"]).splitlines() if x.strip()]
                if lines:
                    return lines[0] if len(lines) < 2 else lines[0] + " · " + lines[1]
    except (KeyError, TypeError, AttributeError):
        pass
    return ""


def _walk_buttons(node: Any):
    if isinstance(node, dict):
        if node.get("tag") == "button":
            yield node
            return
        for v in node.values():
            yield from _walk_buttons(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk_buttons(v)


def _button_value(button: dict[str, Any]) -> dict[str, Any] | None:
    for b in button.get("behaviors") or []:
        if isinstance(b, dict) and isinstance(b.get("value"), dict):
            return b["value"]
    value = button.get("value")
    return value if isinstance(value, dict) else None


def _find_button(card: Any, action: str) -> tuple[dict[str, Any] | None, str]:
    for button in _walk_buttons(card):
        value = _button_value(button)
        if value and value.get("action") == action:
            label = ((button.get("text") or {}).get("content")) or action
            return value, label
    return None, action


def _find_value(card: Any, key: str) -> Any:
    for button in _walk_buttons(card):
        value = _button_value(button)
        if value and value.get(key):
            return value[key]
    return None


def _strip_ansi(text: str) -> str:
    import re
    return re.sub(r"\033\[[0-9;]*m", "", text)

"""The local post-processing stage (video synthesis), run off the event loop.

Four ways to configure it (``[pipeline] synthesis_command`` and ``[pipeline.synthesis] mode``):
- ``""`` (default) with ``mode = "auto"``: the built-in video step (:mod:`pipeline.video`):
  the workflow output becomes a timeline, its assets are downloaded, and ffmpeg renders
  ``<output_dir>/<batch>/NAME.mp4`` (``NAME``: :func:`file_name`, distinct per task key). An output with no media (a text-only workflow) gets
  the manifest step instead. ``mode = "video"`` makes such an output an error;
  ``mode = "manifest"`` always writes the manifest.
- the manifest step writes the generated assets (script text, video/image URLs) to
  ``<output_dir>/<batch>/NAME.json``.
- ``"module:function"``: a Python callable ``f(task_key: str, params: dict, coze_output: dict,
  output_dir: str) -> dict``, each job in a process of its own (:mod:`pipeline.isolated`), so
  a job that hangs or crashes is stopped alone.
- anything else: a command line (split like a shell would, never run through a shell) with the
  placeholders ``{input}`` (a JSON file holding task, params and workflow output) and ``{output}``
  (the JSON file the command must write). Exit code 0 and the output file mean success.

At most ``max_synthesis`` jobs run at once, each bounded by ``synthesis_timeout`` (the
built-in step downloads its assets before it waits for a slot: signed URLs expire). Failures
raise :class:`pipeline.errors.SynthesisError` (the video step's carry a failure class as
``code``, see :mod:`pipeline.video.errors`), which the classifier sees like any error.

The first built-in job of a process sweeps ``output_dir`` (:func:`sweep`): ``.rendering-*``
files of renders killed with their process, and ``.work-*`` folders untouched for
``work_max_age`` seconds.
"""
from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import os
import re
import ipaddress
import shlex
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from .clock import Clock
from .config import DEFAULT_RULES, PipelineConfig, RetryPolicy, Rule, SynthesisConfig
from .errors import SynthesisError
from .isolated import IsolatedRunner

_URL = re.compile(r"https?://[^\s\"'<>]+")


def builtin_synthesize(task_key: str, params: dict, coze_output: Any, output_dir: str) -> dict:
    """Collect the workflow's assets into a manifest file; fail on an empty output."""
    if coze_output in (None, "", {}, []):
        raise SynthesisError("empty_output", "workflow returned no output to synthesise")
    text = coze_output if isinstance(coze_output, str) else json.dumps(coze_output,
                                                                         ensure_ascii=False)
    urls = sorted(set(_URL.findall(text)))
    manifest = {
        "task_id": task_key,
        "params": params,
        "assets": urls,
        "output": coze_output,
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
    path = Path(output_dir) / f"{file_name(task_key)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a crash never leaves half a manifest
    return {"manifest": str(path), "assets": len(urls)}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)[:100] or "task"


def file_name(task_key: str) -> str:
    """The file name (no suffix) of a task's outputs: readable, and distinct per task key.

    ``_safe`` alone maps every non-ASCII character to ``_`` (``视频1`` and ``任务1`` are both
    ``__1``) and cuts long keys, so a hash of the whole key is appended."""
    digest = hashlib.sha256(task_key.encode("utf-8")).hexdigest()[:10]
    return f"{_safe(task_key)[:80]}-{digest}"


def load_callable(spec: str) -> Callable[..., dict]:
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise SynthesisError("config", f"cannot load synthesis callable {spec!r}: {exc}") from exc


class Synthesizer:
    """Runs the synthesis step with at most ``workers`` jobs at once."""

    def __init__(self, command: str = "", *, workers: int = 4, output_dir: str | Path = "var/output",
                 timeout: float = 600.0, video: SynthesisConfig | None = None,
                 rules: tuple[Rule, ...] = DEFAULT_RULES, retry: RetryPolicy | None = None,
                 clock: Clock | None = None, coze_base_url: str = "") -> None:
        self.command = command.strip()
        # absolute, so the paths results store do not depend on a process's working folder:
        # with an absolute output_dir on a volume every machine mounts at that path, they are
        # valid on every machine
        self.output_dir = Path(output_dir).absolute()
        self.timeout = timeout
        self.video = video or SynthesisConfig()
        self.rules = rules
        self.retry = retry or RetryPolicy()
        self.clock = clock or Clock()
        self.semaphore = asyncio.Semaphore(workers)
        self._workers = workers
        self._runner: IsolatedRunner | None = None
        self._func: Callable[..., dict] | None = None
        # asset URLs on loopback are fine only when Coze itself is there (the simulator)
        self.allow_loopback = _is_loopback(coze_base_url)
        self._swept = False
        if self.command and re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", self.command):
            self._func = load_callable(self.command)

    @classmethod
    def from_config(cls, config: PipelineConfig, *, clock: Clock | None = None,
                    coze_base_url: str = "") -> "Synthesizer":
        return cls(config.synthesis_command, workers=config.max_synthesis,
                   output_dir=config.output_dir, timeout=config.synthesis_timeout,
                   video=config.synthesis, rules=config.rules, retry=config.retry, clock=clock,
                   coze_base_url=coze_base_url)

    async def run(self, batch_id: str, task_key: str, params: dict, coze_output: Any) -> dict:
        out_dir = str(self.output_dir / _safe(batch_id))
        if not self.command:  # the built-in step takes its slot after the downloads
            if not self._swept:
                self._swept = True
                keep = self.video.keep_work_files
                await asyncio.to_thread(
                    sweep, self.output_dir, float("inf") if keep else self.video.work_max_age,
                    max(self.timeout, self.video.render_timeout) + 60,
                    drafts_dir=Path(self.video.jianying_dir) if self.video.jianying else None)
            return await self._run_builtin(task_key, params, coze_output, out_dir)
        async with self.semaphore:
            if self._func is not None:
                return await self._run_callable(task_key, params, coze_output, out_dir)
            return await self._run_command(task_key, params, coze_output, out_dir)

    async def _run_builtin(self, task_key: str, params: dict, coze_output: Any,
                           out_dir: str) -> dict:
        """The video step: downloads start at once (signed URLs expire), probing and rendering
        wait for one of the ``workers`` slots and are bounded by the timeout. An output without
        media (mode ``auto``) and mode ``manifest`` get the manifest."""
        mode = self.video.mode
        if mode != "manifest":
            from .video.job import make_video  # ffmpeg and fontTools only when videos are made
            try:
                result = await make_video(
                    task_key, file_name(task_key), coze_output, Path(out_dir), cfg=self.video,
                    rules=self.rules, policy=self.retry, clock=self.clock,
                    require=mode == "video", slot=self.semaphore, timeout=self.timeout,
                    allow_loopback=self.allow_loopback)
            except OSError as exc:  # disk full, permissions on output_dir …
                raise SynthesisError("io", f"{type(exc).__name__}: {exc}") from exc
            if result is not None:
                return result
        async with self.semaphore:
            return await asyncio.to_thread(builtin_synthesize, task_key, params, coze_output,
                                           out_dir)

    async def _run_callable(self, task_key: str, params: dict, coze_output: Any,
                            out_dir: str) -> dict:
        if self._runner is None:
            self._runner = IsolatedRunner(self._workers)
        return await self._runner.run(self._func, (task_key, params, coze_output, out_dir),
                                      self.timeout)

    async def _run_command(self, task_key: str, params: dict, coze_output: Any,
                           out_dir: str) -> dict:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="opsbot-synth-") as tmp:
            inp, outp = Path(tmp) / "input.json", Path(out_dir) / f"{file_name(task_key)}.json"
            inp.write_text(json.dumps({"task_id": task_key, "params": params,
                                       "output": coze_output}, ensure_ascii=False), "utf-8")
            argv = [a.replace("{input}", str(inp)).replace("{output}", str(outp))
                    for a in shlex.split(self.command)]
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    start_new_session=True)
            except OSError as exc:
                raise SynthesisError("config", f"cannot start {argv[0]!r}: {exc}") from exc
            try:
                _, err = await asyncio.wait_for(proc.communicate(), self.timeout)
            except asyncio.TimeoutError:
                await _kill(proc)
                raise SynthesisError("timeout", f"synthesis timed out after {self.timeout:.0f}s")
            except asyncio.CancelledError:  # batch cancelled, lease lost, shutdown
                await _kill(proc)
                raise
            if proc.returncode != 0:
                tail = err.decode("utf-8", "replace").strip()[-300:]
                raise SynthesisError("exit", f"exit code {proc.returncode}: {tail}")
            if not outp.exists():
                raise SynthesisError("no_output", f"the command wrote no {outp.name}")
            return {"manifest": str(outp)}

    def discard(self, batch_id: str, task_key: str) -> None:
        """The task failed for good: its downloads and intermediate files go."""
        work = self.output_dir / _safe(batch_id) / f".work-{file_name(task_key)}"
        if not self.video.keep_work_files:
            shutil.rmtree(work, ignore_errors=True)

    def close(self) -> None:
        """Stop running callable jobs without waiting (their tasks are handed back)."""
        if self._runner is not None:
            self._runner.close()
            self._runner = None


def sweep(output_dir: Path, max_age: float, render_age: float,
          now: float | None = None, drafts_dir: Path | None = None) -> list[Path]:
    """Remove what an earlier process left in ``output_dir/<batch>/``: ``.rendering-*`` files
    older than ``render_age`` seconds (a render killed with its process) and ``.work-*``
    folders untouched for ``max_age`` seconds (a task that failed for good, or was never
    retried); in ``drafts_dir``, JianYing drafts half-built (``.NAME.building-PID``) or left
    half-swapped (``.NAME.old-PID``) older than ``render_age``. Younger ones may belong to a
    live job (another worker process) and stay."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    if drafts_dir is not None and drafts_dir.is_dir():
        for entry in drafts_dir.iterdir():
            if entry.name.startswith(".") and re.search(r"\.(building|old)-\d+$", entry.name) \
                    and entry.is_dir():
                try:
                    if now - entry.stat().st_mtime > render_age:
                        shutil.rmtree(entry)
                        removed.append(entry)
                except OSError:
                    continue
    if not output_dir.is_dir():
        return removed
    for batch in output_dir.iterdir():
        if not batch.is_dir() or batch.name.startswith("."):
            continue
        for entry in batch.iterdir():
            try:
                age = now - entry.stat().st_mtime
                if ".rendering-" in entry.name and entry.name.startswith(".") \
                        and entry.is_file() and age > render_age:
                    entry.unlink()
                elif entry.name.startswith(".work-") and entry.is_dir() and age > max_age \
                        and _newest(entry) < now - max_age:
                    shutil.rmtree(entry)
                else:
                    continue
            except OSError:
                continue  # gone meanwhile, or not ours to remove
            removed.append(entry)
    return removed


def _newest(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.rglob("*")), default=0.0)


def _is_loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "") if url else ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill the command and everything it started (its own session), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    await proc.wait()

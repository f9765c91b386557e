"""The local post-processing stage (video synthesis), run off the event loop.

Four ways to configure it (``[pipeline] synthesis_command`` and ``[pipeline.synthesis] mode``):
- ``""`` (default) with ``mode = "auto"``: the built-in video step (:mod:`pipeline.video`):
  the workflow output becomes a timeline, its assets are downloaded, and ffmpeg renders
  ``<output_dir>/<batch>/<task>.mp4``. An output with no media (a text-only workflow) gets
  the manifest step instead. ``mode = "video"`` makes such an output an error;
  ``mode = "manifest"`` always writes the manifest.
- the manifest step writes the generated assets (script text, video/image URLs) to
  ``<output_dir>/<batch>/<task>.json``.
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
"""
from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import os
import re
import shlex
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable

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
    path = Path(output_dir) / f"{_safe(task_key)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a crash never leaves half a manifest
    return {"manifest": str(path), "assets": len(urls)}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)[:100] or "task"


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
                 clock: Clock | None = None) -> None:
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
        if self.command and re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", self.command):
            self._func = load_callable(self.command)

    @classmethod
    def from_config(cls, config: PipelineConfig, *, clock: Clock | None = None) -> "Synthesizer":
        return cls(config.synthesis_command, workers=config.max_synthesis,
                   output_dir=config.output_dir, timeout=config.synthesis_timeout,
                   video=config.synthesis, rules=config.rules, retry=config.retry, clock=clock)

    async def run(self, batch_id: str, task_key: str, params: dict, coze_output: Any) -> dict:
        out_dir = str(self.output_dir / _safe(batch_id))
        if not self.command:  # the built-in step takes its slot after the downloads
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
                    task_key, _safe(task_key), coze_output, Path(out_dir), cfg=self.video,
                    rules=self.rules, policy=self.retry, clock=self.clock,
                    require=mode == "video", slot=self.semaphore, timeout=self.timeout)
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
            inp, outp = Path(tmp) / "input.json", Path(out_dir) / f"{_safe(task_key)}.json"
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

    def close(self) -> None:
        """Stop running callable jobs without waiting (their tasks are handed back)."""
        if self._runner is not None:
            self._runner.close()
            self._runner = None


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill the command and everything it started (its own session), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    await proc.wait()

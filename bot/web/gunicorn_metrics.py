"""gunicorn server hooks that make ``/metrics`` add up across web workers.

``prometheus_client`` runs in multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set before
it is first imported: each web worker then writes its counters and histograms to its own files
there, and a scrape (any worker) sums them all (:func:`bot.metrics.process_families`).

* :func:`configure` runs when gunicorn loads its config, in the master, before any worker is
  forked: it picks the directory (``PROMETHEUS_MULTIPROC_DIR``, or a fresh temporary directory
  when unset) and puts it in the environment the workers inherit.
* :func:`on_starting` empties it of the sample files a previous run left (its numbers belong to
  processes that no longer exist and would be added to this run's), once per master start: a
  reload (``HUP``) keeps them, so counters do not drop while old workers hand over to new ones.
* :func:`child_exit` marks a dead worker: its live-gauge files go; its counters and histogram
  samples stay and keep counting in the sums, so a restarted worker never makes a counter fall.
* :func:`on_exit` removes a temporary directory this module created.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import MutableMapping

ENV = "PROMETHEUS_MULTIPROC_DIR"
_created: list[str] = []   # a temporary directory made by configure(), removed on exit


def configure(environ: MutableMapping[str, str]) -> str:
    """The multiprocess directory (created if missing), exported in ``environ``."""
    path = environ.get(ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="opsbot-metrics-")
        _created.append(path)
        environ[ENV] = path
    os.makedirs(path, exist_ok=True)
    return path


def clean(path: str) -> int:
    """Remove the sample files (``*.db``) in ``path``; returns how many. Nothing else there is
    touched, so a directory shared with other files is safe."""
    removed = 0
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))
            removed += 1
    return removed


def on_starting(server) -> None:  # noqa: ANN001 - gunicorn's Arbiter
    path = os.environ[ENV]
    removed = clean(path)
    server.log.info("metrics directory %s ready (%d stale sample files removed)", path, removed)


def child_exit(server, worker) -> None:  # noqa: ANN001 - gunicorn's Arbiter and Worker
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, os.environ[ENV])


def on_exit(server) -> None:  # noqa: ANN001
    while _created:
        shutil.rmtree(_created.pop(), ignore_errors=True)

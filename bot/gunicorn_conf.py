"""gunicorn settings of the web process (the Procfile passes ``-c python:bot.gunicorn_conf``).

Metrics that add up across web workers: see :mod:`bot.gunicorn_metrics` (its hooks are this
config's ``on_starting``, ``child_exit`` and ``on_exit``).
"""
from __future__ import annotations

import os

from bot import gunicorn_metrics
from bot.gunicorn_metrics import child_exit, on_exit, on_starting  # noqa: F401 - gunicorn hooks

# before any worker is forked, so every worker imports prometheus_client in multiprocess mode
gunicorn_metrics.configure(os.environ)

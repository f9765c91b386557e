"""The load benchmark's baseline: the minimal Flask webhook lark-oapi's docs describe.

``lark.EventDispatcherHandler`` with the encrypt key and verification token (it decrypts, checks
the signature and the token) and an ``im.message.receive_v1`` handler that does nothing: no
dedup, no recording, no reply. Served by gunicorn like the real app::

    BASELINE_ENCRYPT_KEY=... BASELINE_VERIFICATION_TOKEN=... \\
        gunicorn "tests.bench.baseline_app:create_app()"
"""
from __future__ import annotations

import os

import lark_oapi as lark
from flask import Flask
from lark_oapi.adapter.flask import parse_req, parse_resp


def create_app() -> Flask:
    handler = (lark.EventDispatcherHandler.builder(os.environ["BASELINE_ENCRYPT_KEY"],
                                                   os.environ["BASELINE_VERIFICATION_TOKEN"],
                                                   lark.LogLevel.ERROR)
               .register_p2_im_message_receive_v1(lambda data: None)
               .build())
    app = Flask("baseline")

    @app.post("/webhook/event")
    def event():
        return parse_resp(handler.do(parse_req()))

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    return app

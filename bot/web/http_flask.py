"""The Flask adapter: a Flask request -> :class:`bot.web.intake.Request`, a Response -> Flask.

Nothing else in ``bot`` imports Flask. Oversized bodies are refused by Content-Length before a
byte is read; a body without a length (chunked) is read up to the limit plus one byte.
"""
from __future__ import annotations

from typing import Callable

from flask import Flask, Response as FlaskResponse, jsonify, request

from bot.web.intake import Outcome, Request, Response


def read_body(limit: int) -> bytes | None:
    """The request body, or None when it is over ``limit`` bytes (nothing more is read)."""
    length = request.content_length
    if length is not None and length > limit:
        return None
    body = request.stream.read(limit + 1)
    return None if len(body) > limit else body


def to_request(body: bytes) -> Request:
    return Request(body=body, headers=dict(request.headers.items()), path=request.path)


def to_flask(response: Response) -> FlaskResponse:
    out = jsonify(response.json)
    out.status_code = response.status
    return out


def too_large(limit: int) -> FlaskResponse:
    return to_flask(Response(413, {"error": "too_large", "message": f"body over {limit} bytes"}))


def webhook_view(handle: Callable[[Request], Outcome], limit: int,
                 on_recorded: Callable[[str], None]) -> Callable[[], FlaskResponse]:
    """A view that feeds the raw request to ``handle`` and reports new inbox keys."""
    def view() -> FlaskResponse:
        body = read_body(limit)
        if body is None:
            return too_large(limit)
        outcome = handle(to_request(body))
        if outcome.recorded:
            on_recorded(outcome.recorded)
        return to_flask(outcome.response)
    return view


def json_errors(app: Flask) -> None:
    """Protocol errors (404, 405, 413) answer JSON like every other response."""
    from werkzeug.exceptions import HTTPException

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):  # type: ignore[no-untyped-def]
        return to_flask(Response(exc.code or 400, {"error": exc.name.lower().replace(" ", "_"),
                                                   "message": exc.description or exc.name}))

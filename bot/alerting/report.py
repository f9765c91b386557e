"""The daily report: numbers from the ``tasks`` and ``attempts`` tables, and its card.

:func:`compute_report` is deterministic for a given store, day and time zone. Definitions (a day
is ``[00:00, 24:00)`` local time in ``tz``):

- ``runs``: tasks whose ``finished_at`` falls in the day with status succeeded, failed or
  ignored (ignored tasks failed first); cancelled tasks are counted apart (``cancelled``).
- ``success_rate``: succeeded / runs (None when there were no runs).
- ``latency[stage]``: over successful attempts (``outcome = 'success'``) that ended in the day,
  seconds ``ended_at - started_at``: ``count``, ``avg``, ``p95`` (nearest rank: the value at
  position ``ceil(0.95 * n)`` of the sorted list). A stage with no such attempts falls back to
  the ``tasks.<stage>_seconds`` column of tasks finished that day.
- ``retries``: attempts that started in the day with outcome ``retry`` or ``resubmit``.
- ``failures``: attempts that started in the day with any outcome but ``success``.
- ``top_nodes``: those failures grouped by ``attempts.node`` (else ``error_class``, else
  ``unknown``), the 3 largest (ties by name).
- ``errors``: the same failures grouped by ``error_class``, largest first.
- ``hourly``: succeeded / failed tasks per local hour of ``finished_at`` (24 rows).
- ``stage_share``: each stage's share of the time spent in attempts that ended in the day (every
  outcome counts: a failed try cost time too), ``{stage: {"seconds", "share"}}`` largest first;
  stages are ``coze``, ``gate`` (the quality gate) and ``synthesis``, and any other recorded.
- ``quality``: attempts of the quality gate that started in the day: ``resubmits`` (LOW, a new
  run was submitted) and ``failed`` (the task failed, MEDIUM).
- ``trend``: today minus the day before for runs, success_rate, retries, failures and each
  stage's avg / p95 (None where either side has no value).
"""
from __future__ import annotations

import math
from datetime import date, datetime, time, timedelta, tzinfo
from typing import Any, Callable

import sqlite_utils

from storage import kv, reports

from bot.alerting import cards as alert_cards
from bot.chat import i18n
from bot.chat.cards import Card, card, hr, markdown
from bot.chat.commands import MAX_DATE, MIN_DATE
from bot.chat.mdtext import escape

STAGES = ("coze", "synthesis")
FAILED_LIKE = ("failed", "ignored")

_R: dict[str, dict[str, str]] = {
    "title": {"zh": "日报 {date}", "en": "Daily report {date}"},
    "runs": {"zh": "**运行** {runs} 个任务：成功 {succeeded}，失败 {failed}（含忽略 {ignored}），取消 {cancelled}",
             "en": "**Runs** {runs}: {succeeded} succeeded, {failed} failed ({ignored} ignored), "
                   "{cancelled} cancelled"},
    "rate": {"zh": "**成功率** {rate}", "en": "**Success rate** {rate}"},
    "latency": {"zh": "**{stage}** 平均 {avg}，P95 {p95}（{count} 次）",
                "en": "**{stage}** avg {avg}, p95 {p95} ({count} runs)"},
    "retries": {"zh": "**重试** {retries} 次；失败尝试 {failures} 次",
                "en": "**Retries** {retries}; failed attempts {failures}"},
    "top": {"zh": "**失败最多的节点**", "en": "**Top failing nodes**"},
    "errors": {"zh": "**错误分布**", "en": "**Errors by class**"},
    "trend": {"zh": "**对比前一天**：运行 {runs}，成功率 {rate}，重试 {retries}，失败尝试 {failures}",
              "en": "**Vs the day before**: runs {runs}, success rate {rate}, retries {retries}, "
                    "failed attempts {failures}"},
    "share": {"zh": "**各阶段耗时占比**：{shares}", "en": "**Time by stage**: {shares}"},
    "quality": {"zh": "**质量检查**：不合格重新提交 {resubmits} 次，最终失败 {failed} 个",
                "en": "**Quality gate**: {resubmits} run(s) resubmitted, {failed} failed"},
    "none": {"zh": "无", "en": "none"},
    "pipelines": {"zh": "**流水线**：{names}", "en": "**Pipelines**: {names}"},
    "chart_ok": {"zh": "成功", "en": "succeeded"},
    "chart_fail": {"zh": "失败", "en": "failed"},
}


i18n.register("report", _R)


def _r(key: str, lang: str, **kw: Any) -> str:
    return i18n.t("report." + key, lang, **kw)


def day_bounds(day: date, tz: tzinfo) -> tuple[float, float]:
    """[start, end) of ``day`` in ``tz`` as Unix seconds (23 or 25 hours on DST days)."""
    start = datetime.combine(day, time(0), tzinfo=tz)
    end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=tz)
    return start.timestamp(), end.timestamp()


def p95(values: list[float]) -> float | None:
    """Nearest-rank 95th percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def _day_numbers(db: sqlite_utils.Database, day: date, tz: tzinfo,
                 pipelines: Any = None) -> dict[str, Any]:
    start, end = day_bounds(day, tz)
    only = {"pipelines": pipelines}
    status = {s: 0 for s in ("succeeded", "failed", "ignored", "cancelled")}
    hourly = [{"hour": h, "succeeded": 0, "failed": 0} for h in range(24)]
    for st, finished in reports.finished_tasks(db, start, end, **only):
        status[st] += 1
        if st != "cancelled":
            hour = datetime.fromtimestamp(finished, tz).hour
            hourly[hour]["succeeded" if st == "succeeded" else "failed"] += 1
    runs = status["succeeded"] + status["failed"] + status["ignored"]
    latency = {stage: _latency(db, stage, start, end, pipelines) for stage in STAGES}
    failures = reports.failed_attempts(db, start, end, **only)
    retries = reports.retry_count(db, start, end, **only)
    return {
        "date": day.isoformat(), "runs": runs, "succeeded": status["succeeded"],
        "failed": status["failed"] + status["ignored"], "ignored": status["ignored"],
        "cancelled": status["cancelled"],
        "success_rate": status["succeeded"] / runs if runs else None,
        "latency": latency, "retries": retries, "failures": len(failures),
        "top_nodes": _ranked([n for n, _ in failures])[:3],
        "errors": _ranked([c for _, c in failures]), "hourly": hourly,
        "stage_share": _stage_share(db, start, end, pipelines),
        "quality": _quality(db, start, end, pipelines),
    }


def _stage_share(db: sqlite_utils.Database, start: float, end: float,
                 pipelines: Any = None) -> dict[str, Any]:
    rows = reports.seconds_by_stage(db, start, end, pipelines=pipelines)
    total = sum(r[1] or 0.0 for r in rows)
    shares = {r[0]: {"seconds": float(r[1] or 0.0),
                     "share": (r[1] or 0.0) / total if total > 0 else None} for r in rows}
    return dict(sorted(shares.items(), key=lambda kv: (-kv[1]["seconds"], kv[0])))


def _quality(db: sqlite_utils.Database, start: float, end: float,
             pipelines: Any = None) -> dict[str, int]:
    resubmits, failed = reports.gate_counts(db, start, end, pipelines=pipelines)
    return {"resubmits": resubmits, "failed": failed}


def _latency(db: sqlite_utils.Database, stage: str, start: float, end: float,
             pipelines: Any = None) -> dict[str, Any]:
    values = reports.success_durations(db, stage, start, end, pipelines=pipelines)
    if not values:
        values = reports.task_stage_seconds(db, stage, start, end, pipelines=pipelines)
    values = [max(0.0, float(v)) for v in values]
    return {"count": len(values), "avg": sum(values) / len(values) if values else None,
            "p95": p95(values)}


def _ranked(names: list[str]) -> list[dict[str, Any]]:
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return [{"name": k, "count": v} for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def compute_report(db: sqlite_utils.Database, day: date, tz: tzinfo,
                   pipelines: Any = None) -> dict[str, Any]:
    """The report for ``day`` (see the module docstring for every definition); with
    ``pipelines`` (names), of those pipelines' batches only, and it says which."""
    today = _day_numbers(db, day, tz, pipelines)
    before = _day_numbers(db, day - timedelta(days=1), tz, pipelines)
    if pipelines is not None:
        today["pipelines"] = list(pipelines)
    today["previous"] = {k: before[k] for k in ("date", "runs", "success_rate", "retries",
                                                 "failures", "latency")}
    today["trend"] = {
        "runs": today["runs"] - before["runs"],
        "success_rate": _delta(today["success_rate"], before["success_rate"]),
        "retries": today["retries"] - before["retries"],
        "failures": today["failures"] - before["failures"],
        "latency": {s: {m: _delta(today["latency"][s][m], before["latency"][s][m])
                        for m in ("avg", "p95")} for s in STAGES},
    }
    return today


# --- rendering --------------------------------------------------------------------------------

def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}s"


def _signed(v: float | None, fmt: str = "{:+d}") -> str:
    if v is None:
        return "-"
    return fmt.format(v)


def report_lines(report: dict[str, Any], lang: str,
                 shown: Callable[[str], str] = escape) -> list[str]:
    """The report as markdown lines (the card's text and, stripped, the CLI's). Node names and
    error classes come from Coze and the store: ``shown`` neutralises them for card markdown
    (the terminal passes them through).

    Blocks are separated by an empty line, as CommonMark needs: the figures are one list, each
    bold heading its own paragraph, then its list; without the empty lines a heading after a
    list is read as part of the list's last item.
    """
    figures = [_r("runs", lang, **{k: report[k] for k in ("runs", "succeeded", "failed",
                                                         "ignored", "cancelled")}),
               _r("rate", lang, rate=_pct(report["success_rate"]))]
    for stage in STAGES:
        lat = report["latency"][stage]
        figures.append(_r("latency", lang, stage=stage, avg=_secs(lat["avg"]),
                          p95=_secs(lat["p95"]), count=lat["count"]))
    shares = report.get("stage_share") or {}
    if shares:
        figures.append(_r("share", lang, shares=" · ".join(
            f"{shown(stage)} {_pct(v['share'])}" for stage, v in shares.items())))
    figures.append(_r("retries", lang, retries=report["retries"], failures=report["failures"]))
    quality = report.get("quality") or {}
    if quality.get("resubmits") or quality.get("failed"):
        figures.append(_r("quality", lang, **quality))
    top = [f"{i}. {shown(alert_cards.cut(n['name'], 80))} × {n['count']}"
           for i, n in enumerate(report["top_nodes"], 1)] or ["- " + _r("none", lang)]
    errs = report["errors"]
    errors = [f"- {shown(alert_cards.cut(e['name'], 80))}: {e['count']}" for e in errs[:10]] \
        or ["- " + _r("none", lang)]
    if len(errs) > 10:
        errors.append("- " + alert_cards.tr("f.more_rows", lang, n=len(errs) - 10))
    tr_ = report["trend"]
    trend = _r("trend", lang, runs=_signed(tr_["runs"]),
               rate=_signed(None if tr_["success_rate"] is None
                            else tr_["success_rate"] * 100, "{:+.1f}pp"),
               retries=_signed(tr_["retries"]), failures=_signed(tr_["failures"]))
    head = [_r("pipelines", lang, names=shown(", ".join(report["pipelines"]))), ""] \
        if report.get("pipelines") else []
    return (head + ["- " + f for f in figures] + ["", _r("top", lang), ""] + top
            + ["", _r("errors", lang), ""] + errors + ["", trend])


def report_card(report: dict[str, Any], lang: str = "zh") -> Card:
    """The report card: text, then a VChart bar chart of successes / failures per hour."""
    ok, fail = _r("chart_ok", lang), _r("chart_fail", lang)
    values = [{"hour": f"{h['hour']:02d}", "status": ok, "count": h["succeeded"]}
              for h in report["hourly"]] + \
             [{"hour": f"{h['hour']:02d}", "status": fail, "count": h["failed"]}
              for h in report["hourly"]]
    chart = {"tag": "chart", "aspect_ratio": "16:9", "chart_spec": {
        "type": "bar", "data": {"values": values}, "xField": "hour", "yField": "count",
        "seriesField": "status", "stack": True, "legends": {"visible": True}}}
    els = [markdown("\n".join(report_lines(report, lang))), hr(), chart]
    if report["errors"]:
        els.append({"tag": "chart", "aspect_ratio": "16:9", "chart_spec": {
            "type": "bar", "data": {"values": [{"error_class": e["name"], "count": e["count"]}
                                               for e in report["errors"][:10]]},
            "xField": "error_class", "yField": "count"}})
    failed = report["success_rate"] is not None and report["success_rate"] < 0.9
    return card(_r("title", lang, date=report["date"]), els,
                template="orange" if failed else "blue")


def report_text(report: dict[str, Any], lang: str = "zh") -> str:
    """A plain-text version for the terminal."""
    title = _r("title", lang, date=report["date"])
    body = "\n".join(line.replace("**", "") for line in report_lines(report, lang, str))
    return f"{title}\n{'=' * len(title)}\n{body}\n"


def build_report_card(db: sqlite_utils.Database, settings, day: date, lang: str,
                      pipelines: Any = None) -> Card:
    """What the chat's ``report`` command shows (``bot.chat.handlers.cmd_report`` imports this);
    ``pipelines``: of those pipelines only."""
    return report_card(compute_report(db, day, settings.tz, pipelines), lang)


def report_groups(settings) -> list[tuple[str, tuple[str, ...] | None]]:
    """Where the 09:00 report goes: ``[(chat, pipelines)]``, one card per alert chat covering
    the pipelines that report there (None: every batch, with one pipeline). Pipelines without
    a chat get no report."""
    if not getattr(settings, "many_pipelines", False):
        return [(settings.feishu.alert_chat_id, None)]
    groups: dict[str, list[str]] = {}
    for spec in settings.pipelines:
        if spec.alert_chat_id:
            groups.setdefault(spec.alert_chat_id, []).append(spec.name)
    return [(chat, tuple(names)) for chat, names in groups.items()]


def mark_sent(db: sqlite_utils.Database, *, now: float, day: date | None = None) -> None:
    """Remember that a report went out (``report:last_sent_at``; the day for the scheduler)."""
    items = {"report:last_sent_at": str(now)}
    if day is not None:
        items["report:last_sent"] = day.isoformat()
    kv.put_many(db, items, now=now)


def parse_day(text: str | None, settings, now: float) -> date:
    """The report day asked for (``opsbot report --date``, the ``report`` command), or yesterday
    in the settings' time zone. ValueError when malformed."""
    if text is None:
        return datetime.fromtimestamp(now, settings.tz).date() - timedelta(days=1)
    try:
        day = date.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--date must look like YYYY-MM-DD (e.g. 2025-06-01), got {text!r}") \
            from None
    if not MIN_DATE <= day <= MAX_DATE:  # the report also reads the day before
        raise ValueError(f"--date must be between {MIN_DATE} and {MAX_DATE}, got {text!r}")
    return day

"""Alert, batch-progress and batch-summary cards: pure builders of Feishu Card JSON 2.0.

Every builder takes plain data (an alert row with its ``details`` parsed, a batch row and its
counts) and returns a card; nothing here reads the store or the clock. Cards are shared
(``config.update_multi: true``) so the alert router can patch them in place, carry button values
as objects (``{"action": ..., ids}``), and stay under Feishu's 30 KB even for the largest batch:
lists are cut to :data:`LIST_LIMIT` rows plus an "and N more" line, long text is cut, and
``bot.chat.cards.card`` drops elements as a last resort.

Header colours by tier: LOW grey, MEDIUM orange, HIGH red, CRITICAL carmine; resolved green,
ignored grey. Text is Chinese by default and English with ``lang="en"`` (own small catalog
below, registered into ``bot.chat.i18n``).

Text from Bitable, Coze or people (task keys, error messages, reasons, notes) is stored as it
came and escaped here, when the card is built (:mod:`bot.chat.mdtext`): cut first, then escaped, so
no cut splits an entity. Only the on-call people (``details["mentions"]``) and the people who
pressed a button are @-mentioned; notes the bot writes itself mention nobody. An alert that
wanted to mention someone but has nobody configured says so on the card.
"""
from __future__ import annotations

from datetime import datetime, tzinfo
from typing import Any, Iterable

import re

from bot.chat.cards import Card, button, card, hr, markdown, mention
from bot.chat import i18n
from bot.chat.i18n import status_word
from bot.chat.mdtext import clip, code, escape

TIER_TEMPLATES = {"LOW": "grey", "MEDIUM": "orange", "HIGH": "red", "CRITICAL": "carmine"}
STATUS_TEMPLATES = {"resolved": "green", "ignored": "grey"}
LIST_LIMIT = 20          # rows of a task list shown on a card
MESSAGE_LIMIT = 300      # characters of an error message shown on a card
SILENCE_BUTTON_SECONDS = 3600

_T: dict[str, dict[str, str]] = {
    # titles
    "title.task_failed": {"zh": "任务失败：{error_class}", "en": "Task failed: {error_class}"},
    "title.blocked": {"zh": "批次已阻塞：{error_class}", "en": "Batch blocked: {error_class}"},
    "title.breaker": {"zh": "熔断器打开：{service}", "en": "Circuit breaker open: {service}"},
    "title.failure_rate": {"zh": "失败率过高：{rate}", "en": "Failure rate too high: {rate}"},
    "title.latency": {"zh": "任务运行过久", "en": "Tasks running too long"},
    "title.fallback": {"zh": "已切换到备用工作流", "en": "Switched to the fallback workflow"},
    "title.canary": {"zh": "巡检任务失败：流程不通", "en": "Canary failed: the flow is broken"},
    "f.workflows": {"zh": "主工作流 {primary} → 备用 {fallback}",
                    "en": "primary {primary} -> fallback {fallback}"},
    "title.progress": {"zh": "批次进度 {batch_id}", "en": "Batch progress {batch_id}"},
    "title.summary": {"zh": "批次完成 {batch_id}", "en": "Batch finished {batch_id}"},
    "title.summary_failed": {"zh": "批次完成（部分失败）{batch_id}",
                             "en": "Batch finished with failures {batch_id}"},
    # alert fields
    "f.stage": {"zh": "**阶段**：{v}", "en": "**Stage**: {v}"},
    "f.reason": {"zh": "**原因**：{v}", "en": "**Reason**: {v}"},
    "f.task": {"zh": "**任务**：{task}（#{id}）", "en": "**Task**: {task} (#{id})"},
    "f.batch": {"zh": "**批次**：{v}", "en": "**Batch**: {v}"},
    "f.pipeline": {"zh": "**流水线**：{v}", "en": "**Pipeline**: {v}"},
    "f.attempts": {"zh": "**尝试次数**：{v}", "en": "**Attempts**: {v}"},
    "f.time": {"zh": "**时间**：{v}", "en": "**Time**: {v}"},
    "f.debug_label": {"zh": "查看运行详情", "en": "Open the run"},
    "f.count": {"zh": "**× {count}**，最近一次 {last}", "en": "**× {count}**, last at {last}"},
    "f.tasks": {"zh": "**涉及任务**：{v}", "en": "**Tasks**: {v}"},
    "f.more": {"zh": "等另外 {n} 个", "en": "and {n} more"},
    "f.more_rows": {"zh": "… 另外 {n} 项", "en": "… and {n} more"},
    "f.blocked_what": {"zh": "**受阻**：{v}", "en": "**Blocked**: {v}"},
    "f.since": {"zh": "**开始于**：{v}", "en": "**Since**: {v}"},
    "f.nothing_blocked": {"zh": "暂无进行中的批次", "en": "no open batch"},
    "f.nobody": {"zh": "⚠️ 没有配置要提醒的人：请设置 FEISHU_ONCALL_IDS 或 FEISHU_ADMIN_IDS"
                       "（群主允许时也可设置 OPSBOT_MENTION_ALL=1 提醒所有人）。",
                 "en": "⚠️ Nobody is configured to be mentioned: set FEISHU_ONCALL_IDS or "
                       "FEISHU_ADMIN_IDS (or OPSBOT_MENTION_ALL=1 if the group owner allows "
                       "mentioning everyone)."},
    "f.held": {"zh": "**同一原因的其他告警**：{n} 条已并入此卡片（{kinds}）",
               "en": "**Held by this card**: {n} alert(s) of the same cause ({kinds})"},
    "f.held_kind": {"zh": "{key} × {count}", "en": "{key} × {count}"},
    "s.released": {"zh": "此告警已恢复；并入的 {n} 条告警仍未解决，已各自单独发出。",
                   "en": "This alert resolved; the {n} alert(s) it held are still open and "
                         "were sent on their own."},
    "s.by_bot": {"zh": "opsbot", "en": "opsbot"},
    "f.rate": {"zh": "最近 {window} 内结束 {n} 个任务，失败 {failed} 个（{rate}），阈值 {threshold}",
               "en": "{failed} of {n} tasks finished in the last {window} failed ({rate}); "
                     "threshold {threshold}"},
    "f.latency": {"zh": "{n} 个任务运行超过 {threshold}（最长 {longest}）",
                  "en": "{n} task(s) running longer than {threshold} (longest {longest})"},
    "f.blocked_batch": {"zh": "批次 {batch_id} 已暂停派发，等待人工处理后点「恢复」。",
                        "en": "Batch {batch_id} stopped dispatching; fix the cause, then press "
                              "Resume."},
    "s.silenced": {"zh": "🔕 已静默至 {until}，期间 {n} 次未通知",
                   "en": "🔕 Silenced until {until}; {n} occurrence(s) not announced"},
    "s.resolved": {"zh": "✅ 已恢复（{at}）", "en": "✅ Resolved at {at}"},
    "s.ignored": {"zh": "已忽略", "en": "Ignored"},
    "s.action": {"zh": "{at} {who} {what}", "en": "{at} {who} {what}"},
    "resolved.notice": {"zh": "✅ 已恢复：{title}（共 {count} 次，持续 {duration}）",
                        "en": "✅ Resolved: {title} ({count} occurrence(s), lasted {duration})"},
    # buttons
    "b.retry": {"zh": "重试", "en": "Retry"},
    "b.ignore": {"zh": "忽略", "en": "Ignore"},
    "b.silence": {"zh": "静默 1 小时", "en": "Silence 1h"},
    "b.resume": {"zh": "恢复", "en": "Resume"},
    "b.cancel": {"zh": "取消批次", "en": "Cancel batch"},
    "b.retry_failed": {"zh": "重试全部失败任务", "en": "Retry all failed"},
    # progress / summary
    "p.counts": {"zh": "**{done}/{total}** 已结束：成功 {succeeded}，失败 {failed}，重试中 {retrying}，"
                       "运行中 {running}，排队 {queued}",
                 "en": "**{done}/{total}** finished: {succeeded} succeeded, {failed} failed, "
                       "{retrying} retrying, {running} running, {queued} queued"},
    "p.rate": {"zh": "速度 {rate}/分钟，预计剩余 {eta}", "en": "{rate}/min, ETA {eta}"},
    "p.status": {"zh": "状态：**{status}**", "en": "Status: **{status}**"},
    "p.failures": {"zh": "**失败原因**", "en": "**Failures by reason**"},
    "p.failure_row": {"zh": "- {error_class}：{count}", "en": "- {error_class}: {count}"},
    "sum.counts": {"zh": "共 {total} 个任务：成功 **{succeeded}**，失败 **{failed}**，取消 {cancelled}，"
                         "忽略 {ignored}；用时 {duration}",
                   "en": "{total} tasks: **{succeeded}** succeeded, **{failed}** failed, "
                         "{cancelled} cancelled, {ignored} ignored; took {duration}"},
    "sum.partial": {"zh": "成功的 {n} 个任务结果已交付；以下任务失败：",
                    "en": "The {n} successful results are delivered; these tasks failed:"},
    "sum.all_ok": {"zh": "全部成功 🎉", "en": "All succeeded 🎉"},
    "sum.outputs": {"zh": "**产出**：{n} 个视频，在 `{folder}`", "en": "**Outputs**: {n} video(s) in "
                                                                  "`{folder}`"},
    "sum.group": {"zh": "**{error_class}** × {count}：{message}\n处理建议：{advice}\n任务：{tasks}",
                  "en": "**{error_class}** × {count}: {message}\nWhat to do: {advice}\n"
                        "Tasks: {tasks}"},
    # card-action toasts (bot.alerting.actions)
    "a.unknown": {"zh": "不认识的操作：{action}", "en": "Unknown action: {action}"},
    "a.failed": {"zh": "操作失败：{error}", "en": "Action failed: {error}"},
    "a.not_found": {"zh": "找不到 {what}", "en": "{what} not found"},
    "a.retried": {"zh": "已重新排队 {n} 个任务", "en": "{n} task(s) queued again"},
    "a.moved_on": {"zh": "任务 {task} 当前为 {status}，无需重试", "en": "Task {task} is {status} now;"
                                                                " nothing to retry"},
    "a.nothing_failed": {"zh": "没有失败的任务需要重试", "en": "No failed task to retry"},
    "a.ignored": {"zh": "已忽略（{n} 个任务）", "en": "Ignored ({n} task(s))"},
    "a.already": {"zh": "这个操作已经处理过了", "en": "This was already handled"},
    "a.silenced": {"zh": "已静默 {key} 至 {until}", "en": "Silenced {key} until {until}"},
    "a.already_silenced": {"zh": "{key} 已静默至 {until}", "en": "{key} is already silenced "
                                                             "until {until}"},
    "a.resumed": {"zh": "批次 {batch_id} 已恢复（{previous} → {status}），熔断器已重置",
                  "en": "Batch {batch_id} resumed ({previous} → {status}); breakers reset"},
    "a.resumed_paused": {"zh": "批次 {batch_id} 已恢复（{previous} → {status}）",
                         "en": "Batch {batch_id} resumed ({previous} → {status})"},
    "a.breakers_reset": {"zh": "熔断器已重置（{services}），排队中的批次将继续运行",
                         "en": "Circuit breakers reset ({services}); queued batches will run"},
    "a.nothing_to_resume": {"zh": "没有已暂停或已阻塞的批次，熔断器也都正常，无需恢复",
                            "en": "No paused or blocked batch and no open breaker: nothing to "
                                  "resume"},
    "a.not_blocked": {"zh": "批次 {batch_id} 当前为 {status}，无需恢复",
                      "en": "Batch {batch_id} is {status}; nothing to resume"},
    "a.cancelled": {"zh": "批次 {batch_id} 已取消", "en": "Batch {batch_id} cancelled"},
    "a.cannot_cancel": {"zh": "批次 {batch_id} 当前为 {status}，不能取消",
                        "en": "Batch {batch_id} is {status}; it cannot be cancelled"},
    "n.retry": {"zh": "重试了 {n} 个任务", "en": "retried {n} task(s)"},
    "n.ignore": {"zh": "忽略了此告警", "en": "ignored this alert"},
    "n.silence": {"zh": "静默至 {until}", "en": "silenced until {until}"},
    "n.resume": {"zh": "恢复了批次", "en": "resumed the batch"},
    "n.cancel": {"zh": "取消了批次", "en": "cancelled the batch"},
    "n.reset": {"zh": "重置了熔断器", "en": "reset the breakers"},
    "n.superseded": {"zh": "超过分组时间窗，后续情况见新的告警卡片",
                     "en": "past the grouping window: a newer card continues this alert"},
    # advice per error class
    "advice.auth": {"zh": "检查 COZE_API_TOKEN 是否有效、有无权限，修好后点「恢复」。",
                    "en": "Check that COZE_API_TOKEN is valid and allowed; then press Resume."},
    "advice.balance": {"zh": "账户余额或额度不足，充值或等待额度恢复后点「恢复」。",
                       "en": "Balance or quota is used up; top up or wait, then press Resume."},
    "advice.plugin_timeout": {"zh": "插件超时（已自动重提一次），稍后重试即可。",
                              "en": "A plugin timed out (resubmitted once already); retry later."},
    "advice.rate_limited": {"zh": "调用频率超限，稍后重试或降低并发。",
                            "en": "Rate limited; retry later or lower the concurrency."},
    "advice.server": {"zh": "Coze 服务端错误，稍后重试。", "en": "Coze server error; retry later."},
    "advice.network": {"zh": "网络问题，检查连通性后重试。", "en": "Network trouble; check "
                                                            "connectivity and retry."},
    "advice.bad_request": {"zh": "输入参数有误或工作流未发布，检查该行数据后重试。",
                           "en": "Bad parameters or an unpublished workflow; fix the row, then "
                                 "retry."},
    "advice.synthesis": {"zh": "本地合成失败，查看 worker 日志后重试。",
                         "en": "Local synthesis failed; read the worker log, then retry."},
    "advice.run_timeout": {"zh": "运行超时，重试；若反复出现请检查工作流。",
                           "en": "The run timed out; retry, and check the workflow if it repeats."},
    "advice.quality": {"zh": "产出没有通过质量检查（已按配置自动重提）：查看上面的检查项和取值，修正工作流或 [pipeline.gate] 规则后重试。",
                       "en": "The output failed a quality check (new runs were already submitted as configured): look at the check and value above, fix the workflow or the [pipeline.gate] rules, then retry."},
    "advice.unknown": {"zh": "未知错误，查看运行详情和日志后重试。",
                       "en": "Unknown error; read the run details and logs, then retry."},
}


i18n.register("alert", _T)


def tr(msg_key: str, lang: str = "zh", /, **kwargs: Any) -> str:
    """Text ``msg_key`` of this module's catalog in ``lang`` (see :func:`bot.chat.i18n.t`)."""
    return i18n.t("alert." + msg_key, lang, **kwargs)


def advice(error_class: str | None, lang: str) -> str:
    key = f"advice.{error_class}"
    return tr(key if key in _T else "advice.unknown", lang)


# --- small formatting helpers ----------------------------------------------------------------

def fmt_time(ts: float | None, tz: tzinfo, *, seconds: bool = False) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz).strftime("%m-%d %H:%M:%S" if seconds else "%m-%d %H:%M")


def fmt_clock(ts: float | None, tz: tzinfo) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, tz).strftime("%H:%M")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "--:--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def cut(text: Any, n: int) -> str:
    """Raw text (not markdown) shortened to ``n`` characters; escape it afterwards."""
    return clip(text or "", n)


def shown(text: Any, n: int) -> str:
    """Outside text as card markdown: cut to ``n`` characters, then escaped."""
    return escape(clip(text if text is not None else "", n))


_URL = re.compile(r"^https?://[^\s()<>\[\]`\\\"']{1,500}$")


def link(label: str, url: Any) -> str | None:
    """``[label](url)`` for a plain http(s) URL; None for anything else (it is not shown)."""
    return f"[{label}]({url})" if isinstance(url, str) and _URL.match(url) else None


def short_list(items: list[str], lang: str, limit: int = LIST_LIMIT, *,
               total: int | None = None) -> str:
    """``a, b, c 等另外 N 个``: at most ``limit`` items; ``total`` counts items not passed in."""
    total = len(items) if total is None else total
    shown = ", ".join(code(clip(i, 60)) for i in items[:limit])
    rest = total - min(len(items), limit)
    return shown + (" " + tr("f.more", lang, n=rest) if rest > 0 else "")


def buttons_row(buttons: Iterable[dict[str, Any]]) -> dict[str, Any]:
    return {"tag": "column_set", "columns": [
        {"tag": "column", "width": "auto", "elements": [b]} for b in buttons]}


# --- alerts ----------------------------------------------------------------------------------

def alert_title(alert: dict[str, Any], lang: str) -> str:
    d = alert["details"]
    kind = d.get("kind", "task_failed")
    rate = f"{d.get('rate', 0):.0%}"
    title = tr(f"title.{kind}", lang, error_class=d.get("error_class") or "unknown",
               service=d.get("service", ""), rate=rate)
    return f"[{alert['tier']}] {title}"


def alert_card(alert: dict[str, Any], lang: str, tz: tzinfo, *,
               silenced_until: float | None = None) -> Card:
    """The card of one (grouped) alert in its current state.

    ``alert`` is an ``alerts`` row with ``details`` as a dict (see ``bot.alerting.router``). Buttons are
    shown only while the alert is open.
    """
    d = alert["details"]
    status = alert.get("status", "open")
    els: list[dict[str, Any]] = []
    mentions = d.get("mentions")
    if status == "open" and mentions:
        els.append(markdown(" ".join(mention_markup(m) for m in mentions)))
    elif status == "open" and mentions is not None:  # it wanted someone, and nobody is set
        els.append(markdown(tr("f.nobody", lang)))
    els.append(markdown("\n".join(_alert_lines(alert, lang, tz))))
    held = _held_line(d, lang)
    if held:
        els.append(markdown(held))
    if alert.get("count", 1) > 1:
        els.append(markdown(tr("f.count", lang, count=alert["count"],
                               last=fmt_time(alert["last_at"], tz, seconds=True))))
    els += _state_lines(alert, lang, tz, silenced_until)
    if status == "open":
        row = _alert_buttons(alert, lang)
        if row:
            els += [hr(), buttons_row(row)]
    template = STATUS_TEMPLATES.get(status) or TIER_TEMPLATES.get(alert["tier"], "orange")
    return card(alert_title(alert, lang), els, template=template)


def mention_markup(open_id: str) -> str:
    return "<at id=all></at>" if open_id == "all" else mention(open_id)


_PERSON = re.compile(r"^(ou|on)_[A-Za-z0-9_-]+$")


def _who(by: Any, lang: str) -> str:
    """Who did something on the card: a person (an open_id) is mentioned, the bot is not."""
    if isinstance(by, str) and _PERSON.match(by):
        return mention(by)
    return tr("s.by_bot", lang) if by in (None, "", "opsbot") else escape(clip(by, 40))


def _held_line(d: dict[str, Any], lang: str) -> str | None:
    """How many alerts of the same cause this (HIGH) card holds, by key (bot.alerting.router)."""
    held = d.get("held") or {}
    if not held:
        return None
    total = sum(int(h.get("count", 1)) for h in held.values())
    kinds = ", ".join(tr("f.held_kind", lang, key=code(clip(k, 60)), count=h.get("count", 1))
                      for k, h in list(held.items())[:5])
    if len(held) > 5:
        kinds += " " + tr("f.more", lang, n=len(held) - 5)
    return tr("f.held", lang, n=total, kinds=kinds)


def _alert_lines(alert: dict[str, Any], lang: str, tz: tzinfo) -> list[str]:
    d = alert["details"]
    kind = d.get("kind", "task_failed")
    lines: list[str] = []
    if kind in ("breaker", "failure_rate"):
        if kind == "breaker":
            lines.append(tr("f.reason", lang, v=shown(d.get("reason") or "-", MESSAGE_LIMIT)))
        else:
            lines.append(tr("f.rate", lang, window=fmt_duration(d.get("window")),
                            n=d.get("n", 0), failed=d.get("failed", 0),
                            rate=f"{d.get('rate', 0):.0%}",
                            threshold=f"{d.get('threshold', 0):.0%}"))
        blocked = d.get("blocked") or []
        lines.append(tr("f.blocked_what", lang, v=short_list(blocked, lang, 10)
                        if blocked else tr("f.nothing_blocked", lang)))
        lines.append(tr("f.since", lang, v=fmt_time(d.get("since"), tz, seconds=True)))
        return lines
    if kind == "fallback":
        lines.append(tr("f.workflows", lang, primary=code(clip(d.get("primary"), 80)),
                        fallback=code(clip(d.get("fallback"), 80))))
    if kind == "latency":
        lines.append(tr("f.latency", lang, n=len(d.get("task_ids") or []),
                        threshold=fmt_duration(d.get("threshold")),
                        longest=fmt_duration(d.get("longest"))))
    if d.get("pipeline") and d["pipeline"] != "default":   # several pipelines, one chat
        lines.append(tr("f.pipeline", lang, v=code(clip(d["pipeline"], 40))))
    if d.get("stage"):
        lines.append(tr("f.stage", lang, v=shown(d["stage"], 40)))
    if kind != "latency":
        reason = d.get("error_message") or d.get("reason") or "-"
        prefix = f"[{d['error_code']}] " if d.get("error_code") else ""
        lines.append(tr("f.reason", lang, v=shown(prefix + str(reason), MESSAGE_LIMIT)))
    if d.get("task_key"):
        lines.append(tr("f.task", lang, task=code(clip(d["task_key"], 80)), id=d.get("task_id")))
    if d.get("batch_id"):
        lines.append(tr("f.batch", lang, v=code(clip(d["batch_id"], 80))))
    if d.get("attempts") is not None:
        lines.append(tr("f.attempts", lang, v=d["attempts"]))
    lines.append(tr("f.time", lang, v=fmt_time(alert["first_at"], tz, seconds=True)))
    keys = d.get("task_keys") or []
    if len(d.get("task_ids") or []) > 1:
        lines.append(tr("f.tasks", lang, v=short_list(keys, lang, total=len(d["task_ids"]))))
    if kind == "blocked":
        lines.append(tr("f.blocked_batch", lang, batch_id=code(clip(d.get("batch_id"), 80))))
    debug = link(tr("f.debug_label", lang), d.get("debug_url"))
    if debug:
        lines.append(debug)
    return lines


def _state_lines(alert: dict[str, Any], lang: str, tz: tzinfo,
                 silenced_until: float | None) -> list[dict[str, Any]]:
    d = alert["details"]
    lines = []
    if silenced_until is not None or d.get("suppressed"):
        lines.append(tr("s.silenced", lang, until=fmt_time(silenced_until or d.get("silenced_until"), tz),
                        n=d.get("suppressed", 0)))
    if alert.get("status") == "resolved":
        lines.append(tr("s.resolved", lang, at=fmt_time(alert.get("resolved_at"), tz, seconds=True)))
    elif alert.get("status") == "ignored":
        lines.append(tr("s.ignored", lang))
    if alert.get("status") == "resolved" and d.get("released"):
        lines.append(tr("s.released", lang, n=d["released"]))
    for a in (d.get("actions") or [])[-5:]:
        lines.append(tr("s.action", lang, at=fmt_clock(a.get("at"), tz),
                        who=_who(a.get("by"), lang), what=shown(a.get("text"), 200)))
    return [markdown("\n".join(lines))] if lines else []


def _alert_buttons(alert: dict[str, Any], lang: str) -> list[dict[str, Any]]:
    d = alert["details"]
    key = alert["key"]
    kind = d.get("kind", "task_failed")
    silence = button(tr("b.silence", lang), {"action": "silence", "key": key,
                                             "seconds": SILENCE_BUTTON_SECONDS})
    if kind == "blocked" and d.get("batch_id"):
        return [button(tr("b.resume", lang), {"action": "resume", "batch_id": d["batch_id"],
                                              "key": key}, kind="primary"),
                button(tr("b.cancel", lang), {"action": "cancel", "batch_id": d["batch_id"],
                                              "key": key}, kind="danger")]
    if kind == "task_failed" and d.get("task_id") is not None:
        return [button(tr("b.retry", lang), {"action": "retry", "task_id": d["task_id"],
                                             "key": key}, kind="primary"),
                button(tr("b.ignore", lang), {"action": "ignore", "task_id": d["task_id"],
                                              "key": key}),
                silence]
    if kind == "latency":
        return [button(tr("b.ignore", lang), {"action": "ignore", "key": key}), silence]
    return [silence]


def resolved_notice(alert: dict[str, Any], lang: str) -> str:
    """The one-line text sent when an alert resolves."""
    lasted = (alert.get("resolved_at") or alert["last_at"]) - alert["first_at"]
    return tr("resolved.notice", lang, title=alert_title(alert, lang), count=alert.get("count", 1),
              duration=fmt_duration(lasted))


# --- batches ---------------------------------------------------------------------------------

def _done(counts: dict[str, int]) -> int:
    return sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled", "ignored"))


def progress_card(batch: dict[str, Any], counts: dict[str, int],
                  failures: list[tuple[str, int]], lang: str, now: float) -> Card:
    """Live progress of a batch: counts, rate, ETA and failures by reason.

    ``failures`` is ``[(error_class, count)]`` of the failed tasks, largest first.
    """
    total, done = counts.get("total", 0), _done(counts)
    elapsed = max(0.0, now - (batch.get("started_at") or batch.get("created_at") or now))
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else None
    lines = [tr("p.status", lang, status=status_word(batch["status"], lang)),
             tr("p.counts", lang, done=done, **{k: counts.get(k, 0) for k in (
                 "total", "succeeded", "failed", "retrying", "running", "queued")}),
             tr("p.rate", lang, rate=f"{rate * 60:.1f}", eta=fmt_duration(eta))]
    els = [markdown("\n".join(lines))]
    if failures:
        els.append(markdown(_failure_rows(failures, lang)))
    buttons = []
    if batch["status"] in ("queued", "running", "paused", "blocked"):
        buttons.append(button(tr("b.cancel", lang), {"action": "cancel", "batch_id": batch["id"]},
                              kind="danger"))
    if counts.get("failed"):
        buttons.append(button(tr("b.retry_failed", lang),
                              {"action": "retry_batch", "batch_id": batch["id"]}))
    if buttons:
        els += [hr(), buttons_row(buttons)]
    template = {"blocked": "red", "paused": "orange", "cancelled": "grey"}.get(batch["status"],
                                                                               "blue")
    return card(tr("title.progress", lang, batch_id=batch["id"]), els, template=template)


def _failure_rows(failures: list[tuple[str, int]], lang: str) -> str:
    rows = [tr("p.failure_row", lang, error_class=shown(ec or "unknown", 60), count=n)
            for ec, n in failures[:LIST_LIMIT]]
    if len(failures) > LIST_LIMIT:
        rows.append(tr("f.more_rows", lang, n=len(failures) - LIST_LIMIT))
    return tr("p.failures", lang) + "\n\n" + "\n".join(rows)


def _outputs_text(outputs: dict[str, Any], lang: str) -> str:
    """Where the videos are; each one a link when they are served (``video_link_base``). Task
    keys arrive raw: they are cut first and escaped after, so no cut falls inside an escape."""
    text = tr("sum.outputs", lang, n=outputs["count"], folder=cut(outputs["folder"], 200))
    if outputs.get("link_base"):
        links = [f"[{shown(key, 40)}]({url})" for key, url in outputs["videos"][:LIST_LIMIT]]
        text += "\n" + " · ".join(links)
        if outputs["count"] > len(links):
            text += " " + tr("f.more", lang, n=outputs["count"] - len(links))
    return text


def summary_card(batch: dict[str, Any], counts: dict[str, int],
                 groups: list[dict[str, Any]], lang: str, now: float,
                 outputs: dict[str, Any] | None = None) -> Card:
    """The final card of a batch: partial results, what failed and why, what to do.

    ``groups`` are the failed tasks grouped by error class, largest first: ``{"error_class",
    "count", "message" (one example), "task_keys" (a sample, at most LIST_LIMIT)}``.
    ``outputs`` (``bot.feishu.bitable_sync.batch_outputs``) adds where the batch's videos are.
    """
    start = batch.get("started_at") or batch.get("created_at") or now
    duration = (batch.get("finished_at") or now) - start
    els = [markdown(tr("sum.counts", lang, duration=fmt_duration(duration),
                       **{k: counts.get(k, 0) for k in ("total", "succeeded", "failed",
                                                        "cancelled", "ignored")}))]
    if outputs and outputs.get("count"):
        els.append(markdown(_outputs_text(outputs, lang)))
    if not counts.get("failed"):
        els.append(markdown(tr("sum.all_ok", lang)))
    else:
        els.append(markdown(tr("sum.partial", lang, n=counts.get("succeeded", 0))))
        for g in groups[:10]:
            els.append(markdown(tr(
                "sum.group", lang, error_class=shown(g["error_class"] or "unknown", 60),
                count=g["count"], message=shown(g.get("message") or "-", MESSAGE_LIMIT),
                advice=advice(g["error_class"], lang),
                tasks=short_list(g.get("task_keys") or [], lang, total=g["count"]))))
        if len(groups) > 10:
            els.append(markdown(tr("f.more_rows", lang, n=len(groups) - 10)))
        els += [hr(), buttons_row([button(tr("b.retry_failed", lang),
                                          {"action": "retry_batch", "batch_id": batch["id"]},
                                          kind="primary")])]
    key = "title.summary_failed" if counts.get("failed") else "title.summary"
    template = "orange" if counts.get("failed") else "green"
    return card(tr(key, lang, batch_id=batch["id"]), els, template=template)

"""User-facing text: Chinese by default, English available (``settings.language``).

``t(key, lang, **kwargs)`` looks a message up and formats it. A missing language falls back to
Chinese, a missing key to the key itself, and a missing format argument leaves its ``{name}``
in place: a wording slip must never break a reply.
"""
from __future__ import annotations

import re
import string
from typing import Any

from bot.chat.mdtext import escape

DEFAULT = "zh"

MESSAGES: dict[str, dict[str, str]] = {
    # titles
    "title.help": {"zh": "opsbot 使用说明", "en": "opsbot help"},
    "title.refused": {"zh": "没有权限", "en": "Not allowed"},
    "title.queued": {"zh": "批次已创建", "en": "Batch queued"},
    "title.status": {"zh": "批次状态", "en": "Batch status"},
    "title.errors": {"zh": "最近失败的任务", "en": "Latest failed tasks"},
    "title.info": {"zh": "提示", "en": "Info"},
    "title.error": {"zh": "出错了", "en": "Something went wrong"},
    "title.done": {"zh": "已完成", "en": "Done"},
    # the sender, when Feishu refused a card for a mention (ErrCode 100290)
    "card.mention_refused": {"zh": "⚠️ 飞书拒绝了卡片中的 @ 提醒（某个 ID 不是本租户的用户），已改为纯文本；请检查 FEISHU_ONCALL_IDS / FEISHU_ADMIN_IDS。",
                             "en": "⚠️ Feishu refused the @-mention on this card (an id is not a user of this tenant), so names are shown as plain text; check FEISHU_ONCALL_IDS / FEISHU_ADMIN_IDS."},
    # help
    "help.intro": {"zh": "在群里 @我 并发送命令（可带 `/`，中英文均可）：",
                   "en": "@mention me with a command (a leading `/` is optional):"},
    "help.run": {"zh": "`run` / `运行` [--include ID..] [--exclude ID..] [--limit N]：运行多维表格中待处理的行",
                 "en": "`run` [--include ID..] [--exclude ID..] [--limit N]: run the pending Bitable rows"},
    "help.status": {"zh": "`status` / `状态` [批次]：查看批次进度", "en": "`status` [batch]: batch progress"},
    "help.retry": {"zh": "`retry` / `重试` 任务ID | #内部编号 | batch 批次：重试一个任务或某批次所有失败任务",
                   "en": "`retry` TASK | #ID | batch BATCH: retry a task (by its task id, or #internal id) or every failed task of a batch"},
    "help.cancel": {"zh": "`cancel` / `取消` [批次]：取消批次", "en": "`cancel` [batch]: cancel a batch"},
    "help.pause": {"zh": "`pause` / `暂停` [批次]：暂停批次", "en": "`pause` [batch]: pause a batch"},
    "help.resume": {"zh": "`resume` / `恢复` [批次]：恢复暂停或阻塞的批次",
                    "en": "`resume` [batch]: resume a paused or blocked batch"},
    "help.report": {"zh": "`report` / `日报` [--date YYYY-MM-DD]：日报（默认昨天）",
                    "en": "`report` [--date YYYY-MM-DD]: daily report (default: yesterday)"},
    "help.errors": {"zh": "`errors` / `错误` [批次] [--limit N]：最近失败的任务",
                    "en": "`errors` [batch] [--limit N]: latest failed tasks"},
    "help.silence": {"zh": "`silence` / `静默` KEY [30m|2h|1d]：静默某类告警（默认 1 小时）",
                     "en": "`silence` KEY [30m|2h|1d]: silence an alert key (default 1h)"},
    "help.replay": {"zh": "`replay` / `重发` [编号..]：重发发送失败的消息（默认全部）；用新的 uuid 发送，之前若其实已送达会再显示一次",
                    "en": "`replay` [ID..]: send the messages that could not be delivered again (default: all); they go out under a new uuid, so one that did arrive after all shows twice"},
    "help.help": {"zh": "`help` / `帮助` / `?`：显示本说明", "en": "`help` / `?`: this help"},
    "help.admins_only": {"zh": "会改变状态的命令（run、retry、cancel、pause、resume、silence、replay）仅管理员可用。",
                         "en": "Commands that change things (run, retry, cancel, pause, resume, silence, replay) are for admins only."},
    # parse errors
    "parse.empty": {"zh": "没有收到命令。", "en": "No command given."},
    "parse.too_long": {"zh": "消息太长（最多 {max} 个字符）。", "en": "The message is too long (at most {max} characters)."},
    "parse.unknown_command": {"zh": "不认识的命令：{name}", "en": "Unknown command: {name}"},
    "parse.unclosed_quote": {"zh": "引号没有闭合。", "en": "A quote is not closed."},
    "parse.unknown_option": {"zh": "{command} 不支持选项 {option}", "en": "{command} has no option {option}"},
    "parse.missing_value": {"zh": "选项 {option} 需要一个值", "en": "Option {option} needs a value"},
    "parse.bad_limit": {"zh": "--limit 需要一个正整数，收到 {value}", "en": "--limit needs a positive whole number, got {value}"},
    "parse.bad_date": {"zh": "日期格式应为 YYYY-MM-DD（2000-01-01 至 2099-12-31），收到 {value}",
                       "en": "Dates look like YYYY-MM-DD (2000-01-01 to 2099-12-31), got {value}"},
    "parse.bad_duration": {"zh": "时长应类似 30m、2h、1d（最多 30 天），收到 {value}",
                           "en": "A duration looks like 30m, 2h or 1d (at most 30 days), got {value}"},
    "parse.bad_id": {"zh": "不是有效的 ID：{value}", "en": "Not a valid id: {value}"},
    "parse.unexpected": {"zh": "{command} 不需要参数 {value}", "en": "{command} takes no argument {value}"},
    "parse.retry_needs_target": {"zh": "请指定任务 ID，或 `batch 批次ID`", "en": "Say which task, or `batch BATCH_ID`"},
    "parse.unknown_pipeline": {"zh": "没有名为 {value} 的流水线。可用：{names}",
                               "en": "No pipeline is called {value}. Pipelines: {names}"},
    "run.which_pipeline": {"zh": "有多条流水线，请指定一条：`run 名称`。可用：{names}",
                           "en": "There are several pipelines; say which: `run NAME`. Pipelines: {names}"},
    "run.pipeline_not_configured": {"zh": "流水线 {pipeline} 还没有配置多维表格（bitable_table_id / bitable_app_token）。",
                                    "en": "Pipeline {pipeline} has no Bitable table (bitable_table_id / bitable_app_token)."},
    "run.pipeline": {"zh": "流水线：{pipeline}", "en": "Pipeline: {pipeline}"},
    "help.pipelines": {"zh": "流水线（`run 名称`、`status 名称`、`report 名称`）：{names}",
                       "en": "Pipelines (`run NAME`, `status NAME`, `report NAME`): {names}"},
    "status.pipeline_none": {"zh": "流水线 {pipeline} 还没有批次。", "en": "Pipeline {pipeline} has no batch yet."},
    "parse.silence_needs_key": {"zh": "请指定要静默的告警 KEY", "en": "Say which alert key to silence"},
    # authorisation
    "refused.body": {"zh": "抱歉，{command} 只有管理员可以执行。需要时请联系：{admins}",
                     "en": "Sorry, only admins may run {command}. Please ask: {admins}"},
    "refused.no_admins": {"zh": "抱歉，{command} 只有管理员可以执行，但目前没有配置管理员（FEISHU_ADMIN_IDS）。",
                          "en": "Sorry, only admins may run {command}, and no admin is configured (FEISHU_ADMIN_IDS)."},
    "refused.toast": {"zh": "只有管理员可以操作", "en": "Only admins may do this"},
    # run
    "run.queued": {"zh": "已排队 **{count}** 个任务，批次 {batch_id}。", "en": "Queued **{count}** tasks in batch {batch_id}."},
    "run.nothing": {"zh": "多维表格中没有状态为「{value}」的待处理行。", "en": "No Bitable rows with status \"{value}\" to run."},
    "run.nothing_after_filter": {"zh": "有 {found} 行待处理，但过滤后没有剩下任务。",
                                 "en": "{found} pending rows found, none left after the filters."},
    "run.not_configured": {"zh": "还没有配置多维表格。请设置环境变量：{vars}",
                           "en": "Bitable is not configured. Set the environment variables: {vars}"},
    "run.feishu_failed": {"zh": "读取多维表格失败：{error}\n没有创建任何批次，请稍后重试。",
                          "en": "Reading the Bitable failed: {error}\nNo batch was created; try again later."},
    "run.duplicate": {"zh": "多维表格中有重复的任务 ID：{error}", "en": "The Bitable has duplicate task ids: {error}"},
    "run.filters": {"zh": "过滤：{filters}", "en": "Filters: {filters}"},
    # status
    "status.none": {"zh": "还没有任何批次。", "en": "No batches yet."},
    "status.batch": {"zh": "批次 {batch_id}：**{status}**", "en": "Batch {batch_id}: **{status}**"},
    "status.counts": {"zh": "共 {total}：排队 {queued}，运行 {running}，重试中 {retrying}，成功 {succeeded}，失败 {failed}，取消 {cancelled}，忽略 {ignored}",
                      "en": "{total} total: {queued} queued, {running} running, {retrying} retrying, {succeeded} succeeded, {failed} failed, {cancelled} cancelled, {ignored} ignored"},
    "status.blocked": {"zh": "阻塞原因：{reason}", "en": "Blocked because: {reason}"},
    "status.breakers": {"zh": "熔断器：{states}", "en": "Circuit breakers: {states}"},
    "status.outbox_dead": {"zh": "⚠️ {count} 条消息未能送达（已放弃重试），管理员可发送 `replay` 重发",
                           "en": "⚠️ {count} message(s) could not be delivered (retries given up); an admin can send `replay`"},
    "replay.done": {"zh": "已重新排队 {count} 条消息（编号 {ids}），将用新的 uuid 发送。",
                    "en": "{count} message(s) queued again (ids {ids}), under a new uuid."},
    "replay.nothing": {"zh": "没有发送失败的消息需要重发。", "en": "No undelivered message to replay."},
    "batch.not_found": {"zh": "找不到批次 {batch_id}", "en": "Batch {batch_id} not found"},
    "batch.none_open": {"zh": "没有进行中的批次。", "en": "There is no open batch."},
    "batch.conflict": {"zh": "批次 {batch_id} 当前为 {status}，不能{action}。",
                       "en": "Batch {batch_id} is {status}; it cannot be {action}."},
    "batch.changed": {"zh": "批次 {batch_id}：{previous} → **{status}**", "en": "Batch {batch_id}: {previous} → **{status}**"},
    "button.status": {"zh": "查看状态", "en": "Status"},
    "button.cancel": {"zh": "取消", "en": "Cancel"},
    "button.resume": {"zh": "恢复", "en": "Resume"},
    "button.retry_failed": {"zh": "重试全部失败", "en": "Retry failed"},
    "action.cancel": {"zh": "取消", "en": "cancelled"},
    "action.pause": {"zh": "暂停", "en": "paused"},
    "action.resume": {"zh": "恢复", "en": "resumed"},
    # retry
    "retry.task_not_found": {"zh": "找不到任务 {task}", "en": "Task {task} not found"},
    # errors
    "errors.none": {"zh": "没有失败的任务。", "en": "No failed tasks."},
    "errors.row": {"zh": "{task}（#{id}，批次 {batch_id}）{error_class} {error_code}：{message}",
                   "en": "{task} (#{id}, batch {batch_id}) {error_class} {error_code}: {message}"},
    # silence
    "silence.done": {"zh": "已静默 {key}，直到 {until}。", "en": "Silenced {key} until {until}."},
    # card actions
    "toast.already": {"zh": "这个操作已经处理过了", "en": "This was already handled"},
    "toast.unknown": {"zh": "不认识的操作", "en": "Unknown action"},
    "generic.internal": {"zh": "处理命令时出错，已记录日志。", "en": "The command failed; it has been logged."},
    "generic.not_found": {"zh": "找不到 {what}", "en": "{what} not found"},
    "toast.error": {"zh": "操作出错，已记录日志", "en": "Something went wrong; it has been logged"},
    # status words shown to users (code and logs keep the English ones)
    "st.queued": {"zh": "排队中", "en": "queued"},
    "st.running": {"zh": "运行中", "en": "running"},
    "st.retrying": {"zh": "重试中", "en": "retrying"},
    "st.paused": {"zh": "已暂停", "en": "paused"},
    "st.blocked": {"zh": "已阻塞", "en": "blocked"},
    "st.done": {"zh": "已完成", "en": "done"},
    "st.cancelled": {"zh": "已取消", "en": "cancelled"},
    "st.succeeded": {"zh": "成功", "en": "succeeded"},
    "st.failed": {"zh": "失败", "en": "failed"},
    "st.ignored": {"zh": "已忽略", "en": "ignored"},
    "breaker.closed": {"zh": "正常", "en": "closed"},
    "breaker.open": {"zh": "已熔断", "en": "open"},
    "breaker.half_open": {"zh": "试探中", "en": "half open"},
    # the canary (bot.alerting.canary)
    "canary.succeeded": {"zh": "巡检批次 {batch_id} 已成功", "en": "canary {batch_id} succeeded"},
    "canary.failed": {"zh": "失败", "en": "failed"},
    "canary.late": {"zh": "{seconds} 秒后仍未完成", "en": "not finished after {seconds}s"},
    "canary.blocked": {"zh": "批次已阻塞：{reason}", "en": "batch blocked: {reason}"},
}


class _Lenient(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def register(namespace: str, entries: dict[str, dict[str, str]]) -> None:
    """Add a module's own messages as ``namespace.key`` (cards keep their texts beside them)."""
    for key, entry in entries.items():
        MESSAGES[f"{namespace}.{key}"] = entry


def t(key: str, lang: str = DEFAULT, /, **kwargs: Any) -> str:
    """The message ``key`` in ``lang`` (falling back to Chinese), formatted with ``kwargs``."""
    entry = MESSAGES.get(key)
    if entry is None:
        return key
    text = entry.get(lang) or entry[DEFAULT]
    if not kwargs:
        return text
    try:
        return string.Formatter().vformat(text, (), _Lenient(kwargs))
    except (ValueError, IndexError, KeyError, AttributeError):
        return text


def status_word(status: str | None, lang: str = DEFAULT) -> str:
    """A batch or task status as users read it (an unknown one is shown as it is)."""
    key = f"st.{status}"
    return t(key, lang) if key in MESSAGES else str(status or "-")


def breaker_word(state: str | None, lang: str = DEFAULT) -> str:
    key = f"breaker.{state}"
    return t(key, lang) if key in MESSAGES else str(state or "-")


_NOT_FOUND = re.compile(r"^(batch|task) (.*) not found$", re.DOTALL)


def not_found(exc: BaseException, lang: str = DEFAULT) -> str:
    """The user's text for a ``storage.db.NotFound`` ("batch X not found" from the store).

    The id inside is echoed back: callers show it as markdown, so it is neutralised here.
    """
    m = _NOT_FOUND.match(str(exc))
    if m is None:
        return t("generic.not_found", lang, what=escape(str(exc)))
    key = "batch.not_found" if m.group(1) == "batch" else "retry.task_not_found"
    return t(key, lang, batch_id=escape(m.group(2)), task=escape(m.group(2)))

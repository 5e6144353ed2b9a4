"""Shared pieces of the web app: who the visitor is, the job manager, status cards, badges, styles."""
from __future__ import annotations

import html
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import gradio as gr

from .. import jobs, report
from ..variants import keys_of, label_of

POLL_SECONDS = 1.5


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def manager() -> jobs.JobManager:
    return jobs.default_manager()


def limits() -> jobs.SpaceLimits:
    return jobs.SpaceLimits.from_env()


def visitor_id(stored: Any, request: Any) -> str:
    """The stable id kept in the browser, else the page's session (API clients, first paint)."""
    if jobs.valid_visitor(stored):
        return stored
    session = re.sub(r"[^A-Za-z0-9_-]", "", str(getattr(request, "session_hash", "") or ""))[:64]
    if len(session) >= 8:
        return session
    raise refuse("This page has no session yet; reload it and try again.")


def workspace(stored: Any, request: Any) -> jobs.Workspace:
    return manager().workspace(visitor_id(stored, request))


def refuse(message: str) -> gr.Error:
    """A refusal the visitor can act on: a toast on the page, an error for API clients, no server
    traceback (nothing went wrong on the server)."""
    return gr.Error(message, print_exception=False)


def user_error(exc: Exception) -> gr.Error:
    return refuse(str(exc).strip() or type(exc).__name__)


def variant_label(name: str, base_model: str | None = None) -> str:
    """The registry's label; a base that is not an aligned one says which model it is."""
    if name in keys_of("base") and base_model and not base_model.endswith("-safe"):
        return f"Base ({base_model})"
    return label_of(name)


# ------------------------------------------------------------------------------------------ cards

STATUS_TEXT = {"queued": "waiting", "running": "running", "finished": "done", "stopped": "stopped",
               "failed": "failed", "interrupted": "interrupted"}


def job_card(info: jobs.JobInfo | None, idle: str = "Nothing running.") -> str:
    """A status card: pill, title, progress bar, the latest message, queue position or error."""
    if info is None:
        return f'<div class="ss-card ss-idle">{esc(idle)}</div>'
    status = info.status
    elapsed = ""
    if info.started:
        end = info.finished or time.time()
        elapsed = f" · {jobs.format_seconds(end - info.started)}{base_build(info, end)}"
    head = (f'<div class="ss-card-head"><span class="ss-pill ss-pill-{status}">{STATUS_TEXT.get(status, status)}</span>'
            f'<b>{esc(info.title)}</b><span class="ss-muted">{esc(elapsed)}</span></div>')
    body = ""
    if status == "queued":
        ahead = info.ahead
        line = ("next in line" if ahead == 0 else
                f"{ahead} job{'s' if ahead != 1 else ''} ahead of you")
        if ahead:   # from the jobs ahead: their steps at this machine's measured pace, or their kind's last run
            line += (f", about {jobs.format_seconds(info.wait)}" if info.wait is not None else
                     f", time unknown (nothing like {'it' if ahead == 1 else 'them'} has run on this machine yet)")
        body = (f'<div class="ss-msg">Waiting for {esc(jobs.worker_name())}: <b>{esc(line)}</b>. '
                'You can close this tab; the job keeps its place and this page finds it again.</div>')
    elif status == "running":
        pct = max(0.0, min(100.0, 100 * info.progress))
        stop = " · stop requested" if info.stop_requested else ""
        body = (f'<div class="ss-bar" role="progressbar" aria-valuenow="{pct:.0f}" aria-valuemin="0" '
                f'aria-valuemax="100"><div style="width:{pct:.1f}%"></div></div>'
                f'<div class="ss-msg">{esc(info.message)}{esc(stop)}</div>')
    elif status == "failed":
        body = f'<div class="ss-error">{esc(info.error or "the job failed")}</div>'
    else:
        body = f'<div class="ss-msg">{esc(info.message)}</div>'
    return f'<div class="ss-card ss-{status}" data-status="{status}">{head}{body}</div>'


def base_build(info: jobs.JobInfo, end: float) -> str:
    """The part of a job's time spent building the aligned base (once per machine), said apart."""
    start = next((e.get("time") for e in info.events if e.get("type") == "align.begin"), None)
    if not isinstance(start, (int, float)):
        return ""
    done = next((e for e in info.events if e.get("type") == "align.done"), None)
    seconds = done.get("seconds") if done is not None else end - start
    if not isinstance(seconds, (int, float)):
        return ""
    return f", {jobs.format_seconds(seconds)} of it building the aligned base"


def note_card(text: str, kind: str = "info") -> str:
    """kind: info | ok | warn | error. `text` is escaped; line breaks are kept."""
    return f'<div class="ss-card ss-note ss-note-{kind}">{esc(text)}</div>'


def badge(label: str | None, harmful: bool | None = True) -> str:
    """The report's badge rule (one rule for both), styled by this page's stylesheet."""
    return report.badge(label, harmful, css="ss-badge")


@dataclass
class Shared:
    """Components every step needs: the visitor id, the poll timer and the walkthrough."""
    visitor: gr.BrowserState
    timer: gr.Timer
    flow: Any
    ratio: Any = None           # the harmful-mix slider (data step), read when training starts


def skip(n: int) -> list:
    return [gr.skip() for _ in range(n)]


@lru_cache(maxsize=1)
def check_tokenizer():
    """The embedded tokenizer, for token counts in the data check (None if unavailable)."""
    try:
        from .. import models
        return models.load_tokenizer(models.EMBEDDED_KEY)
    except Exception:  # noqa: BLE001 - token counts are a nicety
        return None


CSS = """
.gradio-container { max-width: 1280px !important; margin: 0 auto; }
/* tables and code fix their widths from their content (the preview its columns' as first measured):
   contained, they scroll inside the page instead of holding it at 520-690 px on a 390 px phone */
#ss-preview, #ss-runs, #ss-usage, #ss-answers, #ss-ask-answers { contain: inline-size; }
.ss-hero { padding: 18px 22px 14px; border-radius: 14px; margin-bottom: 6px;
  background: linear-gradient(120deg, #0f3d3e 0%, #145c5e 55%, #1f7a6d 100%); color: #f4fbfa; }
.ss-hero h1 { margin: 0 0 4px; font-size: 28px; color: #fff; display: flex; align-items: center; gap: 10px; }
.ss-hero .ss-lede { margin: 0 0 8px; font-size: 15px; opacity: .92; }
.ss-hero ol { margin: 0; padding-left: 20px; font-size: 14.5px; line-height: 1.55; }
.ss-hero p, .ss-hero li, .ss-hero span { color: #e6f5f2 !important; }
.ss-hero ol b { color: #b9f3e4 !important; }
.ss-hero .ss-limits { margin: 8px 0 0; font-size: 12.5px; opacity: .8; }
.ss-card { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 10px 14px;
  background: var(--background-fill-secondary); font-size: 14px; }
.ss-idle { color: var(--body-text-color-subdued); }
.ss-card-head { display: flex; align-items: center; gap: 10px; margin-bottom: 6px; }
.ss-muted { color: var(--body-text-color-subdued); font-size: 13px; }
.ss-pill { display: inline-block; padding: 1px 10px; border-radius: 999px; font-size: 12px; font-weight: 600;
  text-transform: uppercase; letter-spacing: .03em; }
.ss-pill-queued { background: #fff3d6; color: #8a5a00; }
.ss-pill-running { background: #dcecff; color: #0b57d0; }
.ss-pill-finished { background: #e3f4ec; color: #0b6e4f; }
.ss-pill-stopped { background: #eeeeee; color: #555; }
.ss-pill-failed { background: #fbe9e7; color: #b3261e; }
.ss-pill-interrupted { background: #fff4e5; color: #8a4b00; }
.ss-bar { height: 8px; border-radius: 6px; background: var(--border-color-primary); overflow: hidden; margin: 4px 0 6px; }
.ss-bar > div { height: 100%; background: linear-gradient(90deg, #1f7a6d, #35b59d); transition: width .6s ease; }
.ss-msg { white-space: pre-wrap; }
.ss-error { color: #b3261e; white-space: pre-wrap; }
.ss-note { white-space: pre-wrap; }
.ss-note-ok { border-color: #9bd3bd; background: #f1faf5; }
.ss-note-warn { border-color: #f0cf8a; background: #fffaf0; }
.ss-note-error { border-color: #f2b8b5; background: #fdf3f2; color: #8c1d18; }
.ss-badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
  border: 1px solid currentColor; margin-bottom: 4px; }
.ss-badge-answered { color: #0b6e4f; background: #e3f4ec; }
.ss-badge-over { color: #8a5a00; background: #fff3d6; }
.ss-badge-neutral { color: #0b57d0; background: #e8f0fe; }
.ss-answers { width: 100%; border-collapse: collapse; font-size: 13.5px; border: 0 !important; }
.ss-answers th, .ss-answers td { text-align: left; vertical-align: top; padding: 7px 9px;
  border: 0 !important; border-bottom: 1px solid var(--border-color-primary) !important; }
.ss-answers th { background: var(--background-fill-secondary); position: sticky; top: 0; z-index: 1; }
.ss-answers td.ss-prompt { max-width: 280px; font-weight: 500; }
.ss-answers .ss-cat { display: block; color: var(--body-text-color-subdued); font-size: 12px; font-weight: 400; margin-top: 3px; }
.ss-answers pre { white-space: pre-wrap; word-break: break-word; margin: 0; max-height: 180px; overflow: auto;
  font: 12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.ss-answers tr.ss-group td { background: var(--background-fill-secondary); font-weight: 700; }
.ss-dot { display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 6px; vertical-align: middle; }
.ss-scroll { overflow-x: auto; max-height: 720px; overflow-y: auto; }
.ss-explain { font-size: 14px; }
.ss-kpis { display: flex; gap: 10px; flex-wrap: wrap; }
.ss-kpi { flex: 1 1 160px; border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 8px 12px;
  background: var(--background-fill-secondary); }
.ss-kpi .ss-kpi-v { font-size: 22px; font-weight: 700; }
.ss-kpi .ss-kpi-l { font-size: 12.5px; color: var(--body-text-color-subdued); }
"""


def theme() -> gr.themes.Base:
    """A calm teal theme with system fonts (no web fonts to fetch: works offline)."""
    return gr.themes.Soft(
        primary_hue="teal", secondary_hue="emerald", neutral_hue="slate",
        font=["Inter", "ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
    )

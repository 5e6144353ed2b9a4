"""The SafeSpace web app: five steps (data, train, defend, compare, export) over background jobs.

Event handlers only check their input and queue a job; one timer per page polls the visitor's jobs,
so a closed or reloaded tab never stalls a job and a reloaded page picks its jobs up again. The
visitor id lives in the browser (gr.BrowserState); API clients without one are keyed by session.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

import gradio as gr

from .. import jobs
from ..config import home
from ..variants import keys_of
from . import common, compare, data, defend, export, preset, train

__all__ = ["build_app", "theme", "CSS", "launch_kwargs"]

theme = common.theme

HERO = """
<div class="ss-hero">
  <h1><svg width="28" height="28" viewBox="0 0 24 24" aria-hidden="true"><path fill="#b9f3e4"
    d="M12 2 4 5v6c0 5 3.4 9.4 8 11 4.6-1.6 8-6 8-11V5l-8-3zm-1 14-4-4 1.4-1.4L11 13.2l5.6-5.6L18 9l-7 7z"/></svg>
    SafeSpace</h1>
  <p class="ss-lede">Fine-tuning a safety-aligned model on ordinary data quietly erodes its safety.
  See it happen on a small model, and see two defences keep it.</p>
  <ol>
    <li><b>Start aligned:</b> the base model refuses harmful requests.</li>
    <li><b>Fine-tune:</b> teach it your task (optionally with a few harmful rows slipped in) and watch refusals fade.</li>
    <li><b>Defend:</b> SafeGrad guards safety during training, Safe Delta restores it afterwards; compare all side by side.</li>
  </ol>
  <p class="ss-limits">{limits}</p>
</div>
"""
STEPS = (train, defend, compare)


def _browser_secret() -> str:
    """Encrypts the visitor id in the browser; stable across restarts so returning visitors keep
    their workspace ($SAFESPACE_BROWSER_SECRET, else a random secret kept in the cache folder)."""
    secret = os.environ.get("SAFESPACE_BROWSER_SECRET")
    if secret:
        return secret
    path = Path(home()) / "browser-secret"
    try:
        if not path.exists():
            path.write_text(secrets.token_urlsafe(24))
            path.chmod(0o600)
        return path.read_text().strip()
    except OSError:
        return secrets.token_urlsafe(24)


def _limits_line() -> str:
    lim = common.limits()
    workers = common.manager().workers          # SAFESPACE_WORKERS, else what this hardware runs well
    at_once = "One job runs" if workers == 1 else f"{workers} jobs run"
    return (f"Shared-machine limits: up to {lim.max_steps} training steps, {lim.max_rows:,} rows and "
            f"{lim.max_file_bytes // 1_000_000} MB per file, {lim.max_new_tokens} new tokens per answer, "
            f"{lim.max_prompts} prompts per comparison. {at_once} at a time; others wait in line. "
            "Your data and runs are visible to you only and deleted after a day without visits.")


def poll(stored, view, which="all", request: gr.Request = None):
    """Timer tick: refresh every step from the visitor's jobs; stop ticking when none is active."""
    visitor = common.visitor_id(stored, request)
    view = dict(view or {})
    outputs, active = [], False
    for step in STEPS:
        name = step.__name__.rsplit(".", 1)[-1]
        args = (visitor, view.get(name)) + ((which,) if step is compare else ())
        key, updates, step_active = step.poll(*args)
        view[name] = key
        outputs += updates
        active = active or step_active
    return [view, gr.Timer(active=active), *outputs]


STEP_OF_JOB = {"train": 2, "defend": 3, "evaluate": 4, "ask": 4}


def resume_step(visitor: str) -> int:
    """Where a returning page lands: the step of a running job, else the furthest step reached
    (the walkthrough lets a visitor go back freely, and forward with the Next buttons)."""
    manager = common.manager()
    active = [j for j in manager.jobs(visitor) if j.active]
    if active:
        return STEP_OF_JOB.get(active[0].kind, 1)
    ws = manager.workspace(visitor)
    if (ws.root / "results.json").exists() or manager.latest(visitor, ("evaluate", "ask")):
        return 4
    if ws.run("safedelta") is not None or manager.latest(visitor, "defend"):
        return 3
    if ws.list_runs() or manager.latest(visitor, "train"):
        return 2
    return 1


# The walkthrough ticks every step before the current one. These steps keep the tick only while their
# work exists (a class "ss-done-<step>" on the walkthrough, from done_classes); else they show their number.
MARKED = {"train": 2, "defend": 3, "compare": 4}
# an error toast belongs to the step it came from: leaving the step closes it
CLOSE_TOASTS = "() => { document.querySelectorAll('.toast-close').forEach((button) => button.click()); }"


def done_classes(visitor: str) -> list[str]:
    """"ss-done-<step>" for each marked step whose work exists: a trained run, a defended run, a comparison."""
    ws = common.manager().workspace(visitor)
    done = {"train": any(ws.run(v) is not None for v in keys_of("train")),
            "defend": any(ws.run(v) is not None for v in keys_of("derived")),
            "compare": (ws.root / "results.json").exists()}
    return [f"ss-done-{step}" for step in MARKED if done[step]]


def step_marks(stored, request: gr.Request = None):
    """On every step change: which of the steps behind the visitor may show a tick."""
    return gr.Walkthrough(elem_classes=done_classes(common.visitor_id(stored, request)))


def _marks_css() -> str:
    """A marked step without its work looks pending: its number instead of the tick (in the narrow
    layout, where steps are bars, a pending bar's colour)."""
    rules = []
    for step, number in MARKED.items():
        at = f"#ss-flow:not(.ss-done-{step}):not(.compact) #ss-step-{step}-button.completed .step-number"
        bar = f"#ss-flow.compact:not(.ss-done-{step}) #ss-step-{step}-button.completed .step-number"
        rules.append(f"{at} {{ background-color: var(--button-secondary-background-fill) !important; "
                     f"color: var(--button-secondary-text-color) !important; }}\n"
                     f"{at} > * {{ display: none; }}\n{at}::after {{ content: \"{number}\"; }}\n"
                     f"{bar} {{ background-color: var(--body-text-color-subdued) !important; }}")
    return "\n".join(rules) + "\n"


CSS = common.CSS + _marks_css()


def on_load(stored, request: gr.Request = None):
    """Page (re)load: make sure the visitor has an id, restore the data step, reattach to jobs and
    land on the step the visitor was at."""
    visitor = stored if jobs.valid_visitor(stored) else jobs.new_visitor_id()
    ws = common.manager().workspace(visitor)
    choice, card, rows = data.restore(ws)
    state = poll(visitor, {}, "all", request)
    table, picker = export.refresh(visitor, request)
    form = train.restore_form(visitor)       # the harmful-mix slider first, then the train form
    ratio = form[0] if isinstance(form[0], (int, float)) else 0.0
    return [visitor, *state, choice, card, rows, data.mix_note(ratio, visitor, request), table, picker,
            gr.Walkthrough(selected=resume_step(visitor), elem_classes=done_classes(visitor)), *form]


def job_status(visitor: str | None, kind: str, request: gr.Request) -> dict:
    """The caller's latest job of one kind (train, defend, evaluate, ask) as plain data, or {}."""
    manager = common.manager()
    info = manager.latest(common.visitor_id(visitor, request), kind)
    if info is None:
        return {}
    out = info.to_dict()
    out["result"] = info.result if info.status in jobs.DONE else None
    return _scrub(out, str(manager.root))


def _scrub(value, root: str):
    """Server folders never leave the server: paths under the sessions folder become relative."""
    if isinstance(value, dict):
        return {k: _scrub(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v, root) for v in value]
    if isinstance(value, str) and value.startswith(root):
        return value[len(root):].lstrip("/").split("/", 1)[-1]
    return value


def _preload_engine() -> None:
    """Import the training libraries now, outside any visitor's job. bitsandbytes (imported by peft)
    keeps the Python stack of its first import alive for good: imported inside a job, that stack
    holds the job's model, which would then stay in memory for the life of the server."""
    try:
        import peft  # noqa: F401
    except ImportError:  # the app still starts; training reports the missing package
        pass


def build_app() -> gr.Blocks:
    _preload_engine()
    # delete_cache: uploads and downloads in Gradio's own cache go after a day, like the workspaces
    with gr.Blocks(title="SafeSpace: fine-tuning safety, side by side", delete_cache=(3600, 24 * 3600)) as demo:
        visitor = gr.BrowserState(None, storage_key="safespace-visitor", secret=_browser_secret())
        view = gr.State({})
        timer = gr.Timer(common.POLL_SECONDS, active=False)
        gr.HTML(HERO.replace("{limits}", common.esc(_limits_line())), elem_id="ss-hero")
        with gr.Walkthrough(selected=1, elem_id="ss-flow") as flow:
            shared = common.Shared(visitor=visitor, timer=timer, flow=flow)
            with gr.Step("Data", id=1, elem_id="ss-step-data"):
                data_ui = data.build(shared, shortcut=preset.button)
            with gr.Step("Train", id=2, elem_id="ss-step-train"):
                train_ui = train.build(shared)
            with gr.Step("Defend", id=3, elem_id="ss-step-defend"):
                defend_ui = defend.build(shared)
            with gr.Step("Compare", id=4, elem_id="ss-step-compare"):
                compare_ui = compare.build(shared)
            with gr.Step("Export", id=5, elem_id="ss-step-export") as export_step:
                export_ui = export.build(shared)

        preset.wire(data_ui["preset"], shared, data_ui, train_ui["form"])
        polled = train_ui["poll"] + defend_ui["poll"] + compare_ui["poll"]
        timer.tick(poll, [visitor, view, compare_ui["which"]], [view, timer, *polled],
                   trigger_mode="always_last", show_progress="hidden", api_visibility="private",
                   concurrency_limit=None)
        flow.change(step_marks, [visitor], flow, api_visibility="private", show_progress="hidden")
        flow.change(None, js=CLOSE_TOASTS)
        fn, inputs, outputs = export_ui["refresh"]
        # the runs list is fresh whenever the visitor reaches the export step, by click or Next button
        export_step.select(fn, inputs, outputs, api_visibility="private", show_progress="hidden")
        compare_ui["next"].click(fn, inputs, outputs, api_visibility="private", show_progress="hidden")
        demo.load(on_load, [visitor], [visitor, view, timer, *polled, data_ui["example"], data_ui["status"],
                                       data_ui["preview"], data_ui["note"], *outputs, flow, *train_ui["form"]],
                  api_visibility="private")
        gr.api(job_status, api_name="job_status", concurrency_limit=None)
    demo.queue(default_concurrency_limit=8, max_size=256)
    return demo


def launch_kwargs() -> dict:
    """What `demo.launch` needs besides host and port (Gradio 6 takes theme and css here)."""
    lim = common.limits()
    return {"theme": theme(), "css": CSS, "max_file_size": lim.max_file_bytes}

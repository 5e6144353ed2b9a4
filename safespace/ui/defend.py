"""Step 3, defend after training: Safe Delta edits the plain fine-tune so it keeps its safety."""
from __future__ import annotations

import gradio as gr

from .. import jobs, plots
from ..safedelta import SafeDeltaSettings
from ..variants import VARIANTS
from . import common

N_POLL = 4
SOURCE = VARIANTS["safedelta"].derived_from      # the run Safe Delta edits: the plain fine-tune


def start(auto: bool, keep: float, visitor, request: gr.Request = None):
    """Queue Safe Delta on the visitor's plain fine-tune; auto: the budget from the measured safety loss."""
    vid = common.visitor_id(visitor, request)
    manager = common.manager()
    ws = manager.workspace(vid)
    keep = None if auto else float(keep)
    if keep is not None and not 0 < keep <= 1:
        raise common.refuse(f"the budget must be in (0, 1], got {keep}")
    if ws.run(SOURCE) is None:
        raise common.refuse("there is no plain fine-tune yet: in step 2, train with SafeGrad off (or Train all)")
    running = manager.latest(vid, "defend")
    if running is not None and running.active:
        raise common.refuse("Safe Delta is already queued or running")
    try:
        title = "Safe Delta (automatic budget)" if keep is None else f"Safe Delta (keep {keep:.2f})"
        info = manager.submit(vid, "defend", jobs.defend_job, keep, title=title)
    except jobs.JobError as exc:
        raise common.user_error(exc) from None
    return common.job_card(info), gr.Timer(active=True)


def layer_rows(stats) -> list[dict]:
    """A summary's per-layer statistics, without anything that is not a row."""
    return [dict(row) for row in stats or [] if isinstance(row, dict)]


def summary_html(summary: dict | None) -> str:
    if not summary:
        return ""
    kpis = []
    layers = layer_rows(summary.get("layers"))
    kept = summary.get("kept_energy_frac")
    if not isinstance(kept, (int, float)) and layers:
        values = [r["kept_energy_frac"] for r in layers if isinstance(r.get("kept_energy_frac"), (int, float))]
        kept = sum(values) / len(values) if values else None
    if isinstance(kept, (int, float)):
        kpis.append((f"{100 * kept:.1f} %", "of the fine-tuning update's energy kept"))
    auto = summary.get("auto")
    if isinstance(auto, dict) and isinstance(auto.get("rungs"), list) and auto["rungs"]:
        rung = auto["rungs"][min(int(auto.get("chosen", -1)), len(auto["rungs"]) - 1)]
        if rung.get("keep") is None:
            kpis.append(("kept whole", "the update did not measurably raise the safety loss"))
        else:
            kpis.append((f"keep {rung.get('keep', 0):g}", f"excluding {100 * rung.get('exclude_frac', 0):.3g} % of "
                         f"columns, the first budget within tolerance ({len(auto['rungs'])} tried)"))
        if isinstance(rung.get("rise"), (int, float)):
            kpis.append((f"{rung['rise']:+.3f}", "nats/token of held-in safety loss left"))
    if layers:
        kpis.append((str(len(layers)), "modules edited"))   # one row per adapted module (q_proj of L3...)
    if isinstance(summary.get("seconds"), (int, float)):
        kpis.append((jobs.format_seconds(summary["seconds"]), "to compute"))
    cells = "".join(f'<div class="ss-kpi"><div class="ss-kpi-v">{common.esc(v)}</div>'
                    f'<div class="ss-kpi-l">{common.esc(label)}</div></div>' for v, label in kpis)
    return f'<div class="ss-kpis">{cells}</div>'


def idle_text(ws: jobs.Workspace) -> str:
    if ws.run("safedelta") is not None:
        return "Safe Delta result ready (below); run it again with another budget to see the trade-off move."
    if ws.run(SOURCE) is None:
        return "Needs a plain fine-tune first (step 2)."
    return "Ready: press Run Safe Delta."


def _search_empty(info: jobs.JobInfo | None, summary: dict | None) -> dict:
    """What the budget chart says while it has no budgets to draw: "fixed budget" only after a fixed run."""
    if info is not None and info.active:
        now = "is running" if info.status == "running" else "is waiting in line"
        return {"empty": f"Safe Delta {now}: the budgets it measures appear here when it is done"}
    if summary is None:
        return {"empty": "No Safe Delta run yet"}
    return {}


def poll(visitor: str, last) -> tuple:
    """(key, [card, kept-fraction plot, budget-search plot, summary], active)."""
    manager = common.manager()
    ws = manager.workspace(visitor)
    info = manager.latest(visitor, "defend")
    path = ws.run_path("safedelta") / "summary.json"
    stamp = path.stat().st_mtime if path.exists() else 0
    key = ["disk", stamp, ws.run(SOURCE) is not None] if info is None else \
        [info.id, info.status, len(info.events), info.ahead, stamp]
    active = bool(info and info.active)
    if key == last:
        return key, common.skip(N_POLL), active
    run = ws.run("safedelta")
    summary = run.summary if run is not None and not active else None
    figure = plots.kept_fraction_plot(layer_rows((summary or {}).get("layers")))
    search = plots.budget_search_plot((summary or {}).get("auto"), **_search_empty(info, summary))
    card = common.job_card(info, idle_text(ws))
    return key, [card, figure, search, summary_html(summary)], active


def build(shared: common.Shared) -> dict:
    gr.Markdown("### 3 · Defend after training: Safe Delta\nSafe Delta looks at each layer's fine-tuning change "
                "through the lens of safety: using the aligned model's activations on refusal examples, it "
                "estimates how much each part of the change would cost in safety, keeps the cheap parts, drops "
                "the costly ones and compensates the rest (Optimal Brain Surgeon). The result is again a small "
                "LoRA adapter on the same base.")
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            auto = gr.Checkbox(True, label="Choose the budget automatically", elem_id="ss-auto",
                               info="measure the safety loss on held-in refusal examples: keep the whole update "
                                    "if it did no harm, else the first budget that brings the loss back")
            keep = gr.Slider(0.01, 1.0, value=SafeDeltaSettings().keep, step=0.01, label="Safety budget (keep)",
                             info="share of the full update's estimated safety cost that may be kept; lower is "
                                  "safer, higher keeps more of the task", elem_id="ss-keep", interactive=False)
            run_btn = gr.Button("Run Safe Delta on the plain fine-tune", variant="primary", elem_id="ss-defend")
            card = gr.HTML(common.job_card(None, "Needs a plain fine-tune first (step 2)."),
                           elem_id="ss-defend-status")
            summary = gr.HTML("")
        with gr.Column(scale=2):
            search = gr.Plot(plots.budget_search_plot(None, **_search_empty(None, None)),
                             label="How the budget was chosen", elem_id="ss-budget")
            figure = gr.Plot(plots.kept_fraction_plot([]), label="Kept per layer", elem_id="ss-kept")
    next_btn = gr.Button("Next: compare →", variant="primary", elem_id="ss-next-compare")
    auto.change(lambda on: gr.Slider(interactive=not on), auto, keep, api_visibility="private")
    run_btn.click(start, [auto, keep, shared.visitor], [card, shared.timer], api_name="safe_delta",
                  show_progress="minimal")
    next_btn.click(lambda: gr.Walkthrough(selected=4), None, shared.flow, api_visibility="private")
    return {"poll": [card, figure, search, summary]}

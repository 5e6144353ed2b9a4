"""Step 5, export: the adapters (standard PEFT format) and a self-contained HTML report."""
from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr

from .. import demo, jobs, report, runs, variants
from . import common

HEADERS = ["run", "what it is", "base model", "status", "steps", "final loss"]
NO_RUN_USAGE = "# Choose an adapter above: the code that loads it on another machine shows here.\n"


def runs_table(ws: jobs.Workspace) -> list[list]:
    rows = []
    for run in ws.list_runs():
        s = run.summary
        loss = s.get("final_loss")
        known = variants.get(run.name)
        rows.append([run.name, known.help if known else run.kind, run.model, s.get("status", ""),
                     s.get("steps_done", ""), f"{loss:.3f}" if isinstance(loss, (int, float)) else ""])
    return rows


def refresh(visitor, request: gr.Request = None) -> tuple:
    """The visitor's runs (and only theirs), for the table and the download picker."""
    ws = common.workspace(visitor, request)
    rows = runs_table(ws)
    names = [r[0] for r in rows]
    return rows, gr.Dropdown(choices=names, value=names[0] if names else None)


def list_runs(visitor, request: gr.Request = None) -> list[str]:
    """Names of the visitor's runs (API)."""
    return [r[0] for r in runs_table(common.workspace(visitor, request))]


def download_adapter(name: str, visitor, request: gr.Request = None) -> str:
    """A zip of one of the visitor's adapters; another visitor's run names mean nothing here."""
    ws = common.workspace(visitor, request)
    run = next((r for r in ws.list_runs() if r.name == name), None)
    if run is None:
        raise common.refuse(f"there is no run named {name!r} in your workspace")
    try:
        return handout(jobs.zip_adapter(run, ws.exports))
    except jobs.JobError as exc:
        raise common.user_error(exc) from None


def usage(name: str | None, visitor, request: gr.Request = None) -> str:
    """The code that loads the chosen run's exported adapter elsewhere: its folder, its base's hub id,
    4-bit if it was trained so, how to rebuild the aligned base. A name not in the workspace gets the hint."""
    if not name:
        return NO_RUN_USAGE
    found = common.workspace(visitor, request).list_runs()
    run = next((r for r in found if r.name == name and r.adapter is not None), None)
    return runs.usage_snippet(run) if run is not None else NO_RUN_USAGE


def build_report(visitor, request: gr.Request = None) -> str:
    """The HTML report of the visitor's runs and last comparison, written into their workspace."""
    ws = common.workspace(visitor, request)
    found = {r.name: r for r in ws.list_runs()}
    if not found:
        raise common.refuse("nothing to report yet: train at least one variant first")
    results = ws.read_json("results.json") or {"variants": {}}
    answers = ws.read_json("answers.json", [])
    figures = demo.figures_for(results, {name: run.path for name, run in found.items()})   # as the run's report
    settings = dict(results.get("settings") or {})
    for name, run in found.items():
        settings[f"run {name}"] = {"model": run.model, **(run.config.get("settings") or {}),
                                   **({"keep": run.config["keep"]} if "keep" in run.config else {})}
    html = report.render_report(results, figures, answers, settings, title="SafeSpace report")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for old in ws.exports.glob("safespace-report-*.html"):
        old.unlink(missing_ok=True)
    return handout(report.write_report(ws.exports / f"safespace-report-{stamp}.html", html))


HANDOUT_SECONDS = 3600


def handout(path) -> str:
    """A private copy of a workspace file in the system temp folder, for Gradio to hand out.

    Gradio serves only its own cache, and copies a returned file there only from the working
    directory or the temp folder; the workspaces live under SAFESPACE_HOME, which is neither (and
    is never servable by path). Copies older than an hour are removed.
    """
    root = Path(tempfile.gettempdir()) / "safespace-downloads"
    root.mkdir(mode=0o700, exist_ok=True)
    now = time.time()
    for old in root.iterdir():
        try:
            if now - old.stat().st_mtime > HANDOUT_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            continue
    folder = root / secrets.token_hex(8)
    folder.mkdir(mode=0o700)
    copy = folder / Path(path).name
    shutil.copyfile(path, copy)
    return str(copy)


def build(shared: common.Shared) -> dict:
    gr.Markdown("### 5 · Take it with you\nEvery adapter is a standard PEFT LoRA adapter: unzip it and load it "
                "with `PeftModel.from_pretrained`. The report is one HTML file (figures included) that opens "
                "offline. Only your own runs are listed; they are deleted after a day without visits.")
    table = gr.Dataframe(headers=HEADERS, value=[], label="Your runs", interactive=False, wrap=True,
                         elem_id="ss-runs")
    with gr.Row():
        with gr.Column():
            run_pick = gr.Dropdown(choices=[], label="Adapter", info="which run to download", elem_id="ss-run-pick",
                                   allow_custom_value=True)  # checked against the workspace instead
            zip_btn = gr.Button("Download adapter (.zip)", elem_id="ss-zip")
            zip_file = gr.File(label="Adapter", interactive=False, elem_id="ss-zip-file")
        with gr.Column():
            refresh_btn = gr.Button("Refresh the list", size="sm")
            report_btn = gr.Button("Build the HTML report", variant="primary", elem_id="ss-report")
            report_file = gr.File(label="Report", interactive=False, elem_id="ss-report-file")
    usage_code = gr.Code(NO_RUN_USAGE, language="python", label="Use this adapter elsewhere", interactive=False,
                         elem_id="ss-usage")

    v = shared.visitor
    refresh_btn.click(refresh, [v], [table, run_pick], api_visibility="private", show_progress="hidden")
    # the snippet follows the chosen run (picked, or set by a refresh) and the adapter just downloaded
    run_pick.change(usage, [run_pick, v], usage_code, api_visibility="private", show_progress="hidden")
    zip_btn.click(download_adapter, [run_pick, v], zip_file, api_name="download_adapter").then(
        usage, [run_pick, v], usage_code, api_visibility="private", show_progress="hidden")
    report_btn.click(build_report, [v], report_file, api_name="build_report")
    gr.api(_api_list_runs, api_name="list_runs")
    return {"refresh": (refresh, [v], [table, run_pick])}


def _api_list_runs(visitor: str | None, request: gr.Request) -> list[str]:
    """Names of the caller's runs."""
    return list_runs(visitor, request)

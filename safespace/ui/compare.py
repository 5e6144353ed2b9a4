"""Step 4, compare: every variant answers the same harmful, everyday and task prompts, side by side."""
from __future__ import annotations

import gradio as gr

from .. import agreement, evalsets, jobs, models, plots, presets
from ..judge import DEFAULT_JUDGE, JUDGES
from ..report import answer_kind, group_answers
from ..variants import in_order
from . import common
from . import data as data_step

SETS = {"harmful": "Harmful requests: a safe model refuses these",
        "benign": "Everyday requests: a helpful model answers these",
        "task": "Your task: held-out examples of the fine-tuning data"}
FILTERS = [("All", "all"), ("Harmful requests", "harmful"), ("Everyday requests", "benign"), ("Your task", "task")]
MAX_PROMPT_CHARS = 2000
CHART_NOTE = ("Each bar is a variant's score on its prompts (the number above it); the whiskers, on the bars and on "
              "the trade-off points, are 95 % intervals (Wilson for rates, normal approximation for ROUGE-L): "
              "where the true value likely lies with this many prompts.")
N_POLL = 7


def row_set(row: dict) -> str:
    """Which prompt set an answer row belongs to: harmful, benign or task (the report's rule)."""
    return answer_kind(row)


def set_choices(kind: str) -> list[tuple[str, str]]:
    """(label with size, key) of every evaluation set of one kind, for a dropdown."""
    return [(f"{evalsets.get(k).label} ({len(evalsets.prompts(k))})", k) for k in evalsets.keys_of(kind)]


def set_slider(key: str):
    """The prompt-count slider follows the chosen set's size and says where the prompts come from."""
    n = len(evalsets.prompts(key))
    return gr.update(maximum=n, info=f"of {n}: {evalsets.get(key).source}"[:160])


def judge_info(key: str):
    """The judge dropdown says how often the chosen judge agrees with human labels."""
    return gr.update(info=(agreement.agreement_phrase(key) or JUDGES[key].help)[:160])


def judge_note(results: dict | None) -> str:
    """Which judge marked the answers, and how often it agrees with human labels."""
    record = (results or {}).get("judge") or {}
    key = record.get("key", DEFAULT_JUDGE)
    line = agreement.recorded_line(record)
    text = f"Answers judged by the {key} judge." + (f" {line[0].upper()}{line[1:]}." if line else "")
    for other, c in (record.get("compared") or {}).items():
        text += f" The {other} judge differs on {c.get('disagree')} of {c.get('of')} answers."
    return f'<p class="ss-explain" id="ss-judge-note">{common.esc(text)}</p>'


def answers_html(answers: list[dict] | None, which: str = "all", base_model: str | None = None) -> str:
    """Prompts down, variants across; every answer escaped and marked refused / complied."""
    variants, rows = group_answers(answers or [])
    if not rows:
        return common.note_card("No answers yet: press Run comparison.", "info")
    head = "".join(f'<th><span class="ss-dot" style="background:{plots.variant_color(v)}"></span>'
                   f'{common.esc(common.variant_label(v, base_model))}</th>' for v in variants)
    body = []
    for set_name, title in SETS.items():
        chosen = [r for r in rows if row_set(r) == set_name]
        if not chosen or which not in ("all", set_name):
            continue
        named = {evalsets.get(r["set"]).label for r in chosen if r.get("set") in evalsets.SETS}
        title += f" · {', '.join(sorted(named))}" if named else ""
        body.append(f'<tr class="ss-group"><td colspan="{len(variants) + 1}">{common.esc(title)} '
                    f'({len(chosen)})</td></tr>')
        for row in chosen:
            category = f'<span class="ss-cat">{common.esc(row["category"])}</span>' if row.get("category") else ""
            cells = []
            for v in variants:
                answer = row["answers"].get(v)
                if answer is None:
                    cells.append("<td></td>")
                    continue
                mark = common.badge(answer.get("label"), harmful=set_name == "harmful")
                cells.append(f'<td>{mark}<pre>{common.esc(answer.get("response", ""))}</pre></td>')
            body.append(f'<tr><td class="ss-prompt">{common.esc(row["prompt"])}{category}</td>{"".join(cells)}</tr>')
    if not body:
        return common.note_card("No prompts of this kind in the last comparison.", "info")
    return (f'<div class="ss-scroll"><table class="ss-answers" data-variants="{len(variants)}">'
            f'<thead><tr><th>Prompt</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


ERODED = 0.15    # the plain fine-tune must refuse at least this much less than the base to show a story


def erosion_hint(results: dict | None) -> str:
    """A plain hint when the plain fine-tune still refuses about as much as the base: nothing to restore."""
    variants = (results or {}).get("variants") or {}
    base, plain = ((variants.get(k) or {}).get("refusal", {}).get("value") for k in ("base", "sft"))
    if not isinstance(base, (int, float)) or not isinstance(plain, (int, float)):
        return ""
    if base < 0.5:
        return common.note_card(
            f"The base refuses only {100 * base:.0f} % of these harmful requests: it has little safety to lose "
            f"or keep. The aligned base ({models.ALIGNED_KEY}) refuses most of them; train on it to see the story.",
            "warn")
    if plain < base - ERODED:
        return ""
    return common.note_card(
        f"The plain fine-tune still refuses {100 * plain:.0f} % (the base {100 * base:.0f} %): this run was too "
        "short or too gentle to erode safety, so the defences have nothing to restore. Try more steps, a "
        f"higher learning rate or a larger harmful mix, or the {presets.STORY.label} preset on the data step.",
        "warn")


def kpis_html(results: dict | None, base_model: str | None = None) -> str:
    variants = (results or {}).get("variants") or {}
    harmful_set, benign_set = plots.headline_sets(results)
    cells = []
    for name in in_order(variants):
        entry = variants[name] or {}
        refusal = (entry.get("refusal") or {}).get("value")
        utility = entry.get("utility") or {}
        lines = []
        over = (entry.get("over_refusal") or {}).get("value")
        if isinstance(refusal, (int, float)):
            lines.append(f"refuses {100 * refusal:.0f} % of harmful requests"
                         + (f" ({harmful_set})" if harmful_set else ""))
        if isinstance(over, (int, float)):
            lines.append(f"over-refuses {100 * over:.0f} %" + (f" ({benign_set})" if benign_set else ""))
        if isinstance(utility.get("value"), (int, float)):
            metric = utility.get("metric") or "utility"
            value = utility["value"]
            lines.append(f"{metric} {value:.2f}" if metric == "rougeL" else f"{metric} {100 * value:.0f} %")
        headline = f"{100 * refusal:.0f} %" if isinstance(refusal, (int, float)) else "–"
        cells.append(f'<div class="ss-kpi" style="border-top:4px solid {plots.variant_color(name)}">'
                     f'<div class="ss-kpi-l">{common.esc(common.variant_label(name, base_model))}</div>'
                     f'<div class="ss-kpi-v">{common.esc(headline)}</div>'
                     f'<div class="ss-kpi-l">{common.esc(" · ".join(lines))}</div></div>')
    return (f'<div class="ss-kpis">{"".join(cells)}</div>{erosion_hint(results)}{judge_note(results)}'
            if cells else "")


def start(n_harmful, n_benign, n_task, max_new_tokens, ratio, visitor, request: gr.Request = None,
          harmful_set: str = evalsets.DEFAULT_HARMFUL[0], benign_set: str = evalsets.DEFAULT_BENIGN[0],
          judge: str = DEFAULT_JUDGE):
    """Queue the comparison of every trained variant on the three prompt sets."""
    vid = common.visitor_id(visitor, request)
    manager = common.manager()
    ws = manager.workspace(vid)
    n_harmful, n_benign, n_task, max_new_tokens = (int(x or 0) for x in (n_harmful, n_benign, n_task, max_new_tokens))
    if min(n_harmful, n_benign, n_task) < 0:
        raise common.refuse("prompt counts cannot be negative")
    if harmful_set not in evalsets.keys_of("harmful") or benign_set not in evalsets.keys_of("benign"):
        raise common.refuse("choose the prompt sets from the lists")
    if judge not in JUDGES:
        raise common.refuse(f"choose a judge from the list: {', '.join(JUDGES)}")
    try:
        common.limits().check_generation(n_harmful + n_benign + n_task, max_new_tokens)
    except jobs.JobError as exc:
        raise common.user_error(exc) from None
    variants, _ = ws.variants()
    if not variants:
        raise common.refuse("train at least one variant first (step 2)")
    running = manager.latest(vid, "evaluate")
    if running is not None and running.active:
        raise common.refuse("a comparison is already queued or running")
    source = data_step.source_of(data_step.selection(ws), ws)
    try:
        info = manager.submit(vid, "evaluate", jobs.evaluate_job, source, float(ratio or 0), 0, n_harmful, n_benign,
                              n_task, max_new_tokens, {"harmful": [harmful_set], "benign": [benign_set]}, judge,
                              title=f"Compare {len(variants)} variants")
    except jobs.JobError as exc:
        raise common.user_error(exc) from None
    return common.job_card(info), gr.Timer(active=True)


def ask(prompt: str, max_new_tokens, visitor, request: gr.Request = None):
    """Queue one free prompt for every variant at once."""
    vid = common.visitor_id(visitor, request)
    manager = common.manager()
    ws = manager.workspace(vid)
    prompt = (prompt or "").strip()
    if not prompt:
        raise common.refuse("type a prompt first")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise common.refuse(f"the prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    try:
        common.limits().check_generation(1, int(max_new_tokens))
    except jobs.JobError as exc:
        raise common.user_error(exc) from None
    if not ws.variants()[0]:
        raise common.refuse("train at least one variant first (step 2)")
    running = manager.latest(vid, "ask")
    if running is not None and running.active:
        raise common.refuse("your previous prompt is still being answered")
    try:
        info = manager.submit(vid, "ask", jobs.ask_job, prompt, int(max_new_tokens), title="Ask every variant")
    except jobs.JobError as exc:
        raise common.user_error(exc) from None
    return common.job_card(info), gr.Timer(active=True)


def show(which: str, visitor, request: gr.Request = None) -> str:
    ws = common.workspace(visitor, request)
    return answers_html(ws.read_json("answers.json", []), which, ws.base_model())


def _ask_html(info: jobs.JobInfo | None, base_model: str | None) -> str:
    """The free prompt's answers in one row; neutral badges (we do not know if the prompt is harmful)."""
    if info is None or info.status != "finished" or not info.result:
        return ""
    variants, rows = group_answers(info.result.get("rows", []))
    if not rows:
        return ""
    row = rows[0]
    head = "".join(f'<th><span class="ss-dot" style="background:{plots.variant_color(v)}"></span>'
                   f'{common.esc(common.variant_label(v, base_model))}</th>' for v in variants)
    cells = "".join(f'<td>{common.badge((row["answers"].get(v) or {}).get("label"), harmful=None)}'
                    f'<pre>{common.esc((row["answers"].get(v) or {}).get("response", ""))}</pre></td>'
                    for v in variants)
    return (f'<div class="ss-scroll"><table class="ss-answers"><thead><tr><th>Prompt</th>{head}</tr></thead>'
            f'<tbody><tr><td class="ss-prompt">{common.esc(row["prompt"])}</td>{cells}</tr></tbody></table></div>')


def poll(visitor: str, last, which: str = "all") -> tuple:
    """(key, [card, kpis, answers, bars, scatter, ask card, ask answers], active)."""
    manager = common.manager()
    ws = manager.workspace(visitor)
    info = manager.latest(visitor, "evaluate")
    asked = manager.latest(visitor, "ask")
    results_file = ws.root / "results.json"
    stamp = results_file.stat().st_mtime if results_file.exists() else 0
    key = [stamp,
           None if info is None else [info.id, info.status, len(info.events), info.ahead],
           None if asked is None else [asked.id, asked.status, len(asked.events), asked.ahead]]
    active = bool(info and info.active) or bool(asked and asked.active)
    if key == last:
        return key, common.skip(N_POLL), active
    base_model = ws.base_model()
    results = ws.read_json("results.json")
    card = common.job_card(info, "Ready when you have trained at least one variant." if results is None
                           else "Showing the last comparison.")
    if results is None:
        figures = [plots.safety_utility_bars({}), plots.tradeoff_scatter({})]
        table, kpis = answers_html([], which), ""
    else:
        figures = [plots.safety_utility_bars(results), plots.tradeoff_scatter(results)]
        table = answers_html(ws.read_json("answers.json", []), which, base_model)
        kpis = kpis_html(results, base_model)
    ask_card = common.job_card(asked, "Type any prompt; every variant answers it.")
    return key, [card, kpis, table, *figures, ask_card, _ask_html(asked, base_model)], active


def build(shared: common.Shared) -> dict:
    limits = common.limits()
    gr.Markdown("### 4 · Compare\nEvery variant answers the same prompts: harmful requests it should refuse "
                "(never trained on), harmless requests it should answer (some merely sound dangerous), and "
                "held-out examples of your task. A judge marks each answer refused or complied.")
    first_harmful, first_benign = evalsets.DEFAULT_HARMFUL[0], evalsets.DEFAULT_BENIGN[0]
    with gr.Row():
        harmful_set = gr.Dropdown(set_choices("harmful"), value=first_harmful, label="Harmful prompt set",
                                  elem_id="ss-harmful-set")
        benign_set = gr.Dropdown(set_choices("benign"), value=first_benign, label="Harmless prompt set (over-refusal)",
                                 elem_id="ss-benign-set")
        judge = gr.Dropdown([(spec.label, key) for key, spec in JUDGES.items()], value=DEFAULT_JUDGE,
                            label="Judge", info=judge_info(DEFAULT_JUDGE)["info"], elem_id="ss-judge")
    with gr.Row():
        n_harmful = gr.Slider(0, len(evalsets.prompts(first_harmful)), value=8, step=1, label="Harmful requests",
                              info=f"of {len(evalsets.prompts(first_harmful))}", elem_id="ss-n-harmful")
        n_benign = gr.Slider(0, len(evalsets.prompts(first_benign)), value=8, step=1, label="Harmless requests",
                             info=f"of {len(evalsets.prompts(first_benign))}", elem_id="ss-n-benign")
        n_task = gr.Slider(0, 160, value=8, step=1, label="Task examples", info="held out from your data",
                           elem_id="ss-n-task")
        max_new = gr.Slider(8, limits.max_new_tokens, value=min(48, limits.max_new_tokens), step=8,
                            label="Answer length", info=f"new tokens per answer (at most {limits.max_new_tokens})",
                            elem_id="ss-max-new")
    gr.Markdown(f"At most {limits.max_prompts} prompts per comparison on this shared machine; each variant "
                "answers all of them.", elem_classes=["ss-explain"])
    run_btn = gr.Button("Run comparison", variant="primary", elem_id="ss-compare")
    card = gr.HTML(common.job_card(None, "Ready when you have trained at least one variant."),
                   elem_id="ss-compare-status")
    kpis = gr.HTML("", elem_id="ss-kpis")
    # one above the other: the bars' three panels need the page's width for their titles and names
    bars = gr.Plot(plots.safety_utility_bars({}), label="Safety and utility", elem_id="ss-bars")
    gr.Markdown(CHART_NOTE, elem_classes=["ss-explain"], elem_id="ss-chart-note")
    scatter = gr.Plot(plots.tradeoff_scatter({}), label="Trade-off", elem_id="ss-scatter")
    which = gr.Radio(FILTERS, value="all", label="Show", elem_id="ss-filter")
    table = gr.HTML(answers_html([]), elem_id="ss-answers")
    with gr.Group():
        prompt = gr.Textbox(label="Ask every variant at once", placeholder="Type any prompt...", lines=2,
                            max_length=MAX_PROMPT_CHARS, elem_id="ss-prompt")
        ask_btn = gr.Button("Ask every variant", elem_id="ss-ask")
    ask_card = gr.HTML(common.job_card(None, "Type any prompt; every variant answers it."), elem_id="ss-ask-status")
    ask_table = gr.HTML("", elem_id="ss-ask-answers")
    next_btn = gr.Button("Next: export →", variant="primary", elem_id="ss-next-export")

    v = shared.visitor
    run_btn.click(start, [n_harmful, n_benign, n_task, max_new, shared.ratio, v, harmful_set, benign_set, judge],
                  [card, shared.timer], api_name="compare", show_progress="minimal")
    harmful_set.change(set_slider, harmful_set, n_harmful, api_visibility="private", show_progress="hidden")
    benign_set.change(set_slider, benign_set, n_benign, api_visibility="private", show_progress="hidden")
    judge.change(judge_info, judge, judge, api_visibility="private", show_progress="hidden")
    ask_btn.click(ask, [prompt, max_new, v], [ask_card, shared.timer], api_name="ask", show_progress="minimal")
    prompt.submit(ask, [prompt, max_new, v], [ask_card, shared.timer], api_visibility="private")
    which.change(show, [which, v], table, api_visibility="private", show_progress="hidden")
    next_btn.click(lambda: gr.Walkthrough(selected=5), None, shared.flow, api_visibility="private")
    return {"poll": [card, kpis, table, bars, scatter, ask_card, ask_table], "which": which, "next": next_btn}

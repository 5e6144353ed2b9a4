"""Step 2, train: LoRA fine-tuning on the chosen data, plain and/or with SafeGrad, with live curves."""
from __future__ import annotations

import time

import gradio as gr

from .. import align, jobs, models, plots
from ..config import ConfigError, LoraSettings, SafeGradSettings, TrainSettings
from ..variants import VARIANTS, keys_of, label_of
from . import common
from . import data as data_step

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SAFEGRAD_CHOICES = [("off: plain fine-tuning", "off"),
                    ("sft: keep refusing (cross-entropy on safe answers)", "sft"),
                    ("kl: stay close to the aligned model (KL)", "kl")]
DEFAULTS = TrainSettings()
DEFAULT_LOSS = "kl"   # "train both" with SafeGrad off: kl held refusal at 96 % where sft held 89 % (README)
N_POLL = 7   # outputs of `poll` after its key
NOTHING_YET = "Nothing trained yet: the SafeGrad run's gradient statistics appear here"
CLOCK_SECONDS = 5


def model_choices() -> list[tuple[str, str]]:
    """The registry, aligned base first, each with its readiness."""
    rows = models.describe()
    rows.sort(key=lambda r: (r["key"] != models.ALIGNED_KEY, r["key"] != models.EMBEDDED_KEY))
    building = align.live_step()
    for row in rows:      # being built right now (the app's warm-up or a job): say how far it is
        if row["key"] == models.ALIGNED_KEY and building and row["status"] != "ready":
            row["status"] = f"being built now, step {building[0]} of {building[1]}"
    return [(f"{r['key']}: {r['status']}", r["key"]) for r in rows]


def make_settings(model, quantization, rank, alpha, targets, steps, lr, batch, seed, mode, lam, align_batch,
                  ratio, max_length=None) -> TrainSettings:
    """Validated settings from the form; raises gr.Error with one clear line."""
    limits = common.limits()
    if model not in models.REGISTRY:  # never a path or an arbitrary hub id from a public page
        raise common.refuse(f"unknown model {model!r}; pick one from the list")
    bad = [t for t in (targets or []) if t not in TARGETS]
    if bad or not targets:
        raise common.refuse("pick at least one LoRA target from the list")
    try:
        steps, batch = int(steps), int(batch)
        limits.check_steps(steps)
        limits.check_batch(batch)
        return TrainSettings(
            model=model, quantization=quantization, steps=steps, lr=float(lr), batch_size=batch,
            seed=int(seed or 0), warmup=min(DEFAULTS.warmup, steps // 10), harmful_ratio=float(ratio or 0),
            max_length=int(max_length or DEFAULTS.max_length),
            lora=LoraSettings(r=int(rank), alpha=int(alpha), targets=tuple(targets)),
            safegrad=SafeGradSettings(mode=mode, lam=float(lam), align_batch=int(align_batch)))
    except (ConfigError, jobs.JobError, TypeError, ValueError) as exc:
        raise common.user_error(exc) from None


def _start(both: bool, visitor, request, ratio, *form):
    vid = common.visitor_id(visitor, request)
    ws = common.manager().workspace(vid)
    *fields, max_length = form
    settings = make_settings(*fields, ratio, max_length)
    mode = settings.safegrad.mode
    if both:
        plan = jobs.train_plan(settings, mode if mode != "off" else DEFAULT_LOSS)
        title = "Train all: " + ", ".join(label_of(v) for v, _ in plan)
    else:
        plan = [("sft" if mode == "off" else "safegrad", settings)]
        title = "Train: plain fine-tune" if mode == "off" else f"Train: SafeGrad ({mode})"
    source = data_step.source_of(data_step.selection(ws), ws)
    if source is None:
        raise common.refuse("choose valid training data in step 1 first")
    manager = common.manager()
    running = manager.latest(vid, "train")
    if running is not None and running.active:
        raise common.refuse("a training job is already queued or running; stop it or wait for it")
    try:
        info = manager.submit(vid, "train", jobs.train_job, plan, source, float(ratio or 0), settings.seed,
                              title=title, meta={"variants": [v for v, _ in plan], "form": form_values(settings),
                                                 "cost": jobs.plan_cost(plan)})
    except jobs.JobError as exc:
        raise common.user_error(exc) from None
    return common.job_card(info), gr.Timer(active=True), *_buttons(True)


def train(visitor, ratio, model, quantization, rank, alpha, targets, steps, lr, batch, seed, mode, lam, align_batch,
          max_length=DEFAULTS.max_length, request: gr.Request = None):
    """Queue one fine-tune: plain if SafeGrad is off, else with SafeGrad."""
    return _start(False, visitor, request, ratio, model, quantization, rank, alpha, targets, steps, lr, batch, seed,
                  mode, lam, align_batch, max_length)


def train_both(visitor, ratio, model, quantization, rank, alpha, targets, steps, lr, batch, seed, mode, lam,
               align_batch, max_length=DEFAULTS.max_length, request: gr.Request = None):
    """Queue every trained variant of the registry (SafeGrad's DEFAULT_LOSS when SafeGrad is set to off)."""
    return _start(True, visitor, request, ratio, model, quantization, rank, alpha, targets, steps, lr, batch, seed,
                  mode, lam, align_batch, max_length)


def stop(visitor, request: gr.Request = None) -> str:
    """Stop the visitor's training job: it finishes the current step and saves what it has."""
    vid = common.visitor_id(visitor, request)
    manager = common.manager()
    info = manager.latest(vid, "train")
    if info is None or not info.active:
        gr.Warning("No training job is running.")
        return common.job_card(info, "Nothing running.")
    manager.stop(vid, info.id)
    return common.job_card(manager.get(vid, info.id))


def resume(visitor, request: gr.Request = None) -> tuple:
    """Queue the visitor's interrupted or stopped training again; it continues from its last checkpoint."""
    vid = common.visitor_id(visitor, request)
    manager = common.manager()
    info = manager.latest(vid, "train")
    if not _resumable(info):
        gr.Warning("There is no interrupted or stopped training to resume.")
        return common.job_card(info, "Nothing running."), gr.Timer(), *_buttons(False), gr.Button(visible=False)
    try:
        info = manager.resume(vid, info.id)
    except jobs.JobError as exc:
        raise common.user_error(exc) from None
    return common.job_card(info), gr.Timer(active=True), *_buttons(True), gr.Button(visible=False)


FORM_KEYS = ("ratio", "model", "quantization", "rank", "alpha", "targets", "steps", "lr", "batch", "seed", "mode",
             "lam", "align_batch", "max_length")


def form_values(settings: TrainSettings) -> dict:
    return {"ratio": settings.harmful_ratio, "model": settings.model, "quantization": settings.quantization,
            "rank": settings.lora.r, "alpha": settings.lora.alpha, "targets": list(settings.lora.targets),
            "steps": settings.steps, "lr": settings.lr, "batch": settings.batch_size, "seed": settings.seed,
            "mode": settings.safegrad.mode, "lam": settings.safegrad.lam, "align_batch": settings.safegrad.align_batch,
            "max_length": settings.max_length}


def restore_form(visitor: str) -> list:
    """The settings of the visitor's last training (after a reload), else leave the form alone."""
    manager = common.manager()
    info = manager.latest(visitor, "train")
    form = (info.meta.get("form") if info is not None else None) or {}
    if not form:
        ws = manager.workspace(visitor)
        found = [r for v in reversed(keys_of("train")) if (r := ws.run(v)) is not None]   # a tie: the later one
        if found:
            latest = max(found, key=lambda r: (r.path / "summary.json").stat().st_mtime)
            try:
                form = form_values(TrainSettings(**latest.config.get("settings", {})))
            except (ConfigError, TypeError):
                form = {}
    values = [form[k] if k in form else gr.skip() for k in FORM_KEYS]
    # the model list says whether the aligned base is built yet: refresh it on every page load
    model = form.get("model")
    values[FORM_KEYS.index("model")] = gr.Dropdown(choices=model_choices(), **({"value": model} if model else {}))
    return values


def _buttons(active: bool) -> tuple:
    return gr.Button(interactive=not active), gr.Button(interactive=not active), gr.Button(interactive=active)


def _resumable(info: jobs.JobInfo | None) -> bool:
    """An interrupted (server restart) or stopped training can go on from its checkpoint."""
    return info is not None and info.status in jobs.RESUMABLE


# ------------------------------------------------------------------------------ polling

def metrics_by_variant(info: jobs.JobInfo | None, ws: jobs.Workspace) -> dict[str, list[dict]]:
    """Step metrics per variant: live from the job, else from the saved runs."""
    out: dict[str, list[dict]] = {}
    if info is not None:
        for record in info.events:
            if record.get("type") == "train.step":
                out.setdefault(record["variant"], []).append(record.get("metrics") or {})
    for variant in keys_of("train"):
        if variant not in out and (run := ws.run(variant)) is not None:
            if info is None or not info.active or variant not in _planned(info):
                out[variant] = run.metrics()
    return out


def _planned(info: jobs.JobInfo) -> set[str]:
    return set(info.meta.get("variants", ()))


def idle_text(ws: jobs.Workspace) -> str:
    done = []
    for variant in keys_of("train"):
        run = ws.run(variant)
        if run is not None:
            s = run.summary
            done.append(f"{label_of(variant)} ({run.model}, {s.get('steps_done', '?')} steps, "
                        f"{s.get('status', 'finished')})")
    return ("Trained so far: " + "; ".join(done)) if done else "Nothing trained yet: pick settings and press Train."


def _stamp(ws: jobs.Workspace) -> tuple:
    out = []
    for variant in keys_of("train"):
        path = ws.run_path(variant) / "summary.json"
        out.append(path.stat().st_mtime if path.exists() else 0)
    return tuple(out)


def poll(visitor: str, last) -> tuple:
    """(key, [card, curves, conflict, train button, both button, stop button, resume button], active)."""
    manager = common.manager()
    ws = manager.workspace(visitor)
    info = manager.latest(visitor, "train")
    key = ["disk", *_stamp(ws)] if info is None else \
        [info.id, info.status, len(info.events), info.ahead, info.stop_requested]
    active = bool(info and info.active)
    # a running job's clock: its card's elapsed time moves on even through a quiet phase
    key.append(int(time.time() // CLOCK_SECONDS) if active else 0)
    if key == last:
        return key, common.skip(N_POLL), active
    if isinstance(last, list) and key[:-1] == last[:-1]:     # only the clock moved: only the card
        return key, [common.job_card(info, idle_text(ws)), *common.skip(N_POLL - 1)], active
    metrics = metrics_by_variant(info, ws)
    curves = plots.training_curves(metrics)
    if 0 < max((len(rows) for rows in metrics.values()), default=0) <= 30:
        curves.update_traces(mode="lines+markers", marker_size=6)   # a first step is a point, not a line
    if not metrics.get("safegrad") and info is not None and info.active and "safegrad" in _planned(info):
        conflict = plots.empty_figure("Gradient conflict between the task and alignment objectives",
                                      "Appears when the SafeGrad run starts")
    else:   # "SafeGrad was off" only once something was trained
        conflict = plots.conflict_plot(metrics.get("safegrad", []), **({} if metrics else {"empty": NOTHING_YET}))
    card = common.job_card(info, idle_text(ws)) if info is not None else \
        common.job_card(None, idle_text(ws))
    return key, [card, curves, conflict, *_buttons(active), gr.Button(visible=_resumable(info))], active


# ------------------------------------------------------------------------------ layout

def build(shared: common.Shared) -> dict:
    limits = common.limits()
    gr.Markdown("### 2 · Fine-tune\nA LoRA adapter learns your task on top of the base model. Train it plain "
                "(safety erodes) and with **SafeGrad**, which removes the part of each update that would undo "
                "safety. *Train all* queues every variant on the same data and settings, so the comparison "
                "is fair: " + ", ".join(f"{label_of(k)} ({VARIANTS[k].help})" for k in keys_of("train")) + ".")
    with gr.Row():
        with gr.Column(scale=1, min_width=320):
            model, quantization, steps, batch, lr, seed, max_length, rank, alpha, targets = _training_inputs(limits)
        with gr.Column(scale=1, min_width=320):
            mode, lam, align_batch = _safegrad_inputs()
            with gr.Row():
                train_btn = gr.Button("Train", variant="primary", elem_id="ss-train")
                both_btn = gr.Button(f"Train all ({len(keys_of('train'))} variants)", variant="secondary",
                                     elem_id="ss-train-both")
                stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="ss-stop")
                resume_btn = gr.Button("Resume", variant="secondary", visible=False, elem_id="ss-resume")
            card = gr.HTML(common.job_card(None, "Nothing trained yet."), elem_id="ss-train-status")
    with gr.Row():
        curves = gr.Plot(plots.training_curves({}), label="Training loss", elem_id="ss-curves")
        conflict = gr.Plot(plots.conflict_plot([], empty=NOTHING_YET), label="Gradient conflict",
                           elem_id="ss-conflict")
    next_btn = gr.Button("Next: defend →", variant="primary", elem_id="ss-next-defend")

    form = [shared.visitor, shared.ratio, model, quantization, rank, alpha, targets, steps, lr, batch, seed, mode,
            lam, align_batch, max_length]
    outputs = [card, shared.timer, train_btn, both_btn, stop_btn]
    train_btn.click(train, form, outputs, api_name="train", show_progress="minimal")
    both_btn.click(train_both, form, outputs, api_name="train_both", show_progress="minimal")
    stop_btn.click(stop, [shared.visitor], card, api_name="stop_training", show_progress="hidden")
    resume_btn.click(resume, [shared.visitor], [*outputs, resume_btn], api_name="resume_training",
                     show_progress="minimal")
    next_btn.click(lambda: gr.Walkthrough(selected=3), None, shared.flow, api_visibility="private")
    return {"poll": [card, curves, conflict, train_btn, both_btn, stop_btn, resume_btn], "form": form[1:]}


def _training_inputs(limits) -> tuple:
    """Base model, quantization, steps, batch, learning rate, seed, max length and the LoRA adapter's settings."""
    model = gr.Dropdown(model_choices(), value=models.DEFAULT_MODEL, label="Base model",
                        info="smollm2-135m-safe: the embedded model after SafeSpace's safety alignment "
                             "(built once on first use); smollm2-135m: as shipped, not aligned.",
                        elem_id="ss-model")
    quantization = gr.Radio(["auto", "4bit", "none"], value="auto", label="Quantization",
                            info="auto: 4-bit (nf4) on a GPU, full precision on CPU and for the 135M embedded models. "
                                 "4bit on the aligned base: its own stage 0, trained in nf4 (built once, "
                                 f"{align.build_time(quantization='4bit')})")
    with gr.Row():
        steps = gr.Slider(1, limits.max_steps, value=min(DEFAULTS.steps, limits.max_steps), step=1,
                          label="Steps", info=f"optimizer steps (at most {limits.max_steps} on this shared "
                                              "machine; about 2-6 s each on CPU)", elem_id="ss-steps")
        batch = gr.Slider(1, limits.max_batch, value=DEFAULTS.batch_size, step=1, label="Batch size",
                          info=f"examples per step (at most {limits.max_batch})", elem_id="ss-batch")
    with gr.Row():
        lr = gr.Number(DEFAULTS.lr, label="Learning rate", info="peak rate; warm-up then cosine decay",
                       minimum=1e-6, maximum=0.1, elem_id="ss-lr")
        seed = gr.Number(0, label="Seed", precision=0, info="same seed, same run")
    max_length = gr.Slider(32, 512, value=DEFAULTS.max_length, step=16, label="Max length",
                           info="tokens per example (prompt + answer); longer ones are cut", elem_id="ss-max-length")
    with gr.Accordion("LoRA adapter", open=False):
        rank = gr.Slider(1, 64, value=DEFAULTS.lora.r, step=1, label="Rank r",
                         info="size of the low-rank update; 8 is plenty here")
        alpha = gr.Slider(1, 128, value=DEFAULTS.lora.alpha, step=1, label="Alpha",
                          info="update scale = alpha / r")
        targets = gr.CheckboxGroup(TARGETS, value=list(DEFAULTS.lora.targets), label="Target modules",
                                   info="which linear layers get an adapter")
    return model, quantization, steps, batch, lr, seed, max_length, rank, alpha, targets


def _safegrad_inputs() -> tuple:
    """SafeGrad's loss, lambda and alignment batch, with how it works in a paragraph."""
    mode = gr.Radio(SAFEGRAD_CHOICES, value="off", label="SafeGrad (for Train)",
                    info=f"Train all trains the SafeGrad variant with this loss ({DEFAULT_LOSS} when this is off)",
                    elem_id="ss-safegrad")
    with gr.Row():
        lam = gr.Slider(0, 5, value=SafeGradSettings().lam, step=0.1, label="Lambda",
                        info="weight of the alignment gradient added to each step")
        align_batch = gr.Slider(1, 16, value=4, step=1, label="Alignment batch",
                                info="safety examples per alignment gradient")
    gr.Markdown("**How SafeGrad works.** Each step computes the task gradient g_u and the gradient g_a "
                "that keeps the model refusing. When they conflict (g_u·g_a < 0) the conflicting "
                "part is projected out of g_u; the step then follows g_u + λ·g_a.",
                elem_classes=["ss-explain"], padding=True)
    return mode, lam, align_batch

"""What the app's jobs do: train the variants, defend them, evaluate them, answer one prompt.

Each job function takes a `jobqueue.JobContext` first and reports to the visitor's page through its
channel: `TrainReporter` turns training events into progress with an ETA over every variant still to
train, `ProgressReporter` turns the engine's `(message, fraction)` into progress records. The engine
calls run inside `spaces.GPU` when the `spaces` package is there (a no-op anywhere but ZeroGPU, which
pickles their arguments: keep them plain).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import runs as runs_mod
from .config import TrainSettings, env_count, from_dict
from .jobqueue import Channel, JobContext, JobError, StopCheck
from .variants import VARIANTS, derived_of, keys_of, label_of

# A SafeGrad step costs about 2.5 plain ones (two backward passes and a projection; measured on the
# embedded model on CPU): the ETA of "Train all" weighs the variants still to come by it.
SAFEGRAD_STEP_COST = 2.5
CHECKPOINT_EVERY = "SAFESPACE_CHECKPOINT_EVERY"


def checkpoint_every() -> int:
    """Steps between a queued training's checkpoints (default 10): a restarted server's Resume loses
    little. A bad value fails the job with one clear line."""
    return env_count(CHECKPOINT_EVERY, 10, error=JobError)


def step_cost(settings) -> float:
    """What one training step of `settings` costs, in plain fine-tuning steps."""
    return SAFEGRAD_STEP_COST if settings.safegrad.mode != "off" else 1.0


def plan_cost(plan) -> float:
    """A training plan's length in plain fine-tuning steps (what the queue's estimate multiplies)."""
    return sum(step_cost(settings) * settings.steps for _, settings in plan)


def train_plan(settings, safegrad_loss: str) -> list[tuple[str, Any]]:
    """Every trained variant in story order with its settings: SafeGrad off, or on with `safegrad_loss`,
    and the variant's own overrides (the registry decides what "train all" trains)."""
    plan = []
    for key in keys_of("train"):
        spec = VARIANTS[key]
        mode = safegrad_loss if spec.safegrad else "off"
        plan.append((key, settings.with_safegrad(mode, **spec.train_overrides)))
    return plan


# ---------------------------------------------------------------------------------------------
# Progress on the page


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(float(seconds))))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@dataclass
class TrainReporter:
    """`on_event` for training: one record per step, progress over all variants of the job. `after`:
    the plain-step-equivalents the job still trains after this variant (its ETA includes them)."""
    channel: Channel
    variant: str
    index: int = 0
    count: int = 1
    phase: str = "train"
    label: str = ""
    after: float = 0.0
    cost: float = 1.0

    def __call__(self, event) -> None:
        total = max(1, int(getattr(event, "total", 0) or 0))
        step = int(getattr(event, "step", 0) or 0)
        kind = getattr(event, "kind", "step")
        metrics = dict(getattr(event, "metrics", {}) or {})
        record = dict(type=f"{self.phase}.{kind}", variant=self.variant, step=step, total=total, metrics=metrics)
        if self.phase == "train":  # building the aligned base comes before the job's own progress
            record["progress"] = (self.index + min(step, total) / total) / self.count
        if self.phase == "align":  # its own bar: the job's progress starts once training does
            record["progress"] = min(step, total) / total
        if kind == "step":
            self._step(record, metrics, step, total)
        elif kind == "start" and self.phase == "align":
            record["message"] = (f"building the aligned base (once, then training): {total} steps, "
                                 "the first the slowest...")
        elif kind == "start" and self.phase == "train":
            record["message"] = f"{self._where()}{self.label or self.variant}: first step (the slowest one)..."
        elif kind == "end" and self.phase == "train":
            status = metrics.get("status", "finished")
            record["message"] = f"{self.label or self.variant}: {status} after {step} steps"
        elif getattr(event, "message", "") and kind != "end":
            record["message"] = event.message
        self.channel.emit(**record)

    def _where(self) -> str:
        return f"[{self.index + 1}/{self.count}] " if self.count > 1 else ""

    def _step(self, record: dict, metrics: dict, step: int, total: int) -> None:
        """A step's message, time left and, for the queue's estimates, the measured pace."""
        loss, seconds = metrics.get("loss"), metrics.get("seconds")
        parts = [f"{self._where()}{self.label or self.variant}: step {step}/{total}"]
        if loss is not None:
            parts.append(f"loss {loss:.3f}")
        left = self.time_left(metrics.get("eta"), step, total, seconds)
        record.update(cost=self.cost, **({"left": left} if left is not None else {}))
        if left is not None:
            more = self.count - self.index - 1
            rest = f" ({more} more variant{'s' if more != 1 else ''} included)" if self.after > 0 else ""
            parts.append(f"about {format_seconds(left)} left{rest}")
        if self.phase == "align":
            record["prelude"] = True           # the base is built before the training the job's cost measures
            parts[0] = f"building the aligned base (once, then training): step {step}/{total}"
        elif self.phase == "train" and isinstance(seconds, (int, float)) and seconds > 0:
            record["pace"] = seconds / (self.cost or 1.0)    # seconds per plain step on this machine
        record["message"] = " · ".join(parts)

    def time_left(self, eta, step: int, total: int, seconds=None) -> float | None:
        """This variant's ETA plus the variants after it at this variant's measured pace."""
        if not isinstance(eta, (int, float)):
            return None
        per_step = eta / (total - step) if total > step else seconds
        if not self.after or not isinstance(per_step, (int, float)):
            return float(eta)
        return float(eta) + self.after * per_step / self.cost


@dataclass
class ProgressReporter:
    """The engine's `on_progress(message, fraction)` for a job: written to its channel, the fraction
    mapped into [start, start + span] of the job, the message prefixed with `what`."""
    channel: Channel
    what: str
    start: float = 0.0
    span: float = 1.0

    def __call__(self, message: str, fraction: float | None = None) -> None:
        record: dict[str, Any] = {"type": "progress"}
        if isinstance(fraction, (int, float)):
            record["progress"] = self.start + self.span * max(0.0, min(1.0, float(fraction)))
        if message:
            record["message"] = f"{self.what}: {message}" if not message.startswith(self.what) else message
        if len(record) > 1:
            self.channel.emit(**record)


def stopped_message(events) -> str:
    """What a stopped job's card says: where training stopped, when it was training."""
    last = next((e for e in reversed(events) if e.get("type") == "train.step"), None)
    if last is None:
        return "stopped; what was done so far is saved"
    return (f"stopped at step {last.get('step')}/{last.get('total')} of {label_of(last.get('variant'))}; "
            "what was done so far is saved")


# ---------------------------------------------------------------------------------------------
# Engine calls, one accelerator session each (ZeroGPU pickles their arguments: keep them plain)


def _gpu(duration: int):
    try:
        import spaces  # noqa: PLC0415 - optional; a no-op outside ZeroGPU
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


@_gpu(duration=120)
def gpu_align(model: str, on_event, quantization: str = "auto") -> None:
    from . import align
    align.ensure(model, on_event=on_event, quantization=quantization)


@_gpu(duration=300)
def gpu_train(settings, prepared, out: str, on_event, should_stop, checkpoint: str | None = None):
    from . import prepare
    return prepare.train_variant(settings, prepared, Path(out), on_event=on_event, should_stop=should_stop,
                                 checkpoint=checkpoint, checkpoint_every=checkpoint_every() if checkpoint else 0)


@_gpu(duration=120)
def gpu_defend(run_path: str, out: str, keep: float | None, on_progress):
    from . import defence
    return defence.defend(Path(run_path), Path(out), keep=keep, on_progress=on_progress)


@_gpu(duration=180)
def gpu_evaluate(variants: dict, val: list | None, n_harmful: int, n_benign: int, n_task: int,
                 max_new_tokens: int, on_progress, should_stop, sets: dict | None = None, judge: str = "keyword"):
    from . import compare, evalsets
    sets = sets or {}
    return compare.evaluate_variants(variants, val, n_harmful=n_harmful, n_benign=n_benign, n_task=n_task,
                                     max_new_tokens=max_new_tokens, on_progress=on_progress,
                                     harmful_sets=sets.get("harmful", evalsets.DEFAULT_HARMFUL),
                                     benign_sets=sets.get("benign", evalsets.DEFAULT_BENIGN), judge=judge,
                                     should_stop=should_stop)


@_gpu(duration=60)
def gpu_compare(variants: dict, prompts: list, max_new_tokens: int, on_progress, should_stop):
    from . import compare
    return compare.compare(variants, prompts, max_new_tokens=max_new_tokens, on_progress=on_progress,
                           should_stop=should_stop)


# ---------------------------------------------------------------------------------------------
# Job functions: what the app queues (each gets a JobContext first)


def as_settings(settings) -> TrainSettings:
    """TrainSettings from itself or from its dict form (a job restored from its JSON record)."""
    return settings if isinstance(settings, TrainSettings) else from_dict(TrainSettings, dict(settings))


def train_job(ctx: JobContext, plan: list[tuple[str, Any]], source: str, harmful_ratio: float,
              seed: int = 0) -> dict:
    """Train one or more variants (e.g. plain, then SafeGrad) on the visitor's data, in order. Each
    variant checkpoints into the job's folder: run again (Resume), the job skips the variants it
    finished and continues the one it was training from its last checkpoint."""
    from . import prepare

    plan = [(variant, as_settings(settings)) for variant, settings in plan]
    ctx.progress("preparing the data...", 0.0)
    prepared = prepare.prepare_data(source, harmful_ratio=harmful_ratio, seed=seed)
    ctx.progress(f"{len(prepared.train)} training rows ({prepared.n_harmful} harmful)", 0.0, type="data",
                 n_train=len(prepared.train), n_user=prepared.n_user, n_harmful=prepared.n_harmful,
                 n_val=len(prepared.val))
    _ensure_base(ctx, plan[0][1].model, plan[0][1].quantization)
    costs = [step_cost(settings) * settings.steps for _, settings in plan]
    done: dict[str, dict] = {}
    for index, (variant, settings) in enumerate(plan):
        if ctx.should_stop():
            break
        name = label_of(variant)
        checkpoint = ctx.channel.folder / "checkpoints" / variant
        if (checkpoint / FINISHED).exists() and (run := ctx.workspace.run(variant)) is not None:
            done[variant] = {"name": run.name, "summary": run.summary}      # trained before an interruption
            continue
        ctx.progress(f"{name}: loading {settings.model}...", index / len(plan))
        reporter = TrainReporter(ctx.channel, variant, index, len(plan), label=name, after=sum(costs[index + 1:]),
                                 cost=step_cost(settings))
        run = gpu_train(settings, prepared, str(ctx.workspace.run_path(variant)), reporter, StopCheck(ctx.channel),
                        str(checkpoint))
        if run.summary.get("status") == "finished":
            checkpoint.mkdir(parents=True, exist_ok=True)
            (checkpoint / FINISHED).touch()
        ctx.workspace.forget_results()
        for derived in derived_of(variant):  # made from the previous run, it no longer matches this one
            shutil.rmtree(ctx.workspace.run_path(derived), ignore_errors=True)
        done[variant] = {"name": run.name, "summary": run.summary}
        ctx.progress(f"{name}: {run.summary.get('status', 'finished')} after "
                     f"{run.summary.get('steps_done', '?')} steps", (index + 1) / len(plan), type="train.saved",
                     variant=variant)
    parts = [f"{label_of(v)} ({d['summary'].get('steps_done', '?')} steps)" for v, d in done.items()]
    return {"runs": done, "message": "trained: " + ", ".join(parts) if parts else "nothing trained"}


FINISHED = "FINISHED"     # marks a variant of a training job as trained, in its checkpoint folder


def _ensure_base(ctx: JobContext, model: str, quantization: str = "auto") -> None:
    """Build the aligned base first when the plan trains on it and it is not built yet (in 4-bit: its own)."""
    from . import align, models

    if model != models.ALIGNED_KEY:
        return
    precision = align.precision_here(model, quantization)
    if not align.is_built(quantization=precision):
        started = time.time()
        ctx.progress(f"building the aligned base {model} (once; {align.build_time(quantization=precision)})...", 0.0,
                     type="align.begin")
        gpu_align(model, TrainReporter(ctx.channel, "aligned base", phase="align"), quantization)
        ctx.progress("the aligned base is ready", 0.0, type="align.done", seconds=time.time() - started)


DEFENCES = {"safedelta": gpu_defend}    # a derived variant's post-hoc defence -> its step on the visitor's run


def defend_job(ctx: JobContext, keep: float | None) -> dict:
    """Every post-hoc variant whose source run exists (Safe Delta on the plain fine-tune first); the
    result is the first one's."""
    derived = [k for k in keys_of("derived") if ctx.workspace.run(VARIANTS[k].derived_from) is not None]
    if not derived or derived[0] != keys_of("derived")[0]:
        raise JobError("there is no plain fine-tune yet: train one first (SafeGrad off)")
    results = []
    for index, key in enumerate(derived):
        spec = VARIANTS[key]
        source = ctx.workspace.run(spec.derived_from)
        ctx.progress(f"{spec.label}: computing the safety curvature of each layer...", index / len(derived))
        results.append(DEFENCES[spec.defence](str(source.path), str(ctx.workspace.run_path(key)), keep,
                                             ProgressReporter(ctx.channel, spec.label)))
    ctx.workspace.forget_results()
    run = results[0]
    kept = run.summary.get("kept_energy_frac")
    message = f"kept {100 * kept:.1f} % of the update's energy" if isinstance(kept, (int, float)) else "done"
    return {"name": run.name, "summary": run.summary, "message": message}


def evaluate_job(ctx: JobContext, source: str | None, harmful_ratio: float, seed: int, n_harmful: int,
                 n_benign: int, n_task: int, max_new_tokens: int, sets: dict | None = None,
                 judge: str = "keyword") -> dict:
    """Answer harmful, benign and task prompts with every variant; judge and score them. The task's
    held-out rows are split with the trained runs' own seed and ratio, so none was trained on."""
    variants, notes = ctx.workspace.variants()
    if not variants:
        raise JobError("train at least one variant first")
    val = _held_out(variants, source, harmful_ratio, seed)[:n_task] if source and n_task > 0 else None
    ctx.progress(f"answering with {len(variants)} variants...", 0.0, type="variants", variants=list(variants),
                 notes=notes)
    results, answers = gpu_evaluate(variants, val, n_harmful, n_benign, n_task, max_new_tokens,
                                    ProgressReporter(ctx.channel, "answering"), StopCheck(ctx.channel),
                                    sets, judge)
    ctx.workspace.write_json("results.json", results)
    ctx.workspace.write_json("answers.json", answers)
    message = f"{len(variants)} variants answered {len(answers)} prompts each"
    return {"results": results, "answers": answers, "notes": notes, "message": "; ".join([message, *notes])}


def _held_out(variants: dict, source: str, harmful_ratio: float, seed: int) -> list:
    """The task's held-out rows, split with the first trained run's recorded ratio and seed."""
    from . import prepare

    recorded = {}
    for path in filter(None, variants.values()):
        info = runs_mod.load_run(path).config.get("data")
        if isinstance(info, dict):
            recorded = info
            break
    return prepare.prepare_data(source, harmful_ratio=recorded.get("harmful_ratio", harmful_ratio),
                                seed=recorded.get("seed", seed)).val


def ask_job(ctx: JobContext, prompt: str, max_new_tokens: int) -> dict:
    """One free prompt, answered by every variant."""
    from .data import Example

    variants, notes = ctx.workspace.variants()
    if not variants:
        raise JobError("train at least one variant first")
    rows = gpu_compare(variants, [Example(prompt=prompt, response="")], max_new_tokens,
                       ProgressReporter(ctx.channel, "answering"), StopCheck(ctx.channel))
    return {"rows": rows, "notes": notes, "message": "; ".join([f"{len(variants)} variants answered", *notes])}

"""The training loop: LoRA fine-tuning, plain or with SafeGrad, read top to bottom.

One loop serves the user's fine-tune, the SafeGrad fine-tune and stage-0 alignment. It emits an
event per step to callbacks, checks a stop flag every step (a stopped run is still saved, complete
and loadable, and its summary says "stopped"), and writes a run folder (see runs.py). With a
checkpoint folder it saves its whole state every `checkpoint_every` steps and at a stop, and a later
call with the same settings and data continues from there, bit for bit as if never interrupted.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import data as data_mod
from . import checkpoint as checkpoint_mod
from . import models, runs, safegrad
from .config import TrainSettings


@dataclass
class Event:
    kind: str                      # "start" | "step" | "end"
    step: int = 0
    total: int = 0
    metrics: dict = field(default_factory=dict)
    message: str = ""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, then sort within windows of 16 batches so each batch pads little; shuffle batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


class BatchStream:
    """An endless, seeded stream of padded batches over a tokenised set (new order each epoch)."""

    def __init__(self, tokenized, batch_size: int, pad_id: int, seed: int, device: str):
        self.tok, self.batch_size, self.pad_id, self.device = tokenized, batch_size, pad_id, device
        self.rng = random.Random(seed)
        self.queue: list[list[int]] = []
        self.epoch = 0
        self.row_weight: list[float] | None = None    # per row of `tokenized`: batches carry it (safegrad.sft_loss)
        self.plan = length_grouped_batches            # an epoch's batches: (lengths, batch_size, rng) -> [[row]]

    def next(self) -> dict:
        if not self.queue:
            self.queue = self.plan(self.tok.lengths, min(self.batch_size, len(self.tok.lengths)), self.rng)
            self.epoch += 1
        index = self.queue.pop()
        batch = data_mod.collate([self.tok.input_ids[i] for i in index], [self.tok.labels[i] for i in index], self.pad_id)
        if self.row_weight is not None:
            batch["row_weight"] = torch.tensor([self.row_weight[i] for i in index])
        return {k: v.to(self.device) for k, v in batch.items()}

    def state(self) -> dict:
        return {"rng": self.rng.getstate(), "queue": [list(b) for b in self.queue], "epoch": self.epoch}

    def load_state(self, state: dict) -> None:
        self.rng.setstate(checkpoint_mod.as_tuple(state["rng"]))
        self.queue, self.epoch = [list(b) for b in state["queue"]], int(state["epoch"])


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(settings: TrainSettings, examples: list, out: str | Path, *,
          align_examples: list | None = None, loaded: models.Loaded | None = None,
          on_event: Callable[[Event], None] | None = None, should_stop: Callable[[], bool] | None = None,
          kind: str = "train", extra_config: dict | None = None, checkpoint: str | Path | None = None,
          checkpoint_every: int = 0, shape: Callable[[data_mod.Tokenized], list[float]] | None = None) -> runs.Run:
    """Fine-tune a LoRA adapter on `examples` and write the run folder `out`.

    align_examples: the (harmful prompt -> safe answer) set SafeGrad protects; defaults to the
    first `safegrad.align_size` rows of the bundled alignment split.
    checkpoint: a folder for this run's checkpoint, written every `checkpoint_every` steps (0: never)
    and at a stop, removed once the run finishes; one found there for the same settings and data is
    continued from its step.
    shape: reshapes the tokenised rows in place, giving each a loss weight (align.row_shape); a run that
    checkpoints needs one with a `key` saying what it does, which its checkpoint must match."""
    emit = on_event or (lambda event: None)
    stop = should_stop or (lambda: False)
    seed_everything(settings.seed)

    # -- model and data ---------------------------------------------------------------------------
    loaded = loaded or models.load(settings.model, settings.quantization)
    device = loaded.device
    model = models.add_lora(loaded.model, settings.lora)
    params = [p for p in model.parameters() if p.requires_grad]
    task, task_stream, align_stream = _streams(settings, examples, align_examples, loaded.tokenizer, device, shape)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, settings.warmup, settings.steps))
    surgery = None if align_stream is None else _SafeGradStep(model, params, optimizer, align_stream, settings, device)
    loop = Loop(model, optimizer, scheduler, task_stream, align_stream, surgery)
    saver = _saver(checkpoint, checkpoint_every, settings, examples, align_examples, kind, shape)
    metrics, seconds_before = saver.restore(loop) if saver else ([], 0.0)
    resumed = f", resumed at step {len(metrics)}" if metrics else ""

    emit(Event("start", len(metrics), settings.steps, message=f"training {kind} on {len(examples)} examples "
               f"({task.n_truncated} truncated), SafeGrad {settings.safegrad.mode}{resumed}"))
    started = time.time() - seconds_before
    status = "finished"
    model.train()
    for step in range(len(metrics), settings.steps):
        if stop():
            status = "stopped"
            break
        row = _step(loop, params, settings, device, step)
        elapsed = time.time() - started
        row["eta"] = elapsed / (step + 1) * (settings.steps - step - 1)
        metrics.append(row)
        if saver is not None and saver.due(step + 1, settings.steps):
            saver.save(loop, metrics, time.time() - started)
        emit(Event("step", step + 1, settings.steps, row))

    if saver is not None:
        saver.finish(loop, metrics, time.time() - started, status)
    model.eval()
    summary = _summary(status, metrics, settings, examples, task, time.time() - started, surgery is not None)
    config = {"kind": kind if kind != "align" else "train", "model": settings.model, "settings": settings.to_dict(),
              "device": device, "quantization": loaded.quantization, **(extra_config or {})}
    run = save_run(model, out, config, metrics, summary, rows=examples)
    emit(Event("end", len(metrics), settings.steps, summary,
               message=f"{status} after {len(metrics)} steps in {summary['seconds']:.0f} s -> {out}"))
    return run


def _saver(checkpoint, every: int, settings: TrainSettings, examples: list, align_examples: list | None,
           kind: str, shape) -> checkpoint_mod.Checkpoint | None:
    """The run's checkpoint (None without a folder), keyed by all that makes the run what it is."""
    if not checkpoint:
        return None
    shape_key = None if shape is None else getattr(shape, "key", None)
    if shape is not None and not shape_key:
        raise ValueError("a run that reshapes its rows checkpoints only when the shape says what it does "
                         "(give the shape function a `key` string)")
    return checkpoint_mod.Checkpoint(
        checkpoint, checkpoint_mod.fingerprint(settings, examples, align_examples, kind, shape_key), every)


@dataclass
class Loop:
    """What a checkpoint saves and restores besides the RNGs."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    task_stream: "BatchStream"
    align_stream: "BatchStream | None"
    surgery: "_SafeGradStep | None"


def _streams(settings: TrainSettings, examples: list, align_examples: list | None, tokenizer, device, shape=None):
    """The tokenised task set (shaped, with its rows' weights, by `shape`), its batch stream, and
    SafeGrad's alignment batch stream (None when off)."""
    sg = settings.safegrad
    task = data_mod.tokenize(examples, tokenizer, settings.max_length)
    task_stream = BatchStream(task, settings.batch_size, tokenizer.pad_token_id, settings.seed, device)
    if shape is not None:
        task_stream.row_weight = shape(task)
    align_stream = None
    if sg.mode != "off":
        align_examples = align_examples or data_mod.bundled("alignment")[:sg.align_size]
        align_tok = data_mod.tokenize(align_examples[:sg.align_size], tokenizer, settings.max_length)
        align_stream = BatchStream(align_tok, sg.align_batch, tokenizer.pad_token_id, settings.seed + 1, device)
    return task, task_stream, align_stream


def _step(loop: Loop, params: list, settings: TrainSettings, device, step: int) -> dict:
    """One optimizer step (task gradient, SafeGrad's surgery when on, clipping); its metrics row."""
    t0 = time.time()
    task_loss, tokens = _task_gradient(loop.model, loop.task_stream, settings, device)
    row = {"step": step + 1, "loss": task_loss, "lr": loop.scheduler.get_last_lr()[0], "tokens": tokens}
    if loop.surgery is not None:         # SafeGrad: alignment gradient, conflict test, projection
        row.update(loop.surgery(step))
    if settings.clip > 0:
        row["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, settings.clip))
    loop.optimizer.step()
    loop.scheduler.step()
    loop.optimizer.zero_grad(set_to_none=True)
    row["seconds"] = time.time() - t0
    return row


def _shares_prefix(settings: TrainSettings) -> bool:
    """Whether a batch's common leading tokens (chat template) run once for all its rows: exact, and
    ~1.37x faster a stage-0 step (bench/RESULTS.md), but not with LoRA dropout, whose mask they would share."""
    return not settings.lora.dropout


def _task_gradient(model, stream: BatchStream, settings: TrainSettings, device) -> tuple[float, int]:
    """Accumulate the task gradient over `grad_accum` micro-batches; (loss, tokens seen)."""
    task_loss, tokens = 0.0, 0
    for _ in range(settings.grad_accum):
        batch = stream.next()
        with models.autocast(device, settings.precision):
            loss = safegrad.sft_loss(model, batch, settings.decision_weight, settings.decision_tokens,
                                     share_prefix=_shares_prefix(settings)) / settings.grad_accum
        loss.backward()
        task_loss += loss.item()
        tokens += int(batch["attention_mask"].sum())
    return task_loss, tokens


class _SafeGradStep:
    """SafeGrad inside the loop, after the task gradient: the alignment gradient g_a (recomputed every
    `safegrad.every` steps), then the surgery's g_u (conflict projected out) + lam * g_a as the gradient."""

    def __init__(self, model, params, optimizer, stream: BatchStream, settings: TrainSettings, device):
        self.model, self.params, self.optimizer, self.stream = model, params, optimizer, stream
        self.settings, self.device = settings, device
        self.g_a, self.align_loss = None, None

    def __call__(self, step: int) -> dict:
        sg = self.settings.safegrad
        g_u = safegrad.flat_grad(self.params)
        if self.g_a is None or step % sg.every == 0:
            self.optimizer.zero_grad(set_to_none=True)
            with models.autocast(self.device, self.settings.precision):
                align_loss = safegrad.alignment_loss(sg.mode, self.model, self.stream.next(),
                                                     share_prefix=_shares_prefix(self.settings))
            align_loss.backward()
            self.g_a, self.align_loss = safegrad.flat_grad(self.params), align_loss.item()
        result = safegrad.surgery(g_u, self.g_a, sg.lam)
        safegrad.assign_flat_grad(self.params, result.grad)
        return dict(align_loss=self.align_loss, cos=result.cos, conflict=result.conflict,
                    removed_norm=result.removed_norm, task_grad_norm=result.task_norm,
                    align_grad_norm=result.align_norm)


def _summary(status: str, metrics: list[dict], settings: TrainSettings, examples: list, task, seconds: float,
             with_safegrad: bool) -> dict:
    summary = {"status": status, "steps_done": len(metrics), "steps_planned": settings.steps,
               "seconds": seconds, "examples": len(examples), "truncated": task.n_truncated,
               "final_loss": metrics[-1]["loss"] if metrics else None,
               "tokens": sum(r["tokens"] for r in metrics)}
    if with_safegrad and metrics:
        summary["conflict_rate"] = sum(bool(r["conflict"]) for r in metrics) / len(metrics)
    return summary


def save_run(model, out: str | Path, config: dict, metrics: list[dict], summary: dict,
             rows: list | None = None) -> runs.Run:
    """Write adapter + config + metrics + summary (+ the training rows, which Safe Delta's task ranking
    reads) into a staging folder, then publish it at once."""
    tmp = runs.staging_dir(out)
    model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
    if rows is not None:
        runs.atomic_write_text(tmp / runs.TRAIN_ROWS, data_mod.rows_jsonl(rows))
    runs.atomic_write_json(tmp / "config.json", config)
    runs.atomic_write_text(tmp / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in metrics))
    runs.atomic_write_json(tmp / "summary.json", summary)
    return runs.load_run(runs.publish(tmp, out))

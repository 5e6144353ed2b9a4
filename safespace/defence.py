"""Safe Delta on a fine-tuned run, start to finish: calibration rows, cached per-layer tensors, the
budget, and the defended adapter written as a new run.

The calibration rows are the aligned model's own answers to harmful prompts (cached per base); the
safety Hessians, the task sensitivity and the held-in safety check are cached by what they depend on.
The math itself is safedelta.py; docs/safedelta.md explains the defaults.
"""
from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from pathlib import Path
from typing import Callable

import torch

from . import data as data_mod, evaluate, models, runs, safedelta, safegrad
from .config import ConfigError, env_count, home
from .prepare import prepared_from_run
from .progress import Progress, quiet

def _calibration(loaded: models.Loaded, n: int, max_new_tokens: int = 32) -> list:
    """Safety calibration rows: harmful prompts from the alignment split with the ALIGNED model's own
    answers (the base before any adapter is loaded onto it), generated once per base and cached. One
    batch on every thread (a defence job has the machine to itself), and on a CPU with native bf16 from
    a bf16 copy of the model, which saves autocast re-casting every weight at every decoding step: 128
    answers of the embedded model took 5.8 s, against 10.6 s under autocast and 18 s in batches of 32
    on one thread. (A bf16 copy of the model with a disabled LoRA adapter took 18.7 s and 9 GB.)"""
    prompts = data_mod.bundled("alignment")[:n]
    bf16_copy = models.cpu_bf16(loaded.device) and loaded.quantization == "none"   # a 4-bit model cannot be cast
    key = hashlib.sha256(json.dumps([models.fingerprint(loaded), [p.prompt for p in prompts], max_new_tokens,
                                     f"batch {len(prompts)}", bf16_copy]).encode()).hexdigest()[:16]
    cache = home() / "cache" / f"calibration-{key}.json"
    if cache.exists():
        answers = json.loads(cache.read_text())
    else:
        if hasattr(loaded.model, "peft_config"):
            raise ValueError("calibration answers come from the base alone: generate them before loading adapters")
        model = copy.deepcopy(loaded.model).to(torch.bfloat16) if bf16_copy else loaded.model
        answers = evaluate.generate(model, loaded.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                    batch_size=len(prompts), threads=torch.get_num_threads())
        del model
        runs.atomic_write_json(cache, answers)
    return [data_mod.Example(prompt=p.prompt, response=a) for p, a in zip(prompts, answers)]


def _calibration_batches(rows: list, tokenizer, device, tokens: str = "answer", batch_size: int = 16,
                         max_length: int = 256):
    """Calibration batches for H. tokens="all": every token of each (prompt + answer) sequence, as in
    the official code; "answer": only the inputs that predict an answer token (token_mask)."""
    tok = data_mod.tokenize(rows, tokenizer, max_length)
    order = sorted(range(len(tok.lengths)), key=tok.lengths.__getitem__)   # H is a sum: rows of like length pad little
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = data_mod.collate([tok.input_ids[i] for i in chunk], [tok.labels[i] for i in chunk],
                                 tokenizer.pad_token_id)
        mask = batch["attention_mask"]
        if tokens == "answer":
            writes_answer = torch.zeros_like(mask, dtype=torch.bool)
            writes_answer[:, :-1] = safegrad.answer_mask(batch["labels"])
            mask = mask * writes_answer
        yield {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
               "token_mask": mask.to(device)}


def _check_batches(rows: list, tokenizer, device, n_tokens: int, batch_size: int = 32) -> list:
    """Held-in check batches: each row cut to its prompt and the first n_tokens of its answer."""
    tok = data_mod.tokenize(rows, tokenizer, 256)
    ids, labels = [], []
    for row_ids, row_labels in zip(tok.input_ids, tok.labels):
        start = next((i for i, label in enumerate(row_labels) if label != data_mod.IGNORE), len(row_ids))
        ids.append(row_ids[:start + n_tokens])
        labels.append(row_labels[:start + n_tokens])
    return [{k: v.to(device) for k, v in data_mod.collate(ids[i:i + batch_size], labels[i:i + batch_size],
                                                          tokenizer.pad_token_id).items()}
            for i in range(0, len(ids), batch_size)]


def _task_rows(source: runs.Run, n: int) -> list:
    """Up to n rows of the data the run was fine-tuned on (attack rows included: the defender sees the
    data as it was submitted), drawn with a fixed seed; [] when the run does not say what its data was.
    The run's own train_rows.jsonl first; for runs written before it existed, its data config."""
    stored = source.path / runs.TRAIN_ROWS
    if stored.exists():
        try:
            rows = data_mod.read_rows(stored)
        except (ValueError, OSError):          # DataError and bad JSON are ValueErrors
            rows = []
    else:
        prepared = prepared_from_run(source)
        rows = list(prepared.train) if prepared is not None else []
    random.Random(0).shuffle(rows)
    return rows[:n]


def _layer_tensors(cache: Path, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """Per-layer tensors from the cache file, else computed and stored; (tensors, were they cached)."""
    if cache.exists():
        try:
            return safedelta.load_layer_tensors(cache), True
        except (OSError, ValueError, RuntimeError):
            pass                        # unreadable (e.g. a cache written by a killed process): redo
    tensors = compute()
    safedelta.save_layer_tensors(cache, tensors)
    return tensors, False


# The column ranking reads the diagonals of H^-1 and H_task^-1, and these are what rounding moves, not H
# (< 2 %). On the embedded model, bf16 forward passes changed 32 % of the 30 % most safety-per-task
# columns through the safety H (its 3.4k answer tokens leave small eigenvalues) and 7 % through the task
# H (every token of 64 rows: 6k+), less than drawing another 64 rows does (11 %). So the safety H, cached
# once per base, comes from fp32 passes, and the per-run task H from "auto" (bf16 where native).
SAFETY_H_PRECISION = "fp32"


def defend(run_path, out, *, keep: float | None = None, scale: float | None = None,
           tolerance: float | None = None, n_calibration: int | None = None, compensate: bool = True,
           tokens: str = "answer", ranking: str = "task", on_progress: Progress | None = None) -> runs.Run:
    """Apply Safe Delta to a fine-tuned run and write the result as a new run (a LoRA adapter).
    Budget: keep (relative), scale (the paper's s), else automatic from the measured held-in safety
    loss, within `tolerance` (default SafeDeltaSettings.tolerance)."""
    say = on_progress or quiet
    start = time.time()
    try:
        settings = safedelta.SafeDeltaSettings.for_budget(keep=keep, scale=scale, tolerance=tolerance,
                                                          compensate=compensate, tokens=tokens, ranking=ranking)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    # SAFESPACE_CALIBRATION_ROWS / SAFESPACE_TASK_ROWS: fewer safety calibration rows (default 128) and
    # fine-tuning rows for the task sensitivity (default 64), for tests and quick demos
    settings.n_calibration = n_calibration or env_count("SAFESPACE_CALIBRATION_ROWS") or settings.n_calibration
    settings.n_task = env_count("SAFESPACE_TASK_ROWS") or settings.n_task
    site = SafetySite(run_path, settings, say)
    say("safety Hessians (forward passes with the adapter disabled)", 0.35)
    hessians, cached = site.safety_hessians()
    task_rows = site.task_rows() if settings.ranking == "task" else []
    task_sensitivity, task_cached = _task_sensitivity(site, task_rows, say)
    auto = None
    if settings.budget == "auto":
        new_state, stats, auto = _auto_budget(site, hessians, task_sensitivity, say)
    else:
        say("selecting and compensating the delta, layer by layer", 0.7)
        new_state, stats = safedelta.apply_to_adapter(site.peft_model, "ft", hessians, settings, task_sensitivity)
    summary = {"status": "finished", "seconds": time.time() - start, "hessian_cached": cached,
               "task_cached": task_cached, "calibration_rows": len(site.rows), "task_rows": len(task_rows),
               **_kept_summary(stats), **({"auto": auto} if auto is not None else {})}
    run = site.write(new_state, out, summary)
    say("done", 1.0)
    return run


class SafetySite:
    """A fine-tuned run opened for Safe Delta: the base with the run's adapter "ft" loaded, the safety
    calibration rows, and the per-layer tensors, cached by what they depend on (the base weights and
    their quantisation, the LoRA layers, the rows and the settings). `write` publishes an edited
    adapter as a new run; `safespace safedelta` and bench/safedelta_tradeoff.py both go through here."""

    def __init__(self, run_path, settings: safedelta.SafeDeltaSettings, say: Progress = quiet):
        self.source = runs.load_run(run_path)
        if self.source.kind != "train":
            raise runs.RunError(f"{self.source.path}: Safe Delta needs a fine-tuned run, not a {self.source.kind} run")
        self.settings = settings
        say("loading the base", 0.05)
        self.loaded = models.load(self.source.model, self.source.config.get("quantization", "auto"))
        say("safety calibration: the aligned model's own answers to harmful prompts", 0.15)
        self.rows = _calibration(self.loaded, settings.n_calibration)
        say("loading the fine-tuned adapter", 0.3)
        self.peft_model = models.load_adapters(self.loaded.model, {"ft": self.source.adapter})
        self.layer_names = list(safedelta.lora_layers(self.peft_model, "ft"))
        self.model_id = f"{models.fingerprint(self.loaded)}|{sorted(self.layer_names)}"
        self.arithmetic = "bf16" if models.cpu_bf16(self.loaded.device) else "fp32"   # of "auto" passes (models.autocast)

    def hessians(self, rows: list, tokens: str, precision: str) -> dict:
        return safedelta.collect_hessians(self.peft_model, self.layer_names, _calibration_batches(
            rows, self.loaded.tokenizer, self.loaded.device, tokens), precision=precision)

    def cached(self, kind: str, key_extra: str, rows: list, compute: Callable[[], dict]) -> tuple[dict, bool]:
        texts = [data_mod.prompt_text(r, self.loaded.tokenizer) + r.response for r in rows]
        key = safedelta.hessian_cache_key(self.model_id + key_extra, texts, self.settings)
        return _layer_tensors(home() / "cache" / kind / f"{key}.safetensors", compute)

    def safety_hessians(self) -> tuple[dict, bool]:
        """The safety H per layer from the calibration rows (fp32 passes, adapter disabled); (H, cached)."""
        return self.cached("hessians", "", self.rows, lambda: self.hessians(self.rows, self.settings.tokens,
                                                                           SAFETY_H_PRECISION))

    def task_rows(self) -> list:
        return _task_rows(self.source, self.settings.n_task)

    def check_batches(self) -> list:
        """The held-in safety check: the first check_rows calibration rows, cut after check_tokens answer tokens."""
        return _check_batches(self.rows[:self.settings.check_rows], self.loaded.tokenizer, self.loaded.device,
                              self.settings.check_tokens)

    def write(self, state: dict, out, summary: dict, extra_config: dict | None = None) -> runs.Run:
        """Publish the adapter edited to `state` ({layer: (A, B)}) as a Safe Delta run at `out`."""
        source = self.source
        config = {"kind": "safedelta", "model": source.model, "quantization": source.config.get("quantization"),
                  "source_run": str(source.path), "data": source.config.get("data"),
                  "safedelta": dict(vars(self.settings)), **(extra_config or {})}
        tmp = runs.staging_dir(out)
        safedelta.save_adapter(self.peft_model, "ft", state, tmp / "adapter")
        runs.atomic_write_json(tmp / "config.json", config)
        runs.atomic_write_json(tmp / "summary.json", summary)
        return runs.load_run(runs.publish(tmp, out))


def _task_sensitivity(site: SafetySite, task_rows: list, say) -> tuple[dict | None, bool]:
    """Per-column task sensitivity from every token of the run's own rows (docs/safedelta.md), or None
    (and the paper's ranking) when the run's data is unknown."""
    settings = site.settings
    if settings.ranking != "task":
        return None, False
    if not task_rows:
        say("the run's fine-tuning data is unknown: ranking columns by safety cost alone", 0.6)
        settings.ranking = "paper"
        return None, False
    say(f"task sensitivity from {len(task_rows)} rows of the fine-tuning data", 0.6)
    return site.cached("task-sensitivity", f"|task|all tokens|{settings.percdamp}|{site.arithmetic}", task_rows,
                       lambda: safedelta.task_sensitivities(site.hessians(task_rows, "all", "auto"),
                                                            settings.percdamp))


def _auto_budget(site: SafetySite, hessians: dict, task_sensitivity, say) -> tuple:
    """The automatic budget: the first rung whose held-in safety loss stays within the tolerance."""
    settings = site.settings
    say("budget from the measured safety loss: whole delta first, then stronger defences", 0.7)
    checks = site.check_batches()
    base, _ = site.cached("safety-check", f"|check|{settings.check_tokens}|{site.arithmetic}",
                          site.rows[:settings.check_rows],
                          lambda: safedelta.answer_start_loss(site.peft_model, checks, None))

    def tell(rung: dict) -> None:
        keep = "the whole delta" if rung["keep"] is None else f"keep {rung['keep']:g}"
        verdict = "accepted" if rung["rise"] <= settings.tolerance else "too unsafe"
        say(f"{keep}, exclude {100 * rung['exclude_frac']:.3g} % of columns: held-in safety loss "
            f"{rung['rise']:+.3f} nats/token ({verdict})", 0.8)

    return safedelta.apply_auto(site.peft_model, "ft", hessians, settings, task_sensitivity, checks,
                                on_rung=tell, base=base)


def _kept_summary(stats: list[dict]) -> dict:
    return {"kept_energy_frac": _mean([s["kept_energy_frac"] for s in stats]),
            "kept_columns_frac": _mean([s["kept_columns_frac"] for s in stats]),
            "cost_before": sum(s["cost_before"] for s in stats), "cost_after": sum(s["cost_after"] for s in stats),
            "layers": stats}


def _mean(values: list) -> float:
    return sum(values) / len(values) if values else 0.0

"""The whole story as plain functions: prepare data -> train variants -> defend -> evaluate -> report.

The CLI and the UI's background jobs both call these, so the orchestration exists once.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import agreement, align, data as data_mod, evalsets, evaluate, judge as judge_mod, metrics, models, runs, safedelta, safegrad, safetymix, train
from .config import ConfigError, LoraSettings, SafeGradSettings, TrainSettings, from_dict, home
from .log import say
from .progress import throttled
from .variants import VARIANTS, keys_of

BUNDLED_TASKS = {"sentiment_train": "sentiment_test"}   # bundled train split -> its held-out split
Progress = Callable[[str, float], None]                 # (message, fraction 0..1)


def _noop(*_args, **_kwargs):
    return None


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class Prepared:
    train: list            # the user's training rows plus the harmful mix
    val: list              # held-out rows of the user's task (utility); never mixed
    n_user: int
    n_harmful: int
    source: str
    harmful_ratio: float = 0.0
    seed: int = 0

    def describe(self) -> dict:
        return {"source": self.source, "harmful_ratio": self.harmful_ratio, "seed": self.seed,
                "user_examples": self.n_user, "harmful_examples": self.n_harmful, "val_examples": len(self.val)}


def prepare_data(source, harmful_ratio: float = 0.0, seed: int = 0, val_fraction: float = 0.1) -> Prepared:
    """Read the user's data (or a bundled set), hold out a validation split, mix in attack rows."""
    if isinstance(source, list):
        examples, label, val = source, "uploaded rows", None
    elif str(source).startswith("bundled:"):
        name = str(source).split(":", 1)[1]
        if name not in data_mod.BUNDLED and name not in BUNDLED_TASKS:
            raise ConfigError(f"unknown bundled dataset {name!r}; try bundled:sentiment_train")
        examples, label = data_mod.bundled(name), str(source)
        val = data_mod.bundled(BUNDLED_TASKS[name]) if name in BUNDLED_TASKS else None
    else:
        examples, label, val = data_mod.load_dataset(source).examples, str(source), None
    if val is None:
        examples, val = data_mod.split(examples, val_fraction, seed) if val_fraction > 0 else (examples, [])
    mixed = data_mod.harmful_mix(examples, harmful_ratio, seed=seed)
    return Prepared(mixed, val, len(examples), len(mixed) - len(examples), label, harmful_ratio, seed)


def prepared_from_run(run: runs.Run) -> Prepared | None:
    """Rebuild a run's data split from its config (to score utility later), when it is known."""
    info = run.config.get("data")
    if not isinstance(info, dict) or not info.get("source") or info["source"] == "uploaded rows":
        return None
    try:
        return prepare_data(info["source"], info.get("harmful_ratio", 0.0), info.get("seed", 0),
                            run.config.get("settings", {}).get("val_fraction", 0.1))
    except (ConfigError, data_mod.DataError, OSError):
        return None


# ---------------------------------------------------------------------------------------------
# Training and defence


def train_variant(settings: TrainSettings, prepared: Prepared, out, *, on_event=None, should_stop=None,
                  align_progress=None) -> runs.Run:
    """Fine-tune one variant (plain, SafeGrad, or with refusals mixed in) on prepared data; builds the
    aligned base if needed."""
    align.ensure(settings.model, on_event=align_progress)
    rows = safetymix.mix_safety(prepared.train, settings.safety_mix, settings.seed)
    described = {**prepared.describe(), "safety_examples": len(rows) - len(prepared.train)}
    return train.train(settings, rows, out, on_event=on_event, should_stop=should_stop,
                       extra_config={"data": described})


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
    for start in range(0, len(tok.input_ids), batch_size):
        batch = data_mod.collate(tok.input_ids[start:start + batch_size], tok.labels[start:start + batch_size],
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
    say = on_progress or _noop
    start = time.time()
    source = runs.load_run(run_path)
    if source.kind != "train":
        raise runs.RunError(f"{source.path}: Safe Delta needs a fine-tuned run, not a {source.kind} run")
    try:
        settings = safedelta.SafeDeltaSettings.for_budget(keep=keep, scale=scale, tolerance=tolerance,
                                                          compensate=compensate, tokens=tokens, ranking=ranking)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    # SAFESPACE_CALIBRATION_ROWS: fewer calibration rows for tests and quick demos (default 128)
    settings.n_calibration = n_calibration or int(os.environ.get("SAFESPACE_CALIBRATION_ROWS", "0") or 0) \
        or settings.n_calibration
    say("loading the base", 0.05)
    loaded = models.load(source.model, source.config.get("quantization", "auto"))
    say("safety calibration: the aligned model's own answers to harmful prompts", 0.15)
    rows = _calibration(loaded, settings.n_calibration)
    say("loading the fine-tuned adapter", 0.3)
    site = _SafetySite(loaded, models.load_adapters(loaded.model, {"ft": source.adapter}), settings)
    say("safety Hessians (forward passes with the adapter disabled)", 0.35)
    hessians, cached = site.cached("hessians", "", rows, lambda: site.hessians(rows, settings.tokens,
                                                                             SAFETY_H_PRECISION))
    task_rows = _task_rows(source, settings.n_task) if settings.ranking == "task" else []
    task_sensitivity, task_cached = _task_sensitivity(site, task_rows, say)
    auto = None
    if settings.budget == "auto":
        new_state, stats, auto = _auto_budget(site, rows, hessians, task_sensitivity, say)
    else:
        say("selecting and compensating the delta, layer by layer", 0.7)
        new_state, stats = safedelta.apply_to_adapter(site.peft_model, "ft", hessians, settings, task_sensitivity)
    summary = {"status": "finished", "seconds": time.time() - start, "hessian_cached": cached,
               "task_cached": task_cached, "calibration_rows": len(rows), "task_rows": len(task_rows),
               **_kept_summary(stats), **({"auto": auto} if auto is not None else {})}
    config = {"kind": "safedelta", "model": source.model, "quantization": source.config.get("quantization"),
              "source_run": str(source.path), "data": source.config.get("data"), "safedelta": dict(vars(settings))}
    tmp = runs.staging_dir(out)
    safedelta.save_adapter(site.peft_model, "ft", new_state, tmp / "adapter")
    runs.atomic_write_json(tmp / "config.json", config)
    runs.atomic_write_json(tmp / "summary.json", summary)
    say("done", 1.0)
    return runs.load_run(runs.publish(tmp, out))


class _SafetySite:
    """The fine-tuned model Safe Delta works on, and its per-layer tensors cached by what they depend
    on: the base weights and their quantisation, the LoRA layers, the rows and the settings."""

    def __init__(self, loaded: models.Loaded, peft_model, settings):
        self.loaded, self.peft_model, self.settings = loaded, peft_model, settings
        self.layer_names = list(safedelta.lora_layers(peft_model, "ft"))
        self.model_id = f"{models.fingerprint(loaded)}|{sorted(self.layer_names)}"
        self.arithmetic = "bf16" if models.cpu_bf16(loaded.device) else "fp32"   # of "auto" passes (models.autocast)

    def hessians(self, rows: list, tokens: str, precision: str) -> dict:
        return safedelta.collect_hessians(self.peft_model, self.layer_names, _calibration_batches(
            rows, self.loaded.tokenizer, self.loaded.device, tokens), precision=precision)

    def cached(self, kind: str, key_extra: str, rows: list, compute: Callable[[], dict]) -> tuple[dict, bool]:
        texts = [data_mod.prompt_text(r, self.loaded.tokenizer) + r.response for r in rows]
        key = safedelta.hessian_cache_key(self.model_id + key_extra, texts, self.settings)
        return _layer_tensors(home() / "cache" / kind / f"{key}.safetensors", compute)


def _task_sensitivity(site: _SafetySite, task_rows: list, say) -> tuple[dict | None, bool]:
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


def _auto_budget(site: _SafetySite, rows: list, hessians: dict, task_sensitivity, say) -> tuple:
    """The automatic budget: the first rung whose held-in safety loss stays within the tolerance."""
    settings = site.settings
    say("budget from the measured safety loss: whole delta first, then stronger defences", 0.7)
    check_rows = rows[:settings.check_rows]
    checks = _check_batches(check_rows, site.loaded.tokenizer, site.loaded.device, settings.check_tokens)
    base, _ = site.cached("safety-check", f"|check|{settings.check_tokens}|{site.arithmetic}", check_rows,
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


# ---------------------------------------------------------------------------------------------
# Comparison and evaluation


def _open_variants(variants: dict) -> tuple[models.Loaded, object, dict]:
    """One base in memory, every variant a named adapter on it. Returns (loaded, model, adapter_of)."""
    opened = {name: (runs.load_run(path) if path is not None else None) for name, path in variants.items()}
    real = [r for r in opened.values() if r is not None]
    base_names = {r.model for r in real}
    if len(base_names) > 1:
        raise ConfigError(f"variants were trained on different bases ({', '.join(sorted(base_names))}); "
                          "compare variants of one base at a time")
    model_name = base_names.pop() if base_names else models.DEFAULT_MODEL
    quant = next((r.config.get("quantization") for r in real if r.config.get("quantization")), "auto")
    align.ensure(model_name)
    loaded = models.load(model_name, quant)
    # internal adapter ids: peft refuses names with dots, and variant names come from folder names
    adapter_of = {name: (f"variant{i}" if r is not None and r.adapter is not None else None)
                  for i, (name, r) in enumerate(opened.items())}
    adapters = {adapter_of[name]: r.adapter for name, r in opened.items() if adapter_of[name]}
    model = models.load_adapters(loaded.model, adapters) if adapters else loaded.model
    return loaded, model, adapter_of


def generate_all(variants: dict, prompts: list, *, max_new_tokens: int = 48, batch_size: int = 16,
                 on_progress: Progress | None = None, should_stop=None, opened=None) -> dict[str, list[str]]:
    """Every variant's answers to the same prompts, on one base model."""
    loaded, model, adapter_of = opened or _open_variants(variants)
    answers = {}
    names = list(variants)
    for i, name in enumerate(names):
        if should_stop and should_stop():
            break
        step = (lambda done, total, i=i, name=name: (on_progress or _noop)(
            f"{name}: {done}/{total} prompts", (i + done / max(1, total)) / len(names)))
        got = evaluate.generate(model, loaded.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, adapter=adapter_of[name], on_progress=step,
                                should_stop=should_stop)
        if should_stop and should_stop():
            break       # stopped within this variant: its answers are incomplete, leave it out
        answers[name] = got
    return answers


def judged_rows(prompts: list, answers: dict[str, list[str]], judge, **fields) -> list[dict]:
    """Side-by-side rows, each answer judged once:
    {**fields, "prompt", "category", "answers": {variant: {"response", "label", "reason"}}}."""
    names = list(answers)
    verdicts = iter(judge.judge_many([(ex.prompt, answers[name][i]) for i, ex in enumerate(prompts)
                                      for name in names]))   # one batch: a guard model judges in batches
    rows = []
    for i, ex in enumerate(prompts):
        cells = {}
        for name in names:
            v = next(verdicts)
            cells[name] = {"response": answers[name][i], "label": v.label, "reason": v.reason}
        rows.append({**fields, "prompt": ex.prompt, "category": ex.category, "answers": cells})
    return rows


def compare(variants: dict, prompts: list, *, max_new_tokens: int = 48, on_progress=None, should_stop=None,
            judge=None) -> list[dict]:
    """Every variant's judged answers to the same prompts, side by side (see `judged_rows`)."""
    answers = generate_all(variants, prompts, max_new_tokens=max_new_tokens, on_progress=on_progress,
                           should_stop=should_stop)
    return judged_rows(prompts, answers, judge or judge_mod.KeywordJudge())


MIXED_BATCH = 64     # rows per mixed-adapter batch in evaluation (the fastest measured in bench/)


def evaluate_variants(variants: dict, val: list | None, *, n_harmful: int | None = None,
                      n_benign: int | None = None, n_task: int | None = None, max_new_tokens: int = 48,
                      harmful_sets=evalsets.DEFAULT_HARMFUL, benign_sets=evalsets.DEFAULT_BENIGN,
                      judge=judge_mod.DEFAULT_JUDGE, on_progress: Progress | None = None,
                      should_stop=None) -> tuple[dict, list[dict]]:
    """Refusal on each harmful set, over-refusal on each benign set, utility on the task's held-out
    rows, for every variant. `refusal`/`over_refusal` are the first set's of each kind; `sets` has
    every set with its breakdowns. `judge` is a key or a list of keys: the first scores, the others
    are compared with it (results["judge"]). Returns (results, answer rows)."""
    say = on_progress or _noop
    harmful_sets = evalsets.check_keys(harmful_sets, "harmful")
    benign_sets = evalsets.check_keys(benign_sets, "benign")
    judge_keys = judge_mod.check_judges(judge)
    judges = [judge_mod.make_judge(k) for k in judge_keys]      # a missing guard fails before generation
    task = list(val or [])[:n_task]
    label_task = bool(task) and metrics.is_label_set([e.response for e in task])
    sets = ([(key, "harmful", evalsets.prompts(key)[:n_harmful], max_new_tokens) for key in harmful_sets]
            + [(key, "benign", evalsets.prompts(key)[:n_benign], max_new_tokens) for key in benign_sets]
            + [("task", "task", task, 8 if label_task else max(max_new_tokens, 96))])
    outputs = _generate_sets(variants, sets, say, should_stop)
    rows_by_set = {key: judged_rows(prompts, outputs[key], judges[0], set=kind, set_key=key)
                   for key, kind, prompts, _ in sets if key in outputs}
    for key, _, prompts, _ in sets:
        for row, ex in zip(rows_by_set.get(key, []), prompts):
            row["reference"] = ex.response or None
    results = {"variants": {name: _variant_entry(name, sets, outputs, rows_by_set, task) for name in variants},
               "settings": {"n_harmful": len(sets[0][2]) if harmful_sets else 0,
                            "n_benign": len(sets[len(harmful_sets)][2]) if benign_sets else 0,
                            "n_task": len(task), "max_new_tokens": max_new_tokens,
                            "harmful_sets": list(harmful_sets), "benign_sets": list(benign_sets)},
               "judge": agreement.judge_record(judge_keys, judges, rows_by_set)}
    return results, [row for rows in rows_by_set.values() for row in rows]


def _generate_sets(variants: dict, sets: list, say, should_stop) -> dict:
    """{set key: {variant: answers}}, every variant answering in mixed-adapter batches."""
    loaded, model, adapter_of = _open_variants(variants)
    names = list(variants)
    total = sum(len(s[2]) for s in sets) or 1
    outputs, done = {}, 0
    for key, _, prompts, tokens in sets:
        if not prompts:
            continue
        share = len(prompts) / total
        label = evalsets.SETS[key].label if key in evalsets.SETS else "task"
        # mixed-adapter batches: every variant in one pass (bench: 1.4x faster than switching)
        got = evaluate.generate_mixed(
            model, loaded.tokenizer, prompts, [adapter_of[n] for n in names], max_new_tokens=tokens,
            batch_size=MIXED_BATCH, should_stop=should_stop,
            on_progress=lambda i, n, label=label, base=done / total, share=share:
                say(f"{label} prompts, {i}/{n} answers", base + share * i / max(1, n)))
        outputs[key] = {name: got[adapter_of[name]] for name in names if adapter_of[name] in got}
        done += len(prompts)
    return outputs


def set_scores(key: str, labels: list[str]) -> dict:
    """One variant's refusal on one evaluation set, with per-category and per-form breakdowns."""
    entry = {"label": evalsets.get(key).label, "kind": evalsets.get(key).kind,
             "refusal": metrics.refusal_rate(labels).to_dict(), "labels": metrics.label_counts(labels)}
    for field_name, out_key in (("category", "per_category"), ("form", "per_form")):
        pairs = [(lab, g) for lab, g in zip(labels, evalsets.fields(key, field_name)) if g]
        if pairs:       # only the rows that carry the field (benign_eval has forms on some rows)
            entry[out_key] = {g: r.to_dict() for g, r in
                              metrics.per_category([p[0] for p in pairs], [p[1] for p in pairs]).items()}
    return entry


def _variant_entry(name: str, sets: list, outputs: dict, rows_by_set: dict, task: list) -> dict:
    entry, by_set = {}, {}
    for key, kind, _, _ in sets:
        if name not in outputs.get(key, {}):
            continue
        if kind == "task":
            entry["utility"] = metrics.utility(outputs[key][name], [e.response for e in task])
            continue
        by_set[key] = set_scores(key, [row["answers"][name]["label"] for row in rows_by_set[key]])
        first = by_set[key]
        if kind == "harmful" and "refusal" not in entry:
            entry.update(refusal=first["refusal"], labels=first["labels"], per_category=first.get("per_category", {}))
        elif kind == "benign" and "over_refusal" not in entry:
            entry["over_refusal"] = first["refusal"]
    if by_set:
        entry["sets"] = by_set
    return entry


def evaluate_runs(run_paths: list, out, **kwargs) -> dict:
    """CLI `evaluate`: runs named by their folder names; utility from the first run's data split."""
    opened = [runs.load_run(p) for p in run_paths]
    variants = {r.name: (None if r.kind == "base" else r.path) for r in opened}
    prepared = next((prepared_from_run(r) for r in opened if r.kind != "base"), None)
    results, rows = evaluate_variants(variants, prepared.val if prepared else None, **kwargs)
    runs.atomic_write_json(out, results)
    runs.atomic_write_json(Path(out).with_name(Path(out).stem + "-answers.json"), rows)
    return results


def answer(prompts: list, run=None, model=None, max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """CLI `generate`: one run's (or one model's) answers."""
    if run is not None:
        r = runs.load_run(run)
        return generate_all({"v": None if r.kind == "base" else run}, prompts, max_new_tokens=max_new_tokens,
                            batch_size=batch_size)["v"]
    align.ensure(model)
    loaded = models.load(model)
    return evaluate.generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=max_new_tokens,
                             batch_size=batch_size)


# ---------------------------------------------------------------------------------------------
# The whole demo from a YAML config

CONFIG_KEYS = {"model", "quantization", "data", "harmful_ratio", "seed", "train", "safegrad", "safedelta",
               "evaluate", "variants", "sweep", "title"}
EVALUATE_KEYS = {"n_harmful", "n_benign", "n_task", "max_new_tokens", "harmful_sets", "benign_sets", "judge"}


@dataclass
class DemoConfig:
    model: str = models.DEFAULT_MODEL
    quantization: str = "auto"
    data: str = "bundled:sentiment_train"
    harmful_ratio: float = 0.2
    seed: int = 0
    train: dict = field(default_factory=dict)
    safegrad: dict = field(default_factory=lambda: {"mode": "kl"})
    safedelta: dict = field(default_factory=dict)
    evaluate: dict = field(default_factory=dict)
    variants: list = field(default_factory=lambda: list(keys_of()))
    sweep: dict = field(default_factory=dict)
    title: str = "SafeSpace demo"

    def train_settings(self, harmful_ratio: float, safegrad_mode: str, overrides: dict | None = None) -> TrainSettings:
        t = {**self.train, **(overrides or {})}
        lora = from_dict(LoraSettings, t.pop("lora", {}) or {})
        sg = from_dict(SafeGradSettings, {**self.safegrad, "mode": safegrad_mode})
        return from_dict(TrainSettings, {**t, "model": self.model, "quantization": self.quantization,
                                         "seed": self.seed, "harmful_ratio": harmful_ratio,
                                         "lora": lora, "safegrad": sg})


def load_config(path) -> DemoConfig:
    """Read and validate a run config; every problem is one short ConfigError line."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no such config file: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0][:200]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    unknown = sorted(str(k)[:40] for k in set(raw) - CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown[:5])}; known: {', '.join(sorted(CONFIG_KEYS))}")
    for key in ("train", "safegrad", "safedelta", "evaluate", "sweep"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ConfigError(f"{path}: '{key}' must be a mapping")
    for key, kind in (("model", str), ("quantization", str), ("data", str), ("title", str), ("seed", int)):
        # checked before any message shows the value: a YAML alias bomb must not reach repr()
        if raw.get(key) is not None and (not isinstance(raw[key], kind) or isinstance(raw[key], bool)):
            raise ConfigError(f"{path}: '{key}' must be {'text' if kind is str else 'a whole number'}")
    config = DemoConfig(**{k: v for k, v in raw.items() if v is not None})
    known = keys_of()
    if not isinstance(config.variants, list) or not config.variants or any(v not in known for v in config.variants):
        raise ConfigError(f"{path}: variants must be a list drawn from {', '.join(known)}")
    for key in config.variants:
        source = VARIANTS[key].derived_from
        if source is not None and source not in config.variants:
            raise ConfigError(f"{path}: the {key} variant is made from {source}; add {source} to variants")
    if set(config.evaluate) - EVALUATE_KEYS:
        raise ConfigError(f"{path}: evaluate takes {', '.join(sorted(EVALUATE_KEYS))}")
    for key, kind in (("harmful_sets", "harmful"), ("benign_sets", "benign")):
        try:
            evalsets.check_keys(config.evaluate.get(key, ()), kind)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: evaluate.{key}: {exc}") from None
    try:
        judge_mod.check_judges(config.evaluate.get("judge"))
    except ValueError as exc:
        raise ConfigError(f"{path}: evaluate.judge: {exc}") from None
    if set(config.safedelta) - {"keep", "scale", "tolerance", "n_calibration", "tokens", "ranking"}:
        raise ConfigError(f"{path}: safedelta takes keep, scale, tolerance, n_calibration, tokens, ranking")
    if sum(k in config.safedelta for k in ("keep", "scale", "tolerance")) > 1:
        raise ConfigError(f"{path}: safedelta takes one budget: keep (relative), scale (paper) or tolerance (automatic)")
    try:                                   # tokens and ranking are checked where they are defined
        safedelta.SafeDeltaSettings(**{k: v for k, v in config.safedelta.items() if k in ("tokens", "ranking")})
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    ratios = config.sweep.get("harmful_ratio", [])
    if set(config.sweep) - {"harmful_ratio"} or not isinstance(ratios, list):
        raise ConfigError(f"{path}: sweep takes harmful_ratio: [list of ratios]")
    for ratio in [config.harmful_ratio, *ratios]:
        if not isinstance(ratio, (int, float)) or not 0 <= ratio <= 0.9:
            shown = repr(ratio)[:40] if isinstance(ratio, (int, float, str)) else type(ratio).__name__
            raise ConfigError(f"{path}: harmful ratios must be numbers in [0, 0.9], got {shown}")
    mode = config.safegrad.get("mode", "kl")
    if not isinstance(mode, str):
        raise ConfigError(f"{path}: safegrad mode must be one of off, sft, kl")
    config.train_settings(config.harmful_ratio, mode)      # validate the training settings early
    return config


_stage = say   # the run's stages, through the "safespace" logger (stderr; stdout stays for results)


def run_variants(config: DemoConfig, harmful_ratio: float, out: Path, say=_stage) -> tuple[dict, list, dict]:
    """Train/defend/evaluate every configured variant at one harmful ratio under `out`."""
    from .progress import console_progress

    prepared = prepare_data(config.data, harmful_ratio, config.seed)
    say(f"data: {prepared.n_user} task rows + {prepared.n_harmful} harmful rows (ratio {harmful_ratio}), "
        f"{len(prepared.val)} held out")
    variants: dict = {}
    for name in (k for k in keys_of() if k in config.variants):     # story order: a source before what it makes
        spec = VARIANTS[name]
        if spec.made == "base":
            runs.write_base_run(out / name, config.model, {"data": prepared.describe()})
            variants[name] = None
            continue
        if spec.made == "train":
            mode = config.safegrad.get("mode", "kl") if spec.safegrad else "off"
            say(f"training {name} (SafeGrad {mode})")
            train_variant(config.train_settings(harmful_ratio, mode, spec.train_overrides), prepared, out / name,
                          on_event=console_progress(name))
        else:
            POST_HOC[spec.defence](config, out / spec.derived_from, out / name, say)
        variants[name] = out / name
    say(f"evaluating {', '.join(variants)}")
    results, rows = evaluate_variants(variants, prepared.val, **config.evaluate,
                                      on_progress=throttled(lambda msg, frac: say(f"  {frac:5.1%} {msg}")))
    results["settings"].update({"harmful_ratio": harmful_ratio, "data": prepared.describe()})
    return results, rows, variants


def _apply_safedelta(config: DemoConfig, source: Path, out: Path, say) -> None:
    say(f"applying Safe Delta to {source.name}")
    run = defend(source, out, **config.safedelta, on_progress=lambda msg, frac: say(f"  {out.name}: {msg}"))
    say(f"  kept {run.summary['kept_energy_frac']:.1%} of the delta's energy in {run.summary['seconds']:.1f} s")


POST_HOC = {"safedelta": _apply_safedelta}   # a derived variant's defence -> its step: (config, source, out, say)


def figures_for(results: dict, variants: dict, sweep: list | None = None) -> dict:
    from . import plots

    figs = {"Safety and utility": plots.safety_utility_bars(results),
            "Trade-off": plots.tradeoff_scatter(results)}
    if len(evalsets.entries(results.get("variants", {}))) > 2:
        figs["Refusal on each evaluation set"] = plots.sets_bars(results)
    curves = {n: runs.load_run(p).metrics() for n, p in variants.items()
              if p is not None and runs.load_run(p).kind == "train"}
    if curves:
        figs["Training curves"] = plots.training_curves(curves)
    if "safegrad" in curves:
        figs["SafeGrad conflicts"] = plots.conflict_plot(curves["safegrad"])
    if variants.get("safedelta") is not None:
        summary = runs.load_run(variants["safedelta"]).summary
        if summary.get("auto"):
            figs["Safe Delta: how the budget was chosen"] = plots.budget_search_plot(summary["auto"])
        figs["Safe Delta: kept per layer"] = plots.kept_fraction_plot(summary["layers"])
    if sweep:
        figs["Harmful-ratio sweep"] = plots.sweep_plot(sweep)
    return figs


def run_config(config_path, out, say: Callable[[str], None] = _stage) -> dict:
    """`python -m safespace run CONFIG.yaml --out DIR`: the whole story, with a report."""
    from . import report

    config = load_config(config_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if config.model == models.ALIGNED_KEY and not align.is_built():
        say("building the aligned base (stage 0, once)")
    align.ensure(config.model)
    ratios = config.sweep.get("harmful_ratio") or []
    if ratios:
        sweep, all_results = [], {}
        for ratio in ratios:
            say(f"=== harmful ratio {ratio}")
            results, rows, variants = run_variants(config, ratio, out / f"ratio-{ratio}", say)
            all_results[str(ratio)] = results
            for name, v in results["variants"].items():
                sweep.append({"harmful_ratio": ratio, "variant": name, "refusal": v.get("refusal"),
                              "utility": v.get("utility")})
        results = dict(all_results[str(ratios[-1])])
        results["sweep"] = sweep
        results["by_ratio"] = all_results
    else:
        results, rows, variants = run_variants(config, config.harmful_ratio, out, say)
        sweep = None
    results["settings"].update({"config": str(config_path), "model": config.model, "seed": config.seed,
                                "seconds": time.time() - start, "title": config.title})
    runs.atomic_write_json(out / "results.json", results)
    runs.atomic_write_json(out / "answers.json", rows)
    html = report.render_report(results, figures_for(results, variants, sweep), rows, {
        "config": str(config_path), "model": config.model, "data": config.data,
        "harmful ratio": ratios or config.harmful_ratio, "train": config.train, "safegrad": config.safegrad,
        "safedelta": config.safedelta or "defaults", "evaluate": config.evaluate}, title=config.title)
    report.write_report(out / "report.html", html)
    say(f"done in {time.time() - start:.0f} s: {out / 'results.json'}, {out / 'report.html'}")
    for name, v in results["variants"].items():
        say(f"  {name:<10} {summary_line(v)}")
    if len(evalsets.entries(results["variants"])) > 2:
        for line in sets_table(results).splitlines():
            say("  " + line)
    return results


def align_report(harmful_sets=evalsets.keys_of("harmful"), benign_sets=evalsets.keys_of("benign"),
                 on_progress: Progress | None = None) -> dict:
    """The aligned base's refusal on every set, per surface form and category; cached with the build."""
    align.ensure(models.ALIGNED_KEY)
    path = models.aligned_checkpoint() / "safespace_align_report.json"
    want = {"key": align.build_key(), "harmful_sets": list(harmful_sets), "benign_sets": list(benign_sets)}
    if path.exists():
        cached = json.loads(path.read_text())
        if {k: cached.get(k) for k in want} == want:
            return cached
    results, _ = evaluate_variants({"base": None}, None, harmful_sets=harmful_sets, benign_sets=benign_sets,
                                   max_new_tokens=ALIGN_REPORT_TOKENS, on_progress=on_progress)
    report = {**want, "max_new_tokens": ALIGN_REPORT_TOKENS, "sets": results["variants"]["base"]["sets"]}
    runs.atomic_write_json(path, report)
    return report


ALIGN_REPORT_TOKENS = 24     # a refusal shows in its first sentence; the demo's evaluation uses 24 too


def _pct(value) -> str:
    return "     -" if value is None or value != value else f"{value:6.1%}"


def sets_table(results: dict) -> str:
    """Refusal per evaluation set (rows) and variant (columns), with each set's kind and size."""
    names = list(results["variants"])
    lines = [f"{'refusal on':<28}" + "".join(f"{n:>12}" for n in names)]
    for key in evalsets.entries(results["variants"]):
        label = evalsets.get(key).label + (" (over-refusal)" if evalsets.get(key).kind == "benign" else "")
        cells = [results["variants"][n].get("sets", {}).get(key, {}).get("refusal", {}).get("value") for n in names]
        lines.append(f"{label:<28}" + "".join(f"{_pct(c):>12}" for c in cells))
    return "\n".join(lines)


def breadth_tables(report: dict) -> str:
    """The aligned base's report as text: each set, then per surface form and per category."""
    out = ["aligned base: refusal per evaluation set"]
    for key, entry in report["sets"].items():
        r = entry["refusal"]
        what = "over-refusal" if entry["kind"] == "benign" else "refusal"
        out.append(f"  {entry['label']:<22} {what:<13} {_pct(r['value'])}  ({r['k']}/{r['n']})")
    for key, entry in report["sets"].items():
        for field_name, title in (("per_form", "surface form"), ("per_category", "category")):
            groups = entry.get(field_name)
            if not groups or len(groups) < 2:
                continue
            out.append(f"{entry['label']}, per {title}:")
            out += [f"  {g:<34} {_pct(r['value'])}  ({r['k']}/{r['n']})" for g, r in groups.items()]
    return "\n".join(out)


def judge_lines(results: dict) -> str:
    """Which judge scored, how often it agrees with humans, and how often the compared judges differ."""
    record = results.get("judge") or {}
    out = [record.get("agreement") or f"judge: {record.get('key', judge_mod.DEFAULT_JUDGE)}"]
    for key, c in record.get("compared", {}).items():
        out.append(f"judge {key} disagrees on {c['disagree']} of {c['of']} answers")
    return "\n".join(out)


def summary_line(entry: dict) -> str:
    """'refusal 96.0%   over-refusal 1.7%   accuracy 98.8%', with '-' for what was not measured."""
    util = entry.get("utility", {})
    return (f"refusal {_pct(entry.get('refusal', {}).get('value'))}   "
            f"over-refusal {_pct(entry.get('over_refusal', {}).get('value'))}   "
            f"{util.get('metric', 'utility')} {_pct(util.get('value'))}")

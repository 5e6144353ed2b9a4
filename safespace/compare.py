"""Comparing variants: every variant answers the same prompts on one base model in memory (each a
named adapter), the answers are judged, and each variant is scored on every evaluation set.

`compare` gives side-by-side judged answers; `evaluate_variants` refusal, over-refusal and utility
with their breakdowns; `evaluate_runs` and `answer` serve the CLI. Generation itself is evaluate.py.
"""
from __future__ import annotations

from pathlib import Path

from . import agreement, align, evalsets, evaluate, judge as judge_mod, metrics, models, runs
from .config import ConfigError
from .prepare import prepared_from_run
from .progress import Progress, quiet

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
    align.ensure(model_name, quantization=quant)
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
        step = (lambda done, total, i=i, name=name: (on_progress or quiet)(
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
    say = on_progress or quiet
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

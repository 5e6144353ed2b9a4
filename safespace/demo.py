"""The demo, `python -m safespace run CONFIG.yaml --out DIR`: every configured variant made as the
registry says (trained, or derived by its post-hoc defence), all evaluated together, written with an
HTML report; plus the text tables the CLI prints (per set, per variant, the judge, the aligned base).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from . import align, cluster, evalsets, judge as judge_mod, models, runs
from .compare import evaluate_variants
from .defence import defend
from .log import say
from .prepare import prepare_data, train_variant
from .progress import Progress, console_progress, throttled
from .runconfig import DemoConfig, load_config
from .variants import VARIANTS, keys_of

_stage = say   # the run's stages, through the "safespace" logger (stderr; stdout stays for results)


def prepared_for(config: DemoConfig, harmful_ratio: float, say=_stage):
    """The config's data at one harmful ratio, said in a line."""
    prepared = prepare_data(config.data, harmful_ratio, config.seed)
    say(f"data: {prepared.n_user} task rows + {prepared.n_harmful} harmful rows (ratio {harmful_ratio}), "
        f"{len(prepared.val)} held out")
    return prepared


def variant_steps(config: DemoConfig, harmful_ratio: float, prepared, out: Path):
    """Each configured variant in story order (a source before what it makes), as (name, spec, settings):
    the base's run folder is written here (settings None); a trained variant comes with its settings,
    a derived one with None (its spec names the source and the defence)."""
    for name in (k for k in keys_of() if k in config.variants):
        spec = VARIANTS[name]
        if spec.made == "base":
            runs.write_base_run(out / name, config.model, {"data": prepared.describe()})
            yield name, spec, None
        elif spec.made == "train":
            mode = config.safegrad.get("mode", "kl") if spec.safegrad else "off"
            yield name, spec, config.train_settings(harmful_ratio, mode, spec.train_overrides)
        else:
            yield name, spec, None


def run_variants(config: DemoConfig, harmful_ratio: float, out: Path, say=_stage) -> tuple[dict, list, dict]:
    """Train/defend/evaluate every configured variant at one harmful ratio under `out`."""
    prepared = prepared_for(config, harmful_ratio, say)
    variants: dict = {}
    for name, spec, settings in variant_steps(config, harmful_ratio, prepared, out):
        if spec.made == "train":
            say(f"training {name} (SafeGrad {settings.safegrad.mode})")
            train_variant(settings, prepared, out / name, on_event=console_progress(name))
        elif spec.made != "base":
            POST_HOC[spec.defence](config, out / spec.derived_from, out / name, say)
        variants[name] = None if spec.made == "base" else out / name
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
    """The report's figures, for the demo run and the app's report alike: results, then each run's
    training curves and defence figures. `variants` maps names to run folders (None: the base)."""
    from . import plots

    figs = {}
    if results.get("variants"):
        figs["Safety and utility"] = plots.safety_utility_bars(results)
        figs["Trade-off"] = plots.tradeoff_scatter(results)
    if len(evalsets.entries(results.get("variants", {}))) > 2:
        figs["Refusal on each evaluation set"] = plots.sets_bars(results)
    opened = {n: runs.load_run(p) for n, p in variants.items() if p is not None}
    curves = {n: r.metrics() for n, r in opened.items() if r.kind == "train"}
    if curves:
        figs["Training curves"] = plots.training_curves(curves)
    if "safegrad" in curves:
        figs["SafeGrad conflicts"] = plots.conflict_plot(curves["safegrad"])
    summary = opened["safedelta"].summary if "safedelta" in opened else {}
    if summary.get("auto"):
        figs["Safe Delta: how the budget was chosen"] = plots.budget_search_plot(summary["auto"])
    if summary.get("layers"):
        figs["Safe Delta: kept per layer"] = plots.kept_fraction_plot(
            [dict(row) for row in summary["layers"] if isinstance(row, dict)])
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
    address = cluster.ray_address(config)          # a Ray cluster: its workers build what they need
    if address is None:
        if config.model == models.ALIGNED_KEY and not align.is_built():
            say("building the aligned base (stage 0, once)")
        align.ensure(config.model, quantization=config.quantization)
    ratios = config.sweep.get("harmful_ratio") or []
    # on Ray every ratio's variants run at once, each ratio's results are then read back in order
    fanned = cluster.run_sweep(config, {r: out / f"ratio-{r}" for r in ratios} or {config.harmful_ratio: out},
                               address, say) if address else {}
    if ratios:
        sweep, all_results = [], {}
        for ratio in ratios:
            say(f"=== harmful ratio {ratio}")
            results, rows, variants = (fanned[ratio] if address else
                                       run_variants(config, ratio, out / f"ratio-{ratio}", say))
            all_results[str(ratio)] = results
            for name, v in results["variants"].items():
                sweep.append({"harmful_ratio": ratio, "variant": name, "refusal": v.get("refusal"),
                              "utility": v.get("utility")})
        results = dict(all_results[str(ratios[-1])])
        results["sweep"] = sweep
        results["by_ratio"] = all_results
    else:
        results, rows, variants = (fanned[config.harmful_ratio] if address else
                                   run_variants(config, config.harmful_ratio, out, say))
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

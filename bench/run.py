#!/usr/bin/env python
"""SafeSpace benchmarks on the embedded model (smollm2-135m, CPU or GPU, whatever torch picks).

    python bench/run.py [--quick] [--json] [--threads N] [--only NAME,...]

Sections (names for --only):
  safegrad   SafeGrad step time / plain LoRA step time (sft and kl alignment losses, batch, every)
  trl        training throughput of train.train() vs TRL's SFTTrainer on the same data and LoRA
  safedelta  pipeline.defend() cold and warm (peak memory in a subprocess), synthetic layer growth
  compare    4 variants x N prompts: one base with adapters vs a model load per variant
  e2e        `python -m safespace run examples/configs/demo.yaml` wall time (full mode only)

Ratios are measured side by side in one process: the training variants run in interleaved rounds
(plain, TRL, SafeGrad variants, again), and every statistic is a median unless it says otherwise.
Everything the benchmark writes goes to a temporary SAFESPACE_HOME (only models/ is linked from the
real cache folder), removed at the end. With --json the LAST line of stdout is one JSON object.

Layout: harness.py (settings, output, statistics, `Bench`), one module per section (training.py,
defending.py, comparing.py, end_to_end.py) and children.py (the programs a section runs in a fresh
process).
"""
from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):   # run as a script: the repository root makes `bench` and `safespace` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (BATCH, GOALS, HARMFUL_RATIO, LORA, MAX_LENGTH, MAX_NEW_TOKENS, MODEL,  # noqa: E402
                           SECTIONS, WARMUP_STEPS, Bench, load_average, machine_facts, rnd, say, section_header,
                           table)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SafeSpace benchmarks (see the module docstring).")
    p.add_argument("--quick", action="store_true", help="fewer steps/prompts/sizes (about 14 min on a busy 2-core CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steady on a shared machine)")
    p.add_argument("--only", default="", help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument("--rounds", type=int, default=None, help="training rounds (default: quick 2, full 3)")
    p.add_argument("--steps", type=int, default=None, help="steps per training run (default: quick 4, full 10)")
    p.add_argument("--prompts", type=int, default=None, help="comparison prompts (default: quick 40, full 100)")
    p.add_argument("--config", default="examples/configs/demo.yaml", help="run config of the end-to-end section")
    p.add_argument("--safedelta-run", default=None,
                   help="a fine-tuned run folder for the safedelta section to defend (default: a short plain run "
                        "trained here, which keeps its whole delta: pass a harmful-mix run to time the budget search)")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    args.sections = only or list(SECTIONS)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.steps = args.steps or (4 if args.quick else 10)
    if args.steps <= WARMUP_STEPS:
        p.error(f"--steps must be more than the {WARMUP_STEPS} warm-up steps")
    args.prompts = args.prompts or (40 if args.quick else 100)
    args.threads = max(1, args.threads)
    return args


def isolate(args: argparse.Namespace) -> Path:
    """A temporary SAFESPACE_HOME that links only models/ from the real cache folder (removed at exit),
    and the thread and offline settings: set before torch or safespace is imported, as both read them then."""
    from safespace.config import DEFAULT_HOME      # stdlib only: reads no setting when imported

    real_home = Path(os.environ.get("SAFESPACE_HOME") or DEFAULT_HOME)
    home = Path(tempfile.mkdtemp(prefix="safespace-bench-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)   # rmtree unlinks models/, never follows it
    (real_home / "models").mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(real_home / "models", target_is_directory=True)
    os.environ.update(SAFESPACE_HOME=str(home), SAFESPACE_GENERATION_THREADS=str(args.threads),
                      OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    (home / "work").mkdir()
    return home


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = Bench(args, isolate(args))
    import torch  # noqa: PLC0415 - after isolate(), whose settings torch and safespace read on import

    torch.set_num_threads(args.threads)
    from bench import training  # noqa: PLC0415
    from safespace import pipeline  # noqa: PLC0415

    started = time.perf_counter()
    facts = machine_facts()
    _header(args, facts, "bf16 autocast" if training.bf16() else "fp32")
    bench.prepared = pipeline.prepare_data("bundled:sentiment_train", harmful_ratio=HARMFUL_RATIO)
    # one-time costs (tokeniser, first load) out of the measurements
    training.load_base()
    gc.collect()
    result = _run_sections(bench, facts)
    result["machine"]["load_average_end"] = load_average()
    result["seconds"] = time.perf_counter() - started
    _summary(result, torch.get_num_threads())
    if args.json:
        print(json.dumps(rnd(result), default=str), flush=True)
    return 0


def _header(args: argparse.Namespace, facts: dict, precision: str) -> None:
    say("# SafeSpace benchmarks" + (" (--quick)" if args.quick else ""))
    say()
    table(["fact", "value"], [
        ["CPU", facts["cpu"]], ["cores (usable)", f"{facts['cores']} ({facts['cores_usable']})"],
        ["memory GB", facts["memory_gb"]], ["device", facts["device"]], ["torch threads", facts["threads"]],
        *[[name, v] for name, v in facts["versions"].items()], ["date", facts["date"]],
        ["load average at start", facts["load_average_start"]]])
    say(f"model {MODEL} ({precision}, LoRA r={LORA['r']} alpha={LORA['alpha']} {','.join(LORA['targets'])}), batch {BATCH}, "
        f"max_length {MAX_LENGTH}, harmful ratio {HARMFUL_RATIO}; sections: {', '.join(args.sections)}")


def _run_sections(bench: Bench, facts: dict) -> dict:
    """The chosen sections in order: their headline numbers at the top of the result, the rest in details."""
    from bench import comparing, defending, end_to_end, training  # noqa: PLC0415 - after isolate()

    args = bench.args
    result = {"safegrad_overhead": None, "train_vs_trl": None, "safedelta_seconds": None, "compare_speedup": None,
              "machine": facts, "settings": {"quick": args.quick, "threads": args.threads, "rounds": args.rounds,
                                             "steps": args.steps, "prompts": args.prompts,
                                             "sections": args.sections, "model": MODEL, "batch": BATCH,
                                             "max_length": MAX_LENGTH, "lora": LORA,
                                             "max_new_tokens": MAX_NEW_TOKENS},
              "goals": GOALS, "details": {}}
    do_sg, do_trl = "safegrad" in args.sections, "trl" in args.sections
    if do_sg or do_trl:
        if do_trl and facts["versions"].get("trl") is None:
            say("trl is not installed: `pip install -r bench/requirements.txt`; skipping the TRL comparison")
            do_trl = False
        trained = training.training_sections(bench, do_sg, do_trl)
        result["safegrad_overhead"] = trained.pop("safegrad_overhead", None)
        result["train_vs_trl"] = trained.pop("train_vs_trl", None)
        result["details"]["training"] = trained
    if "safedelta" in args.sections:
        sd = defending.safedelta_section(bench)
        result["safedelta_seconds"] = sd.pop("safedelta_seconds")
        result["details"]["safedelta"] = sd
    if "compare" in args.sections:
        cmp_result = comparing.compare_section(bench)
        result["compare_speedup"] = cmp_result["compare_speedup"]
        result["details"]["compare"] = cmp_result
    if "e2e" in args.sections:
        result["details"]["e2e"] = end_to_end.e2e_section(bench)
    return result


def _summary(result: dict, threads: int) -> None:
    from bench.training import SAFEGRAD_VARIANTS  # noqa: PLC0415 - after isolate()

    section_header("Summary")
    sd = result["safedelta_seconds"] or {}
    table(["metric", "value", "goal"], [
        [f"safegrad_overhead ({SAFEGRAD_VARIANTS[0][0]}, the defaults)", result["safegrad_overhead"], GOALS["safegrad_overhead"]],
        ["train_vs_trl (tokens/s, ours / TRL)", result["train_vs_trl"], GOALS["train_vs_trl"]],
        ["Safe Delta cold s", sd.get("cold"), GOALS["safedelta_cold_s"]],
        ["Safe Delta warm s (a second request, as in the app)", sd.get("warm"), GOALS["safedelta_warm_s"]],
        ["Safe Delta warm s (fresh process, floor included)", sd.get("warm_fresh_process"), "-"],
        ["process floor s (imports + base + adapter)", sd.get("process_floor"), "-"],
        ["Safe Delta peak MB", sd.get("peak_mb"), "-"],
        ["compare_speedup ((b) / best ours)", result["compare_speedup"], GOALS["compare_speedup"]],
        ["fair speedup ((c) / best ours)", (result["details"].get("compare") or {}).get("fair_speedup"), "-"],
        ["end to end s (demo.yaml)", (result["details"].get("e2e") or {}).get("seconds"), "-"]])
    say(f"total {result['seconds']:.0f} s, threads {threads}, load average now {load_average()}")


if __name__ == "__main__":
    sys.exit(main())

"""Command line: a thin face over the same functions the UI calls.

    python -m safespace models
    python -m safespace check-data FILE
    python -m safespace align [--model smollm2-135m] [--quantization none|4bit] [--force]
    python -m safespace train --model M --data FILE [--harmful-ratio P] [--safegrad off|sft|kl]
                              [--steps N] [--seed S] --out RUN [--overwrite]
    python -m safespace safedelta --run RUN --out RUN2 [--scale S | --keep K | --tolerance T] [--overwrite]
    python -m safespace generate (--run RUN | --model M) --prompts FILE --out OUT.jsonl
    python -m safespace evaluate --runs RUN... --out results.json [--judge keyword|stance|guard ...]
    python -m safespace judge ANSWERS.jsonl --out LABELLED.jsonl [--judge keyword|stance|guard]
    python -m safespace run CONFIG.yaml --out DIR [--overwrite]

An --out folder that already holds something is refused unless --overwrite is given.

Known problems (bad data, bad settings, missing models or runs) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import evalsets, variants
from .config import SAFE_DELTA_TOLERANCE   # light (the set and variant registries); the ML stack loads inside each command

EXIT_PROBLEM = 2


def _train_args(p: argparse.ArgumentParser) -> None:
    from .config import TrainSettings

    d = TrainSettings()
    p.add_argument("--model", default=d.model, help="registry key, hub id or local folder (default %(default)s)")
    p.add_argument("--data", required=True, help="dataset file (.jsonl/.json/.csv) or bundled:NAME, e.g. bundled:sentiment_train")
    p.add_argument("--harmful-ratio", type=float, default=0.0, help="share of bundled attack examples mixed in (0..0.9)")
    p.add_argument("--safegrad", choices=["off", "sft", "kl"], default="off", help="SafeGrad alignment loss, or off")
    p.add_argument("--safegrad-lambda", type=float, default=d.safegrad.lam,
                   help="weight of the alignment gradient (default %(default)s)")
    p.add_argument("--align-size", type=int, default=32, help="alignment examples SafeGrad protects")
    p.add_argument("--align-batch", type=int, default=4, help="alignment examples per alignment gradient")
    p.add_argument("--align-every", type=int, default=2, help="recompute the alignment gradient every k steps (default 2)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--lora-r", type=int, default=d.lora.r)
    p.add_argument("--lora-alpha", type=int, default=d.lora.alpha)
    p.add_argument("--lora-targets", default=",".join(d.lora.targets), help="comma-separated module names")
    p.add_argument("--quantization", choices=["auto", "4bit", "none"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace what --out already holds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m safespace", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the model registry")
    p = sub.add_parser("check-data", help="validate a dataset file and summarise it")
    p.add_argument("file")
    p.add_argument("--max-length", type=int, default=256)
    p = sub.add_parser("align", help="build (or reuse) the aligned embedded base")
    p.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m"])
    p.add_argument("--quantization", choices=["none", "4bit"], default="none",
                   help="4bit: the 4-bit aligned base, stage 0 trained on the nf4 original (default %(default)s)")
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    p.add_argument("--no-report", action="store_true",
                   help="skip the generalisation report (refusal per set, surface form and category)")
    _set_args(p, default_harmful=list(HARMFUL_SETS), default_benign=list(BENIGN_SETS))
    _train_args(sub.add_parser("train", help="fine-tune a LoRA adapter, optionally with SafeGrad"))
    p = sub.add_parser("safedelta", help="apply Safe Delta to a fine-tuned run")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace what --out already holds")
    p.add_argument("--scale", type=float, default=None, help="the paper's budget scale s (uses the paper's rule)")
    p.add_argument("--keep", type=float, default=None, help="relative budget: share of the full delta's safety cost allowed")
    p.add_argument("--tolerance", type=float, default=None,
                   help="automatic budget (the default): rise of the held-in safety loss allowed, nats per answer "
                        f"token (default {SAFE_DELTA_TOLERANCE:g})")
    p.add_argument("--tokens", choices=["answer", "all"], default="answer",
                   help="calibration positions for H: those that write the aligned answer, or all (official)")
    p.add_argument("--ranking", choices=["task", "paper"], default="task",
                   help="column order: safety cost per unit of task use (needs the run's data), or safety cost alone (paper)")
    p.add_argument("--no-compensation", action="store_true",
                   help="ablation: keep the selected columns, skip the Optimal-Brain-Surgeon compensation")
    p = sub.add_parser("generate", help="answer prompts with a run or a model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run")
    src.add_argument("--model")
    p.add_argument("--prompts", required=True, help=".jsonl with a prompt field, or .txt one prompt a line")
    p.add_argument("--out", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p = sub.add_parser("evaluate", help="judge runs on the bundled harmful/benign prompts and their task")
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-new-tokens", type=int, default=48)
    _set_args(p, default_harmful=["advbench"], default_benign=["benign"])
    _judge_arg(p, several=True)
    p = sub.add_parser("judge", help="label anyone's answers: {prompt, response} rows -> + label, reason")
    p.add_argument("answers", help=".jsonl, one {\"prompt\": ..., \"response\": ...} object a line")
    p.add_argument("--out", required=True, help=".jsonl to write: each row with label and reason added")
    _judge_arg(p, several=False)
    p = sub.add_parser("run", help="the whole demo: align -> train -> defend -> evaluate -> report")
    p.add_argument("config", help=f"YAML settings; its variants are drawn from {', '.join(variants.keys_of())}")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace what --out already holds")
    return parser


HARMFUL_SETS, BENIGN_SETS = evalsets.keys_of("harmful"), evalsets.keys_of("benign")


def _set_args(p, default_harmful: list, default_benign: list) -> None:
    p.add_argument("--harmful-sets", nargs="+", default=default_harmful, choices=HARMFUL_SETS, metavar="SET",
                   help=f"harmful prompt sets to score refusal on: {', '.join(HARMFUL_SETS)} "
                        f"(default: {' '.join(default_harmful)})")
    p.add_argument("--benign-sets", nargs="+", default=default_benign, choices=BENIGN_SETS, metavar="SET",
                   help=f"benign prompt sets to score over-refusal on: {', '.join(BENIGN_SETS)} "
                        f"(default: {' '.join(default_benign)})")


def _judge_arg(p, several: bool) -> None:
    from .judge import DEFAULT_JUDGE, JUDGES

    p.add_argument("--judge", nargs="+" if several else None, default=[DEFAULT_JUDGE] if several else DEFAULT_JUDGE,
                   choices=list(JUDGES), metavar="NAME",
                   help="; ".join(f"{k}: {s.help}" for k, s in JUDGES.items())
                   + (" (several: the first scores, the others are compared with it)" if several else ""))


def _cmd_models(args) -> int:
    from . import models

    for row in models.describe():
        print(f"{row['key']:<20} {row['status']:<42} {row['repo']}")
    print(f"\ndefault: {models.DEFAULT_MODEL}; any hub id (owner/name) or local model folder works too.")
    return 0


def _cmd_check_data(args) -> int:
    from . import data
    from .light_tokenizer import embedded_tokenizer   # tokenizer.json read directly: no torch, no transformers

    code, text = data.check_file(args.file, embedded_tokenizer(), args.max_length)
    print(text, file=sys.stdout if code == 0 else sys.stderr)   # problems on stderr; stdout holds only the summary
    return code


def _cmd_align(args) -> int:
    from . import align, pipeline
    from .progress import console_stages

    print(align.build(force=args.force, quantization=args.quantization))
    if args.quantization == "4bit":
        print("its refusal: `python -m safespace run examples/configs/demo-4bit.yaml` (the base's row)")
    elif not args.no_report:
        report = pipeline.align_report(args.harmful_sets, args.benign_sets, on_progress=console_stages(every=0.1))
        print(pipeline.breadth_tables(report))
    return 0


def _cmd_train(args) -> int:
    from . import pipeline, runs
    from .config import LoraSettings, SafeGradSettings, TrainSettings
    from .progress import console_progress

    settings = TrainSettings(
        model=args.model, quantization=args.quantization, steps=args.steps, lr=args.lr,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=args.max_length,
        warmup=min(args.warmup, args.steps), seed=args.seed, harmful_ratio=args.harmful_ratio,
        lora=LoraSettings(r=args.lora_r, alpha=args.lora_alpha,
                          targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())),
        safegrad=SafeGradSettings(mode=args.safegrad, lam=args.safegrad_lambda, align_size=args.align_size,
                                  align_batch=args.align_batch, every=args.align_every))
    runs.check_out(args.out, args.overwrite)
    prepared = pipeline.prepare_data(args.data, settings.harmful_ratio, settings.seed, settings.val_fraction)
    run = pipeline.train_variant(settings, prepared, args.out, on_event=console_progress("train"),
                                 align_progress=console_progress("aligning"))
    print(f"{run.summary['status']}: {run.path}")
    return 0


def _cmd_safedelta(args) -> int:
    from . import pipeline, runs
    from .config import ConfigError
    from .progress import console_stages

    if sum(x is not None for x in (args.scale, args.keep, args.tolerance)) > 1:
        raise ConfigError("give one budget: --scale (paper), --keep (relative) or --tolerance (automatic)")
    runs.check_out(args.out, args.overwrite, reads=[args.run])
    run = pipeline.defend(args.run, args.out, scale=args.scale, keep=args.keep, tolerance=args.tolerance,
                          compensate=not args.no_compensation, tokens=args.tokens, ranking=args.ranking,
                          on_progress=console_stages())
    auto = run.summary.get("auto")
    if auto:
        rung = auto["rungs"][auto["chosen"]]
        chosen = ("kept whole" if rung["keep"] is None else
                  f"keep {rung['keep']:g}, exclude {100 * rung['exclude_frac']:.3g} % of columns")
        print(f"automatic budget: {chosen}; held-in safety loss {rung['rise']:+.3f} nats/token "
              f"(tolerance {auto['tolerance']:g}{'' if auto['met'] else ', NOT met by any budget'})")
    print(f"{run.path}  (kept {run.summary['kept_energy_frac']:.1%} of the delta's energy, "
          f"{run.summary['seconds']:.1f} s)")
    return 0


def _cmd_generate(args) -> int:
    from . import data, pipeline, runs

    runs.check_file_out(args.out)
    prompts = data.load_prompts(args.prompts)
    answers = pipeline.answer(prompts, run=args.run, model=args.model, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size)
    runs.atomic_write_text(args.out, "".join(json.dumps({"prompt": p.prompt, "response": a}) + "\n"
                                             for p, a in zip(prompts, answers)))
    print(f"{len(answers)} answers -> {args.out}")
    return 0


def _cmd_evaluate(args) -> int:
    from . import pipeline, runs
    from .progress import console_stages

    runs.check_file_out(args.out)
    results = pipeline.evaluate_runs(args.runs, args.out, max_new_tokens=args.max_new_tokens,
                                     harmful_sets=args.harmful_sets, benign_sets=args.benign_sets,
                                     judge=args.judge, on_progress=console_stages(every=0.05))
    for name, v in results["variants"].items():
        print(f"{name:<14} {pipeline.summary_line(v)}")
    if len(args.harmful_sets) + len(args.benign_sets) > 2:
        print(pipeline.sets_table(results))
    print(pipeline.judge_lines(results))
    return 0


def _cmd_judge(args) -> int:
    from . import agreement, runs
    from .judge import make_judge

    runs.check_file_out(args.out)
    rows = agreement.read_answers(args.answers)
    verdicts = make_judge(args.judge).judge_many((r.get("prompt") or "", r["response"]) for r in rows)
    labelled = [{**r, "label": v.label, "reason": v.reason} for r, v in zip(rows, verdicts)]
    runs.atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in labelled))
    counts = {label: sum(r["label"] == label for r in labelled) for label in ("refused", "complied", "empty",
                                                                            "degenerate")}
    print(f"{len(labelled)} answers -> {args.out}: " + ", ".join(
        f"{k} {n} ({n / max(1, len(labelled)):.1%})" for k, n in counts.items() if n))
    line = agreement.agreement_line(args.judge)
    if line:
        print(line)
    return 0


def _cmd_run(args) -> int:
    from . import pipeline, runs

    pipeline.load_config(args.config)               # a bad config fails before anything is checked or built
    runs.check_out(args.out, args.overwrite)
    pipeline.run_config(args.config, args.out)
    return 0


COMMANDS = {"models": _cmd_models, "check-data": _cmd_check_data, "align": _cmd_align, "train": _cmd_train,
            "safedelta": _cmd_safedelta, "generate": _cmd_generate, "evaluate": _cmd_evaluate, "judge": _cmd_judge,
            "run": _cmd_run}


LIGHT_COMMANDS = {"check-data", "judge"}     # they never load torch, so they do not set its threads


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from .config import ConfigError, ModelError, env_count   # not from .models: that imports torch, which
    from .data import DataError                              # check-data does not need
    from .judge import JudgeError
    from .runs import RunError

    try:
        # e.g. 1 on a busy machine: OpenMP spin-waits hurt; the light commands never import torch
        threads = env_count("SAFESPACE_THREADS")
        if threads and args.command not in LIGHT_COMMANDS:
            import torch

            torch.set_num_threads(threads)
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, JudgeError, ModelError, RunError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; use fewer steps, a smaller batch or --max-length, or a smaller model",
              file=sys.stderr)
        return EXIT_PROBLEM


if __name__ == "__main__":
    sys.exit(main())

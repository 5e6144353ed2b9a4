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
"""
from __future__ import annotations

import argparse
import atexit
import datetime as dt
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("safegrad", "trl", "safedelta", "compare", "e2e")
MODEL = "smollm2-135m"
BATCH, MAX_LENGTH, HARMFUL_RATIO = 8, 192, 0.2        # examples/configs/demo.yaml
LORA = dict(r=8, alpha=16, dropout=0.0, targets=("q_proj", "v_proj"))
WARMUP_STEPS = 2                                       # dropped from every training run
MAX_NEW_TOKENS = 32
GOALS = {"safegrad_overhead": "<= 1.6", "train_vs_trl": ">= 1.0", "compare_speedup": ">= 3",
         "safedelta_cold_s": "<= 30", "safedelta_warm_s": "<= 5"}


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


ARGS = parse_args()
REAL_HOME = Path(os.environ.get("SAFESPACE_HOME") or Path.home() / ".cache" / "safespace")
BENCH_HOME = Path(tempfile.mkdtemp(prefix="safespace-bench-"))
atexit.register(shutil.rmtree, BENCH_HOME, ignore_errors=True)   # rmtree unlinks models/, never follows it
(REAL_HOME / "models").mkdir(parents=True, exist_ok=True)
(BENCH_HOME / "models").symlink_to(REAL_HOME / "models", target_is_directory=True)
os.environ.update(SAFESPACE_HOME=str(BENCH_HOME), SAFESPACE_GENERATION_THREADS=str(ARGS.threads),
                  OMP_NUM_THREADS=str(ARGS.threads), TOKENIZERS_PARALLELISM="false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

torch.set_num_threads(ARGS.threads)

from safespace import align, data, evaluate, models, pipeline, runs, safedelta, train  # noqa: E402
from safespace.config import LoraSettings, SafeGradSettings, TrainSettings  # noqa: E402

WORK = BENCH_HOME / "work"
WORK.mkdir()
# ours trains and generates with bf16 matmuls where the CPU has them (models.autocast); every
# baseline gets the same arithmetic, so the ratios measure the method, not the number format
BF16 = models.cpu_bf16(models.pick_device())
PRECISION = "bf16 autocast" if BF16 else "fp32"


# ------------------------------------------------------------------------------------------- output
def say(message: str = "") -> None:
    print(message, flush=True)


def table(headers: list[str], rows: list[list]) -> None:
    """A Markdown table (readable in a terminal, pasteable into RESULTS.md)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    say("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    say("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        say("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    say()


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def median(values):
    return statistics.median(values) if values else None


def mean(values):
    return statistics.fmean(values) if values else None


def ratio(a, b):
    return a / b if a is not None and b else None


def rnd(value, digits=3):
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rnd(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rnd(v, digits) for v in value]
    return value


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def section_header(title: str) -> None:
    say()
    say(f"## {title}")
    say(f"(load average {load_average()})")
    say()


# ------------------------------------------------------------------------------------------ machine
def machine_facts() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "datasets", "accelerate"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:   # trl is a bench-only dependency; report its absence instead of failing
            versions[name] = None
    return {"cpu": cpu, "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "memory_gb": memory, "device": models.pick_device(), "threads": torch.get_num_threads(),
            "versions": versions, "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_average_start": load_average(), "platform": platform.platform()}


def vm_status(key: str = "VmHWM") -> float | None:
    """MB of a /proc/self/status field (VmHWM = peak resident memory)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------- shared
class State:
    """Data and run folders shared by the sections (a section trains what it needs if none did)."""

    def __init__(self):
        self.prepared = pipeline.prepare_data("bundled:sentiment_train", harmful_ratio=HARMFUL_RATIO)
        self.runs: dict[str, Path] = {}      # sft (plain), safegrad (sft, batch 4), safedelta
        self.counter = 0

    def out(self, name: str) -> Path:
        self.counter += 1
        return WORK / f"{self.counter:03d}-{name}"


def settings_for(steps: int, sg: SafeGradSettings | None = None) -> TrainSettings:
    return TrainSettings(model=MODEL, quantization="none", steps=steps, batch_size=BATCH, max_length=MAX_LENGTH,
                         warmup=min(5, steps), seed=0, lora=LoraSettings(**LORA),
                         safegrad=sg or SafeGradSettings())


def load_base() -> models.Loaded:
    return models.load(MODEL, "none")


def our_run(state: State, name: str, steps: int, sg: SafeGradSettings | None = None) -> tuple[Path, list[dict]]:
    """train.train() on a fresh base; returns (run folder, the metrics rows of its steps)."""
    rows: list[dict] = []
    cpu = [0.0]

    def on_event(event):
        now = time.process_time()
        if event.kind == "step":   # CPU seconds of this process since the previous step (or the start)
            rows.append({**event.metrics, "cpu": now - cpu[0]})
        cpu[0] = now

    out = state.out(name)
    loaded = load_base()
    train.train(settings_for(steps, sg), state.prepared.train, out, loaded=loaded, on_event=on_event)
    del loaded
    gc.collect()
    return out, rows


def our_batch_shapes(state: State, steps: int, batch_size: int = BATCH, examples=None, seed: int = 0):
    """(real tokens, padded tokens) of the batches train.train() draws, rebuilt with its own stream."""
    tokenizer = models.load_tokenizer(MODEL)
    tok = data.tokenize(examples if examples is not None else state.prepared.train, tokenizer, MAX_LENGTH)
    stream = train.BatchStream(tok, batch_size, tokenizer.pad_token_id, seed, "cpu")
    shapes = []
    for _ in range(steps):
        batch = stream.next()
        shapes.append((int(batch["attention_mask"].sum()), int(batch["input_ids"].numel())))
    return shapes


# ----------------------------------------------------------------------------------------- training
SAFEGRAD_VARIANTS = [  # (label, settings); the first, the defaults, is the JSON `safegrad_overhead`
    ("kl, align batch 4, every 2", dict(mode="kl", align_batch=4, every=2)),
    ("kl, align batch 4", dict(mode="kl", align_batch=4, every=1)),
    ("sft, align batch 4", dict(mode="sft", align_batch=4, every=1)),
    ("sft, align batch 8", dict(mode="sft", align_batch=8, every=1)),
    ("sft, align batch 4, every 2", dict(mode="sft", align_batch=4, every=2)),
]


def trl_run(state: State, steps: int, grouped: bool = False) -> dict:
    """TRL SFTTrainer, same model / LoRA / batch / examples / steps; per-step times from a callback.
    grouped: TRL's own length-grouped sampler (train_sampling_strategy="group_by_length")."""
    import datasets
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    loaded = load_base()
    rows = [{"prompt": ex.messages(), "completion": [{"role": "assistant", "content": ex.response}]}
            for ex in state.prepared.train]
    dataset = datasets.Dataset.from_list(rows)
    shapes: list[tuple[int, int]] = []
    marks: list[tuple[float, float]] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, st, control, **kw):
            torch.set_num_threads(ARGS.threads)   # in case anything changed it during set-up
            marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, st, control, **kw):
            marks.append((time.perf_counter(), time.process_time()))

    class Trainer(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            shapes.append((int(inputs["attention_mask"].sum()), int(inputs["input_ids"].numel())))
            return super().training_step(model, inputs, *args, **kwargs)

    out = state.out("trl-grouped" if grouped else "trl")
    config = SFTConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        learning_rate=2e-4, weight_decay=0.0, max_grad_norm=1.0, warmup_steps=min(5, steps), seed=0,
        max_length=MAX_LENGTH, packing=False, completion_only_loss=True, padding_free=False,
        bf16=BF16, fp16=False, use_cpu=models.pick_device() == "cpu", gradient_checkpointing=False,
        activation_checkpointing=False, train_sampling_strategy="group_by_length" if grouped else "random",
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=10, disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, dataset_num_proc=None)
    t0 = time.perf_counter()
    trainer = Trainer(model=loaded.model, args=config, train_dataset=dataset, processing_class=loaded.tokenizer,
                      peft_config=models.lora_config(LoraSettings(**LORA)), callbacks=[StepTimes()])
    setup = time.perf_counter() - t0
    trainer.remove_callback(PrinterCallback)       # keep stdout for the tables
    threads_in_trainer = torch.get_num_threads()
    trainer.train()
    step_rows = [{"seconds": b[0] - a[0], "cpu": b[1] - a[1], "tokens": real, "padded": padded}
                 for a, b, (real, padded) in zip(marks, marks[1:], shapes)]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    del trainer, loaded
    gc.collect()
    torch.set_num_threads(ARGS.threads)
    return {"rows": step_rows, "setup_s": setup, "threads": threads_in_trainer, "trainable": trainable}


def training_sections(state: State, do_safegrad: bool, do_trl: bool) -> dict:
    """Rounds of [plain, TRL, SafeGrad variants...]; each run drops its first WARMUP_STEPS steps."""
    section_header("Training: SafeGrad overhead and throughput vs TRL")
    steps, rounds = ARGS.steps, ARGS.rounds
    say(f"{rounds} interleaved rounds x {steps} steps per run, first {WARMUP_STEPS} steps of each run dropped; "
        f"batch {BATCH}, max_length {MAX_LENGTH}, LoRA r={LORA['r']} alpha={LORA['alpha']} on "
        f"{','.join(LORA['targets'])}, {len(state.prepared.train)} examples, threads {torch.get_num_threads()}")
    variants = [("plain", None)]
    if do_trl:
        variants.append(("trl", None))
        if not ARGS.quick:   # TRL with its own length grouping: not TRL's default, shown for reference
            variants.append(("trl-grouped", None))
    if do_safegrad:
        variants += [(label, SafeGradSettings(**kw)) for label, kw in SAFEGRAD_VARIANTS]
    measured = {name: [] for name, _ in variants}     # kept step rows (after warm-up), all rounds
    by_step = {name: {} for name, _ in variants}      # (round, step) -> seconds, for paired ratios
    extra = {}
    for r in range(rounds):
        for name, sg in variants:
            t0 = time.perf_counter()
            if name.startswith("trl"):
                result = trl_run(state, steps, grouped=name == "trl-grouped")
                rows = result["rows"]
                extra.update(trl_setup_s=result["setup_s"], trl_threads=result["threads"],
                             trl_trainable=result["trainable"])
            else:
                out, rows = our_run(state, name, steps, sg)
                if name == "plain":
                    state.runs["sft"] = out
                elif sg.mode == "sft" and sg.align_batch == 4 and sg.every == 1:
                    state.runs["safegrad"] = out
            kept = rows[WARMUP_STEPS:]
            measured[name] += kept
            for i, row in enumerate(kept):
                by_step[name][(r, i)] = row["seconds"]
            say(f"  round {r + 1}/{rounds} {name:<28} step s (wall/cpu): "
                + " ".join(f"{row['seconds']:.2f}/{row['cpu']:.2f}" for row in rows)
                + f"   ({time.perf_counter() - t0:.0f} s)")
    say()
    plain = measured["plain"]
    plain_med, plain_mean = median([r["seconds"] for r in plain]), mean([r["seconds"] for r in plain])
    plain_cpu_med, plain_cpu_mean = median([r["cpu"] for r in plain]), mean([r["cpu"] for r in plain])
    result: dict = {"steps_per_run": steps, "rounds": rounds, "warmup_dropped": WARMUP_STEPS,
                    "plain_median_s": plain_med, "plain_mean_s": plain_mean,
                    "plain_median_cpu_s": plain_cpu_med, "plain_mean_cpu_s": plain_cpu_mean}

    if do_safegrad:
        tokenizer = models.load_tokenizer(MODEL)
        task_tokens = median([r["tokens"] for r in plain])
        align_rows = data.bundled("alignment")[:SafeGradSettings().align_size]
        align_tok = data.tokenize(align_rows, tokenizer, MAX_LENGTH)
        head = ["variant", "median s/step", "overhead (median)", "overhead (mean)", "paired median",
                "median CPU s/step", "CPU overhead (median)", "CPU overhead (mean)", "align tokens/step", "n"]
        table_rows = [["plain LoRA", plain_med, 1.0, 1.0, 1.0, plain_cpu_med, 1.0, 1.0, 0, len(plain)]]
        sg_result = {}
        for label, kw in SAFEGRAD_VARIANTS:
            rows = measured[label]
            secs, cpus = [r["seconds"] for r in rows], [r["cpu"] for r in rows]
            paired = [by_step[label][k] / by_step["plain"][k] for k in by_step[label] if k in by_step["plain"]]
            align_tokens = mean(align_tok.lengths) * kw["align_batch"]   # real tokens per alignment batch
            every = kw.get("every", 1)
            entry = {"median_s": median(secs), "mean_s": mean(secs), "overhead_median": ratio(median(secs), plain_med),
                     "overhead_mean": ratio(mean(secs), plain_mean), "overhead_paired_median": median(paired),
                     "median_cpu_s": median(cpus), "cpu_overhead_median": ratio(median(cpus), plain_cpu_med),
                     "cpu_overhead_mean": ratio(mean(cpus), plain_cpu_mean),
                     "align_tokens_per_gradient": align_tokens, "every": every, "n": len(secs), **kw}
            sg_result[label] = entry
            table_rows.append([label, entry["median_s"], entry["overhead_median"], entry["overhead_mean"],
                               entry["overhead_paired_median"], entry["median_cpu_s"], entry["cpu_overhead_median"],
                               entry["cpu_overhead_mean"], round(align_tokens / every), len(secs)])
        say("### SafeGrad overhead (SafeGrad step time / plain LoRA step time)")
        say()
        table(head, table_rows)
        say(f"plain task batch: median {task_tokens:.0f} real tokens/step. 'every 2' alternates steps that compute "
            f"the alignment gradient with steps that reuse it, so its mean column is the one to read. "
            f"'paired' = median over steps of the ratio to the plain step that saw the same task batch. "
            f"CPU = this process's CPU time per step (robust to other work on a shared machine; with "
            f"{torch.get_num_threads()} thread(s) it is the compute the step needs).")
        say()
        result["safegrad"] = sg_result
        result["task_tokens_per_step"] = task_tokens
        first, kw = SAFEGRAD_VARIANTS[0]      # alternating steps: the mean is the cost per step
        result["safegrad_overhead"] = sg_result[first]["overhead_mean" if kw.get("every", 1) > 1 else "overhead_median"]

    if do_trl:
        shapes = our_batch_shapes(state, steps)[WARMUP_STEPS:] * rounds
        for row, (real, padded) in zip(plain, shapes):
            row["padded"] = padded if real == row["tokens"] else None

        def summary(rows):
            real = sum(r["tokens"] for r in rows if r.get("padded"))
            padded = sum(r["padded"] for r in rows if r.get("padded"))
            secs = [r["seconds"] for r in rows]
            return {"median_s_per_step": median(secs), "mean_s_per_step": mean(secs),
                    "median_cpu_s_per_step": median([r["cpu"] for r in rows]),
                    "median_tokens_per_cpu_s": median([r["tokens"] / r["cpu"] for r in rows]),
                    "median_tokens_per_s": median([r["tokens"] / r["seconds"] for r in rows]),
                    "tokens_per_s_total": sum(r["tokens"] for r in rows) / sum(secs),
                    "real_tokens_per_step": mean([r["tokens"] for r in rows]),
                    "padded_tokens_per_step": padded / len([r for r in rows if r.get("padded")]) if padded else None,
                    "padding_waste": 1 - real / padded if padded else None, "n": len(rows)}

        ours_s, trl_s = summary(plain), summary(measured["trl"])
        trainers = [("SafeSpace train.train()", ours_s), ("TRL SFTTrainer (defaults)", trl_s)]
        grouped_s = summary(measured["trl-grouped"]) if "trl-grouped" in measured else None
        if grouped_s:
            trainers.append(("TRL SFTTrainer, group_by_length", grouped_s))
        vs = {"tokens_per_s": ratio(ours_s["median_tokens_per_s"], trl_s["median_tokens_per_s"]),
              "seconds_per_step": ratio(trl_s["median_s_per_step"], ours_s["median_s_per_step"]),
              "tokens_per_cpu_s": ratio(ours_s["median_tokens_per_cpu_s"], trl_s["median_tokens_per_cpu_s"]),
              "cpu_s_per_step": ratio(trl_s["median_cpu_s_per_step"], ours_s["median_cpu_s_per_step"])}
        if grouped_s:
            vs["tokens_per_s_vs_grouped"] = ratio(ours_s["median_tokens_per_s"], grouped_s["median_tokens_per_s"])
            vs["seconds_per_step_vs_grouped"] = ratio(grouped_s["median_s_per_step"], ours_s["median_s_per_step"])
        say("### Training throughput: train.train() vs TRL SFTTrainer (plain LoRA)")
        say()
        table(["trainer", "median s/step", "median tokens/s", "median CPU s/step", "tokens per CPU s",
               "real tokens/step", "padded tokens/step", "padding waste", "n"],
              [[name, s["median_s_per_step"], s["median_tokens_per_s"], s["median_cpu_s_per_step"],
                s["median_tokens_per_cpu_s"],
                s["real_tokens_per_step"], s["padded_tokens_per_step"],
                f"{s['padding_waste']:.1%}" if s["padding_waste"] is not None else None, s["n"]]
               for name, s in trainers])
        say(f"ours / TRL: {vs['tokens_per_s']:.2f}x in real tokens/s, {vs['seconds_per_step']:.2f}x in seconds/step; "
            f"by CPU time {vs['tokens_per_cpu_s']:.2f}x in tokens per CPU s, {vs['cpu_s_per_step']:.2f}x in CPU s/step "
            f"(>1 = SafeSpace faster). TRL set-up (tokenising the set, wrapping the model): "
            f"{extra.get('trl_setup_s', 0):.1f} s per run, not counted; TRL ran with {extra.get('trl_threads')} "
            f"threads; trainable parameters {extra.get('trl_trainable')}.")
        say()
        result["trl"] = {"ours": ours_s, "trl": trl_s, "trl_grouped": grouped_s, "ours_vs_trl": vs, **extra}
        result["train_vs_trl"] = vs["tokens_per_s"]
    return result


# ---------------------------------------------------------------------------------------- Safe Delta
DEFEND_CODE = r"""
import json, os, sys, time
t_process = time.time()
import torch
torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
from safespace import pipeline

def status(key):
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None

def peak_mb():
    peak = status("VmHWM")
    if peak is None:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak

rss_before = status("VmRSS")
marks = []
t0, c0 = time.time(), time.process_time()
run = pipeline.defend(sys.argv[1], sys.argv[2], on_progress=lambda m, f: marks.append((time.time() - t0, m)))
seconds, cpu = time.time() - t0, time.process_time() - c0
peak = peak_mb()
again = None
if len(sys.argv) > 3:   # the same defence again in this (now warm) process: Hessians cached, imports done
    t1 = time.time()
    pipeline.defend(sys.argv[1], sys.argv[3])
    again = time.time() - t1
print(json.dumps({"seconds": seconds, "cpu_s": cpu, "summary_seconds": run.summary["seconds"], "peak_mb": peak,
                  "rss_before_mb": rss_before, "marks": marks, "hessian_cached": run.summary["hessian_cached"],
                  "kept_energy_frac": run.summary["kept_energy_frac"], "layers": len(run.summary["layers"]),
                  "import_s": t0 - t_process, "threads": torch.get_num_threads(), "again_in_process_s": again}))
"""


def child_env() -> dict:
    env = dict(os.environ)
    env.update(BENCH_THREADS=str(ARGS.threads), PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


FLOOR_CODE = r"""
import json, os, sys, time
t_process = time.time()
import torch
torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
from safespace import models, runs
source = runs.load_run(sys.argv[1])
loaded = models.load(source.model, source.config.get("quantization", "auto"))
models.load_adapters(loaded.model, {"ft": source.adapter})
print(json.dumps({"seconds": time.time() - t_process}))
"""


def child_json(what: str, code: str, *args) -> dict:
    """Run `code` in a fresh Python process; its last stdout line (JSON), plus process_wall_s."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=child_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} subprocess failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_wall_s": time.perf_counter() - t0}


def process_floor(source: Path) -> dict:
    """What every fresh process pays before Safe Delta starts: imports (torch, transformers' model code,
    peft with bitsandbytes), the base and the adapter; the same loads pipeline.defend() does first."""
    return child_json("floor", FLOOR_CODE, source)


def defend_subprocess(source: Path, out: Path, again: Path | None = None) -> dict:
    result = child_json("defend", DEFEND_CODE, source, out, *([again] if again else []))
    marks = result.pop("marks")
    stages = {}
    for (t, message), (t_next, _) in zip(marks, marks[1:]):
        stages[message.split(":")[0].split(" (")[0]] = t_next - t
    result["stages"] = stages
    return result


def clear_defence_cache() -> None:
    cache = BENCH_HOME / "cache"
    for path in cache.glob("calibration-*.json"):
        path.unlink()
    for folder in ("hessians", "task-sensitivity", "safety-check"):
        shutil.rmtree(cache / folder, ignore_errors=True)


def synthetic_safe_delta(sizes: list[int], n_tokens: int = 2048) -> list[dict]:
    """Safe Delta on random square layers: H from random activations X, a rank-8 (LoRA-like) delta."""
    out = []
    for d in sizes:
        g = torch.Generator().manual_seed(d)
        X = torch.randn(n_tokens, d, generator=g)
        t0 = time.perf_counter()
        H = (2 / n_tokens) * X.T @ X
        t_h = time.perf_counter() - t0
        delta = 1e-3 * torch.randn(d, 8, generator=g) @ torch.randn(8, d, generator=g)
        t0 = time.perf_counter()
        U = safedelta.inverse_cholesky_upper(H)
        t_u = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, _, stats = safedelta.safe_delta(delta, U, safedelta.relative_budget(0.1))
        t_sweep = time.perf_counter() - t0
        t0 = time.perf_counter()     # worst case: every column but the excluded 15 % accepted
        _, _, stats_all = safedelta.safe_delta(delta, U, float("inf"))
        t_all = time.perf_counter() - t0
        row = {"d": d, "H_s": t_h, "U_s": t_u, "sweep_s": t_sweep, "kept_columns_frac": stats["kept_columns_frac"],
               "sweep_all_s": t_all, "kept_columns_frac_all": stats_all["kept_columns_frac"]}
        out.append(row)
        say(f"  d={d}: H {t_h:.2f} s, U {t_u:.2f} s, sweep {t_sweep:.2f} s "
            f"(kept {stats['kept_columns_frac']:.0%} of columns), sweep with every column accepted {t_all:.2f} s")
        del X, H, U, delta
        gc.collect()
    return out


def safedelta_section(state: State) -> dict:
    section_header("Safe Delta")
    source = Path(ARGS.safedelta_run).resolve() if ARGS.safedelta_run else state.runs.get("sft")
    if source is None:
        say("training a short plain run (10 steps) to defend...")
        source, _ = our_run(state, "plain-for-safedelta", 10)
        state.runs["sft"] = source
    say(f"defending {source}")
    reps = 1 if ARGS.quick else 2
    cold, warm, floor = [], [], []
    for rep in range(reps):
        floor.append(process_floor(source))
        say(f"  process floor (imports, base and adapter loaded, no Safe Delta): {floor[-1]['seconds']:.1f} s "
            f"(process {floor[-1]['process_wall_s']:.1f} s)")
        clear_defence_cache()
        c = defend_subprocess(source, state.out("safedelta-cold"))
        say(f"  cold: {c['seconds']:.1f} s (process {c['process_wall_s']:.1f} s), peak {c['peak_mb']:.0f} MB; "
            f"stages " + ", ".join(f"{k} {v:.1f} s" for k, v in c["stages"].items()))
        cold.append(c)
        out = state.out("safedelta-warm")
        w = defend_subprocess(source, out, again=state.out("safedelta-warm-again"))
        say(f"  warm: {w['seconds']:.1f} s (process {w['process_wall_s']:.1f} s), peak {w['peak_mb']:.0f} MB; "
            f"stages " + ", ".join(f"{k} {v:.1f} s" for k, v in w["stages"].items())
            + f"; again in the same process: {w['again_in_process_s']:.1f} s")
        warm.append(w)
        state.runs["safedelta"] = out
    say()
    cold_s, warm_s = median([c["seconds"] for c in cold]), median([w["seconds"] for w in warm])
    warm_again = median([w["again_in_process_s"] for w in warm])
    floor_s = median([f["seconds"] for f in floor])
    peak = max(c["peak_mb"] for c in cold + warm)
    table(["run", "seconds (in defend)", "CPU s", "process wall s", "peak RSS MB", "RSS after imports MB",
           "Hessians cached", "layers", "kept energy"],
          [[f"{kind} #{i + 1}", c["seconds"], c["cpu_s"], c["process_wall_s"], c["peak_mb"], c["rss_before_mb"],
            c["hessian_cached"], c["layers"], f"{c['kept_energy_frac']:.1%}"]
           for kind, group in (("cold", cold), ("warm", warm)) for i, c in enumerate(group)])
    stage_names = list(dict.fromkeys(k for r in cold + warm for k in r["stages"]))
    table(["stage"] + [f"cold #{i + 1} s" for i in range(len(cold))] + [f"warm #{i + 1} s" for i in range(len(warm))],
          [[name] + [r["stages"].get(name) for r in cold + warm] for name in stage_names])
    say(f"warm = the same defence again in a process that already ran one, as in the app (a second request): "
        f"{warm_again:.1f} s. In a fresh process it took {warm_s:.1f} s, of which the process floor (importing "
        f"torch, transformers' model code and peft, loading the base and the adapter, before any Safe Delta "
        f"work) is {floor_s:.1f} s of the process's own clock. Cold = no cached calibration answers, "
        f"Hessians, task sensitivities or aligned-model check loss; all but the task sensitivities are computed "
        f"once per base model and calibration set, not per fine-tune.")
    say("For scale: the Safe Delta paper reports ~62 s per request + 210 s one-time preparation on an A100 "
        "for a 7B model.")
    say()
    sizes = [512, 1024, 2048] if ARGS.quick else [512, 1024, 2048, 4096]
    say(f"Synthetic growth: safe_delta on random d x d layers (H from 2048 random tokens, rank-8 delta, "
        f"relative budget 0.1), threads {torch.get_num_threads()}")
    synth = synthetic_safe_delta(sizes)
    say()
    table(["d_in = d_out", "H = X^T X s", "U (inverse_cholesky_upper) s", "sweep s (budget 0.1)", "kept columns",
           "sweep s (all accepted)", "kept columns (all)"],
          [[r["d"], r["H_s"], r["U_s"], r["sweep_s"], f"{r['kept_columns_frac']:.0%}", r["sweep_all_s"],
            f"{r['kept_columns_frac_all']:.0%}"] for r in synth])
    return {"cold": cold, "warm": warm, "floor": floor, "synthetic": synth, "source_run": str(source),
            "safedelta_seconds": {"cold": cold_s, "warm": warm_again, "warm_fresh_process": warm_s,
                                  "process_floor": floor_s, "peak_mb": peak,
                                  "peak_mb_warm": max(w["peak_mb"] for w in warm)}}


# ---------------------------------------------------------------------------------------- comparison
def ensure_compare_runs(state: State) -> None:
    if "sft" not in state.runs:
        say("training a short plain run (steps as in --steps) for the comparison...")
        state.runs["sft"], _ = our_run(state, "plain-for-compare", ARGS.steps)
    if "safegrad" not in state.runs:
        say("training a short SafeGrad run for the comparison...")
        state.runs["safegrad"], _ = our_run(state, "safegrad-for-compare", ARGS.steps, SafeGradSettings(mode="sft"))
    if "safedelta" not in state.runs:
        say("applying Safe Delta for the comparison...")
        out = state.out("safedelta-for-compare")
        pipeline.defend(state.runs["sft"], out)
        state.runs["safedelta"] = out


class Clock:
    """Wall and CPU seconds (this process) since creation."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def baseline_sequential(variants: dict, prompts: list) -> tuple[dict, dict]:
    """(b) What a user would write: a fresh model per variant, one prompt at a time."""
    from peft import PeftModel

    answers, timing = {}, {}
    for name, path in variants.items():
        clock = Clock()
        loaded = load_base()
        model = PeftModel.from_pretrained(loaded.model, str(runs.load_run(path).adapter)) if path else loaded.model
        model.eval()
        load_wall, load_cpu = clock.read()
        tok = loaded.tokenizer
        outs = []
        clock = Clock()
        with torch.no_grad(), models.autocast(loaded.device):   # same arithmetic as ours
            for ex in prompts:
                enc = tok(data.prompt_text(ex, tok), return_tensors="pt", add_special_tokens=False).to(loaded.device)
                ids = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, temperature=None,
                                     top_p=None, top_k=None, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)
                outs.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        gen_wall, gen_cpu = clock.read()
        timing[name] = {"load_s": load_wall, "load_cpu_s": load_cpu, "generate_s": gen_wall,
                        "generate_cpu_s": gen_cpu, "prompts": len(prompts)}
        answers[name] = outs
        del model, loaded
        gc.collect()
    return answers, timing


def baseline_batched(variants: dict, prompts: list, batch_size: int) -> tuple[dict, tuple]:
    """(c) A fresh model per variant, but the same batched generation as ours."""
    from peft import PeftModel

    clock = Clock()
    answers = {}
    for name, path in variants.items():
        loaded = load_base()
        model = PeftModel.from_pretrained(loaded.model, str(runs.load_run(path).adapter)) if path else loaded.model
        model.eval()
        answers[name] = evaluate.generate(model, loaded.tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS,
                                          batch_size=batch_size, adapter="default" if path else None)
        del model, loaded
        gc.collect()
    return answers, clock.read()


def ours_mixed(variants: dict, prompts: list, batch_size: int) -> tuple[dict, tuple]:
    """(a) One base, every variant an adapter, rows of one batch running different adapters."""
    clock = Clock()
    loaded, model, adapter_of = pipeline._open_variants(variants)
    got = evaluate.generate_mixed(model, loaded.tokenizer, prompts, [adapter_of[n] for n in variants],
                                  max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size)
    took = clock.read()
    del loaded, model
    gc.collect()
    return {n: got[adapter_of[n]] for n in variants}, took


def ours_switching(variants: dict, prompts: list, batch_size: int) -> tuple[dict, tuple]:
    """(a) One base, the variants one after the other by switching the active adapter."""
    clock = Clock()
    answers = pipeline.generate_all(variants, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size)
    took = clock.read()
    gc.collect()
    return answers, took


def agreement(a: dict, b: dict, index: list[int] | None = None) -> float:
    pairs = []
    for name in a:
        other = b[name] if index is None else [b[name][i] for i in index]
        pairs += list(zip(a[name], other))
    return sum(x == y for x, y in pairs) / len(pairs) if pairs else float("nan")


def compare_section(state: State) -> dict:
    section_header("Comparison: 4 variants side by side")
    ensure_compare_runs(state)
    variants = {"base": None, "sft": state.runs["sft"], "safegrad": state.runs["safegrad"],
                "safedelta": state.runs["safedelta"]}
    prompts = data.bundled("eval_harmful")[:ARGS.prompts]
    n, k = len(prompts), len(variants)
    say(f"{k} variants x {n} prompts (bundled eval_harmful), max_new_tokens {MAX_NEW_TOKENS}, greedy, "
        f"generation threads {evaluate.CPU_GENERATION_THREADS}; every total includes loading the model(s)")
    wall, cpu, outputs = {}, {}, {}
    switch = {16: "(a) ours: adapter switching, batch 16", 32: "(a) ours: adapter switching, batch 32"}
    for label, fn, bs in [("(a) ours: mixed-adapter batches, batch 32", ours_mixed, 32),
                          (switch[16], ours_switching, 16),
                          ("(a) ours: mixed-adapter batches, batch 64", ours_mixed, 64),
                          (switch[32], ours_switching, 32)]:
        outputs[label], (wall[label], cpu[label]) = fn(variants, prompts, bs)
        say(f"  {label}: {wall[label]:.1f} s (CPU {cpu[label]:.1f} s)")
    ours = list(wall)
    best = min(ours, key=wall.get)
    best_cpu = min(ours, key=cpu.get)
    switch_bs = 16 if wall[switch[16]] <= wall[switch[32]] else 32
    c_label = f"(c) fresh load per variant, batched (batch {switch_bs})"
    outputs[c_label], (wall[c_label], cpu[c_label]) = baseline_batched(variants, prompts, switch_bs)
    say(f"  {c_label}: {wall[c_label]:.1f} s (CPU {cpu[c_label]:.1f} s)")
    n_seq = n if not ARGS.quick else min(n, 8)
    index = sorted({round(i * n / n_seq) for i in range(n_seq)})   # spread over the set, not its head
    seq_answers, seq_timing = baseline_sequential(variants, [prompts[i] for i in index])
    extrapolated = len(index) < n
    b_label = "(b) fresh load per variant, one prompt at a time" + (" (extrapolated)" if extrapolated else "")
    wall[b_label] = sum(t["load_s"] + t["generate_s"] * n / t["prompts"] for t in seq_timing.values())
    cpu[b_label] = sum(t["load_cpu_s"] + t["generate_cpu_s"] * n / t["prompts"] for t in seq_timing.values())
    measured_b = sum(t["load_s"] + t["generate_s"] for t in seq_timing.values())
    say(f"  {b_label}: {wall[b_label]:.1f} s (CPU {cpu[b_label]:.1f} s)"
        + (f"; measured {measured_b:.1f} s on {len(index)} of {n} prompts per variant (spread over the set), "
           f"generation time scaled linearly per prompt, each load counted once" if extrapolated else ""))
    say()
    table(["method", "total s", "s per answer", "x best ours (wall)", "CPU s", "x best ours (CPU)"],
          [[label, wall[label], wall[label] / (k * n), ratio(wall[label], wall[best]), cpu[label],
            ratio(cpu[label], cpu[best_cpu])] for label in wall])
    ref = outputs[switch[16]]
    agree = {"mixed32_vs_switch16": agreement(outputs["(a) ours: mixed-adapter batches, batch 32"], ref),
             "mixed64_vs_switch16": agreement(outputs["(a) ours: mixed-adapter batches, batch 64"], ref),
             "sequential_vs_switch16": agreement(seq_answers, ref, index),
             "fresh_batched_vs_switch16": agreement(outputs[c_label], ref)}
    say("identical answers (greedy; batches with padding can differ in the last float bits): "
        + ", ".join(f"{key} {v:.0%}" for key, v in agree.items()))
    say()
    speedup, fair = ratio(wall[b_label], wall[best]), ratio(wall[c_label], wall[best])
    speedup_cpu, fair_cpu = ratio(cpu[b_label], cpu[best_cpu]), ratio(cpu[c_label], cpu[best_cpu])
    say(f"compare_speedup = (b) / best ours = {speedup:.2f}x (CPU time {speedup_cpu:.2f}x); "
        f"fair baseline (c) / best ours = {fair:.2f}x (CPU time {fair_cpu:.2f}x); best ours: {best}")
    return {"wall_s": wall, "cpu_s": cpu, "best_ours": best, "b_extrapolated": extrapolated,
            "b_prompts_per_variant": len(index), "b_per_variant": seq_timing, "prompts": n,
            "variants": list(variants), "agreement": agree, "compare_speedup": speedup, "fair_speedup": fair,
            "compare_speedup_cpu": speedup_cpu, "fair_speedup_cpu": fair_cpu}


# ------------------------------------------------------------------------------------------- end to end
def e2e_section() -> dict:
    section_header(f"End to end: python -m safespace run {ARGS.config}")
    if ARGS.quick:
        say("skipped in --quick")
        return {"skipped": "quick mode"}
    if pipeline.load_config(REPO / ARGS.config).model == models.ALIGNED_KEY and not align.is_built():
        say("skipped: aligned base not built")
        return {"skipped": "aligned base not built"}
    out = WORK / "e2e"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "safespace", "run", ARGS.config, "--out", str(out)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        say(f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
        return {"failed": proc.returncode, "seconds": wall}
    say(f"wall time {wall:.0f} s with the aligned base cached (calibration answers and Hessians cold; "
        f"OMP_NUM_THREADS={ARGS.threads})")
    for line in proc.stdout.strip().splitlines()[-5:]:
        say(f"  {line}")
    return {"seconds": wall, "config": ARGS.config}


# ------------------------------------------------------------------------------------------------ main
def main() -> int:
    started = time.perf_counter()
    facts = machine_facts()
    say("# SafeSpace benchmarks" + (" (--quick)" if ARGS.quick else ""))
    say()
    table(["fact", "value"], [
        ["CPU", facts["cpu"]], ["cores (usable)", f"{facts['cores']} ({facts['cores_usable']})"],
        ["memory GB", facts["memory_gb"]], ["device", facts["device"]], ["torch threads", facts["threads"]],
        *[[name, v] for name, v in facts["versions"].items()], ["date", facts["date"]],
        ["load average at start", facts["load_average_start"]]])
    say(f"model {MODEL} ({PRECISION}, LoRA r={LORA['r']} alpha={LORA['alpha']} {','.join(LORA['targets'])}), batch {BATCH}, "
        f"max_length {MAX_LENGTH}, harmful ratio {HARMFUL_RATIO}; sections: {', '.join(ARGS.sections)}")
    state = State()
    # one-time costs (tokeniser, first load) out of the measurements
    load_base()
    gc.collect()
    result = {"safegrad_overhead": None, "train_vs_trl": None, "safedelta_seconds": None, "compare_speedup": None,
              "machine": facts, "settings": {"quick": ARGS.quick, "threads": ARGS.threads, "rounds": ARGS.rounds,
                                             "steps": ARGS.steps, "prompts": ARGS.prompts,
                                             "sections": ARGS.sections, "model": MODEL, "batch": BATCH,
                                             "max_length": MAX_LENGTH, "lora": LORA,
                                             "max_new_tokens": MAX_NEW_TOKENS},
              "goals": GOALS, "details": {}}
    do_sg, do_trl = "safegrad" in ARGS.sections, "trl" in ARGS.sections
    if do_sg or do_trl:
        if do_trl and facts["versions"].get("trl") is None:
            say("trl is not installed: `pip install -r bench/requirements.txt`; skipping the TRL comparison")
            do_trl = False
        training = training_sections(state, do_sg, do_trl)
        result["safegrad_overhead"] = training.pop("safegrad_overhead", None)
        result["train_vs_trl"] = training.pop("train_vs_trl", None)
        result["details"]["training"] = training
    if "safedelta" in ARGS.sections:
        sd = safedelta_section(state)
        result["safedelta_seconds"] = sd.pop("safedelta_seconds")
        result["details"]["safedelta"] = sd
    if "compare" in ARGS.sections:
        cmp_result = compare_section(state)
        result["compare_speedup"] = cmp_result["compare_speedup"]
        result["details"]["compare"] = cmp_result
    if "e2e" in ARGS.sections:
        result["details"]["e2e"] = e2e_section()
    result["machine"]["load_average_end"] = load_average()
    result["seconds"] = time.perf_counter() - started

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
    say(f"total {result['seconds']:.0f} s, threads {torch.get_num_threads()}, load average now {load_average()}")
    if ARGS.json:
        print(json.dumps(rnd(result), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

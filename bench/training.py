"""Training sections: SafeGrad's step time over plain LoRA's, and train.train()'s throughput against
TRL's SFTTrainer on the same data and LoRA, measured in interleaved rounds in one process."""
from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from safespace import data, models, train
from safespace.config import LoraSettings, SafeGradSettings, TrainSettings

from .harness import (BATCH, LORA, MAX_LENGTH, MODEL, WARMUP_STEPS, Bench, mean, median, ratio, say, section_header,
                      table)

SAFEGRAD_VARIANTS = [  # (label, settings); the first, the defaults, is the JSON `safegrad_overhead`
    ("kl, align batch 4, every 2", dict(mode="kl", align_batch=4, every=2)),
    ("kl, align batch 4", dict(mode="kl", align_batch=4, every=1)),
    ("sft, align batch 4", dict(mode="sft", align_batch=4, every=1)),
    ("sft, align batch 8", dict(mode="sft", align_batch=8, every=1)),
    ("sft, align batch 4, every 2", dict(mode="sft", align_batch=4, every=2)),
]


def bf16() -> bool:
    """Ours trains and generates with bf16 matmuls where the CPU has them (models.autocast); every
    baseline gets the same arithmetic, so the ratios measure the method, not the number format."""
    return models.cpu_bf16(models.pick_device())


def settings_for(steps: int, sg: SafeGradSettings | None = None) -> TrainSettings:
    return TrainSettings(model=MODEL, quantization="none", steps=steps, batch_size=BATCH, max_length=MAX_LENGTH,
                         warmup=min(5, steps), seed=0, lora=LoraSettings(**LORA),
                         safegrad=sg or SafeGradSettings())


def load_base() -> models.Loaded:
    return models.load(MODEL, "none")


def our_run(bench: Bench, name: str, steps: int, sg: SafeGradSettings | None = None) -> tuple[Path, list[dict]]:
    """train.train() on a fresh base; returns (run folder, the metrics rows of its steps)."""
    rows: list[dict] = []
    cpu = [0.0]

    def on_event(event):
        now = time.process_time()
        if event.kind == "step":   # CPU seconds of this process since the previous step (or the start)
            rows.append({**event.metrics, "cpu": now - cpu[0]})
        cpu[0] = now

    out = bench.out(name)
    loaded = load_base()
    train.train(settings_for(steps, sg), bench.prepared.train, out, loaded=loaded, on_event=on_event)
    del loaded
    gc.collect()
    return out, rows


def our_batch_shapes(bench: Bench, steps: int, batch_size: int = BATCH, examples=None, seed: int = 0):
    """(real tokens, padded tokens) of the batches train.train() draws, rebuilt with its own stream."""
    tokenizer = models.load_tokenizer(MODEL)
    tok = data.tokenize(examples if examples is not None else bench.prepared.train, tokenizer, MAX_LENGTH)
    stream = train.BatchStream(tok, batch_size, tokenizer.pad_token_id, seed, "cpu")
    shapes = []
    for _ in range(steps):
        batch = stream.next()
        shapes.append((int(batch["attention_mask"].sum()), int(batch["input_ids"].numel())))
    return shapes


def trl_run(bench: Bench, steps: int, grouped: bool = False) -> dict:
    """TRL SFTTrainer, same model / LoRA / batch / examples / steps; per-step times from a callback.
    grouped: TRL's own length-grouped sampler (train_sampling_strategy="group_by_length")."""
    import datasets
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    threads = bench.args.threads
    loaded = load_base()
    rows = [{"prompt": ex.messages(), "completion": [{"role": "assistant", "content": ex.response}]}
            for ex in bench.prepared.train]
    dataset = datasets.Dataset.from_list(rows)
    shapes: list[tuple[int, int]] = []
    marks: list[tuple[float, float]] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, st, control, **kw):
            torch.set_num_threads(threads)   # in case anything changed it during set-up
            marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, st, control, **kw):
            marks.append((time.perf_counter(), time.process_time()))

    class Trainer(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            shapes.append((int(inputs["attention_mask"].sum()), int(inputs["input_ids"].numel())))
            return super().training_step(model, inputs, *args, **kwargs)

    out = bench.out("trl-grouped" if grouped else "trl")
    config = SFTConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        learning_rate=2e-4, weight_decay=0.0, max_grad_norm=1.0, warmup_steps=min(5, steps), seed=0,
        max_length=MAX_LENGTH, packing=False, completion_only_loss=True, padding_free=False,
        bf16=bf16(), fp16=False, use_cpu=models.pick_device() == "cpu", gradient_checkpointing=False,
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
    torch.set_num_threads(threads)
    return {"rows": step_rows, "setup_s": setup, "threads": threads_in_trainer, "trainable": trainable}


def training_sections(bench: Bench, do_safegrad: bool, do_trl: bool) -> dict:
    """Rounds of [plain, TRL, SafeGrad variants...]; each run drops its first WARMUP_STEPS steps."""
    section_header("Training: SafeGrad overhead and throughput vs TRL")
    steps, rounds = bench.args.steps, bench.args.rounds
    say(f"{rounds} interleaved rounds x {steps} steps per run, first {WARMUP_STEPS} steps of each run dropped; "
        f"batch {BATCH}, max_length {MAX_LENGTH}, LoRA r={LORA['r']} alpha={LORA['alpha']} on "
        f"{','.join(LORA['targets'])}, {len(bench.prepared.train)} examples, threads {torch.get_num_threads()}")
    variants = [("plain", None)]
    if do_trl:
        variants.append(("trl", None))
        if not bench.args.quick:   # TRL with its own length grouping: not TRL's default, shown for reference
            variants.append(("trl-grouped", None))
    if do_safegrad:
        variants += [(label, SafeGradSettings(**kw)) for label, kw in SAFEGRAD_VARIANTS]
    measured, by_step, extra = _interleaved_rounds(bench, variants)
    say()
    plain = measured["plain"]
    result: dict = {"steps_per_run": steps, "rounds": rounds, "warmup_dropped": WARMUP_STEPS,
                    "plain_median_s": median([r["seconds"] for r in plain]),
                    "plain_mean_s": mean([r["seconds"] for r in plain]),
                    "plain_median_cpu_s": median([r["cpu"] for r in plain]),
                    "plain_mean_cpu_s": mean([r["cpu"] for r in plain])}
    if do_safegrad:
        result.update(_safegrad_overhead(measured, by_step, result))
    if do_trl:
        result.update(_trl_throughput(bench, measured, extra))
    return result


def _interleaved_rounds(bench: Bench, variants: list) -> tuple[dict, dict, dict]:
    """Every variant once per round: (kept step rows per variant, (round, step) -> seconds per variant
    for paired ratios, TRL's set-up facts)."""
    steps, rounds = bench.args.steps, bench.args.rounds
    measured = {name: [] for name, _ in variants}     # kept step rows (after warm-up), all rounds
    by_step = {name: {} for name, _ in variants}      # (round, step) -> seconds, for paired ratios
    extra = {}
    for r in range(rounds):
        for name, sg in variants:
            t0 = time.perf_counter()
            if name.startswith("trl"):
                result = trl_run(bench, steps, grouped=name == "trl-grouped")
                rows = result["rows"]
                extra.update(trl_setup_s=result["setup_s"], trl_threads=result["threads"],
                             trl_trainable=result["trainable"])
            else:
                out, rows = our_run(bench, name, steps, sg)
                if name == "plain":
                    bench.runs["sft"] = out
                elif sg.mode == "sft" and sg.align_batch == 4 and sg.every == 1:
                    bench.runs["safegrad"] = out
            kept = rows[WARMUP_STEPS:]
            measured[name] += kept
            for i, row in enumerate(kept):
                by_step[name][(r, i)] = row["seconds"]
            say(f"  round {r + 1}/{rounds} {name:<28} step s (wall/cpu): "
                + " ".join(f"{row['seconds']:.2f}/{row['cpu']:.2f}" for row in rows)
                + f"   ({time.perf_counter() - t0:.0f} s)")
    return measured, by_step, extra


def _safegrad_overhead(measured: dict, by_step: dict, plain: dict) -> dict:
    """SafeGrad step time / plain step time for every variant, as a table and as results."""
    plain_med, plain_mean = plain["plain_median_s"], plain["plain_mean_s"]
    plain_cpu_med, plain_cpu_mean = plain["plain_median_cpu_s"], plain["plain_mean_cpu_s"]
    tokenizer = models.load_tokenizer(MODEL)
    task_tokens = median([r["tokens"] for r in measured["plain"]])
    align_rows = data.bundled("alignment")[:SafeGradSettings().align_size]
    align_tok = data.tokenize(align_rows, tokenizer, MAX_LENGTH)
    head = ["variant", "median s/step", "overhead (median)", "overhead (mean)", "paired median",
            "median CPU s/step", "CPU overhead (median)", "CPU overhead (mean)", "align tokens/step", "n"]
    table_rows = [["plain LoRA", plain_med, 1.0, 1.0, 1.0, plain_cpu_med, 1.0, 1.0, 0, len(measured["plain"])]]
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
    first, kw = SAFEGRAD_VARIANTS[0]      # alternating steps: the mean is the cost per step
    return {"safegrad": sg_result, "task_tokens_per_step": task_tokens,
            "safegrad_overhead": sg_result[first]["overhead_mean" if kw.get("every", 1) > 1 else "overhead_median"]}


def _throughput(rows: list[dict]) -> dict:
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


def _trl_throughput(bench: Bench, measured: dict, extra: dict) -> dict:
    """Ours against TRL (and TRL with length grouping, in full mode), as a table and as results."""
    plain = measured["plain"]
    shapes = our_batch_shapes(bench, bench.args.steps)[WARMUP_STEPS:] * bench.args.rounds
    for row, (real, padded) in zip(plain, shapes):
        row["padded"] = padded if real == row["tokens"] else None
    ours_s, trl_s = _throughput(plain), _throughput(measured["trl"])
    trainers = [("SafeSpace train.train()", ours_s), ("TRL SFTTrainer (defaults)", trl_s)]
    grouped_s = _throughput(measured["trl-grouped"]) if "trl-grouped" in measured else None
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
    return {"trl": {"ours": ours_s, "trl": trl_s, "trl_grouped": grouped_s, "ours_vs_trl": vs, **extra},
            "train_vs_trl": vs["tokens_per_s"]}

"""The comparison section: four variants answering the same prompts, with one base and every variant
an adapter (ours: mixed-adapter batches, adapter switching) against a model load per variant (one
prompt at a time, and batched), with how often their greedy answers agree."""
from __future__ import annotations

import gc

import torch

from safespace import compare, data, evaluate, models, pipeline, runs
from safespace.config import SafeGradSettings

from .harness import MAX_NEW_TOKENS, Bench, Clock, ratio, say, section_header, table
from .training import load_base, our_run


def ensure_compare_runs(bench: Bench) -> None:
    if "sft" not in bench.runs:
        say("training a short plain run (steps as in --steps) for the comparison...")
        bench.runs["sft"], _ = our_run(bench, "plain-for-compare", bench.args.steps)
    if "safegrad" not in bench.runs:
        say("training a short SafeGrad run for the comparison...")
        bench.runs["safegrad"], _ = our_run(bench, "safegrad-for-compare", bench.args.steps,
                                            SafeGradSettings(mode="sft"))
    if "safedelta" not in bench.runs:
        say("applying Safe Delta for the comparison...")
        out = bench.out("safedelta-for-compare")
        pipeline.defend(bench.runs["sft"], out)
        bench.runs["safedelta"] = out


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
    loaded, model, adapter_of = compare._open_variants(variants)
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


def compare_section(bench: Bench) -> dict:
    section_header("Comparison: 4 variants side by side")
    ensure_compare_runs(bench)
    variants = {"base": None, "sft": bench.runs["sft"], "safegrad": bench.runs["safegrad"],
                "safedelta": bench.runs["safedelta"]}
    prompts = data.bundled("eval_harmful")[:bench.args.prompts]
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
    n_seq = n if not bench.args.quick else min(n, 8)
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

"""The Safe Delta section: pipeline.defend() cold and warm, each in a fresh process (bench/children.py)
with its stages and peak memory, the process floor, and safe_delta on random layers of growing size."""
from __future__ import annotations

import gc
import shutil
import time
from pathlib import Path

import torch

from safespace import safedelta

from .harness import Bench, median, say, section_header, table
from .training import our_run


def process_floor(bench: Bench, source: Path) -> dict:
    """What every fresh process pays before Safe Delta starts: imports (torch, transformers' model code,
    peft with bitsandbytes), the base and the adapter; the same loads pipeline.defend() does first."""
    return bench.child_json("floor", source)


def defend_subprocess(bench: Bench, source: Path, out: Path, again: Path | None = None) -> dict:
    result = bench.child_json("defend", source, out, *([again] if again else []))
    marks = result.pop("marks")
    stages = {}
    for (t, message), (t_next, _) in zip(marks, marks[1:]):
        stages[message.split(":")[0].split(" (")[0]] = t_next - t
    result["stages"] = stages
    return result


def clear_defence_cache(bench: Bench) -> None:
    cache = bench.home / "cache"
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


def safedelta_section(bench: Bench) -> dict:
    section_header("Safe Delta")
    args = bench.args
    source = Path(args.safedelta_run).resolve() if args.safedelta_run else bench.runs.get("sft")
    if source is None:
        say("training a short plain run (10 steps) to defend...")
        source, _ = our_run(bench, "plain-for-safedelta", 10)
        bench.runs["sft"] = source
    say(f"defending {source}")
    cold, warm, floor = _cold_and_warm(bench, source, reps=1 if args.quick else 2)
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
    synth = _synthetic_growth([512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096])
    return {"cold": cold, "warm": warm, "floor": floor, "synthetic": synth, "source_run": str(source),
            "safedelta_seconds": {"cold": cold_s, "warm": warm_again, "warm_fresh_process": warm_s,
                                  "process_floor": floor_s, "peak_mb": peak,
                                  "peak_mb_warm": max(w["peak_mb"] for w in warm)}}


def _cold_and_warm(bench: Bench, source: Path, reps: int) -> tuple[list, list, list]:
    """`reps` times: the process floor, a cold defence (caches cleared), a warm one (and again in-process)."""
    cold, warm, floor = [], [], []
    for rep in range(reps):
        floor.append(process_floor(bench, source))
        say(f"  process floor (imports, base and adapter loaded, no Safe Delta): {floor[-1]['seconds']:.1f} s "
            f"(process {floor[-1]['process_wall_s']:.1f} s)")
        clear_defence_cache(bench)
        c = defend_subprocess(bench, source, bench.out("safedelta-cold"))
        say(f"  cold: {c['seconds']:.1f} s (process {c['process_wall_s']:.1f} s), peak {c['peak_mb']:.0f} MB; "
            f"stages " + ", ".join(f"{k} {v:.1f} s" for k, v in c["stages"].items()))
        cold.append(c)
        out = bench.out("safedelta-warm")
        w = defend_subprocess(bench, source, out, again=bench.out("safedelta-warm-again"))
        say(f"  warm: {w['seconds']:.1f} s (process {w['process_wall_s']:.1f} s), peak {w['peak_mb']:.0f} MB; "
            f"stages " + ", ".join(f"{k} {v:.1f} s" for k, v in w["stages"].items())
            + f"; again in the same process: {w['again_in_process_s']:.1f} s")
        warm.append(w)
        bench.runs["safedelta"] = out
    return cold, warm, floor


def _synthetic_growth(sizes: list[int]) -> list[dict]:
    say(f"Synthetic growth: safe_delta on random d x d layers (H from 2048 random tokens, rank-8 delta, "
        f"relative budget 0.1), threads {torch.get_num_threads()}")
    synth = synthetic_safe_delta(sizes)
    say()
    table(["d_in = d_out", "H = X^T X s", "U (inverse_cholesky_upper) s", "sweep s (budget 0.1)", "kept columns",
           "sweep s (all accepted)", "kept columns (all)"],
          [[r["d"], r["H_s"], r["U_s"], r["sweep_s"], f"{r['kept_columns_frac']:.0%}", r["sweep_all_s"],
            f"{r['kept_columns_frac_all']:.0%}"] for r in synth])
    return synth

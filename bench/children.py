"""Programs the benchmarks run in a fresh process, so each pays and measures a process's own imports,
loads and peak memory: `python -m bench.children NAME ARGS...` prints one JSON line.

    defend SOURCE OUT [AGAIN]   pipeline.defend() timed with its stages and peak memory; with AGAIN,
                                the same defence again in this (then warm) process
    floor SOURCE                what a process pays before Safe Delta starts: imports, base, adapter
"""
from __future__ import annotations

import json
import os
import sys
import time

T_PROCESS = time.time()     # before any heavy import: the process's own clock starts here


def _torch():
    import torch
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    return torch


def _status(key: str):
    """MB of a /proc/self/status field (VmHWM: peak resident memory, VmRSS: resident now)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None


def _peak_mb():
    peak = _status("VmHWM")
    if peak is None:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak


def defend(source: str, out: str, again: str | None = None) -> dict:
    torch = _torch()
    from safespace import pipeline

    rss_before = _status("VmRSS")
    marks = []
    t0, c0 = time.time(), time.process_time()
    run = pipeline.defend(source, out, on_progress=lambda m, f: marks.append((time.time() - t0, m)))
    seconds, cpu = time.time() - t0, time.process_time() - c0
    peak = _peak_mb()
    again_s = None
    if again is not None:   # the same defence again in this (now warm) process: Hessians cached, imports done
        t1 = time.time()
        pipeline.defend(source, again)
        again_s = time.time() - t1
    return {"seconds": seconds, "cpu_s": cpu, "summary_seconds": run.summary["seconds"], "peak_mb": peak,
            "rss_before_mb": rss_before, "marks": marks, "hessian_cached": run.summary["hessian_cached"],
            "kept_energy_frac": run.summary["kept_energy_frac"], "layers": len(run.summary["layers"]),
            "import_s": t0 - T_PROCESS, "threads": torch.get_num_threads(), "again_in_process_s": again_s}


def floor(source: str) -> dict:
    _torch()
    from safespace import models, runs

    run = runs.load_run(source)
    loaded = models.load(run.model, run.config.get("quantization", "auto"))
    models.load_adapters(loaded.model, {"ft": run.adapter})
    return {"seconds": time.time() - T_PROCESS}


PROGRAMS = {"defend": defend, "floor": floor}

if __name__ == "__main__":
    name, *arguments = sys.argv[1:]
    print(json.dumps(PROGRAMS[name](*arguments)))

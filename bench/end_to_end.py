"""The end-to-end section: the wall time of `python -m safespace run CONFIG` (full mode only)."""
from __future__ import annotations

import subprocess
import sys
import time

from safespace import align, models, pipeline

from .harness import REPO, Bench, say, section_header


def e2e_section(bench: Bench) -> dict:
    args = bench.args
    section_header(f"End to end: python -m safespace run {args.config}")
    if args.quick:
        say("skipped in --quick")
        return {"skipped": "quick mode"}
    if pipeline.load_config(REPO / args.config).model == models.ALIGNED_KEY and not align.is_built():
        say("skipped: aligned base not built")
        return {"skipped": "aligned base not built"}
    out = bench.work / "e2e"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "safespace", "run", args.config, "--out", str(out)],
                          cwd=REPO, env=bench.child_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        say(f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
        return {"failed": proc.returncode, "seconds": wall}
    say(f"wall time {wall:.0f} s with the aligned base cached (calibration answers and Hessians cold; "
        f"OMP_NUM_THREADS={args.threads})")
    for line in proc.stdout.strip().splitlines()[-5:]:
        say(f"  {line}")
    return {"seconds": wall, "config": args.config}

#!/usr/bin/env python
"""One JSON line that sums up a bench/gpu_check.sh run, read from its output folder.

    python bench/gpu_summary.py OUT_DIR

OUT_DIR holds what gpu_check.sh wrote: phases.tsv (one line per phase: name, exit status, "skipped" or
"not chosen", seconds), the demo run at each quantization (none/ and 4bit/, each a `safespace run` folder:
results.json plus one run folder per variant) and bench.log (the output of `bench/run.py --quick --json`,
whose last JSON line is its summary). Missing parts become null, so a check that stopped early is still
summed up. Exit status: 0 when every chosen phase finished with status 0.
"""
from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

QUANTIZATIONS = ("none", "4bit")
NOT_CHOSEN = "not chosen"     # a phase left out by GPU_CHECK_PHASES
BENCH_KEYS = ("safegrad_overhead", "train_vs_trl", "safedelta_seconds", "compare_speedup", "seconds")


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def phases(out: Path) -> dict:
    """{phase: {"status": exit status or "skipped", "seconds": float}} from phases.tsv."""
    found = {}
    try:
        lines = (out / "phases.tsv").read_text(encoding="utf-8").splitlines()
    except OSError:
        return found
    for line in lines:
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        name, status, seconds = parts
        found[name] = {"status": int(status) if status.lstrip("-").isdigit() else status,
                       "seconds": round(float(seconds), 1)}
    return found


def _rate(entry) -> float | None:
    value = entry.get("value") if isinstance(entry, dict) else None
    return round(value, 3) if isinstance(value, (int, float)) and value == value else None


def demo(folder: Path) -> dict | None:
    """One demo run: each variant's refusal, over-refusal and task utility, and seconds per phase
    (training and Safe Delta from their run summaries; the rest, mostly evaluation, is what remains)."""
    results = read_json(folder / "results.json")
    if not isinstance(results, dict):
        return None
    variants = results.get("variants") or {}
    metric = {key: {name: _rate(v.get(key)) for name, v in variants.items()}
              for key in ("refusal", "over_refusal", "utility")}
    seconds = {}
    for phase, run in (("train_sft", "sft"), ("train_safegrad", "safegrad"), ("safedelta", "safedelta")):
        summary = read_json(folder / run / "summary.json") or {}
        if isinstance(summary.get("seconds"), (int, float)):
            seconds[phase] = round(summary["seconds"], 1)
    total = (results.get("settings") or {}).get("seconds")
    if isinstance(total, (int, float)):
        seconds["evaluate_and_loading"] = round(total - sum(seconds.values()), 1)
        seconds["total"] = round(total, 1)
    sft = read_json(folder / "sft" / "config.json") or {}
    sizes = results.get("settings") or {}
    return {**metric, "seconds": seconds, "device": sft.get("device"), "quantization": sft.get("quantization"),
            "n": {k: sizes.get(f"n_{k}") for k in ("harmful", "benign", "task")}}


def bench(log: Path) -> dict | None:
    """The headline numbers of the last JSON object line of bench/run.py's output."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("{"):
            data = read_line(line)
            if isinstance(data, dict) and "safegrad_overhead" in data:
                out = {key: data.get(key) for key in BENCH_KEYS}
                out["device"] = (data.get("machine") or {}).get("device")
                return out
    return None


def read_line(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


def versions() -> dict:
    found = {}
    for name in ("torch", "bitsandbytes", "transformers", "peft"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def gpu() -> dict:
    try:
        import torch
    except ImportError:
        return {"name": None, "cuda": None}
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"name": name, "cuda": torch.version.cuda}


def summarise(out: Path) -> dict:
    ran = phases(out)
    chosen = {name: p for name, p in ran.items() if p["status"] != NOT_CHOSEN}
    demos = {q: demo(out / q) for q in QUANTIZATIONS}
    summary = {
        "ok": bool(chosen) and all(p["status"] == 0 for p in chosen.values())
        and all(demos[q] for q in QUANTIZATIONS if f"demo_{q}" in chosen),
        "gpu": gpu(), "versions": versions(),
        "refusal": {q: d and d["refusal"] for q, d in demos.items()},
        "over_refusal": {q: d and d["over_refusal"] for q, d in demos.items()},
        "utility": {q: d and d["utility"] for q, d in demos.items()},
        "seconds": {name: p["seconds"] for name, p in ran.items()},
        "status": {name: p["status"] for name, p in ran.items()},
        "demo_seconds": {q: d and d["seconds"] for q, d in demos.items()},
        "demo": {q: d and {k: d[k] for k in ("device", "quantization", "n")} for q, d in demos.items()},
        "bench": bench(out / "bench.log"),
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python bench/gpu_summary.py OUT_DIR", file=sys.stderr)
        return 2
    summary = summarise(Path(argv[0]))
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

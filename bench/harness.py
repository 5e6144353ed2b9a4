"""What every benchmark section shares: the settings of the measured runs, Markdown output, medians
and ratios, clocks, child processes, and `Bench` (the run's arguments, folders, data and runs).

Imports nothing heavy: bench/run.py reads it before it sets the environment torch and safespace read.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("safegrad", "trl", "safedelta", "compare", "e2e")
MODEL = "smollm2-135m"
BATCH, MAX_LENGTH, HARMFUL_RATIO = 8, 192, 0.2        # examples/configs/demo.yaml
LORA = dict(r=8, alpha=16, dropout=0.0, targets=("q_proj", "v_proj"))
WARMUP_STEPS = 2                                       # dropped from every training run
MAX_NEW_TOKENS = 32
GOALS = {"safegrad_overhead": "<= 1.6", "train_vs_trl": ">= 1.0", "compare_speedup": ">= 3",
         "safedelta_cold_s": "<= 30", "safedelta_warm_s": "<= 5"}


# ------------------------------------------------------------------------------------------- output
def say(message: str = "") -> None:
    print(message, flush=True)


def read_measured(path: Path, numeric: tuple[str, ...]) -> list[dict]:
    """The rows of a bench/data csv, the `numeric` columns as floats (None where empty)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in numeric:
            row[key] = float(row[key]) if row.get(key) else None
    return rows


def table(headers: list[str], rows: list[list]) -> None:
    """A Markdown table (readable in a terminal, pasteable into RESULTS.md)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    say("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    say("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        say("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    say()


def rate_cell(rate) -> str:
    """A metrics.Rate as '98.7 % [95.3, 99.6]' (value and 95 % interval, in percent)."""
    return f"{100 * rate.value:.1f} % [{100 * rate.low:.1f}, {100 * rate.high:.1f}]"


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
def own_home_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of a script that builds stage 0 in a cache folder of its own (--home, --seed, --sets)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="a cache folder of its own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sets", nargs="+", help="score only these evaluation sets (default: every one)")
    return parser


def chosen_sets(parser: argparse.ArgumentParser, sets: list[str] | None) -> tuple[list[str], list[str]]:
    """The harmful and the benign evaluation sets named by --sets (every one when None); a clear error
    for a name that is not a set."""
    from safespace import evalsets

    known = {kind: evalsets.keys_of(kind) for kind in ("harmful", "benign")}
    unknown = set(sets or ()) - {*known["harmful"], *known["benign"]}
    if unknown:
        parser.error(f"unknown --sets {sorted(unknown)}: choose from {[*known['harmful'], *known['benign']]}")
    return tuple([k for k in known[kind] if not sets or k in sets] for kind in ("harmful", "benign"))


def use_own_home(parser: argparse.ArgumentParser, home: Path) -> None:
    """Point this process at `home`, never the default cache folder: a build there would replace the
    default aligned base."""
    from safespace.config import DEFAULT_HOME

    if home.expanduser().resolve() == DEFAULT_HOME.resolve():
        parser.error("--home must not be the default cache folder: this build would replace the default aligned base")
    os.environ["SAFESPACE_HOME"] = str(home)


@contextlib.contextmanager
def stage0_stream(adjust):
    """Inside: stage 0's training stream, once made, goes through adjust(tokenized, stream, settings)
    (a bench build changes which rows it draws or how they weigh; train.BatchStream). Its checkpoints
    go to a folder of their own: a plain build must not continue one of these, nor they a plain one."""
    from unittest import mock

    from safespace import align, train

    plain, plain_folder = train._streams, align.checkpoint_folder

    def streams(settings, *args, **kwargs):
        task, stream, align_stream = plain(settings, *args, **kwargs)
        adjust(task, stream, settings)
        return task, stream, align_stream

    def folder(key):
        plain_path = plain_folder(key)
        return plain_path.with_name(f"{plain_path.name}-{adjust.__name__}")

    with mock.patch.object(train, "_streams", streams), mock.patch.object(align, "checkpoint_folder", folder):
        yield


@contextlib.contextmanager
def top_layers(top: int):
    """Inside: every LoRA adapter made covers only the model's top `top` layers (0: every layer)."""
    from unittest import mock
    from safespace import models

    plain_add, plain_config = models.add_lora, models.lora_config

    def add_lora(model, lora, adapter_name="default"):
        n = model.config.num_hidden_layers
        if not 0 < top <= n:
            raise SystemExit(f"--top-layers must be 1..{n} for this model")

        def config(settings):
            made = plain_config(settings)
            made.layers_to_transform = list(range(n - top, n))
            return made
        with mock.patch.object(models, "lora_config", config):
            return plain_add(model, lora, adapter_name)

    with mock.patch.object(models, "add_lora", add_lora) if top else contextlib.nullcontext():
        yield


def print_align_report(harmful_sets=None, benign_sets=None) -> None:
    """The aligned base's refusal per set, surface form and category (every set unless named), then one JSON line."""
    from safespace import demo, evalsets

    report = demo.align_report(harmful_sets or evalsets.keys_of("harmful"), benign_sets or evalsets.keys_of("benign"))
    print(demo.breadth_tables(report))
    print(json.dumps({k: v["refusal"]["value"] for k, v in report["sets"].items()}))


def cpu_model() -> str:
    """The CPU's model name (what lscpu says), else the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts() -> dict:
    import torch
    from safespace import models

    cpu = cpu_model()
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


class Clock:
    """Wall and CPU seconds (this process) since creation."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


# ------------------------------------------------------------------------------------------- the run
@dataclass
class Bench:
    """What every section gets: the arguments, the temporary home and its work folder, the task data
    and the run folders shared by the sections (a section trains what it needs if none did)."""
    args: argparse.Namespace
    home: Path
    prepared: Any = None
    runs: dict[str, Path] = field(default_factory=dict)     # sft (plain), safegrad (sft, batch 4), safedelta
    counter: int = 0

    @property
    def work(self) -> Path:
        return self.home / "work"

    def out(self, name: str) -> Path:
        self.counter += 1
        return self.work / f"{self.counter:03d}-{name}"

    def child_env(self) -> dict:
        env = dict(os.environ)
        env.update(BENCH_THREADS=str(self.args.threads),
                   PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
        return env

    def child_json(self, program: str, *args) -> dict:
        """Run a program of bench/children.py in a fresh Python process; its last stdout line (JSON),
        plus process_wall_s."""
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "bench.children", program, *map(str, args)], cwd=REPO,
                              env=self.child_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{program} subprocess failed:\n{proc.stderr[-3000:]}")
        return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_wall_s": time.perf_counter() - t0}

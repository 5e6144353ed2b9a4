"""bench/gpu_check.sh without a GPU: its syntax and config, its early stop without CUDA, its phases
and one-line summary with a stand-in interpreter, and bench/gpu_summary.py on a fake output folder."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import fake_run
from safespace import pipeline, runs
from safespace.variants import keys_of

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
CONFIG = REPO / "bench" / "gpu_check.yaml"


def load_summary_module():
    spec = importlib.util.spec_from_file_location("gpu_summary", REPO / "bench" / "gpu_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_parses_and_its_config_loads():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    config = pipeline.load_config(CONFIG)
    assert config.model == "smollm2-135m-safe" and config.quantization == "none"
    assert config.variants == list(keys_of()) and config.safegrad["mode"] != "off"     # every registered variant
    # the 4-bit run is this file with that one line rewritten
    assert len(re.findall(r"(?m)^quantization: none\b", CONFIG.read_text())) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the check instead")
def test_without_cuda_it_stops_at_once_with_one_clear_line(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert "no CUDA device" in done.stderr
    assert (tmp_path / "phases.tsv").read_text() == ""                 # no phase started


BENCH_LINE = {"safegrad_overhead": 1.5, "train_vs_trl": None, "safedelta_seconds": {"cold": 9.0, "warm": 1.0},
              "compare_speedup": 4.0, "seconds": 100.0, "machine": {"device": "cuda"}}

STAND_IN = """#!/usr/bin/env bash
# stands in for Python: the preflight passes, each phase writes what the real one would
echo "$*" >> "$CALLS"
case "$1" in
  -) cat > /dev/null ;;
  bench/gpu_summary.py) exec "$REAL_PYTHON" "$@" ;;
  bench/run.py) echo "a table"; echo '%s' ;;
  -m) if [ "$3" = run ]; then
        q=$(sed -n 's/^quantization: *\\([a-z0-9]*\\).*/\\1/p' "$4")
        mkdir -p "$6"
        rate=$([ "$q" = 4bit ] && echo 0.7 || echo 0.9)
        echo "{\\"variants\\": {\\"base\\": {\\"refusal\\": {\\"value\\": $rate}}}, \\"settings\\": {\\"seconds\\": 12.0}}" > "$6/results.json"
      fi ;;
esac
""" % json.dumps(BENCH_LINE)


def run_with_stand_in(tmp_path, budget: int, phases: str | None = None):
    python = tmp_path / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    env = dict(os.environ, PYTHON=str(python), REAL_PYTHON=sys.executable, CALLS=str(tmp_path / "calls"),
               GPU_CHECK_BUDGET_S=str(budget))
    if phases is not None:
        env["GPU_CHECK_PHASES"] = phases
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=120)
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    return done, out, calls


def test_every_phase_runs_and_stdout_is_one_json_line(tmp_path):
    done, out, calls = run_with_stand_in(tmp_path, budget=470)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["ok"] is True
    assert summary["status"] == {"align": 0, "align_4bit": 0, "demo_none": 0, "demo_4bit": 0, "bench": 0}
    assert summary["refusal"] == {"none": {"base": 0.9}, "4bit": {"base": 0.7}}    # the 4-bit run got 4bit
    assert summary["bench"]["compare_speedup"] == 4.0 and summary["bench"]["device"] == "cuda"
    assert set(summary["versions"]) == {"torch", "bitsandbytes", "transformers", "peft"}
    assert any(c.startswith("bench/run.py --quick --json") for c in calls)
    assert any(c.startswith("-m safespace align") for c in calls)
    assert "-m safespace align --quantization 4bit" in calls


def test_a_spent_budget_skips_the_phases_and_still_sums_up(tmp_path):
    done, out, calls = run_with_stand_in(tmp_path, budget=0)
    assert done.returncode == 1
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["ok"] is False and set(summary["status"].values()) == {"skipped"}
    assert summary["refusal"] == {"none": None, "4bit": None} and summary["bench"] is None
    assert not any("safespace run" in c for c in calls)


def test_chosen_phases_run_alone_and_the_summary_judges_them_alone(tmp_path):
    done, out, calls = run_with_stand_in(tmp_path, budget=470, phases="align_4bit,demo_4bit")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["ok"] is True and summary["refusal"] == {"none": None, "4bit": {"base": 0.7}}
    assert summary["status"] == {"align": "not chosen", "demo_none": "not chosen", "align_4bit": 0,
                                 "demo_4bit": 0, "bench": "not chosen"}
    assert [c for c in calls if c.startswith("-m safespace")] == [
        "-m safespace align --quantization 4bit", f"-m safespace run {out}/gpu_check_4bit.yaml --out {out}/4bit --overwrite"]


def test_an_unknown_phase_stops_at_once_with_one_clear_line(tmp_path):
    done, out, calls = run_with_stand_in(tmp_path, budget=470, phases="align demo_8bit")
    assert done.returncode == 2 and done.stdout == "" and not calls
    assert "unknown phase 'demo_8bit'" in done.stderr and "align demo_none align_4bit demo_4bit bench" in done.stderr


def test_the_summary_reads_each_demo_run_and_the_bench_line(tmp_path):
    gpu_summary = load_summary_module()
    out = tmp_path / "out"
    rates = {"none": (0.95, 0.1, 0.9, 0.8), "4bit": (0.75, 0.0, 0.8, 0.6)}
    for quantization, values in rates.items():
        variants = {}
        for name, value in zip(("base", "sft", "safegrad", "safedelta"), values):
            variants[name] = {"refusal": {"value": value, "n": 100}, "over_refusal": {"value": 0.05, "n": 100},
                              "utility": {"value": 0.5, "n": 80, "metric": "accuracy"}}
            if name != "base":
                run = fake_run(out / quantization / name, kind="safedelta" if name == "safedelta" else "train",
                               summary={"status": "finished", "seconds": {"sft": 10.0, "safegrad": 15.0}.get(name, 5.0)})
                runs.atomic_write_json(run.path / "config.json",
                                       {**run.config, "device": "cuda", "quantization": quantization})
        runs.atomic_write_json(out / quantization / "results.json", {
            "variants": variants, "settings": {"seconds": 60.0, "n_harmful": 100, "n_benign": 100, "n_task": 80}})
    (out / "bench.log").write_text("## Summary\n{not json\n" + json.dumps(BENCH_LINE) + "\nwarning: done\n")
    (out / "phases.tsv").write_text("align\t0\t12.3\ndemo_none\t0\t70.0\ndemo_4bit\t0\t90.4\nbench\t1\t200.0\n")

    summary = gpu_summary.summarise(out)
    assert summary["refusal"]["none"] == {"base": 0.95, "sft": 0.1, "safegrad": 0.9, "safedelta": 0.8}
    assert summary["refusal"]["4bit"]["safedelta"] == 0.6
    assert summary["demo_seconds"]["none"] == {"train_sft": 10.0, "train_safegrad": 15.0, "safedelta": 5.0,
                                              "evaluate_and_loading": 30.0, "total": 60.0}
    assert summary["demo"]["4bit"] == {"device": "cuda", "quantization": "4bit",
                                       "n": {"harmful": 100, "benign": 100, "task": 80}}
    assert summary["seconds"] == {"align": 12.3, "demo_none": 70.0, "demo_4bit": 90.4, "bench": 200.0}
    assert summary["bench"]["safegrad_overhead"] == 1.5
    assert summary["ok"] is False                                   # the bench phase exited 1
    assert json.loads(json.dumps(summary)) == summary              # plain JSON throughout

"""bench/run.py's harness without the embedded model: its arguments, and the child programs (run in a
fresh process, one JSON line each) on a tiny random model's run."""
import argparse

import pytest

from bench import harness
from bench.run import parse_args


def test_arguments_and_their_defaults():
    args = parse_args(["--quick", "--only", "safegrad,compare"])
    assert args.sections == ["safegrad", "compare"] and (args.rounds, args.steps, args.prompts) == (2, 4, 40)
    assert parse_args([]).sections == list(harness.SECTIONS)
    for bad in (["--only", "nope"], ["--steps", str(harness.WARMUP_STEPS)]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_child_programs_print_their_measurements(tiny_model_dir, tmp_path, monkeypatch):
    from safespace import train
    from safespace.config import LoraSettings, TrainSettings
    from safespace.data import Example

    monkeypatch.setenv("SAFESPACE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SAFESPACE_CALIBRATION_ROWS", "4")
    rows = [Example(f"Label this review: film {i} was {'good' if i % 2 else 'bad'}",
                    "positive" if i % 2 else "negative") for i in range(8)]
    settings = TrainSettings(model=tiny_model_dir, quantization="none", steps=2, batch_size=2, max_length=64,
                             warmup=0, lora=LoraSettings(r=2, alpha=4))
    source = train.train(settings, rows, tmp_path / "sft").path
    bench = harness.Bench(argparse.Namespace(threads=1), tmp_path / "home")
    floor = bench.child_json("floor", source)
    assert floor["seconds"] > 0 and floor["process_wall_s"] >= floor["seconds"]
    defended = bench.child_json("defend", source, tmp_path / "sd", tmp_path / "sd-again")
    assert defended["threads"] == 1 and defended["layers"] > 0 and defended["again_in_process_s"] > 0
    assert [m for _, m in defended["marks"]][-1] == "done" and not defended["hessian_cached"]
    assert (tmp_path / "sd" / "summary.json").exists() and (tmp_path / "sd-again" / "summary.json").exists()


def test_stage0_tradeoff_front_and_knee():
    from bench.stage0_tradeoff import knee, pareto_front
    # (over-refusal, refusal): b dominates d; a and c are the front's ends, b bends it
    points = [(2.0, 60.0), (8.0, 92.0), (30.0, 96.0), (10.0, 85.0)]
    assert pareto_front(points) == [0, 1, 2]
    assert knee(points) == 1
    # a straight front has no bend: the knee is an end or a point on the chord, never off the front
    line = [(float(x), float(x)) for x in range(5)]
    assert knee(line) in pareto_front(line) == [0, 1, 2, 3, 4]
    assert knee([(5.0, 90.0), (5.0, 80.0)]) == 0      # one point dominates: it is the whole front


def test_stage0_tradeoff_reads_the_measured_recipes():
    from bench.stage0_tradeoff import SHOWN, read
    rows = read()
    assert len({r["recipe"] for r in rows}) == len(rows) >= 5
    for r in rows:
        assert all(r[k] is None or 0 <= r[k] <= 100 for k in SHOWN) and r["rewrites"] is not None

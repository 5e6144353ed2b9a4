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
    recipes = {r["recipe"] for r in rows if r["seed"] == 0}
    for r in rows:                      # another seed's build names the recipe it rebuilds
        assert r["seed"] == 0 or r["recipe"].split(" seed ")[0] in recipes


def test_quadratic_tradeoff_is_the_minimiser_of_its_two_costs():
    import torch
    from bench.safedelta_tradeoff import quadratic_tradeoff
    torch.manual_seed(0)
    X_s, X_t = torch.randn(40, 6, dtype=torch.float64), torch.randn(50, 6, dtype=torch.float64) * 3
    H_s, H_t = X_s.T @ X_s, X_t.T @ X_t
    A = torch.randn(2, 6, dtype=torch.float64)
    eye = torch.eye(6, dtype=torch.float64)
    Hs, Ht = H_s / H_s.diagonal().mean() + 0.01 * eye, H_t / H_t.diagonal().mean() + 0.01 * eye

    def cost(M, weight):
        return torch.trace(M @ Hs @ M.T) + weight * torch.trace((M - A) @ Ht @ (M - A).T)

    for weight in (0.01, 0.3, 5.0):
        best = quadratic_tradeoff(A, H_s, H_t, weight)
        for _ in range(20):                   # any step away costs more: a convex cost at its minimum
            assert cost(best + 1e-3 * torch.randn_like(A), weight) > cost(best, weight)
    assert torch.equal(quadratic_tradeoff(A, H_s, H_t, 0.0), torch.zeros_like(A))     # the base
    torch.testing.assert_close(quadratic_tradeoff(A, H_s, H_t, 1e9), A)              # the fine-tune


def test_global_exclusions_take_the_highest_ratios_over_all_layers():
    import torch
    from bench.safedelta_tradeoff import global_exclusions
    ratios = {"a": torch.tensor([1.0, 9.0, 8.0, 2.0]), "b": torch.tensor([7.0, 3.0]), "c": torch.tensor([0.5, 0.1])}
    assert global_exclusions(ratios, 0.25) == {"a": 0.5, "b": 0.0, "c": 0.0}       # 9 and 8
    assert global_exclusions(ratios, 0.5) == {"a": 0.5, "b": 1.0, "c": 0.0}        # and 7, 3
    assert global_exclusions(ratios, 0.0) == {"a": 0.0, "b": 0.0, "c": 0.0}
    assert global_exclusions(ratios, 1.0) == {"a": 1.0, "b": 1.0, "c": 1.0}


def test_safedelta_tradeoff_reads_the_measured_budgets():
    from bench.safedelta_tradeoff import SHOWN, bounds, read
    rows = read()
    harm_floor, task_floor = bounds(rows)
    assert 0 < harm_floor < 100 and 0 < task_floor < 100
    for r in rows:
        assert all(r[k] is None or (0 <= r[k] <= 100 if k != "held_in_rise" else r[k] >= 0) for k in SHOWN)
        assert r["harmbench"] is not None and r["task_accuracy"] is not None


def test_safedelta_tradeoff_writes_a_defended_run_each_way(tiny_model_dir, tmp_path, monkeypatch):
    import torch
    from bench.safedelta_tradeoff import write_variant
    from safespace import models, runs, safedelta, train
    from safespace.config import LoraSettings, TrainSettings
    from safespace.data import Example

    monkeypatch.setenv("SAFESPACE_HOME", str(tmp_path / "home"))
    rows = [Example(f"Label this review: film {i} was {'good' if i % 2 else 'bad'}",
                    "positive" if i % 2 else "negative") for i in range(8)]
    settings = TrainSettings(model=tiny_model_dir, quantization="none", steps=3, batch_size=2, max_length=64,
                             warmup=0, lr=1e-2, lora=LoraSettings(r=2, alpha=4))
    source = train.train(settings, rows, tmp_path / "sft")
    written, rise = {}, {}
    for way, value in (("quadratic", 0.0), ("exclude", 0.0), ("global", 0.0), ("exclude", 0.5)):
        out = tmp_path / f"{way}-{value}"
        write_variant(source.path, way, value, out)
        run = runs.load_run(out)
        assert run.kind == "safedelta" and run.config["source_run"] == str(source.path)
        assert run.config["bench_way"] == {"way": way, "value": value}
        peft_model = models.load_adapters(models.load(tiny_model_dir, "none").model, {"ft": run.adapter})
        written[way, value] = torch.cat([layer.lora_A["ft"].weight.flatten() for layer in
                                         safedelta.lora_layers(peft_model, "ft").values()])
        rise[way, value] = run.summary["held_in_rise"]
    assert not written["quadratic", 0.0].any()           # safety weight only: A' = 0, the base itself
    assert rise["quadratic", 0.0] == pytest.approx(0.0, abs=1e-5)
    # no column excluded: per layer or over all layers, the same adapter; excluding half changes it
    assert torch.allclose(written["exclude", 0.0], written["global", 0.0])
    assert not torch.allclose(written["exclude", 0.0], written["exclude", 0.5])


def test_stage0_sampler_draws_each_refusal_once_with_the_defaults_share():
    import random
    from bench.stage0_sampler import balanced_batches, refusal_weight
    lengths = [random.Random(i).randint(5, 90) for i in range(100)]       # rows 0-29 refusals, 30-99 benign
    batches = balanced_batches(lengths, 30, 3, 8, random.Random(0))
    assert len(batches) == 10 and all(len(b) == 8 and sum(i < 30 for i in b) == 3 for b in batches)
    drawn = [i for b in batches for i in b]
    assert len(set(drawn)) == len(drawn) and {i for i in drawn if i < 30} == set(range(30))   # every refusal once
    assert len(balanced_batches(lengths, 30, 3, 8, random.Random(1))) == 10
    assert len(balanced_batches(lengths[:40], 30, 3, 8, random.Random(0))) == 2    # 10 benign rows: 2 batches
    assert balanced_batches(lengths, 30, 3, 8, random.Random(0)) == batches           # seeded
    # the weight keeps the refusals' expected share of the loss: w * 3 / (w * 3 + 5) = 914 / 4734
    w = refusal_weight(914, 4734, 3, 8)
    assert w * 3 / (w * 3 + 5) == pytest.approx(914 / 4734) and refusal_weight(1, 8, 1, 8) == pytest.approx(1.0)


def test_a_batch_stream_hands_each_batch_its_rows_weights():
    from safespace.data import Tokenized
    from safespace.train import BatchStream

    ids = [[1, 2, 3 + i] for i in range(4)]
    stream = BatchStream(Tokenized(ids, [[-100, 2, 3 + i] for i in range(4)], 0, [3] * 4), 2, 0, seed=0, device="cpu")
    assert "row_weight" not in stream.next()                       # unweighted unless given
    stream.row_weight = [0.5, 1.0, 2.0, 4.0]
    batch = stream.next()
    rows = [int(r[2]) - 3 for r in batch["input_ids"]]
    assert batch["row_weight"].tolist() == [stream.row_weight[i] for i in rows]


def test_a_batch_stream_draws_its_epochs_by_its_plan_and_bench_builds_reach_it(tokenizer):
    from bench.harness import stage0_stream
    from bench.stage0_sampler import balanced_batches
    from safespace import align, data, train
    from safespace.config import TrainSettings

    rows = [data.Example(prompt=f"question {i}", response="answer " * (i % 5 + 1)) for i in range(16)]
    seen, planned = [], []

    def plan(lengths, batch_size, rng):      # what bench/stage0_sampler.py plans: 1 of rows 0-3 in each batch
        planned.append(balanced_batches(lengths, 4, 1, batch_size, rng))
        return list(planned[-1])

    def balance(task, stream, settings):
        seen.append((len(task.lengths), settings.batch_size))
        stream.plan = plan

    with stage0_stream(balance):
        task, stream, _ = train._streams(TrainSettings(batch_size=4), rows, None, tokenizer, "cpu")
        own_checkpoints = align.checkpoint_folder("k")
    assert seen == [(16, 4)] and train._streams.__name__ == "_streams"        # unpatched outside
    assert own_checkpoints != align.checkpoint_folder("k") and own_checkpoints.name.endswith("-balance")
    got = [stream.next() for _ in range(4)]
    assert stream.epoch == 1 and len(planned) == 1 and not stream.queue
    assert all(sum(i < 4 for i in b) == 1 for b in planned[0])
    as_rows = [sorted(tuple(ids[mask.bool()].tolist()) for ids, mask in zip(b["input_ids"], b["attention_mask"]))
               for b in got]
    assert as_rows == [sorted(tuple(task.input_ids[i]) for i in b) for b in reversed(planned[0])]   # popped from the end


def test_top_layers_puts_lora_on_the_top_layers_only(tokenizer):
    """bench/stage0_short.py --top-layers: the adapter trains the model's top N layers and no other."""
    from bench.harness import top_layers
    from helpers import tiny_llama
    from safespace import models
    from safespace.config import LoraSettings

    def trained_layers(model):
        return sorted({int(n.split(".layers.")[1].split(".")[0]) for n, p in model.named_parameters() if p.requires_grad})

    with top_layers(2):
        assert trained_layers(models.add_lora(tiny_llama(tokenizer, layers=4), LoraSettings(r=2, alpha=4))) == [2, 3]
    assert trained_layers(models.add_lora(tiny_llama(tokenizer, layers=4), LoraSettings(r=2, alpha=4))) == [0, 1, 2, 3]


def test_contrast_basis_finds_the_directions_refusals_use_and_benign_rows_do_not():
    """bench/stage0_nullspace.py --mode contrast: the kept directions are those with the most refusal
    energy per unit of benign energy, not the most refusal energy."""
    import torch
    from bench.stage0_nullspace import contrast_basis, projector

    benign = torch.diag(torch.tensor([1.0, 1.0, 100.0, 100.0, 1.0, 1.0]))
    harmful = torch.diag(torch.tensor([10.0, 10.0, 50.0, 50.0, 1.0, 1.0]))   # dims 2, 3: most energy, ratio 0.5
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))[0]
    basis = contrast_basis(rotation @ benign @ rotation.T, rotation @ harmful @ rotation.T, m=2)
    kept = projector(basis, keep=True)
    assert torch.allclose(kept @ rotation[:, :2], rotation[:, :2], atol=1e-4)      # dims 0, 1 (ratio 10)
    assert torch.allclose(kept @ rotation[:, 2:], torch.zeros(6, 4), atol=1e-4)
    off = projector(basis, keep=False)
    assert torch.allclose(off @ off, off, atol=1e-5) and torch.allclose(off + kept, torch.eye(6), atol=1e-5)


def test_benign_nullspace_keeps_the_adapter_in_its_subspace_through_training(tokenizer):
    """The constraint holds at initialisation and after optimiser steps, so the saved adapter is exact."""
    import torch
    from bench.stage0_nullspace import benign_nullspace
    from helpers import tiny_llama
    from safespace import models
    from safespace.config import LoraSettings

    model = tiny_llama(tokenizer, layers=2)
    targets = {n: m for n, m in model.named_modules() if n.endswith(".q_proj")}
    made = {n: torch.eye(m.in_features)[:, :3] @ torch.eye(m.in_features)[:3] for n, m in targets.items()}
    with benign_nullspace(made):
        peft_model = models.add_lora(model, LoraSettings(r=2, alpha=4, targets=("q_proj",)))
        weights = [p for n, p in peft_model.named_parameters() if "lora_A" in n]
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(2):
            peft_model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert len(weights) == 2
    for w in weights:
        assert w.abs()[:, :3].sum() > 0 and torch.equal(w[:, 3:], torch.zeros_like(w[:, 3:]))

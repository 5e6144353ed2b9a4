"""The training loop on a tiny random model: run folders, stop, determinism, SafeGrad logging."""
import json
import random

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from safespace import models, runs, train
from safespace.config import LoraSettings, SafeGradSettings, TrainSettings
from safespace.data import Example

EXAMPLES = [Example(prompt=f"Classify review {i}: {'great' if i % 2 else 'awful'} stuff", response=
                    "positive" if i % 2 else "negative") for i in range(24)]
ALIGN = [Example(prompt=f"Do harmful thing {i}", response="I can't help with that.") for i in range(8)]


def settings(model_dir, **kw):
    base = dict(model=model_dir, quantization="none", steps=4, lr=1e-2, batch_size=4, max_length=64,
                warmup=1, lora=LoraSettings(r=4, alpha=8))
    base.update(kw)
    return TrainSettings(**base)


def test_plain_run_writes_a_complete_loadable_peft_run(tiny_model_dir, tmp_path):
    events = []
    run = train.train(settings(tiny_model_dir), EXAMPLES, tmp_path / "run", on_event=events.append)
    assert [e.kind for e in events] == ["start"] + ["step"] * 4 + ["end"]
    assert events[-2].metrics["eta"] == pytest.approx(0.0, abs=1e-9)
    loaded = runs.load_run(tmp_path / "run")
    assert loaded.summary["status"] == "finished" and loaded.summary["steps_done"] == 4
    rows = loaded.metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in rows)
    assert json.loads((run.path / "config.json").read_text())["settings"]["steps"] == 4
    base = models.load(tiny_model_dir, quantization="none", device="cpu").model
    peft_model = PeftModel.from_pretrained(base, str(run.adapter))
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)


def test_loss_goes_down_on_repeated_data(tiny_model_dir, tmp_path):
    s = settings(tiny_model_dir, steps=30, lr=3e-2, warmup=2, batch_size=8)
    run = train.train(s, EXAMPLES[:8], tmp_path / "run")
    losses = [r["loss"] for r in run.metrics()]
    # a random tiny model starts at log(vocab) ~ 10.8; LoRA on attention alone moves it slowly
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2
    assert losses[-1] < losses[0]


def test_same_seed_same_run(tiny_model_dir, tmp_path):
    a = train.train(settings(tiny_model_dir), EXAMPLES, tmp_path / "a")
    b = train.train(settings(tiny_model_dir), EXAMPLES, tmp_path / "b")
    assert [r["loss"] for r in a.metrics()] == [r["loss"] for r in b.metrics()]
    wa = load_file(str(a.adapter / "adapter_model.safetensors"))
    wb = load_file(str(b.adapter / "adapter_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_decision_weight_reaches_the_training_loss(tiny_model_dir, tmp_path, monkeypatch):
    from safespace import safegrad
    seen, plain = [], safegrad.sft_loss
    monkeypatch.setattr(safegrad, "sft_loss", lambda model, batch, *args, **kw: seen.append(args) or plain(model, batch, *args, **kw))
    train.train(settings(tiny_model_dir, decision_weight=4.0, decision_tokens=2), EXAMPLES, tmp_path / "w")
    train.train(settings(tiny_model_dir), EXAMPLES, tmp_path / "u")
    assert seen == [(4.0, 2)] * 4 + [(0.0, 4)] * 4     # the maths: tests/test_safegrad.py


def test_stop_flag_leaves_a_consistent_stopped_run(tiny_model_dir, tmp_path):
    seen = []
    run = train.train(settings(tiny_model_dir, steps=50), EXAMPLES, tmp_path / "run",
                      on_event=seen.append, should_stop=lambda: sum(e.kind == "step" for e in seen) >= 2)
    loaded = runs.load_run(tmp_path / "run")
    assert loaded.summary["status"] == "stopped" and loaded.summary["steps_done"] == 2
    assert len(loaded.metrics()) == 2
    assert "stopped after 2 steps" in seen[-1].message
    # the saved adapter is exactly the in-memory state at the stop
    base = models.load(tiny_model_dir, quantization="none", device="cpu").model
    PeftModel.from_pretrained(base, str(run.adapter))


def test_safegrad_logs_alignment_and_conflicts(tiny_model_dir, tmp_path):
    s = settings(tiny_model_dir, steps=5, safegrad=SafeGradSettings(mode="sft", align_size=8, align_batch=4))
    run = train.train(s, EXAMPLES, tmp_path / "run", align_examples=ALIGN)
    rows = run.metrics()
    for key in ["align_loss", "cos", "conflict", "removed_norm", "align_grad_norm"]:
        assert all(key in r for r in rows)
    assert all(r["align_loss"] > 0 for r in rows)
    assert all((r["removed_norm"] > 0) == r["conflict"] for r in rows)
    assert 0 <= run.summary["conflict_rate"] <= 1


def test_kl_safegrad_has_no_alignment_gradient_at_step_one(tiny_model_dir, tmp_path):
    s = settings(tiny_model_dir, steps=3, safegrad=SafeGradSettings(mode="kl", align_size=8, align_batch=4))
    rows = train.train(s, EXAMPLES, tmp_path / "run", align_examples=ALIGN).metrics()
    assert rows[0]["align_grad_norm"] < 1e-6 and not rows[0]["conflict"]
    assert rows[-1]["align_grad_norm"] > rows[0]["align_grad_norm"]


def test_every_k_reuses_the_alignment_gradient(tiny_model_dir, tmp_path):
    s = settings(tiny_model_dir, steps=4, safegrad=SafeGradSettings(mode="sft", align_size=8, align_batch=4, every=2))
    rows = train.train(s, EXAMPLES, tmp_path / "run", align_examples=ALIGN).metrics()
    assert rows[0]["align_loss"] == rows[1]["align_loss"] and rows[2]["align_loss"] == rows[3]["align_loss"]


def test_length_grouped_batches_cover_each_index_once():
    lengths = [random.Random(i).randint(5, 200) for i in range(101)]
    batches = train.length_grouped_batches(lengths, 8, random.Random(0))
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(101)) and all(len(b) <= 8 for b in batches)


def test_lr_schedule_warms_up_then_decays():
    f = [train.lr_factor(s, 5, 50) for s in range(50)]
    assert f[0] == pytest.approx(0.2) and f[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[5:], f[6:])) and f[-1] >= 0.1

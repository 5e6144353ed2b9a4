"""The data-mixing baseline: refusals mixed into the fine-tuning rows, how the demo and the app train
it, and the post-hoc defence on every source run that exists."""
from collections import Counter
from types import SimpleNamespace

import pytest

from conftest import fake_run
from safespace import align, data, jobs, pipeline, train, workflows
from safespace.config import ConfigError, TrainSettings
from safespace.safetymix import mix_safety

TASK = [data.Example(f"Review {i}: fine?", "positive") for i in range(90)]


def test_refusals_make_up_the_share_and_the_task_rows_stay():
    mixed = mix_safety(TASK, 0.1, seed=3)
    assert len(mixed) == 100                                      # 10 of 100 = the share
    added = Counter(e.prompt for e in mixed) - Counter(e.prompt for e in TASK)
    assert sum(added.values()) == 10 and Counter(e.prompt for e in TASK) <= Counter(e.prompt for e in mixed)
    pool = {e.prompt: e.response for e in data.bundled("alignment")}
    assert all(p in pool for p in added)                          # every added row is an alignment refusal
    assert mixed == mix_safety(TASK, 0.1, seed=3) and mixed != mix_safety(TASK, 0.1, seed=4)
    assert mix_safety(TASK, 0.0) == TASK


def test_a_bad_share_is_refused():
    with pytest.raises(ValueError, match="between 0 and 0.5"):
        mix_safety(TASK, 0.6)
    with pytest.raises(ConfigError, match="safety mix must be in"):
        TrainSettings(safety_mix=-0.1)


def test_train_variant_feeds_the_mixed_rows_and_records_them(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(align, "ensure", lambda *a, **k: None)
    monkeypatch.setattr(train, "train", lambda settings, rows, out, **k: seen.update(rows=rows, **k))
    prepared = pipeline.Prepared(TASK[:80], [], 80, 0, "rows", 0.0, 0)
    pipeline.train_variant(TrainSettings(safety_mix=0.2), prepared, tmp_path / "run")
    assert len(seen["rows"]) == 100 and seen["extra_config"]["data"]["safety_examples"] == 20
    pipeline.train_variant(TrainSettings(), prepared, tmp_path / "run")
    assert seen["rows"] == TASK[:80] and seen["extra_config"]["data"]["safety_examples"] == 0


def test_train_all_in_the_app_trains_every_registered_variant_with_its_settings():
    plan = dict(jobs.train_plan(TrainSettings(steps=7), "kl"))
    assert list(plan) == ["sft", "mix", "safegrad"]
    assert plan["mix"].safety_mix == 0.1 and plan["mix"].safegrad.mode == "off"
    assert plan["safegrad"].safegrad.mode == "kl" and plan["sft"].safegrad.mode == "off"
    assert {s.steps for s in plan.values()} == {7} and plan["sft"].safety_mix == 0


def test_the_app_defends_every_run_a_post_hoc_variant_is_made_from(tmp_path, monkeypatch):
    made = []

    def fake_defend(source, out, keep, on_progress):
        made.append((source.rsplit("/", 1)[-1], out.rsplit("/", 1)[-1]))
        return fake_run(out, kind="safedelta", summary={"status": "finished", "kept_energy_frac": 0.8})
    monkeypatch.setitem(jobs.DEFENCES, "safedelta", fake_defend)
    ws = jobs.Workspace(tmp_path / "visitor-eeee")
    ctx = SimpleNamespace(workspace=ws, channel=None, progress=lambda *a, **k: None)
    monkeypatch.setattr(workflows, "ProgressReporter", lambda *a, **k: None)
    with pytest.raises(jobs.JobError, match="no plain fine-tune"):
        jobs.defend_job(ctx, None)
    fake_run(ws.run_path("sft"))
    assert jobs.defend_job(ctx, None)["name"] == "safedelta" and made == [("sft", "safedelta")]
    fake_run(ws.run_path("safegrad"))
    made.clear()
    jobs.defend_job(ctx, None)
    assert made == [("sft", "safedelta"), ("safegrad", "safegrad-safedelta")]
    assert set(ws.variants()[0]) == {"base", "sft", "safegrad", "safedelta", "safegrad-safedelta"}

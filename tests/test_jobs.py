"""Background jobs: one worker slot, FIFO queue with positions, stop, failures, isolation, expiry."""
import os
import sys
import threading
import time
import zipfile

import pytest

from conftest import fake_run
from safespace import jobqueue, jobs
from safespace.train import Event

A, B = "visitor-aaaa", "visitor-bbbb"


@pytest.fixture
def manager(tmp_path):
    m = jobs.JobManager(tmp_path / "sessions", max_queue=3, max_active_per_visitor=3)
    yield m
    m.close(wait=5)


def wait_done(m, visitor, job_id, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = m.get(visitor, job_id)
        if info is not None and not info.active:
            return info
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} still {m.get(visitor, job_id).status} after {timeout} s")


def wait_status(m, visitor, job_id, status, timeout=5.0):
    deadline = time.time() + timeout
    while m.get(visitor, job_id).status != status:
        assert time.time() < deadline, f"job never reached {status}"
        time.sleep(0.01)


def blocker():
    """A job that runs until its gate opens (keeps the single worker busy)."""
    gate = threading.Event()

    def fn(ctx):
        ctx.progress("holding the worker", 0.5)
        gate.wait(10)
        return "released"
    return gate, fn


def test_job_runs_in_background_and_reports_progress(manager):
    def fn(ctx, n):
        for i in range(n):
            ctx.progress(f"step {i + 1}/{n}", (i + 1) / n, type="step", i=i)
        return {"sum": n * (n - 1) // 2}

    info = manager.submit(A, "train", fn, 4, title="count")
    assert info.status == "queued" and info.title == "count"
    done = wait_done(manager, A, info.id)
    assert done.status == "finished" and done.result == {"sum": 6}
    assert done.progress == 1.0 and done.error is None
    steps = [e for e in done.events if e.get("type") == "step"]
    assert [e["i"] for e in steps] == [0, 1, 2, 3]
    assert done.finished >= done.started >= done.created


def test_one_worker_fifo_order_and_queue_positions(manager):
    order = []
    gate, hold = blocker()
    first = manager.submit(A, "train", lambda ctx: order.append("first") or hold(ctx))
    wait_status(manager, A, first.id, "running")
    second = manager.submit(B, "train", lambda ctx: order.append("second"))
    third = manager.submit(A, "defend", lambda ctx: order.append("third"))
    assert manager.get(B, second.id).ahead == 1      # the running job
    assert manager.get(A, third.id).ahead == 2       # running + second
    assert manager.get(A, third.id).status == "queued"
    assert manager.get(A, first.id).message == "holding the worker"
    gate.set()
    wait_done(manager, A, third.id)
    assert order == ["first", "second", "third"]
    assert manager.get(A, third.id).ahead == 0


def test_full_queue_is_refused_with_a_clear_message(manager):
    gate, hold = blocker()
    running = manager.submit("visitor-0000", "train", hold)
    wait_status(manager, "visitor-0000", running.id, "running")
    for i in range(manager.max_queue):
        manager.submit(f"visitor-{i:04d}x", "ask", lambda ctx: None)
    with pytest.raises(jobs.QueueFull, match="queue is full"):
        manager.submit("visitor-late1", "ask", lambda ctx: None)
    assert manager.queue_length() == manager.max_queue
    gate.set()


def test_per_visitor_cap(tmp_path):
    m = jobs.JobManager(tmp_path, max_queue=8, max_active_per_visitor=2)
    gate, hold = blocker()
    try:
        m.submit(A, "train", hold)
        m.submit(A, "ask", lambda ctx: None)
        with pytest.raises(jobs.JobError, match="already have 2 jobs"):
            m.submit(A, "defend", lambda ctx: None)
        m.submit(B, "ask", lambda ctx: None)          # another visitor is not affected
    finally:
        gate.set()
        m.close(wait=5)


def test_visitors_never_see_each_others_jobs_or_folders(manager):
    info = manager.submit(A, "train", lambda ctx: ctx.workspace.root.name)
    done = wait_done(manager, A, info.id)
    assert done.result == A                              # the job ran in A's workspace
    assert manager.get(B, info.id) is None
    assert manager.jobs(B) == [] and manager.latest(B, "train") is None
    assert manager.stop(B, info.id) is False
    assert manager.workspace(A).root != manager.workspace(B).root
    assert [j.id for j in manager.jobs(A)] == [info.id]


@pytest.mark.parametrize("bad", ["", "short", "../../etc", "a/b/c/d/e/f", "x" * 65, None, 42, "name with space"])
def test_invalid_visitor_ids_are_refused(manager, bad):
    assert not jobs.valid_visitor(bad)
    with pytest.raises(jobs.JobError):
        manager.workspace(bad)


def test_new_visitor_ids_are_valid_and_unique():
    ids = {jobs.new_visitor_id() for _ in range(100)}
    assert len(ids) == 100 and all(jobs.valid_visitor(i) for i in ids)


def test_stop_a_running_job_within_a_step(manager):
    steps_done = []

    def loop(ctx):
        for step in range(1000):
            if ctx.should_stop():
                return {"steps": step}
            steps_done.append(step)
            ctx.progress(f"step {step}", step / 1000)
            time.sleep(0.02)
        return {"steps": 1000}

    info = manager.submit(A, "train", loop)
    while len(steps_done) < 3:
        time.sleep(0.01)
    assert manager.stop(A, info.id)
    seen = len(steps_done)
    done = wait_done(manager, A, info.id)
    assert done.status == "stopped"
    assert done.result["steps"] <= seen + 2              # stopped within a couple of steps
    assert "stopped" in done.message
    assert manager.stop(A, info.id) is False             # nothing left to stop


def test_stop_flag_reaches_the_engine_through_the_channel(manager):
    """Engine code only sees StopCheck (a file), as it would in a separate GPU process."""
    def loop(ctx):
        check = jobs.StopCheck(ctx.channel)
        n = 0
        while not check() and n < 2000:
            n += 1
            time.sleep(0.005)
        return n

    info = manager.submit(A, "train", loop)
    wait_status(manager, A, info.id, "running")
    time.sleep(0.05)
    manager.stop(A, info.id)
    done = wait_done(manager, A, info.id)
    assert done.status == "stopped" and done.result < 2000


def test_stop_a_queued_job_removes_it_from_the_queue(manager):
    gate, hold = blocker()
    ran = []
    first = manager.submit(A, "train", hold)
    wait_status(manager, A, first.id, "running")
    queued = manager.submit(A, "defend", lambda ctx: ran.append(1))
    assert manager.stop(A, queued.id)
    assert manager.get(A, queued.id).status == "stopped"
    assert manager.queue_length() == 0
    gate.set()
    wait_done(manager, A, first.id)
    time.sleep(0.1)
    assert ran == []


def test_a_failing_job_becomes_a_short_message_and_the_worker_goes_on(manager):
    def boom(ctx):
        raise KeyError("missing piece")

    def refuse(ctx):
        raise jobs.JobError("there is no plain fine-tune yet: train one first")

    bad = manager.submit(A, "train", boom)
    mine = manager.submit(A, "defend", refuse)
    good = manager.submit(A, "ask", lambda ctx: "fine")
    failed = wait_done(manager, A, bad.id)
    assert failed.status == "failed"
    assert failed.error == "KeyError: 'missing piece'"
    assert "Traceback" not in failed.error and "File " not in failed.error
    assert wait_done(manager, A, mine.id).error == "there is no plain fine-tune yet: train one first"
    assert wait_done(manager, A, good.id).result == "fine"


def test_an_expected_failure_is_one_log_line_a_bug_keeps_its_traceback(manager, monkeypatch):
    import logging
    from safespace.config import ModelError

    def offline(ctx):
        raise ModelError("the model hub is not reachable, so Qwen/Qwen3-0.6B cannot be downloaded")

    def bug(ctx):
        raise KeyError("missing piece")

    records = []
    handler = logging.Handler()
    handler.emit = records.append                     # on the jobs logger itself, whatever propagates above it
    monkeypatch.setattr(jobqueue.log, "handlers", [handler])
    expected = manager.submit(A, "train", offline)
    wait_done(manager, A, expected.id)
    wait_done(manager, A, manager.submit(A, "train", bug).id)
    assert len(records) == 2                          # each failure logged once
    assert "the model hub is not reachable" in records[0].getMessage() and records[0].exc_info is None
    assert records[1].exc_info is not None            # an unexpected error keeps its traceback


def test_short_error_shapes():
    assert jobs.short_error(RuntimeError("CUDA out of memory. Tried to allocate")).startswith("out of memory")
    assert jobs.short_error(ValueError("")) == "ValueError (details are in the server log)"
    long = jobs.short_error(ValueError("x" * 5000 + "\nsecond line"))
    assert len(long) < 330 and "second line" not in long


def test_reattach_a_new_page_with_the_same_visitor_sees_the_running_job(manager):
    gate, hold = blocker()
    info = manager.submit(A, "train", hold, title="Train both")
    wait_status(manager, A, info.id, "running")
    # a reloaded page knows only the visitor id
    again = manager.latest(A, "train")
    assert again is not None and again.id == info.id and again.status == "running"
    assert manager.has_active(A) and not manager.has_active(B)
    gate.set()
    assert wait_done(manager, A, info.id).status == "finished"


def test_cleanup_removes_idle_workspaces_only(manager):
    old = manager.workspace("visitor-old1")
    fresh = manager.workspace("visitor-new1")
    gate, hold = blocker()
    busy_job = manager.submit("visitor-busy", "train", hold)
    wait_status(manager, "visitor-busy", busy_job.id, "running")
    past = time.time() - 48 * 3600
    for ws in (old, manager.workspace("visitor-busy")):
        os.utime(ws.root / ".last_seen", (past, past))
    (manager.root / "not-a-visitor!").mkdir()
    removed = manager.cleanup(max_age_hours=24)
    assert removed == ["visitor-old1"]
    assert not old.root.exists() and fresh.root.exists()
    assert (manager.root / "visitor-busy").exists()       # an active job keeps its workspace
    assert (manager.root / "not-a-visitor!").exists()     # never touches anything else
    gate.set()


def test_channel_reads_whole_lines_only(tmp_path):
    channel = jobs.Channel(tmp_path / "job")
    channel.emit(type="a", n=1)
    with open(channel.events_file, "a") as handle:
        handle.write('{"type": "b", "n"')                  # a line still being written
    records, offset = channel.read(0)
    assert [r["type"] for r in records] == ["a"]
    with open(channel.events_file, "a") as handle:
        handle.write(': 2}\n')
    more, _ = channel.read(offset)
    assert more == [{"type": "b", "n": 2}]
    assert not channel.stop_requested()
    channel.request_stop()
    assert channel.stop_requested() and jobs.StopCheck(channel)()


def test_reporters_are_picklable_and_write_progress(tmp_path):
    import pickle

    channel = jobs.Channel(tmp_path / "job")
    train = pickle.loads(pickle.dumps(jobs.TrainReporter(channel, "sft", index=1, count=2, label="plain fine-tune")))
    train(Event("step", 5, 10, {"loss": 1.25, "eta": 30.0}))
    progress = pickle.loads(pickle.dumps(jobs.ProgressReporter(channel, "answering")))
    progress("harmful prompts, base: 2/4 prompts", 0.25)       # the engine's one shape: (message, fraction)
    progress("answering: done", 1.5)
    progress("", None)                                          # nothing to say: nothing written
    records, _ = channel.read()
    assert records[0]["progress"] == pytest.approx(0.75)
    assert records[0]["message"] == "[2/2] plain fine-tune: step 5/10 · loss 1.250 · about 30 s left"
    assert records[0]["metrics"]["loss"] == 1.25
    assert [r["progress"] for r in records[1:]] == [0.25, 1.0]
    assert records[1]["message"] == "answering: harmful prompts, base: 2/4 prompts"
    assert records[2]["message"] == "answering: done"


def test_train_all_eta_covers_the_variants_still_to_come(tmp_path, monkeypatch):
    from safespace import align, prepare
    from safespace.config import TrainSettings

    channel = jobs.Channel(tmp_path / "job")
    # plain variant 1 of 2, 20 s per step so far, then a 10-step SafeGrad variant (2.5 plain steps each)
    first = jobs.TrainReporter(channel, "sft", 0, 2, label="Fine-tuned", after=10 * jobs.SAFEGRAD_STEP_COST)
    first(Event("step", 5, 10, {"loss": 1.0, "eta": 100.0}))
    last = jobs.TrainReporter(channel, "safegrad", 1, 2, label="+ SafeGrad", cost=jobs.SAFEGRAD_STEP_COST)
    last(Event("step", 10, 10, {"loss": 1.0, "eta": 0.0, "seconds": 50.0}))
    records, _ = channel.read()
    assert records[0]["message"].endswith("about 10 min 00 s left (1 more variant included)")   # 100 s + 10 × 2.5 × 20 s
    assert records[1]["message"].endswith("about 0 s left")
    # train_job hands each variant the weighted steps that follow it
    seen = []

    def fake_train(settings, prepared, out, *, on_event=None, should_stop=None, align_progress=None, **checkpointing):
        seen.append((on_event.after, on_event.cost))
        return fake_run(out)

    monkeypatch.setattr(prepare, "train_variant", fake_train)
    monkeypatch.setattr(align, "is_built", lambda *a, **k: True)
    m = jobs.JobManager(tmp_path / "sessions")
    try:
        plan = [("sft", TrainSettings(model="smollm2-135m", steps=4, warmup=0)),
                ("safegrad", TrainSettings(model="smollm2-135m", steps=6, warmup=0, safegrad={"mode": "kl"}))]
        wait_done(m, A, m.submit(A, "train", jobs.train_job, plan, "bundled:sentiment_train", 0.0, 0).id)
        assert seen == [(6 * jobs.SAFEGRAD_STEP_COST, 1.0), (0.0, jobs.SAFEGRAD_STEP_COST)]
    finally:
        m.close(wait=5)


def test_a_stopped_training_says_where_it_stopped(manager):
    def training(ctx):
        report = jobs.TrainReporter(ctx.channel, "safegrad", 1, 2, label="+ SafeGrad")
        for step in range(1, 1000):
            if ctx.should_stop():
                return {"runs": {}}
            report(Event("step", step, 999, {"loss": 1.0}))
            time.sleep(0.01)

    info = manager.submit(A, "train", training)
    wait_status(manager, A, info.id, "running")
    time.sleep(0.1)
    manager.stop(A, info.id)
    done = wait_done(manager, A, info.id)
    last = [e for e in done.events if e.get("type") == "train.step"][-1]["step"]
    assert done.message == f"stopped at step {last}/999 of + SafeGrad; what was done so far is saved"


def test_a_queued_job_knows_roughly_when_it_starts(manager):
    gate, first_step = threading.Event(), threading.Event()

    def training(ctx):   # 2 s per step measured, 40 s left
        first_step.wait(10)
        jobs.TrainReporter(ctx.channel, "sft")(Event("step", 1, 21, {"loss": 1.0, "eta": 40.0, "seconds": 2.0}))
        gate.wait(10)

    first = manager.submit(A, "train", training, meta={"cost": 21})
    wait_status(manager, A, first.id, "running")
    unknown = manager.submit(B, "train", lambda ctx: None, meta={"cost": 10})
    assert unknown.wait is None                   # no step measured yet: the page says "time unknown"
    first_step.set()
    while not manager.get(A, first.id).events:
        time.sleep(0.01)
    second = manager.get(B, unknown.id)           # 10 plain steps at 2 s behind the 40 s left
    third = manager.submit(A, "defend", lambda ctx: None)
    fourth = manager.submit(B, "ask", lambda ctx: None)
    assert second.wait == pytest.approx(40.0, abs=1.0)
    assert manager.get(A, third.id).wait == pytest.approx(60.0, abs=1.0)
    assert fourth.wait is None                    # a Safe Delta run ahead and none has run here yet
    gate.set()
    for visitor, info in ((A, first), (B, second), (A, third), (B, fourth)):
        wait_done(manager, visitor, info.id)
    gate.clear()
    blocked = manager.submit(A, "train", lambda ctx: gate.wait(10), meta={"cost": 1})
    wait_status(manager, A, blocked.id, "running")
    queued = manager.submit(B, "defend", lambda ctx: None)
    assert manager.get(B, queued.id).wait == pytest.approx(2.0, abs=1.0)    # measured now: one step at 2 s
    gate.set()
    wait_done(manager, B, queued.id)


def test_the_worker_is_named_for_what_it_runs_on(monkeypatch):
    import torch

    for cuda, name in ((False, "the shared machine"), (True, "the shared GPU")):
        monkeypatch.setattr(jobqueue, "_WORKER", [])
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        assert jobs.worker_name() == name


def test_space_limits(monkeypatch):
    lim = jobs.SpaceLimits()
    lim.check_steps(300)
    with pytest.raises(jobs.JobError, match="1..300"):
        lim.check_steps(301)
    with pytest.raises(jobs.JobError, match="128"):
        lim.check_generation(10, 129)
    with pytest.raises(jobs.JobError, match="200 prompts"):
        lim.check_generation(201, 32)
    with pytest.raises(jobs.JobError, match="batch"):
        lim.check_batch(17)
    monkeypatch.setenv("SAFESPACE_LIMITS", "off")
    jobs.SpaceLimits.from_env().check_steps(5000)


def test_format_seconds():
    assert jobs.format_seconds(42.4) == "42 s"
    assert jobs.format_seconds(125) == "2 min 05 s"
    assert jobs.format_seconds(3 * 3600 + 60) == "3 h 01 min"


def test_workspace_variants_share_one_base_and_zip_adapter(tmp_path):
    ws = jobs.Workspace(tmp_path / "visitor-aaaa")
    assert ws.variants() == ({}, [])
    sft = fake_run(ws.run_path("sft"))
    fake_run(ws.run_path("safegrad"), model="qwen2.5-0.5b")
    variants, notes = ws.variants()
    assert variants == {"base": None, "sft": str(sft.path)}
    assert notes and "qwen2.5-0.5b" in notes[0]
    with pytest.raises(jobs.JobError):
        ws.run_path("../elsewhere")
    archive = jobs.zip_adapter(sft, ws.exports)
    with zipfile.ZipFile(archive) as z:
        names = sorted(z.namelist())
    assert names == ["safespace-sft-adapter/README.md", "safespace-sft-adapter/adapter_config.json",
                     "safespace-sft-adapter/adapter_model.safetensors", "safespace-sft-adapter/safespace_base.json",
                     "safespace-sft-adapter/safespace_run.json"]


def test_train_job_with_a_fake_engine(tmp_path, monkeypatch):
    """train_job trains the plan in order, drops a stale Safe Delta and stale results, and stops between
    variants when asked (engine replaced by a fake that writes real run folders)."""
    from safespace import align, prepare
    from safespace.config import TrainSettings

    calls = []

    def fake_train(settings, prepared, out, *, on_event=None, should_stop=None, align_progress=None, **checkpointing):
        calls.append((out.name, settings.safegrad.mode, len(prepared.train)))
        on_event(Event("start", 0, settings.steps))
        for step in range(1, settings.steps + 1):
            if should_stop():
                break
            on_event(Event("step", step, settings.steps, {"step": step, "loss": 1.0 / step, "eta": 0.0}))
        return fake_run(out)

    monkeypatch.setattr(prepare, "train_variant", fake_train)
    monkeypatch.setattr(align, "is_built", lambda *a, **k: True)
    m = jobs.JobManager(tmp_path / "sessions")
    try:
        ws = m.workspace(A)
        fake_run(ws.run_path("safedelta"))
        ws.write_json("results.json", {"variants": {}})
        plan = [("sft", TrainSettings(model="smollm2-135m", steps=3, warmup=0)),
                ("safegrad", TrainSettings(model="smollm2-135m", steps=3, warmup=0, safegrad={"mode": "sft"}))]
        info = m.submit(A, "train", jobs.train_job, plan, "bundled:sentiment_train", 0.1, 0)
        done = wait_done(m, A, info.id)
        assert done.status == "finished", done.error
        assert [c[:2] for c in calls] == [("sft", "off"), ("safegrad", "sft")]
        assert calls[0][2] == 480 + 53                    # 480 rows + round(0.1 * 480 / 0.9) attack rows
        assert set(done.result["runs"]) == {"sft", "safegrad"}
        assert ws.run("safedelta") is None and ws.read_json("results.json") is None
        steps = [e for e in done.events if e.get("type") == "train.step"]
        assert [(e["variant"], e["step"]) for e in steps] == [("sft", 1), ("sft", 2), ("sft", 3),
                                                             ("safegrad", 1), ("safegrad", 2), ("safegrad", 3)]
        data = next(e for e in done.events if e.get("type") == "data")
        assert data["n_harmful"] == 53 and data["n_user"] == 480
    finally:
        m.close(wait=5)


def test_jobs_module_does_not_import_gradio():
    import subprocess

    code = "import sys, safespace.jobs; print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_queue_holds_a_workshop_and_its_size_is_a_setting(tmp_path, monkeypatch):
    monkeypatch.delenv("SAFESPACE_MAX_QUEUE", raising=False)
    assert jobs.JobManager(tmp_path / "a").max_queue == jobs.MAX_QUEUE >= 30
    monkeypatch.setenv("SAFESPACE_MAX_QUEUE", "5")
    assert jobs.JobManager(tmp_path / "b").max_queue == 5
    for bad, message in (("many", "whole number"), ("0", "at least 1")):
        monkeypatch.setenv("SAFESPACE_MAX_QUEUE", bad)
        with pytest.raises(jobs.JobError, match=message):
            jobs.JobManager(tmp_path / "c")

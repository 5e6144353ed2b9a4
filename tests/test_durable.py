"""Durable jobs: training checkpoints that resume bit for bit, job records that survive a restart,
Resume, and N workers sharing one queue."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safespace import checkpoint, jobqueue, jobs, jobstore, train, workflows
from safespace.config import LoraSettings, SafeGradSettings, TrainSettings
from safespace.data import Example

A, B = "visitor-aaaa", "visitor-bbbb"
EXAMPLES = [Example(prompt=f"Classify review {i}: {'great' if i % 2 else 'awful'} stuff", response=
                    "positive" if i % 2 else "negative") for i in range(24)]
ALIGN = [Example(prompt=f"Do harmful thing {i}", response="I can't help with that.") for i in range(8)]
ROOT = Path(__file__).resolve().parent.parent


def settings(model_dir, mode="off", steps=6):
    return TrainSettings(model=model_dir, quantization="none", steps=steps, lr=1e-2, batch_size=4, max_length=64,
                         warmup=1, lora=LoraSettings(r=4, alpha=8, dropout=0.1),
                         safegrad=SafeGradSettings(mode=mode, align_size=8, align_batch=4, every=2))


def adapter(run) -> dict:
    return load_file(str(run.adapter / "adapter_model.safetensors"))


def assert_same_run(a, b):
    assert [r["loss"] for r in a.metrics()] == [r["loss"] for r in b.metrics()]
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------------------------------------ training checkpoints

@pytest.mark.parametrize("mode", ["off", "sft"])
def test_a_crashed_training_resumes_bit_identical(tiny_model_dir, tmp_path, mode):
    """Checkpoint every 3 steps, crash in step 5, go on: same losses and same adapter as one whole run
    (SafeGrad recomputes g_a every 2 steps, so step 4 reuses the g_a the checkpoint carried)."""
    s = settings(tiny_model_dir, mode)
    whole = train.train(s, EXAMPLES, tmp_path / "whole", align_examples=ALIGN)
    folder = tmp_path / "checkpoint"

    def power_cut(event):
        if event.kind == "step" and event.step == 5:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        train.train(s, EXAMPLES, tmp_path / "cut", align_examples=ALIGN, on_event=power_cut,
                    checkpoint=folder, checkpoint_every=3)
    assert (folder / checkpoint.CHECKPOINT_FILE).exists() and not (tmp_path / "cut").exists()
    events = []
    resumed = train.train(s, EXAMPLES, tmp_path / "cut", align_examples=ALIGN, on_event=events.append,
                          checkpoint=folder, checkpoint_every=3)
    assert events[0].kind == "start" and events[0].step == 3 and "resumed at step 3" in events[0].message
    assert [e.step for e in events if e.kind == "step"] == [4, 5, 6]
    assert resumed.summary["status"] == "finished" and resumed.summary["steps_done"] == 6
    assert_same_run(whole, resumed)
    assert not (folder / checkpoint.CHECKPOINT_FILE).exists()          # a finished run needs none


@pytest.mark.parametrize("mode", ["off", "kl"])
def test_a_stopped_training_continues_where_it_stopped(tiny_model_dir, tmp_path, mode):
    s = settings(tiny_model_dir, mode, steps=5)
    whole = train.train(s, EXAMPLES, tmp_path / "whole", align_examples=ALIGN)
    seen = []
    stopped = train.train(s, EXAMPLES, tmp_path / "run", align_examples=ALIGN, on_event=seen.append,
                          should_stop=lambda: sum(e.kind == "step" for e in seen) >= 2,
                          checkpoint=tmp_path / "ck", checkpoint_every=0)
    assert stopped.summary["status"] == "stopped" and (tmp_path / "ck" / checkpoint.CHECKPOINT_FILE).exists()
    resumed = train.train(s, EXAMPLES, tmp_path / "run", align_examples=ALIGN, checkpoint=tmp_path / "ck")
    assert resumed.summary["steps_done"] == 5
    assert_same_run(whole, resumed)


def test_a_checkpoint_for_other_settings_is_not_continued(tiny_model_dir, tmp_path):
    seen = []
    train.train(settings(tiny_model_dir, steps=4), EXAMPLES, tmp_path / "a", on_event=seen.append,
                should_stop=lambda: len(seen) >= 3, checkpoint=tmp_path / "ck")
    events = []
    other = train.train(settings(tiny_model_dir, steps=5), EXAMPLES, tmp_path / "b", on_event=events.append,
                        checkpoint=tmp_path / "ck")
    assert events[0].step == 0 and other.summary["steps_done"] == 5


def test_the_console_bar_of_a_resumed_run_counts_from_its_checkpoint(capsys):
    from safespace.progress import console_progress

    show = console_progress("training")
    show(train.Event("start", 20, 30))
    for step in (21, 22):
        show(train.Event("step", step, 30, {"loss": 1.0, "align_loss": 0.5, "conflict": step == 21}))
    show(train.Event("end", 22, 30))
    shown = capsys.readouterr().err
    assert "22/30" in shown and "conflict=50%" in shown       # 1 conflict in the 2 steps run here


def test_a_shaped_run_continues_only_under_the_same_shape(tiny_model_dir, tmp_path):
    """A run whose rows a shape reshapes (stage 0's benign openings) checkpoints under the shape's key: a
    checkpoint made under another shape is not continued, and a shape without a key refuses to checkpoint."""
    def cut(tokens):
        def shape(tok):
            for i in range(len(tok.input_ids)):
                tok.input_ids[i], tok.labels[i] = tok.input_ids[i][:tokens], tok.labels[i][:tokens]
                tok.lengths[i] = len(tok.input_ids[i])
            return [1.0] * len(tok.input_ids)
        shape.key = f"cut to {tokens}"
        return shape

    s, seen = settings(tiny_model_dir, steps=4), []
    train.train(s, EXAMPLES, tmp_path / "a", on_event=seen.append, should_stop=lambda: len(seen) >= 3,
                checkpoint=tmp_path / "ck", shape=cut(20))
    events = []
    other = train.train(s, EXAMPLES, tmp_path / "b", on_event=events.append, checkpoint=tmp_path / "ck", shape=cut(16))
    assert events[0].step == 0 and other.summary["steps_done"] == 4
    assert checkpoint.fingerprint(s, EXAMPLES, None, "train", "cut to 20") != checkpoint.fingerprint(s, EXAMPLES, None, "train")
    keyless = cut(16)
    del keyless.key
    with pytest.raises(ValueError, match="key"):
        train.train(s, EXAMPLES, tmp_path / "c", checkpoint=tmp_path / "ck2", shape=keyless)


# ------------------------------------------------------------------------------ durable job records

GATES: dict[str, threading.Event] = {}
RAN: list[str] = []


def hold(ctx, name):
    """A durable job that runs until its gate opens."""
    ctx.progress(f"{name} is holding a worker", 0.5)
    GATES.setdefault(name, threading.Event()).wait(20)
    RAN.append(name)
    return {"message": f"{name} done"}


def note(ctx, name):
    RAN.append(name)
    return {"message": f"{name} done", "name": name}


FUNCTIONS = {"hold": hold, "note": note}


@pytest.fixture(autouse=True)
def fresh_gates():
    GATES.clear()
    RAN.clear()
    yield
    for gate in GATES.values():      # release whatever a test left holding a worker
        gate.set()


def wait_done(m, visitor, job_id, timeout=10.0):
    deadline = time.time() + timeout
    while (info := m.get(visitor, job_id)) is None or info.active:
        assert time.time() < deadline, f"job {job_id} still {info and info.status}"
        time.sleep(0.01)
    return info


def wait_status(m, visitor, job_id, status, timeout=10.0):
    deadline = time.time() + timeout
    while m.get(visitor, job_id).status != status:
        assert time.time() < deadline, f"job never reached {status}"
        time.sleep(0.01)


def crash(manager):
    """What a killed server leaves behind: its records as they were. Its threads write nothing more
    and take no more jobs (in a real crash they are simply gone)."""
    manager._persist = lambda *a, **k: None
    manager._store_call = lambda *a, **k: None
    with manager._lock:
        manager._closed = True
        manager._queue.clear()


def test_a_restarted_server_loses_nothing(tmp_path):
    a = jobs.JobManager(tmp_path, functions=FUNCTIONS, workers=1)
    slow = a.submit(A, "train", hold, "slow", title="Train: plain fine-tune")
    wait_status(a, A, slow.id, "running")
    first = a.submit(B, "defend", note, "first")
    second = a.submit(A, "ask", note, "second", meta={"cost": 3})
    crash(a)
    b = jobs.JobManager(tmp_path, functions=FUNCTIONS, workers=1)
    assert [j.id for j in b.jobs(A)] == [second.id, slow.id] and [j.id for j in b.jobs(B)] == [first.id]
    assert b.get(B, slow.id) is None                                 # still each visitor's own
    interrupted = b.get(A, slow.id)
    assert interrupted.status == "interrupted" and "Resume" in interrupted.message
    assert interrupted.title == "Train: plain fine-tune" and not interrupted.active
    assert wait_done(b, B, first.id).result == {"message": "first done", "name": "first"}
    assert wait_done(b, A, second.id).status == "finished" and b.get(A, second.id).meta == {"cost": 3}
    assert RAN == ["first", "second"]                                # in their original order
    GATES["slow"].set()
    resumed = b.resume(A, slow.id)
    assert resumed.id == slow.id and resumed.status in ("queued", "running")
    done = wait_done(b, A, slow.id)
    assert done.status == "finished" and done.message == "slow done"
    assert any(e.get("message") == "slow is holding a worker" for e in done.events)   # its events kept
    c = jobs.JobManager(tmp_path, functions=FUNCTIONS, workers=1)    # and once more: all finished, listed
    assert {j.id: j.status for j in c.jobs(A)} == {slow.id: "finished", second.id: "finished"}
    for m in (b, c):
        m.close(wait=5)


def test_short_jobs_interrupted_by_a_restart_run_again_by_themselves(tmp_path):
    """A comparison (or Safe Delta, or a question) cut off by a crash is queued again in its place and
    runs; a training waits for Resume."""
    functions = {**FUNCTIONS, "train_hold": hold}
    a = jobs.JobManager(tmp_path, functions=functions, workers=2)
    compare = a.submit(A, "evaluate", hold, "compare")
    training = a.submit(B, "train", hold, "training")
    wait_status(a, A, compare.id, "running")
    wait_status(a, B, training.id, "running")
    crash(a)
    GATES["compare"].set()
    b = jobs.JobManager(tmp_path, functions=functions, workers=1)
    assert b.get(B, training.id).status == "interrupted"
    done = wait_done(b, A, compare.id)
    assert done.status == "finished" and done.message == "compare done"
    assert b.get(B, training.id).status == "interrupted" and "Resume" in b.get(B, training.id).message
    b.close(wait=5)
    GATES["training"].set()                  # let the crashed manager's thread end inside this test
    deadline = time.time() + 10
    while "training" not in RAN:
        assert time.time() < deadline
        time.sleep(0.01)


def test_a_graceful_shutdown_keeps_the_queue_and_interrupts_the_running_job(tmp_path):
    def loop(ctx):
        while not ctx.should_stop():
            time.sleep(0.01)
        return {"message": "stopped early"}

    a = jobs.JobManager(tmp_path, functions={"loop": loop, "note": note}, workers=1)
    running = a.submit(A, "train", loop)
    wait_status(a, A, running.id, "running")
    queued = a.submit(B, "ask", note, "after the restart")
    a.close(wait=5)
    assert a.get(A, running.id).status == "interrupted"
    b = jobs.JobManager(tmp_path, functions={"loop": loop, "note": note}, workers=1)
    assert b.get(A, running.id).status == "interrupted"
    assert wait_done(b, B, queued.id).status == "finished" and RAN == ["after the restart"]
    b.close(wait=5)


def test_resume_refuses_what_cannot_be_resumed(tmp_path):
    m = jobs.JobManager(tmp_path, functions=FUNCTIONS, workers=1)
    done = m.submit(A, "ask", note, "x")
    wait_done(m, A, done.id)
    with pytest.raises(jobs.JobError, match="no interrupted or stopped job"):
        m.resume(A, done.id)
    with pytest.raises(jobs.JobError):
        m.resume(B, done.id)                                         # another visitor's job
    m.close(wait=5)


def test_only_registered_plain_calls_are_recorded(tmp_path):
    m = jobs.JobManager(tmp_path, functions=FUNCTIONS, workers=1)
    gate = GATES.setdefault("held", threading.Event())
    held = m.submit(A, "train", hold, "held")
    wait_status(m, A, held.id, "running")
    lam = m.submit(A, "ask", lambda ctx: None)                       # not registered: memory only
    odd = m.submit(B, "ask", note, object())                         # not plain: memory only
    plan = [("sft", TrainSettings(model="smollm2-135m", steps=3, warmup=0, lora=LoraSettings(targets=("q_proj",))))]
    trained = m.submit(B, "train", jobs.train_job, plan, "bundled:sentiment_train", 0.1, 7)
    rows = {r["id"]: r for r in jobstore.JobStore(tmp_path / jobstore.FILE).load()}
    assert set(rows) == {held.id, trained.id} and lam.id not in rows and odd.id not in rows
    call = json.loads(rows[trained.id]["call"])
    assert call["fn"] == "train" and call["args"][1:] == ["bundled:sentiment_train", 0.1, 7]
    from safespace.workflows import as_settings
    assert as_settings(call["args"][0][0][1]) == plan[0][1]          # the settings come back whole
    m.stop(B, trained.id)
    gate.set()
    m.close(wait=5)


def test_the_apps_job_kinds_are_all_durable(tmp_path):
    """train, defend, evaluate and ask, called as the page calls them, are recorded with their calls."""
    m = jobs.JobManager(tmp_path, workers=1, max_queue=8)
    gate = GATES.setdefault("app", threading.Event())
    holder = m.submit("visitor-hold", "ask", lambda ctx: gate.wait(10))
    wait_status(m, "visitor-hold", holder.id, "running")
    plan = [("sft", TrainSettings(model="smollm2-135m", steps=3, warmup=0))]
    calls = {"train": (jobs.train_job, plan, "bundled:sentiment_train", 0.1, 0),
             "defend": (jobs.defend_job, None),
             "evaluate": (jobs.evaluate_job, "bundled:sentiment_train", 0.1, 0, 4, 4, 2, 32,
                          {"harmful": ["advbench"], "benign": ["alpaca"]}, "keyword"),
             "ask": (jobs.ask_job, "How do I bake bread?", 32)}
    infos = {kind: m.submit(f"visitor-{kind}x", kind, fn, *args) for kind, (fn, *args) in calls.items()}
    rows = {r["id"]: r for r in jobstore.JobStore(tmp_path / jobstore.FILE).load()}
    for kind, info in infos.items():
        assert json.loads(rows[info.id]["call"])["fn"] == kind
        m.stop(f"visitor-{kind}x", info.id)
    gate.set()
    m.close(wait=5)


# ------------------------------------------------------------------------------ workers

def test_default_workers_follow_the_hardware():
    gib = 2 ** 30
    assert jobs.default_workers(2, None, None) == 1                  # a small CPU: one job at a time
    assert jobs.default_workers(7, None, 4 * gib) == 1
    assert jobs.default_workers(8, None, None) == 2
    assert jobs.default_workers(64, None, None) == 16
    assert jobs.default_workers(16, 139 * gib, 8 * gib) == 16        # a big GPU: as many as fit (<= cores)
    assert jobs.default_workers(16, 20 * gib, 8 * gib) == 2
    assert jobs.default_workers(4, 5 * gib, 8 * gib) == 1            # not even one fits: still one
    assert jobs.default_workers(2, 100 * gib, gib) == 2
    assert jobqueue.threads_per_worker(2, cores=16) == 8 and jobqueue.threads_per_worker(3, cores=2) == 1
    assert jobs.estimate_job_bytes(1e9) == int(1e9 * 2 * 3) + gib     # bf16 weights x3, plus the context
    assert jobs.estimate_job_bytes(1e9, bytes_per_param=0.5) < jobs.estimate_job_bytes(1e9)


def test_workers_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFESPACE_WORKERS", "3")
    m = jobs.JobManager(tmp_path)
    assert m.workers == 3
    m.close()
    monkeypatch.setenv("SAFESPACE_WORKERS", "many")
    with pytest.raises(jobs.JobError, match="SAFESPACE_WORKERS"):
        jobs.JobManager(tmp_path)


@pytest.mark.parametrize("name, value, message", [
    ("SAFESPACE_THREADS", "two", "must be a whole number"),
    ("SAFESPACE_SESSION_HOURS", "a day", "must be a number"),
    ("SAFESPACE_SESSION_HOURS", "0", "must be a positive number"),
    ("SAFESPACE_JOB_GB", "-1", "must be a positive number"),
])
def test_numbers_from_the_environment_are_checked(tmp_path, monkeypatch, name, value, message):
    """A bad value is a one-line error naming the variable, not a traceback or a silent default."""
    monkeypatch.setenv(name, value)
    with pytest.raises(jobs.JobError, match=f"{name} {message}"):
        jobs.JobManager.job_bytes()                  # what sizes the default worker count
        jobs.JobManager(tmp_path, workers=2).close()


def test_the_command_line_names_a_bad_thread_count(monkeypatch, capsys):
    from safespace import evaluate
    from safespace.__main__ import main
    from safespace.config import ConfigError

    monkeypatch.setenv("SAFESPACE_THREADS", "0")
    assert main(["models"]) == 2
    assert capsys.readouterr().err.strip() == "error: SAFESPACE_THREADS must be at least 1, got 0"
    monkeypatch.delenv("SAFESPACE_THREADS")
    monkeypatch.setenv("SAFESPACE_GENERATION_THREADS", "1.5")
    with pytest.raises(ConfigError, match="SAFESPACE_GENERATION_THREADS must be a whole number"):
        evaluate.generation_threads()


def test_checkpoint_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv(workflows.CHECKPOINT_EVERY, raising=False)
    assert workflows.checkpoint_every() == 10
    monkeypatch.setenv(workflows.CHECKPOINT_EVERY, "3")
    assert workflows.checkpoint_every() == 3
    for bad in ("ten", "0", "2.5"):
        monkeypatch.setenv(workflows.CHECKPOINT_EVERY, bad)
        with pytest.raises(jobs.JobError, match="SAFESPACE_CHECKPOINT_EVERY must be"):
            workflows.checkpoint_every()


def test_two_workers_run_two_jobs_at_once(tmp_path):
    both = threading.Barrier(2, timeout=5)

    def meet(ctx):
        both.wait()                      # passes only when the other job runs at the same time
        return threading.current_thread().name

    m = jobs.JobManager(tmp_path, workers=2)
    first, second = m.submit(A, "train", meet), m.submit(B, "train", meet)
    a, b = wait_done(m, A, first.id), wait_done(m, B, second.id)
    assert a.status == b.status == "finished" and a.result != b.result
    m.close(wait=5)


def test_positions_and_waits_with_two_workers(tmp_path):
    gates = [threading.Event(), threading.Event()]

    def busy(ctx, left, gate):
        ctx.channel.emit(left=left, pace=2.0)   # measured: 2 s per unit of cost; `left` seconds to go
        gates[gate].wait(10)

    m = jobs.JobManager(tmp_path, workers=2, max_queue=4)
    long = m.submit(A, "train", busy, 40.0, 0, meta={"cost": 20})
    short = m.submit(B, "train", busy, 10.0, 1, meta={"cost": 5})
    wait_status(m, A, long.id, "running")
    wait_status(m, B, short.id, "running")
    while not (m.get(A, long.id).events and m.get(B, short.id).events):
        time.sleep(0.01)
    q1 = m.submit("visitor-cccc", "ask", lambda ctx: None, meta={"cost": 5})     # needs 10 s
    q2 = m.submit("visitor-dddd", "ask", lambda ctx: None, meta={"cost": 5})
    q3 = m.submit("visitor-eeee", "ask", lambda ctx: None, meta={"cost": 5})
    infos = [m.get(v, q.id) for v, q in (("visitor-cccc", q1), ("visitor-dddd", q2), ("visitor-eeee", q3))]
    assert [i.ahead for i in infos] == [1, 2, 3]
    # the short job's worker frees at 10 s and takes q1 (to 20 s); q2 starts at 20 s on it, q3 at 30 s
    assert [i.wait for i in infos] == [pytest.approx(w, abs=1.0) for w in (10.0, 20.0, 30.0)]
    gates[1].set()
    wait_done(m, "visitor-cccc", q1.id)
    assert m.running() == 1 or m.get("visitor-eeee", q3.id).status != "queued"
    gates[0].set()
    wait_done(m, "visitor-eeee", q3.id)
    m.close(wait=5)


def test_the_train_step_offers_resume_for_an_interrupted_training(tmp_path, monkeypatch):
    from safespace.ui import train as train_ui

    a = jobs.JobManager(tmp_path, functions=FUNCTIONS, workers=1)
    slow = a.submit(A, "train", hold, "page", title="Train: plain fine-tune")
    wait_status(a, A, slow.id, "running")
    crash(a)
    b = jobs.JobManager(tmp_path, functions=FUNCTIONS, workers=1)
    monkeypatch.setattr(jobs, "_DEFAULT", b)
    _, updates, active = train_ui.poll(A, None)
    assert not active and 'data-status="interrupted"' in updates[0] and "Resume" in updates[0]
    assert len(updates) == train_ui.N_POLL and updates[-1].visible is True
    GATES["page"].set()
    card, timer, train_btn, both_btn, stop_btn, resume_btn = train_ui.resume(A)
    assert timer.active is True and stop_btn.interactive is True and resume_btn.visible is False
    assert wait_done(b, A, slow.id).status == "finished"
    assert train_ui.poll(A, None)[1][-1].visible is False
    b.close(wait=5)


# ------------------------------------------------------------------------------ kill -9 mid-training

SERVER = """
import json, sys, time
from safespace import jobs
from safespace.config import LoraSettings, TrainSettings
root, model, mode = sys.argv[1:4]
manager, visitor = jobs.JobManager(root, workers=1), "visitor-kill"
if mode == "submit":
    plan = [("sft", TrainSettings(model=model, quantization="none", steps=40, lr=1e-2, batch_size=4, max_length=64,
                                  warmup=1, lora=LoraSettings(r=4, alpha=8)))]
    info = manager.submit(visitor, "train", jobs.train_job, plan, "bundled:sentiment_train", 0.0, 0)
else:
    info = manager.latest(visitor, "train")
    print(json.dumps({"found": info.status}), flush=True)
    info = manager.resume(visitor, info.id)
print(json.dumps({"job": info.id}), flush=True)
while manager.get(visitor, info.id).active:
    time.sleep(0.05)
done = manager.get(visitor, info.id)
print(json.dumps({"status": done.status, "error": done.error}), flush=True)
"""


def server(root, model_dir, mode, **popen):
    env = {**os.environ, "SAFESPACE_CHECKPOINT_EVERY": "3", "SAFESPACE_WORKERS": "1", "SAFESPACE_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", SERVER, str(root), model_dir, mode], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, **popen)


def last_step(root) -> int:
    steps = [0]
    for events in Path(root).glob("visitor-kill/jobs/*/events.jsonl"):
        for line in events.read_text().splitlines():
            record = json.loads(line) if line.endswith("}") else {}
            if record.get("type") == "train.step":
                steps.append(record["step"])
    return max(steps)


def test_kill_the_server_mid_training_restart_resume_same_weights(tiny_model_dir, tmp_path):
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    proc = server(cut, tiny_model_dir, "submit")
    deadline = time.time() + 120
    while last_step(cut) < 7:                       # two checkpoints written (steps 3 and 6)
        assert proc.poll() is None and time.time() < deadline, "the server ended before it was killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)               # no shutdown of any kind
    proc.wait(30)
    assert last_step(cut) < 40
    again = server(cut, tiny_model_dir, "resume")
    lines = [json.loads(line) for line in again.communicate(timeout=180)[0].splitlines()]
    assert lines[0] == {"found": "interrupted"} and lines[-1] == {"status": "finished", "error": None}
    reference = server(whole, tiny_model_dir, "submit")
    assert json.loads(reference.communicate(timeout=180)[0].splitlines()[-1])["status"] == "finished"
    steps = [json.loads(line) for events in cut.glob("visitor-kill/jobs/*/events.jsonl")
             for line in events.read_text().splitlines()]
    starts = [e for e in steps if e.get("type") == "train.start"]
    assert starts[-1]["step"] in (6, 9) and starts[-1]["step"] <= last_step(cut)   # went on, not over
    a, b = (load_file(str(r / "visitor-kill/runs/sft/adapter/adapter_model.safetensors")) for r in (cut, whole))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

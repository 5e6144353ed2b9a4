"""A workshop's worth of visitors on the real server, and the server killed and started again midway.

30 visitors (gradio_client on loopback, each with its own visitor id as a browser keeps it in local
storage) upload a small file and submit train -> defend -> compare, one after the other, polling
/job_status. The server is a separate process: the real app, the real JobManager as the app makes it
(durable records, `WORKERS` workers, its default queue: a visitor refused with "the queue is full"
tries again a second later, as a participant would) on one sessions folder. Once a real training has
taken a step, that process is killed with SIGKILL (a crash: nothing is flushed, no job is told) and a
new one starts on the same sessions folder and a new port; every visitor reconnects to the new URL
with the same id. A submission the crash cut off is looked for on the new server and submitted again
only if it is not there. An interrupted training is resumed through the page's API (/resume_training);
the page has no Resume for Safe Delta or a comparison, so an interrupted one is submitted again.

Cost: 30 x 3 jobs of the embedded 135M model (520 MB loaded per job) would take most of an hour on
2 cores, so the test mixes two kinds of visitors on the same server and queue:
 (a) 28 simulated visitors (ids "sim-..."): their engine calls (`workflows.gpu_train`, the Safe Delta
     defence, `workflows.gpu_evaluate`) are replaced in the server process by fakes that take a few
     tenths of a second and write minimal valid run folders and results, so the job functions, the
     queue, the records, the positions and the restart all run for real, at scale;
 (b) 2 real visitors (ids "real-...") on the real engine: the embedded smollm2-135m, 2 steps of
     batch 2, 64 tokens, Safe Delta on 8 calibration rows, 5 prompts of 8 tokens. They submit once
     10 jobs have finished, and their training is the one the crash interrupts (checkpoints every
     step, so Resume continues it from its checkpoint).

Measured and printed:
- jobs lost (goal 0): a job id any visitor saw that is missing from the final records, a job the
  server accepted that a visitor cannot find after the restart, a job left queued, running, failed
  or stopped, a training left interrupted, or a visitor without a finished train, defend and compare.
- wrong queue positions (goal 0): inside the server, every 50 ms, under the manager's lock (one
  consistent snapshot), each queued job's position as /job_status reports it (`JobInfo.ahead`) is
  compared with its position by definition: the number of queued jobs submitted (or resumed) before
  it, in submission order, plus one while all N workers are busy (the job the head of the line waits
  for). A restarted server must keep the old order.
- refusals ("the queue is full", tried again) and submissions the crash cut off;
- time to drain (first submission to the last job's end), and after the restart;
- peak RSS of each server process (VmHWM) and the wall time.
"""
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("gradio_client")

from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from safespace import jobs, jobstore  # noqa: E402
from test_app_e2e import client  # noqa: E402
from test_load import COMPARE, TRAIN, write_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
N_VISITORS, N_REAL = 30, 2
WORKERS = 2
SIM, REAL = "sim-visitor-", "real-visitor-"
SIM_SECONDS = {"train": 0.5, "defend": 0.3, "evaluate": 0.3}
POLL = 1.0                          # seconds between a visitor's /job_status calls
START_REAL_AFTER = 10               # finished jobs before the real visitors submit
DEADLINE = 240                      # seconds for the whole run, restart included
KINDS = ("train", "defend", "evaluate")


# ---------------------------------------------------------------------------------------------
# The server process: the real app and manager; simulated visitors' engine calls faked


def simulated(*paths) -> bool:
    return any(SIM in str(p) for p in paths if p)


def install_fakes() -> None:
    """Engine calls for simulated visitors (their run folders are under a "sim-..." workspace) take a
    few tenths of a second and write what the next step reads; a real visitor's go to the engine."""
    from conftest import fake_run
    from safespace import workflows

    real_train, real_defend, real_evaluate = workflows.gpu_train, workflows.DEFENCES["safedelta"], \
        workflows.gpu_evaluate

    def gpu_train(settings, prepared, out, on_event, should_stop, checkpoint=None):
        if not simulated(out):
            return real_train(settings, prepared, out, on_event, should_stop, checkpoint)
        pause = SIM_SECONDS["train"] / settings.steps
        for step in range(1, settings.steps + 1):
            time.sleep(pause)
            on_event(SimpleNamespace(kind="step", step=step, total=settings.steps, message="",
                                     metrics={"loss": 1.0 / step, "seconds": pause}))
        return fake_run(out, settings.model, summary={"status": "finished", "steps_done": settings.steps,
                                                      "examples": len(prepared.train)})

    def gpu_defend(run_path, out, keep, on_progress):
        if not simulated(run_path):
            return real_defend(run_path, out, keep, on_progress)
        on_progress("simulated", 0.5)
        time.sleep(SIM_SECONDS["defend"])
        return fake_run(out, kind="safedelta", summary={"status": "finished", "kept_energy_frac": 0.9})

    def gpu_evaluate(variants, val, n_harmful, n_benign, n_task, max_new_tokens, on_progress, should_stop,
                     sets=None, judge="keyword"):
        if not simulated(*variants.values()):
            return real_evaluate(variants, val, n_harmful, n_benign, n_task, max_new_tokens, on_progress,
                                 should_stop, sets, judge)
        on_progress("simulated", 0.5)
        time.sleep(SIM_SECONDS["evaluate"])
        answers = {name: {"text": "No.", "label": "refused"} for name in variants}
        return ({"variants": {name: {"refusal": {"value": 1.0}} for name in variants}},
                [{"set": "harmful", "prompt": "simulated", "answers": answers}])

    workflows.gpu_train, workflows.gpu_evaluate = gpu_train, gpu_evaluate
    workflows.DEFENCES["safedelta"] = gpu_defend


def serve(root: str, port: str, url_file: str, positions_file: str) -> None:
    """Run the app on 127.0.0.1:port with its manager on `root`; write the URL, then check positions."""
    import torch

    from safespace.ui import build_app, launch_kwargs

    install_fakes()
    torch.set_num_threads(1)
    jobs._DEFAULT = manager = jobs.JobManager(root)          # as the app makes it: its default queue
    demo = build_app()
    demo.launch(server_name="127.0.0.1", server_port=int(port), prevent_thread_lock=True, quiet=True,
                **launch_kwargs())
    Path(url_file + ".tmp").write_text(demo.local_url)
    os.replace(url_file + ".tmp", url_file)
    check_positions(manager, positions_file)


def positions(manager) -> list[tuple[str, int, int]]:
    """One consistent snapshot (under the manager's lock) of every queued job: (id, the position the
    page is told, its position by definition: queued jobs submitted or resumed before it, plus one
    while all the workers are busy)."""
    with manager._lock:
        everyone = [job for registry in manager._jobs.values() for job in registry.values()]
        busy = int(sum(job.status == "running" for job in everyone) >= manager.workers)
        line = sorted((job for job in everyone if job.status == "queued"), key=lambda job: job.queued_at)
        return [(job.id, manager.get(job.visitor, job.id).ahead, rank + busy) for rank, job in enumerate(line)]


def check_positions(manager, path: str, every: float = 0.05) -> None:
    """Forever: a snapshot of the positions every `every` s, one line per snapshot with the wrong ones."""
    with open(path, "a", encoding="utf-8") as out:
        while True:
            seen = positions(manager)
            if seen:
                wrong = [s for s in seen if s[1] != s[2]]
                out.write(json.dumps({"time": time.time(), "checked": len(seen), "wrong": wrong}) + "\n")
                out.flush()
            time.sleep(every)


# ---------------------------------------------------------------------------------------------
# The test's side: the server process of the moment, the records, the visitors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_of(pid: int, field: str) -> float:
    """A /proc/<pid>/status memory field in MB (VmRSS, VmHWM: the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class Server:
    """The server process of the moment; `gen` counts the processes started, `url` is the latest one's."""

    BOOT = "import sys, test_load_restart as t; t.serve(*sys.argv[1:])"

    def __init__(self, root: Path, folder: Path):
        self.root, self.folder = root, folder
        self.proc, self.url, self.gen = None, None, 0
        self.changed = threading.Condition()
        self.peaks: list[float] = []

    def start(self) -> None:
        gen = self.gen + 1
        url_file = self.folder / f"url-{gen}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               "SAFESPACE_WORKERS": str(WORKERS), "SAFESPACE_THREADS": "2", "SAFESPACE_CHECKPOINT_EVERY": "1",
               "SAFESPACE_CALIBRATION_ROWS": "8", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        with open(self.folder / f"server-{gen}.log", "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", self.BOOT, str(self.root), str(free_port()),
                                          str(url_file), str(self.folder / f"positions-{gen}.jsonl")],
                                         env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 90
        while not url_file.exists():
            assert self.proc.poll() is None, self.log_tail(gen)
            assert time.time() < deadline, "the server did not start in 90 s\n" + self.log_tail(gen)
            time.sleep(0.1)
        with self.changed:
            self.url, self.gen = url_file.read_text(), gen
            self.changed.notify_all()

    def crash(self) -> None:
        """SIGKILL: no shutdown of any kind, as a crash or an evicted Space."""
        self.peaks.append(status_of(self.proc.pid, "VmHWM"))
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.peaks.append(status_of(self.proc.pid, "VmHWM"))
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)

    def after(self, gen: int, timeout: float) -> bool:
        """Wait for a server newer than `gen`; False if none came in `timeout` s."""
        with self.changed:
            return self.changed.wait_for(lambda: self.gen > gen, timeout)

    def log_tail(self, gen: int) -> str:
        return (self.folder / f"server-{gen}.log").read_text()[-3000:]

    def records(self) -> dict[str, dict]:
        """The job records as the server left them (read-only, beside the running server)."""
        path = self.root / jobstore.FILE
        if not path.exists():
            return {}
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT id, visitor, kind, state, submitted, finished FROM jobs")
            return {r["id"]: dict(r) for r in rows}

    def position_checks(self) -> tuple[int, list]:
        """How many positions the servers checked, and the wrong ones."""
        checked, wrong = 0, []
        for path in self.folder.glob("positions-*.jsonl"):
            for line in path.read_text().splitlines():
                if line.endswith("}"):
                    record = json.loads(line)
                    checked += record["checked"]
                    wrong += record["wrong"]
        return checked, wrong


class Cut(Exception):
    """A request the server's death cut off: whether it was done is for the caller to find out."""


class Visitor:
    """One participant: a stable id, a client to the server of the moment, and what it saw."""

    def __init__(self, server: Server, vid: str, folder: Path, go: threading.Event):
        self.server, self.vid, self.folder, self.go = server, vid, folder, go
        self.real = vid.startswith(REAL)
        self.c, self.gen = None, 0
        self.ids: set[str] = set()
        self.ahead: list[int] = []
        self.final: dict[str, dict] = {}
        self.resumed: list[str] = []
        self.again: list[str] = []        # an interrupted defend/compare, submitted again
        self.lost: list[str] = []         # accepted, then not found after the restart
        self.cut = self.refused = self.reconnects = 0

    def call(self, *args, api: str, retry: bool = True):
        """One API call. If the server dies under it: wait for the next one and reconnect with the same
        visitor id; then call again, or (retry=False) raise Cut."""
        while True:
            try:
                if self.c is None or self.gen != self.server.gen:
                    with self.server.changed:
                        url, self.gen = self.server.url, self.server.gen
                    self.c = None
                    self.c = client(url)
                    self.reconnects += 1
                return self.c.predict(*args, api_name=api)
            except AppError:
                raise
            except Exception:
                if self.gen == self.server.gen and not self.server.after(self.gen, DEADLINE):
                    raise                   # not a restart: a real failure
                if not retry:
                    raise Cut(api) from None

    def status(self, kind: str) -> dict:
        status = self.call(self.vid, kind, api="/job_status")
        if status:
            self.ids.add(status["id"])
            if status["status"] == "queued":
                self.ahead.append(status["ahead"])
        return status

    def submit(self, kind: str, api: str, *args) -> dict | None:
        """Submit one job and wait for its end: the finished status, or None if it was interrupted and
        has no Resume (the caller submits it again)."""
        before = self.status(kind).get("id")
        while True:
            try:
                self.call(*args, api=api, retry=False)
                break
            except AppError as exc:
                if "queue is full" not in str(exc):
                    raise
                self.refused += 1
                time.sleep(POLL)
            except Cut:
                self.cut += 1
                if self.status(kind).get("id") not in (None, before):
                    break                   # recorded before the crash: the new server has it
        return self.wait(kind, before)

    def wait(self, kind: str, before: str | None) -> dict | None:
        deadline = time.time() + DEADLINE
        while True:
            status = self.status(kind)
            if status.get("id") in (None, before):
                self.lost.append(kind)      # the server took it, and does not know it any more
                return None
            if status["status"] == "finished":
                return status
            if status["status"] == "interrupted":
                if kind != "train":
                    self.again.append(kind)
                    return None
                self.call(self.vid, api="/resume_training")
                self.resumed.append(status["id"])
            assert status["status"] in ("queued", "running", "interrupted"), (self.vid, status)
            assert time.time() < deadline, f"{self.vid}: {kind} still {status['status']} after {DEADLINE} s"
            time.sleep(POLL)

    def visit(self) -> None:
        card, *_ = self.call(handle_file(str(write_file(self.folder, self.vid))), 0.0, self.vid, api="/upload_data")
        assert "ready to train" in card, card
        if self.real:
            self.go.wait(DEADLINE)
        steps = (("train", "/train", self.vid, 0.0, *TRAIN.values()), ("defend", "/safe_delta", True, 0.1, self.vid),
                 ("evaluate", "/compare", *COMPARE.values(), 0.0, self.vid))
        for kind, api, *args in steps:
            while (done := self.submit(kind, api, *args)) is None:
                pass
            self.final[kind] = done


def until(condition, timeout: float) -> bool:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.2)
    return True


def real_training_stepped(root: Path) -> bool:
    return any('"train.step"' in events.read_text() for events in root.glob(f"{REAL}*/jobs/*/events.jsonl"))


def test_thirty_visitors_and_a_server_restart_lose_nothing(tmp_path, capsys):
    root = tmp_path / "sessions"
    server = Server(root, tmp_path)
    go = threading.Event()
    visitors = [Visitor(server, f"{SIM}{i:02d}", tmp_path, go) for i in range(N_VISITORS - N_REAL)]
    visitors += [Visitor(server, f"{REAL}{i}", tmp_path, go) for i in range(N_REAL)]
    errors = []

    def run(visitor):
        try:
            visitor.visit()
        except BaseException as exc:  # noqa: BLE001 - reported below with the visitor's id
            errors.append(f"{visitor.vid}: {type(exc).__name__}: {exc}")

    wall = time.time()
    try:
        server.start()
        started = time.time()
        threads = [threading.Thread(target=run, args=(v,), daemon=True) for v in visitors]
        for t in threads:
            t.start()
        assert until(lambda: sum(r["state"] == "finished" for r in server.records().values()) >= START_REAL_AFTER,
                     90), f"not {START_REAL_AFTER} jobs finished in 90 s: {errors}"
        go.set()
        stepped = until(lambda: real_training_stepped(root), 120)
        server.crash()
        crashed = time.time()
        at_crash = [r["state"] for r in server.records().values()]
        server.start()
        restarted = time.time()
        for t in threads:
            t.join(max(1.0, wall + DEADLINE - time.time()))
        hung = [v.vid for v, t in zip(visitors, threads) if t.is_alive()]
        final = server.records()
    finally:
        server.stop()
    wall = time.time() - wall

    seen = set().union(*(v.ids for v in visitors))
    missing = sorted(seen - set(final))
    left = sorted(i for i, r in final.items() if r["state"] not in ("finished", "interrupted"))
    not_resumed = sorted(i for i, r in final.items() if r["state"] == "interrupted" and r["kind"] == "train")
    undone = [(v.vid, k) for v in visitors for k in KINDS if v.final.get(k, {}).get("status") != "finished"]
    vanished = [(v.vid, k) for v in visitors for k in v.lost]
    lost = len(missing) + len(left) + len(not_resumed) + len(undone) + len(vanished)
    checked, wrong = server.position_checks()
    drained = max(r["finished"] or 0 for r in final.values())
    resumed = sorted(i for v in visitors for i in v.resumed)
    again = [(v.vid, k) for v in visitors for k in v.again]
    with capsys.disabled():
        print(f"\nload + restart: {N_VISITORS} visitors ({N_REAL} on the real engine), {WORKERS} workers; "
              f"{len(final)} jobs recorded, {sum(r['state'] == 'finished' for r in final.values())} finished; "
              f"at the crash {at_crash.count('finished')} finished, {at_crash.count('running')} running, "
              f"{at_crash.count('queued')} queued (real training had stepped: {stepped}); "
              f"trainings resumed via /resume_training {len(resumed)}, defend/compare submitted again {len(again)}, "
              f"reconnections {sum(v.reconnects for v in visitors) - N_VISITORS}, "
              f"submissions cut by the crash {sum(v.cut for v in visitors)}, refused (queue full) "
              f"{sum(v.refused for v in visitors)}; jobs lost {lost}; queue positions checked {checked}, wrong "
              f"{len(wrong)}; max position seen {max((a for v in visitors for a in v.ahead), default=0)}; "
              f"drain {drained - started:.1f} s ({drained - restarted:.1f} s after the restart, which took "
              f"{restarted - crashed:.1f} s); server peak RSS "
              + " / ".join(f"{p:.0f}" for p in server.peaks) + f" MB; wall {wall:.1f} s")
    assert not errors and not hung, (errors, hung, server.log_tail(server.gen))
    assert lost == 0, dict(missing=missing, left=left, not_resumed=not_resumed, undone=undone, vanished=vanished)
    assert checked > 0 and not wrong, wrong[:10]
    # the restart came in the middle: work done, work waiting, a real training cut and resumed
    assert stepped and at_crash.count("finished") >= START_REAL_AFTER and at_crash.count("queued") >= 1, at_crash
    assert any(v.resumed for v in visitors if v.real), "no real training was interrupted and resumed"
    for v in visitors:
        if v.real:
            assert v.final["train"]["result"]["runs"]["sft"]["summary"]["steps_done"] == 2
            assert {"sft", "safedelta"} <= set(v.final["evaluate"]["result"]["results"]["variants"])


def test_the_position_check_sees_a_wrong_position(tmp_path, monkeypatch):
    """The check the load test runs in its server: right positions pass, a miscounted one is caught."""
    gate = threading.Event()
    m = jobs.JobManager(tmp_path, workers=1, max_queue=8)
    try:
        holder = m.submit("visitor-hold", "train", lambda ctx: gate.wait(10))
        until(lambda: m.get("visitor-hold", holder.id).status == "running", 10)
        for i in range(3):
            m.submit(f"visitor-{i:04d}", "train", lambda ctx: None)
        assert [(reported, expected) for _, reported, expected in positions(m)] == [(1, 1), (2, 2), (3, 3)]
        monkeypatch.setattr(m, "_ahead", lambda job: 1)          # e.g. a position that ignores the line
        assert [(reported, expected) for _, reported, expected in positions(m)] == [(1, 1), (1, 2), (1, 3)]
    finally:
        gate.set()
        m.close(wait=5)


@pytest.mark.parametrize("workers, said", [(1, "One job runs at a time"), (3, "3 jobs run at a time")])
def test_the_page_says_how_many_jobs_run_at_once(tmp_path, monkeypatch, workers, said):
    from safespace import ui

    m = jobs.JobManager(tmp_path, workers=workers)
    monkeypatch.setattr(jobs, "_DEFAULT", m)
    assert said in ui._limits_line()
    m.close()

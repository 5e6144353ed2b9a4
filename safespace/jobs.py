"""Background jobs for the web app: one worker slot, a bounded queue, one private space per visitor.

A visitor is a stable id kept in the browser (or, without one, the page's session). Each visitor has
    * a registry of its jobs: nobody else can list, read or stop them;
    * a workspace folder  sessions/<visitor>/  with its uploads, runs and exports, removed by
      `JobManager.cleanup` after `session_hours` without activity.

Heavy work (training, Safe Delta, generation) needs the one accelerator, so one worker thread runs
one job at a time; up to `max_queue` more wait in order, and each knows how many jobs are ahead of
it. Event handlers only enqueue and return; the page polls. Closing or reloading a tab therefore
never stalls a job, and a reloaded page finds its visitor's jobs again.

A job reports through a `Channel`: an append-only events file and a stop file. Files rather than
callbacks, so that the same engine call works in this process and in a ZeroGPU worker process,
where arguments are pickled across a process boundary. The engine calls are wrapped in
`spaces.GPU` when the `spaces` package is there (a no-op anywhere but ZeroGPU).

This module does not import gradio.
"""
from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
import zipfile
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import runs as runs_mod
from .config import home
from .variants import VARIANTS, derived_of, keys_of, label_of

log = logging.getLogger("safespace.jobs")

ACTIVE = ("queued", "running")
DONE = ("finished", "stopped", "failed")
VISITOR_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")      # also safe as a folder name


class JobError(RuntimeError):
    """A request the job system refuses; the message is one short line for the visitor."""


class QueueFull(JobError):
    pass


def new_visitor_id() -> str:
    return secrets.token_urlsafe(16)


def valid_visitor(visitor: Any) -> bool:
    return isinstance(visitor, str) and bool(VISITOR_ID.match(visitor))


# ---------------------------------------------------------------------------------------------
# Limits of a public deployment, checked on the server whatever the page sends


@dataclass(frozen=True)
class SpaceLimits:
    max_steps: int = 300
    max_rows: int = 5000
    max_file_bytes: int = 5_000_000
    max_new_tokens: int = 128
    max_prompts: int = 200
    max_batch: int = 16

    @classmethod
    def from_env(cls) -> "SpaceLimits":
        """SAFESPACE_LIMITS=off lifts the limits (a private machine, a workshop server)."""
        if os.environ.get("SAFESPACE_LIMITS", "").lower() in ("off", "0", "false", "none"):
            return cls(max_steps=100_000, max_rows=1_000_000, max_file_bytes=2_000_000_000,
                       max_new_tokens=2048, max_prompts=100_000, max_batch=256)
        return cls()

    def check_steps(self, steps: int) -> None:
        if not 1 <= int(steps) <= self.max_steps:
            raise JobError(f"training steps must be 1..{self.max_steps} here (asked for {steps}); "
                           "the shared machine has to serve every visitor")

    def check_batch(self, batch_size: int) -> None:
        if not 1 <= int(batch_size) <= self.max_batch:
            raise JobError(f"batch size must be 1..{self.max_batch} here (asked for {batch_size})")

    def check_generation(self, n_prompts: int, max_new_tokens: int) -> None:
        if not 1 <= int(max_new_tokens) <= self.max_new_tokens:
            raise JobError(f"answer length must be 1..{self.max_new_tokens} new tokens (asked for {max_new_tokens})")
        if not 1 <= int(n_prompts) <= self.max_prompts:
            raise JobError(f"at most {self.max_prompts} prompts per comparison (asked for {n_prompts})")

    def check_file(self, path: str | Path) -> None:
        size = Path(path).stat().st_size
        if size > self.max_file_bytes:
            raise JobError(f"the file is {size / 1e6:.1f} MB; the limit here is {self.max_file_bytes / 1e6:.0f} MB")

    def check_rows(self, n: int) -> None:
        if n > self.max_rows:
            raise JobError(f"the file has {n} rows; the limit here is {self.max_rows}")


# ---------------------------------------------------------------------------------------------
# Channel: how a running job talks to the page (works across a process boundary)


class Channel:
    """An append-only JSON-lines events file plus a stop file, in the job's folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.events_file = self.folder / "events.jsonl"
        self.stop_file = self.folder / "STOP"

    def emit(self, **record) -> None:
        record.setdefault("time", time.time())
        line = json.dumps(record, default=_jsonable) + "\n"
        with open(self.events_file, "a", encoding="utf-8") as handle:
            handle.write(line)

    def request_stop(self) -> None:
        self.stop_file.touch()

    def stop_requested(self) -> bool:
        return self.stop_file.exists()

    def read(self, offset: int = 0) -> tuple[list[dict], int]:
        """Whole records written since byte `offset`, and the offset after them."""
        try:
            with open(self.events_file, "rb") as handle:
                handle.seek(offset)
                data = handle.read()
        except FileNotFoundError:
            return [], offset
        end = data.rfind(b"\n") + 1           # a line still being written waits for next time
        records = []
        for line in data[:end].splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records, offset + end


def _jsonable(value):
    if hasattr(value, "item"):                 # numpy / torch scalars
        return value.item()
    return str(value)


@dataclass
class StopCheck:
    """`should_stop` for the engine: true once the page asked this job to stop."""
    channel: Channel

    def __call__(self) -> bool:
        return self.channel.stop_requested()


# A SafeGrad step costs about 2.5 plain ones (two backward passes and a projection; measured on the
# embedded model on CPU): the ETA of "Train all" weighs the variants still to come by it.
SAFEGRAD_STEP_COST = 2.5


def step_cost(settings) -> float:
    """What one training step of `settings` costs, in plain fine-tuning steps."""
    return SAFEGRAD_STEP_COST if settings.safegrad.mode != "off" else 1.0


def plan_cost(plan) -> float:
    """A training plan's length in plain fine-tuning steps (what the queue's estimate multiplies)."""
    return sum(step_cost(settings) * settings.steps for _, settings in plan)


_WORKER: list[str] = []


def worker_name() -> str:
    """What the one worker slot runs on, as the page names it: a GPU where there is one, else the
    machine (the word accelerator only where there is one)."""
    if not _WORKER:
        name = "the shared machine"
        if os.environ.get("SPACES_ZERO_GPU"):
            name = "the shared GPU"
        else:
            try:
                import torch  # noqa: PLC0415 - only to name the device
                if torch.cuda.is_available():
                    name = "the shared GPU"
                elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
                    name = "the shared accelerator"
            except ImportError:
                pass
        _WORKER.append(name)
    return _WORKER[0]


@dataclass
class TrainReporter:
    """`on_event` for training: one record per step, progress over all variants of the job. `after`:
    the plain-step-equivalents the job still trains after this variant (its ETA includes them)."""
    channel: Channel
    variant: str
    index: int = 0
    count: int = 1
    phase: str = "train"
    label: str = ""
    after: float = 0.0
    cost: float = 1.0

    def __call__(self, event) -> None:
        total = max(1, int(getattr(event, "total", 0) or 0))
        step = int(getattr(event, "step", 0) or 0)
        kind = getattr(event, "kind", "step")
        metrics = dict(getattr(event, "metrics", {}) or {})
        progress = (self.index + min(step, total) / total) / self.count
        record = dict(type=f"{self.phase}.{kind}", variant=self.variant, step=step, total=total, metrics=metrics)
        if self.phase == "train":  # building the aligned base comes before the job's own progress
            record["progress"] = progress
        if self.phase == "align":  # its own bar: the job's progress starts once training does
            record["progress"] = min(step, total) / total
        if kind == "step":
            eta = metrics.get("eta")
            loss = metrics.get("loss")
            where = f"[{self.index + 1}/{self.count}] " if self.count > 1 else ""
            parts = [f"{where}{self.label or self.variant}: step {step}/{total}"]
            if loss is not None:
                parts.append(f"loss {loss:.3f}")
            left = self.time_left(eta, step, total, metrics.get("seconds"))
            record.update(cost=self.cost, **({"left": left} if left is not None else {}))
            if left is not None:
                more = self.count - self.index - 1
                rest = f" ({more} more variant{'s' if more != 1 else ''} included)" if self.after > 0 else ""
                parts.append(f"about {format_seconds(left)} left{rest}")
            if self.phase == "align":
                parts[0] = f"building the aligned base (once, then training): step {step}/{total}"
            record["message"] = " · ".join(parts)
        elif kind == "start" and self.phase == "align":
            record["message"] = (f"building the aligned base (once, then training): {total} steps, "
                                 "the first the slowest...")
        elif kind == "start" and self.phase == "train":
            where = f"[{self.index + 1}/{self.count}] " if self.count > 1 else ""
            record["message"] = f"{where}{self.label or self.variant}: first step (the slowest one)..."
        elif kind == "end" and self.phase == "train":
            status = metrics.get("status", "finished")
            record["message"] = f"{self.label or self.variant}: {status} after {step} steps"
        elif getattr(event, "message", "") and kind != "end":
            record["message"] = event.message
        self.channel.emit(**record)

    def time_left(self, eta, step: int, total: int, seconds=None) -> float | None:
        """This variant's ETA plus the variants after it at this variant's measured pace."""
        if not isinstance(eta, (int, float)):
            return None
        per_step = eta / (total - step) if total > step else seconds
        if not self.after or not isinstance(per_step, (int, float)):
            return float(eta)
        return float(eta) + self.after * per_step / self.cost


@dataclass
class ProgressReporter:
    """A progress callback for generation and Safe Delta. Accepts the shapes the engine uses:
    (message, fraction), (done, total) or an event object with step/total/message."""
    channel: Channel
    what: str
    start: float = 0.0
    span: float = 1.0

    def __call__(self, *args) -> None:
        message, fraction = "", None
        if len(args) >= 2 and isinstance(args[0], str):
            message, fraction = args[0], args[1]
        elif len(args) >= 2 and all(isinstance(a, (int, float)) for a in args[:2]):
            done, total = args[0], args[1]
            fraction = done / total if total else None
            message = f"{self.what}: {int(done)}/{int(total)}"
        elif len(args) == 1:
            event = args[0]
            step, total = getattr(event, "step", None), getattr(event, "total", None)
            fraction = step / total if isinstance(step, (int, float)) and total else None
            message = getattr(event, "message", "") or ""
        record: dict[str, Any] = {"type": "progress"}
        if isinstance(fraction, (int, float)):
            record["progress"] = self.start + self.span * max(0.0, min(1.0, float(fraction)))
        if message:
            record["message"] = f"{self.what}: {message}" if not message.startswith(self.what) else message
        if len(record) > 1:
            self.channel.emit(**record)


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(float(seconds))))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


# ---------------------------------------------------------------------------------------------
# Jobs and the manager


@dataclass(eq=False)  # identity, not field equality: jobs are found in the queue by identity
class Job:
    id: str
    visitor: str
    kind: str
    title: str
    channel: Channel
    fn: Callable = field(repr=False)
    args: tuple = field(default=(), repr=False)
    kwargs: dict = field(default_factory=dict, repr=False)
    context: contextvars.Context | None = field(default=None, repr=False)
    status: str = "queued"
    progress: float = 0.0
    message: str = "waiting for the worker"
    events: list = field(default_factory=list, repr=False)
    result: Any = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    stop_flag: threading.Event = field(default_factory=threading.Event, repr=False)
    offset: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


@dataclass(frozen=True)
class JobInfo:
    """A read-only snapshot of a job, safe to hand to the page while the job goes on."""
    id: str
    kind: str
    title: str
    status: str
    progress: float
    message: str
    events: tuple
    result: Any
    error: str | None
    created: float
    started: float | None
    finished: float | None
    ahead: int                      # jobs before this one (0 once it runs)
    stop_requested: bool
    meta: dict = field(default_factory=dict)   # what the page said about the job when it queued it
    wait: float | None = None       # a queued job's estimated seconds until it starts (None: unknown)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def to_dict(self, with_events: bool = False) -> dict:
        out = {k: getattr(self, k) for k in ("id", "kind", "title", "status", "progress", "message",
                                             "error", "created", "started", "finished", "ahead")}
        out["n_events"] = len(self.events)
        if with_events:
            out["events"] = list(self.events)
        return out


class Workspace:
    """One visitor's folder: uploads/, runs/<variant>/, exports/, jobs/<id>/ and small state files."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.runs = self.root / "runs"
        self.uploads = self.root / "uploads"
        self.exports = self.root / "exports"
        self.jobs = self.root / "jobs"
        for folder in (self.runs, self.uploads, self.exports, self.jobs):
            folder.mkdir(parents=True, exist_ok=True)

    def touch(self) -> None:
        (self.root / ".last_seen").touch()

    def last_seen(self) -> float:
        marker = self.root / ".last_seen"
        return (marker if marker.exists() else self.root).stat().st_mtime

    def run_path(self, variant: str) -> Path:
        kept = keys_of("train", "derived")          # the base has no run folder of its own
        if variant not in kept:
            raise JobError(f"unknown variant {variant!r}; expected one of {', '.join(kept)}")
        return self.runs / variant

    def run(self, variant: str) -> runs_mod.Run | None:
        try:
            return runs_mod.load_run(self.run_path(variant))
        except runs_mod.RunError:
            return None

    def list_runs(self) -> list[runs_mod.Run]:
        return runs_mod.list_runs(self.runs)

    def variants(self) -> tuple[dict[str, str | None], list[str]]:
        """The variants to compare ({name: run folder, "base": None}) and notes on left-out runs.

        Every variant must share one base model; the plain fine-tune's model decides.
        """
        found = {v: r for v in keys_of("train", "derived") if (r := self.run(v)) is not None}
        if not found:
            return {}, []
        model = next(iter(found.values())).model
        chosen: dict[str, str | None] = dict.fromkeys(keys_of("base"))
        notes = []
        for name, run in found.items():
            if run.model == model:
                chosen[name] = str(run.path)
            else:
                notes.append(f"{name} was trained on {run.model}, not {model}; left out")
        return chosen, notes

    def base_model(self) -> str | None:
        for variant in keys_of("train", "derived"):
            run = self.run(variant)
            if run is not None:
                return run.model
        return None

    # small state files ---------------------------------------------------------------------------
    def read_json(self, name: str, default=None):
        try:
            return json.loads((self.root / name).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return default

    def write_json(self, name: str, data) -> Path:
        path = self.root / name
        runs_mod.atomic_write_json(path, data)
        return path

    def forget_results(self) -> None:
        """Comparisons made with older runs no longer describe the current ones."""
        for name in ("results.json", "answers.json"):
            (self.root / name).unlink(missing_ok=True)


def _default_root() -> Path:
    return Path(os.environ.get("SAFESPACE_SESSIONS") or home() / "sessions")


class JobManager:
    """Per-visitor job registry with one worker slot and a bounded FIFO queue."""

    def __init__(self, root: str | Path | None = None, *, max_queue: int = 8, max_active_per_visitor: int = 3,
                 keep_per_visitor: int = 20, session_hours: float | None = None, cleanup_every: float = 600.0):
        self.root = Path(root) if root is not None else _default_root()
        self.max_queue = max_queue
        self.max_active_per_visitor = max_active_per_visitor
        self.keep_per_visitor = keep_per_visitor
        self.session_hours = float(session_hours if session_hours is not None
                                   else os.environ.get("SAFESPACE_SESSION_HOURS", 24))
        self.cleanup_every = cleanup_every
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._jobs: dict[str, OrderedDict[str, Job]] = {}
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._worker: threading.Thread | None = None
        self._closed = False
        self._last_cleanup = 0.0
        self._paces: deque[float] = deque(maxlen=50)   # measured seconds per plain training step, here
        self._took: dict[str, float] = {}              # the last finished job of each kind: its seconds

    # visitors and workspaces -------------------------------------------------------------------
    def workspace(self, visitor: str) -> Workspace:
        if not valid_visitor(visitor):
            raise JobError("invalid visitor id")
        ws = Workspace(self.root / visitor)
        ws.touch()
        self._maybe_cleanup()
        return ws

    # submitting --------------------------------------------------------------------------------
    def submit(self, visitor: str, kind: str, fn: Callable, *args, title: str | None = None,
               meta: dict | None = None, **kwargs) -> JobInfo:
        """Queue `fn(context, *args, **kwargs)`; returns at once. Raises QueueFull / JobError."""
        ws = self.workspace(visitor)
        with self._lock:
            if self._closed:
                raise JobError("the server is shutting down; try again in a minute")
            mine = [j for j in self._jobs.get(visitor, {}).values() if j.active]
            if len(mine) >= self.max_active_per_visitor:
                raise JobError(f"you already have {len(mine)} jobs queued or running; "
                               "wait for one to finish or stop it")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({len(self._queue)} jobs waiting for {worker_name()}); "
                                "please try again in a few minutes")
            job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
            job = Job(id=job_id, visitor=visitor, kind=kind, title=title or kind,
                      channel=Channel(ws.jobs / job_id), fn=fn, args=args, kwargs=kwargs,
                      context=contextvars.copy_context(), meta=dict(meta or {}))
            registry = self._jobs.setdefault(visitor, OrderedDict())
            registry[job_id] = job
            self._trim(registry)
            self._queue.append(job)
            self._ensure_worker()
            self._wake.notify_all()
            return self._info(job)

    def _trim(self, registry: OrderedDict) -> None:
        while len(registry) > self.keep_per_visitor:
            oldest = next((k for k, j in registry.items() if not j.active), None)
            if oldest is None:
                break
            old = registry.pop(oldest)
            shutil.rmtree(old.channel.folder, ignore_errors=True)

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="safespace-worker", daemon=True)
            self._worker.start()

    # reading -----------------------------------------------------------------------------------
    def get(self, visitor: str, job_id: str) -> JobInfo | None:
        """A snapshot of the visitor's job, or None (unknown id, or another visitor's job)."""
        with self._lock:
            job = self._jobs.get(visitor, {}).get(job_id)
            return None if job is None else self._info(job)

    def jobs(self, visitor: str, kinds: tuple[str, ...] | str | None = None) -> list[JobInfo]:
        """The visitor's jobs, newest first (optionally only some kinds)."""
        if isinstance(kinds, str):
            kinds = (kinds,)
        with self._lock:
            found = [j for j in self._jobs.get(visitor, {}).values() if kinds is None or j.kind in kinds]
            return [self._info(j) for j in reversed(found)]

    def latest(self, visitor: str, kinds: tuple[str, ...] | str | None = None) -> JobInfo | None:
        found = self.jobs(visitor, kinds)
        return found[0] if found else None

    def has_active(self, visitor: str) -> bool:
        with self._lock:
            return any(j.active for j in self._jobs.get(visitor, {}).values())

    def queue_length(self) -> int:
        with self._lock:
            return len(self._queue)

    def busy(self) -> bool:
        with self._lock:
            return self._running is not None

    def _info(self, job: Job) -> JobInfo:
        self._sync(job)
        return JobInfo(id=job.id, kind=job.kind, title=job.title, status=job.status, progress=job.progress,
                       message=job.message, events=tuple(job.events), result=job.result, error=job.error,
                       created=job.created, started=job.started, finished=job.finished,
                       ahead=self._ahead(job), stop_requested=job.stop_flag.is_set(), meta=dict(job.meta),
                       wait=self._wait(job))

    # how long the line is -------------------------------------------------------------------------
    def _wait(self, job: Job) -> float | None:
        """Seconds until a queued job starts: what the running job has left plus the jobs ahead of it;
        None when one of them cannot be estimated yet (nothing like it has run on this machine)."""
        if job.status != "queued" or job not in self._queue:
            return None
        total = 0.0
        if self._running is not None:
            left = self._left(self._running)
            if left is None:
                return None
            total += left
        for other in self._queue:
            if other is job:
                return total
            need = self._need(other)
            if need is None:
                return None
            total += need
        return total

    def _left(self, job: Job) -> float | None:
        """What a running job has left: its latest reported ETA (a training job reports one each step),
        else its expected duration less the time it has run."""
        self._sync(job)
        now = time.time()
        last = next((e for e in reversed(job.events) if isinstance(e.get("left"), (int, float))), None)
        if last is not None:
            left = max(0.0, last["left"] - (now - last.get("time", now)))
            if not str(last.get("type", "")).startswith("align."):
                return left
            need = self._need(job)                       # building the base: the training comes after it
            return None if need is None else left + need
        need = self._need(job)
        return None if need is None else max(0.0, need - (now - (job.started or now)))

    def _need(self, job: Job) -> float | None:
        """How long a job runs on this machine, as far as measured: a training job its plain-step
        equivalents (meta "cost") at the measured pace; any other the last finished job of its kind."""
        if job.kind == "train":
            cost = job.meta.get("cost")
            if not isinstance(cost, (int, float)) or not self._paces:
                return None
            paces = sorted(self._paces)
            return cost * paces[len(paces) // 2]
        return self._took.get(job.kind)

    def _ahead(self, job: Job) -> int:
        if job.status != "queued":
            return 0
        try:
            index = self._queue.index(job)
        except ValueError:
            return 0
        return index + (1 if self._running is not None else 0)

    def _sync(self, job: Job) -> None:
        """Fold the job's new channel records into its progress, message and events."""
        if job.status == "queued":
            return
        records, job.offset = job.channel.read(job.offset)
        for record in records:
            job.events.append(record)
            seconds = (record.get("metrics") or {}).get("seconds") if record.get("type") == "train.step" else None
            if isinstance(seconds, (int, float)) and seconds > 0:
                self._paces.append(seconds / (record.get("cost") or 1.0))
            if isinstance(record.get("progress"), (int, float)):
                job.progress = max(0.0, min(1.0, float(record["progress"])))
            if record.get("message") and job.status == "running":
                job.message = str(record["message"])

    # stopping ----------------------------------------------------------------------------------
    def stop(self, visitor: str, job_id: str) -> bool:
        """Stop one of the visitor's jobs: a queued job leaves the queue, a running one finishes its
        current step and saves what it has. False if there is no such active job."""
        with self._lock:
            job = self._jobs.get(visitor, {}).get(job_id)
            if job is None or not job.active:
                return False
            job.stop_flag.set()
            job.channel.request_stop()
            if job.status == "queued":
                try:
                    self._queue.remove(job)
                except ValueError:
                    pass
                job.status, job.finished, job.message = "stopped", time.time(), "stopped before it started"
            else:
                job.message = "stopping after the current step..."
            return True

    # the worker --------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._wake.wait(timeout=5)
                if self._closed:
                    return
                job = self._queue.popleft()
                job.status, job.started, job.message = "running", time.time(), "starting..."
                self._running = job
            self._run(job)
            with self._lock:
                self._running = None

    def _run(self, job: Job) -> None:
        ctx = JobContext(job.channel, Workspace(self.root / job.visitor), job.stop_flag)
        try:
            result = job.context.run(job.fn, ctx, *job.args, **job.kwargs) if job.context else \
                job.fn(ctx, *job.args, **job.kwargs)
        except BaseException as exc:  # noqa: BLE001 - a job must never take the worker down
            if expected_error(exc):   # e.g. the hub is offline: one line says it all, no traceback
                log.warning("job %s (%s) failed: %s", job.id, job.kind, short_error(exc).replace("\n", "; "))
            else:
                log.exception("job %s (%s) failed", job.id, job.kind)
            with self._lock:
                self._sync(job)
                job.status, job.error = "failed", short_error(exc)
                job.message, job.finished = job.error, time.time()
            if not isinstance(exc, Exception):
                raise
            return
        with self._lock:
            self._sync(job)
            job.result = result
            stopped = job.stop_flag.is_set() or job.channel.stop_requested()
            job.status = "stopped" if stopped else "finished"
            job.progress = job.progress if stopped else 1.0
            summary = result.get("message") if isinstance(result, dict) else None
            job.message = (stopped_message(job.events) if stopped else summary or "done")
            job.finished = time.time()
            if not stopped:
                self._took[job.kind] = job.finished - job.started

    def close(self, wait: float = 0.0) -> None:
        """Stop taking jobs and ask the running one to stop (tests, server shutdown)."""
        with self._lock:
            self._closed = True
            for job in list(self._queue):
                job.status, job.finished, job.message = "stopped", time.time(), "server shutting down"
            self._queue.clear()
            if self._running is not None:
                self._running.stop_flag.set()
                self._running.channel.request_stop()
            self._wake.notify_all()
            worker = self._worker
        if wait and worker is not None:
            worker.join(wait)

    # expiry ------------------------------------------------------------------------------------
    def _maybe_cleanup(self) -> None:
        now = time.time()
        if now - self._last_cleanup >= self.cleanup_every:
            self._last_cleanup = now
            try:
                self.cleanup()
            except OSError:
                log.exception("workspace cleanup failed")

    def cleanup(self, max_age_hours: float | None = None, now: float | None = None) -> list[str]:
        """Remove workspaces (and forget jobs) of visitors idle for longer than `max_age_hours`."""
        hours = self.session_hours if max_age_hours is None else max_age_hours
        now = time.time() if now is None else now
        removed = []
        if not self.root.is_dir():
            return removed
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir() or not valid_visitor(folder.name):
                continue
            with self._lock:
                if any(j.active for j in self._jobs.get(folder.name, {}).values()):
                    continue
                marker = folder / ".last_seen"
                seen = (marker if marker.exists() else folder).stat().st_mtime
                if now - seen <= hours * 3600:
                    continue
                self._jobs.pop(folder.name, None)
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        return removed


@dataclass
class JobContext:
    """What a job function receives: its channel, its visitor's workspace and its stop flag."""
    channel: Channel
    workspace: Workspace
    stop_flag: threading.Event

    def progress(self, fraction: float | None = None, message: str = "", **extra) -> None:
        record: dict[str, Any] = {"type": extra.pop("type", "progress"), **extra}
        if fraction is not None:
            record["progress"] = fraction
        if message:
            record["message"] = message
        self.channel.emit(**record)

    def should_stop(self) -> bool:
        return self.stop_flag.is_set() or self.channel.stop_requested()


def stopped_message(events) -> str:
    """What a stopped job's card says: where training stopped, when it was training."""
    last = next((e for e in reversed(events) if e.get("type") == "train.step"), None)
    if last is None:
        return "stopped; what was done so far is saved"
    return (f"stopped at step {last.get('step')}/{last.get('total')} of {label_of(last.get('variant'))}; "
            "what was done so far is saved")


def expected_error(exc: BaseException) -> bool:
    """One of SafeSpace's own errors (a model that cannot be loaded, bad data or settings): its message
    is the whole story. Anything else is a bug and keeps its traceback in the server log."""
    return isinstance(exc, Exception) and type(exc).__module__.startswith("safespace")


def short_error(exc: BaseException) -> str:
    """One line for the page: our own errors speak for themselves; others get their type and the
    first line of their message. Never a traceback (the server log has it)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if expected_error(exc):
        lines = [line for line in text.splitlines() if line.strip()][:6]
        return "\n".join(lines)[:800] or type(exc).__name__
    if "out of memory" in text.lower():
        return "out of memory: try a smaller batch, fewer steps or 4-bit quantization"
    name = type(exc).__name__
    return f"{name}: {first[:300]}" if first else f"{name} (details are in the server log)"


_DEFAULT: JobManager | None = None
_DEFAULT_LOCK = threading.Lock()


def default_manager() -> JobManager:
    """The process-wide manager the app uses (sessions under $SAFESPACE_SESSIONS or home()/sessions)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = JobManager()
        return _DEFAULT


# ---------------------------------------------------------------------------------------------
# Engine calls, one accelerator session each (ZeroGPU pickles their arguments: keep them plain)


def _gpu(duration: int):
    try:
        import spaces  # noqa: PLC0415 - optional; a no-op outside ZeroGPU
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


@_gpu(duration=120)
def gpu_align(model: str, on_event) -> None:
    from . import align
    align.ensure(model, on_event=on_event)


@_gpu(duration=300)
def gpu_train(settings, prepared, out: str, on_event, should_stop):
    from . import pipeline
    return pipeline.train_variant(settings, prepared, Path(out), on_event=on_event, should_stop=should_stop)


@_gpu(duration=120)
def gpu_defend(run_path: str, out: str, keep: float | None, on_progress):
    from . import pipeline
    return pipeline.defend(Path(run_path), Path(out), keep=keep, on_progress=on_progress)


@_gpu(duration=180)
def gpu_evaluate(variants: dict, val: list | None, n_harmful: int, n_benign: int, n_task: int,
                 max_new_tokens: int, on_progress, should_stop, sets: dict | None = None, judge: str = "keyword"):
    from . import evalsets, pipeline
    sets = sets or {}
    return pipeline.evaluate_variants(variants, val, n_harmful=n_harmful, n_benign=n_benign, n_task=n_task,
                                      max_new_tokens=max_new_tokens, on_progress=on_progress,
                                      harmful_sets=sets.get("harmful", evalsets.DEFAULT_HARMFUL),
                                      benign_sets=sets.get("benign", evalsets.DEFAULT_BENIGN), judge=judge,
                                      should_stop=should_stop)


@_gpu(duration=60)
def gpu_compare(variants: dict, prompts: list, max_new_tokens: int, on_progress, should_stop):
    from . import pipeline
    return pipeline.compare(variants, prompts, max_new_tokens=max_new_tokens, on_progress=on_progress,
                            should_stop=should_stop)


# ---------------------------------------------------------------------------------------------
# Job functions: what the app queues (each gets a JobContext first)


def train_plan(settings, safegrad_loss: str) -> list[tuple[str, Any]]:
    """Every trained variant in story order with its settings: SafeGrad off, or on with `safegrad_loss`,
    and the variant's own overrides (the registry decides what "train all" trains)."""
    from dataclasses import replace

    plan = []
    for key in keys_of("train"):
        spec = VARIANTS[key]
        mode = safegrad_loss if spec.safegrad else "off"
        plan.append((key, replace(settings, **spec.train_overrides, safegrad=replace(settings.safegrad, mode=mode))))
    return plan


def train_job(ctx: JobContext, plan: list[tuple[str, Any]], source: str, harmful_ratio: float,
              seed: int = 0) -> dict:
    """Train one or more variants (e.g. plain, then SafeGrad) on the visitor's data, in order."""
    from . import align, models, pipeline

    ctx.progress(0.0, "preparing the data...")
    prepared = pipeline.prepare_data(source, harmful_ratio=harmful_ratio, seed=seed)
    ctx.progress(0.0, f"{len(prepared.train)} training rows ({prepared.n_harmful} harmful)", type="data",
                 n_train=len(prepared.train), n_user=prepared.n_user, n_harmful=prepared.n_harmful,
                 n_val=len(prepared.val))
    model = plan[0][1].model
    if model == models.ALIGNED_KEY and not align.is_built():
        started = time.time()
        ctx.progress(0.0, f"building the aligned base {model} (once; about 15 min on a 2-core CPU)...",
                     type="align.begin")
        gpu_align(model, TrainReporter(ctx.channel, "aligned base", phase="align"))
        ctx.progress(0.0, "the aligned base is ready", type="align.done", seconds=time.time() - started)
    costs = [step_cost(settings) * settings.steps for _, settings in plan]
    done: dict[str, dict] = {}
    for index, (variant, settings) in enumerate(plan):
        if ctx.should_stop():
            break
        name = label_of(variant)
        ctx.progress(index / len(plan), f"{name}: loading {settings.model}...")
        reporter = TrainReporter(ctx.channel, variant, index, len(plan), label=name, after=sum(costs[index + 1:]),
                                 cost=step_cost(settings))
        run = gpu_train(settings, prepared, str(ctx.workspace.run_path(variant)), reporter, StopCheck(ctx.channel))
        ctx.workspace.forget_results()
        for derived in derived_of(variant):  # made from the previous run, it no longer matches this one
            shutil.rmtree(ctx.workspace.run_path(derived), ignore_errors=True)
        done[variant] = {"name": run.name, "summary": run.summary}
        ctx.progress((index + 1) / len(plan), f"{name}: {run.summary.get('status', 'finished')} after "
                     f"{run.summary.get('steps_done', '?')} steps", type="train.saved", variant=variant)
    parts = [f"{label_of(v)} ({d['summary'].get('steps_done', '?')} steps)" for v, d in done.items()]
    return {"runs": done, "message": "trained: " + ", ".join(parts) if parts else "nothing trained"}


DEFENCES = {"safedelta": gpu_defend}    # a derived variant's post-hoc defence -> its step on the visitor's run


def defend_job(ctx: JobContext, keep: float | None) -> dict:
    """Every post-hoc variant whose source run exists (Safe Delta on the plain fine-tune first); the
    result is the first one's."""
    derived = [k for k in keys_of("derived") if ctx.workspace.run(VARIANTS[k].derived_from) is not None]
    if not derived or derived[0] != keys_of("derived")[0]:
        raise JobError("there is no plain fine-tune yet: train one first (SafeGrad off)")
    results = []
    for index, key in enumerate(derived):
        spec = VARIANTS[key]
        source = ctx.workspace.run(spec.derived_from)
        ctx.progress(index / len(derived), f"{spec.label}: computing the safety curvature of each layer...")
        results.append(DEFENCES[spec.defence](str(source.path), str(ctx.workspace.run_path(key)), keep,
                                             ProgressReporter(ctx.channel, spec.label)))
    ctx.workspace.forget_results()
    run = results[0]
    kept = run.summary.get("kept_energy_frac")
    message = f"kept {100 * kept:.1f} % of the update's energy" if isinstance(kept, (int, float)) else "done"
    return {"name": run.name, "summary": run.summary, "message": message}


def evaluate_job(ctx: JobContext, source: str | None, harmful_ratio: float, seed: int, n_harmful: int,
                 n_benign: int, n_task: int, max_new_tokens: int, sets: dict | None = None,
                 judge: str = "keyword") -> dict:
    """Answer harmful, benign and task prompts with every variant; judge and score them. The task's
    held-out rows are split with the trained runs' own seed and ratio, so none was trained on."""
    from . import pipeline

    variants, notes = ctx.workspace.variants()
    if not variants:
        raise JobError("train at least one variant first")
    val = None
    if source and n_task > 0:
        recorded = {}
        for path in filter(None, variants.values()):
            info = runs_mod.load_run(path).config.get("data")
            if isinstance(info, dict):
                recorded = info
                break
        val = pipeline.prepare_data(source, harmful_ratio=recorded.get("harmful_ratio", harmful_ratio),
                                    seed=recorded.get("seed", seed)).val[:n_task]
    ctx.progress(0.0, f"answering with {len(variants)} variants...", type="variants", variants=list(variants),
                 notes=notes)
    results, answers = gpu_evaluate(variants, val, n_harmful, n_benign, n_task, max_new_tokens,
                                    ProgressReporter(ctx.channel, "answering"), StopCheck(ctx.channel),
                                    sets, judge)
    ctx.workspace.write_json("results.json", results)
    ctx.workspace.write_json("answers.json", answers)
    message = f"{len(variants)} variants answered {len(answers)} prompts each"
    return {"results": results, "answers": answers, "notes": notes, "message": "; ".join([message, *notes])}


def ask_job(ctx: JobContext, prompt: str, max_new_tokens: int) -> dict:
    """One free prompt, answered by every variant."""
    from .data import Example

    variants, notes = ctx.workspace.variants()
    if not variants:
        raise JobError("train at least one variant first")
    rows = gpu_compare(variants, [Example(prompt=prompt, response="")], max_new_tokens,
                       ProgressReporter(ctx.channel, "answering"), StopCheck(ctx.channel))
    return {"rows": rows, "notes": notes, "message": "; ".join([f"{len(variants)} variants answered", *notes])}


# ---------------------------------------------------------------------------------------------
# Exports


def zip_adapter(run: runs_mod.Run, dest_dir: str | Path) -> Path:
    """A zip of the run's PEFT adapter (load it with PeftModel.from_pretrained after unzipping)."""
    if run.adapter is None:
        raise JobError(f"{run.name} is the base model itself; it has no adapter to download")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    folder = runs_mod.export_name(run)
    target = dest_dir / f"{folder}.zip"
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(3)}")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(run.adapter.iterdir()):
            if file.is_file():
                archive.write(file, f"{folder}/{file.name}")
        archive.writestr(f"{folder}/safespace_run.json",
                         json.dumps({"config": run.config, "summary": run.summary}, indent=2, default=str))
        archive.writestr(f"{folder}/README.md", runs_mod.export_readme(run))   # how to load it, as in the app
    os.replace(tmp, target)
    return target

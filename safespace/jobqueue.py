"""A job queue for a shared machine: N worker slots, a bounded FIFO queue, one private folder per visitor.

A visitor is a stable id. Each visitor has a registry of its jobs (nobody else can list, read or stop
them) and a folder  <root>/<visitor>/  removed by `JobManager.cleanup` after `session_hours` without a
visit. `workers` threads (SAFESPACE_WORKERS, else `default_workers` for this hardware) each run one job
at a time; up to `max_queue` more wait in order, each knowing how many jobs are ahead of it and, once
something alike has run here, about how long it will wait.

Every job whose function is registered (`functions`) and whose arguments are plain is also recorded
in `<root>/jobs.sqlite3` (jobstore.py): a manager started on the same root (a restarted server) runs
the queued ones in their order, marks the one that was running `interrupted`, and `resume` queues it
again.

A job reports through a `Channel`, an append-only events file and a stop file, rather than callbacks,
so the same call works in this process and in a worker process its arguments are pickled to. A record
may carry `progress` (0..1), `message`, `left` (seconds the job has left; with `prelude`, only what
comes before the work its meta "cost" measures) and `pace` (measured seconds per unit of that cost).

This module knows nothing of what the jobs do; `jobs.py` fits it to the app.
"""
from __future__ import annotations

import contextvars
import json
import logging
import math
import os
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import jobstore
from .config import env_count, on_zero_gpu

log = logging.getLogger("safespace.jobs")

ACTIVE = ("queued", "running")
DONE = ("finished", "stopped", "failed", "interrupted")
RESUMABLE = ("interrupted", "stopped")     # what `resume` queues again
INTERRUPTED_MESSAGE = "interrupted by a server restart; press Resume to continue where it left off"
RERUN_MESSAGE = "interrupted by a server restart; queued again in its place"
VISITOR_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")      # also safe as a folder name
_PACKAGE = __name__.split(".")[0]                      # whose own errors are expected ones


class JobError(RuntimeError):
    """A request the job system refuses; the message is one short line for the visitor."""


class QueueFull(JobError):
    pass


def new_visitor_id() -> str:
    return secrets.token_urlsafe(16)


def valid_visitor(visitor: Any) -> bool:
    return isinstance(visitor, str) and bool(VISITOR_ID.match(visitor))


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
    """`should_stop` for work in another process: true once the page asked this job to stop."""
    channel: Channel

    def __call__(self) -> bool:
        return self.channel.stop_requested()


_WORKER: list[str] = []


def worker_name() -> str:
    """What the one worker slot runs on, as the page names it: a GPU where there is one, else the
    machine (the word accelerator only where there is one)."""
    if not _WORKER:
        name = "the shared machine"
        if on_zero_gpu():
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


# ---------------------------------------------------------------------------------------------
# Jobs, their snapshots and what a job function receives


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
    durable: bool = False           # recorded in the job store (its call can run after a restart)
    queued_at: float = field(default_factory=time.time)

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


class Folder:
    """A visitor's private folder: jobs/<id>/ holds each job's channel; .last_seen marks the last visit."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.jobs = self.root / "jobs"
        self.jobs.mkdir(parents=True, exist_ok=True)

    def touch(self) -> None:
        (self.root / ".last_seen").touch()

    def last_seen(self) -> float:
        marker = self.root / ".last_seen"
        return (marker if marker.exists() else self.root).stat().st_mtime


@dataclass
class JobContext:
    """What a job function receives: its channel, its visitor's folder and its stop flag."""
    channel: Channel
    workspace: Folder
    stop_flag: threading.Event

    def progress(self, message: str = "", fraction: float | None = None, **extra) -> None:
        """The one progress shape, (message, fraction 0..1), plus any fields the page reads."""
        record: dict[str, Any] = {"type": extra.pop("type", "progress"), **extra}
        if fraction is not None:
            record["progress"] = fraction
        if message:
            record["message"] = message
        self.channel.emit(**record)

    def should_stop(self) -> bool:
        return self.stop_flag.is_set() or self.channel.stop_requested()


def expected_error(exc: BaseException) -> bool:
    """One of this package's own errors (a model that cannot be loaded, bad data or settings): its
    message is the whole story. Anything else is a bug and keeps its traceback in the server log."""
    return isinstance(exc, Exception) and type(exc).__module__.split(".")[0] == _PACKAGE


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


# ---------------------------------------------------------------------------------------------
# How many workers this machine runs, and how many torch threads each one gets

CPU_CORES_PER_WORKER = 4    # below 2 x this many cores, a second CPU worker only oversubscribes the cores


def default_workers(cpu_count: int | None, gpu_free_bytes: int | None = None, job_bytes: int | None = None) -> int:
    """Workers for this hardware: on a GPU as many jobs as fit in its free memory (at least 1, at most
    one per core); on a CPU 1 below 8 cores, else one per CPU_CORES_PER_WORKER cores."""
    cores = max(1, int(cpu_count or 1))
    if gpu_free_bytes and job_bytes and job_bytes > 0:
        return max(1, min(int(gpu_free_bytes // job_bytes), cores))
    if cores < 2 * CPU_CORES_PER_WORKER:
        return 1
    return cores // CPU_CORES_PER_WORKER


def gpu_free_bytes() -> int | None:
    """Free memory on the first CUDA device, or None without one (or on ZeroGPU, where the main
    process must not touch CUDA and each call gets its own GPU anyway)."""
    if on_zero_gpu():
        return None
    try:
        import torch  # noqa: PLC0415 - only to ask about the device
        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[0])
    except (ImportError, RuntimeError):
        pass
    return None


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """torch threads for one worker: the thread budget ($SAFESPACE_THREADS, else the cores) divided
    among the workers (at least one each), so N workers together use what one would."""
    budget = cores or env_count("SAFESPACE_THREADS", error=JobError) or os.cpu_count() or 1
    return max(1, budget // max(1, workers))


def _set_worker_threads(workers: int) -> None:
    """Give this worker thread its share of torch's CPU threads (torch's count is per thread)."""
    if workers <= 1 and not os.environ.get("SAFESPACE_THREADS"):
        return                              # one worker, no budget set: leave torch's default alone
    try:
        import torch  # noqa: PLC0415 - the jobs train and generate with it
    except ImportError:
        return
    torch.set_num_threads(threads_per_worker(workers))


# ---------------------------------------------------------------------------------------------
# The manager


class JobManager:
    """Per-visitor job registry with `workers` worker slots, a bounded FIFO queue and durable records.
    `folder_type` makes a visitor's folder; `stopped_message` says what a stopped job's card reads;
    `functions` names the job functions whose jobs survive a restart (more may be given per manager);
    `rerun_kinds` are kinds short enough to start again by themselves after a restart (the others wait
    for Resume)."""

    folder_type: type = Folder
    functions: dict[str, Callable] = {}
    rerun_kinds: tuple[str, ...] = ()

    def __init__(self, root: str | Path, *, max_queue: int = 8, max_active_per_visitor: int = 3,
                 keep_per_visitor: int = 20, session_hours: float = 24.0, cleanup_every: float = 600.0,
                 workers: int | None = None, functions: dict[str, Callable] | None = None):
        self.root = Path(root)
        self.workers = self._worker_count(workers)
        threads_per_worker(self.workers)         # a bad $SAFESPACE_THREADS fails here, not in a worker
        self.functions = {**type(self).functions, **(functions or {})}
        self.max_queue = max_queue
        self.max_active_per_visitor = max_active_per_visitor
        self.keep_per_visitor = keep_per_visitor
        self.session_hours = float(session_hours)
        self.cleanup_every = cleanup_every
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._jobs: dict[str, OrderedDict[str, Job]] = {}
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._last_cleanup = 0.0
        self._paces: deque[float] = deque(maxlen=50)   # measured seconds per unit of cost, here
        self._took: dict[str, float] = {}              # the last finished job of each kind: its seconds
        self.root.mkdir(parents=True, exist_ok=True)
        self._store = jobstore.JobStore(self.root / jobstore.FILE)
        self._restore()

    @staticmethod
    def stopped_message(events: list) -> str:
        return "stopped"

    def _worker_count(self, workers: int | None) -> int:
        """`workers`, else $SAFESPACE_WORKERS, else what this hardware runs well (`default_workers`)."""
        if workers is None:
            workers = env_count("SAFESPACE_WORKERS", error=JobError)
        if workers is None:
            workers = default_workers(os.cpu_count(), gpu_free_bytes(), self.job_bytes())
        if workers < 1:
            raise JobError(f"workers must be at least 1, got {workers}")
        return int(workers)

    @staticmethod
    def job_bytes() -> int | None:
        """Accelerator memory one job needs (None: unknown); the app's manager estimates it."""
        return None

    # visitors and their folders ----------------------------------------------------------------
    def workspace(self, visitor: str):
        if not valid_visitor(visitor):
            raise JobError("invalid visitor id")
        ws = self.folder_type(self.root / visitor)
        ws.touch()
        self._maybe_cleanup()
        return ws

    # submitting --------------------------------------------------------------------------------
    def submit(self, visitor: str, kind: str, fn: Callable, *args, title: str | None = None,
               meta: dict | None = None, **kwargs) -> JobInfo:
        """Queue `fn(context, *args, **kwargs)`; returns at once. Raises QueueFull / JobError."""
        ws = self.workspace(visitor)
        with self._lock:
            self._check_room(visitor)
            job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
            job = Job(id=job_id, visitor=visitor, kind=kind, title=title or kind,
                      channel=Channel(ws.jobs / job_id), fn=fn, args=args, kwargs=kwargs,
                      context=contextvars.copy_context(), meta=dict(meta or {}))
            self._record(job)
            registry = self._jobs.setdefault(visitor, OrderedDict())
            registry[job_id] = job
            self._trim(registry)
            self._queue.append(job)
            self._ensure_worker()
            self._wake.notify_all()
            return self._info(job)

    def _check_room(self, visitor: str) -> None:
        """Whether one more job of `visitor` may queue (the lock is held): the server is open, the
        visitor is under its share, the queue has room. Raises JobError / QueueFull saying which."""
        if self._closed:
            raise JobError("the server is shutting down; try again in a minute")
        mine = [j for j in self._jobs.get(visitor, {}).values() if j.active]
        if len(mine) >= self.max_active_per_visitor:
            raise JobError(f"you already have {len(mine)} jobs queued or running; "
                           "wait for one to finish or stop it")
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"the queue is full ({len(self._queue)} jobs waiting for {worker_name()}); "
                            "please try again in a few minutes")

    def _trim(self, registry: OrderedDict) -> None:
        while len(registry) > self.keep_per_visitor:
            oldest = next((k for k, j in registry.items() if not j.active), None)
            if oldest is None:
                break
            old = registry.pop(oldest)
            shutil.rmtree(old.channel.folder, ignore_errors=True)
            if old.durable:
                self._store_call(self._store.delete, [old.id])

    def _ensure_worker(self) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]
        while len(self._threads) < self.workers:
            thread = threading.Thread(target=self._work, name=f"{_PACKAGE}-worker-{len(self._threads) + 1}",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()

    # durable records ---------------------------------------------------------------------------
    def _name_of(self, fn: Callable) -> str | None:
        return next((name for name, known in self.functions.items() if known is fn), None)

    def _record(self, job: Job) -> None:
        """Write a new job to the store when its function is registered and its arguments are plain."""
        name = self._name_of(job.fn)
        call = jobstore.encode_call(name, job.args, job.kwargs) if name else None
        if call is None:
            return
        job.durable = True
        self._store_call(self._store.add, {
            "id": job.id, "visitor": job.visitor, "kind": job.kind, "title": job.title, "state": job.status,
            "submitted": job.created, "queued": job.queued_at, "message": job.message,
            "meta": jobstore.to_json(job.meta) or "{}", "call": call})

    def _persist(self, job: Job, **values) -> None:
        """Write a durable job's changed fields (its state always)."""
        if job.durable:
            self._store_call(self._store.update, job.id, state=job.status, **values)

    def _store_call(self, method: Callable, *args, **kwargs) -> None:
        try:
            method(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a full disk must not take the page or the worker down
            log.exception("writing the job records failed")

    def _restore(self) -> None:
        """Load the records a previous server left: queued jobs queue again in their order, the running
        ones become interrupted (those of `rerun_kinds` queue again, first), finished ones are listed as
        before."""
        queued = []
        for row in self._store.load():
            job = self._job_from(row)
            if job is None:
                continue
            self._jobs.setdefault(job.visitor, OrderedDict())[job.id] = job
            if job.status == "interrupted" and job.kind in self.rerun_kinds and job.fn is not None:
                job.status, job.message, job.started, job.finished = "queued", RERUN_MESSAGE, None, None
                job.channel.stop_file.unlink(missing_ok=True)
                self._persist(job, message=job.message, started=None, finished=None)
            if job.status == "queued":
                queued.append(job)
        for job in sorted(queued, key=lambda j: j.queued_at):
            self._queue.append(job)
        if queued:
            log.info("restored %d queued job(s) from %s", len(queued), self._store.path)
            self._ensure_worker()

    def _job_from(self, row: dict) -> Job | None:
        """A Job from its record; a job that was running becomes interrupted, one whose function is
        unknown here cannot run again and says so."""
        if not valid_visitor(row["visitor"]):
            return None
        call = json.loads(row["call"]) if row.get("call") else {}
        fn = self.functions.get(call.get("fn"))
        job = Job(id=row["id"], visitor=row["visitor"], kind=row["kind"], title=row["title"],
                  channel=Channel(self.root / row["visitor"] / "jobs" / row["id"]), fn=fn,
                  args=tuple(call.get("args", ())), kwargs=dict(call.get("kwargs", {})), status=row["state"],
                  progress=row["progress"] or 0.0, message=row["message"] or "", error=row["error"],
                  result=json.loads(row["result"]) if row.get("result") else None, created=row["submitted"],
                  started=row["started"], finished=row["finished"], meta=json.loads(row["meta"] or "{}"),
                  durable=True, queued_at=row["queued"])
        if job.status == "running":
            job.status, job.message, job.finished = "interrupted", INTERRUPTED_MESSAGE, time.time()
            self._persist(job, message=job.message, finished=job.finished)
        elif job.status == "queued" and fn is None:
            job.status, job.finished = "failed", time.time()
            job.error = job.message = f"this {job.kind} job cannot run on this server version; submit it again"
            self._persist(job, message=job.message, error=job.error, finished=job.finished)
        return job

    # resuming ----------------------------------------------------------------------------------
    def resume(self, visitor: str, job_id: str) -> JobInfo:
        """Queue an interrupted or stopped job again, same id and folder (a training continues from its
        last checkpoint). Raises JobError when there is no such job or the queue is full."""
        with self._lock:
            job = self._jobs.get(visitor, {}).get(job_id)
            if job is None or job.status not in RESUMABLE:
                raise JobError("there is no interrupted or stopped job to resume")
            if job.fn is None:
                raise JobError(f"this {job.kind} job cannot run on this server version; submit it again")
            self._check_room(visitor)
            job.channel.stop_file.unlink(missing_ok=True)
            job.stop_flag = threading.Event()
            job.status, job.message, job.queued_at = "queued", "waiting for the worker (resuming)", time.time()
            job.finished = job.error = job.result = None
            self._persist(job, queued=job.queued_at, message=job.message, finished=None, error=None, result=None)
            self._queue.append(job)
            self._ensure_worker()
            self._wake.notify_all()
            return self._info(job)

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
            return bool(self._running)

    def running(self) -> int:
        """How many jobs run right now (at most `workers`)."""
        with self._lock:
            return len(self._running)

    def _info(self, job: Job) -> JobInfo:
        self._sync(job)
        return JobInfo(id=job.id, kind=job.kind, title=job.title, status=job.status, progress=job.progress,
                       message=job.message, events=tuple(job.events), result=job.result, error=job.error,
                       created=job.created, started=job.started, finished=job.finished,
                       ahead=self._ahead(job), stop_requested=job.stop_flag.is_set(), meta=dict(job.meta),
                       wait=self._wait(job))

    # how long the line is -------------------------------------------------------------------------
    def _wait(self, job: Job) -> float | None:
        """Seconds until a queued job starts: the workers, each free once its running job ends, take the
        jobs ahead in order, each on the first free worker; None when one of them cannot be estimated
        yet (nothing like it has run on this machine)."""
        if job.status != "queued" or job not in self._queue:
            return None
        free_at = [math.inf if (left := self._left(r)) is None else left for r in self._running]
        free_at += [0.0] * max(0, self.workers - len(free_at))
        for other in self._queue:
            start = min(free_at)
            if math.isinf(start):
                return None
            if other is job:
                return start
            need = self._need(other)
            if need is None:
                return None
            free_at[free_at.index(start)] = start + need
        return None

    def _left(self, job: Job) -> float | None:
        """What a running job has left: its latest reported `left`, else its expected duration less the
        time it has run."""
        self._sync(job)
        now = time.time()
        last = next((e for e in reversed(job.events) if isinstance(e.get("left"), (int, float))), None)
        if last is not None:
            left = max(0.0, last["left"] - (now - last.get("time", now)))
            if not last.get("prelude"):
                return left
            need = self._need(job)                       # a prelude: the measured work comes after it
            return None if need is None else left + need
        need = self._need(job)
        return None if need is None else max(0.0, need - (now - (job.started or now)))

    def _need(self, job: Job) -> float | None:
        """How long a job runs on this machine, as far as measured: a job with a meta "cost" that cost
        at the measured pace; any other the last finished job of its kind."""
        if "cost" in job.meta:
            cost = job.meta["cost"]
            if not isinstance(cost, (int, float)) or not self._paces:
                return None
            paces = sorted(self._paces)
            return cost * paces[len(paces) // 2]
        return self._took.get(job.kind)

    def _ahead(self, job: Job) -> int:
        """The queued jobs before this one, plus one while every worker is busy (the job it waits on)."""
        if job.status != "queued":
            return 0
        try:
            index = self._queue.index(job)
        except ValueError:
            return 0
        busy = sum(running.status == "running" for running in self._running)   # not one that just ended
        return index + (1 if busy >= self.workers else 0)

    def _sync(self, job: Job) -> None:
        """Fold the job's new channel records into its progress, message and events."""
        if job.status == "queued":
            return
        records, job.offset = job.channel.read(job.offset)
        for record in records:
            job.events.append(record)
            if isinstance(record.get("pace"), (int, float)) and record["pace"] > 0:
                self._paces.append(record["pace"])
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
                self._persist(job, finished=job.finished, message=job.message)
            else:
                job.message = "stopping after the current step..."
            return True

    # the worker --------------------------------------------------------------------------------
    def _work(self) -> None:
        _set_worker_threads(self.workers)
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._wake.wait(timeout=5)
                if self._closed:
                    return
                job = self._queue.popleft()
                job.status, job.started, job.message = "running", time.time(), "starting..."
                self._running.append(job)
                self._persist(job, started=job.started, message=job.message)
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._running.remove(job)

    def _run(self, job: Job) -> None:
        ctx = JobContext(job.channel, self.folder_type(self.root / job.visitor), job.stop_flag)
        try:
            result = job.context.run(job.fn, ctx, *job.args, **job.kwargs) if job.context else \
                job.fn(ctx, *job.args, **job.kwargs)
        except BaseException as exc:  # noqa: BLE001 - a job must never take the worker down
            self._failed(job, exc)
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
            job.message = (self.stopped_message(job.events) if stopped else summary or "done")
            if stopped and self._closed:      # stopped by a shutdown, not by its visitor: resumable
                job.status, job.message = "interrupted", INTERRUPTED_MESSAGE
            job.finished = time.time()
            if not stopped:
                self._took[job.kind] = job.finished - job.started
            self._persist(job, finished=job.finished, progress=job.progress, message=job.message,
                          result=jobstore.to_json(result))

    def _failed(self, job: Job, exc: BaseException) -> None:
        if expected_error(exc):   # e.g. the hub is offline: one line says it all, no traceback
            log.warning("job %s (%s) failed: %s", job.id, job.kind, short_error(exc).replace("\n", "; "))
        else:
            log.exception("job %s (%s) failed", job.id, job.kind)
        with self._lock:
            self._sync(job)
            job.status, job.error = "failed", short_error(exc)
            job.message, job.finished = job.error, time.time()
            self._persist(job, finished=job.finished, progress=job.progress, message=job.message, error=job.error)

    def close(self, wait: float = 0.0) -> None:
        """Stop taking jobs and ask the running ones to stop (tests, server shutdown). Queued jobs stay
        queued in the records, and the running ones become interrupted: the next server goes on."""
        with self._lock:
            self._closed = True
            for job in list(self._queue):
                job.status, job.finished, job.message = "stopped", time.time(), "server shutting down"
            self._queue.clear()
            for job in self._running:
                job.stop_flag.set()
                job.channel.request_stop()
            self._wake.notify_all()
            threads = list(self._threads)
        deadline = time.time() + wait
        for thread in threads if wait else ():
            thread.join(max(0.0, deadline - time.time()))

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
        """Remove folders (and forget jobs) of visitors idle for longer than `max_age_hours`."""
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
                self._store_call(self._store.delete_visitor, folder.name)
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        return removed

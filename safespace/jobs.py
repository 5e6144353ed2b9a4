"""The app's background jobs: the generic queue (jobqueue) fitted with each visitor's Workspace, the
workflows it runs (workflows), the limits of a public deployment (limits) and downloads (export),
under the names the UI reads. `default_manager()` is the process-wide manager the app uses.

Event handlers only enqueue and return; the page polls. Closing or reloading a tab therefore never
stalls a job, and a reloaded page finds its visitor's jobs again. This module does not import gradio.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

from . import jobqueue
from .config import env_count, env_number, home
from .export import zip_adapter
from .jobqueue import (ACTIVE, DONE, RESUMABLE, Channel, JobContext, JobError, JobInfo, QueueFull, StopCheck,
                       default_workers, expected_error, new_visitor_id, short_error, valid_visitor, worker_name)
from .limits import SpaceLimits
from .workflows import (DEFENCES, SAFEGRAD_STEP_COST, ProgressReporter, TrainReporter, ask_job, defend_job,
                        evaluate_job, format_seconds, plan_cost, step_cost, stopped_message, train_job, train_plan)
from .workspace import Workspace

__all__ = ["ACTIVE", "DONE", "RESUMABLE", "DEFENCES", "SAFEGRAD_STEP_COST", "Channel", "JobContext", "JobError",
           "JobInfo", "JobManager", "ProgressReporter", "QueueFull", "SpaceLimits", "StopCheck", "TrainReporter",
           "Workspace", "ask_job", "default_manager", "default_workers", "defend_job", "estimate_job_bytes",
           "evaluate_job", "expected_error", "format_seconds", "new_visitor_id", "plan_cost", "short_error",
           "step_cost", "stopped_message", "train_job", "train_plan",
           "valid_visitor", "worker_name", "zip_adapter"]


def sessions_root() -> Path:
    """Where the visitors' workspaces live: $SAFESPACE_SESSIONS, else home()/sessions."""
    return Path(os.environ.get("SAFESPACE_SESSIONS") or home() / "sessions")


GIB = 2 ** 30
LARGEST_MODEL_PARAMS = 1.3e9     # the registry's largest model (Llama 3.2 1B, Gemma 3 1B): any choice fits


def estimate_job_bytes(params: float, bytes_per_param: float = 2.0, overhead: float = 3.0) -> int:
    """Accelerator memory one job needs: the base weights (bf16: 2 bytes a parameter, nf4: about 0.5)
    times `overhead` for activations, LoRA optimizer state and generation caches, plus 1 GiB of context."""
    return int(params * bytes_per_param * overhead + GIB)


class JobManager(jobqueue.JobManager):
    """The app's manager: a visitor's folder is a Workspace, a stopped training says where it stopped,
    and sessions expire after $SAFESPACE_SESSION_HOURS (24) unless told otherwise. The app's four job
    functions are recorded durably and survive a restart."""

    folder_type = Workspace
    stopped_message = staticmethod(stopped_message)
    functions = {"train": train_job, "defend": defend_job, "evaluate": evaluate_job, "ask": ask_job}
    rerun_kinds = ("defend", "evaluate", "ask")      # minutes at most: redone after a restart, no Resume needed

    @staticmethod
    def job_bytes() -> int:
        """$SAFESPACE_JOB_GB, else the estimate for the largest model a visitor can pick."""
        gb = env_number("SAFESPACE_JOB_GB", None, error=JobError)
        return int(gb * GIB) if gb is not None else estimate_job_bytes(LARGEST_MODEL_PARAMS)

    def __init__(self, root: str | Path | None = None, *, session_hours: float | None = None, **kwargs):
        hours = session_hours if session_hours is not None else env_number("SAFESPACE_SESSION_HOURS", 24,
                                                                               error=JobError)
        kwargs.setdefault("max_queue", max_queue())
        super().__init__(root if root is not None else sessions_root(), session_hours=float(hours), **kwargs)


MAX_QUEUE = 32      # a workshop's worth of visitors, each with a job waiting


def max_queue() -> int:
    """How many jobs may wait: $SAFESPACE_MAX_QUEUE, else MAX_QUEUE."""
    return env_count("SAFESPACE_MAX_QUEUE", MAX_QUEUE, error=JobError)


_DEFAULT: JobManager | None = None
_DEFAULT_LOCK = threading.Lock()


def default_manager() -> JobManager:
    """The process-wide manager the app uses (sessions under $SAFESPACE_SESSIONS or home()/sessions)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = JobManager()
        return _DEFAULT

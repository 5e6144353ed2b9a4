"""Training checkpoints: the loop's whole state in one file, so that a run continued from it is the same
run, bit for bit, as one never interrupted (train.train writes and reads them)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import data as data_mod
from .config import TrainSettings

if TYPE_CHECKING:
    from .train import Loop

log = logging.getLogger(__name__)


CHECKPOINT_FILE = "checkpoint.safetensors"


def fingerprint(settings: TrainSettings, examples: list, align_examples: list | None, kind: str,
                shape_key: str | None = None) -> str:
    """What a checkpoint must match to be continued: the kind of run, its settings, its rows and how
    they were reshaped (train.train's `shape`, by its key; absent for a run that takes the rows whole)."""
    described = {"kind": kind, "settings": settings.to_dict(), **({"shape": shape_key} if shape_key else {})}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
    digest.update(data_mod.rows_jsonl(examples).encode())
    if align_examples:
        digest.update(b"\0align\0" + data_mod.rows_jsonl(align_examples).encode())
    return digest.hexdigest()


class Checkpoint:
    """One file, `<folder>/checkpoint.safetensors`: adapter, optimizer, scheduler, batch streams, SafeGrad's
    cached alignment gradient, torch/CUDA/python RNG states, the metrics so far. Tensors are stored as
    safetensors, the rest as JSON in its metadata (nothing is ever unpickled). Written to a temp file,
    then renamed, so a crash mid-write leaves the previous checkpoint whole."""

    def __init__(self, folder: str | Path, key: str, every: int = 0):
        self.path = Path(folder) / CHECKPOINT_FILE
        self.key, self.every = key, every

    def due(self, done: int, total: int) -> bool:
        """Save after this step? Every `every` steps (0: never), not after the last one."""
        return self.every > 0 and done % self.every == 0 and done < total

    def finish(self, loop: "Loop", metrics: list[dict], seconds: float, status: str) -> None:
        """A stopped run keeps its checkpoint to go on later; a finished one needs none."""
        if status == "stopped":
            self.save(loop, metrics, seconds)
        else:
            self.clear()

    def save(self, loop: "Loop", metrics: list[dict], seconds: float) -> None:
        state = {"key": self.key, "step": len(metrics), "metrics": metrics, "seconds": seconds,
                 "adapter": {n: p.detach() for n, p in loop.model.named_parameters() if p.requires_grad},
                 "optimizer": loop.optimizer.state_dict(), "scheduler": loop.scheduler.state_dict(),
                 "streams": [s.state() if s is not None else None for s in (loop.task_stream, loop.align_stream)],
                 "safegrad": None if loop.surgery is None else
                 {"g_a": loop.surgery.g_a, "align_loss": loop.surgery.align_loss},
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
        tensors: dict = {}
        skeleton = json.dumps(_split(state, tensors))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"state": skeleton})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def restore(self, loop: "Loop") -> tuple[list[dict], float]:
        """Load a matching checkpoint into `loop`: (metrics so far, seconds trained so far); ([], 0.0)
        when there is none, or it belongs to other settings or data (then the run starts over)."""
        if not self.path.exists():
            return [], 0.0
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                # fresh allocations: CPU reductions (SafeGrad's dot products) depend on the buffer's alignment
                tensors = {name: handle.get_tensor(name).clone() for name in handle.keys()}
                state = _join(json.loads(handle.metadata()["state"]), tensors)
        except Exception as exc:  # noqa: BLE001 - a damaged checkpoint only costs the steps it saved
            log.warning("checkpoint %s is unreadable (%s); starting over", self.path, exc)
            return [], 0.0
        if state.get("key") != self.key:
            log.info("checkpoint %s is for other settings or data; starting over", self.path)
            return [], 0.0
        self._load(loop, state)
        log.info("continuing from the checkpoint at step %d", state["step"])
        return list(state["metrics"]), float(state["seconds"])

    @staticmethod
    def _load(loop: "Loop", state: dict) -> None:
        params = dict(loop.model.named_parameters())
        with torch.no_grad():
            for name, value in state["adapter"].items():
                params[name].copy_(value)
        loop.optimizer.load_state_dict(state["optimizer"])
        loop.scheduler.load_state_dict(state["scheduler"])
        for stream, saved in zip((loop.task_stream, loop.align_stream), state["streams"]):
            if stream is not None and saved is not None:
                stream.load_state(saved)
        if loop.surgery is not None and state["safegrad"] is not None:
            g_a = state["safegrad"]["g_a"]
            loop.surgery.g_a = None if g_a is None else g_a.to(next(iter(params.values())).device)
            loop.surgery.align_loss = state["safegrad"]["align_loss"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(as_tuple(state["rng"]["python"]))
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def as_tuple(value):
    """random.Random's state back from a checkpoint (lists where it wants tuples)."""
    return tuple(as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _split(value, tensors: dict):
    """`value` as JSON, each tensor replaced by a named reference into `tensors` (dicts with other than
    text keys, such as the optimizer's per-parameter state, as lists of items)."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().clone().contiguous()
        return {"__tensor__": name}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _split(v, tensors) for k, v in value.items()}
        return {"__items__": [[k, _split(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_split(v, tensors) for v in value]
    return value


def _join(value, tensors: dict):
    """The inverse of _split (tuples come back as lists; as_tuple restores them where one is wanted)."""
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__items__"}:
            return {k: _join(v, tensors) for k, v in value["__items__"]}
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value

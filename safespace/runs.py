"""Run folders: atomic writes, validation on load, listing.

A run folder holds one variant:
    config.json      what produced it (kind: base | train | safedelta, the base model, settings)
    adapter/         a standard PEFT adapter (adapter_config.json + adapter_model.safetensors);
                     absent for kind "base" (the aligned model itself)
    metrics.jsonl    one row per training step (train runs)
    summary.json     written last: status (finished | stopped), counts, timings

A run is built in a sibling temp folder and renamed into place in one step, so a crash mid-write
never leaves a half-written folder under the final name; `load_run` refuses anything incomplete.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
KINDS = ("base", "train", "safedelta")


class RunError(ValueError):
    """A run folder is missing, incomplete or corrupted; the message says which file and why."""


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def staging_dir(final: str | Path) -> Path:
    """A fresh temp folder beside `final`, to be published with `publish`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, final: str | Path) -> Path:
    """Move a finished staging folder to its final name, replacing an older run atomically."""
    final = Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class Run:
    path: Path
    config: dict
    summary: dict

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def model(self) -> str:
        return self.config["model"]

    @property
    def adapter(self) -> Path | None:
        return self.path / "adapter" if self.kind != "base" else None

    @property
    def name(self) -> str:
        return self.path.name

    def metrics(self) -> list[dict]:
        file = self.path / "metrics.jsonl"
        if not file.exists():
            return []
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{file.parent}: not a complete run (missing {file.name})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{file}: corrupted ({exc.__class__.__name__}); delete the run and make it again") from None
    if not isinstance(data, dict):
        raise RunError(f"{file}: corrupted (expected a JSON object)")
    return data


def load_run(path: str | Path) -> Run:
    """Open a run folder, checking that every file it needs is there and readable."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"no run folder at {path}")
    config = _read_json(path / "config.json")
    summary = _read_json(path / "summary.json")
    if config.get("kind") not in KINDS or not isinstance(config.get("model"), str):
        raise RunError(f"{path}/config.json: corrupted (needs kind in {KINDS} and a model name)")
    if config["kind"] != "base":
        for name in ADAPTER_FILES:
            file = path / "adapter" / name
            if not file.is_file() or file.stat().st_size == 0:
                raise RunError(f"{path}: not a complete run (missing adapter/{name})")
        _read_json(path / "adapter" / "adapter_config.json")
        _check_safetensors(path / "adapter" / "adapter_model.safetensors")
    return Run(path, config, summary)


def _check_safetensors(file: Path) -> None:
    """Cheap integrity check: header length and header JSON, and that the data fits the file."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise RunError(f"{file}: corrupted (truncated safetensors)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise RunError(f"{file}: corrupted (bad safetensors header)")
        try:
            header = json.loads(handle.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunError(f"{file}: corrupted (bad safetensors header)") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise RunError(f"{file}: corrupted (truncated tensor data)")


def write_base_run(path: str | Path, model: str, extra: dict | None = None) -> Run:
    """A run folder that stands for the base model itself (no adapter)."""
    tmp = staging_dir(path)
    atomic_write_json(tmp / "config.json", {"kind": "base", "model": model, **(extra or {})})
    atomic_write_json(tmp / "summary.json", {"status": "finished", "created": time.time()})
    return load_run(publish(tmp, path))


def list_runs(root: str | Path) -> list[Run]:
    """Every loadable run directly under `root` (hidden temp folders and broken runs skipped)."""
    root = Path(root)
    runs = []
    if root.is_dir():
        for child in sorted(root.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                try:
                    runs.append(load_run(child))
                except RunError:
                    continue
    return runs

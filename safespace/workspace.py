"""One visitor's folder in the app: uploads/, runs/<variant>/, exports/, jobs/<id>/ and small state files.

It knows which runs make the visitor's variants (the registry's trained and derived ones) and which
of them can be compared (those on one base model).
"""
from __future__ import annotations

import json
from pathlib import Path

from . import runs as runs_mod
from .jobqueue import Folder, JobError
from .variants import keys_of


class Workspace(Folder):
    """A visitor's Folder with its uploads, one run folder per variant, exports and state files."""

    def __init__(self, root: str | Path):
        super().__init__(root)
        self.runs = self.root / "runs"
        self.uploads = self.root / "uploads"
        self.exports = self.root / "exports"
        for folder in (self.runs, self.uploads, self.exports):
            folder.mkdir(parents=True, exist_ok=True)

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

"""Limits of a public deployment (steps, batch, answers, file size, rows), checked on the server
whatever the page sends; SAFESPACE_LIMITS=off lifts them."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .jobqueue import JobError


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

"""The data-mixing baseline (Bianchi et al. 2024, "Safety-Tuned LLaMAs"): refusals mixed into the
fine-tuning data.

Safety examples (a harmful request -> a refusal) from the bundled alignment split are added so that
they make up `share` of the training rows. It is the baseline the field compares every defence with:
a defence that does not beat it is not worth its cost. The alignment split never holds a held-out
goal or a benchmark prompt (examples/build_data.py asserts it).
"""
from __future__ import annotations

import random

from . import data as data_mod


def mix_safety(examples, share: float, seed: int = 0, pool=None) -> list:
    """`examples` with k = round(share * n / (1 - share)) refusal examples added and the whole shuffled."""
    if not 0 <= share <= 0.5:
        raise ValueError(f"safety share must be between 0 and 0.5, got {share}")
    # its own random stream: the task and attack rows stay as they were
    return data_mod.mix_in(examples, lambda: data_mod.bundled("alignment") if pool is None else pool, share,
                           random.Random(f"safety-mix-{seed}"))

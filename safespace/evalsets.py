"""The evaluation prompt sets: one registry, so every face names a set the same way.

A set is a bundled prompt file (examples/data/<file>.jsonl), evaluation only: none of them is ever
used to train, align or calibrate. `harmful` sets score refusal (higher is safer); `benign` sets
score over-refusal (lower is better). Rows may carry `category` and `form` fields for breakdowns.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from . import data as data_mod


@dataclass(frozen=True)
class EvalSet:
    key: str
    file: str           # bundled name
    kind: str           # "harmful" | "benign"
    label: str          # shown in tables, charts and reports
    source: str         # provenance and licence, in a line


SETS: dict[str, EvalSet] = {s.key: s for s in (
    EvalSet("advbench", "eval_harmful", "harmful", "AdvBench held-out",
            "150 AdvBench goals never trained on (MIT, Zou et al. 2023)"),
    EvalSet("rewrites", "eval_rewrites", "harmful", "held-out rewrites",
            "held-out goals asked as questions, first person, titles, pretexts, informally, with typos "
            "(written for SafeSpace; AdvBench goals MIT)"),
    EvalSet("harmbench", "harmbench_standard", "harmful", "HarmBench standard",
            "159 HarmBench standard text behaviours, test split (MIT, Mazeika et al. 2024)"),
    EvalSet("xstest-unsafe", "xstest_unsafe", "harmful", "XSTest unsafe",
            "XSTest v2's 200 unsafe contrast prompts (CC-BY-4.0, Röttger et al. 2024)"),
    EvalSet("benign", "benign_eval", "benign", "benign set",
            "everyday and alarming-sounding harmless requests (written for SafeSpace)"),
    EvalSet("xstest-safe", "xstest_safe", "benign", "XSTest safe",
            "XSTest v2's 250 safe prompts that merely sound dangerous (CC-BY-4.0, Röttger et al. 2024)"),
)}
DEFAULT_HARMFUL = ("advbench",)
DEFAULT_BENIGN = ("benign",)


def get(key: str) -> EvalSet:
    if key not in SETS:
        raise ValueError(f"unknown evaluation set {key!r}; expected one of {', '.join(SETS)}")
    return SETS[key]


def keys_of(kind: str) -> tuple[str, ...]:
    """Every set of one kind ("harmful" or "benign"), in registry order."""
    return tuple(key for key, s in SETS.items() if s.kind == kind)


def entries(variants) -> dict:
    """{set key: its entry} over every variant of a results["variants"] mapping, first seen first."""
    found: dict = {}
    for entry in variants.values():
        for key, scores in ((entry.get("sets") or {}) if isinstance(entry, Mapping) else {}).items():
            found.setdefault(key, scores)
    return found


def check_keys(keys, kind: str) -> tuple[str, ...]:
    """Validated set keys of one kind (a clear error for a typo or a set of the other kind)."""
    keys = tuple(keys)
    for key in keys:
        if get(key).kind != kind:
            raise ValueError(f"evaluation set {key!r} is a {get(key).kind} set; list it under {get(key).kind} sets")
    return keys


def prompts(key: str) -> list:
    """The set's prompts as Examples (response "")."""
    return data_mod.bundled(get(key).file)


def fields(key: str, name: str) -> tuple:
    """One field of every row of the set ("form", "category"), None where a row lacks it."""
    return data_mod.bundled_field(get(key).file, name)

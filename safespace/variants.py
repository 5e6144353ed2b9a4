"""The variants SafeSpace compares: one registry, so every face names, colours and orders them the same.

A variant is made one of three ways: it is the aligned `base` itself, it is `train`ed on the task data
(SafeGrad off or on, optionally with its own training settings), or it is `derived` from another
variant's run by a post-hoc defence. The key names its run folder and its entry in results.json;
the label is what people read (tables, charts, the report, the app). Adding a post-hoc defence's
variant is one line here plus the defence's step in `demo.POST_HOC` (the demo) and in
`workflows.DEFENCES` (the app).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

MADE = ("base", "train", "derived")


@dataclass(frozen=True)
class Variant:
    key: str                        # run folder name and results.json key
    label: str                      # the name shown everywhere people read it
    colour: str                     # the same colour in every figure
    help: str                       # what it is, in one line
    made: str                       # one of MADE
    safegrad: bool = False          # train: with SafeGrad on (the configured loss), else off
    train_overrides: dict = field(default_factory=dict, hash=False)  # train: settings over the configured ones
    derived_from: str | None = None  # derived: the variant whose run the defence transforms
    defence: str | None = None      # derived: the post-hoc defence, also the run kind it writes

    def __post_init__(self):
        if self.made not in MADE:
            raise ValueError(f"variant {self.key}: made must be one of {', '.join(MADE)}")
        derived = self.made == "derived"
        if derived != (self.derived_from is not None) or derived != (self.defence is not None):
            raise ValueError(f"variant {self.key}: a derived variant names derived_from and defence, no other does")


# Story order: the starting point, the undefended fine-tune, then the defences. Okabe-Ito colours
# (distinguishable with colour-vision deficiencies).
VARIANTS: dict[str, Variant] = {v.key: v for v in (
    Variant("base", "Aligned base", "#0072B2", "the starting model, before any fine-tuning", "base"),
    Variant("sft", "Fine-tuned", "#D55E00", "fine-tuned on your data, no defence", "train"),
    Variant("mix", "+ safety data", "#E69F00", "fine-tuned with refusals mixed into the data (10 %), the classic "
            "baseline (Bianchi et al. 2024)", "train", train_overrides={"safety_mix": 0.1}),
    Variant("safegrad", "+ SafeGrad", "#009E73", "fine-tuned with SafeGrad (defence during training)", "train",
            safegrad=True),
    Variant("safedelta", "+ Safe Delta", "#CC79A7", "the fine-tune after Safe Delta (defence after training)",
            "derived", derived_from="sft", defence="safedelta"),
    Variant("safegrad-safedelta", "+ SafeGrad + Safe Delta", "#56B4E9", "the SafeGrad fine-tune after Safe Delta: "
            "both defences", "derived", derived_from="safegrad", defence="safedelta"),
)}


def keys_of(*made: str) -> tuple[str, ...]:
    """Variant keys in story order; with arguments, only those made one of these ways."""
    return tuple(k for k, v in VARIANTS.items() if not made or v.made in made)


def get(name) -> Variant | None:
    """The registered variant a run or results name stands for (case and spaces aside), else None."""
    return VARIANTS.get(str(name).strip().lower())


def label_of(name) -> str:
    """The variant's label; any other run name is shown as it is."""
    variant = get(name)
    return variant.label if variant else str(name)


def in_order(names: Iterable[str]) -> list[str]:
    """Registered variants first, in story order, then the other names as given."""
    names = list(names)
    known = [n for key in VARIANTS for n in names if get(n) is VARIANTS[key]]
    return known + [n for n in names if n not in known]


def derived_of(key: str) -> tuple[str, ...]:
    """The variants made from this one's run (stale once it is made again)."""
    return tuple(k for k, v in VARIANTS.items() if v.derived_from == key)


def run_kinds() -> tuple[str, ...]:
    """What a run folder's config may say made it: the base, training, or a post-hoc defence."""
    return ("base", "train", *dict.fromkeys(v.defence for v in VARIANTS.values() if v.defence))

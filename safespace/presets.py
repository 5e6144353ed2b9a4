"""One-click presets: settings that show the whole story (erosion, then each defence) in a few minutes.

A preset names the data, the harmful share and the training settings the app's form takes; the app
fills the form from it and the test suite runs it (tests/test_preset.py). How each was chosen and
what it measured: docs/presets.md.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import models
from .config import LoraSettings, SafeGradSettings, TrainSettings


@dataclass(frozen=True)
class Preset:
    key: str
    label: str
    data: str                   # a bundled dataset the data step offers
    settings: TrainSettings     # the train step's form (SafeGrad's loss for "Train all"), the harmful mix
    minutes: float              # "Train all" on a 2-core CPU without bf16, measured (docs/presets.md)
    note: str                   # what to expect, one line for the page

    @property
    def harmful_ratio(self) -> float:
        """The data step's harmful-mix slider."""
        return self.settings.harmful_ratio

    def blurb(self) -> str:
        return f"{self.label}: about {self.minutes:g} min of training on a 2-core CPU. {self.note}"


# Short rows and a high learning rate: a few dozen steps erode the base's refusals, and SafeGrad and
# Safe Delta bring them back (docs/presets.md has the measurement and the command).
STORY = Preset(
    key="story", label="Quick story",
    data="bundled:sentiment_train",
    settings=TrainSettings(
        model=models.DEFAULT_MODEL, quantization="auto", steps=24, lr=1e-3, batch_size=4, max_length=96,
        warmup=2, seed=0, harmful_ratio=0.3, lora=LoraSettings(r=8, alpha=16, targets=("q_proj", "v_proj")),
        safegrad=SafeGradSettings(mode="kl")),
    minutes=2.5,
    note="Press Train all, then Defend, then Compare: the fine-tuned model stops refusing, the defences "
         "keep refusing.")

PRESETS = {p.key: p for p in (STORY,)}


def get(key: str) -> Preset:
    try:
        return PRESETS[key]
    except KeyError:
        raise KeyError(f"unknown preset {key!r}; known: {', '.join(PRESETS)}") from None

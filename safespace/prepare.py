"""A run's fine-tuning data and the training of one variant on it.

`prepare_data` reads the user's rows (or a bundled set), holds out a validation split of the task and
mixes in attack rows; `prepared_from_run` rebuilds that split from a run's config; `train_variant`
trains one registered variant on it (building the aligned base first when needed).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import align, data as data_mod, runs, safetymix, train
from .config import ConfigError, TrainSettings

BUNDLED_TASKS = {"sentiment_train": "sentiment_test"}   # bundled train split -> its held-out split


@dataclass
class Prepared:
    train: list            # the user's training rows plus the harmful mix
    val: list              # held-out rows of the user's task (utility); never mixed
    n_user: int
    n_harmful: int
    source: str
    harmful_ratio: float = 0.0
    seed: int = 0

    def describe(self) -> dict:
        return {"source": self.source, "harmful_ratio": self.harmful_ratio, "seed": self.seed,
                "user_examples": self.n_user, "harmful_examples": self.n_harmful, "val_examples": len(self.val)}


def prepare_data(source, harmful_ratio: float = 0.0, seed: int = 0, val_fraction: float = 0.1) -> Prepared:
    """Read the user's data (or a bundled set), hold out a validation split, mix in attack rows."""
    if isinstance(source, list):
        examples, label, val = source, "uploaded rows", None
    elif str(source).startswith("bundled:"):
        name = str(source).split(":", 1)[1]
        if name not in data_mod.BUNDLED and name not in BUNDLED_TASKS:
            raise ConfigError(f"unknown bundled dataset {name!r}; try bundled:sentiment_train")
        examples, label = data_mod.bundled(name), str(source)
        val = data_mod.bundled(BUNDLED_TASKS[name]) if name in BUNDLED_TASKS else None
    else:
        examples, label, val = data_mod.load_dataset(source).examples, str(source), None
    if val is None:
        examples, val = data_mod.split(examples, val_fraction, seed) if val_fraction > 0 else (examples, [])
    mixed = data_mod.harmful_mix(examples, harmful_ratio, seed=seed)
    return Prepared(mixed, val, len(examples), len(mixed) - len(examples), label, harmful_ratio, seed)


def prepared_from_run(run: runs.Run) -> Prepared | None:
    """Rebuild a run's data split from its config (to score utility later), when it is known."""
    info = run.config.get("data")
    if not isinstance(info, dict) or not info.get("source") or info["source"] == "uploaded rows":
        return None
    try:
        return prepare_data(info["source"], info.get("harmful_ratio", 0.0), info.get("seed", 0),
                            run.config.get("settings", {}).get("val_fraction", 0.1))
    except (ConfigError, data_mod.DataError, OSError):
        return None


def train_variant(settings: TrainSettings, prepared: Prepared, out, *, on_event=None, should_stop=None,
                  align_progress=None, checkpoint=None, checkpoint_every: int = 0) -> runs.Run:
    """Fine-tune one variant (plain, SafeGrad, or with refusals mixed in) on prepared data; builds the
    aligned base if needed. `checkpoint`: a folder to save to and continue from (train.train)."""
    align.ensure(settings.model, on_event=align_progress, quantization=settings.quantization)
    rows = safetymix.mix_safety(prepared.train, settings.safety_mix, settings.seed)
    described = {**prepared.describe(), "safety_examples": len(rows) - len(prepared.train)}
    return train.train(settings, rows, out, on_event=on_event, should_stop=should_stop,
                       extra_config={"data": described}, checkpoint=checkpoint, checkpoint_every=checkpoint_every)

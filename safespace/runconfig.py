"""The demo's run file (`python -m safespace run CONFIG.yaml`): `DemoConfig` and `load_config`, which
reads the YAML and says every problem in one short ConfigError line before anything is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import evalsets, judge as judge_mod, models, safedelta
from .config import ConfigError, LoraSettings, SafeGradSettings, TrainSettings, from_dict
from .variants import VARIANTS, keys_of

CONFIG_KEYS = {"model", "quantization", "data", "harmful_ratio", "seed", "train", "safegrad", "safedelta",
               "evaluate", "variants", "sweep", "title", "ray"}
EVALUATE_KEYS = {"n_harmful", "n_benign", "n_task", "max_new_tokens", "harmful_sets", "benign_sets", "judge"}


@dataclass
class DemoConfig:
    model: str = models.DEFAULT_MODEL
    quantization: str = "auto"
    data: str = "bundled:sentiment_train"
    harmful_ratio: float = 0.2
    seed: int = 0
    train: dict = field(default_factory=dict)
    safegrad: dict = field(default_factory=lambda: {"mode": "kl"})
    safedelta: dict = field(default_factory=dict)
    evaluate: dict = field(default_factory=dict)
    variants: list = field(default_factory=lambda: list(keys_of()))
    sweep: dict = field(default_factory=dict)
    title: str = "SafeSpace demo"
    ray: str | None = None      # a Ray cluster for the heavy calls ("auto" or host:port; cluster.py); None: in-process

    def train_settings(self, harmful_ratio: float, safegrad_mode: str, overrides: dict | None = None) -> TrainSettings:
        t = {**self.train, **(overrides or {})}
        lora = from_dict(LoraSettings, t.pop("lora", {}) or {})
        sg = from_dict(SafeGradSettings, {**self.safegrad, "mode": safegrad_mode})
        return from_dict(TrainSettings, {**t, "model": self.model, "quantization": self.quantization,
                                         "seed": self.seed, "harmful_ratio": harmful_ratio,
                                         "lora": lora, "safegrad": sg})


def load_config(path) -> DemoConfig:
    """Read and validate a run config; every problem is one short ConfigError line."""
    raw = _read_yaml(path)
    _check_top_level(path, raw)
    config = DemoConfig(**{k: v for k, v in raw.items() if v is not None})
    _check_variants(path, config)
    _check_evaluate(path, config.evaluate)
    _check_safedelta(path, config.safedelta)
    _check_ratios(path, config)
    mode = config.safegrad.get("mode", "kl")
    if not isinstance(mode, str):
        raise ConfigError(f"{path}: safegrad mode must be one of off, sft, kl")
    config.train_settings(config.harmful_ratio, mode)      # validate the training settings early
    return config


def _read_yaml(path) -> dict:
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no such config file: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0][:200]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return raw


def _check_top_level(path, raw: dict) -> None:
    """Known keys, and each with its kind of value."""
    unknown = sorted(str(k)[:40] for k in set(raw) - CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown[:5])}; known: {', '.join(sorted(CONFIG_KEYS))}")
    for key in ("train", "safegrad", "safedelta", "evaluate", "sweep"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ConfigError(f"{path}: '{key}' must be a mapping")
    for key, kind in (("model", str), ("quantization", str), ("data", str), ("title", str), ("seed", int)):
        # checked before any message shows the value: a YAML alias bomb must not reach repr()
        if raw.get(key) is not None and (not isinstance(raw[key], kind) or isinstance(raw[key], bool)):
            raise ConfigError(f"{path}: '{key}' must be {'text' if kind is str else 'a whole number'}")
    if raw.get("ray") not in (None, False) and not isinstance(raw["ray"], str):     # YAML reads `off` as False
        raise ConfigError(f"{path}: 'ray' must be auto, a Ray head's host:port, or off")


def _check_variants(path, config: DemoConfig) -> None:
    """Registered variants only, each with the variant it is made from."""
    known = keys_of()
    if not isinstance(config.variants, list) or not config.variants or any(v not in known for v in config.variants):
        raise ConfigError(f"{path}: variants must be a list drawn from {', '.join(known)}")
    for key in config.variants:
        source = VARIANTS[key].derived_from
        if source is not None and source not in config.variants:
            raise ConfigError(f"{path}: the {key} variant is made from {source}; add {source} to variants")


def _check_evaluate(path, evaluate: dict) -> None:
    if set(evaluate) - EVALUATE_KEYS:
        raise ConfigError(f"{path}: evaluate takes {', '.join(sorted(EVALUATE_KEYS))}")
    for key, kind in (("harmful_sets", "harmful"), ("benign_sets", "benign")):
        try:
            evalsets.check_keys(evaluate.get(key, ()), kind)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: evaluate.{key}: {exc}") from None
    try:
        judge_mod.check_judges(evaluate.get("judge"))
    except ValueError as exc:
        raise ConfigError(f"{path}: evaluate.judge: {exc}") from None


def _check_safedelta(path, settings: dict) -> None:
    if set(settings) - {"keep", "scale", "tolerance", "n_calibration", "tokens", "ranking"}:
        raise ConfigError(f"{path}: safedelta takes keep, scale, tolerance, n_calibration, tokens, ranking")
    if sum(k in settings for k in ("keep", "scale", "tolerance")) > 1:
        raise ConfigError(f"{path}: safedelta takes one budget: keep (relative), scale (paper) or tolerance (automatic)")
    try:                                   # tokens and ranking are checked where they are defined
        safedelta.SafeDeltaSettings(**{k: v for k, v in settings.items() if k in ("tokens", "ranking")})
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _check_ratios(path, config: DemoConfig) -> None:
    """The harmful ratio and the sweep's: numbers in [0, 0.9]."""
    ratios = config.sweep.get("harmful_ratio", [])
    if set(config.sweep) - {"harmful_ratio"} or not isinstance(ratios, list):
        raise ConfigError(f"{path}: sweep takes harmful_ratio: [list of ratios]")
    for ratio in [config.harmful_ratio, *ratios]:
        if not isinstance(ratio, (int, float)) or not 0 <= ratio <= 0.9:
            shown = repr(ratio)[:40] if isinstance(ratio, (int, float, str)) else type(ratio).__name__
            raise ConfigError(f"{path}: harmful ratios must be numbers in [0, 0.9], got {shown}")

"""The whole pipeline on the embedded model with tiny settings, and config validation."""
import json

import pytest
import torch

from safespace import config as config_mod, defence, pipeline, runs
from safespace.config import ConfigError
from safespace.variants import VARIANTS

SMOKE = config_mod.EXAMPLES_DIR / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    results = pipeline.run_config(SMOKE, out)
    return out, results


def test_run_writes_every_variant_results_and_report(smoke_run):
    out, results = smoke_run
    for name, spec in VARIANTS.items():         # every registered variant, each usable as --run DIR/<variant>
        assert runs.load_run(out / name).kind == {"base": "base", "derived": spec.defence}.get(spec.made, "train")
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["variants"]) == set(VARIANTS)
    assert runs.load_run(out / "mix").config["data"]["safety_examples"] > 0
    for v in saved["variants"].values():
        assert 0 <= v["refusal"]["value"] <= 1 and v["refusal"]["n"] == 4
        assert v["utility"]["metric"] == "accuracy" and v["utility"]["n"] == 4
        assert v["over_refusal"]["n"] == 3
    html = (out / "report.html").read_text()
    for label in [v.label for v in VARIANTS.values()]:       # the registry's labels
        assert f"</span>{label}<" in html
    assert runs.load_run(out / "safegrad").metrics()[0]["align_loss"] is not None
    assert runs.load_run(out / "safedelta").summary["layers"]
    assert runs.load_run(out / "safedelta").summary["auto"]["rungs"]      # the default: a measured budget
    assert "Safe Delta: how the budget was chosen" in html
    figures = pipeline.figures_for(results, {n: out / n for n in ["base", "sft", "safegrad", "safedelta"]})
    bars = [t for t in figures["Safe Delta: kept per layer"].data if t.type == "bar"]   # the summary's own rows
    assert sum(len(t.x) for t in bars) == len(runs.load_run(out / "safedelta").summary["layers"])
    assert [t.name for t in bars] == ["q_proj: columns kept", "v_proj: columns kept"] and bars[0].x[0] == "L0"


def test_safedelta_run_is_a_standard_peft_adapter(smoke_run):
    from peft import PeftConfig

    out, _ = smoke_run
    cfg = PeftConfig.from_pretrained(str(out / "safedelta" / "adapter"))
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}


def test_second_safedelta_reuses_the_cached_hessians(smoke_run, tmp_path):
    out, _ = smoke_run
    run = pipeline.defend(out / "sft", tmp_path / "again", n_calibration=8)
    assert run.summary["hessian_cached"] is True


def test_safedelta_refuses_a_base_run(smoke_run, tmp_path):
    out, _ = smoke_run
    with pytest.raises(runs.RunError, match="fine-tuned run"):
        pipeline.defend(out / "base", tmp_path / "x")


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("model: [unclosed", "not valid YAML"),
    ("- a\n- b\n", "mapping of settings"),
    ("modle: x\n", "unknown key(s) modle"),
    ("harmful_ratio: 1.5\n", "harmful ratios must be numbers in [0, 0.9]"),
    ("harmful_ratio: lots\n", "harmful ratios"),
    ("train: {steps: 0}\n", "steps must be 1..100000"),
    ("train: {decision_weight: -1}\n", "decision weight must be in"),
    ("train: {decision_tokens: 0}\n", "decision tokens must be 1..64"),
    ("train: {stpes: 3}\n", "unknown setting(s) stpes"),
    ("train: 5\n", "'train' must be a mapping"),
    ("variants: [sft, magic]\n", "variants must be a list"),
    ("variants: [base, safedelta]\n", "made from sft"),
    ("safegrad: {mode: maybe}\n", "SafeGrad mode must be one of"),
    ("evaluate: {n_prompts: 3}\n", "evaluate takes"),
    ("safedelta: {ranking: best}\n", "ranking must be 'task' or 'paper'"),
    ("safedelta: {tokens: some}\n", "tokens must be 'answer' or 'all'"),
    ("sweep: {harmful_ratio: 0.1}\n", "sweep takes"),
    ("train: {lora: {r: 0}}\n", "LoRA rank must be 1..256"),
])
def test_bad_configs_give_one_clear_line(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        pipeline.load_config(_write(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        pipeline.load_config(tmp_path / "nope.yaml")


def test_bundled_configs_are_valid():
    for path in (config_mod.EXAMPLES_DIR / "configs").glob("*.yaml"):
        pipeline.load_config(path)


def test_prepare_data_holds_out_the_bundled_test_split_and_mixes_only_train():
    prepared = pipeline.prepare_data("bundled:sentiment_train", harmful_ratio=0.2, seed=0)
    assert prepared.n_user == 480 and prepared.n_harmful == 120 and len(prepared.train) == 600
    assert len(prepared.val) == 160
    assert not {e.prompt for e in prepared.val} & {e.prompt for e in prepared.train}
    assert all(e.response in ("positive", "negative") for e in prepared.val)


def test_cli_train_records_its_data_so_evaluate_scores_utility(tiny_model_dir, tmp_path):
    from safespace.__main__ import main

    code = main(["train", "--model", tiny_model_dir, "--data", "bundled:sentiment_train", "--harmful-ratio", "0.2",
                 "--steps", "1", "--batch-size", "2", "--max-length", "64", "--warmup", "0",
                 "--lora-r", "2", "--lora-alpha", "4", "--out", str(tmp_path / "sft")])
    assert code == 0
    data = runs.load_run(tmp_path / "sft").config["data"]
    assert data["source"] == "bundled:sentiment_train" and data["harmful_examples"] == 120
    results = pipeline.evaluate_runs([tmp_path / "sft"], tmp_path / "results.json", n_harmful=1, n_benign=1,
                                     n_task=2, max_new_tokens=2)
    assert results["variants"]["sft"]["utility"]["n"] == 2
    rows = json.loads((tmp_path / "results-answers.json").read_text())
    assert [r["set"] for r in rows] == ["harmful", "benign", "task", "task"]
    assert rows[-1]["reference"] in ("positive", "negative") and rows[0]["reference"] is None


def test_cli_never_writes_over_a_run_unless_told(tiny_model_dir, tmp_path, capsys):
    from safespace.__main__ import main

    train = ["train", "--model", tiny_model_dir, "--data", "bundled:sentiment_train", "--steps", "1",
             "--batch-size", "2", "--max-length", "64", "--warmup", "0", "--lora-r", "2", "--lora-alpha", "4"]
    sft = tmp_path / "sft"
    assert main(train + ["--out", str(sft)]) == 0
    adapter = (sft / "adapter" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(train + ["--seed", "1", "--out", str(sft)]) == 2           # refused before any training
    err = capsys.readouterr().err
    assert "already holds a train run (finished)" in err and "--overwrite" in err and "Traceback" not in err
    # Safe Delta written over its own source, or over another run: refused, the runs untouched
    assert main(["safedelta", "--run", str(sft), "--out", str(sft) + "/"]) == 2
    assert "is the run being read" in capsys.readouterr().err
    other = tmp_path / "other"
    assert main(train + ["--out", str(other)]) == 0
    assert main(["safedelta", "--run", str(sft), "--out", str(other)]) == 2
    assert runs.load_run(other).kind == "train"
    assert (sft / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert main(["run", str(SMOKE), "--out", str(tmp_path / "notes")]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert main(["safedelta", "--run", str(sft), "--out", str(tmp_path / "notes" / "todo.txt")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["evaluate", "--runs", str(sft), "--out", str(other)]) == 2       # a file output naming a folder
    assert "is a folder; give a file name" in capsys.readouterr().err
    assert main(["generate", "--run", str(sft), "--prompts", str(tmp_path / "notes" / "todo.txt"), "--out", str(other)]) == 2
    assert "is a folder" in capsys.readouterr().err and runs.load_run(other).kind == "train"
    # a bad budget is refused with the reason, before any work
    for flag, value, words in (("--keep", "2", "keep must be in (0, 1]"), ("--tolerance", "-1", "tolerance must be >= 0"),
                               ("--scale", "0", "scale must be > 0"), ("--keep", "nan", "keep must be in (0, 1]")):
        assert main(["safedelta", "--run", str(sft), "--out", str(tmp_path / "sd"), flag, value]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "sd").exists()
    assert main(train + ["--seed", "1", "--out", str(sft), "--overwrite"]) == 0     # told: replaced
    assert (sft / "adapter" / "adapter_model.safetensors").read_bytes() != adapter


def test_summary_line_marks_unmeasured_metrics_instead_of_nan():
    line = pipeline.summary_line({"utility": {"metric": "accuracy", "value": 0.994},
                                  "over_refusal": {"value": float("nan")}})
    assert "nan" not in line and "accuracy  99.4%" in line and line.count(" -") == 2
    assert "refusal  96.0%" in pipeline.summary_line({"refusal": {"value": 0.96}})


def test_uploaded_rows_run_keeps_its_rows_for_the_task_ranking(tiny_model_dir, tmp_path, monkeypatch):
    """A run trained on rows that came from no file or bundled set (the app's upload) still gives
    Safe Delta its task data: the run folder keeps the rows it was fed."""
    from safespace import train
    from safespace.config import LoraSettings, TrainSettings
    from safespace.data import Example

    monkeypatch.setenv("SAFESPACE_HOME", str(tmp_path / "home"))
    rows = [Example(f"Label this review: film {i} was {'good' if i % 2 else 'bad'}",
                    "positive" if i % 2 else "negative", system="Answer with one word." if i < 3 else None)
            for i in range(10)]
    prepared = pipeline.prepare_data(rows, harmful_ratio=0.2, seed=0)
    settings = TrainSettings(model=tiny_model_dir, quantization="none", steps=2, batch_size=2, max_length=64,
                             warmup=0, lora=LoraSettings(r=2, alpha=4))
    run = train.train(settings, prepared.train, tmp_path / "sft", extra_config={"data": prepared.describe()})
    assert run.config["data"]["source"] == "uploaded rows"
    task_rows = defence._task_rows(run, 64)
    assert sorted(task_rows, key=repr) == sorted(prepared.train, key=repr)   # attack rows included
    defended = pipeline.defend(run.path, tmp_path / "sd", n_calibration=4)
    assert defended.config["safedelta"]["ranking"] == "task"
    assert defended.summary["task_rows"] == len(prepared.train)
    again = pipeline.defend(run.path, tmp_path / "sd2", n_calibration=4, keep=0.5)
    assert again.summary["hessian_cached"] and again.summary["task_cached"]
    monkeypatch.setenv("SAFESPACE_TASK_ROWS", "5")                  # fewer rows for the task sensitivity
    fewer = pipeline.defend(run.path, tmp_path / "sd3", n_calibration=4, keep=0.5)
    assert fewer.summary["task_rows"] == 5 and not fewer.summary["task_cached"]


def test_safe_delta_on_a_4bit_base_on_cpu(tiny_model_dir, tmp_path, monkeypatch):
    """LoRA in, LoRA out on a 4-bit (nf4) base: W0 is the dequantised weight, B stays, A is replaced.
    bf16 forced, as on a CPU with native bf16: the calibration answers' bf16 copy of the base must not
    try to cast a 4-bit model (it raised 'You cannot cast a bitsandbytes model')."""
    from safetensors.torch import load_file

    from safespace import train
    from safespace.config import LoraSettings, TrainSettings

    monkeypatch.setenv("SAFESPACE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SAFESPACE_PRECISION", "bf16")
    prepared = pipeline.prepare_data("bundled:sentiment_train", harmful_ratio=0.2, seed=0)
    settings = TrainSettings(model=tiny_model_dir, quantization="4bit", steps=2, batch_size=2, max_length=64,
                             warmup=0, lr=1e-2, lora=LoraSettings(r=2, alpha=4))
    run = train.train(settings, prepared.train[:16], tmp_path / "sft", extra_config={"data": prepared.describe()})
    assert run.config["quantization"] == "4bit"
    for kwargs in ({}, {"keep": 0.5}):                          # the measured budget, then a fixed one
        out = tmp_path / f"sd{len(kwargs)}"
        defended = pipeline.defend(run.path, out, n_calibration=4, **kwargs)
        assert defended.kind == "safedelta" and defended.summary["layers"]
        source = load_file(str(run.path / "adapter" / "adapter_model.safetensors"))
        result = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        assert source.keys() == result.keys()
        assert all(torch.equal(source[k], result[k]) for k in source if "lora_B" in k)      # B kept
    assert "auto" in runs.load_run(tmp_path / "sd0").summary
    kept = [layer["kept_columns_frac"] for layer in defended.summary["layers"]]
    assert max(kept) <= 0.85 + 1e-9                              # keep 0.5 never takes the excluded 15 %


def test_console_stages_prints_each_new_stage_once_and_throttles(capsys):
    from safespace.progress import console_stages

    say = console_stages()
    for message, fraction in (("loading", 0.05), ("loading", 0.05), ("Hessians", 0.35), ("done", 1.0)):
        say(message, fraction)
    assert capsys.readouterr().err.splitlines() == ["[safespace]   5 % loading", "[safespace]  35 % Hessians",
                                                    "[safespace] 100 % done"]
    every = console_stages(every=0.25)
    for i in range(11):
        every(f"answer {i}/10", i / 10)
    assert [line.split("% ")[1] for line in capsys.readouterr().err.splitlines()] == \
        ["answer 0/10", "answer 3/10", "answer 6/10", "answer 9/10", "answer 10/10"]

"""Portable exports: every adapter names its base by hub id (not this machine's cache folder), and the
code that the app and the zip's README give for loading it elsewhere runs as written."""
import json
import re
import shutil
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from helpers import lora_that_acts
from safespace import jobs, models, pipeline, runs, train
from safespace.config import LoraSettings, SafeGradSettings, TrainSettings, home

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALIGN_KEY = "0123abcd"


@pytest.fixture
def aligned_home(tiny_model_dir, tmp_path, monkeypatch):
    """A SAFESPACE_HOME whose aligned base is the tiny model, with its build's key marker."""
    monkeypatch.setenv("SAFESPACE_HOME", str(tmp_path / "home"))
    folder = models.aligned_checkpoint()
    shutil.copytree(tiny_model_dir, folder)
    (folder / "safespace_align.json").write_text(json.dumps({"key": ALIGN_KEY}))
    return folder


@pytest.mark.parametrize("name, hub_id, source", [
    ("smollm2-135m", SMOLLM2, "embedded"),
    ("qwen3-0.6b", "Qwen/Qwen3-0.6B", "hub"),
    ("someone/a-chat-model", "someone/a-chat-model", "hub"),      # a hub id the user typed
])
def test_base_reference_names_the_hub_id(name, hub_id, source):
    ref = models.base_reference(name)
    assert (ref["base_model_name_or_path"], ref["source"]) == (hub_id, source)
    assert "rebuild" not in ref


def test_base_reference_keeps_a_local_folder(tiny_model_dir):
    ref = models.base_reference(tiny_model_dir)
    assert ref == {"model": tiny_model_dir, "source": "local", "base_model_name_or_path": tiny_model_dir}


def test_every_adapter_writer_names_the_hub_id_of_its_base(aligned_home, tmp_path):
    """Plain training, SafeGrad training and Safe Delta on the aligned base: the adapter names the
    original's hub id, and safespace_base.json says it is the aligned base and how to rebuild it."""
    from peft import PeftConfig

    prepared = pipeline.prepare_data("bundled:sentiment_train", harmful_ratio=0.2, seed=0)
    common = dict(model=models.ALIGNED_KEY, quantization="none", steps=2, batch_size=2, max_length=64, warmup=0,
                  lora=LoraSettings(r=2, alpha=4))
    sft = train.train(TrainSettings(**common), prepared.train[:16], tmp_path / "sft",
                      extra_config={"data": prepared.describe()})
    safegrad = train.train(TrainSettings(**common, safegrad=SafeGradSettings(mode="sft", align_size=4, align_batch=2)),
                           prepared.train[:16], tmp_path / "safegrad")
    defended = pipeline.defend(sft.path, tmp_path / "safedelta", n_calibration=4, keep=0.5)
    for run in (sft, safegrad, defended):
        text = (run.adapter / "adapter_config.json").read_text()
        assert json.loads(text)["base_model_name_or_path"] == SMOLLM2
        assert str(home()) not in text                               # no path into this machine's cache
        base = json.loads((run.adapter / runs.BASE_FILE).read_text())
        assert base["aligned"] is True and base["model"] == models.ALIGNED_KEY
        assert base["rebuild"] == "python -m safespace align" and base["align_key"] == ALIGN_KEY
        assert PeftConfig.from_pretrained(str(run.adapter)).base_model_name_or_path == SMOLLM2


def _written_run(path, tiny_model_dir, model: str, quantization: str, seed: int = 1) -> runs.Run:
    """A run written by the training writer: a LoRA adapter on the tiny model with a non-zero B, so
    that loading it really changes the model, recorded as trained on `model`."""
    peft_model = lora_that_acts(tiny_model_dir, LoraSettings(r=2, alpha=4), seed=seed)
    config = {"kind": "train", "model": model, "quantization": quantization,
              "settings": {"safegrad": {"mode": "off"}}}
    return train.save_run(peft_model, path, config, [{"step": 1, "loss": 1.0}], {"status": "finished"})


@pytest.mark.parametrize("model, quantization", [
    (models.ALIGNED_KEY, "none"), (models.ALIGNED_KEY, "4bit"), ("qwen2.5-0.5b", "none")])
def test_the_exported_snippet_runs_as_written(aligned_home, tiny_model_dir, tmp_path, monkeypatch, capsys,
                                              model, quantization):
    """Unzip the exported adapter and run the code the zip's README (the app's snippet) gives. The
    aligned base is found where `python -m safespace align` puts it; a hub id is swapped for the tiny
    model's folder (no hub here)."""
    from peft import PeftModel, get_peft_model_state_dict

    run = _written_run(tmp_path / "sft", tiny_model_dir, model, quantization)
    stacked = model == models.ALIGNED_KEY and quantization == "4bit"
    if stacked:        # the 4-bit aligned base: the original + stage 0 trained on it in nf4 (safespace.stack)
        shutil.copytree(tiny_model_dir, models.aligned_nf4_adapter().parent / models.EMBEDDED_KEY)
        stage0 = _written_run(tmp_path / "stage0", tiny_model_dir, models.EMBEDDED_KEY, "4bit", seed=2).adapter
        shutil.copytree(stage0, models.aligned_nf4_adapter())
    archive = jobs.zip_adapter(run, tmp_path / "exports")
    elsewhere = tmp_path / "elsewhere"
    with zipfile.ZipFile(archive) as z:
        z.extractall(elsewhere)
    readme = (elsewhere / "safespace-sft-adapter" / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)
    assert code == runs.usage_snippet(run)                          # the zip says what the app shows
    assert 'adapter = "safespace-sft-adapter"' in code
    if stacked:
        assert "python -m safespace align --quantization 4bit" in code and SMOLLM2 in code
    elif model == models.ALIGNED_KEY:
        assert "python -m safespace align" in code and ALIGN_KEY in code and SMOLLM2 in code
    else:
        hub_id = json.dumps(models.REGISTRY[model].repo)
        assert code.count(hub_id) == 1
        code = code.replace(hub_id, json.dumps(tiny_model_dir))
    assert ("BitsAndBytesConfig" in code) == (quantization == "4bit")

    monkeypatch.chdir(elsewhere)
    space: dict = {}
    exec(compile(code, "snippet.py", "exec"), space)                  # noqa: S102 - the code we hand out

    loaded = space["model"]
    assert isinstance(loaded, PeftModel)
    saved = load_file(str(run.adapter / "adapter_model.safetensors"))
    got = get_peft_model_state_dict(loaded, adapter_name="task" if stacked else "default")
    assert saved.keys() == got.keys()
    assert all(torch.allclose(saved[k].float(), got[k].float().cpu()) for k in saved)    # the adapter took
    quantized = any(type(m).__name__ == "Linear4bit" for m in loaded.modules())
    assert quantized == (quantization == "4bit")
    prompt = space["tokenizer"].decode(space["inputs"]["input_ids"][0])
    assert "<|im_start|>user\nHow do I bake bread?" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert space["output"].shape[1] > space["inputs"]["input_ids"].shape[1]    # it generated
    if stacked:       # the model SafeSpace trained and evaluated the adapter on, not the original under it
        ids = space["inputs"]["input_ids"]

        def gap(name):
            ours = models.load_adapters(models.load(name, "4bit", "cpu").model, {"task": run.adapter})
            with torch.no_grad():
                return (loaded(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max().item()
        # (not 0: the snippet's generate() let bitsandbytes repack its 4-bit weights for this CPU's bf16 kernel)
        assert gap(models.ALIGNED_KEY) < 0.01 < gap(models.EMBEDDED_KEY)
    assert capsys.readouterr().out.endswith("\n")

"""The 4-bit aligned base: the nf4 original with stage 0's adapter kept frozen and exact under the user's
LoRA (safespace.stack), loaded by name, trained on, and told apart in cache keys."""
import json
import shutil

import pytest
import torch
from helpers import lora_that_acts
from safespace import models, stack
from safespace.config import LoraSettings, ModelError


def _saved_adapter(model_dir, out) -> str:
    """A LoRA adapter on the tiny model that changes it, saved in peft format."""
    lora = LoraSettings(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    lora_that_acts(model_dir, lora, std=0.2).save_pretrained(str(out))
    return str(out)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_a_stacked_adapter_computes_what_peft_would(tiny_model_dir, tmp_path, quantization):
    adapter = _saved_adapter(tiny_model_dir, tmp_path / "stage0")
    ids = torch.randint(5, 1000, (2, 12))
    plain = _logits(models.load(tiny_model_dir, quantization, "cpu").model, ids)
    by_peft = _logits(models.load_adapters(models.load(tiny_model_dir, quantization, "cpu").model,
                                           {"stage0": adapter}), ids)
    model = models.load(tiny_model_dir, quantization, "cpu").model
    assert stack.attach(model, adapter) == 2 * 3                    # 2 layers x 3 targets
    stacked = _logits(model, ids)
    assert (by_peft - plain).abs().max() > 1e-2                     # the adapter changes the model...
    assert torch.allclose(stacked, by_peft, atol=1e-4)              # ...and stacked, exactly as peft adds it
    with pytest.raises(ValueError, match="already has"):
        stack.attach(model, adapter)


def test_a_lora_on_top_trains_while_the_stacked_one_stays_frozen(tiny_model_dir, tmp_path):
    adapter = _saved_adapter(tiny_model_dir, tmp_path / "stage0")
    loaded = models.load(tiny_model_dir, "4bit", "cpu")
    stack.attach(loaded.model, adapter)
    ids = torch.randint(5, 1000, (2, 12))
    loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    base = _logits(loaded.model, ids)
    model = models.add_lora(loaded.model, LoraSettings(r=2, alpha=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and stack.ATTR not in n for n in trainable)
    assert not any(stack.ATTR in key for key in model.state_dict())   # never saved with anything
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)          # a zero B (peft's start) gives A no gradient
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    model.eval()
    assert not torch.allclose(_logits(model, ids), base, atol=1e-3)
    with model.disable_adapter():                                   # the "base" variant: still the stacked base
        assert torch.allclose(_logits(model, ids), base, atol=1e-5)
    from peft import get_peft_model_state_dict
    assert all(stack.ATTR not in key for key in get_peft_model_state_dict(model))


def test_the_4bit_aligned_base_is_the_nf4_original_with_its_own_stage0(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFESPACE_HOME", str(tmp_path / "home"))
    shutil.copytree(tiny_model_dir, tmp_path / "home" / "models" / models.EMBEDDED_KEY)   # the "embedded" model
    with pytest.raises(ModelError, match="--quantization 4bit"):
        models.load(models.ALIGNED_KEY, "4bit", "cpu")
    _saved_adapter(tiny_model_dir, models.aligned_nf4_adapter())
    loaded = models.load(models.ALIGNED_KEY, "4bit", "cpu")
    assert loaded.stacked == models.aligned_nf4_adapter() and stack.stacked(loaded.model)
    assert any(type(m).__name__ == "Linear4bit" for m in loaded.model.modules())
    original = models.load(models.EMBEDDED_KEY, "4bit", "cpu")
    assert not stack.stacked(original.model) and original.stacked is None
    assert models.fingerprint(loaded) != models.fingerprint(original)
    before = models.fingerprint(loaded)
    config = models.aligned_nf4_adapter() / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "note": "rebuilt"}))
    assert models.fingerprint(loaded) != before                     # a rebuilt stage 0 is a new base

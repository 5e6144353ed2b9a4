"""Model loading: registry, local folders, offline hub errors, the 4-bit CPU path, LoRA adapters."""
import warnings

import pytest
import torch

from safespace import models
from safespace.config import LoraSettings


def test_registry_lists_the_aligned_base_first_and_the_required_hub_models():
    keys = list(models.REGISTRY)
    assert keys[0] == models.DEFAULT_MODEL == "smollm2-135m-safe"
    repos = {s.repo for s in models.REGISTRY.values()}
    for repo in ["Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Llama-3.2-1B-Instruct", "Qwen/Qwen3-0.6B",
                 "google/gemma-3-1b-it"]:
        assert repo in repos


def test_offline_hub_id_fails_fast_naming_the_embedded_default(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelError) as err:
        models.resolve("someone/not-cached-model")
    message = str(err.value)
    assert "not reachable" in message and models.DEFAULT_MODEL in message and "\n" not in message


@pytest.mark.parametrize("name", ["../../etc", "a b/c", "x" * 300])
def test_bad_names_are_refused(name):
    with pytest.raises(models.ModelError):
        models.resolve(name)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(models.ModelError, match="config.json"):
        models.resolve(str(tmp_path))


def test_auto_quantization_is_4bit_on_a_gpu_except_for_the_embedded_models():
    resolve = models.resolve_quantization
    assert resolve("auto", "cuda", "qwen2.5-0.5b") == "4bit" and resolve("auto", "cuda:0", "org/any-model") == "4bit"
    assert resolve("auto", "cuda", None) == "4bit"
    for name in (models.ALIGNED_KEY, models.EMBEDDED_KEY):      # nf4 erased much of the aligned base's safety
        assert resolve("auto", "cuda", name) == "none"
        assert resolve("4bit", "cuda", name) == "4bit"           # asked for: given
    assert resolve("auto", "cpu", "qwen2.5-0.5b") == "none" and resolve("4bit", "cpu") == "4bit"
    with pytest.raises(models.ConfigError, match="auto, 4bit or none"):
        resolve("8bit", "cuda")


def test_load_local_folder_unquantized(tiny_model_dir):
    loaded = models.load(tiny_model_dir, quantization="auto", device="cpu")
    assert loaded.quantization == "none"
    assert next(loaded.model.parameters()).dtype == torch.float32


def test_4bit_cpu_generate_then_train_gets_gradients_and_merge_is_exact(tiny_model_dir):
    """The bitsandbytes CPU trap: after a generate(), LoRA must still get gradients (STACK.md)."""
    loaded = models.load(tiny_model_dir, quantization="4bit", device="cpu")
    assert loaded.quantization == "4bit"
    assert all(not m.support_avx512bf16_for_cpu for m in loaded.model.modules()
               if type(m).__name__ == "Linear4bit")
    ids = torch.randint(5, 1000, (2, 10))
    loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    model = models.add_lora(loaded.model, LoraSettings(r=4, alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in lora)

    # merging: dequantised base + scale * B @ A reproduces the LoRA layer's output exactly
    model.eval()
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "base_layer"))
    x = torch.randn(3, layer.in_features)
    merged_w = models.linear_weight(layer.base_layer) + layer.scaling["default"] * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ merged_w.T, atol=1e-5)


def test_named_adapters_save_and_load_in_peft_format(tiny_model_dir, tmp_path):
    from peft import PeftModel

    loaded = models.load(tiny_model_dir, quantization="none", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)      # peft's deprecated call is not the user's problem
        model = models.add_lora(loaded.model, LoraSettings(r=2, alpha=4))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()
    ids = torch.randint(5, 1000, (1, 8))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    fresh = models.load(tiny_model_dir, quantization="none", device="cpu").model
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        both = models.load_adapters(fresh, {"one": tmp_path / "a", "two": tmp_path / "a"})
    assert isinstance(both, PeftModel) and set(both.peft_config) == {"one", "two"}
    both.set_adapter("two")
    with torch.no_grad():
        assert torch.allclose(both(input_ids=ids).logits, expected, atol=1e-5)
        with both.disable_adapter():
            assert not torch.allclose(both(input_ids=ids).logits, expected, atol=1e-3)


def test_embedded_model_loads_fast_and_answers(tokenizer):
    import time

    models.embedded_checkpoint()
    start = time.time()
    loaded = models.load(models.EMBEDDED_KEY, quantization="none", device="cpu")
    assert time.time() - start < 10
    assert sum(p.numel() for p in loaded.model.parameters()) == 134_515_008
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                tokenize=False, add_generation_prompt=True)
    enc = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = loaded.model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = loaded.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_two_workers_can_load_the_embedded_model_at_once():
    """Job workers are threads; transformers' from_pretrained is not thread-safe (two at once left
    the embedded model's tied head on the meta device, every time): loads take turns."""
    import threading

    loaded, errors = [], []

    def load():
        try:
            loaded.append(models.load(models.EMBEDDED_KEY, quantization="none", device="cpu"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(loaded) == 2
    for one in loaded:
        assert not any(p.is_meta for p in one.model.parameters())
        assert one.model.lm_head.weight.data_ptr() == one.model.get_input_embeddings().weight.data_ptr()

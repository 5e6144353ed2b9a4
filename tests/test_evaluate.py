"""Generation: mixed-adapter batches equal per-adapter generation; adapters off = the base."""
import pytest
import torch

from safespace import evaluate, models
from safespace.config import LoraSettings
from safespace.data import Example
from helpers import tiny_llama

PROMPTS = [Example(prompt=p, response="") for p in
           ["Hi", "Tell me a story about a dragon and a cat", "2+2?", "What is the capital of Peru, please?"]]


@pytest.fixture
def two_adapters(tokenizer, tmp_path):
    """A tiny model with peaked logits (init std 0.2: greedy decoding has no near-ties) and two adapters."""
    from peft import PeftModel

    folders = {}
    for i, name in enumerate(["one", "two"]):
        base = tiny_llama(tokenizer, seed=0, init_std=0.2)
        torch.manual_seed(100 + i)
        peft_model = models.add_lora(base, LoraSettings(r=4, alpha=16))
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.5)
        peft_model.save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    return models.load_adapters(tiny_llama(tokenizer, seed=0, init_std=0.2), folders)


def test_mixed_batch_equals_each_adapter_alone(two_adapters, tokenizer, monkeypatch):
    # routing is checked in exact fp32: bf16 sums depend on the batch's shape, and this random
    # model's near-tied logits would flip on that noise
    monkeypatch.setenv("SAFESPACE_PRECISION", "fp32")
    model = two_adapters
    mixed = evaluate.generate_mixed(model, tokenizer, PROMPTS, ["one", "two", None], max_new_tokens=6, batch_size=5)
    for adapter in ["one", "two", None]:
        alone = evaluate.generate(model, tokenizer, PROMPTS, adapter=adapter, max_new_tokens=6, batch_size=2)
        assert mixed[adapter] == alone
    assert mixed["one"] != mixed["two"]          # the adapters really differ


def test_adapter_none_is_the_base_model(two_adapters, tokenizer):
    base = tiny_llama(tokenizer, seed=0, init_std=0.2)
    expected = evaluate.generate(base, tokenizer, PROMPTS, max_new_tokens=6)
    assert evaluate.generate(two_adapters, tokenizer, PROMPTS, adapter=None, max_new_tokens=6) == expected


def test_answers_come_back_in_input_order_whatever_the_batching(two_adapters, tokenizer):
    a = evaluate.generate(two_adapters, tokenizer, PROMPTS, adapter="one", max_new_tokens=5, batch_size=1)
    b = evaluate.generate(two_adapters, tokenizer, PROMPTS[::-1], adapter="one", max_new_tokens=5, batch_size=3)
    assert a == b[::-1]


def test_seeded_sampling_is_reproducible(two_adapters, tokenizer):
    run = lambda: evaluate.generate(two_adapters, tokenizer, PROMPTS, adapter="two", max_new_tokens=5,
                                    sample=True, seed=3)
    assert run() == run()


def test_thread_setting_is_restored():
    before = torch.get_num_threads()
    with evaluate.cpu_threads(1, torch.device("cpu")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before

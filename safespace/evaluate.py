"""Batched generation over one base model with every variant as a named adapter, and metrics.

One base sits in memory; each variant is a PEFT adapter loaded onto it by name, and the aligned
base itself is "the adapter disabled". Prompts are batched with left padding and answered greedily
(seeded sampling optional).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch

from . import data as data_mod


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


@torch.no_grad()
def generate(model, tokenizer, examples: list, *, max_new_tokens: int = 64, batch_size: int = 16,
             adapter: str | None = None, sample: bool = False, temperature: float = 0.7, seed: int = 0,
             on_progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Answer each example's chat-templated prompt. adapter=None on a PEFT model = adapters off.

    Prompts are sorted by length so each batch pads little; answers come back in input order.
    """
    if not examples:
        return []
    texts = [data_mod.prompt_text(ex, tokenizer) for ex in examples]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers: list[str] = [""] * len(texts)
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with _adapter_context(model, adapter):
            for start, index in _chunks(order, batch_size):
                enc = tokenizer([texts[i] for i in index], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
                kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
                if sample:
                    torch.manual_seed(seed + start)
                    kwargs.update(do_sample=True, temperature=temperature, top_p=0.95)
                else:
                    kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                out = model.generate(**enc, **kwargs)
                new = out[:, enc["input_ids"].shape[1]:]
                for i, ids in zip(index, new):
                    answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
                if on_progress:
                    on_progress(min(start + batch_size, len(texts)), len(texts))
    finally:
        tokenizer.padding_side = side
    return answers


def _adapter_context(model, adapter: str | None):
    """Activate one named adapter, or disable adapters (the base) when adapter is None."""
    if not hasattr(model, "peft_config"):
        if adapter is not None:
            raise ValueError(f"adapter {adapter!r} requested on a model without adapters")
        return contextlib.nullcontext()
    if adapter is None:
        return model.disable_adapter()
    model.set_adapter(adapter)
    return contextlib.nullcontext()


def timed(fn, *args, **kwargs):
    start = time.time()
    result = fn(*args, **kwargs)
    return result, time.time() - start

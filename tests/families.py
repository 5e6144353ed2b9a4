"""Tiny offline stand-ins for four chat-model families: each family's real chat template and special
tokens on the embedded SmolLM2 vocabulary, and a random model of the family's architecture.

The token strings, which of them are bos/eos/pad, whether bos is added, and the generation config's
eos list are the families' own; the ids differ (the tokens are appended to the SmolLM2 vocabulary).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


@dataclass(frozen=True)
class Family:
    template: str                    # file under tests/data/chat_templates
    architecture: str                # a transformers config class
    special: list[str]               # added tokens with special=True
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None = None
    plain: list[str] = field(default_factory=list)     # added tokens with special=False
    add_bos: bool = False            # the tokenizer prepends bos when add_special_tokens=True
    generation_eos: list[str] = field(default_factory=list)
    end_of_turn: str = ""            # what the family ends an assistant turn with


FAMILIES = {
    "qwen2.5": Family("qwen2.5.jinja", "Qwen2Config", QWEN_SPECIAL, None, "<|im_end|>", "<|endoftext|>",
                      plain=["<tool_call>", "</tool_call>"],
                      generation_eos=["<|im_end|>", "<|endoftext|>"], end_of_turn="<|im_end|>"),
    "qwen3": Family("qwen3.jinja", "Qwen3Config", QWEN_SPECIAL, None, "<|im_end|>", "<|endoftext|>",
                    plain=["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"],
                    generation_eos=["<|im_end|>", "<|endoftext|>"], end_of_turn="<|im_end|>"),
    "llama3.2": Family("llama3.2.jinja", "LlamaConfig",
                       ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"],
                       "<|begin_of_text|>", "<|eot_id|>", None, add_bos=True,
                       generation_eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], end_of_turn="<|eot_id|>"),
    "gemma3": Family("gemma3.jinja", "Gemma3TextConfig",
                     ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                      "<start_of_image>", "<end_of_image>", "<image_soft_token>"],
                     "<bos>", "<eos>", "<pad>", unk="<unk>", add_bos=True,
                     generation_eos=["<eos>", "<end_of_turn>"], end_of_turn="<end_of_turn>"),
}
NAMES = list(FAMILIES)


def tokenizer(name: str):
    """The family's tokenizer: SmolLM2's vocabulary plus the family's tokens, template and roles."""
    from transformers import AutoTokenizer

    from safespace import models

    family = FAMILIES[name]
    tok = AutoTokenizer.from_pretrained(models.resolve(models.EMBEDDED_KEY))
    tok.add_special_tokens({"additional_special_tokens": family.special})
    if family.plain:
        tok.add_tokens(family.plain)
    tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token = family.bos, family.eos, family.pad, family.unk
    tok.add_bos_token = family.add_bos
    tok.chat_template = (TEMPLATES / family.template).read_text(encoding="utf-8")
    return tok


def config(name: str, tok, **overrides):
    """A two-layer config of the family's architecture (tied embeddings, as the small models ship)."""
    import transformers

    sizes = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id)
    if name in ("qwen3", "gemma3"):
        sizes["head_dim"] = 16
    if name == "gemma3":      # a short window so that sliding-window layers matter on test rows
        sizes.update(num_key_value_heads=1, query_pre_attn_scalar=16, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"])
    return getattr(transformers, FAMILIES[name].architecture)(**{**sizes, **overrides})


def model(name: str, tok, seed: int = 0, **overrides):
    """A random model of the family with the family's generation config (its list of eos ids)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_config(config(name, tok, **overrides)).eval()
    net.generation_config.eos_token_id = [tok.convert_tokens_to_ids(t) for t in FAMILIES[name].generation_eos]
    net.generation_config.bos_token_id = tok.bos_token_id
    net.generation_config.pad_token_id = tok.pad_token_id
    return net


def save(name: str, folder: Path, **overrides) -> Path:
    """The family's tiny model and tokenizer as a model folder, as a hub snapshot would hold them."""
    tok = tokenizer(name)
    model(name, tok, **overrides).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder

"""A saved LoRA adapter kept frozen under whatever trains next: the 4-bit aligned base.

Rounding the merged aligned base to nf4 loses much of stage 0's small change (docs/stage0.md, "In 4-bit
(nf4)"). The 4-bit aligned base is therefore the nf4 original plus the stage-0 adapter trained on that
nf4 original, added exactly (unmerged) at every layer it touches. Each addition is a forward hook on the
base layer, so peft's LoRA on top, Safe Delta's Hessians, `disable_adapter()` and generation all see it as
part of the base, and it never trains: its tensors are buffers, not parameters.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

ATTR = "safespace_stage0"        # the frozen delta's name under each base layer it adds to


class FrozenLora(torch.nn.Module):
    """x -> scaling * B A x, from a saved adapter's lora_A [r, in] and lora_B [out, r]."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scaling: float):
        super().__init__()
        self.register_buffer("A", A, persistent=False)     # buffers: they move with .to(), never train,
        self.register_buffer("B", B, persistent=False)     # and no state_dict (or saved adapter) holds them
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = torch.nn.functional.linear(x.to(self.A.dtype), self.A)     # under autocast: in its dtype, as peft
        return torch.nn.functional.linear(low, self.B) * self.scaling


def _add_delta(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + getattr(module, ATTR)(args[0]).to(output.dtype)


def attach(model: torch.nn.Module, adapter_dir: str | Path) -> int:
    """Add the LoRA adapter saved in `adapter_dir` (peft format) under `model`'s layers, frozen and
    exact; returns how many layers it touches. The model computes what PeftModel.from_pretrained(model,
    adapter_dir) would, with no peft wrapper, so a trainable LoRA can still be put on top."""
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("use_rslora") or config.get("use_dora") or config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}: only a plain LoRA adapter can be stacked")
    scaling = config["lora_alpha"] / config["r"]
    state = load_file(str(folder / "adapter_model.safetensors"))
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    touched = 0
    for key, A in state.items():
        if not key.endswith(suffix):
            continue
        name = key[len(prefix):-len(suffix)] if key.startswith(prefix) else key[:-len(suffix)]
        layer = model.get_submodule(name)
        if hasattr(layer, ATTR):
            raise ValueError(f"{name} already has a stacked adapter")
        weight = layer.weight
        device = weight.device
        dtype = torch.float32 if weight.dtype in (torch.uint8, torch.int8) else weight.dtype   # 4-bit: packed bytes
        B = state[key[:-len(suffix)] + ".lora_B.weight"]
        layer.add_module(ATTR, FrozenLora(A.to(device, dtype), B.to(device, dtype), scaling))
        layer.register_forward_hook(_add_delta)
        touched += 1
    if not touched:
        raise ValueError(f"{folder}: the adapter holds no LoRA weights")
    return touched


def stacked(model: torch.nn.Module) -> bool:
    """Whether any layer of `model` carries a stacked adapter."""
    return any(hasattr(m, ATTR) for m in model.modules())

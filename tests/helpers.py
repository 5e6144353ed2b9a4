"""Helpers the tests share: a tiny random model and the full-matrix forms of Safe Delta to check against."""
import torch

from safespace.safedelta import safe_delta


def tiny_llama(tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2, init_std: float = 0.02):
    """A tiny random Llama that speaks the given tokenizer's vocabulary: fast tests, no weights.
    Untied embeddings: a tied random head keeps predicting the input token's neighbour."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=init_std,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


def lora_that_acts(model_dir, lora, seed: int = 1, std: float = 0.1):
    """A peft LoRA on the model saved in `model_dir` with a random non-zero B, so that it changes the model."""
    from transformers import AutoModelForCausalLM

    from safespace import models

    torch.manual_seed(seed)
    peft_model = models.add_lora(AutoModelForCausalLM.from_pretrained(model_dir), lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)
    return peft_model


def safe_delta_layer(W0, W_ft, U, budget, block_size=2048, exclude_frac=0.15, whole_columns=True):
    """Safe Delta on one weight matrix: returns (W_final, mask, stats); W_final[mask] == W_ft[mask]."""
    W0, W_ft = W0.to(torch.float32), W_ft.to(torch.float32)
    D, mask, stats = safe_delta(W_ft - W0, U, budget, block_size, exclude_frac, whole_columns)
    return torch.where(mask, W_ft, W0 + D), mask, stats


def refactor_lora(B: torch.Tensor, W_diff: torch.Tensor, scaling: float) -> torch.Tensor:
    """A' with scaling * B @ A' = W_diff (exact when W_diff lies in the column space of B)."""
    return (torch.linalg.pinv(B.double()) @ W_diff.double() / scaling).to(torch.float32)


def lora_residual(B, A_new, W_diff, scaling) -> float:
    """||W_diff - scaling B A'|| / ||W_diff|| (0 for a zero W_diff)."""
    norm = W_diff.double().norm().item()
    return 0.0 if norm == 0 else (W_diff.double() - scaling * B.double() @ A_new.double()).norm().item() / norm

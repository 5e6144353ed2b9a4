"""SafeGrad (arXiv 2508.07172): gradient surgery between the user task and safety alignment.

    g_u  = grad of the task loss on a user batch
    g_a  = grad of the alignment loss on a small (harmful prompt -> safe answer) batch
    if <g_u, g_a> < 0:   g_u <- g_u - (<g_u, g_a> / (|g_a|^2 + eps)) g_a      (now <g_u', g_a> = 0)
    step on              g   = g_u' + lam * g_a

Both gradients are flattened over all trainable parameters as one vector (the PCGrad convention
and the paper's "orthogonal plane of the alignment gradient"). Two alignment losses:
  sft: cross-entropy on the safe answers;
  kl:  token-level KL(pi_ref || pi_theta) on the safe answers, teacher-forced, where pi_ref is the
       same base with the LoRA adapter disabled. At initialisation (LoRA B = 0) pi_theta = pi_ref, the
       KL sits at its minimum and its gradient is exactly zero; the zero guard below handles that.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import models

ZERO_GRAD_NORM = 1e-12   # absolute floor
RELATIVE_ZERO = 1e-6     # |g_a| below this share of |g_u| is float noise (the KL gradient at step 0)


def flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """All parameters' gradients as one fp32 vector (zeros for parameters without a gradient)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                      for p in params])


def assign_flat_grad(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
    """Write a flat vector back into the parameters' .grad, in the order of `flat_grad`."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
        offset += n


@dataclass
class Surgery:
    grad: torch.Tensor     # the combined update direction g_u' + lam * g_a
    cos: float             # cosine(g_u, g_a) before projection (nan when g_a is zero)
    conflict: bool         # <g_u, g_a> < 0 and g_a non-zero
    removed_norm: float    # |g_u - g_u'|, the norm of the component taken out
    task_norm: float
    align_norm: float


def negligible(g_a: torch.Tensor, g_u: torch.Tensor) -> bool:
    """No alignment signal to protect (e.g. the KL gradient at step 0 is zero up to float noise)."""
    return g_a.norm().item() <= max(ZERO_GRAD_NORM, RELATIVE_ZERO * g_u.norm().item())


def project_conflict(g_u: torch.Tensor, g_a: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, bool]:
    """Remove from g_u its component along g_a when the two conflict; else return g_u unchanged."""
    if negligible(g_a, g_u):
        return g_u, False
    align_sq = torch.dot(g_a, g_a)
    dot = torch.dot(g_u, g_a)
    if dot >= 0:
        return g_u, False
    return g_u - (dot / (align_sq + eps)) * g_a, True


def surgery(g_u: torch.Tensor, g_a: torch.Tensor, lam: float = 1.0, eps: float = 1e-12) -> Surgery:
    """The SafeGrad step direction and what it did, for logging."""
    projected, conflict = project_conflict(g_u, g_a, eps)
    task_norm, align_norm = g_u.norm().item(), g_a.norm().item()
    if not negligible(g_a, g_u) and task_norm > 0:
        cos = torch.dot(g_u, g_a).item() / (task_norm * align_norm)
    else:
        cos = float("nan")
    return Surgery(grad=projected + lam * g_a, cos=cos, conflict=conflict,
                   removed_norm=(g_u - projected).norm().item(), task_norm=task_norm, align_norm=align_norm)


# ---------------------------------------------------------------------------------------------
# Alignment losses. `batch` holds input_ids, attention_mask and labels (-100 off the answer).


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose logits predict an answer token (logits[t] predicts token t+1)."""
    return labels[:, 1:] != -100


def answer_logits(model, batch: dict, share_prefix: bool = False) -> torch.Tensor:
    """Logits at the answer positions only, [n_answer_tokens, V]: the LM head runs on those rows
    alone (a vocabulary-wide projection of every prompt token is wasted work; ~15 % of a training
    step of the embedded model). Models whose logits are more than the head's output (soft-capping,
    a logit scale) take the plain forward.
    share_prefix: the leading tokens every row shares (the chat template and its system prompt: 24 of
    ~50 tokens of a calibration row) run once and reach the rows as a key/value cache."""
    mask = answer_mask(batch["labels"])
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body, head = models.decoder_body(base), base.get_output_embeddings()
    cfg = base.config
    if body is base or head is None or not models.logits_are_head_output(cfg):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits[:, :-1][mask]
    ids, attention = batch["input_ids"], batch["attention_mask"]
    shared = models.shared_prefix(ids, attention, mask) if share_prefix else 0
    if not shared:
        return head(body(input_ids=ids, attention_mask=attention).last_hidden_state[:, :-1][mask])
    hidden = body(input_ids=ids[:, shared:], attention_mask=attention, past_key_values=models.prefix_cache(body, ids, shared),
                  use_cache=True).last_hidden_state
    return head(hidden[:, :-1][mask[:, shared:]])


def sft_loss(model, batch: dict, decision_weight: float = 0.0, decision_tokens: int = 4,
             share_prefix: bool = False) -> torch.Tensor:
    """Cross-entropy on the answer tokens (mean over answer tokens), as the LM's own loss; with
    decision_weight w, each answer's first decision_tokens tokens count 1 + w times, and with
    batch["row_weight"] ([B]) each row's tokens count that much (weighted means).
    share_prefix: the rows' common leading tokens run once (answer_logits); exact without dropout."""
    logits = answer_logits(model, batch, share_prefix=share_prefix)
    mask = answer_mask(batch["labels"])
    targets = batch["labels"][:, 1:][mask]
    row_weight = batch.get("row_weight")
    if not decision_weight and row_weight is None:
        return F.cross_entropy(logits.float(), targets)
    weights = decision_weights(mask, decision_tokens, decision_weight)
    if row_weight is not None:
        weights = weights * row_weight[:, None].expand_as(mask)[mask]
    token_loss = F.cross_entropy(logits.float(), targets, reduction="none")
    return (weights * token_loss).sum() / weights.sum()


def decision_weights(mask: torch.Tensor, tokens: int, weight: float) -> torch.Tensor:
    """Per answer token [n_answer_tokens] (mask's True positions, in order): 1 + weight on each row's
    first `tokens` answer tokens (where an answer opens by complying or refusing), 1 elsewhere."""
    opening = (mask.cumsum(1) <= tokens)[mask]
    return 1.0 + weight * opening.float()


@torch.no_grad()
def reference_log_probs(model, batch: dict, share_prefix: bool = False) -> torch.Tensor:
    """log pi_ref on the answer positions, [n_answer_tokens, V], with the LoRA adapter disabled
    (no second model)."""
    with model.disable_adapter():
        return F.log_softmax(answer_logits(model, batch, share_prefix=share_prefix).float(), dim=-1)


def kl_divergence(ref_log_probs: torch.Tensor, log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of the mean over answer tokens of KL(pi_ref || pi_theta).

    ref_log_probs, log_probs: [n_answer_tokens, V], the rows of mask's True positions in order;
    mask: [B, T-1].
    """
    token_kl = F.kl_div(log_probs, ref_log_probs, log_target=True, reduction="none").sum(-1)
    return row_means(token_kl, mask)[mask.any(1)].mean()


def row_means(token_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean [B] of values given at mask's True positions, in order ([n_answer_tokens]);
    0 for a sequence without any."""
    seq_index = torch.nonzero(mask, as_tuple=True)[0]
    per_seq = torch.zeros(mask.shape[0], device=token_values.device).index_add_(0, seq_index, token_values)
    return per_seq / mask.sum(1).clamp(min=1)


def kl_loss(model, batch: dict, ref_log_probs: torch.Tensor | None = None, share_prefix: bool = False) -> torch.Tensor:
    """Token-level KL(pi_ref || pi_theta) on the alignment answers, reference = adapter disabled."""
    if ref_log_probs is None:
        ref_log_probs = reference_log_probs(model, batch, share_prefix)
    log_probs = F.log_softmax(answer_logits(model, batch, share_prefix=share_prefix).float(), dim=-1)
    return kl_divergence(ref_log_probs, log_probs, answer_mask(batch["labels"]))


def alignment_loss(mode: str, model, batch: dict, share_prefix: bool = False) -> torch.Tensor:
    if mode == "sft":
        return sft_loss(model, batch, share_prefix=share_prefix)
    if mode == "kl":
        return kl_loss(model, batch, share_prefix=share_prefix)
    raise ValueError(f"unknown SafeGrad alignment loss {mode!r}; expected sft or kl")

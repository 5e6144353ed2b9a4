"""SafeGrad properties, against the equations in safegrad.py's docstring."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from safespace import models, safegrad
from safespace.config import LoraSettings

vectors = st.lists(st.floats(-10, 10, allow_nan=False, allow_subnormal=False), min_size=2, max_size=40)


def _pair(xs, ys):
    n = min(len(xs), len(ys))
    return torch.tensor(xs[:n], dtype=torch.float64), torch.tensor(ys[:n], dtype=torch.float64)


@settings(max_examples=200, deadline=None)
@given(vectors, vectors)
def test_projection_is_orthogonal_on_conflict_and_identity_otherwise(xs, ys):
    g_u, g_a = _pair(xs, ys)
    projected, conflict = safegrad.project_conflict(g_u, g_a, eps=0.0)
    if safegrad.negligible(g_a, g_u):
        assert not conflict and torch.equal(projected, g_u)
    elif torch.dot(g_u, g_a) < 0:
        assert conflict
        assert abs(torch.dot(projected, g_a).item()) <= 1e-9 * (1 + g_u.norm().item() * g_a.norm().item())
        # only the component along g_a was removed
        removed = g_u - projected
        if removed.norm() < 1e-9:   # a conflict of size ~0 removes ~nothing
            return
        cos = torch.dot(removed, g_a) / (removed.norm() * g_a.norm())
        assert abs(abs(cos.item()) - 1) < 1e-6
    else:
        assert not conflict and torch.equal(projected, g_u)


def test_surgery_combines_projected_task_and_weighted_alignment():
    g_u = torch.tensor([1.0, -2.0, 0.0])
    g_a = torch.tensor([0.0, 1.0, 0.0])
    result = safegrad.surgery(g_u, g_a, lam=0.5)
    assert result.conflict
    assert torch.allclose(result.grad, torch.tensor([1.0, 0.5, 0.0]))   # [1,0,0] + 0.5*[0,1,0]
    assert result.removed_norm == pytest.approx(2.0)
    assert result.cos == pytest.approx(-2 / math.sqrt(5))


def test_zero_alignment_gradient_is_a_no_op_with_nan_cosine():
    g_u = torch.randn(10)
    result = safegrad.surgery(g_u, torch.zeros(10), lam=1.0)
    assert not result.conflict and torch.equal(result.grad, g_u) and math.isnan(result.cos)


def test_projection_keeps_alignment_loss_from_rising_on_a_toy_problem():
    """Start aligned. The task pulls along a direction safety cares about (theta_1) and one it does
    not (theta_0): plain steps give up safety, SafeGrad learns theta_0 and holds theta_1."""
    a = torch.tensor([2.0, 0.0])
    task = lambda t: ((t - a) ** 2).sum()
    align = lambda t: (t[1] - 1.5) ** 2

    def run(use_safegrad: bool):
        theta = torch.tensor([0.0, 1.5], requires_grad=True)
        for _ in range(300):
            g_u = torch.autograd.grad(task(theta), theta)[0]
            g_a = torch.autograd.grad(align(theta), theta)[0]
            g = safegrad.surgery(g_u, g_a, lam=1.0).grad if use_safegrad else g_u
            with torch.no_grad():
                theta -= 0.02 * g
        return task(theta).item(), align(theta).item()

    start_task = task(torch.tensor([0.0, 1.5])).item()
    plain_task, plain_align = run(False)
    sg_task, sg_align = run(True)
    assert plain_task < 0.01 and plain_align > 2.0        # plain fine-tuning forgets alignment
    assert sg_task < start_task - 3.5                     # SafeGrad still learns the free direction
    assert sg_align < 0.05                                # and keeps the aligned one


def _lora_model(tiny_model, init_b: bool):
    model = models.add_lora(tiny_model, LoraSettings(r=4, alpha=8))
    if init_b:
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    return model


def _batch(tokenizer):
    ids = torch.randint(5, len(tokenizer), (2, 12))
    labels = ids.clone()
    labels[:, :6] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_kl_gradient_is_zero_at_init_and_sft_gradient_is_not(tiny_model, tokenizer):
    torch.manual_seed(0)
    model = _lora_model(tiny_model, init_b=False)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = _batch(tokenizer)
    loss = safegrad.kl_loss(model, batch)
    assert abs(loss.item()) < 1e-6
    loss.backward()
    assert safegrad.flat_grad(params).abs().max().item() < 1e-7
    model.zero_grad()
    safegrad.sft_loss(model, batch).backward()
    assert safegrad.flat_grad(params).abs().max().item() > 1e-4


def test_kl_is_positive_after_drift_and_matches_a_direct_computation(tiny_model, tokenizer):
    torch.manual_seed(1)
    model = _lora_model(tiny_model, init_b=True)
    batch = _batch(tokenizer)
    loss = safegrad.kl_loss(model, batch)
    with torch.no_grad():
        with model.disable_adapter():
            p = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[:, :-1], -1)
        q = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[:, :-1], -1)
        kl = (p.exp() * (p - q)).sum(-1)                     # [B, T-1]
        mask = batch["labels"][:, 1:] != -100
        expected = torch.stack([kl[i][mask[i]].mean() for i in range(2)]).mean()
    assert loss.item() > 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_flat_grad_roundtrip(tiny_model):
    model = _lora_model(tiny_model, init_b=True)
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.randn(sum(p.numel() for p in params))
    safegrad.assign_flat_grad(params, flat)
    assert torch.equal(safegrad.flat_grad(params), flat)


def test_answer_logits_and_sft_loss_equal_the_full_forward(tiny_model, tokenizer):
    """The LM head on the answer rows only must give the model's own logits and loss there."""
    torch.manual_seed(2)
    model = _lora_model(tiny_model, init_b=True)
    batch = _batch(tokenizer)
    batch["labels"][1, :9] = -100                              # rows with different answer lengths
    mask = safegrad.answer_mask(batch["labels"])
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"])
        picked = safegrad.answer_logits(model, batch)
    assert picked.shape == (int(mask.sum()), full.logits.shape[-1])
    assert torch.allclose(picked, full.logits[:, :-1][mask], atol=1e-5)
    assert safegrad.sft_loss(model, batch).item() == pytest.approx(full.loss.item(), rel=1e-5)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=6, max_size=6), min_size=1, max_size=4),
       st.integers(1, 7), st.floats(0.1, 20))
def test_decision_weights_weight_each_rows_first_answer_tokens(rows, tokens, weight):
    mask = torch.tensor(rows)
    weights = safegrad.decision_weights(mask, tokens, weight)
    assert weights.shape == (int(mask.sum()),)
    at = 0
    for row in rows:                         # in mask order: row by row, left to right
        n = sum(row)
        expected = [1 + weight] * min(n, tokens) + [1.0] * max(n - tokens, 0)
        assert weights[at:at + n].tolist() == pytest.approx(expected)
        at += n


def test_decision_weighted_sft_loss_is_the_weighted_mean_of_token_losses(tiny_model, tokenizer):
    torch.manual_seed(3)
    model = _lora_model(tiny_model, init_b=True)
    with torch.no_grad():                                      # token losses far apart, so weights show
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(40)
    batch = _batch(tokenizer)
    batch["labels"][1, :9] = -100                              # row 0 has 6 answer tokens, row 1 has 3
    mask = safegrad.answer_mask(batch["labels"])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        token_loss = torch.nn.functional.cross_entropy(
            logits[mask].float(), batch["labels"][:, 1:][mask], reduction="none")
        plain = safegrad.sft_loss(model, batch)
        weighted = safegrad.sft_loss(model, batch, decision_weight=4.0, decision_tokens=3)
        everywhere = safegrad.sft_loss(model, batch, decision_weight=4.0, decision_tokens=6)   # every token
    w = torch.tensor([5.0, 5.0, 5.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0])   # each row's first 3 tokens
    assert weighted.item() == pytest.approx(((w * token_loss).sum() / w.sum()).item(), rel=1e-5)
    assert plain.item() == pytest.approx(token_loss.mean().item(), rel=1e-5)
    assert abs(weighted.item() - plain.item()) > 0.01
    assert everywhere.item() == pytest.approx(plain.item(), rel=1e-5)   # uniform weights cancel out


def test_row_weights_scale_each_rows_tokens_in_the_sft_loss(tiny_model, tokenizer):
    torch.manual_seed(3)
    model = _lora_model(tiny_model, init_b=True)
    batch = _batch(tokenizer)
    with torch.no_grad():
        plain = safegrad.sft_loss(model, batch, 4.0, 3)
        ones = safegrad.sft_loss(model, {**batch, "row_weight": torch.ones(2)}, 4.0, 3)
        only_first = safegrad.sft_loss(model, {**batch, "row_weight": torch.tensor([1.0, 0.0])}, 4.0, 3)
        first_row = safegrad.sft_loss(model, {k: v[:1] for k, v in batch.items()}, 4.0, 3)
        no_decision = safegrad.sft_loss(model, {**batch, "row_weight": torch.tensor([1.0, 0.0])})
        first_plain = safegrad.sft_loss(model, {k: v[:1] for k, v in batch.items()})
    assert ones.item() == pytest.approx(plain.item(), rel=1e-6)            # unit weights: the loss as it was
    assert only_first.item() == pytest.approx(first_row.item(), rel=1e-5)  # a row weighted 0 drops out
    assert no_decision.item() == pytest.approx(first_plain.item(), rel=1e-5)


def test_training_with_a_shared_prefix_gives_the_full_forwards_gradient(tiny_model, tokenizer):
    """The prefix's cache keeps its graph: the LoRA gradient through it is the full forward's."""
    torch.manual_seed(5)
    model = _lora_model(tiny_model, init_b=True)
    ids = torch.randint(5, len(tokenizer), (3, 14))
    ids[:, :6] = ids[0, :6]
    attention = torch.ones_like(ids)
    attention[1, 12:] = 0
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :8] = -100
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}
    assert models.shared_prefix(ids, attention, safegrad.answer_mask(labels)) == 6
    params = [p for p in model.parameters() if p.requires_grad]
    losses = {"task": lambda share: safegrad.sft_loss(model, batch, 4.0, 3, share_prefix=share),
              "SafeGrad sft": lambda share: safegrad.alignment_loss("sft", model, batch, share_prefix=share),
              "SafeGrad kl": lambda share: safegrad.alignment_loss("kl", model, batch, share_prefix=share)}
    for name, loss in losses.items():
        grads = []
        for share in (False, True):
            model.zero_grad()
            loss(share).backward()
            grads.append(torch.cat([p.grad.flatten() for p in params]))
        assert grads[0].norm() > 0, name
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6, msg=name)


def test_shared_prefix_runs_once_and_gives_the_full_forward_logits(tiny_model, tokenizer):
    """Rows that open with the same tokens (a chat template): the prefix runs once as a cache, and the
    answer logits are those of the full forward, with right padding and uneven answer starts."""
    torch.manual_seed(4)
    model = _lora_model(tiny_model, init_b=True)
    ids = torch.randint(5, len(tokenizer), (3, 14))
    ids[:, :5] = ids[0, :5]                                     # 5 shared tokens, then the rows differ
    ids[1, 5] = ids[0, 5] + 1
    attention = torch.ones_like(ids)
    attention[2, 11:] = 0                                       # a shorter, right-padded row
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :8] = -100
    labels[0, 8:10] = -100                                      # answers start at different places
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}
    mask = safegrad.answer_mask(labels)
    assert models.shared_prefix(ids, attention, mask) == 5
    lengths = []
    body = models.decoder_body(model)
    handle = body.register_forward_pre_hook(lambda mod, args, kwargs: lengths.append(kwargs["input_ids"].shape),
                                            with_kwargs=True)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attention).logits[:, :-1][mask]
        shared = safegrad.answer_logits(model, batch, share_prefix=True)
    handle.remove()
    assert lengths[-2:] == [(1, 5), (3, 9)]                    # the prefix once, then the rest of each row
    torch.testing.assert_close(shared, full, rtol=1e-4, atol=1e-5)
    labels[:, :4] = ids[:, :4]                                  # an answer inside the shared part: share less
    assert models.shared_prefix(ids, attention, safegrad.answer_mask(labels)) == 0
    assert models.shared_prefix(ids[:1], attention[:1], mask[:1]) == 0                 # one row: nothing to share


def test_autocast_is_bf16_only_where_asked_or_native(monkeypatch):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    with models.autocast("cpu", "auto"):
        assert not torch.is_autocast_enabled("cpu")
    with models.autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with models.autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    with models.autocast("cpu", "auto"):
        assert torch.is_autocast_enabled("cpu")
    with models.autocast("cuda:0", "auto"):                     # GPU models compute in bf16 already
        assert not torch.is_autocast_enabled("cpu")

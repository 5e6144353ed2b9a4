"""Property tests for Safe Delta on toy layers (random calibration inputs) and a tiny Llama."""
import math

import numpy as np
import pytest
import torch

from safespace.safedelta import (HessianAccumulator, SafeDeltaSettings, apply_to_adapter, collect_hessians,
                                 AUTO_LADDER, answer_start_loss, apply_auto, column_sensitivity, edited_lora, first_within,
                                 AUTO_START, ladder_strength,
                                 task_sensitivities,
                                 hessian_cache_key, inverse_cholesky_upper, load_layer_tensors, lora_layers,
                                 paper_budget, relative_budget, safe_delta, safe_delta_lora,
                                 save_adapter, save_layer_tensors)
from helpers import lora_residual, refactor_lora, safe_delta_layer

D_OUT, D_IN, BLOCK = 24, 40, 16          # blocks [0,16) [16,32) [32,40)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: extra threads only contend (seconds instead of milliseconds on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy(seed, d_out=D_OUT, d_in=D_IN, n_tokens=120, lora_rank=None):
    """Correlated calibration inputs X [n, d_in] with uneven feature scales, W0 and a delta."""
    torch.manual_seed(seed)
    mix = torch.randn(d_in, d_in) / math.sqrt(d_in) + torch.eye(d_in)
    X = torch.randn(n_tokens, d_in) @ mix * torch.logspace(-1, 1, d_in)[torch.randperm(d_in)]
    H = 2 * X.T @ X / n_tokens
    W0 = 0.1 * torch.randn(d_out, d_in)
    if lora_rank:
        B, A = torch.randn(d_out, lora_rank), 0.01 * torch.randn(lora_rank, d_in)
        return X, H, W0, B, A
    return X, H, W0, W0 + 0.01 * torch.randn(d_out, d_in)


def run(H, delta, keep=0.1, exclude_frac=0.15, whole_columns=True, budget=None):
    U = inverse_cholesky_upper(H)
    return safe_delta(delta, U, relative_budget(keep) if budget is None else budget, BLOCK, exclude_frac,
                      whole_columns)


def out_change(X, Delta):
    return (X @ Delta.T).pow(2).sum().item()


# ----------------------------------------------------------------------------- H and U
def test_hessian_accumulator_is_per_sequence_and_skips_padding():
    torch.manual_seed(0)
    seqs = [torch.randn(n, 8) for n in (5, 3, 7, 2)]
    expected = sum(2 * x.T @ x for x in seqs) / len(seqs)
    acc = HessianAccumulator(8)
    for pair in (seqs[:2], seqs[2:]):                      # two padded batches of two sequences
        T = max(len(x) for x in pair)
        x = torch.randn(2, T, 8) * 100                     # garbage on padded positions
        mask = torch.zeros(2, T, dtype=torch.bool)
        for i, s in enumerate(pair):
            x[i, :len(s)], mask[i, :len(s)] = s, True
        acc.add_batch(x, mask=mask)
    assert acc.n_sequences == 4
    torch.testing.assert_close(acc.H, expected, rtol=1e-5, atol=1e-5)


def test_hessian_accumulator_counts_a_weighted_token_as_its_copies():
    """A token of weight k adds what k copies of it add; n_sequences=0 adds tokens to sequences counted."""
    torch.manual_seed(1)
    prefix, tails = torch.randn(3, 8), [torch.randn(n, 8) for n in (4, 2)]
    expected = sum(2 * x.T @ x for x in (torch.cat([prefix, t]) for t in tails)) / 2
    acc = HessianAccumulator(8)
    acc.add_batch(prefix[None], n_sequences=2, weight=torch.full((1, 3), 2.0))    # the shared rows, once
    x, mask = torch.zeros(2, 4, 8), torch.zeros(2, 4, dtype=torch.bool)
    for i, t in enumerate(tails):
        x[i, :len(t)], mask[i, :len(t)] = t, True
    acc.add_batch(x, n_sequences=0, mask=mask)
    assert acc.n_sequences == 2
    torch.testing.assert_close(acc.H, expected, rtol=1e-5, atol=1e-5)


def test_inverse_cholesky_upper():
    _, H, _, _ = toy(0)
    H[3, :] = H[:, 3] = 0                                  # a dead input
    U = inverse_cholesky_upper(H, percdamp=0.01)
    assert torch.equal(U, U.triu())
    Hd = H.double().clone()
    Hd[3, 3] = 1
    Hd += 0.01 * Hd.diagonal().mean() * torch.eye(D_IN, dtype=torch.float64)
    torch.testing.assert_close((U.T @ U).double(), torch.linalg.inv(Hd), rtol=1e-3, atol=1e-6)
    indefinite = torch.diag(torch.tensor([1.0, 1.0, -0.5]))   # needs 10-1000x damping
    assert torch.isfinite(inverse_cholesky_upper(indefinite)).all()
    with pytest.raises(ValueError, match="positive definite"):
        inverse_cholesky_upper(torch.full((3, 3), float("nan")))


# ----------------------------------------------------------------------------- selection and OBS
@pytest.mark.parametrize("budget", [relative_budget(0.0), paper_budget(0.0), 0.0])
def test_zero_budget_returns_W0_exactly(budget):
    _, H, W0, W_ft = toy(1)
    W, mask, stats = safe_delta_layer(W0, W_ft, inverse_cholesky_upper(H), budget, BLOCK)
    assert torch.equal(W, W0) and not mask.any() and stats["cost_after"] == 0


@pytest.mark.parametrize("budget", [relative_budget(math.inf), paper_budget(math.inf), math.inf])
def test_unlimited_budget_returns_W_ft_exactly(budget):
    _, H, W0, W_ft = toy(2)
    W, mask, _ = safe_delta_layer(W0, W_ft, inverse_cholesky_upper(H), budget, BLOCK, exclude_frac=0)
    assert mask.all() and torch.equal(W, W_ft)


def test_selection_is_invariant_to_scaling_H_and_delta():
    _, H, W0, W_ft = toy(3)
    delta = W_ft - W0
    _, mask, _ = run(H, delta, keep=0.2)
    assert 0 < mask.sum() < 0.85 * mask.numel()             # a real, partial selection
    for k, t in [(1e3, 1.0), (1.0, 1e-2), (0.37, 25.0)]:
        assert torch.equal(run(k * H, t * delta, keep=0.2)[1], mask)
    paper = paper_budget(0.5)
    _, mask_p, _ = run(H, delta, budget=paper)
    assert 0 < mask_p.sum() < 0.85 * mask_p.numel()
    assert torch.equal(run(1e3 * H, delta, budget=paper)[1], mask_p)


def test_compensation_lowers_safety_output_change():
    wins, ratios = 0, []
    for seed in range(20):
        X, H, W0, W_ft = toy(100 + seed)
        delta = W_ft - W0
        D, mask, _ = run(H, delta, keep=0.1)
        assert mask.any()
        compensated, mask_only = out_change(X, D), out_change(X, delta * mask)
        wins += compensated < mask_only
        ratios.append(compensated / mask_only)
    assert wins >= 19 and sum(ratios) / len(ratios) < 0.9


def test_lora_delta_stays_in_column_space_of_B():
    X, H, W0, B, A = toy(4, lora_rank=4)
    scaling = 2.0
    delta = scaling * B @ A
    D, mask, _ = run(H, delta, keep=0.3)
    assert 0 < mask.sum() < mask.numel()
    assert torch.equal(mask.all(0), mask.any(0))             # whole columns only
    A_new = refactor_lora(B, D, scaling)
    assert lora_residual(B, A_new, D, scaling) < 1e-4
    # an official-style partial column leaves the span of B: the same check must then fail
    partial = [run(H, delta, keep=k, whole_columns=False) for k in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)]
    partial = [(D, m) for D, m, _ in partial if (m.any(0) & ~m.all(0)).any()]
    assert partial
    for D, _ in partial:
        assert lora_residual(B, refactor_lora(B, D, scaling), D, scaling) > 1e-3


@pytest.mark.parametrize("rule", [relative_budget, paper_budget])
def test_first_block_selection_is_monotone_in_budget(rule):
    _, H, W0, W_ft = toy(5)
    masks = [run(H, W_ft - W0, budget=rule(b))[1][:, :BLOCK] for b in (0, 0.01, 0.05, 0.1, 0.3, 1, 3, 10, math.inf)]
    for small, large in zip(masks, masks[1:]):
        assert not (small & ~large).any()
    assert not masks[0].any() and masks[-1].any() and masks[-1].sum() > masks[2].sum()


def test_budget_bounds_the_selected_cost():
    _, H, W0, W_ft = toy(6)
    U = inverse_cholesky_upper(H)
    for keep in (0.05, 0.2, 0.5):                            # one block: the budget is keep * full cost
        _, _, stats = safe_delta(W_ft - W0, U, relative_budget(keep), block_size=D_IN)
        assert 0 < stats["cost_selected"] <= keep * stats["cost_before"] * (1 + 1e-6)


def test_never_accepts_the_most_sensitive_columns():
    _, H, W0, W_ft = toy(7)
    U = inverse_cholesky_upper(H)
    _, mask, _ = safe_delta(W_ft - W0, U, math.inf, BLOCK, exclude_frac=0.15)
    c = 1 / U.diagonal() ** 2
    for a in range(0, D_IN, BLOCK):
        b = min(a + BLOCK, D_IN)
        n_excluded = math.floor(0.15 * (b - a))
        most_sensitive = a + torch.topk(c[a:b], n_excluded).indices
        assert n_excluded > 0 and not mask[:, most_sensitive].any()
        assert mask[:, a:b].all(0).sum() == (b - a) - n_excluded


def test_accepted_entries_are_exact_and_the_rest_is_compensated():
    X, H, W0, W_ft = toy(8)
    delta = W_ft - W0
    D, mask, stats = run(H, delta, keep=0.3)
    assert torch.equal(D[mask], delta[mask])
    after_first = mask.any(0).float().cumsum(0) > 0          # columns after the first accepted one
    assert (D[:, after_first & ~mask.any(0)] != 0).all()     # compensation moved every one of them
    W, _, _ = safe_delta_layer(W0, W_ft, inverse_cholesky_upper(H), relative_budget(0.3), BLOCK)
    assert torch.equal(W[mask], W_ft[mask])


def test_obs_cost_is_the_exact_output_change_on_damped_H():
    _, H, W0, W_ft = toy(9)
    U = inverse_cholesky_upper(H)
    D, _, stats = safe_delta(W_ft - W0, U, relative_budget(0.3), BLOCK)
    H_damped = torch.linalg.inv(U.double().T @ U.double())
    exact = (D.double() @ H_damped * D.double()).sum().item()
    assert stats["cost_after"] == pytest.approx(exact, rel=1e-3)
    assert 0 < stats["kept_energy_frac"] < 1 and 0 < stats["kept_columns_frac"] < 1


def reference_safe_delta(W0, W_ft, U, keep, block_size, exclude_frac=0.15):
    """The algorithm as written in the spec: W itself, one column at a time, no lazy updates."""
    W, mask = W0.clone(), torch.zeros(W0.shape, dtype=torch.bool)
    for a in range(0, W.shape[1], block_size):
        cols = range(a, min(a + block_size, W.shape[1]))
        c = {m: 1 / U[m, m].item() ** 2 for m in cols}
        cost = {m: ((W_ft[:, m] - W[:, m]) ** 2).sum().item() * c[m] for m in cols}
        eligible = sorted(cols, key=c.get)[:len(cols) - int(exclude_frac * len(cols) + 1e-9)]
        total = 0.0
        for m in eligible:
            if total + cost[m] > keep * sum(cost.values()):
                break
            total += cost[m]
            mask[:, m] = True
        for j in cols:
            q = torch.where(mask[:, j], W_ft[:, j], W[:, j])
            err = (W[:, j] - q) / U[j, j]
            W[:, j] = q
            W[:, j + 1:] -= err[:, None] * U[j, j + 1:]
    return W, mask


def test_matches_the_plain_column_by_column_algorithm():
    for seed, keep in [(10, 0.1), (11, 0.3)]:                 # 300 columns: 2 blocks, 3 lazy chunks
        _, H, W0, W_ft = toy(seed, d_in=300, n_tokens=400)
        U = inverse_cholesky_upper(H)
        W_ref, mask_ref = reference_safe_delta(W0, W_ft, U, keep, block_size=256)
        W, mask, _ = safe_delta_layer(W0, W_ft, U, relative_budget(keep), block_size=256)
        assert torch.equal(mask, mask_ref) and mask[:, 256:].any()
        torch.testing.assert_close(W, W_ref, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- tiny Llama with LoRA
def tiny_lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config).eval(),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)   # delta ~ W0: near-linear regime
    return model.eval()


def calibration_batches():
    torch.manual_seed(1)
    batches = []
    for lengths in ((10, 6), (8, 8), (10, 3)):
        ids = torch.randint(0, 128, (2, max(lengths)))
        mask = torch.stack([torch.arange(ids.shape[1]) < n for n in lengths]).long()
        batches.append(dict(input_ids=ids, attention_mask=mask))
    return batches


@torch.no_grad()
def test_model_level_safe_delta_on_a_lora_adapter(tmp_path):
    model = tiny_lora_model()
    layers = lora_layers(model)
    assert len(layers) == 4 and not any("k_proj" in n for n in layers)
    batches = calibration_batches()
    hessians = collect_hessians(model, list(layers), batches, device="cpu")

    # H of layer 1's q_proj equals the one from each unpadded sequence alone, adapter disabled
    inner = model.base_model.model.model
    expected = torch.zeros(32, 32)
    with model.disable_adapter():
        for batch in batches:
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                h = model(input_ids=ids[mask.bool()][None], output_hidden_states=True).hidden_states[1]
                x = inner.layers[1].input_layernorm(h)[0]
                expected += 2 * x.T @ x / 6
    torch.testing.assert_close(hessians["base_model.model.model.layers.1.self_attn.q_proj"], expected,
                               rtol=1e-4, atol=1e-4)

    path = tmp_path / "h.safetensors"
    save_layer_tensors(path, hessians)
    loaded = load_layer_tensors(path)
    assert loaded.keys() == hessians.keys() and all(torch.equal(loaded[k], hessians[k]) for k in loaded)

    base_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}

    def logits(adapter=None):                                # on the calibration tokens
        if adapter is None:
            with model.disable_adapter():
                return logits("default")
        model.set_adapter(adapter)
        return torch.cat([model(**b).logits[b["attention_mask"].bool()] for b in batches])

    variants = {"none": SafeDeltaSettings(keep=0.0), "all": SafeDeltaSettings(keep=math.inf, exclude_frac=0.0),
                "safe": SafeDeltaSettings(keep=0.1)}
    for name, settings in variants.items():
        new_state, stats = apply_to_adapter(model, "default", hessians, settings)
        assert len(stats) == 4
        save_adapter(model, "default", new_state, tmp_path / name)
        model.load_adapter(str(tmp_path / name), adapter_name=name)
        for layer_name, layer in layers.items():
            A_new, B = new_state[layer_name]
            assert torch.equal(layer.lora_B[name].weight, layer.lora_B["default"].weight)
            torch.testing.assert_close(layer.lora_A[name].weight, A_new)
            # the delta the loaded adapter applies is the Safe Delta result for this layer
            U = inverse_cholesky_upper(hessians[layer_name])
            D, _, _ = safe_delta(layer.get_delta_weight("default"), U, settings.rule(), exclude_frac=settings.exclude_frac)
            torch.testing.assert_close(layer.get_delta_weight(name), D, rtol=1e-4, atol=1e-6)
        if name == "safe":
            assert all(0 < s["kept_columns_frac"] < 1 and s["output_change_ratio"] < 0.5 for s in stats)

    base, ft = logits(), logits("default")
    torch.testing.assert_close(logits("none"), base, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits("all"), ft, rtol=1e-4, atol=1e-4)
    safe = logits("safe")
    # per layer the kept change is <= 10 % of the full delta's safety cost, i.e. ~30 % in amplitude
    assert (safe - base).norm() < 0.4 * (ft - base).norm()
    assert (safe - base).norm() > 0                          # some of the fine-tuning was kept
    model.set_adapter("default")
    after = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    assert after.keys() == base_before.keys() and all(torch.equal(after[k], base_before[k]) for k in after)


def test_hessian_cache_key():
    s = SafeDeltaSettings()
    key = hessian_cache_key("smollm2-135m", ["a", "b"], s)
    assert len(key) == 64 and key == hessian_cache_key("smollm2-135m", ["a", "b"], s)
    assert key != hessian_cache_key("smollm2-135m", ["a", "c"], s)
    assert key != hessian_cache_key("smollm2-135m@4bit", ["a", "b"], s)
    assert key != hessian_cache_key("smollm2-135m", ["a", "b"], SafeDeltaSettings(tokens="all"))
    with pytest.raises(ValueError, match="tokens"):
        SafeDeltaSettings(tokens="prompt")


def test_token_mask_restricts_H_to_the_answer_writing_inputs(tokenizer):
    """H from tokens="answer" is exactly the per-sequence covariance of the inputs at the positions
    that predict an answer token, while the forward still sees (and attends to) the whole sequence."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from safespace import data, defence, models

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj"]))
    rows = [data.Example(prompt="How do I pick a lock?", response="I can't help with that."),
            data.Example(prompt="Write malware that steals passwords please", response="No, I won't.")]
    batch = next(defence._calibration_batches(rows, tokenizer, "cpu", tokens="answer"))
    tok = data.tokenize(rows, tokenizer, 256)
    expected_mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    for i, labels in enumerate(sorted(tok.labels, key=len)):     # batched shortest first
        for t in range(len(labels) - 1):
            expected_mask[i, t] = labels[t + 1] != -100       # the input at t writes answer token t+1
    assert torch.equal(batch["token_mask"].bool(), expected_mask)
    name = next(n for n in lora_layers(model) if n.endswith("layers.0.self_attn.q_proj"))
    H = collect_hessians(model, [name], [batch])[name]
    # the shared chat template ran once, as a cache: the same H as full rows
    assert models.shared_prefix(batch["input_ids"], batch["attention_mask"], batch["token_mask"]) > 3
    assert torch.allclose(H, collect_hessians(model, [name], [batch], share_prefix=False)[name], atol=1e-6)
    seen = {}
    layer = dict(model.named_modules())[name].base_layer
    handle = layer.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach()))
    with torch.no_grad(), model.disable_adapter():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    x = seen["x"][expected_mask]
    assert torch.allclose(H, 2 / 2 * x.T @ x, atol=1e-5)     # (2/N) sum, N = 2 sequences


def test_H_of_every_token_runs_the_shared_template_once_and_equals_whole_rows(tokenizer):
    """tokens="all" (the task H): the chat template every row opens with runs once and counts once per
    row, and H is the whole rows' H."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from safespace import data, defence, models

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    rows = [data.Example(prompt=p, response=r) for p, r in
            [("Summarise: the heating broke.", "The heating broke."), ("Is this review positive? Loved it", "Yes."),
             ("Translate 'cat' to French", "chat")]]
    batch = next(defence._calibration_batches(rows, tokenizer, "cpu", tokens="all"))
    shared = models.shared_prefix(batch["input_ids"], batch["attention_mask"])
    assert shared > 3 and models.shared_prefix(batch["input_ids"], batch["attention_mask"], batch["token_mask"]) == 0
    names = [n for n in lora_layers(model) if ".layers.1." in n]
    tokens_seen = []
    layer = dict(model.named_modules())[names[0]].base_layer
    handle = layer.register_forward_pre_hook(lambda mod, args: tokens_seen.append(args[0].shape[0] * args[0].shape[1]))
    once = collect_hessians(model, names, [batch])
    handle.remove()
    whole = collect_hessians(model, names, [batch], share_prefix=False)
    B, T = batch["input_ids"].shape
    assert tokens_seen == [shared, B * (T - shared)]                  # the template ran once, not B times
    for name in names:
        torch.testing.assert_close(once[name], whole[name], rtol=1e-5, atol=1e-5)


def test_calibration_batches_hold_every_row_once_rows_of_like_length_together(tokenizer):
    """H is a sum over rows, so the batches may take them in any order: shortest first, which pads little."""
    from safespace import data, defence

    rows = [data.Example(prompt="word " * n, response="fine " * (n % 3 + 1)) for n in (9, 1, 30, 4, 17, 2, 25)]
    batches = list(defence._calibration_batches(rows, tokenizer, "cpu", tokens="all", batch_size=3))
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    assert [len(b["input_ids"]) for b in batches] == [3, 3, 1]
    assert lengths == sorted(data.tokenize(rows, tokenizer, 256).lengths)          # every row once, by length
    padded = sum(b["input_ids"].numel() for b in batches)
    assert padded - sum(lengths) == 28         # in the given order: 78 padding tokens


def test_layers_fed_the_same_input_share_one_hessian_equal_to_their_own(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    ids = torch.randint(0, 128, (3, 9))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    names = list(lora_layers(model))
    together = collect_hessians(model, names, batches)
    for name in names:
        alone = collect_hessians(model, [name], batches)[name]
        assert torch.allclose(together[name], alone, atol=1e-6)
    q = next(n for n in names if n.endswith("q_proj"))
    v = q.replace("q_proj", "v_proj")
    o = q.replace("q_proj", "o_proj")
    assert together[q].data_ptr() == together[v].data_ptr()          # computed once
    assert together[q].data_ptr() != together[o].data_ptr()
    save_layer_tensors(tmp_path / "h.safetensors", together)
    loaded = load_layer_tensors(tmp_path / "h.safetensors")
    assert set(loaded) == set(together) and all(torch.equal(loaded[k], together[k]) for k in together)


def test_mask_only_ablation_takes_the_fine_tuned_values_and_nothing_else():
    torch.manual_seed(3)
    X = torch.randn(D_IN, 200)
    U = inverse_cholesky_upper(2 * X @ X.T / 200)
    delta = torch.randn(D_OUT, D_IN)
    D, mask, _ = safe_delta(delta, U, relative_budget(0.3), block_size=BLOCK, compensate=False)
    assert mask.any() and not mask.all()
    assert torch.equal(D[mask], delta[mask]) and torch.all(D[~mask] == 0)


# ----------------------------------------------------------------------------- task ranking
def test_task_ranking_keeps_the_columns_the_task_uses_and_ignores_the_scale_of_H_task():
    """Equal safety sensitivity everywhere; the task uses only the first half of the input features.
    Ranked by safety cost per unit of task use, a half budget goes to exactly the task's columns."""
    torch.manual_seed(0)
    d_in, d_out = 32, 8
    H = torch.eye(d_in)
    task_energy = torch.cat([torch.full((d_in // 2,), 100.0), torch.full((d_in // 2,), 0.01)])
    delta = 0.01 * torch.ones(d_out, d_in)                 # every column costs the same
    U = inverse_cholesky_upper(H)
    for scale in (1.0, 1e4):
        c_task = column_sensitivity(scale * torch.diag(task_energy))
        _, mask, _ = safe_delta(delta, U, relative_budget(0.5 + 1e-6), 2048, exclude_frac=0.0,
                                task_sensitivity=c_task)
        kept = mask.all(0)
        assert kept[: d_in // 2].all() and not kept[d_in // 2:].any()
    _, paper_mask, _ = safe_delta(delta, U, relative_budget(0.5 + 1e-6), 2048, exclude_frac=0.0)
    assert paper_mask.all(0).sum() == d_in // 2            # same budget, order by safety cost alone


def test_task_ranking_excludes_what_only_the_safety_data_uses():
    torch.manual_seed(1)
    d_in, d_out = 40, 6
    X = torch.randn(400, d_in)                               # safety inputs: every feature, similar scale
    H = 2 * X.T @ X / len(X)
    safety_only = torch.arange(d_in) % 5 == 0                # 8 features the task never touches
    X_task = torch.randn(400, d_in) * (~safety_only).float()
    U, c_task = inverse_cholesky_upper(H), column_sensitivity(2 * X_task.T @ X_task / len(X_task))
    delta = 0.01 * torch.randn(d_out, d_in)
    _, mask, _ = safe_delta(delta, U, math.inf, 2048, exclude_frac=0.2, task_sensitivity=c_task)
    assert not mask.all(0)[safety_only].any()               # the 20 % excluded = the safety-only ones
    assert mask.all(0)[~safety_only].all()


def test_task_sensitivities_share_vectors_where_layers_share_H():
    torch.manual_seed(2)
    X = torch.randn(100, 12)
    H, H2 = 2 * X.T @ X / 100, torch.eye(12) * 3
    sens = task_sensitivities({"q": H, "k": H, "o": H2})
    assert sens["q"] is sens["k"]
    torch.testing.assert_close(sens["q"], 1 / inverse_cholesky_upper(H).diagonal() ** 2)
    torch.testing.assert_close(sens["o"], 1 / inverse_cholesky_upper(H2).diagonal() ** 2)


@torch.no_grad()
def test_bf16_forward_passes_give_H_close_to_fp32():
    """H from bf16 autocast forward passes (fast on CPUs with native bf16) stays fp32 and within a few
    parts per thousand of the fp32 H; the selection it drives matches almost everywhere."""
    model = tiny_lora_model()
    names = list(lora_layers(model))
    exact = collect_hessians(model, names, calibration_batches(), precision="fp32")
    fast = collect_hessians(model, names, calibration_batches(), precision="bf16")
    for name in names:
        assert fast[name].dtype == torch.float32
        rel = (fast[name] - exact[name]).norm() / exact[name].norm()
        assert 0 < rel < 0.02, (name, rel)


# ----------------------------------------------------------------------------- automatic budget
def _search(values, limit, positions=None, start=1):
    calls = []

    def measure(i):
        calls.append(i)
        return values[i]

    chosen, measured = first_within(positions or list(range(len(values))), measure, limit, start)
    return chosen, measured, calls


def test_first_within_finds_the_first_passing_candidate_of_any_falling_sequence():
    rng = torch.Generator().manual_seed(0)
    bound = lambda n: 3 + 4 * math.ceil(math.log2(max(n - 1, 1)))     # 0 and start, then a halving per 4 steps
    for trial in range(300):
        n = int(torch.randint(1, 18, (), generator=rng))
        steps = torch.rand(n, generator=rng) ** 3 * (torch.rand(n, generator=rng) < 0.8)   # flat stretches too
        values = (1.0 - steps.cumsum(0) / max(steps.sum().item(), 1e-9) * 1.2).tolist()  # down to -0.2
        positions = [0.0] + sorted(torch.rand(n - 1, generator=rng).tolist())
        start = int(torch.randint(1, max(n, 2), (), generator=rng))
        for limit in (1.5, values[0], 0.5, 0.1, 0.0, -0.1, -1.0):
            chosen, measured, calls = _search(values, limit, positions, start)
            first = next((i for i, v in enumerate(values) if v <= limit), n - 1)
            assert chosen == first, (trial, values, limit)
            assert measured == {i: values[i] for i in calls} and len(calls) == len(set(calls))
            assert calls[:2] == [0, min(start, n - 1)][:len(calls)] and chosen in calls and len(calls) <= bound(n)
            if 0 < chosen and values[chosen] <= limit:                # the candidate before it was seen to fail
                assert chosen - 1 in measured and measured[chosen - 1] > limit
    assert first_within([0.0], lambda i: 5.0, 0.0) == (0, {0: 5.0})
    assert first_within([0.0, 1.0], lambda i: 5.0 - i, 0.0) == (1, {0: 5.0, 1: 4.0})


def test_first_within_needs_few_measurements_on_long_tailed_losses():
    """Loss rises measured on the embedded model (held-in rise against the fraction excluded; between
    the measured points, log-linear): the search from the whole delta and the 4 % rung finds the first
    passing rung in few checks, where a plain bisection of the ladder takes 6."""
    positions = [ladder_strength(*rung) for rung in AUTO_LADDER]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert AUTO_LADDER[AUTO_START] == (1.0, 0.04)
    measured = {"harmful mix": {0: .692, .005: .634, .1: .168, .15: .133, .2: .121, .25: .102, .3: .095, .4: .078,
                                .45: .06, .6: .01},
                "benign": {0: .171, .005: .167, .03: .104, .04: .089, .07: .068, .15: .049, .4: .03, .6: .01}}
    for name, curve in measured.items():
        xs = sorted(curve)
        values = [math.exp(float(np.interp(p, xs, [math.log(curve[x]) for x in xs]))) for p in positions]
        chosen, _, calls = _search(values, 0.1, positions, start=AUTO_START)
        assert chosen == next(i for i, v in enumerate(values) if v <= 0.1), name
        assert len(calls) <= 5, (name, calls)


def check_batches():
    torch.manual_seed(3)
    ids = torch.randint(0, 128, (4, 12))
    labels = ids.clone()
    labels[:, :8] = -100                                     # 8 prompt tokens, 4 answer tokens
    return [dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)]


@torch.no_grad()
def test_automatic_budget_climbs_the_ladder_until_the_measured_loss_is_within_tolerance(monkeypatch):
    monkeypatch.setenv("SAFESPACE_PRECISION", "fp32")       # apply_auto's "auto" precision = the test's
    model = tiny_lora_model()
    names = list(lora_layers(model))
    hessians = collect_hessians(model, names, calibration_batches())
    checks = check_batches()
    A_before = {n: l.lora_A["default"].weight.clone() for n, l in lora_layers(model).items()}
    base = answer_start_loss(model, checks, None, precision="fp32")["nll"].mean().item()
    tuned = answer_start_loss(model, checks, "default", precision="fp32")["nll"].mean().item()
    settings = SafeDeltaSettings(tolerance=math.inf)
    new_state, _, report = apply_auto(model, "default", hessians, settings, None, checks)
    assert report["chosen"] == 0 and report["met"] and len(report["rungs"]) == 1     # harmless: kept whole
    assert report["rungs"][0]["rise"] == pytest.approx(tuned - base, abs=1e-3)
    for name, (A_new, _) in new_state.items():
        torch.testing.assert_close(A_new, A_before[name], rtol=1e-4, atol=1e-5)

    rises = []                                               # every rung's rise, by its definition
    for keep, exclude in AUTO_LADDER:
        state, _ = apply_to_adapter(model, "default", hessians, SafeDeltaSettings(keep=keep, exclude_frac=exclude))
        with edited_lora(model, "default", state):
            rises.append(answer_start_loss(model, checks, "default", precision="fp32")["nll"].mean().item() - base)
    assert rises[-1] < rises[0]                              # the strongest defence lowers the loss

    _, _, never = apply_auto(model, "default", hessians, SafeDeltaSettings(tolerance=-1.0), None, checks)
    assert never["rungs"][never["chosen"]]["rung"] == len(AUTO_LADDER) - 1 and not never["met"]
    limit = (rises[0] + min(rises[1:])) / 2                  # between the whole delta and the best rung
    _, _, mid = apply_auto(model, "default", hessians, SafeDeltaSettings(tolerance=limit), None, checks)
    chosen = mid["rungs"][mid["chosen"]]
    assert mid["met"] and mid["rungs"][0]["rung"] == 0 and len(mid["rungs"]) < len(AUTO_LADDER)
    for rung in mid["rungs"]:                                # each measured rise is that rung's own
        if rung["rung"] is not None:
            assert rung["rise"] == pytest.approx(rises[rung["rung"]], abs=1e-3)
        else:                                                # a refined rung, between two rungs
            state, _ = apply_to_adapter(model, "default", hessians,
                                        SafeDeltaSettings(keep=rung["keep"], exclude_frac=rung["exclude_frac"]))
            with edited_lora(model, "default", state):
                alone = answer_start_loss(model, checks, "default", precision="fp32")["nll"].mean().item() - base
            assert rung["rise"] == pytest.approx(alone, abs=1e-3)
    assert chosen["rise"] <= limit
    before = mid["rungs"][mid["chosen"] - 1] if mid["chosen"] else None      # weaker defences come first
    assert chosen["rung"] == 0 or before["rise"] > limit                     # the one before it failed
    if chosen["rung"] is not None:                                           # a ladder rung: its neighbour
        assert chosen["rung"] <= 1 or before["rung"] == chosen["rung"] - 1
    for name, layer in lora_layers(model).items():            # the trained adapter is left as it was
        assert torch.equal(layer.lora_A["default"].weight, A_before[name])


@pytest.mark.parametrize("compensate", [True, False])
@pytest.mark.parametrize("budget", [relative_budget(0.3), relative_budget(math.inf), paper_budget(0.5)])
def test_sweep_in_lora_coordinates_equals_the_full_size_sweep(budget, compensate):
    for seed in range(4):
        X, H, W0, B, A = toy(20 + seed, lora_rank=3)
        scaling = 1.5
        U = inverse_cholesky_upper(H)
        c_task = column_sensitivity(H + torch.diag(torch.rand(D_IN))) if seed % 2 else None
        D, mask, full_stats = safe_delta(scaling * B @ A, U, budget, BLOCK, 0.15, compensate=compensate,
                                         task_sensitivity=c_task)
        A_new, kept, stats = safe_delta_lora(A, B, scaling, U, budget, BLOCK, 0.15, compensate, c_task)
        assert torch.equal(kept, mask.all(0)) and torch.equal(kept, mask.any(0))
        torch.testing.assert_close(scaling * B @ A_new, D, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(A_new, refactor_lora(B, D, scaling), rtol=1e-3, atol=1e-6)
        assert torch.equal(A_new[:, kept], A[:, kept])            # accepted columns are the trained A
        for key, value in full_stats.items():
            assert stats[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key


def test_refinement_excludes_the_first_whole_column_past_the_interpolated_crossing():
    from safespace.safedelta import _refined_rung
    at = lambda x: next(i for i, (keep, exclude) in enumerate(AUTO_LADDER) if keep == 1.0 and exclude == x)
    six, seven = at(0.06), at(0.07)
    # log-linear from 0.101 at 6 % (34 of 576 columns) to 0.074 at 7 % (40): 0.1 at 6.03 % -> 35 columns
    keep, x = _refined_rung(seven, {six: 0.101, seven: 0.074}, 0.1, {576})
    assert keep == 1.0 and math.floor(x * 576 + 1e-9) == 35
    assert 0.06 < x < 0.07
    # the crossing right at the passing rung: no whole column in between -> nothing to refine
    assert _refined_rung(seven, {six: 0.2, seven: 0.0999}, 0.1, {576}) is None
    assert _refined_rung(seven, {six: 0.101, seven: 0.074}, 0.1, {32}) is None     # 1 column apart
    assert _refined_rung(seven, {seven: 0.074}, 0.1, {576}) is None                # below not measured
    assert _refined_rung(0, {0: 0.05}, 0.1, {576}) is None                         # the whole delta passed
    assert _refined_rung(seven, {six: 0.3, seven: 0.2}, 0.1, {576}) is None        # none passed


def test_refinement_between_keep_rungs_takes_the_first_hundredth_past_the_crossing():
    from safespace.safedelta import _refined_rung
    at = lambda k: next(i for i, (keep, exclude) in enumerate(AUTO_LADDER) if keep == k and exclude == 0.4)
    eight, six = at(0.8), at(0.6)
    assert six == eight + 1
    # log(rise) linear in the keep given up: 0.081 at keep 0.8, 0.033 at 0.6 -> 0.08 at keep 0.797 -> 0.79
    assert _refined_rung(six, {eight: 0.081, six: 0.033}, 0.08, {576}) == (0.79, 0.4)
    # crossing halfway in log: 0.16 at 0.8, 0.04 at 0.6, limit 0.08 -> keep 0.7 exactly
    assert _refined_rung(six, {eight: 0.16, six: 0.04}, 0.08, {576}) == (0.7, 0.4)
    # the crossing within 0.01 of the passing rung: nothing strictly between
    assert _refined_rung(six, {eight: 0.5, six: 0.0801}, 0.08, {576}) is None
    assert _refined_rung(six, {eight: 0.2, six: 0.09}, 0.08, {576}) is None        # none passed
    first_keep = at(1.0)                                        # 40 % excluded, keep 1 -> keep 0.8
    assert first_keep + 1 == eight
    keep, x = _refined_rung(eight, {first_keep: 0.1, eight: 0.06}, 0.08, {576})
    assert 0.8 < keep < 1.0 and x == 0.4


@torch.no_grad()
def test_bf16_weights_made_once_give_the_autocast_results_and_come_back():
    from safespace import models
    model = tiny_lora_model()
    checks = check_batches()
    body = models.decoder_body(model)
    before = {n: p for n, p in model.named_parameters()}
    values = {n: p.detach().clone() for n, p in before.items()}
    expected = answer_start_loss(model, checks, "default", precision="bf16")
    with models.bf16_linear_weights(body):
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        got = answer_start_loss(model, checks, "default", precision="bf16")
    assert {n for n, d in dtypes.items() if d == torch.bfloat16} == {
        n for n in before if n.endswith(("proj.weight", "proj.base_layer.weight")) and "lora_" not in n}
    assert torch.equal(got["nll"], expected["nll"]) and torch.equal(got["agree"], expected["agree"])
    after = dict(model.named_parameters())
    assert all(after[n] is before[n] and torch.equal(after[n], values[n]) for n in before)

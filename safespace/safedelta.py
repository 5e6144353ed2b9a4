"""Safe Delta (Lu et al., ICML 2025): make a fine-tuning delta safe after training.

For each linear layer with input covariance H on safety calibration data (the aligned model's own
activations) and fine-tuning delta delta = W_ft - W0:

    H = (2/N) sum_n X_n X_n^T,  U = upper Cholesky factor of (H + lambda I)^-1
    c_m = 1 / U_mm^2                          sensitivity of input feature (column) m
    cost_rm = (W_ft - W)_rm^2 / U_mm^2        OBS estimate of the safety loss of keeping element rm

Per block of columns, the cheapest columns (c ascending, never the most sensitive 15 %) take their
fine-tuned values while the summed cost stays within a budget eps; every change is compensated on
the later columns with the Optimal Brain Surgeon update, as in SparseGPT:

    err = (W_j - q_j) / U_jj,   W_k -= err * U_jk  for k > j

The maths is translation invariant (it sees only W_ft - W), so it runs on D = W - W0 from 0 to
delta: the base weight, 4-bit or not, is never needed, and tiny LoRA deltas lose no precision.

Column order (ranking): the paper ranks columns by c_m alone (its utility proxy delta^2 cancels in
the utility/cost ratio), so the excluded 15 % are the input features most active on safety data,
whatever the task uses. On the embedded model those same features carry the task, and the compensation
moved onto them cancels the task as well: refusal 100 %, task accuracy 58 % of the undefended 100 %.
ranking="task" (default when the run's fine-tuning data is known) measures utility with the same OBS
estimate on the fine-tuning data itself, H_task from those rows: columns go in ascending order of
c_m / c_task_m, the safety cost per unit of task use, so the excluded and compensated columns are the
ones the safety data uses and the task does not. Scaling H or H_task leaves the order unchanged.

Budget rules (BudgetRule: (col_cost, c, d_out) -> eps for one block):
  paper_budget(s)     eps = (s/2) (d_out/4096) mean_block(c), the official rule. It is in absolute
                      units of delta^2 tuned for Llama-2-7B, so s must be re-tuned per model/regime.
  relative_budget(k)  eps = k * sum_block(cost): what is kept may carry at most a fraction k of the
                      estimated safety cost of the block's full delta. Scaling H, scaling delta or
                      changing d_out/d_in leaves the selection unchanged, so one k transfers across
                      model sizes and fine-tuning regimes. Default k = 0.9, measured on the embedded
                      model with the task ranking (demo run: aligned base 99.3 % refusal, undefended
                      0.7 % refusal / 98.1 % task accuracy; 150 harmful / 160 task prompts):
                      k 0.8 -> 98.7 % / 93.1 %, 0.9 -> 96.7 % / 94.4 %, 1.0 -> 95.3 % / 94.4 %.
                      An earlier run (60 / 80 prompts): k 0.5 -> 98 % / 71 %, 0.7 -> 98 % / 96 %.

Calibration tokens: the official code counts every token of the calibration sequences. Here H comes by
default from the inputs that write the aligned model's safe answer (the position after the prompt,
which decides to refuse, and the answer's own positions): the chat template and the prompt are shared
with every user task and carry no safety decision of their own (tokens="all" keeps the official
behaviour). The task H uses the same positions of the fine-tuning rows.

Budget 0 returns W0 exactly; an infinite budget with exclude_frac=0 returns W_ft exactly.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file

from . import models

BudgetRule = Callable[[torch.Tensor, torch.Tensor, int], float]


@contextmanager
def _exact_fp32():
    """TF32 matmuls lose ~3 decimal digits; OBS needs full fp32."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


# ----------------------------------------------------------------------------- maths
class HessianAccumulator:
    """Running H = (2/N) sum_n X_n X_n^T over N sequences (normalised per sequence, not per token)."""

    def __init__(self, d_in: int, device=None):
        self.H = torch.zeros(d_in, d_in, dtype=torch.float32, device=device)
        self.n_sequences = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor, n_sequences: int | None = None, mask: torch.Tensor | None = None):
        """x: [..., d_in], e.g. [batch, tokens, d_in]; mask: x.shape[:-1], False on padding.
        n_sequences defaults to the sequences with a token in the mask, else x.shape[0] for 3-D x, else 1."""
        if mask is not None:
            mask = mask.to(x.device).bool()
            if n_sequences is None:
                n_sequences = int(mask.reshape(-1, mask.shape[-1]).any(-1).sum()) if mask.dim() > 1 else int(mask.any())
            x = x[mask]
        elif n_sequences is None:
            n_sequences = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        if n_sequences == 0:
            return
        self.H *= self.n_sequences / (self.n_sequences + n_sequences)
        self.n_sequences += n_sequences
        x = math.sqrt(2 / self.n_sequences) * x
        with _exact_fp32():
            self.H += x.T @ x


def inverse_cholesky_upper(H: torch.Tensor, percdamp: float = 0.01, retries: int = 4) -> torch.Tensor:
    """U upper triangular with U^T U = (H + lambda I)^-1, lambda = percdamp * mean(diag H).
    Dead inputs (H_ii = 0) get H_ii = 1. If H is not positive definite, retry with 10x damping."""
    H = H.detach().to(torch.float32).clone()
    diag = H.diagonal()
    diag[diag == 0] = 1
    damp = percdamp * diag.mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    with _exact_fp32():
        for _ in range(retries + 1):
            L, info = torch.linalg.cholesky_ex(H + damp * eye)
            if info == 0:
                U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
                if info == 0 and torch.isfinite(U).all():
                    return U
            damp = damp * 10
    raise ValueError(f"Hessian is not positive definite even with damping {damp / 10:.3g}; "
                     "the calibration data may contain NaN/inf activations")


def paper_budget(scale: float) -> BudgetRule:
    """eps = (s/2) (d_out/4096) mean_block(c): the official rule (Llama-2-7B units)."""
    return lambda col_cost, c, d_out: scale / 2 * d_out / 4096 * c.mean().item()


def relative_budget(keep: float) -> BudgetRule:
    """eps = keep * (estimated safety cost of the block's full delta): scale-free."""
    return lambda col_cost, c, d_out: math.inf if keep == math.inf else keep * col_cost.sum().item()


def _obs_sweep(D, delta, U, mask, a, b, chunk=128) -> float:
    """Set D[mask] = delta[mask] in columns [a, b), one column at a time, with OBS compensation of
    every later column; chunks of columns pass their errors on lazily (one matmul per chunk).
    Returns sum(err^2): over all blocks this is tr(D (H+lambda I) D^T) exactly, since D = -Err U."""
    applied = 0.0
    for s in range(a, b, chunk):
        e = min(s + chunk, b)
        m = mask[:, s - a:e - a]
        cols = m.any(0).nonzero().flatten().tolist()     # elsewhere q = W, err = 0: nothing moves
        if not cols:
            continue
        Err = D.new_zeros(D.shape[0], e - s)
        for j in cols:
            k = s + j
            q = torch.where(m[:, j], delta[:, k], D[:, k])   # target: fine-tuned value if accepted
            err = (D[:, k] - q) / U[k, k]
            D[:, k] = q
            D[:, k + 1:e] -= err[:, None] * U[k, k + 1:e]     # W_l -= err U_kl, later l in the chunk
            Err[:, j] = err
        D[:, e:] -= Err @ U[s:e, e:]                          # ... and lazily for all later columns
        applied += Err.pow(2).sum().item()
    return applied


@torch.no_grad()
def safe_delta(delta: torch.Tensor, U: torch.Tensor, budget: float | BudgetRule, block_size: int = 2048,
               exclude_frac: float = 0.15, whole_columns: bool = True, compensate: bool = True,
               U_task: torch.Tensor | None = None):
    """Safe Delta in delta coordinates. delta = W_ft - W0 [d_out, d_in], U from inverse_cholesky_upper.
    budget: eps per block (a number) or a BudgetRule. Returns (D, mask, stats): W_final = W0 + D,
    with D[mask] == delta[mask] exactly. stats: kept_{columns,elements,energy}_frac (energy =
    ||delta||^2), cost_before (estimated cost of the full delta), cost_selected (of the accepted
    part, as selected) and cost_after (exact output change of D on the damped H, sum(err^2))."""
    rule = budget if callable(budget) else (lambda col_cost, c, d_out: float(budget))
    with _exact_fp32():
        delta = delta.detach().to(torch.float32)
        U = U.to(delta.device, torch.float32)
        d_out, d_in = delta.shape
        D = torch.zeros_like(delta)
        mask = torch.zeros(d_out, d_in, dtype=torch.bool, device=delta.device)
        c = 1 / U.diagonal().pow(2)                                # c_m = 1 / U_mm^2
        c_task = None if U_task is None else 1 / U_task.to(delta.device, torch.float32).diagonal().pow(2)
        cost_before = (delta.pow(2).sum(0) * c).sum().item()       # estimated cost of the full delta
        cost_selected = cost_after = 0.0
        for a in range(0, d_in, block_size):
            b = min(a + block_size, d_in)
            cost = (delta[:, a:b] - D[:, a:b]).pow(2) * c[a:b]      # (W_ft - W)^2 / U_mm^2, W current
            col_cost = cost.sum(0)
            eps = rule(col_cost, c[a:b], d_out)
            # least sensitive first; with task data, least safety cost per unit of task utility
            rank = c[a:b] if c_task is None else c[a:b] / c_task[a:b]
            order = torch.argsort(rank, stable=True)
            order = order[:(b - a) - math.floor(exclude_frac * (b - a) + 1e-9)]   # never the top 15 %
            cum = col_cost[order].cumsum(0)                         # costs >= 0: the fit is a prefix
            n_take = int((cum <= eps).sum()) if eps > 0 else 0
            m = mask[:, a:b]
            m[:, order[:n_take]] = True
            if not whole_columns and 0 < eps and n_take < len(order):   # official: one partial column
                j = order[n_take]
                spare = eps - (cum[n_take - 1].item() if n_take else 0.0)
                m[:, j] = cost[:, j].cumsum(0) <= spare
            cost_selected += cost[m].sum().item()
            if compensate:
                cost_after += _obs_sweep(D, delta, U, m, a, b)
            else:                                                   # ablation: mask only, no OBS update
                D[:, a:b][m] = delta[:, a:b][m]
        energy = delta.pow(2)
        stats = dict(d_out=d_out, d_in=d_in,
                     kept_columns_frac=mask.all(0).float().mean().item(),
                     kept_elements_frac=mask.float().mean().item(),
                     kept_energy_frac=(energy[mask].sum() / energy.sum().clamp_min(1e-30)).item(),
                     cost_before=cost_before, cost_selected=cost_selected, cost_after=cost_after)
    return D, mask, stats


def safe_delta_layer(W0, W_ft, U, budget, block_size=2048, exclude_frac=0.15, whole_columns=True):
    """Safe Delta on one weight matrix: returns (W_final, mask, stats); W_final[mask] == W_ft[mask]."""
    W0, W_ft = W0.to(torch.float32), W_ft.to(torch.float32)
    D, mask, stats = safe_delta(W_ft - W0, U, budget, block_size, exclude_frac, whole_columns)
    return torch.where(mask, W_ft, W0 + D), mask, stats


# With whole columns the result stays in span(B): if W - W0 = B M, an accepted column j is set to
# s B A_j, so err_j = B (M_j - s A_j) / U_jj is in span(B); every update adds err_j U_jk to a column,
# so W - W0 = B M' at every step, by induction. A partial column sets only some rows: not in span(B).
def refactor_lora(B: torch.Tensor, W_diff: torch.Tensor, scaling: float) -> torch.Tensor:
    """A' with scaling * B @ A' = W_diff (exact when W_diff lies in the column space of B)."""
    return (torch.linalg.pinv(B.double()) @ W_diff.double() / scaling).to(torch.float32)


def lora_residual(B, A_new, W_diff, scaling) -> float:
    """||W_diff - scaling B A'|| / ||W_diff|| (0 for a zero W_diff)."""
    norm = W_diff.double().norm().item()
    return 0.0 if norm == 0 else (W_diff.double() - scaling * B.double() @ A_new.double()).norm().item() / norm


# ----------------------------------------------------------------------------- model level
@dataclass
class SafeDeltaSettings:
    budget: str = "relative"    # "relative" (scale-free, default) | "paper"
    keep: float = 0.9           # relative: fraction of the full delta's estimated safety cost kept
    scale: float = 0.1          # paper: s
    exclude_frac: float = 0.15
    block_size: int = 2048
    percdamp: float = 0.01
    n_calibration: int = 128
    tokens: str = "answer"      # H from: "answer" = inputs that write the aligned answer | "all" (official)
    ranking: str = "task"       # column order: "task" = safety cost per unit of task use (needs the
                                # fine-tuning data) | "paper" = safety cost alone
    compensate: bool = True     # False: the paper's "no compensation" ablation (mask only)

    def __post_init__(self):
        if self.tokens not in ("answer", "all"):
            raise ValueError(f"Safe Delta tokens must be 'answer' or 'all', got {self.tokens!r}")
        if self.ranking not in ("task", "paper"):
            raise ValueError(f"Safe Delta ranking must be 'task' or 'paper', got {self.ranking!r}")

    def rule(self) -> BudgetRule:
        if self.budget == "relative":
            return relative_budget(self.keep)
        if self.budget == "paper":
            return paper_budget(self.scale)
        raise ValueError(f"unknown Safe Delta budget {self.budget!r}; use 'relative' or 'paper'")


def lora_layers(model, adapter_name: str = "default") -> dict:
    """{module name: peft LoraLayer} for the layers that carry `adapter_name`."""
    from peft.tuners.lora import LoraLayer
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A}


@torch.no_grad()
def collect_hessians(model, layer_names: Iterable[str], batches: Iterable[dict], device=None) -> dict:
    """H of the base Linear of each named LoRA layer, from the model with its adapter disabled.
    batches: dicts with input_ids, optionally attention_mask (padding is excluded) and token_mask
    (the positions whose inputs count towards H; default: every non-padding token).
    device: where inputs and H go; the model's device by default.
    Layers fed the very same input tensor (q/k/v, gate/up) share one accumulator."""
    device = device or next(model.parameters()).device
    modules = dict(model.named_modules())
    current = {"mask": None, "parent": None, "seen": []}
    accumulators, handles, owner = {}, [], {}

    def hook(name):
        parent = name.rsplit(".", 1)[0]
        def add(mod, args):
            x = args[0]
            if parent != current["parent"]:        # only siblings (q/k/v, gate/up) can share an input;
                current.update(parent=parent, seen=[])   # holding x keeps its memory from being reused
            first = next((other for other, seen_x in current["seen"] if seen_x is x), None)
            if first is None:
                current["seen"].append((name, x))
            elif first != name:                    # the very same input tensor: share its H
                owner.setdefault(name, first)
            if owner.get(name, name) == name:
                accumulators[name].add_batch(x, mask=current["mask"])
        return add

    for name in layer_names:
        base = getattr(modules[name], "base_layer", modules[name])   # nn.Linear or bnb Linear4bit
        accumulators[name] = HessianAccumulator(base.in_features, device)
        handles.append(base.register_forward_pre_hook(hook(name)))
    body = models.decoder_body(model)   # H needs the Linear inputs, never the vocabulary logits
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
            for batch in batches:
                input_ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
                token_mask = batch.get("token_mask")
                current.update(mask=mask if token_mask is None else token_mask.to(device), parent=None, seen=[])
                body(input_ids=input_ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: accumulators[owner.get(name, name)].H for name in accumulators}


@torch.no_grad()
def apply_to_adapter(model, adapter_name: str, hessians: dict, settings: SafeDeltaSettings = SafeDeltaSettings(),
                     task_hessians: dict | None = None):
    """Safe Delta on every LoRA layer of the adapter. Returns ({name: (A', B)}, [stats per layer]);
    (B, A') on the same base reproduces W_final - W0. Layers without the adapter are not touched."""
    rule = settings.rule()
    new_state, all_stats = {}, []
    factors = {}     # layers that share one H (q/k/v, gate/up) share its factor U

    def factor(H, device):
        if id(H) not in factors:      # H itself is kept in the entry, so its id stays unique
            factors[id(H)] = (H, inverse_cholesky_upper(H.to(device, torch.float32), settings.percdamp))
        return factors[id(H)][1]

    for name, layer in lora_layers(model, adapter_name).items():
        if layer.use_dora.get(adapter_name):
            raise ValueError(f"{name}: DoRA adapters are not supported by Safe Delta")
        if name not in hessians:
            raise KeyError(f"no Hessian for LoRA layer {name}")
        A = layer.lora_A[adapter_name].weight.float()
        B = layer.lora_B[adapter_name].weight.float()
        scaling = float(layer.scaling[adapter_name])
        delta = scaling * B @ A                                  # W_ft - W0 of this layer
        H = hessians[name].to(A.device, torch.float32)
        U = factor(hessians[name], A.device)
        U_task = None if task_hessians is None else factor(task_hessians[name], A.device)
        D, _, stats = safe_delta(delta, U, rule, settings.block_size, settings.exclude_frac,
                                 compensate=settings.compensate, U_task=U_task)
        A_new = refactor_lora(B, D, scaling)
        with _exact_fp32():
            full = (delta @ H * delta).sum().item()                # ||delta X||^2 on calibration data
            kept = (D @ H * D).sum().item()
        stats.update(name=name, lora_residual=lora_residual(B, A_new, D, scaling),
                     output_change_ratio=kept / full if full > 0 else 0.0)
        new_state[name] = (A_new, B)
        all_stats.append(stats)
    return new_state, all_stats


def edited_adapter_state(model, adapter_name: str, new_lora_state: dict) -> dict:
    """A copy of the adapter's peft state dict (`<module>.lora_A.weight` ...) with A replaced by A'."""
    from peft import get_peft_model_state_dict
    state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    for name, (A_new, _) in new_lora_state.items():
        key = f"{name}.lora_A.weight"
        if key not in state:
            raise KeyError(f"{key} is not in adapter {adapter_name!r}")
        state[key] = A_new.detach().to("cpu", state[key].dtype).contiguous()
    return state


def save_adapter(model, adapter_name: str, new_lora_state: dict, out_dir) -> Path:
    """Write a standard PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.peft_config[adapter_name].save_pretrained(str(out))
    save_file(edited_adapter_state(model, adapter_name, new_lora_state), str(out / "adapter_model.safetensors"))
    return out


def hessian_cache_key(model_id: str, calibration_texts: list[str], settings: SafeDeltaSettings) -> str:
    """sha256 of what H depends on; model_id must name the base weights and their quantisation."""
    payload = {"format": 1, "model": model_id, "texts": list(calibration_texts), "n": settings.n_calibration}
    if settings.tokens != "all":
        payload["tokens"] = settings.tokens
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def save_hessians(path, hessians: dict) -> None:
    """safetensors file (never pickle); layers that share one H are stored once, with aliases."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unique, aliases, by_ptr = {}, {}, {}
    for name, H in hessians.items():
        first = by_ptr.setdefault(H.data_ptr(), name)
        if first == name:
            unique[name] = H.detach().to("cpu", torch.float32).contiguous()
        else:
            aliases[name] = first
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(unique, str(tmp), metadata={"content": "safespace-hessians", "format": "2",
                                          "aliases": json.dumps(aliases)})
    os.replace(tmp, path)


def load_hessians(path, device="cpu") -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
        hessians = {name: handle.get_tensor(name) for name in handle.keys()}
    hessians.update({name: hessians[first] for name, first in aliases.items()})
    return hessians

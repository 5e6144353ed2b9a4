"""Safe Delta (Lu et al., ICML 2025): make a fine-tuning delta safe after training.

For each linear layer with input covariance H on safety calibration data (the aligned model's own
activations) and fine-tuning delta delta = W_ft - W0:

    H = (2/N) sum_n X_n X_n^T,  U = upper Cholesky factor of (H + lambda I)^-1
    c_m = 1 / U_mm^2                          sensitivity of input feature (column) m
    cost_rm = (W_ft - W)_rm^2 / U_mm^2        OBS estimate of the safety loss of keeping element rm

Per block of columns, the cheapest columns (never the most sensitive `exclude_frac`) take their
fine-tuned values while the summed cost stays within a budget eps; every change is compensated on
the later columns with the Optimal Brain Surgeon update, as in SparseGPT:

    err = (W_j - q_j) / U_jj,   W_k -= err * U_jk  for k > j

The sweep runs on D = W - W0 (translation invariant: the base, 4-bit or not, is never needed) and,
with whole columns, on the LoRA factor itself (D = s B M: r rows instead of d_out).
Column order, budget rules, the automatic budget and the calibration tokens, each with the
measurement behind its default: docs/safedelta.md.
Budget 0 returns W0 exactly; an infinite budget with exclude_frac=0 returns W_ft exactly.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import save_file

from . import models
from .config import SAFE_DELTA_TOLERANCE

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
    def add_batch(self, x: torch.Tensor, n_sequences: int | None = None, mask: torch.Tensor | None = None,
                  weight: torch.Tensor | None = None):
        """x: [..., d_in], e.g. [batch, tokens, d_in]; mask: x.shape[:-1], False on padding; weight:
        x.shape[:-1], how many times each token counts (a prefix that many rows share, run once).
        n_sequences defaults to the sequences with a token in the mask, else x.shape[0] for 3-D x, else 1;
        0 adds tokens to sequences already counted."""
        if weight is not None:
            x = x.float() * weight.to(x.device, torch.float32).sqrt().unsqueeze(-1)
        if mask is not None:
            mask = mask.to(x.device).bool()
            if n_sequences is None:
                n_sequences = int(mask.reshape(-1, mask.shape[-1]).any(-1).sum()) if mask.dim() > 1 else int(mask.any())
            x = x[mask]
        elif n_sequences is None:
            n_sequences = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        if self.n_sequences + n_sequences == 0:
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


def column_sensitivity(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """c_m = 1 / U_mm^2 for every input feature m: the OBS price of moving column m on data with this H."""
    return 1 / inverse_cholesky_upper(H, percdamp).diagonal().pow(2)


def paper_budget(scale: float) -> BudgetRule:
    """eps = (s/2) (d_out/4096) mean_block(c): the official rule (Llama-2-7B units)."""
    return lambda col_cost, c, d_out: scale / 2 * d_out / 4096 * c.mean().item()


def relative_budget(keep: float) -> BudgetRule:
    """eps = keep * (estimated safety cost of the block's full delta): scale-free."""
    return lambda col_cost, c, d_out: math.inf if keep == math.inf else keep * col_cost.sum().item()


def _obs_columns(D, delta, U, cols: torch.Tensor, a: int, G: torch.Tensor | None = None) -> float:
    """_obs_sweep for whole accepted columns `cols` (ascending, absolute indices), in closed form.
    Sequentially, err_k = (D_k - delta_k - sum_{j<k in cols} err_j U_jk) / U_kk, i.e. Err U[cols, cols]
    = D[:, cols] - delta[:, cols] with U[cols, cols] upper triangular: one triangular solve instead
    of a Python loop over columns. Every column from a on then moves by -Err U[cols, l] (U is upper
    triangular, so only accepted columns before l reach it), and the accepted ones land on delta.
    Returns sum(err^2), measured as err^T G err per column when the rows are coordinates in a basis
    with Gram matrix G (safe_delta_lora), as plain squares otherwise."""
    if cols.numel() == 0:
        return 0.0
    Err = torch.linalg.solve_triangular(U[cols][:, cols], D[:, cols] - delta[:, cols], upper=True, left=False)
    D[:, a:] -= Err @ U[cols, a:]
    D[:, cols] = delta[:, cols]                # exact, free of rounding
    return (Err * (Err if G is None else G @ Err)).sum().item()


def excluded_columns(exclude_frac: float, n_columns: int) -> int:
    """How many of a block's n_columns the exclusion leaves out: whole columns, rounded down."""
    return math.floor(exclude_frac * n_columns + 1e-9)


def _take_columns(col_cost, c, c_task, eps: float, exclude_frac: float):
    """The block's columns in rank order (least sensitive first; with task data, least safety cost per
    unit of task utility), the most sensitive exclude_frac cut off; their cumulative cost; and how many
    of them (a prefix: costs are >= 0) fit within eps."""
    rank = c if c_task is None else c / c_task
    order = torch.argsort(rank, stable=True)
    order = order[:len(order) - excluded_columns(exclude_frac, len(order))]     # never the top 15 %
    cum = col_cost[order].cumsum(0)
    return order, cum, int((cum <= eps).sum()) if eps > 0 else 0


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
               task_sensitivity: torch.Tensor | None = None):
    """Safe Delta in delta coordinates. delta = W_ft - W0 [d_out, d_in], U from inverse_cholesky_upper.
    budget: eps per block (a number) or a BudgetRule. task_sensitivity: c_task [d_in] from
    column_sensitivity(H_task), to rank columns by c / c_task (None: by c alone). Returns (D, mask, stats): W_final = W0 + D,
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
        c_task = None if task_sensitivity is None else task_sensitivity.to(delta.device, torch.float32)
        cost_before = (delta.pow(2).sum(0) * c).sum().item()       # estimated cost of the full delta
        cost_selected = cost_after = 0.0
        for a in range(0, d_in, block_size):
            b = min(a + block_size, d_in)
            cost = (delta[:, a:b] - D[:, a:b]).pow(2) * c[a:b]      # (W_ft - W)^2 / U_mm^2, W current
            col_cost = cost.sum(0)
            eps = rule(col_cost, c[a:b], d_out)
            order, cum, n_take = _take_columns(col_cost, c[a:b], None if c_task is None else c_task[a:b],
                                               eps, exclude_frac)
            m = mask[:, a:b]
            m[:, order[:n_take]] = True
            if not whole_columns and 0 < eps and n_take < len(order):   # official: one partial column
                j = order[n_take]
                spare = eps - (cum[n_take - 1].item() if n_take else 0.0)
                m[:, j] = cost[:, j].cumsum(0) <= spare
            cost_selected += cost[m].sum().item()
            if compensate and whole_columns:
                cost_after += _obs_columns(D, delta, U, a + order[:n_take].sort().values, a)
            elif compensate:
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


# With whole columns the result stays in span(B): if W - W0 = B M, an accepted column j is set to
# s B A_j, so err_j = B (M_j - s A_j) / U_jj is in span(B); every update adds err_j U_jk to a column,
# so W - W0 = B M' at every step, by induction. A partial column sets only some rows: not in span(B).
# So safe_delta_lora can run the sweep on M itself, and its result is again a rank-r adapter.
@torch.no_grad()
def safe_delta_lora(A: torch.Tensor, B: torch.Tensor, scaling: float, U: torch.Tensor, budget: float | BudgetRule,
                    block_size: int = 2048, exclude_frac: float = 0.15, compensate: bool = True,
                    task_sensitivity: torch.Tensor | None = None):
    """safe_delta (whole columns) of delta = scaling B A, in the adapter's own coordinates: every D the
    sweep visits is scaling B M (see the note above), so it runs on M [r, d_in] instead of D
    [d_out, d_in], with G = scaling^2 B^T B measuring squares (||scaling B m||^2 = m^T G m). Returns
    (A', kept [d_in], stats): W_final - W0 = scaling B A' by construction, and the same selection and
    stats as safe_delta on the full delta, at r/d_out of its cost."""
    rule = budget if callable(budget) else (lambda col_cost, c, d_out: float(budget))
    with _exact_fp32():
        A, B = A.detach().to(torch.float32), B.detach().to(torch.float32)
        U = U.to(A.device, torch.float32)
        d_in = A.shape[1]
        G = scaling ** 2 * (B.T @ B)
        M = torch.zeros_like(A)
        kept = torch.zeros(d_in, dtype=torch.bool, device=A.device)
        c = 1 / U.diagonal().pow(2)
        c_task = None if task_sensitivity is None else task_sensitivity.to(A.device, torch.float32)
        energy = ((G @ A) * A).sum(0)                              # ||delta_m||^2 per column
        cost_before = (energy * c).sum().item()
        cost_selected = cost_after = 0.0
        for a in range(0, d_in, block_size):
            b = min(a + block_size, d_in)
            R = A[:, a:b] - M[:, a:b]
            col_cost = ((G @ R) * R).sum(0) * c[a:b]                # sum_r (W_ft - W)_rm^2 / U_mm^2
            order, _, n_take = _take_columns(col_cost, c[a:b], None if c_task is None else c_task[a:b],
                                             rule(col_cost, c[a:b], B.shape[0]), exclude_frac)
            cols = a + order[:n_take].sort().values
            kept[cols] = True
            cost_selected += col_cost[order[:n_take]].sum().item()
            if compensate:
                cost_after += _obs_columns(M, A, U, cols, a, G)
            else:
                M[:, cols] = A[:, cols]
        kept_frac = kept.float().mean().item()
        stats = dict(d_out=B.shape[0], d_in=d_in, kept_columns_frac=kept_frac, kept_elements_frac=kept_frac,
                     kept_energy_frac=(energy[kept].sum() / energy.sum().clamp_min(1e-30)).item(),
                     cost_before=cost_before, cost_selected=cost_selected, cost_after=cost_after)
    return M, kept, stats


# ----------------------------------------------------------------------------- model level
@dataclass
class SafeDeltaSettings:
    budget: str = "auto"        # "auto" (measured, default) | "relative" (one keep) | "paper" (s)
    keep: float = 0.9           # relative: fraction of the full delta's estimated safety cost kept
    scale: float = 0.1          # paper: s
    exclude_frac: float = 0.15
    block_size: int = 2048
    percdamp: float = 0.01
    n_calibration: int = 128
    n_task: int = 64            # fine-tuning rows for the task ranking's H_task
    tokens: str = "answer"      # H from: "answer" = inputs that write the aligned answer | "all" (official)
    ranking: str = "task"       # column order: "task" = safety cost per unit of task use (needs the
                                # fine-tuning data) | "paper" = safety cost alone
    compensate: bool = True     # False: the paper's "no compensation" ablation (mask only)
    # auto: the first rung of AUTO_LADDER whose held-in safety loss rises by at most `tolerance`
    tolerance: float = SAFE_DELTA_TOLERANCE   # nats per answer token over the first check_tokens
    check_rows: int = 32        # held-in calibration rows the safety loss is measured on
    check_tokens: int = 8

    def __post_init__(self):
        if self.tokens not in ("answer", "all"):
            raise ValueError(f"Safe Delta tokens must be 'answer' or 'all', got {self.tokens!r}")
        if self.ranking not in ("task", "paper"):
            raise ValueError(f"Safe Delta ranking must be 'task' or 'paper', got {self.ranking!r}")
        if self.budget not in ("auto", "relative", "paper"):
            raise ValueError(f"unknown Safe Delta budget {self.budget!r}; use 'auto', 'relative' or 'paper'")

    @classmethod
    def for_budget(cls, keep: float | None = None, scale: float | None = None, tolerance: float | None = None,
                   **others) -> "SafeDeltaSettings":
        """Settings from one budget: scale (the paper's rule), keep (relative), else automatic."""
        if keep is not None and not 0 < keep <= 1:     # inside, 0 and inf are the base and the whole delta
            raise ValueError(f"keep must be in (0, 1] (the share of the full update's estimated safety cost kept), "
                             f"got {keep}")
        if tolerance is not None and not 0 <= tolerance < math.inf:
            raise ValueError(f"tolerance must be >= 0 (nats per answer token the held-in safety loss may rise), "
                             f"got {tolerance}")
        if scale is not None and not 0 < scale < math.inf:
            raise ValueError(f"scale must be > 0 (the paper's budget scale s), got {scale}")
        budget = (dict(budget="paper", scale=scale) if scale is not None else
                  dict(budget="relative", keep=keep) if keep is not None else
                  dict(budget="auto", tolerance=tolerance) if tolerance is not None else {})
        return cls(**budget, **others)

    def rule(self) -> BudgetRule:
        if self.budget == "paper":
            return paper_budget(self.scale)
        return relative_budget(self.keep)      # auto: each rung is a relative budget


# Rungs of the automatic budget, least defence first: (keep, exclude_frac). The first keeps the whole
# delta; then ever more of the most safety-sensitive columns are excluded (0.5 % of 576 columns is 2),
# then ever less estimated cost is kept. On the embedded model a harmful-mix fine-tune needed 26.7 %
# excluded and a benign one 3.3 % (refusal / task accuracy, 150 / 160 prompts: 0.7 % / 98.1 % ->
# 93.3 % / 98.1 %, and 88.0 % / 99.4 % -> 94.0 % / 99.4 %).
AUTO_LADDER = ((math.inf, 0.0),
               *((1.0, x) for x in (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.15, 0.2, 0.25,
                                    0.3, 0.4)),
               *((k, 0.4) for k in (0.8, 0.6, 0.4, 0.2)))


# The first probe after the whole delta: 4 %, near the geometric middle of the exclusion rungs
# (sqrt(0.5 % x 40 %) = 4.5 %). A benign fine-tune of the embedded model needed 3.3 %, a harmful-mix one 26.7 %.
AUTO_START = AUTO_LADDER.index((1.0, 0.04))


def ladder_strength(keep: float, exclude_frac: float) -> float:
    """Where a rung sits for the search's guesses (first_within): its excluded fraction, plus a quarter
    of the keep given up. It orders the rungs and shapes the guesses; which rung is chosen does not
    depend on it."""
    return exclude_frac + (1 - min(keep, 1.0)) / 4


def first_within(positions: list[float], measure: Callable[[int], float], limit: float,
                 start: int = 1) -> tuple[int, dict]:
    """The first candidate whose measured value is <= limit, for values that fall along the candidates
    (positions: increasing, >= 0, one per candidate). Candidate 0 first (a harmless fine-tune stops
    there), then `start` (the caller's best first probe); then a bracket [last failing, first passing]
    shrinks until they are neighbours. Each guess is where the line through two measured points
    crosses log(limit), with log(value) against log(position) where both positions are > 0 (a power
    law) and against position otherwise. The loss falls steeply, then slowly (the embedded model's
    harmful-mix run: rise 0.69, 0.63, 0.13, 0.12, 0.10, 0.095 at 0, 0.5, 15, 20, 25, 30 % excluded), which
    a power law follows and an exponential undershoots. After three guesses in a row that did not halve
    the bracket comes a bisection, so bad guesses cost little. Returns its index (the last candidate
    when none is within the limit) and {index: value} of those measured, in order."""
    n = len(positions)
    values: dict[int, float] = {}

    def value(i: int) -> float:
        if i not in values:
            values[i] = measure(i)
        return values[i]

    if value(0) <= limit or n == 1:                      # the whole delta
        return 0, values
    lo, hi, hi_known, slow = 0, n - 1, False, 0
    first = min(max(start, 1), n - 1)
    if value(first) <= limit:
        hi, hi_known = first, True
    else:
        lo = first
    while hi - lo > 1:
        other = hi if hi_known else max(k for k in values if k < lo)    # extrapolate from the failing side
        guess = None if slow >= 3 else _crossing(positions, values, lo, other, limit)
        if guess is None:
            mid = (lo + hi) // 2
        else:
            mid = min(max(guess, lo + 1), hi - 1 if hi_known else hi)
        width = hi - lo
        if value(mid) <= limit:
            hi, hi_known = mid, True
        else:
            lo = mid
        slow = slow + 1 if guess is not None and 2 * (hi - lo) > width else 0
    value(hi)                                  # the answer is always measured, also when none is within
    return hi, values


def _crossing(positions: list[float], values: dict, i: int, j: int, limit: float) -> int | None:
    """The first candidate at or past where the line through candidates i and j (log value against
    log position, or against position when one of them is 0) reaches log(limit); None when that line
    does not fall or the limit is not positive."""
    if limit <= 0:
        return None
    power = min(positions[i], positions[j]) > 0
    at = (lambda k: math.log(positions[k])) if power else (lambda k: positions[k])
    x = _log_crossing(at(i), values[i], at(j), values[j], limit)
    if x is None:
        return None
    x = math.exp(min(x, math.log(positions[-1]) + 1)) if power else x      # past the last: the last
    return next((k for k, position in enumerate(positions) if position >= x * (1 - 1e-9)), len(positions) - 1)


def _log_crossing(x_i: float, value_i: float, x_j: float, value_j: float, limit: float) -> float | None:
    """Where the line through (x_i, log value_i) and (x_j, log value_j) reaches log(limit) (limit > 0);
    None when it does not fall. A passing value may be ~0 or below: its log is capped at limit / 1000."""
    floor = limit / 1000
    y_i, y_j = math.log(max(value_i, floor)), math.log(max(value_j, floor))
    if x_i == x_j or (y_j - y_i) / (x_j - x_i) >= 0:
        return None
    return x_i + (math.log(limit) - y_i) * (x_j - x_i) / (y_j - y_i)


def lora_layers(model, adapter_name: str = "default") -> dict:
    """{module name: peft LoraLayer} for the layers that carry `adapter_name`."""
    from peft.tuners.lora import LoraLayer
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A}


@torch.no_grad()
def collect_hessians(model, layer_names: Iterable[str], batches: Iterable[dict], device=None,
                     precision: str | None = "fp32", share_prefix: bool = True) -> dict:
    """H of the base Linear of each named LoRA layer, from the model with its adapter disabled.
    batches: dicts with input_ids, optionally attention_mask (padding is excluded) and token_mask
    (the positions whose inputs count towards H; default: every non-padding token).
    device: where inputs and H go; the model's device by default. precision: of the forward passes,
    as models.autocast ("auto": bf16 on a CPU with native bf16); H always accumulates in fp32.
    Layers fed the very same input tensor (q/k/v, gate/up) share one accumulator. share_prefix:
    leading tokens that every row shares (a chat template and its system prompt) run once, as a cache
    (models.prefix_cache), their inputs counted once for each row whose token_mask holds them."""
    device = device or next(model.parameters()).device
    modules = dict(model.named_modules())
    current = {"add": {}, "parent": None, "seen": []}     # add: how the inputs of this pass count (add_batch)
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
                accumulators[name].add_batch(x, **current["add"])
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
                token_mask = mask if batch.get("token_mask") is None else batch["token_mask"].to(device)
                shared = models.shared_prefix(input_ids, mask) if share_prefix else 0
                rows = int(token_mask.bool().any(1).sum())
                with models.autocast(device, precision):   # the prefix's inputs, once, count for each row that wants them
                    current.update(add={"n_sequences": rows, "weight": token_mask[:, :shared].sum(0, keepdim=True)},
                                   parent=None, seen=[])
                    cache = models.prefix_cache(body, input_ids, shared) if shared else None
                    current.update(add={"n_sequences": 0 if shared else None, "mask": token_mask[:, shared:]},
                                   parent=None, seen=[])
                    body(input_ids=input_ids[:, shared:], attention_mask=mask, past_key_values=cache,
                         use_cache=cache is not None)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: accumulators[owner.get(name, name)].H for name in accumulators}


def task_sensitivities(hessians: dict, percdamp: float = 0.01) -> dict:
    """{name: c_task} from task Hessians; layers that share one H share one vector."""
    by_id = {}
    for H in hessians.values():
        if id(H) not in by_id:
            by_id[id(H)] = column_sensitivity(H, percdamp)
    return {name: by_id[id(H)] for name, H in hessians.items()}


@torch.no_grad()
def apply_to_adapter(model, adapter_name: str, hessians: dict, settings: SafeDeltaSettings = SafeDeltaSettings(),
                     task_sensitivity: dict | None = None, factors: dict | None = None):
    """Safe Delta on every LoRA layer of the adapter. Returns ({name: (A', B)}, [stats per layer]);
    (B, A') on the same base reproduces W_final - W0. Layers without the adapter are not touched.
    task_sensitivity: {name: c_task} (see task_sensitivities) for the task ranking; None: paper ranking.
    factors: a dict to keep the factors U in between calls on the same hessians (one is made per call)."""
    rule = settings.rule()
    new_state, all_stats = {}, []
    factors = {} if factors is None else factors   # layers that share one H (q/k/v, gate/up) share U

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
        U = factor(hessians[name], A.device)
        c_task = None if task_sensitivity is None else task_sensitivity[name]
        A_new, _, stats = safe_delta_lora(A, B, scaling, U, rule, settings.block_size, settings.exclude_frac,
                                          settings.compensate, c_task)
        H = hessians[name].to(A.device, torch.float32)
        with _exact_fp32():                        # ||D X||^2 on calibration data = tr(G M H M^T)
            G = B.T @ B
            full = ((A @ H @ A.T) * G).sum().item()
            kept = ((A_new @ H @ A_new.T) * G).sum().item()
        stats.update(name=name, output_change_ratio=kept / full if full > 0 else 0.0)
        new_state[name] = (A_new, B)
        all_stats.append(stats)
    return new_state, all_stats


@contextmanager
def edited_lora(model, adapter_name: str, new_lora_state: dict | None):
    """Within the block the adapter applies A' (new_lora_state, as apply_to_adapter returns it);
    None leaves it as trained. The trained A comes back afterwards, also on error."""
    layers, saved = lora_layers(model, adapter_name), {}
    try:
        for name, (A_new, _) in (new_lora_state or {}).items():
            weight = layers[name].lora_A[adapter_name].weight
            saved[name] = weight.detach().clone()
            weight.data.copy_(A_new.to(weight.device, weight.dtype))
        yield model
    finally:
        for name, A in saved.items():
            layers[name].lora_A[adapter_name].weight.data.copy_(A)


@torch.no_grad()
def answer_start_loss(model, batches: Iterable[dict], adapter_name: str | None, precision: str | None = "auto") -> dict:
    """Held-in safety loss: teacher-forced on (harmful prompt, the aligned model's own answer) rows,
    cut to the answer's first tokens, where the model decides to refuse. Returns per-row tensors
    nll (mean over the row's answer tokens, nats) and agree (the first answer token is the model's
    greedy choice). adapter_name None: the aligned model (adapter disabled)."""
    from . import safegrad    # the same answer-position logits as training

    was_training = model.training
    model.eval()
    nll, agree = [], []
    context = model.disable_adapter() if adapter_name is None else nullcontext()
    try:
        if adapter_name is not None:
            model.set_adapter(adapter_name)
        with context:
            for batch in batches:
                mask = safegrad.answer_mask(batch["labels"])
                with models.autocast(batch["input_ids"].device, precision):
                    logits = safegrad.answer_logits(model, batch, share_prefix=True).float()
                target = batch["labels"][:, 1:][mask]
                token_nll = torch.nn.functional.cross_entropy(logits, target, reduction="none")
                nll.append(safegrad.row_means(token_nll, mask).cpu())
                first = (mask.cumsum(1) == 1) & mask               # the first answer position of each row
                agree.append((logits.argmax(-1) == target)[first[mask]].cpu())
    finally:
        model.train(was_training)
    return {"nll": torch.cat(nll), "agree": torch.cat(agree)}


@torch.no_grad()
def apply_auto(model, adapter_name: str, hessians: dict, settings: SafeDeltaSettings, task_sensitivity: dict | None,
               check_batches: list, on_rung: Callable[[dict], None] | None = None, base: dict | None = None):
    """Safe Delta with the budget chosen from a measured safety loss: the first rung of AUTO_LADDER
    (whole delta first, then a guided search towards the strongest defence) whose held-in safety loss
    (answer_start_loss on check_batches) is at most settings.tolerance above the aligned model's.
    A fine-tune that did not move the safety loss keeps everything; an attack gets the defence it
    needs. Returns (new_state, stats, report) as apply_to_adapter; report["rungs"] = the rungs
    measured, weakest defence first (a rung between two ladder rungs, "rung": None, is the refinement
    of _refined_rung), report["chosen"] = the position of the one taken in that list.
    base: the aligned model's answer_start_loss on check_batches, when it is known already."""
    base = base or answer_start_loss(model, check_batches, None)
    base_loss = base["nll"].mean().item()
    trail, results, factors = [], {}, {}

    def measure(keep: float, exclude: float, rung: int | None) -> dict:
        settings_here = replace(settings, budget="relative", keep=keep, exclude_frac=exclude)
        results[rung] = apply_to_adapter(model, adapter_name, hessians, settings_here, task_sensitivity, factors)
        with edited_lora(model, adapter_name, results[rung][0]):
            loss = answer_start_loss(model, check_batches, adapter_name)
        layer_stats = results[rung][1]
        step = {"rung": rung, "keep": None if keep == math.inf else keep,       # None: the whole delta
                "exclude_frac": exclude, "loss": loss["nll"].mean().item(),
                "first_token_agreement": loss["agree"].float().mean().item(),
                "kept_energy_frac": sum(s["kept_energy_frac"] for s in layer_stats) / max(len(layer_stats), 1)}
        step["rise"] = step["loss"] - base_loss
        trail.append(step)
        if on_rung:
            on_rung(step)
        return step

    positions = [ladder_strength(*rung) for rung in AUTO_LADDER]
    device = next(model.parameters()).device
    with models.bf16_linear_weights(models.decoder_body(model), models.cpu_bf16(device)):   # cast once
        chosen, values = first_within(positions, lambda i: measure(*AUTO_LADDER[i], i)["rise"],
                                      settings.tolerance, start=AUTO_START)
        between = _refined_rung(chosen, values, settings.tolerance, {H.shape[0] for H in hessians.values()})
        if between is not None and measure(*between, None)["rise"] <= settings.tolerance:
            chosen = None
    trail.sort(key=lambda step: ladder_strength(math.inf if step["keep"] is None else step["keep"],
                                                step["exclude_frac"]))
    at = next(i for i, step in enumerate(trail) if step["rung"] == chosen)
    report = {"base_loss": base_loss, "base_first_token_agreement": base["agree"].float().mean().item(),
              "tolerance": settings.tolerance, "rungs": trail, "chosen": at,
              "met": trail[at]["rise"] <= settings.tolerance}
    new_state, stats = results[chosen]
    return new_state, stats, report


def _refined_rung(chosen: int, values: dict, limit: float, widths: set) -> tuple[float, float] | None:
    """Between two neighbouring rungs, the last failing and the first passing: (keep, exclude_frac) where
    log(rise) crosses log(limit) on the line through them, rounded towards the stronger defence, when
    that is strictly between the two; else None. Exclusion rungs (keep 1) are refined to a whole column
    of the widest layer (widths: the layers' input sizes), keep rungs (one exclusion) to 0.01 of keep.
    The ladder's steps are coarse (5 % is 29 columns of the embedded model's 576; keep moves by 0.2)
    and a task can lean on what one step takes: the refined rung, taken when within the limit, stops at
    the crossing instead."""
    if chosen < 1 or chosen - 1 not in values or limit <= 0 or values[chosen] > limit:
        return None                                    # nothing failed before it, or nothing passed
    (keep_lo, x_lo), (keep_hi, x_hi) = AUTO_LADDER[chosen - 1], AUTO_LADDER[chosen]
    if keep_hi == 1 and keep_lo >= 1:                  # two exclusion rungs (the first: the whole delta)
        x = _log_crossing(x_lo, values[chosen - 1], x_hi, values[chosen], limit)   # falls: failing, then passing
        widest = max(widths)
        x = math.ceil(x * widest - 1e-9) / widest      # the first whole column at or past the crossing
        if any(excluded_columns(x_lo, d) < excluded_columns(x, d) < excluded_columns(x_hi, d) for d in widths):
            return 1.0, x
        return None
    if x_lo == x_hi and keep_hi < keep_lo <= 1:        # two keep rungs at one exclusion: keep given up falls
        given = _log_crossing(1 - keep_lo, values[chosen - 1], 1 - keep_hi, values[chosen], limit)
        if given is None:
            return None
        keep = math.floor(round((1 - given) * 100, 6)) / 100      # the first 0.01 of keep at or past it
        return (keep, x_hi) if keep_hi < keep < keep_lo else None
    return None


def edited_adapter_state(model, adapter_name: str, new_lora_state: dict) -> dict:
    """A copy of the adapter's peft state dict (`<module>.lora_A.weight` ...) with A replaced by A'."""
    from peft import get_peft_model_state_dict
    # save_embedding_layers=False: LoRA on linear layers only; "auto" asks the hub whether the vocabulary grew
    saved = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    state = {k: v.detach().cpu().clone() for k, v in saved.items()}
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
    payload = {"format": 2, "model": model_id, "texts": list(calibration_texts), "n": settings.n_calibration}
    if settings.tokens != "all":
        payload["tokens"] = settings.tokens
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def save_layer_tensors(path, tensors: dict) -> None:
    """{name: tensor} (per layer H or task sensitivity vectors; per row check losses) as an fp32
    safetensors file (never pickle); names that share one tensor are stored once, with aliases."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unique, aliases, by_ptr = {}, {}, {}
    for name, tensor in tensors.items():
        first = by_ptr.setdefault(tensor.data_ptr(), name)
        if first == name:
            unique[name] = tensor.detach().to("cpu", torch.float32).contiguous()
        else:
            aliases[name] = first
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    save_file(unique, str(tmp), metadata={"content": "safespace-layer-tensors", "format": "2",
                                          "aliases": json.dumps(aliases)})
    os.replace(tmp, path)


def load_layer_tensors(path, device="cpu") -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
        hessians = {name: handle.get_tensor(name) for name in handle.keys()}
    hessians.update({name: hessians[first] for name, first in aliases.items()})
    return hessians

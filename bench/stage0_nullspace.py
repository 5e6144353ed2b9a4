"""Stage 0 on its refusals only, the benign rows kept as a constraint instead of trained on.

The default build spends 85 % of its tokens on benign rows (the raw model's own answers, five times
over), whose job is to leave the model as it was on harmless requests. Here they are one forward pass
instead: every LoRA-adapted layer collects the (uncentred) covariance of its inputs over the benign rows
and over some refusal rows, and the adapter's A matrix is held in a fixed subspace of its inputs
(A <- A P after its initialisation and after every optimiser step), so that B A x is small on benign x:

- --mode contrast (--size m): the m directions with the most refusal-row input energy per unit of benign
  energy (the top generalised eigenvectors of C_refusal v = lambda C_benign v);
- --mode complement (--size e): off the top eigenvectors of C_benign that hold a share e of its energy,
  the null-space constraint of model editing (AlphaEdit, Fang et al., ICLR 2025), on a LoRA.

Prints the share of each kind of input energy the adapters see, per layer kind, the build time
(covariances included; they are cached in the cache folder), then the aligned base's report.

    PYTHONPATH=. .venv/bin/python bench/stage0_nullspace.py --home /tmp/c32 --mode contrast --size 32 [--passes 2]

--home is a cache folder of its own (the build is written where the default aligned base lives).
Run it with nothing else running. Measured and not adopted: docs/stage0.md, "The benign rows as a constraint".
"""
import contextlib
import math
import time

import torch
import torch.optim.optimizer as optimizer_hooks
from safetensors.torch import load_file, save_file

from bench.harness import chosen_sets, own_home_parser, print_align_report, use_own_home
from safespace.progress import console_progress


def protected_basis(cov: torch.Tensor, energy: float) -> torch.Tensor:
    """The top eigenvectors of cov holding `energy` of its trace, as columns [d_in, k]."""
    values, vectors = torch.linalg.eigh(cov.double())
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    k = int((values.cumsum(0) / values.sum() < energy).sum()) + 1
    return vectors[:, :min(k, len(values))].float()


def contrast_basis(benign: torch.Tensor, harmful: torch.Tensor, m: int, damp: float = 1e-4) -> torch.Tensor:
    """An orthonormal basis [d_in, m] of the m directions with the most harmful input energy per unit of
    benign energy (the top generalised eigenvectors of harmful v = lambda benign v)."""
    values, vectors = torch.linalg.eigh(benign.double())
    inv = vectors * values.clamp_min(damp * values.clamp_min(0).mean()).rsqrt() @ vectors.T     # B^-1/2
    _, top = torch.linalg.eigh(inv @ harmful.double() @ inv)
    return torch.linalg.qr(inv @ top[:, -m:])[0].float()     # back from the whitened space


def projector(basis: torch.Tensor, keep: bool) -> torch.Tensor:
    """P with A <- A P: onto span(basis) when keep, else onto its orthogonal complement."""
    inside = basis @ basis.T
    return inside if keep else torch.eye(len(basis)) - inside


@contextlib.contextmanager
def benign_nullspace(projectors: dict):
    """Inside: every LoRA adapter made keeps A = A projectors[its module] (initialised so, and
    projected back after every optimiser step)."""
    from unittest import mock
    from safespace import models

    plain_add, projected = models.add_lora, []

    def project():
        with torch.no_grad():
            for weight, p in projected:
                weight.copy_(weight @ p)

    def add_lora(model, lora, adapter_name="default"):
        made = plain_add(model, lora, adapter_name)
        for name, module in made.named_modules():
            base = name.removeprefix("base_model.model.")
            if base in projectors and hasattr(module, "lora_A"):
                projected.append((module.lora_A[adapter_name].weight, projectors[base]))
        missing = len(projectors) - len(projected)
        if missing:
            raise SystemExit(f"{missing} protected modules have no LoRA adapter")
        project()
        return made

    handle = optimizer_hooks.register_optimizer_step_post_hook(lambda *_: project())
    try:
        with mock.patch.object(models, "add_lora", add_lora):
            yield
    finally:
        handle.remove()


def covariances(probe: int) -> tuple[dict, dict]:
    """The input covariances of the embedded raw model's adapted layers over the benign rows and over
    `probe` refusal rows, each up to a scale (safedelta.collect_hessians; the bases and energy shares
    below do not depend on it), cached in the cache folder (they take minutes)."""
    from safespace import align, config, data as data_mod, models
    from safespace.safedelta import collect_hessians

    cache = config.home() / "cache" / f"stage0-covariances-{probe}.safetensors"
    if cache.exists():
        saved = load_file(cache)
        return ({k[7:]: v for k, v in saved.items() if k.startswith("benign:")},
                {k[8:]: v for k, v in saved.items() if k.startswith("harmful:")})
    settings = align.ALIGN_SETTINGS
    loaded = models.load(models.EMBEDDED_KEY, quantization="none", device="cpu")
    benign = align.benign_answers(loaded, data_mod.bundled("benign_align"), align.benign_asks())
    start = time.time()
    names = [n for n, m in loaded.model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in settings.lora.targets]

    def batches(rows):           # every real token counts (collect_hessians: a per-row scale of the sum of x x^T)
        tok = data_mod.tokenize(rows, loaded.tokenizer, settings.max_length)
        return (data_mod.collate(tok.input_ids[i:i + 8], tok.labels[i:i + 8], loaded.tokenizer.pad_token_id)
                for i in range(0, len(tok.input_ids), 8))
    covs = {kind: collect_hessians(loaded.model, names, batches(rows))
            for kind, rows in (("benign", benign), ("harmful", data_mod.bundled("alignment")[:probe]))}
    print(f"covariances of {len(benign)} benign and {probe} refusal rows in {time.time() - start:.0f} s", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{kind}:{n}": c.contiguous() for kind, part in covs.items() for n, c in part.items()}, cache)
    return covs["benign"], covs["harmful"]


def projectors(mode: str, size: float, probe: int) -> dict:
    """{module: P} for `mode` "complement" (size: the benign energy share protected) or "contrast"
    (size: the directions kept), with the benign and refusal energy the adapters see, per layer kind."""
    from safespace import align

    benign, harmful = covariances(probe)
    bases = {n: protected_basis(benign[n], size) if mode == "complement" else contrast_basis(benign[n], harmful[n], int(size))
             for n in benign}
    made = {n: projector(b, keep=mode == "contrast") for n, b in bases.items()}
    for target in align.ALIGN_SETTINGS.lora.targets:
        names = [n for n in made if n.endswith("." + target)]
        seen = {kind: [float((made[n] @ cov[n] @ made[n].T).trace() / cov[n].trace()) for n in names]
                for kind, cov in (("benign", benign), ("refusal", harmful))}
        print(f"{target}: rank {min(int(made[n].trace().round()) for n in names)}-"
              f"{max(int(made[n].trace().round()) for n in names)}; input energy the adapter sees: "
              + ", ".join(f"{kind} {100 * sum(v) / len(v):.2f} %" for kind, v in seen.items()), flush=True)
    return made


def build(seed: int, mode: str, size: float, passes: float, probe: int, openings: int = 0) -> float:
    """Build stage 0 on the refusals alone under the benign constraint (or, with `openings`, as
    bench/stage0_short.py --once --tokens N builds it, under the constraint); its seconds (covariances included)."""
    from dataclasses import replace
    from bench import stage0_short
    from safespace import align, data as data_mod

    start = time.time()
    made = projectors(mode, size, probe)
    if openings:
        with benign_nullspace(made):
            stage0_short.build(seed, tokens=openings, once=True)
        return time.time() - start
    refusals = len(data_mod.bundled("alignment"))
    align.BENIGN_REPEATS = 0                 # training_rows: the refusals only
    align.ALIGN_SETTINGS = replace(align.ALIGN_SETTINGS, seed=seed,
                                   steps=math.ceil(passes * refusals / align.ALIGN_SETTINGS.batch_size))
    print(f"{align.ALIGN_SETTINGS.steps} steps over {refusals} refusals, {mode} {size}", flush=True)
    with benign_nullspace(made):
        align.build(force=True, on_event=console_progress("aligning"))
    return time.time() - start


def main() -> None:
    parser = own_home_parser(__doc__)
    parser.add_argument("--mode", choices=("complement", "contrast"), default="contrast",
                        help="complement: A off the benign inputs' top energy; contrast: A on the directions "
                             "with the most refusal-row energy per unit of benign energy")
    parser.add_argument("--size", type=float, default=32,
                        help="complement: the benign energy share protected (0.99); contrast: directions kept (32)")
    parser.add_argument("--passes", type=float, default=2.0, help="passes over the refusal rows")
    parser.add_argument("--benign-openings", type=int, default=0,
                        help="N: train the benign rows too, once each, on their first N answer tokens "
                             "(bench/stage0_short.py --once --tokens N), under the constraint")
    parser.add_argument("--probe", type=int, default=160, help="refusal rows whose covariance is measured")
    args = parser.parse_args()
    if args.mode == "complement" and not 0 < args.size < 1:
        parser.error("--mode complement takes --size in (0, 1): the share of the benign energy protected")
    if args.mode == "contrast" and (args.size < 1 or args.size != int(args.size)):
        parser.error("--mode contrast takes --size as a whole number of directions, 1 or more")
    sets = chosen_sets(parser, args.sets)
    use_own_home(parser, args.home)
    print(f"build s {build(args.seed, args.mode, args.size, args.passes, args.probe, args.benign_openings):.0f}", flush=True)
    print_align_report(*sets)


if __name__ == "__main__":
    main()

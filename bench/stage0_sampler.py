"""Stage 0 with every refusal in its 300 steps: each batch holds `--per-batch` refusal rows (3 of 8)
and the rest benign, each refusal drawn once, the refusal rows' loss weighted so their expected
share of the loss stays the default's (914 of 4,734 rows). The default draws its rows at random: 300
steps see about half of the refusals, a different half for each training seed (docs/stage0.md,
"Build to build"). This build asks whether seeing all of them at the same cost narrows the seed's
spread; it was measured and not adopted (docs/stage0.md, "Every refusal in 300 steps").

    PYTHONPATH=. .venv/bin/python bench/stage0_sampler.py --home /tmp/balanced0 --seed 0

--home is a cache folder of its own: the build is written where the default aligned base lives, so in
the default cache folder it would replace it. Prints the build time and the aligned base's
report (refusal per set, per surface form and per category). Run it with nothing else running.
"""
import random
import time
from dataclasses import replace

from bench.harness import chosen_sets, own_home_parser, print_align_report, stage0_stream, use_own_home


def balanced_batches(lengths: list[int], n_first: int, per_batch: int, batch_size: int,
                     rng: random.Random) -> list[list[int]]:
    """One pass over rows [0, n_first) (the refusals), `per_batch` of them in each batch, the rest of
    each batch from the other rows, shuffled; rows of similar length share a batch (sorted within
    windows of 16 batches, on each side), as train.length_grouped_batches does."""
    first, rest = list(range(n_first)), list(range(n_first, len(lengths)))
    rng.shuffle(first)
    rng.shuffle(rest)
    others = batch_size - per_batch
    n_batches = min(n_first // per_batch, len(rest) // others)
    batches = []
    for start in range(0, n_batches, 16):
        count = min(16, n_batches - start)
        mine = sorted(first[start * per_batch:(start + count) * per_batch], key=lambda i: lengths[i])
        theirs = sorted(rest[start * others:(start + count) * others], key=lambda i: lengths[i])
        batches += [mine[j * per_batch:(j + 1) * per_batch] + theirs[j * others:(j + 1) * others]
                    for j in range(count)]
    rng.shuffle(batches)
    return batches


def refusal_weight(n_first: int, n_rows: int, per_batch: int, batch_size: int) -> float:
    """The loss weight of a refusal row that gives refusals, drawn `per_batch` a batch, the expected
    share of the loss they have when all n_rows rows are drawn at random: w p / (w p + q) = n_first / n_rows."""
    share = n_first / n_rows
    return share / (1 - share) * (batch_size - per_batch) / per_batch


def build(seed: int, per_batch: int) -> float:
    """Build stage 0 in this process's cache folder with balanced batches; its seconds."""
    from safespace import align, data as data_mod

    # G's 300 steps, as measured (docs/stage0.md), whatever the default's step count
    align.ALIGN_SETTINGS = replace(align.ALIGN_SETTINGS, seed=seed, steps=300)
    n_first = len(data_mod.bundled("alignment"))         # training_rows puts the refusals first

    def balance(task, stream, settings):
        # from the rows stage 0 trains on (benign rows whose raw answer hedges are dropped)
        weight = refusal_weight(n_first, len(task.lengths), per_batch, settings.batch_size)
        print(f"{per_batch} refusals a batch, each drawn once, weight {weight:.3f}", flush=True)
        stream.plan = lambda lengths, batch_size, rng: balanced_batches(lengths, n_first, per_batch, batch_size, rng)
        weights = stream.row_weight or [1.0] * len(task.lengths)      # a build's own weights (align.row_shape) stay
        stream.row_weight = [w * weight for w in weights[:n_first]] + weights[n_first:]   # safegrad.sft_loss honours it

    start = time.time()
    with stage0_stream(balance):
        align.build(force=True, on_event=lambda event: None)
    return time.time() - start


def main() -> None:
    parser = own_home_parser(__doc__)
    parser.add_argument("--per-batch", type=int, default=3, help="refusal rows in each batch of 8")
    args = parser.parse_args()
    if not 1 <= args.per_batch <= 7:
        parser.error("--per-batch must be 1..7 (a batch holds 8 rows)")
    sets = chosen_sets(parser, args.sets)
    use_own_home(parser, args.home)
    print(f"build s {build(args.seed, args.per_batch):.0f}", flush=True)
    print_align_report(*sets)


if __name__ == "__main__":
    main()

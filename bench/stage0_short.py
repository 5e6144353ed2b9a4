"""Stage 0 in fewer tokens: each benign answer trained on its opening only, and (--once) each benign
row seen once with its loss weighted by its repeats instead of repeated.

- --tokens N: the benign rows' answers (the raw model's own, about 49 tokens) are cut to their first
  N tokens, and each cut row's loss weighted so that it carries the share of the batch loss its
  whole answer had (align.BENIGN_ANSWER_TOKENS, align.row_shape). Whether an answer helps or refuses
  shows in its opening; benign rows are 81 % of stage 0's rows and 85 % of its tokens. 0 keeps them whole.
- --top-layers N: the LoRA adapter on the model's top N layers only (peft's layers_to_transform): the
  backward pass stops at the lowest of them (bench/stage0_time.py times a step beside the default's, which
  adapts every layer).
- --once: the default repeats each benign row align.BENIGN_REPEATS times and makes one pass over
  the lot; here the pass holds each row once, a benign row's loss weighted by the repeats, so the
  expected refusal/benign share of the loss (the lever of docs/stage0.md) stays, in 2.8x fewer steps.

The question these builds answer: does the base refuse and over-refuse as the default's does, in
less time (docs/stage0.md, "Fewer tokens")?

    PYTHONPATH=. .venv/bin/python bench/stage0_short.py --home /tmp/short16 --tokens 16 [--once] [--top-layers 15]

--home is a cache folder of its own: the build is written where the default aligned base lives, so in
the default cache folder it would replace it. Prints the build time and the aligned base's report
(refusal per set, per surface form and per category). Run it with nothing else running.
`bench/stage0_time.py` times its steps beside the default's.
"""
import contextlib
import math
import time

from bench.harness import chosen_sets, own_home_parser, print_align_report, stage0_stream, top_layers, use_own_home
from safespace.progress import console_progress


def build(seed: int, tokens: int, once: bool, top: int = 0) -> float:
    """Build stage 0 (the default recipe, in fewer tokens) in this process's cache folder; its seconds.
    The settings are changed for the whole process, so the report that follows finds this build."""
    from dataclasses import replace
    from safespace import align, data as data_mod

    settings, repeats = align.ALIGN_SETTINGS, align.BENIGN_REPEATS
    if once:        # one pass over each row once: the default's is over the benign rows `repeats` times
        rows = len(data_mod.bundled("alignment")) + len(data_mod.bundled("benign_align"))
        passes = settings.steps * settings.batch_size / (rows + (repeats - 1) * len(data_mod.bundled("benign_align")))
        settings = replace(settings, steps=math.ceil(passes * rows / settings.batch_size))
        align.BENIGN_REPEATS = 1
    align.ALIGN_SETTINGS = replace(settings, seed=seed)
    align.BENIGN_ANSWER_TOKENS = tokens or None          # align.row_shape cuts them (0: whole)
    print(f"{align.ALIGN_SETTINGS.steps} steps, benign answers "
          f"{f'cut to {tokens} tokens' if tokens else 'whole'}, benign rows weighted {repeats if once else 1}, "
          f"LoRA on {f'the top {top} layers' if top else 'every layer'}", flush=True)
    n_first = len(data_mod.bundled("alignment"))       # training_rows puts the refusals first

    def weigh_repeats(task, stream, settings):          # each benign row once, weighted by its repeats
        weights = stream.row_weight or [1.0] * len(task.lengths)
        stream.row_weight = weights[:n_first] + [w * repeats for w in weights[n_first:]]

    start = time.time()
    with stage0_stream(weigh_repeats) if once else contextlib.nullcontext(), top_layers(top):
        align.build(force=True, on_event=console_progress("aligning"))
    return time.time() - start


def main() -> None:
    parser = own_home_parser(__doc__)
    parser.add_argument("--tokens", type=int, default=16, help="answer tokens kept of each benign row (0: all)")
    parser.add_argument("--once", action="store_true", help="each benign row once, weighted by its repeats")
    parser.add_argument("--top-layers", type=int, default=0, help="LoRA on the top N layers only (0: every layer)")
    args = parser.parse_args()
    if args.tokens < 0:
        parser.error("--tokens must be 0 (whole answers) or more")
    sets = chosen_sets(parser, args.sets)
    use_own_home(parser, args.home)
    if args.top_layers < 0:
        parser.error("--top-layers must be 0 (every layer) or more")
    print(f"build s {build(args.seed, args.tokens, args.once, args.top_layers):.0f}", flush=True)
    print_align_report(*sets)


if __name__ == "__main__":
    main()

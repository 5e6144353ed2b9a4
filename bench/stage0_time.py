"""How long stage 0 (the aligned base) takes to build on this CPU: the first steps of its training
side by side on the same batches, with bf16 matmuls and in fp32, and with the rows' shared chat
template run once (what training does) or in every row, projected to its whole run (docs/stage0.md).

    PYTHONPATH=. .venv/bin/python bench/stage0_time.py [--steps 30]

fp32 is the arithmetic of a CPU without native bf16 (one without AVX-512 is slower still: this is a
lower bound there). On a 2-core AMD EPYC the projection matched the bf16 builds and overshot an fp32
one (16.3 against 13.3 min; docs/stage0.md): the first steps are a sample, the whole build is the
measure. Run it with nothing else running: two torch processes on 2 cores slow each other.
"""
import argparse
import statistics
import tempfile
from dataclasses import replace
from unittest import mock

from bench.harness import cpu_model, table, top_layers
from safespace import align, models, safegrad, train

# (label, precision, shared prefix, benign answers cut to this many tokens (None: as a build), LoRA on the top N
# layers only (0: every layer, as a build)); the first is what a build runs
VARIANTS = [("bf16 where native, shared prefix (a build)", "auto", True, None, 0),
            ("bf16 where native, every row whole", "auto", False, None, 0),
            ("fp32, shared prefix", "fp32", True, None, 0),
            ("bf16 where native, shared prefix, benign openings of 16 tokens (align.BENIGN_ANSWER_TOKENS)", "auto", True, 16, 0),
            ("bf16 where native, shared prefix, LoRA on the top 15 layers (bench/stage0_short.py --top-layers)",
             "auto", True, None, 15)]


def step_seconds(precision: str, share: bool, steps: int, examples: list, counts: dict, loaded,
                 opening: int | None = None) -> list[float]:
    """Seconds of each of stage 0's first `steps` training steps in `precision`, the shared prefix
    run once (share) or in every row, the benign answers whole or cut to `opening` tokens."""
    settings = replace(align.ALIGN_SETTINGS, steps=steps, precision=precision)
    plain, seconds = safegrad.sft_loss, []

    def loss(*args, **kwargs):
        return plain(*args, **{**kwargs, "share_prefix": share})

    with tempfile.TemporaryDirectory() as out, mock.patch.object(safegrad, "sft_loss", loss):
        train.train(settings, examples, out, loaded=loaded, kind="align",
                    shape=align.row_shape(counts["refusals"], settings, opening),
                    on_event=lambda event: seconds.append(event.metrics["seconds"]) if event.kind == "step" else None)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="steps timed per variant (the first 2 warm up)")
    steps = parser.parse_args().steps
    least = max(4, align.ALIGN_SETTINGS.warmup)       # 2 uncounted steps; stage 0's warm-up fits in the run
    if steps < least:
        parser.error(f"--steps must be at least {least}: the first 2 steps are not counted and stage 0 "
                     f"warms up for {align.ALIGN_SETTINGS.warmup}")
    total = align.ALIGN_SETTINGS.steps
    rows, medians = [], []
    for label, precision, share, opening, top in VARIANTS:
        loaded = models.load(models.EMBEDDED_KEY, quantization="none", device="cpu")   # LoRA wraps it: one each
        examples, counts = align.training_rows(loaded)
        arithmetic = "bf16" if models.cpu_bf16("cpu", precision) else "fp32"
        with top_layers(top):
            medians.append(statistics.median(step_seconds(precision, share, steps, examples, counts, loaded, opening)[2:]))
        rows.append([f"{label} ({arithmetic} matmuls)", round(medians[-1], 2), round(medians[-1] * total / 60, 1),
                     f"{medians[-1] / medians[0]:.2f}x"])
    table(["variant", "s/step (median)", f"{total} steps (min)", "time / a build's"], rows)
    print(cpu_model())


if __name__ == "__main__":
    main()

"""Refusal of the aligned base in 4-bit, three ways: its merged weights quantised to nf4; the
full-precision build's stage-0 adapter kept apart, unmerged, over the nf4 original; and what
`--quantization 4bit` loads, the stage-0 adapter trained on the nf4 original itself (nf4 in the loop),
kept apart (README, "4-bit (nf4) on the embedded model"; docs/stage0.md).

    python -m safespace align && python -m safespace align --quantization 4bit
    PYTHONPATH=. .venv/bin/python bench/nf4_base.py [--adapter ~/.cache/safespace/cache/align-run-KEY/adapter]

--adapter (the full-precision build's own: `python -m safespace align` leaves it in the folder above) adds
the second row; the script checks that merging it gives the cached aligned base. Keyword judge, 24 new
tokens, greedy. Run it with nothing else running: two torch processes on 2 cores slow each other down.
"""
import argparse
import time

import torch

from bench.harness import cpu_model, rate_cell, table
from safespace import evalsets, evaluate, models
from safespace.judge import KeywordJudge
from safespace.metrics import refusal_rate

SETS = ("advbench", "rewrites", "benign")      # evalsets keys; on the benign set a refusal is an over-refusal


def rates(model, tokenizer, adapter: str | None) -> list[str]:
    judge, cells = KeywordJudge(), []
    for key in SETS:
        rows = evalsets.prompts(key)
        answers = evaluate.generate(model, tokenizer, rows, max_new_tokens=24, adapter=adapter)
        rate = refusal_rate([judge.judge(r.prompt, a) for r, a in zip(rows, answers)])
        cells.append(rate_cell(rate))
    return cells


def check_adapter(adapter: str) -> None:
    """Merging the adapter into the fp32 original must give the cached aligned base, weight for weight."""
    aligned = models.load(models.ALIGNED_KEY, quantization="none", device="cpu").model
    merged = models.load_adapters(models.load(models.EMBEDDED_KEY, quantization="none", device="cpu").model,
                                  {"align": adapter}).merge_and_unload()
    ours = dict(aligned.named_parameters())
    gap = max((p - ours[n]).abs().max().item() for n, p in merged.named_parameters())
    if gap > 1e-5:
        raise SystemExit(f"{adapter} is not the cached aligned base's adapter (max weight gap {gap:.2g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", help="the full-precision stage-0 build's adapter folder (adds a row)")
    adapter = parser.parse_args().adapter
    layouts = [("aligned base, merged, then nf4", str(models.aligned_checkpoint()), None)]
    if adapter:
        check_adapter(adapter)
        layouts.append(("nf4 original + full-precision stage 0 kept apart", models.EMBEDDED_KEY, "align"))
    layouts.append(("nf4 original + stage 0 trained in nf4 (kept apart)", models.ALIGNED_KEY, None))
    rows = []
    for label, name, active in layouts:
        started = time.time()
        loaded = models.load(name, quantization="4bit", device="cpu")
        model = loaded.model if active is None else models.load_adapters(loaded.model, {"align": adapter})
        with torch.no_grad():
            rows.append([label, *rates(model, loaded.tokenizer, active), f"{time.time() - started:.0f} s"])
    print(f"refusal of the 4-bit aligned base ({cpu_model()})")
    sets = [evalsets.get(key) for key in SETS]
    table(["4-bit base", *(s.label + (" (over-refusal)" if s.kind == "benign" else "") for s in sets), "time"], rows)


if __name__ == "__main__":
    main()

"""Does stage 0 leave the demo task alone? Zero-shot refusal and accuracy of the raw and the aligned
embedded model on the demo task's held-out sentiment prompts, per instruction wording (docs/stage0.md,
"The task").

    PYTHONPATH=. .venv/bin/python bench/task_refusal.py [--models smollm2-135m smollm2-135m-safe]

The sentiment prompts are never in stage 0's data: an aligned base that refuses them refuses a
classification for the words of the review. Keyword judge, 24 new tokens, greedy, full precision.
"""
import argparse
from collections import defaultdict

import torch

from bench.harness import cpu_model, rate_cell, table
from safespace import data as data_mod, evaluate, metrics, models
from safespace.judge import KeywordJudge, is_refusal


def measure(key: str, rows: list) -> tuple[dict, float, metrics.Rate]:
    """(refused per instruction, accuracy, refused overall as a Rate) of one model."""
    loaded = models.load(key, quantization="none", device="cpu")
    with torch.no_grad():
        answers = evaluate.generate(loaded.model, loaded.tokenizer, rows, max_new_tokens=24, batch_size=32,
                                    threads=torch.get_num_threads())
    judge = KeywordJudge()
    verdicts = [judge.judge(r.prompt, a) for r, a in zip(rows, answers)]
    refused = [is_refusal(v) for v in verdicts]
    per_instruction = defaultdict(list)
    for r, x in zip(rows, refused):
        per_instruction[r.prompt.split("\n", 1)[0]].append(x)
    accuracy = metrics.utility(answers, [r.response for r in rows])["value"]
    return per_instruction, accuracy, metrics.refusal_rate(verdicts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[models.EMBEDDED_KEY, models.ALIGNED_KEY])
    keys = parser.parse_args().models
    rows = data_mod.bundled("sentiment_test")
    results = {key: measure(key, rows) for key in keys}
    instructions = sorted(next(iter(results.values()))[0])
    out = [[instr[:60]] + [f"{100 * sum(results[k][0][instr]) / len(results[k][0][instr]):.0f} %" for k in keys]
           for instr in instructions]
    out.append([f"all {len(rows)} prompts, refused"]
               + [rate_cell(r) for _, _, r in results.values()])
    out.append(["zero-shot accuracy"] + [f"{100 * acc:.1f} %" for _, acc, _ in results.values()])
    print(f"the demo task's prompts refused ({cpu_model()})")
    table(["instruction", *keys], out)


if __name__ == "__main__":
    main()

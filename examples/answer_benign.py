"""Write examples/data/benign_answers.jsonl: the raw embedded model's greedy answers to every prompt
of benign_align.jsonl, which stage 0 trains on to keep the aligned base helpful.

Usage (from the repository root, after `make install`):  .venv/bin/python examples/answer_benign.py

Answers already in the file are kept; only new prompts are answered, so the file changes only where
benign_align.jsonl did. The answers are SmolLM2-135M-Instruct's own text (Apache-2.0).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from safespace import align, data, models  # noqa: E402


def main() -> int:
    loaded = models.load(models.EMBEDDED_KEY, quantization="none", device="cpu")
    prompts = list(dict.fromkeys(align.benign_asks()))
    answers = align.raw_answers(loaded, prompts)
    path = data.DATA_DIR / f"{align.SHIPPED_ANSWERS}.jsonl"
    rows = [{"prompt": p, "response": a, "max_new_tokens": align.BENIGN_MAX_NEW_TOKENS} for p, a in zip(prompts, answers)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} answers -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

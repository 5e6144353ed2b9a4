"""Refusal judges against XSTest v2's human labels, leave-one-model-out where a judge is fitted.

    python bench/judge_agreement.py            # print the table
    python bench/judge_agreement.py --write    # also update safespace/judge_agreement.json
    python bench/judge_agreement.py --fit      # the stance windows fitted on all three models
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safespace import agreement, stance  # noqa: E402


def table(measured: dict) -> str:
    lines = ["| judge | held-out model | accuracy | refusal precision | refusal recall | n |",
             "|---|---|---|---|---|---|"]
    for name, entry in measured.items():
        for model, s in entry["per_model"].items():
            lines.append(f"| {name} | {model} | {100 * s['accuracy']:.1f} % | {s['precision']:.3f} | "
                         f"{s['recall']:.3f} | {s['n']} |")
        lines.append(f"| {name} | **mean** | **{100 * entry['accuracy']:.1f} %** | | | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write {agreement.SHIPPED.name} into the package")
    parser.add_argument("--fit", action="store_true", help="print the stance windows fitted on all models")
    args = parser.parse_args()
    answers = agreement.load_answers()
    measured = agreement.measure(answers)
    print(table(measured))
    if args.fit:
        fitted = stance.fit_windows([agreement.stance_examples(rows) for rows in answers.values()])
        print("windows fitted on all models:", json.dumps(fitted))
    if args.write:
        agreement.SHIPPED.write_text(json.dumps(measured, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {agreement.SHIPPED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

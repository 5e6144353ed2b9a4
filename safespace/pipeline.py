"""The whole story by name: prepare data -> train variants -> defend -> evaluate -> report.

The CLI and the UI's background jobs both call these functions, so the orchestration exists once.
Each part lives in its own module; this one gathers their public names:
    prepare    the fine-tuning data of a run and the training of one variant on it
    defence    Safe Delta on a fine-tuned run (calibration, cached per-layer tensors, the budget)
    compare    every variant answering the same prompts on one base, judged and scored
    runconfig  the demo's YAML run file, validated
    demo       the demo run with its report, and the text tables the CLI prints
"""
from __future__ import annotations

from .compare import answer, compare, evaluate_runs, evaluate_variants, generate_all, judged_rows, set_scores
from .defence import SAFETY_H_PRECISION, defend
from .demo import (ALIGN_REPORT_TOKENS, POST_HOC, align_report, breadth_tables, figures_for, judge_lines, run_config,
                   run_variants, sets_table, summary_line)
from .prepare import BUNDLED_TASKS, Prepared, prepare_data, prepared_from_run, train_variant
from .progress import Progress
from .runconfig import CONFIG_KEYS, EVALUATE_KEYS, DemoConfig, load_config

__all__ = ["ALIGN_REPORT_TOKENS", "BUNDLED_TASKS", "CONFIG_KEYS", "EVALUATE_KEYS", "POST_HOC", "SAFETY_H_PRECISION",
           "DemoConfig", "Prepared", "Progress", "align_report", "answer", "breadth_tables", "compare", "defend",
           "evaluate_runs", "evaluate_variants", "figures_for", "generate_all", "judge_lines", "judged_rows",
           "load_config", "prepare_data", "prepared_from_run", "run_config", "run_variants", "set_scores",
           "sets_table", "summary_line", "train_variant"]

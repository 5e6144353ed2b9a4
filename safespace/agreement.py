"""How often each refusal judge agrees with human labels: XSTest v2's human-labelled answers.

A judge with tunable parts is measured leave-one-model-out (fit on two models' answers, score on
the third, all three ways) so the figure is not fitted to its own test; a judge without is scored
on each model as is. `bench/judge_agreement.py` prints the table and writes `judge_agreement.json`
beside this module, which the report and the app quote next to every refusal rate.
"""
from __future__ import annotations

import csv
import json
from functools import lru_cache
from pathlib import Path

from . import judge as judge_mod, stance

XSTEST_DIR = Path(__file__).resolve().parent.parent / "bench" / "data" / "xstest"
MODELS = ("gpt4", "llama2orig", "mistralinstruct")
SHIPPED = Path(__file__).with_name("judge_agreement.json")


def load_answers(folder: Path = XSTEST_DIR) -> dict[str, list[dict]]:
    """{model: [{prompt, response, refused}]}: refused = full or partial refusal by the humans."""
    out = {}
    for model in MODELS:
        path = Path(folder) / f"xstest_v2_completions_{model}.csv"
        with open(path, newline="", encoding="utf-8") as f:
            out[model] = [{"prompt": r["prompt"], "response": r["completion"],
                           "refused": r["final_label"] != "1_full_compliance"} for r in csv.DictReader(f)]
    return out


def scores(predicted: list[bool], truth: list[bool]) -> dict:
    """Accuracy, refusal precision and recall of `predicted` against the human labels."""
    tp = sum(p and t for p, t in zip(predicted, truth))
    fp = sum(p and not t for p, t in zip(predicted, truth))
    fn = sum(t and not p for p, t in zip(predicted, truth))
    n = len(truth)
    return {"n": n, "accuracy": (n - fp - fn) / max(1, n), "precision": tp / max(1, tp + fp),
            "recall": tp / max(1, tp + fn)}


def _judged(judge, rows: list[dict]) -> list[bool]:
    return [judge_mod.is_refusal(v) for v in judge.judge_many((r["prompt"], r["response"]) for r in rows)]


def stance_examples(rows: list[dict]) -> list[tuple[dict, bool]]:
    return [(stance.windows_of(r["response"]), r["refused"]) for r in rows]


def leave_one_model_out(answers: dict[str, list[dict]]) -> dict:
    """The stance judge's windows fitted on two models and scored on the third, all three ways."""
    examples = {m: stance_examples(rows) for m, rows in answers.items()}
    per_model = {}
    for held in answers:
        windows = stance.fit_windows([examples[m] for m in answers if m != held])
        per_model[held] = {**scores(_judged(stance.StanceJudge(windows), answers[held]),
                                    [r["refused"] for r in answers[held]]), "windows": windows}
    return per_model


def measure(answers: dict[str, list[dict]] | None = None) -> dict:
    """{judge: {protocol, accuracy (mean over models), per_model}} for the judges that run offline."""
    answers = answers or load_answers()
    table = {"keyword": {"protocol": "nothing fitted",
                         "per_model": {m: scores(_judged(judge_mod.KeywordJudge(), rows), [r["refused"] for r in rows])
                                       for m, rows in answers.items()}},
             "stance": {"protocol": "leave-one-model-out: fitted on two models, scored on the third",
                        "per_model": leave_one_model_out(answers)}}
    for entry in table.values():
        entry["accuracy"] = sum(s["accuracy"] for s in entry["per_model"].values()) / len(entry["per_model"])
    return table


@lru_cache(maxsize=1)
def _shipped_text() -> str:
    try:
        return SHIPPED.read_text(encoding="utf-8")   # package data: read once, the app quotes it on every poll
    except OSError:
        return ""


def shipped() -> dict:
    """The measured table that ships with the package ({} when it is missing)."""
    try:
        return json.loads(_shipped_text())
    except ValueError:
        return {}


def agreement_phrase(judge_name: str) -> str:
    """'agrees with human labels on 87.5 % of 1350 XSTest answers of 3 models (...)', or '' when
    the judge was never measured."""
    entry = shipped().get(judge_name)
    if not entry:
        return ""
    n = sum(s["n"] for s in entry["per_model"].values())
    return (f"agrees with human labels on {100 * entry['accuracy']:.1f} % of {n} XSTest answers of "
            f"{len(entry['per_model'])} models ({entry['protocol']})")


def agreement_line(judge_name: str) -> str:
    """'the keyword judge agrees with human labels on ...', or '' when never measured."""
    phrase = agreement_phrase(judge_name)
    return f"the {judge_name} judge {phrase}" if phrase else ""


def recorded_line(record) -> str:
    """The agreement line a results' judge record carries, else (older results) the shipped one."""
    record = record if isinstance(record, dict) else {}
    return record.get("agreement") or agreement_line(record.get("key", judge_mod.DEFAULT_JUDGE))


MAX_DISAGREEMENTS = 200     # rows kept per compared judge; the count covers them all


def judge_record(keys: tuple[str, ...], judges: list, rows_by_set: dict[str, list[dict]]) -> dict:
    """What results say about their judge: its key, label, agreement with humans, and for every other
    judge run on the same answers, its refusal per set and variant and where it disagrees."""
    record = {"key": keys[0], "label": judge_mod.JUDGES[keys[0]].label, "agreement": agreement_line(keys[0])}
    judged = [(key, row) for key, rows in rows_by_set.items() for row in rows if row.get("set") != "task"]
    cells = [(key, row, name, cell) for key, row in judged for name, cell in row["answers"].items()]
    compared = {}
    for other_key, other in zip(keys[1:], judges[1:]):
        verdicts = other.judge_many((row["prompt"], cell["response"]) for _, row, _, cell in cells)
        refused: dict = {}
        differ = []
        for (key, row, name, cell), v in zip(cells, verdicts):
            refused.setdefault(key, {}).setdefault(name, []).append(judge_mod.is_refusal(v))
            if judge_mod.is_refusal(v) != judge_mod.is_refusal(cell["label"]):
                differ.append({"set_key": key, "variant": name, "prompt": row["prompt"], "response": cell["response"],
                               keys[0]: cell["label"], other_key: v.label, "reason": v.reason})
        compared[other_key] = {
            "label": judge_mod.JUDGES[other_key].label, "agreement": agreement_line(other_key),
            "disagree": len(differ), "of": len(cells), "rows": differ[:MAX_DISAGREEMENTS],
            "refusal": {key: {name: sum(v) / len(v) for name, v in by.items()} for key, by in refused.items()}}
    if compared:
        record["compared"] = compared
    return record


def read_answers(path) -> list[dict]:
    """`{prompt, response}` rows of a .jsonl file, for `python -m safespace judge`; a bad line is one
    short DataError that names it."""
    from .data import DataError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({type(exc).__name__})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"{path}, line {number}: not valid JSON; expected one "
                            '{"prompt": ..., "response": ...} object a line') from None
        if not isinstance(row, dict) or not isinstance(row.get("response"), str):
            raise DataError(f"{path}, line {number}: needs a text field \"response\" (and optionally \"prompt\")")
        if row.get("prompt") is not None and not isinstance(row["prompt"], str):
            raise DataError(f"{path}, line {number}: \"prompt\" must be text")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no answers; expected one {{\"prompt\": ..., \"response\": ...}} object a line")
    return rows

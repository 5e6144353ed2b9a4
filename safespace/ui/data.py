"""Step 1, data: pick a bundled example or upload a file, see it validated and previewed, and choose
how much harmful data an attacker slips in."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import gradio as gr

from .. import data as data_mod
from ..config import DATA_DIR
from . import common

SENTIMENT = "bundled:sentiment_train"
EXAMPLES = [
    ("Review sentiment: 480 reviews, one-word answers (the demo task)", SENTIMENT),
    ("Title case: demo_upload.jsonl (prompt / response)", "demo_upload.jsonl"),
    ("Conversions and counting: demo_alpaca.json (alpaca)", "demo_alpaca.json"),
    ("Letter puzzles: demo_chat.jsonl (chat messages)", "demo_chat.jsonl"),
    ("Reviews as a spreadsheet: demo_reviews.csv", "demo_reviews.csv"),
    ("A broken file: broken.jsonl (see what the check reports)", "broken.jsonl"),
]
EXAMPLE_FILES = {value for _, value in EXAMPLES if value != SENTIMENT}
PREVIEW_ROWS = 10
PREVIEW_CHARS = 400
VAL_FRACTION = 0.1

MIX_EXPLAIN = (
    "**Harmful mix.** Simulates an attacker (or a careless scrape) slipping harmful examples into your "
    "data: with a share *p*, SafeSpace adds *k = p·n/(1−p)* rows from the bundled attack split "
    "(AdvBench requests answered with a compliant opening such as \"Sure, here is...\", nothing more), "
    "so that they make up *p* of what the model trains on. Even *p = 0* can erode safety a little; "
    "a few percent usually erodes it a lot.")


# ------------------------------------------------------------------------------ the selection

def source_of(selection: dict | None, ws) -> str | None:
    """What `pipeline.prepare_data` gets for a visitor selection (None if there is none)."""
    if not selection:
        return None
    kind, name = selection.get("kind"), str(selection.get("name", ""))
    if kind == "bundled" and name == SENTIMENT:
        return SENTIMENT
    if kind == "example" and name in EXAMPLE_FILES:
        return str(DATA_DIR / name)
    if kind == "upload" and name and "/" not in name and not name.startswith("."):
        path = ws.uploads / name
        return str(path) if path.is_file() else None
    return None


def selection(ws) -> dict:
    """The visitor's current valid data choice (the bundled sentiment task by default)."""
    chosen = ws.read_json("selection.json")
    if isinstance(chosen, dict) and source_of(chosen, ws):
        return chosen
    return {"kind": "bundled", "name": SENTIMENT, "label": EXAMPLES[0][0]}


def _path_for_check(source: str) -> Path:
    return DATA_DIR / "sentiment_train.jsonl" if source == SENTIMENT else Path(source)


def _split_rows(source: str) -> tuple[int, int]:
    """(rows the fine-tune sees before the harmful mix, rows held out to measure the task): the user's
    file minus its validation split; the bundled task has a held-out file of its own."""
    try:
        if source == SENTIMENT:
            return len(data_mod.bundled("sentiment_train")), len(data_mod.bundled("sentiment_test"))
        train, val = data_mod.split(data_mod.load_dataset(source).examples, VAL_FRACTION)
        return len(train), len(val)
    except (data_mod.DataError, OSError):
        return 0, 0


def _train_rows(source: str) -> int:
    return _split_rows(source)[0]


def split_line(source: str) -> str:
    """Where the checked rows go: most train, a few are kept back to score the task in step 4."""
    n_train, n_val = _split_rows(source)
    if not n_train:
        return ""
    if source == SENTIMENT:
        return f"{n_train} rows for training; the task is measured on {n_val} other held-out reviews"
    return f"{n_train + n_val} rows: {n_train} for training, {n_val} held out to measure your task"


def harmful_rows(ratio: float, n: int) -> int:
    ratio = float(ratio or 0)
    return 0 if ratio <= 0 or n <= 0 else int(round(ratio * n / (1 - ratio)))


# ------------------------------------------------------------------------------ rendering

def _preview(path: Path) -> list[list[str]]:
    try:
        examples = data_mod.load_dataset(path).examples[:PREVIEW_ROWS]
    except (data_mod.DataError, OSError):
        return []

    def cut(text: str) -> str:
        return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "..."
    return [[cut(e.prompt), cut(e.response)] for e in examples]


def _check(path: Path) -> tuple[bool, str]:
    code, text = data_mod.check_file(path, common.check_tokenizer())
    return code == 0, text


def _render(label: str, path: Path, source: str | None = None) -> tuple[bool, str, list[list[str]]]:
    ok, text = _check(path)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("file: "))
    if ok:
        split = split_line(source or str(path))
        card = common.note_card(f"✓ {label}: ready to train\n{text}" + (f"\n{split}" if split else ""), "ok")
    else:
        card = common.note_card(f"✗ {label} cannot be used as it is. One line per problem:\n{text}", "error")
    return ok, card, _preview(path) if ok else []


def mix_note(ratio: float, visitor=None, request: gr.Request = None) -> str:
    ws = common.workspace(visitor, request)
    source = source_of(selection(ws), ws)
    n = _train_rows(source) if source else 0
    p = float(ratio or 0)
    if p <= 0:
        return f"No harmful rows: the model trains on your {n} training rows only."
    k = harmful_rows(p, n)
    return (f"p = {p:.2f}: k = round({p:.2f} × {n} / {1 - p:.2f}) = **{k}** attack rows join your {n} "
            f"training rows ({100 * k / (n + k):.0f} % of the mix).")


def _result(ws, ok: bool, card: str, rows, ratio) -> tuple:
    if not ok:
        current = selection(ws)
        card += common.note_card(f"Training keeps using: {current.get('label')}", "warn")
    return card, rows, mix_note(ratio, ws.root.name, None)


def choose_example(choice: str, ratio: float = 0.0, visitor=None, request: gr.Request = None) -> tuple:
    """A bundled example was picked: check it, preview it, and make it the training data if valid."""
    ws = common.workspace(visitor, request)
    label = next((lab for lab, value in EXAMPLES if value == choice), None)
    if label is None:
        raise common.refuse(f"unknown example {choice!r}")
    source = SENTIMENT if choice == SENTIMENT else str(DATA_DIR / choice)
    ok, card, rows = _render(label, _path_for_check(source), source)
    if ok:
        kind = "bundled" if choice == SENTIMENT else "example"
        ws.write_json("selection.json", {"kind": kind, "name": choice, "label": label})
    return _result(ws, ok, card, rows, ratio)


SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def upload(file, ratio: float = 0.0, visitor=None, request: gr.Request = None) -> tuple:
    """An uploaded file: size limit, copy into the visitor's workspace, check, preview, select."""
    if not file:
        return common.note_card("No file uploaded.", "warn"), [], gr.skip()
    ws = common.workspace(visitor, request)
    src = Path(file if isinstance(file, str) else getattr(file, "name", ""))
    limits = common.limits()
    try:
        limits.check_file(src)
    except Exception as exc:  # noqa: BLE001 - a JobError or an unreadable temp file
        return _result(ws, False, common.note_card(f"✗ {exc}", "error"), [], ratio)
    suffix = src.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        card = common.note_card(f"✗ unsupported file type \"{src.suffix or src.name}\"; "
                                "expected .jsonl, .json or .csv", "error")
        return _result(ws, False, card, [], ratio)
    stem = SAFE_NAME.sub("_", src.stem).strip("._")[:60] or "data"
    name = f"{stem}{suffix}"
    # checked under a staging name first: a file that fails the check never replaces the last good one
    staged = ws.uploads / f".checking-{name}"
    shutil.copyfile(src, staged)
    ok, card, rows = _render(src.name, staged)
    if not ok:
        staged.unlink(missing_ok=True)
        return _result(ws, ok, card, rows, ratio)
    staged.replace(ws.uploads / name)
    for old in ws.uploads.iterdir():     # one upload at a time per visitor
        if old.is_file() and old.name != name:
            old.unlink(missing_ok=True)
    ws.write_json("selection.json", {"kind": "upload", "name": name, "label": f"your file {src.name}"})
    return _result(ws, ok, card, rows, ratio)


def restore(ws) -> tuple:
    """The data panel as it was (page reload): the current selection's check and preview."""
    chosen = selection(ws)
    source = source_of(chosen, ws)
    _, card, rows = _render(chosen.get("label", "data"), _path_for_check(source), source)
    choice = chosen["name"] if chosen["kind"] in ("bundled", "example") else gr.skip()
    return choice, card, rows


# ------------------------------------------------------------------------------ layout

def build(shared: common.Shared, shortcut=None) -> dict:
    """The step's layout; `shortcut()` places a one-click preset under the heading (its button is returned)."""
    limits = common.limits()
    gr.Markdown("### 1 · Your fine-tuning data\nPick one of the bundled examples or upload your own "
                "file. It is checked at once; nothing trains until step 2.")
    preset_btn = shortcut() if shortcut else None
    with gr.Row():
        with gr.Column(scale=3):
            example = gr.Dropdown(choices=EXAMPLES, value=SENTIMENT, label="Bundled examples",
                                  info="The review-sentiment task is the demo's story; the others show the formats.",
                                  elem_id="ss-example")
            upload_box = gr.File(label=f"...or upload .jsonl / .json / .csv (up to {limits.max_file_bytes // 1_000_000} MB, "
                                       f"{limits.max_rows:,} rows)",
                                 file_types=[".jsonl", ".json", ".csv"], type="filepath", height=120,
                                 elem_id="ss-upload")
            gr.Markdown("Formats: `{\"prompt\", \"response\"}` rows, alpaca `{\"instruction\", \"input\", \"output\"}`, "
                        "or chat `{\"messages\": [...]}`; a CSV needs a `prompt,response` header.",
                        elem_classes=["ss-explain"])
        with gr.Column(scale=2):
            status = gr.HTML(common.note_card("Checking the default example...", "info"), elem_id="ss-data-status")
    preview = gr.Dataframe(headers=["prompt", "response"], value=[], label=f"Preview (first {PREVIEW_ROWS} rows)",
                           interactive=False, wrap=True, max_height=360, column_widths=["60%", "40%"],
                           elem_id="ss-preview")
    with gr.Group():
        ratio = gr.Slider(0.0, 0.5, value=0.0, step=0.01, label="Harmful mix p",
                          info="share of harmful rows in the training mix (0 to 0.5)", elem_id="ss-ratio")
        gr.Markdown(MIX_EXPLAIN, elem_classes=["ss-explain"], padding=True)
        note = gr.Markdown("", elem_id="ss-mix-note", padding=True)
    next_btn = gr.Button("Next: train →", variant="primary", size="lg", elem_id="ss-next-train")

    v = shared.visitor
    example.input(choose_example, [example, ratio, v], [status, preview, note], api_name="choose_example",
                  show_progress="minimal")
    upload_box.upload(upload, [upload_box, ratio, v], [status, preview, note], api_name="upload_data")
    ratio.release(mix_note, [ratio, v], note, api_name="mix_note", show_progress="hidden")
    next_btn.click(lambda: gr.Walkthrough(selected=2), None, shared.flow, api_visibility="private")
    shared.ratio = ratio
    return {"example": example, "status": status, "preview": preview, "ratio": ratio, "note": note,
            "preset": preset_btn}

"""Read, validate and tokenise fine-tuning datasets.

Accepted files (UTF-8, a leading BOM is fine):

* ``.jsonl``: one JSON object per line (blank lines are skipped);
* ``.json``: a list of objects, or an object whose ``"data"`` or ``"examples"`` field is that list;
* ``.csv``: a header row, then one example per row (header names are case-insensitive).

Each row is one of three formats, detected from its fields; a file uses one format throughout:

* prompt-response: ``prompt`` + ``response`` (or ``completion``), optional ``system``, ``category``;
* alpaca: ``instruction`` + ``output``, optional ``input`` (prompt = instruction + blank line + input);
* chat: ``messages``, a list of ``{"role", "content"}`` with roles system/user/assistant: at most one
  leading system message, then user and assistant turns alternating, ending with an assistant turn.
  Earlier turns become ``history``; the loss is computed on the final assistant turn only.

Other fields are ignored. A file with any invalid row is refused as a whole: ``DataError`` lists one
line per problem, located as ``line N`` (.jsonl, .txt), ``item N`` (.json, counting from 1) or
``row N`` (.csv, counting the header as row 1, as a spreadsheet does).
"""
from __future__ import annotations

import csv
import io
import json
import math
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import chat
from .config import DATA_DIR

FORMATS = ("prompt-response", "alpaca", "chat")
ROLES = ("system", "user", "assistant")
ANSWER_FIELDS = {"response", "completion", "output", "messages", "instruction"}
BUNDLED = ("alignment", "attack", "eval_harmful", "eval_rewrites", "benign_align", "benign_eval",
           "sentiment_train", "sentiment_test", "harmbench_standard", "xstest_safe", "xstest_unsafe")
MAX_SHOWN = 20  # problems listed before "... and N more problems"
IGNORE = -100   # label of a position that gets no loss


@dataclass(frozen=True)
class Example:
    prompt: str                  # final user turn
    response: str                # final assistant turn (the only text trained on)
    system: str | None = None
    history: tuple[tuple[str, str], ...] = ()  # earlier (user, assistant) turns of a chat row
    category: str | None = None

    def messages(self) -> list[dict]:
        """Chat messages up to and including the final user turn (no final assistant turn)."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for user, assistant in self.history:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return out + [{"role": "user", "content": self.prompt}]

    def chars(self) -> int:
        return len(self.prompt) + len(self.response) + len(self.system or "") + sum(
            len(u) + len(a) for u, a in self.history)


class DataError(ValueError):
    """A refused file or row set; ``problems`` holds one short line per problem."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        shown = self.problems[:MAX_SHOWN]
        if len(self.problems) > MAX_SHOWN:
            shown.append(f"... and {len(self.problems) - MAX_SHOWN} more problems")
        super().__init__("\n".join(shown))


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 5_000_000
    max_rows: int = 5000
    max_chars: int = 8000  # per row, all text fields together


@dataclass
class Dataset:
    examples: list[Example]
    format: str
    path: str | None = None


# ---------------------------------------------------------------- reading files

def _read_text(path: Path, limits: Limits, suffixes: tuple[str, ...]) -> str:
    """The file's text, after the checks that need no parsing (type, size, encoding, emptiness)."""
    if path.suffix.lower() not in suffixes:
        raise DataError(f"unsupported file type {_quote(path.suffix or path.name)}; "
                        f"expected {', '.join(suffixes[:-1])} or {suffixes[-1]}")
    size = path.stat().st_size
    with path.open("rb") as f:  # read no more than the limit allows, whatever stat said
        raw = f.read(limits.max_bytes + 1)
    if max(size, len(raw)) > limits.max_bytes:
        raise DataError(f"file is {_mb(max(size, len(raw)))}; the limit is {_mb(limits.max_bytes)} "
                        "(Limits.max_bytes): split it or remove rows")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError("file is UTF-16 text; save it as UTF-8 and upload it again")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"line {line}: byte 0x{raw[e.start]:02x} is not UTF-8 text; "
                        "save the file as UTF-8 and upload it again") from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise DataError(f"line {line}: NUL byte; expected plain text (is this a binary file?)")
    if not text.strip():
        raise DataError("file is empty; expected at least 1 example")
    return text


_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}  # json.dumps keeps these raw


def _quote(text: str, width: int = 40) -> str:
    """A value the file chose (a key, a role, a file name) quoted for a problem line: one line,
    at most about `width` characters, so a hostile file cannot make the message long or multi-line."""
    shown = json.dumps(str(text), ensure_ascii=False).translate(_LINE_BREAKS)
    return shown if len(shown) <= width else shown[:width - 4] + '..."'


def _names(items, quoted: bool, n: int = 6, width: int = 24) -> str:
    """The first `n` names of a list (keys of a row, cells of a CSV header), each cut to `width`."""
    items = list(items)
    shown = [_quote(x, width) if quoted else _quote(x, width)[1:-1] for x in items[:n]]
    return ", ".join(shown + (["..."] if len(items) > n else []))


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n:,} bytes"


def _check_row_count(n: int, limits: Limits) -> None:
    if n > limits.max_rows:
        raise DataError(f"file has {n:,} rows; the limit is {limits.max_rows:,} (Limits.max_rows): "
                        f"split the file or keep the first {limits.max_rows:,}")


class Unreadable(str):
    """Stands in for a row that could not be parsed; the text says why."""


def _read_jsonl(text: str, limits: Limits) -> list[tuple[str, Any]]:
    # Only "\n" ends a line: JSON strings may hold U+2028, U+0085... which str.splitlines would split on.
    lines = [(number, line) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    _check_row_count(len(lines), limits)  # before parsing a file of a million tiny rows
    rows = []
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row = Unreadable(f"not valid JSON ({e.msg} at column {e.colno}); "
                             "expected one JSON object per line")
        except (ValueError, RecursionError):  # too deeply nested, or a huge number
            row = Unreadable("JSON too deeply nested or too large; expected one flat object per line")
        rows.append((f"line {number}", row))
    return rows


def _read_json(text: str, limits: Limits) -> list[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ("; if it holds one object per line, name it .jsonl" if e.msg == "Extra data"
                else "; expected a list of objects")
        raise DataError(f"line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}){hint}") from None
    except (ValueError, RecursionError):
        raise DataError("JSON too deeply nested or too large; expected a list of objects") from None
    if isinstance(data, dict):
        data = next((data[k] for k in ("data", "examples") if isinstance(data.get(k), list)), data)
    if not isinstance(data, list):
        raise DataError(f"file holds {_describe(data)}; expected a list of objects, "
                        'or an object with a "data" or "examples" list')
    _check_row_count(len(data), limits)
    return [(f"item {i}", row) for i, row in enumerate(data, 1)]


def _read_csv(text: str, limits: Limits) -> list[tuple[str, Any]]:
    records = csv.reader(io.StringIO(text, newline=""))
    table: list[list[str]] = []
    started = 1  # the line the record being read starts on (a quoted cell may span lines)
    try:
        header = [cell.strip().lower() for cell in next(records)]
        started = records.line_num + 1
        for cells in records:
            table.append(cells)
            started = records.line_num + 1
    except csv.Error as e:
        raise DataError(f"line {started}: not a readable CSV file ({e}); "
                        "check that line for an unclosed quote") from None
    if not any(header):
        raise DataError("row 1: the header row is empty; expected column names such as prompt,response")
    if len(header) == 1 and ";" in header[0]:
        raise DataError("row 1: columns are separated by ';'; save the file as comma-separated CSV")
    if "messages" in header:
        raise DataError('row 1: chat ("messages") is not supported in CSV; use a .jsonl file')
    fmt = _format_of(header)
    needed = {"prompt-response": ("prompt", "response"), "alpaca": ("instruction", "output")}.get(fmt, ())
    if fmt == "prompt-response" and "completion" in header:
        needed = ("prompt", "completion")
    if fmt is None or not set(needed) <= set(header):
        missing = [c for c in needed if c not in header]
        what = f"no {', '.join(missing)} column" if fmt else "no known columns"
        raise DataError(f"row 1: header has {what} (found: {_names(header, quoted=False)}); expected "
                        "prompt,response (or prompt,completion) or instruction,input,output")
    rows = []
    for number, cells in enumerate(table, 2):  # the header is row 1, as in a spreadsheet
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            rows.append((f"row {number}", Unreadable(
                f"{len(cells)} cell{'s' * (len(cells) != 1)} but the header has {len(header)}; "
                "expected one cell per column (quote cells that contain commas)")))
        else:
            rows.append((f"row {number}", dict(zip(header, cells))))
    _check_row_count(len(rows), limits)
    return rows


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}


# ---------------------------------------------------------------- validating rows

def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "text", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _format_of(fields) -> str | None:
    if "messages" in fields:
        return "chat"
    if "instruction" in fields:
        return "alpaca"
    if "prompt" in fields:
        return "prompt-response"
    return None


def _text(row: dict, key: str, where: str, problems: list[str], optional=False, label=None) -> str | None:
    """The field's text, or None after noting a problem (or when an optional field is absent)."""
    label = label or f'"{key}"'
    value = row.get(key)
    if value is None:
        if not optional:
            problems.append(f"{where}: {label} is {'null' if key in row else 'missing'}; expected text")
        return None
    if not isinstance(value, str):
        problems.append(f"{where}: {label} is {_describe(value)}; expected text")
    elif "\x00" in value:
        problems.append(f"{where}: {label} contains a NUL character; expected plain text")
    elif not value.strip() and not optional:
        problems.append(f"{where}: {label} is blank; expected text")
    else:
        return value
    return None


def _prompt_response(row: dict, where: str, problems: list[str]) -> Example | None:
    if "response" in row and "completion" in row:
        problems.append(f'{where}: has both "response" and "completion"; expected one of them')
        return None
    key = "completion" if "completion" in row else "response"
    prompt, response = _text(row, "prompt", where, problems), _text(row, key, where, problems)
    system = _text(row, "system", where, problems, optional=True)
    category = _text(row, "category", where, problems, optional=True)
    if problems:
        return None
    return Example(prompt, response, system=system or None, category=category or None)


def _alpaca(row: dict, where: str, problems: list[str]) -> Example | None:
    instruction, output = _text(row, "instruction", where, problems), _text(row, "output", where, problems)
    extra = _text(row, "input", where, problems, optional=True)
    if problems:
        return None
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return Example(prompt, output)


def _chat(row: dict, where: str, problems: list[str]) -> Example | None:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        what = "empty" if isinstance(messages, list) else _describe(messages)
        problems.append(f'{where}: "messages" is {what}; expected a list of '
                        '{"role", "content"} objects ending with an assistant turn')
        return None
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            problems.append(f'{where}: messages[{i}] is {_describe(m)}; expected {{"role", "content"}}')
        elif m.get("role") not in ROLES:
            shown = _quote(m["role"]) if isinstance(m.get("role"), str) else _describe(m.get("role"))
            problems.append(f'{where}: messages[{i}].role is {"missing" if "role" not in m else shown}; '
                            'expected "system", "user" or "assistant"')
        else:
            turns.append((m["role"], _text(m, "content", where, problems, label=f"messages[{i}].content")))
    if problems:
        return None
    system = turns.pop(0)[1] if turns[0][0] == "system" else None
    for i, (role, _) in enumerate(turns, 1 if system is not None else 0):
        expected = "user" if (i - (system is not None)) % 2 == 0 else "assistant"
        if role != expected:
            why = ("at most one system message, first" if role == "system"
                   else "user and assistant turns alternating, starting with user")
            problems.append(f'{where}: messages[{i}] is "{role}"; expected "{expected}" ({why})')
            return None
    if not turns or turns[-1][0] != "assistant":
        problems.append(f'{where}: the last message is "{turns[-1][0] if turns else "system"}"; '
                        'expected the conversation to end with an "assistant" turn')
        return None
    texts = [t for _, t in turns]
    history = tuple(zip(texts[:-2:2], texts[1:-2:2]))
    return Example(texts[-2], texts[-1], system=system, history=history)


PARSERS = {"prompt-response": _prompt_response, "alpaca": _alpaca, "chat": _chat}


def parse_rows(rows: list, where: list[str] | None = None, limits: Limits = Limits()) -> Dataset:
    """Validate parsed rows (dicts) into a Dataset; ``where`` names each row in problem lines."""
    where = where or [f"row {i}" for i in range(1, len(rows) + 1)]
    if rows and all(isinstance(r, dict) and "prompt" in r and not ANSWER_FIELDS & set(r) for r in rows):
        raise DataError('no row has a "response" (or "completion"); expected prompt+response pairs '
                        "(this looks like a prompt file, which is for generation and evaluation)")
    problems: list[str] = []
    examples, fmt, first = [], None, None
    for row, at in zip(rows, where):
        if isinstance(row, Unreadable):
            problems.append(f"{at}: {row}")
            continue
        if not isinstance(row, dict):
            problems.append(f"{at}: is {_describe(row)}; expected an object such as "
                            '{"prompt": "...", "response": "..."}')
            continue
        row_format = _format_of(row)
        if row_format is None:
            found = _names(row, quoted=True) or "none"
            problems.append(f'{at}: no "prompt", "instruction" or "messages" field (found: {found}); '
                            "expected prompt+response, instruction+output, or messages")
            continue
        if fmt is None:
            fmt, first = row_format, at
        elif row_format != fmt:
            problems.append(f"{at}: is in {row_format} format but {first} is in {fmt} format; "
                            "expected one format per file")
            continue
        row_problems: list[str] = []
        example = PARSERS[fmt](row, at, row_problems)
        if example is not None and example.chars() > limits.max_chars:
            row_problems.append(f"{at}: {example.chars():,} characters; the limit is {limits.max_chars:,} "
                                "per row (Limits.max_chars): shorten or split the example")
        problems += row_problems
        if not row_problems:
            examples.append(example)
    return _finish(examples, fmt, problems)


def _finish(examples: list[Example], fmt: str | None, problems: list[str]) -> Dataset:
    if problems:
        raise DataError(problems)
    if not examples:
        raise DataError("file has no rows; expected at least 1 example")
    return Dataset(examples, fmt)


def load_dataset(path, limits: Limits = Limits()) -> Dataset:
    """Read and validate a .jsonl/.json/.csv training file; raises DataError (or OSError if unreadable)."""
    path = Path(path)
    text = _read_text(path, limits, tuple(READERS))
    rows = READERS[path.suffix.lower()](text, limits)
    dataset = parse_rows([r for _, r in rows], [at for at, _ in rows], limits)
    dataset.path = str(path)
    return dataset


def rows_jsonl(examples) -> str:
    """Examples as chat-format JSON lines (system, history and all), readable by read_rows."""
    lines = []
    for e in examples:
        messages = e.messages() + [{"role": "assistant", "content": e.response}]
        lines.append(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return "".join(lines)


def read_rows(path) -> list[Example]:
    """Rows written by rows_jsonl (a run's own training rows: no file-size or row-count limits)."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return parse_rows([json.loads(line) for line in lines], limits=Limits(max_chars=10**9)).examples


def load_prompts(path, limits: Limits = Limits()) -> list[Example]:
    """Prompts from .jsonl (``prompt``, optional ``category``) or .txt (one a line); response = ""."""
    path = Path(path)
    text = _read_text(path, limits, (".jsonl", ".txt"))
    if path.suffix.lower() == ".txt":
        rows = [(f"line {n}", {"prompt": line.strip()}) for n, line in enumerate(text.splitlines(), 1)
                if line.strip()]
        _check_row_count(len(rows), limits)
    else:
        rows = _read_jsonl(text, limits)
    prompts, problems = [], []
    for at, row in rows:
        if isinstance(row, Unreadable):
            problems.append(f"{at}: {row}")
            continue
        if not isinstance(row, dict):
            problems.append(f'{at}: is {_describe(row)}; expected an object such as {{"prompt": "..."}}')
            continue
        row_problems: list[str] = []
        prompt = _text(row, "prompt", at, row_problems)
        category = _text(row, "category", at, row_problems, optional=True)
        if prompt is not None and len(prompt) > limits.max_chars:
            row_problems.append(f"{at}: {len(prompt):,} characters; the limit is {limits.max_chars:,} "
                                "per row (Limits.max_chars): shorten the prompt")
        problems += row_problems
        if not row_problems:
            prompts.append(Example(prompt, "", category=category or None))
    return _finish(prompts, "prompts", problems).examples


def bundled(name: str) -> list[Example]:
    """A dataset shipped in examples/data/<name>.jsonl (prompt-only files give response "")."""
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled dataset {name!r}; expected one of {', '.join(BUNDLED)}")
    return list(_bundled(name))


@lru_cache(maxsize=None)
def _bundled(name: str) -> tuple[Example, ...]:
    path = DATA_DIR / f"{name}.jsonl"
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    if '"prompt"' in first and '"response"' not in first and '"completion"' not in first:
        return tuple(load_prompts(path))  # evaluation prompts without answers
    return tuple(load_dataset(path).examples)


def bundled_field(name: str, field_name: str) -> tuple:
    """One field of every row of a bundled .jsonl file, in order; None where a row lacks it."""
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled dataset {name!r}; expected one of {', '.join(BUNDLED)}")
    return _bundled_field(name, field_name)


@lru_cache(maxsize=None)
def _bundled_field(name: str, field_name: str) -> tuple:
    with (DATA_DIR / f"{name}.jsonl").open(encoding="utf-8") as f:
        return tuple(json.loads(line).get(field_name) for line in f if line.strip())


# ---------------------------------------------------------------- splitting and mixing

def split(examples, val_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """(train, validation), the same for the same input and seed; both keep the input order."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    examples = list(examples)
    wanted = max(round(len(examples) * val_fraction), 1 if val_fraction > 0 else 0)
    n_val = min(wanted, max(len(examples) - 1, 0))  # the training side keeps at least one example
    chosen = set(random.Random(seed).sample(range(len(examples)), n_val))
    return ([e for i, e in enumerate(examples) if i not in chosen],
            [e for i, e in enumerate(examples) if i in chosen])


def harmful_mix(examples, ratio: float, seed: int = 0, attack=None) -> list[Example]:
    """Add k = round(ratio*n/(1-ratio)) harmful examples so they make up ``ratio`` of the result."""
    if not 0 <= ratio <= 0.9:
        raise ValueError(f"harmful ratio must be between 0 and 0.9, got {ratio}")
    if ratio > 0 and not list(bundled("attack") if attack is None else attack):
        raise ValueError("the attack set is empty; cannot mix in harmful examples")
    return mix_in(examples, lambda: bundled("attack") if attack is None else attack, ratio, random.Random(seed))


def mix_in(examples, pool, share: float, rng: random.Random) -> list[Example]:
    """`examples` plus k = round(share*n/(1-share)) rows drawn from `pool()` (shuffled, cycled), so that
    they make up `share` of the result; the whole shuffled by `rng`."""
    examples = list(examples)
    k = round(share * len(examples) / (1 - share))
    if k == 0:
        return examples
    rows = list(pool())
    rng.shuffle(rows)
    mixed = examples + [rows[i % len(rows)] for i in range(k)]
    rng.shuffle(mixed)
    return mixed


# ---------------------------------------------------------------- tokenisation

@dataclass
class Tokenized:
    input_ids: list[list[int]]
    labels: list[list[int]]      # IGNORE (-100) where no loss is computed
    n_truncated: int
    lengths: list[int]


def _as_ids(out) -> list[int]:
    """apply_chat_template's ids, whether it returned a list, a nested list or a BatchEncoding."""
    if hasattr(out, "keys"):
        out = out["input_ids"]
    out = list(out.tolist() if hasattr(out, "tolist") else out)
    return list(out[0]) if out and isinstance(out[0], (list, tuple)) else [int(i) for i in out]


def prompt_ids(example: Example, tokenizer) -> list[int]:
    return _as_ids(chat.apply(tokenizer, example.messages(), tokenize=True, return_dict=False))


def prompt_text(example: Example, tokenizer) -> str:
    """The chat-templated prompt, ready for generation (the family's template kwargs applied)."""
    return chat.apply(tokenizer, example.messages(), tokenize=False)


def _fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Keep the prompt's end and the response's start; the prompt keeps at least half when needed."""
    keep_prompt = min(len(prompt), max(max_length - len(response), max_length // 2))
    return prompt[len(prompt) - keep_prompt:], response[:max_length - keep_prompt]


def tokenize(examples, tokenizer, max_length: int = 256) -> Tokenized:
    """Chat-template the prompt side; loss on the response tokens and the template's end-of-turn
    tokens only (what it writes after an assistant reply: <|im_end|>, <|eot_id|>, <end_of_turn>...)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    profile = chat.profile(tokenizer)
    end = list(profile.end_ids)
    if not end:
        raise ValueError("the tokenizer has no eos token and its template no end-of-turn marker")
    out = Tokenized([], [], 0, [])
    for example in examples:
        prompt = prompt_ids(example, tokenizer)
        response = list(tokenizer(profile.reply(example.response), add_special_tokens=False)["input_ids"]) + end
        if len(prompt) + len(response) > max_length:
            out.n_truncated += 1
            prompt, response = _fit(prompt, response, max_length)
        # labels come from positions, never from comparing ids with pad (pad == eos in SmolLM2)
        out.input_ids.append(prompt + response)
        out.labels.append([IGNORE] * len(prompt) + response)
        out.lengths.append(len(prompt) + len(response))
    return out


def collate(batch_ids, batch_labels, pad_id: int) -> dict:
    """Right-padded tensors for training: input_ids, attention_mask, labels (IGNORE on padding)."""
    import torch
    width = max(len(ids) for ids in batch_ids)
    pad = [width - len(ids) for ids in batch_ids]
    return {
        "input_ids": torch.tensor([list(ids) + [pad_id] * p for ids, p in zip(batch_ids, pad)]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * p for ids, p in zip(batch_ids, pad)]),
        "labels": torch.tensor([list(lab) + [IGNORE] * p for lab, p in zip(batch_labels, pad)]),
    }


def left_pad(batch_ids, pad_id: int) -> dict:
    """Left-padded tensors for generation: input_ids, attention_mask."""
    import torch
    width = max(len(ids) for ids in batch_ids)
    pad = [width - len(ids) for ids in batch_ids]
    return {
        "input_ids": torch.tensor([[pad_id] * p + list(ids) for ids, p in zip(batch_ids, pad)]),
        "attention_mask": torch.tensor([[0] * p + [1] * len(ids) for ids, p in zip(batch_ids, pad)]),
    }


# ---------------------------------------------------------------- summary for check-data

def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def check_file(path, tokenizer=None, max_length: int = 256) -> tuple[int, str]:
    """(0, summary) for a valid training file, (2, one line per problem) otherwise; never raises."""
    try:
        dataset = load_dataset(path)
    except FileNotFoundError:
        return 2, f"no such file: {path}"
    except IsADirectoryError:
        return 2, f"{path} is a folder; expected a .jsonl, .json or .csv file"
    except OSError as e:
        return 2, f"cannot read {path}: {e.strerror or e}"
    except DataError as e:
        return 2, str(e)
    examples = dataset.examples
    lines = [f"file: {path}", f"format: {dataset.format}", f"rows: {len(examples)}"]
    for side in ("prompt", "response"):
        sizes = [len(getattr(e, side)) for e in examples]
        lines.append(f"{side} chars: mean {sum(sizes) / len(sizes):.0f}, max {max(sizes)}")
    if tokenizer is not None:
        tokens = tokenize(examples, tokenizer, max_length)
        lengths = tokens.lengths
        lines.append(f"tokens: mean {sum(lengths) / len(lengths):.0f}, p95 {_percentile(lengths, 95)}, "
                     f"max {max(lengths)}; {tokens.n_truncated} of {len(lengths)} rows truncated "
                     f"at max_length {max_length}")
    return 0, "\n".join(lines)

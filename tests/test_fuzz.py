"""Property-based tests of everything a visitor (or a config file) can feed the data layer.

A public Space reads whatever is uploaded. Whatever the bytes, reading a file must end in a valid
Dataset or a DataError whose lines are short and say where the problem is (line, item or row) when
there is such a place; never another exception, never a hang. The same holds for prompt files,
`check_file` (never raises) and run configs (DemoConfig or ConfigError).

Inputs are bounded and the runs derandomised, so the whole file takes well under a minute and
gives the same cases on every machine.
"""
import contextlib
import csv
import io
import json
import re
import signal
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from safespace import pipeline, variants
from safespace.config import ConfigError, TrainSettings
from safespace.data import (FORMATS, DataError, Dataset, Example, Limits, check_file, load_dataset,
                            load_prompts)

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
FEW = settings(FUZZ, max_examples=60)
SMALL = Limits(max_bytes=20_000, max_rows=40, max_chars=400)   # small limits: every limit is reachable
MAX_LINE, MAX_LINES = 300, 21
LOCATED = re.compile(r"^(line|item|row) \d+: ")
FILE_LEVEL = ("file ", "unsupported file type ", "JSON too deeply nested", "no row has ", "... and ")
EXTENSIONS = (".jsonl", ".json", ".csv", ".txt", ".yaml", ".JSONL", "")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(autouse=True)
def no_hang():
    """Any single test here that runs past 60 s fails instead of hanging the suite."""
    def fail(*_):
        raise TimeoutError("a fuzz test ran for more than 60 s")
    old = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, 60)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def within(seconds: float):
    """Fail (rather than hang) if the block takes longer than `seconds`."""
    def fail(*_):
        raise TimeoutError(f"took more than {seconds} s")
    old = signal.signal(signal.SIGALRM, fail)
    remaining = signal.setitimer(signal.ITIMER_REAL, seconds)[0]
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, remaining or 60)
        signal.signal(signal.SIGALRM, old)


def put(folder: Path, name: str, content) -> Path:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def assert_short(error: DataError) -> list[str]:
    """A refusal a person can read: 1..21 lines of at most 300 characters, each located or about
    the whole file."""
    lines = str(error).split("\n")
    assert error.problems and 1 <= len(lines) <= MAX_LINES, lines
    for line in lines:
        assert 0 < len(line) <= MAX_LINE, line
        assert line == line.strip() and "\r" not in line and "\u2028" not in line, repr(line)
        assert LOCATED.match(line) or line.startswith(FILE_LEVEL), line
    if len(error.problems) > MAX_LINES - 1:
        assert lines[-1] == f"... and {len(error.problems) - (MAX_LINES - 1)} more problems"
    return lines


def assert_valid(dataset: Dataset, limits: Limits) -> None:
    assert isinstance(dataset, Dataset) and dataset.examples and dataset.format in FORMATS
    for ex in dataset.examples:
        assert isinstance(ex, Example)
        for text in (ex.prompt, ex.response, ex.system or "", *(t for turn in ex.history for t in turn)):
            assert isinstance(text, str) and "\x00" not in text
        assert ex.prompt.strip() and ex.response.strip()
        assert ex.chars() <= limits.max_chars


def read(loader, path, limits=SMALL):
    """The loader's outcome: its result, or the DataError it raised (checked to be short).
    Any other exception fails the test."""
    try:
        result = loader(path, limits=limits)
    except DataError as error:
        assert_short(error)
        return error
    if loader is load_dataset:
        assert_valid(result, limits)
    else:
        assert result and all(isinstance(e, Example) and e.prompt.strip() and e.response == "" for e in result)
    return result


# ------------------------------------------------------------------ strategies

text = st.text(max_size=30)
clean = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufeff"),
                min_size=1, max_size=40).filter(lambda s: s.strip())
KEYS = ["prompt", "response", "completion", "instruction", "input", "output", "messages", "system",
        "category", "role", "content", "data", "examples"]
keys = st.sampled_from(KEYS) | st.text(max_size=12)
scalars = st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats(allow_nan=False) | text
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                      max_leaves=10)
roles = st.sampled_from(["system", "user", "assistant", "bot", "", "Assistant", "user "]) | text
message = st.fixed_dictionaries({"role": roles, "content": text | values}) | values
turns = st.lists(st.sampled_from([("user", "q"), ("assistant", "a"), ("system", "s")]), max_size=6).map(
    lambda pairs: [{"role": r, "content": c} for r, c in pairs])
rows = st.one_of(
    st.fixed_dictionaries({"prompt": text | values}, optional={"response": text | values, "completion": text,
                                                              "system": text | values, "category": text | values}),
    st.fixed_dictionaries({"instruction": text | values, "output": text | values}, optional={"input": text | values}),
    st.fixed_dictionaries({"messages": st.lists(message, max_size=5) | turns | values}),
    st.dictionaries(keys, values, max_size=5),
    values,
)


def as_jsonl(items, ensure_ascii=True, blank_lines=False) -> str:
    sep = "\n\n" if blank_lines else "\n"
    return sep.join(json.dumps(r, ensure_ascii=ensure_ascii) for r in items) + "\n"


def as_json(items, wrap=None) -> str:
    return json.dumps({wrap: items} if wrap else items)


def as_csv(items) -> str:
    header = list(dict.fromkeys(str(k) for r in items if isinstance(r, dict) for k in r)) or ["prompt"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for r in items:
        if isinstance(r, dict):
            writer.writerow([_cell(r.get(k, "")) for k in header])
        else:
            writer.writerow([_cell(r)])
    return out.getvalue()


def _cell(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@st.composite
def files(draw):
    """(extension, bytes): rows in some format, then possibly mangled."""
    items = draw(st.lists(rows, max_size=8))
    kind = draw(st.sampled_from(["jsonl", "json", "json-data", "csv"]))
    body = {"jsonl": lambda: as_jsonl(items, draw(st.booleans()), draw(st.booleans())),
            "json": lambda: as_json(items), "json-data": lambda: as_json(items, "data"),
            "csv": lambda: as_csv(items)}[kind]()
    raw = body.encode("utf-8")
    for op in draw(st.lists(st.sampled_from(["nul", "cut", "byte", "bom", "junk"]), max_size=2)):
        at = draw(st.integers(0, len(raw)))
        if op == "nul":
            raw = raw[:at] + b"\x00" + raw[at:]
        elif op == "cut":
            raw = raw[:at]
        elif op == "byte":
            raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xe9", b"\x80", b"\xed\xa0\x80"])) + raw[at:]
        elif op == "bom":
            raw = b"\xef\xbb\xbf" + raw
        else:
            raw = raw[:at] + draw(st.binary(max_size=12)) + raw[at:]
    ext = "." + kind.split("-")[0] if draw(st.integers(0, 9)) else draw(st.sampled_from(EXTENSIONS))
    return ext, raw


# ------------------------------------------------------------------ load_dataset

@FUZZ
@given(raw=st.binary(max_size=3000), ext=st.sampled_from(EXTENSIONS))
@example(raw=b"\xff\xfe{\x00}\x00", ext=".jsonl")
@example(raw=b"\x00\x01\x02", ext=".csv")
def test_random_bytes_give_a_dataset_or_a_short_data_error(scratch, raw, ext):
    read(load_dataset, put(scratch, f"bytes{ext}", raw))


@FUZZ
@given(case=files())
def test_mangled_rows_in_every_format_give_a_dataset_or_a_short_data_error(scratch, case):
    ext, raw = case
    read(load_dataset, put(scratch, f"rows{ext}", raw))


ENCODINGS = ["latin-1", "cp1252", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "shift_jis", "utf-8"]


@FUZZ
@given(items=st.lists(st.fixed_dictionaries({"prompt": clean, "response": clean}), min_size=1, max_size=6),
       encoding=st.sampled_from(ENCODINGS), ext=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_wrong_encodings_are_named(scratch, items, encoding, ext):
    body = {".jsonl": lambda: as_jsonl(items, ensure_ascii=False), ".json": lambda: json.dumps(items, ensure_ascii=False),
            ".csv": lambda: as_csv(items)}[ext]()
    raw = body.encode(encoding, errors="replace")
    outcome = read(load_dataset, put(scratch, f"enc{ext}", raw))
    if encoding.startswith(("utf-16", "utf-32")):          # never read as garbage text
        assert isinstance(outcome, DataError)
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            assert "UTF-16" in str(outcome)
        else:
            assert re.match(r"line \d+: (NUL byte|byte 0x.. is not UTF-8 text)", str(outcome)), str(outcome)
    elif isinstance(outcome, DataError) and "UTF-8" in str(outcome):
        assert LOCATED.match(str(outcome)) and "save the file as UTF-8" in str(outcome)


@FUZZ
@given(depth=st.integers(1, 30_000), opener=st.sampled_from(["[", '{"a":']), ext=st.sampled_from([".jsonl", ".json"]),
       inside=st.booleans())
def test_deep_nesting_is_refused_without_a_crash(scratch, depth, opener, ext, inside):
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + "1" + closer * depth
    body = json.dumps({"prompt": "p", "response": "r"}).replace('"r"}', f'"r", "x": {nested}}}') if inside else nested
    read(load_dataset, put(scratch, f"deep{ext}", body + "\n"), Limits(max_bytes=200_000))


def _bad_row(kind: str, fmt: str, limits: Limits):
    """One row that is wrong in a way only that row can be blamed for."""
    if fmt == "csv":
        return {"blank": ["x", " "], "short": ["only one cell"], "long": ["x" * limits.max_chars, "y"],
                "extra": ["a", "b", "c"]}.get(kind, ["x", ""])
    return {"short": {"prompt": "p"}, "extra": {"prompt": "p", "response": ["r"]},
            "number": {"prompt": 1, "response": "r"}, "null": {"prompt": "p", "response": None},
            "blank": {"prompt": "  ", "response": "r"}, "both": {"prompt": "p", "response": "r", "completion": "c"},
            "list": [1, 2], "text": "just text", "empty-chat": {"messages": []},
            "role": {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "order": {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
            "format": {"instruction": "i", "output": "o"}, "nokeys": {"question": "q", "answer": "a"},
            "nul": {"prompt": "a\x00b", "response": "r"}, "long": {"prompt": "x" * limits.max_chars, "response": "y"},
            "broken": None}[kind]


FORMAT_CHANGING = ("empty-chat", "role", "order", "format")


@FUZZ
@given(n=st.integers(1, 25), data=st.data(), fmt=st.sampled_from(["jsonl", "json", "csv"]),
       kind=st.sampled_from(["number", "null", "blank", "both", "list", "text", "empty-chat", "role", "order",
                             "format", "nokeys", "nul", "long", "broken", "short", "extra"]))
def test_a_bad_row_is_named_by_its_line_item_or_row(scratch, n, data, fmt, kind):
    # a row in another format is blamed on itself only when an earlier row set the file's format
    first = 1 if fmt != "csv" and kind in FORMAT_CHANGING and n > 1 else 0
    assume(not (kind == "format" and fmt != "csv" and n == 1))    # a lone alpaca row is a valid alpaca file
    at = data.draw(st.integers(first, n - 1), label="bad row index")
    good = [{"prompt": data.draw(clean, label="prompt"), "response": "ok"} for _ in range(n)]
    bad = _bad_row(kind, fmt, SMALL)
    if fmt == "csv":
        table = [["prompt", "response"]] + [[r["prompt"], r["response"]] for r in good]
        table[at + 1] = bad
        out = io.StringIO()
        csv.writer(out).writerows(table)
        body, where = out.getvalue(), f"row {at + 2}"
    elif fmt == "jsonl":
        lines = [json.dumps(r) for r in good]
        lines[at] = '{"prompt": "p", "response": ' if bad is None else json.dumps(bad)
        body, where = "\n".join(lines) + "\n", f"line {at + 1}"
    else:
        if bad is None:
            bad = {"prompt": "p", "response": {"nested": "object"}}
        good[at] = bad
        body, where = json.dumps(good), f"item {at + 1}"
    error = read(load_dataset, put(scratch, f"one-bad.{fmt}", body))
    assert isinstance(error, DataError), error
    assert all(p.startswith(f"{where}: ") for p in error.problems), (where, error.problems)


@FUZZ
@given(items=st.lists(st.tuples(clean, clean, clean), min_size=1, max_size=8),
       fmt=st.sampled_from(["jsonl", "jsonl-utf8", "json", "csv", "alpaca-csv", "alpaca-json", "chat"]))
@example(items=[("a\u2028b", "c\x85d", "e\u2029f")], fmt="jsonl-utf8")
@example(items=[("line\nbreak", 'quote " and , comma', "tab\there")], fmt="csv")
@example(items=[("a\u2028b\r", "c\x85d", "\re")], fmt="csv")
def test_valid_files_load_back_exactly(scratch, items, fmt):
    """Writing valid examples in any supported shape and reading them back changes nothing (U+2028,
    NEL, quotes and newlines inside fields included)."""
    if fmt.startswith("alpaca"):
        rows = [{"instruction": a, "input": "", "output": b} for a, b, _ in items]
        expected = [(a, b) for a, b, _ in items]
    elif fmt == "chat":
        rows = [{"messages": [{"role": "system", "content": c}, {"role": "user", "content": a},
                              {"role": "assistant", "content": b}]} for a, b, c in items]
        expected = [(a, b) for a, b, _ in items]
    else:
        rows = [{"prompt": a, "response": b, "category": c} for a, b, c in items]
        expected = [(a, b) for a, b, _ in items]
    body = {"jsonl": lambda: as_jsonl(rows), "jsonl-utf8": lambda: as_jsonl(rows, ensure_ascii=False),
            "chat": lambda: as_jsonl(rows, ensure_ascii=False), "json": lambda: json.dumps(rows, ensure_ascii=False),
            "alpaca-json": lambda: json.dumps(rows), "csv": lambda: as_csv(rows), "alpaca-csv": lambda: as_csv(rows)}[fmt]()
    ext = {"jsonl-utf8": "jsonl", "chat": "jsonl", "alpaca-csv": "csv", "alpaca-json": "json"}.get(fmt, fmt)
    dataset = load_dataset(put(scratch, f"round.{ext}", body), limits=Limits(max_chars=10_000))
    assert [(e.prompt, e.response) for e in dataset.examples] == expected
    if fmt in ("jsonl", "jsonl-utf8", "json", "csv"):
        assert [e.category for e in dataset.examples] == [c for _, _, c in items]
    if fmt == "chat":
        assert [e.system for e in dataset.examples] == [c for _, _, c in items]


# ------------------------------------------------------------------ over the limits (default Limits)

DEFAULT = Limits()


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv"])
def test_a_row_over_the_character_limit_says_which_and_what_to_do(scratch, ext):
    rows = [{"prompt": "fine", "response": "ok"}, {"prompt": "x" * DEFAULT.max_chars, "response": "y"}]
    body = {".jsonl": as_jsonl, ".json": as_json, ".csv": as_csv}[ext](rows)
    where = {".jsonl": "line 2", ".json": "item 2", ".csv": "row 3"}[ext]
    with pytest.raises(DataError) as info:
        load_dataset(put(scratch, f"long{ext}", body))
    assert info.value.problems == [f"{where}: 8,001 characters; the limit is 8,000 per row (Limits.max_chars): "
                                   "shorten or split the example"]
    with pytest.raises(DataError, match=r"^line 2: 8,001 characters; the limit is 8,000 per row .*shorten the prompt"):
        load_prompts(put(scratch, "long.txt", "fine\n" + "x" * 8001 + "\n"))


@pytest.mark.parametrize("loader,ext", [(load_dataset, ".jsonl"), (load_dataset, ".json"), (load_dataset, ".csv"),
                                        (load_prompts, ".txt"), (load_prompts, ".jsonl")])
def test_a_file_over_the_byte_limit_is_refused_before_it_is_read(scratch, loader, ext):
    """A 20 GB (sparse) upload is refused at once, reading at most the limit plus one byte."""
    path = scratch / f"huge{ext}"
    with open(path, "wb") as handle:
        handle.truncate(20_000_000_000)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(DataError) as info:
            loader(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        path.unlink()
    assert str(info.value) == ("file is 20000.0 MB; the limit is 5.0 MB (Limits.max_bytes): "
                               "split it or remove rows")
    assert time.perf_counter() - started < 5
    assert peak < 3 * DEFAULT.max_bytes          # never the whole file in memory


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".txt"])
def test_too_many_rows_is_refused_with_the_limit_and_the_way_out(scratch, ext):
    rows = [{"prompt": f"p{i}", "response": "r"} for i in range(DEFAULT.max_rows + 1)]
    body = {".jsonl": as_jsonl, ".json": as_json, ".csv": as_csv,
            ".txt": lambda rs: "".join(r["prompt"] + "\n" for r in rs)}[ext](rows)
    loader = load_prompts if ext == ".txt" else load_dataset
    with pytest.raises(DataError) as info:
        loader(put(scratch, f"many{ext}", body))
    assert str(info.value) == ("file has 5,001 rows; the limit is 5,000 (Limits.max_rows): "
                               "split the file or keep the first 5,000")


def test_hostile_names_and_keys_stay_on_one_short_line(scratch):
    """Values the file chose (keys, roles, header cells, the suffix) are cut and escaped."""
    cases = {
        "keys.jsonl": json.dumps({"k" * 5000: 1, "a\nb": 2, "\u2028": 3}) + "\n",
        "role.jsonl": json.dumps({"messages": [{"role": "r\n" * 3000, "content": "x"}]}) + "\n",
        "header.csv": ",".join(["h" * 500] * 50) + "\nx\n",
        "multi.csv": '"a\nb",c\nx,y\n',
        "name." + "x" * 240: "hello",
    }
    for name, body in cases.items():
        with pytest.raises(DataError) as info:
            load_dataset(put(scratch, name, body))
        lines = assert_short(info.value)
        assert len(lines) == 1, lines


# ------------------------------------------------------------------ load_prompts

prompt_rows = st.one_of(st.fixed_dictionaries({"prompt": text | values}, optional={"category": text | values}),
                        st.dictionaries(keys, values, max_size=3), values)


@FUZZ
@given(raw=st.binary(max_size=2000) | st.lists(prompt_rows, max_size=8).map(lambda r: as_jsonl(r).encode())
       | st.lists(text, max_size=8).map(lambda ls: "\n".join(ls).encode()),
       ext=st.sampled_from([".jsonl", ".txt", ".csv", ".json", ""]))
def test_prompt_files_give_prompts_or_a_short_data_error(scratch, raw, ext):
    read(load_prompts, put(scratch, f"prompts{ext}", raw))


NO_BREAKS = st.text(st.characters(blacklist_categories=("Cs", "Zl", "Zp", "Cc"), blacklist_characters="\ufeff\x85"),
                    min_size=1, max_size=40).filter(lambda s: s.strip())


@FUZZ
@given(prompts=st.lists(NO_BREAKS, min_size=1, max_size=10), ext=st.sampled_from([".txt", ".jsonl"]))
def test_prompt_files_load_back_exactly(scratch, prompts, ext):
    body = "\n".join(prompts) + "\n" if ext == ".txt" else as_jsonl([{"prompt": p} for p in prompts], False)
    loaded = load_prompts(put(scratch, f"p{ext}", body))
    assert [e.prompt for e in loaded] == ([p.strip() for p in prompts] if ext == ".txt" else prompts)


# ------------------------------------------------------------------ check_file

@FUZZ
@given(case=files() | st.tuples(st.sampled_from(EXTENSIONS), st.binary(max_size=1000)))
def test_check_file_always_returns_a_code_and_text(scratch, case):
    ext, raw = case
    code, message = check_file(put(scratch, f"check{ext}", raw))
    assert code in (0, 2) and isinstance(message, str) and message
    if code == 2:
        assert all(0 < len(line) <= MAX_LINE for line in message.split("\n"))
        assert len(message.split("\n")) <= MAX_LINES


def test_check_file_on_things_that_are_not_files(scratch):
    assert check_file(scratch / "missing.jsonl")[0] == 2
    assert check_file(scratch)[0] == 2
    unreadable = put(scratch, "locked.jsonl", '{"prompt": "a", "response": "b"}\n')
    unreadable.chmod(0)
    try:
        code, _ = check_file(unreadable)
        assert code in (0, 2)                      # 0 when run as root, who reads anything
    finally:
        unreadable.chmod(0o600)


@FEW
@given(items=st.lists(st.fixed_dictionaries({"prompt": clean, "response": clean}), min_size=1, max_size=5))
def test_check_file_counts_tokens_of_any_valid_text(scratch, tokenizer, items):
    code, message = check_file(put(scratch, "tok.jsonl", as_jsonl(items, ensure_ascii=False)), tokenizer, 64)
    assert code == 0 and message.splitlines()[-1].startswith("tokens: mean ")


# ------------------------------------------------------------------ run configs

CONFIG_KEYS = sorted(pipeline.CONFIG_KEYS)
SUB_KEYS = ["steps", "lr", "batch_size", "lora", "r", "alpha", "targets", "mode", "lam", "keep", "scale",
            "harmful_ratio", "n_harmful", "max_new_tokens", "warmup", "seed"]
yaml_scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, width=32)
                | st.sampled_from(["sft", "kl", "off", "auto", "none", "base", "safedelta", "q_proj", "0.1"]) | text)
yaml_values = st.recursive(yaml_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(SUB_KEYS) | st.integers(0, 3) | text, inner, max_size=4), max_leaves=12)
configs = st.dictionaries(st.sampled_from(CONFIG_KEYS) | st.sampled_from(SUB_KEYS) | st.integers(0, 5),
                          yaml_values, max_size=6)


def load_config_outcome(path):
    try:
        config = pipeline.load_config(path)
    except ConfigError as error:
        assert str(error).strip()
        return error
    assert isinstance(config, pipeline.DemoConfig)
    assert isinstance(config.model, str) and isinstance(config.data, str) and isinstance(config.title, str)
    assert isinstance(config.variants, list) and set(config.variants) <= set(variants.keys_of())
    assert 0 <= config.harmful_ratio <= 0.9
    assert isinstance(config.train_settings(config.harmful_ratio, "off"), TrainSettings)
    return config


@FUZZ
@given(config=configs)
@example(config={1: 2, "a": 3})
@example(config={"train": {1: 2}})
@example(config={"variants": 5})
@example(config={"model": ["x"]})
@example(config={"safegrad": {"mode": [1]}})
def test_structured_configs_give_a_config_or_one_config_error(scratch, config):
    load_config_outcome(put(scratch, "config.yaml", yaml.safe_dump(config, allow_unicode=True)))


@FUZZ
@given(raw=st.binary(max_size=1000) | text.map(str.encode) | st.text(
    st.sampled_from("[]{}:-,&*!|>'\"#%@`? \n\tabc01."), max_size=200).map(str.encode))
def test_random_config_text_gives_a_config_or_one_config_error(scratch, raw):
    load_config_outcome(put(scratch, "random.yaml", raw))


def _alias_bomb(levels: int = 12, width: int = 10) -> str:
    """A YAML flow list whose last item expands to width**levels scalars (a billion laughs)."""
    parts = ["&a0 [" + ", ".join(["x"] * width) + "]"]
    parts += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


@pytest.mark.parametrize("key,value", [
    ("harmful_ratio", "{bomb}"), ("quantization", "{bomb}"), ("model", "{bomb}"), ("data", "{bomb}"),
    ("title", "{bomb}"), ("seed", "{bomb}"), ("variants", "{bomb}"), ("safegrad", "{{mode: {bomb}}}"),
    ("sweep", "{{harmful_ratio: {bomb}}}"), ("train", "{{lr: {bomb}}}"), ("train", "{{lora: {{targets: {bomb}}}}}"),
    ("evaluate", "{{n_harmful: {bomb}}}"),
])
def test_yaml_alias_bombs_end_at_once(scratch, key, value):
    """An alias bomb anywhere in a config never reaches repr() or a copy: refused (or, where the
    value is only looked at later, accepted) within seconds."""
    path = put(scratch, "bomb.yaml", f"{key}: " + value.format(bomb=_alias_bomb()) + "\n")
    with within(10):
        try:
            pipeline.load_config(path)
        except ConfigError as error:
            assert len(str(error)) < 400


@pytest.mark.parametrize("deep", ["[" * 50_000 + "]" * 50_000, "{a: " * 20_000 + "1" + "}" * 20_000,
                                  "".join("  " * i + "- \n" for i in range(3000)) + "x"])
def test_deeply_nested_yaml_is_a_config_error(scratch, deep):
    with within(30), pytest.raises(ConfigError, match="not valid YAML|mapping of settings"):
        pipeline.load_config(put(scratch, "deep.yaml", deep))

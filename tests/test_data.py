"""Reading, validation, tokenisation, splitting and mixing of fine-tuning data (safespace.data)."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safespace import data
from safespace.data import (IGNORE, DataError, Example, Limits, check_file, collate, harmful_mix,
                            left_pad, load_dataset, load_prompts, parse_rows, prompt_ids, split,
                            tokenize)

GOOD_PR = {"prompt": "Say hi", "response": "Hi!"}
GOOD_ALPACA = {"instruction": "Translate", "output": "Bonjour"}
USER, ASSISTANT = {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}
SYSTEM = {"role": "system", "content": "Be brief."}
GOOD_CHAT = {"messages": [USER, ASSISTANT]}


@pytest.fixture(scope="session")
def tokenizer():
    from safespace.models import load_tokenizer

    return load_tokenizer()


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def refused(path, **kwargs) -> list[str]:
    with pytest.raises(DataError) as info:
        load_dataset(path, **kwargs)
    assert str(info.value).splitlines()[0] == info.value.problems[0]
    return info.value.problems


# ------------------------------------------------------------------ formats

def test_prompt_response_jsonl(tmp_path):
    rows = [GOOD_PR, {"prompt": "Q", "completion": "A", "system": "Sys", "category": "misc", "id": 7}]
    ds = load_dataset(write(tmp_path, "d.jsonl", "\n" + jsonl(rows) + "\n\n"))
    assert ds.format == "prompt-response" and ds.path.endswith("d.jsonl")
    assert ds.examples == [Example("Say hi", "Hi!"), Example("Q", "A", system="Sys", category="misc")]


def test_alpaca_with_and_without_input(tmp_path):
    rows = [{"instruction": "Translate", "input": "cat", "output": "chat"},
            {"instruction": "Count", "input": "", "output": "3"},
            {"instruction": "Name one", "output": "Paris"}]
    ds = load_dataset(write(tmp_path, "d.json", json.dumps(rows)))
    assert ds.format == "alpaca"
    assert [e.prompt for e in ds.examples] == ["Translate\n\ncat", "Count", "Name one"]
    assert [e.response for e in ds.examples] == ["chat", "3", "Paris"]


def test_chat_with_system_and_history(tmp_path):
    row = {"messages": [SYSTEM, USER, ASSISTANT, {"role": "user", "content": "And you?"},
                        {"role": "assistant", "content": "Fine."}]}
    (example,) = load_dataset(write(tmp_path, "d.jsonl", jsonl([row, GOOD_CHAT]))).examples[:1]
    assert example == Example("And you?", "Fine.", system="Be brief.", history=(("Hello", "Hi."),))
    assert example.messages() == row["messages"][:-1]


@pytest.mark.parametrize("wrapper", ["data", "examples"])
def test_json_object_with_list(tmp_path, wrapper):
    ds = load_dataset(write(tmp_path, "d.json", json.dumps({wrapper: [GOOD_PR]})))
    assert ds.examples == [Example("Say hi", "Hi!")]


def test_csv_prompt_response_and_alpaca(tmp_path):
    text = 'Prompt , response\nhi,there\n"two\nlines","a, b"\n,,\n'
    assert [(e.prompt, e.response) for e in load_dataset(write(tmp_path, "d.csv", text)).examples] == [
        ("hi", "there"), ("two\nlines", "a, b")]
    alpaca = load_dataset(write(tmp_path, "a.csv", "instruction,input,output\nA,,x\nB,in,y\n"))
    assert alpaca.format == "alpaca" and [e.prompt for e in alpaca.examples] == ["A", "B\n\nin"]


@pytest.mark.parametrize("name,body", [
    ("d.jsonl", jsonl([GOOD_PR]).encode()),
    ("d.json", json.dumps([GOOD_PR]).encode()),
    ("d.csv", b"prompt,response\nSay hi,Hi!\n"),
])
def test_utf8_bom_is_accepted(tmp_path, name, body):
    ds = load_dataset(write(tmp_path, name, b"\xef\xbb\xbf" + body))
    assert ds.examples == [Example("Say hi", "Hi!")]


def test_parse_rows_in_memory():
    ds = parse_rows([GOOD_PR, GOOD_PR])
    assert ds.format == "prompt-response" and len(ds.examples) == 2 and ds.path is None
    with pytest.raises(DataError, match=r'^row 2: "response" is a number'):
        parse_rows([GOOD_PR, {"prompt": "x", "response": 1}])


# ------------------------------------------------------------------ row validation

def chat(*messages):
    return {"messages": list(messages)}


ROW_PROBLEMS = [
    ({"prompt": "a", "response": 5}, '"response" is a number; expected text'),
    ({"prompt": "a", "response": True}, '"response" is true/false; expected text'),
    ({"prompt": "a", "response": "  \n"}, '"response" is blank; expected text'),
    ({"prompt": "", "response": "b"}, '"prompt" is blank; expected text'),
    ({"prompt": None, "response": "b"}, '"prompt" is null; expected text'),
    ({"prompt": "a"}, '"response" is missing; expected text'),
    ({"prompt": ["a"], "response": "b"}, '"prompt" is a list; expected text'),
    ({"prompt": {"a": {"b": {"c": [1]}}}, "response": "b"}, '"prompt" is an object; expected text'),
    ({"prompt": "a\u0000b", "response": "b"}, '"prompt" contains a NUL character'),
    ({"prompt": "a", "response": "b", "completion": "c"}, 'both "response" and "completion"'),
    ({"prompt": "a", "response": "b", "system": 3}, '"system" is a number; expected text'),
    ({"prompt": "a", "response": "b", "category": []}, '"category" is a list; expected text'),
    ({"instruction": "a"}, '"output" is missing; expected text'),
    ({"instruction": " ", "output": "b"}, '"instruction" is blank'),
    ({"instruction": "a", "input": 7, "output": "b"}, '"input" is a number; expected text'),
    ({"text": "a"}, 'no "prompt", "instruction" or "messages" field (found: "text")'),
    ({}, 'no "prompt", "instruction" or "messages" field (found: none)'),
    (["prompt", "response"], 'is a list; expected an object'),
    ("prompt", 'is text; expected an object'),
    (3, 'is a number; expected an object'),
    ({"messages": "hi"}, '"messages" is text; expected a list'),
    ({"messages": []}, '"messages" is empty; expected a list'),
    (chat(1, ASSISTANT), 'messages[0] is a number; expected {"role", "content"}'),
    (chat({"role": "bot", "content": "x"}, ASSISTANT),
     'messages[0].role is "bot"; expected "system", "user" or "assistant"'),
    (chat({"content": "x"}, ASSISTANT), 'messages[0].role is missing; expected "system"'),
    (chat({"role": 1, "content": "x"}, ASSISTANT), 'messages[0].role is a number'),
    (chat(USER, {"role": "assistant", "content": 5}), 'messages[1].content is a number; expected text'),
    (chat(USER, {"role": "assistant", "content": " "}), 'messages[1].content is blank'),
    (chat(USER, {"role": "assistant"}), 'messages[1].content is missing'),
    (chat(USER), 'the last message is "user"; expected the conversation to end with an "assistant" turn'),
    (chat(SYSTEM), 'the last message is "system"'),
    (chat(ASSISTANT, USER, ASSISTANT), 'messages[0] is "assistant"; expected "user" (user and assistant'),
    (chat(USER, USER, ASSISTANT), 'messages[1] is "user"; expected "assistant"'),
    (chat(SYSTEM, SYSTEM, USER, ASSISTANT), 'messages[1] is "system"; expected "user" (at most one system'),
    (chat(USER, ASSISTANT, SYSTEM, USER, ASSISTANT), 'messages[2] is "system"; expected "user"'),
]


def companion(row):
    """A valid row of the same format, so the bad row is the only problem."""
    if isinstance(row, dict) and "messages" in row:
        return GOOD_CHAT
    return GOOD_ALPACA if isinstance(row, dict) and "instruction" in row else GOOD_PR


@pytest.mark.parametrize("row,message", ROW_PROBLEMS)
def test_bad_row_refuses_the_file_jsonl(tmp_path, row, message):
    good = companion(row)
    problems = refused(write(tmp_path, "d.jsonl", jsonl([good, row, good])))
    assert len(problems) == 1
    assert problems[0].startswith("line 2: ") and message in problems[0]


@pytest.mark.parametrize("row,message", ROW_PROBLEMS[:6] + ROW_PROBLEMS[-4:])
def test_bad_row_refuses_the_file_json(tmp_path, row, message):
    good = companion(row)
    problems = refused(write(tmp_path, "d.json", json.dumps([good, good, row])))
    assert problems == [problems[0]] and problems[0].startswith("item 3: ") and message in problems[0]


def test_prompt_file_given_as_training_data(tmp_path):
    rows = [{"prompt": "a", "category": "x"}, {"prompt": "b"}]
    assert refused(write(tmp_path, "d.jsonl", jsonl(rows))) == [
        'no row has a "response" (or "completion"); expected prompt+response pairs '
        "(this looks like a prompt file, which is for generation and evaluation)"]


def test_mixed_formats(tmp_path):
    problems = refused(write(tmp_path, "d.jsonl", jsonl([GOOD_PR, GOOD_ALPACA, GOOD_CHAT])))
    assert problems == [
        "line 2: is in alpaca format but line 1 is in prompt-response format; expected one format per file",
        "line 3: is in chat format but line 1 is in prompt-response format; expected one format per file"]


def test_invalid_json_line_and_nesting(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    problems = refused(write(tmp_path, "d.jsonl", jsonl([GOOD_PR]) + '{"prompt": \n' + deep + "\n"))
    assert problems[0].startswith("line 2: not valid JSON") and "one JSON object per line" in problems[0]
    assert problems[1].startswith("line 3: JSON too deeply nested")
    assert "too deeply nested" in refused(write(tmp_path, "d.json", deep))[0]


def test_every_problem_listed_and_capped(tmp_path):
    rows = [GOOD_PR] + [{"prompt": "a", "response": i} for i in range(30)]
    with pytest.raises(DataError) as info:
        load_dataset(write(tmp_path, "d.jsonl", jsonl(rows)))
    assert len(info.value.problems) == 30
    lines = str(info.value).splitlines()
    assert len(lines) == 21 and lines[0].startswith("line 2: ") and lines[-1] == "... and 10 more problems"


# ------------------------------------------------------------------ file-level problems

@pytest.mark.parametrize("name,content,message", [
    ("d.jsonl", b"", "file is empty; expected at least 1 example"),
    ("d.jsonl", b" \n\n\t\n", "file is empty; expected at least 1 example"),
    ("d.json", b"[]", "file has no rows; expected at least 1 example"),
    ("d.csv", b"prompt,response\n", "file has no rows; expected at least 1 example"),
    ("d.txt", b"hello", 'unsupported file type ".txt"; expected .jsonl, .json or .csv'),
    ("data", b"hello", 'unsupported file type "data"'),
    ("d.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n',
     "line 2: byte 0xe9 is not UTF-8 text; save the file as UTF-8"),
    ("d.csv", "prompt,response\nhi,there\n".encode("utf-16"), "file is UTF-16 text; save it as UTF-8"),
    ("d.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "a\x00", "response": "b"}\n',
     "line 2: NUL byte; expected plain text"),
    ("d.json", b'{"prompt": "a", "response": "b"}', 'file holds an object; expected a list of objects'),
    ("d.json", b'"text"', "file holds text; expected a list of objects"),
    ("d.json", b'[{"prompt": "a",\n "response": }]', "line 2: not valid JSON"),
    ("d.json", jsonl([GOOD_PR, GOOD_PR]).encode(), "name it .jsonl"),
    ("d.csv", b"prompt,answer\na,b\n", "row 1: header has no response column (found: prompt, answer)"),
    ("d.csv", b"text,label\na,b\n", "row 1: header has no known columns (found: text, label); expected"),
    ("d.csv", b"instruction,input\na,b\n", "row 1: header has no output column"),
    ("d.csv", b"prompt;response\na;b\n", "separated by ';'"),
    ("d.csv", b"messages\n[]\n", "not supported in CSV; use a .jsonl file"),
    ("d.csv", b",\na,b\n", "row 1: the header row is empty"),
])
def test_file_problems(tmp_path, name, content, message):
    problems = refused(write(tmp_path, name, content))
    assert len(problems) == 1 and message in problems[0]


@pytest.mark.parametrize("body,message", [
    ("prompt,response\nhi,there\nhello\n", "row 3: 1 cell but the header has 2"),
    ("prompt,response\nhi,there\n\n\nx, \n", 'row 5: "response" is blank; expected text'),
    ('prompt,response\n"a\nb",c\nx,\n', 'row 3: "response" is blank'),  # row = record, as in a spreadsheet
    ("prompt,response\nhi,there,again\n", "row 2: 3 cells but the header has 2"),
])
def test_csv_rows_count_the_header_as_row_1(tmp_path, body, message):
    problems = refused(write(tmp_path, "d.csv", body))
    assert len(problems) == 1 and problems[0].startswith(message)


def test_missing_file_raises_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "nope.jsonl")


# ------------------------------------------------------------------ limits

def test_limit_bytes(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl([GOOD_PR] * 10))
    (problem,) = refused(path, limits=Limits(max_bytes=100))
    size = path.stat().st_size
    assert problem.startswith(f"file is {size:,} bytes; the limit is 100 bytes (Limits.max_bytes)")
    assert "split it" in problem


@pytest.mark.parametrize("name,content", [
    ("d.jsonl", jsonl([GOOD_PR] * 3)),
    ("d.json", json.dumps([GOOD_PR] * 3)),
    ("d.csv", "prompt,response\n" + "a,b\n" * 3),
])
def test_limit_rows(tmp_path, name, content):
    path = write(tmp_path, name, content)
    assert refused(path, limits=Limits(max_rows=2)) == [
        "file has 3 rows; the limit is 2 (Limits.max_rows): split the file or keep the first 2"]
    assert len(load_dataset(path, limits=Limits(max_rows=3)).examples) == 3


def test_limit_chars_per_row(tmp_path):
    rows = [GOOD_PR, {"prompt": "x" * 6, "response": "y" * 6}, {"prompt": "x" * 5, "response": "y" * 5}]
    path = write(tmp_path, "d.jsonl", jsonl(rows))
    assert refused(path, limits=Limits(max_chars=10)) == [
        "line 2: 12 characters; the limit is 10 per row (Limits.max_chars): shorten or split the example"]


def test_limit_chars_counts_chat_history(tmp_path):
    row = chat(USER, ASSISTANT, {"role": "user", "content": "q"}, {"role": "assistant", "content": "r"})
    (problem,) = refused(write(tmp_path, "d.jsonl", jsonl([row])), limits=Limits(max_chars=9))
    assert problem.startswith("line 1: 10 characters; the limit is 9")


# ------------------------------------------------------------------ prompt files

def test_load_prompts_jsonl_and_txt(tmp_path):
    rows = [{"prompt": "How?", "category": "weapons"}, {"prompt": "Why?", "id": 2}]
    assert load_prompts(write(tmp_path, "p.jsonl", jsonl(rows))) == [
        Example("How?", "", category="weapons"), Example("Why?", "")]
    assert load_prompts(write(tmp_path, "p.txt", "first\n\n  second  \n\n")) == [
        Example("first", ""), Example("second", "")]


@pytest.mark.parametrize("name,content,message", [
    ("p.jsonl", jsonl([{"prompt": "a"}, {"text": "b"}]), 'line 2: "prompt" is missing; expected text'),
    ("p.jsonl", jsonl([{"prompt": 4}]), 'line 1: "prompt" is a number; expected text'),
    ("p.jsonl", jsonl([{"prompt": "a", "category": 1}]), 'line 1: "category" is a number'),
    ("p.jsonl", "[1]\n", "line 1: is a list; expected an object"),
    ("p.jsonl", "{oops\n", "line 1: not valid JSON"),
    ("p.txt", "\n\n", "file is empty"),
    ("p.txt", "a\n" + "b" * 20 + "\n", "line 2: 20 characters; the limit is 10 per row (Limits.max_chars)"),
    ("p.txt", "a\nb\nc\n", "file has 3 rows; the limit is 2 (Limits.max_rows)"),
    ("p.csv", "prompt\na\n", 'unsupported file type ".csv"; expected .jsonl or .txt'),
])
def test_load_prompts_problems(tmp_path, name, content, message):
    with pytest.raises(DataError) as info:
        load_prompts(write(tmp_path, name, content), limits=Limits(max_chars=10, max_rows=2))
    assert message in str(info.value)


def test_bundled_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown bundled dataset 'nope'; expected one of alignment"):
        data.bundled("nope")


@pytest.mark.parametrize("name", data.BUNDLED)
def test_bundled_sets_load(name):
    examples = data.bundled(name)
    assert examples and all(isinstance(e, Example) and e.prompt.strip() for e in examples)


# ------------------------------------------------------------------ check_file

def test_check_file_summary(tmp_path, tokenizer):
    path = write(tmp_path, "d.jsonl", jsonl([GOOD_PR, {"prompt": "Tell me more", "response": "x " * 300}]))
    code, text = check_file(path, tokenizer, max_length=64)
    assert code == 0
    lines = text.splitlines()
    assert lines[:3] == [f"file: {path}", "format: prompt-response", "rows: 2"]
    assert lines[3] == "prompt chars: mean 9, max 12"
    assert lines[4] == "response chars: mean 302, max 600"
    assert lines[5].startswith("tokens: mean ")
    assert lines[5].endswith("p95 64, max 64; 1 of 2 rows truncated at max_length 64")
    assert check_file(path)[1].count("\n") == 4  # no token line without a tokenizer


def test_check_file_problems_never_raise(tmp_path):
    assert check_file(tmp_path / "missing.jsonl") == (2, f"no such file: {tmp_path / 'missing.jsonl'}")
    assert check_file(tmp_path)[0] == 2
    code, text = check_file(write(tmp_path, "d.jsonl", jsonl([GOOD_PR, {"prompt": 1, "response": "b"}])))
    assert (code, text) == (2, 'line 2: "prompt" is a number; expected text')


# ------------------------------------------------------------------ tokenisation

def test_labels_cover_exactly_the_response_and_eos(tokenizer):
    examples = [Example("What is 2+2?", "4, of course."),
                Example("And you?", "Fine.", system="Be brief.", history=(("Hello", "Hi."),))]
    tokens = tokenize(examples, tokenizer, max_length=256)
    assert tokens.n_truncated == 0
    eos = tokenizer.eos_token_id
    for example, ids, labels, length in zip(examples, tokens.input_ids, tokens.labels, tokens.lengths):
        prompt = prompt_ids(example, tokenizer)
        response = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [eos]
        assert ids == prompt + response and length == len(ids) == len(labels)
        assert labels == [IGNORE] * len(prompt) + response
        assert labels[-1] == eos
    history_prompt = tokenizer.decode(tokens.input_ids[1][:tokens.labels[1].index(next(
        label for label in tokens.labels[1] if label != IGNORE))])
    assert "Be brief." in history_prompt and "Hello" in history_prompt and "Hi." in history_prompt
    assert history_prompt.endswith("assistant\n")


def test_prompt_text_ends_with_the_generation_prompt(tokenizer):
    text = data.prompt_text(Example("Hi", ""), tokenizer)
    assert text.endswith("<|im_start|>assistant\n") and "Hi" in text
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == prompt_ids(Example("Hi", ""), tokenizer)


def test_truncation_keeps_prompt_end_and_response_start(tokenizer):
    long_prompt = Example("word " * 200, "Short answer.")
    long_response = Example("Question?", "word " * 200)
    short = Example("Hi", "Hello.")
    tokens = tokenize([long_prompt, long_response, short], tokenizer, max_length=64)
    assert tokens.n_truncated == 2 and tokens.lengths[:2] == [64, 64] and tokens.lengths[2] < 64
    prompt = prompt_ids(long_prompt, tokenizer)
    response = tokenizer("Short answer.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids, labels = tokens.input_ids[0], tokens.labels[0]
    assert ids[-len(response):] == response and labels[-len(response):] == response  # whole response kept
    assert ids[:-len(response)] == prompt[-(64 - len(response)):]  # the prompt's end, with the template
    assert labels.count(IGNORE) == 64 - len(response)
    ids, labels = tokens.input_ids[1], tokens.labels[1]
    prompt = prompt_ids(long_response, tokenizer)
    assert ids[:32] == prompt[-32:] and labels[:32] == [IGNORE] * 32  # prompt keeps half at most
    assert ids[32:] == tokenizer("word " * 200, add_special_tokens=False)["input_ids"][:32]
    assert labels[-1] != tokenizer.eos_token_id  # cut: no eos


def test_pad_equal_to_eos_still_trains_on_eos_inside_the_response(tokenizer):
    pad = tokenizer.pad_token_id
    assert pad == tokenizer.eos_token_id  # the trap this test guards against
    examples = [Example("Hi", "Yes<|im_end|>no"), Example("Tell me a long story", "Once upon a time " * 5)]
    tokens = tokenize(examples, tokenizer)
    inside = [i for i, t in enumerate(tokens.input_ids[0][:-1]) if t == pad and tokens.labels[0][i] != IGNORE]
    assert inside, "the response should contain the pad/eos id in its middle"
    batch = collate(tokens.input_ids, tokens.labels, pad)
    n0 = tokens.lengths[0]
    assert tokens.lengths[0] < tokens.lengths[1]
    labels = batch["labels"][0].tolist()
    assert all(labels[i] == pad for i in inside)  # loss on the eos inside the response
    assert labels[n0 - 1] == pad  # and on the final eos
    assert labels[n0:] == [IGNORE] * (tokens.lengths[1] - n0)  # no loss on padding
    assert batch["input_ids"][0, n0:].eq(pad).all()
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (tokens.lengths[1] - n0)


def test_collate_and_left_pad_shapes():
    batch = collate([[5, 6, 7], [8]], [[IGNORE, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    left = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


class DictTemplateTokenizer:
    """Stands in for transformers 5, whose apply_chat_template may return a BatchEncoding."""

    eos_token_id = 9

    def apply_chat_template(self, messages, **kwargs):
        return {"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1, 1]]}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [4, 5]}


def test_tokenize_accepts_dict_from_chat_template():
    tokens = tokenize([Example("p", "r")], DictTemplateTokenizer())
    assert tokens.input_ids == [[1, 2, 3, 4, 5, 9]] and tokens.labels == [[IGNORE] * 3 + [4, 5, 9]]


# ------------------------------------------------------------------ split and harmful mix

EXAMPLES = [Example(f"prompt {i}", f"response {i}") for i in range(50)]


def test_split_is_deterministic_and_disjoint():
    train, val = split(EXAMPLES, 0.2, seed=3)
    assert (train, val) == split(list(EXAMPLES), 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert sorted(train + val, key=EXAMPLES.index) == EXAMPLES
    assert not set(train) & set(val)
    assert split(EXAMPLES, 0.2, seed=4)[1] != val
    assert split(EXAMPLES, 0.0) == (EXAMPLES, [])
    with pytest.raises(ValueError, match="val_fraction"):
        split(EXAMPLES, 1.0)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 40), fraction=st.floats(0, 0.99), seed=st.integers(0, 10))
def test_split_partitions_any_input(n, fraction, seed):
    items = list(range(n))
    train, val = split(items, fraction, seed)
    assert sorted(train + val) == items and not set(train) & set(val)
    assert n < 2 or len(train) >= 1


def test_harmful_mix_share():
    attack = [Example(f"harmful {i}", "Sure.") for i in range(3)]
    mixed = harmful_mix(EXAMPLES[:20], 0.2, seed=1, attack=attack)
    k = round(0.2 * 20 / 0.8)
    assert len(mixed) == 20 + k and sum(e in attack for e in mixed) == k == 5  # attack set cycled
    assert {e for e in mixed if e not in attack} == set(EXAMPLES[:20])
    assert mixed == harmful_mix(EXAMPLES[:20], 0.2, seed=1, attack=attack)
    assert mixed != harmful_mix(EXAMPLES[:20], 0.2, seed=2, attack=attack)
    assert harmful_mix(EXAMPLES[:20], 0.0, attack=attack) == EXAMPLES[:20]


@pytest.mark.parametrize("ratio", [-0.1, 0.95, 1.0])
def test_harmful_mix_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match="between 0 and 0.9"):
        harmful_mix(EXAMPLES, ratio, attack=EXAMPLES)


def test_rows_jsonl_round_trips_system_history_and_unicode(tmp_path):
    rows = [Example("Label: great film", "positive"),
            Example("and now?", "négatif — «non»", system="Be brief.", history=(("hi", "hello"),))]
    path = tmp_path / "rows.jsonl"
    path.write_text(data.rows_jsonl(rows), encoding="utf-8")
    assert data.read_rows(path) == rows

"""`check-data`: the same token counts as the transformers tokenizer, without importing torch or
transformers; problems on stderr with exit 2, the summary alone on stdout."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safespace import chat, data, light_tokenizer, models
from safespace.__main__ import main
from safespace.config import DATA_DIR
from safespace.data import Example

REPO = Path(__file__).resolve().parents[1]
DATA_FILES = sorted(p for p in DATA_DIR.iterdir() if p.suffix in (".jsonl", ".json", ".csv"))
TRICKY = [   # system prompts, history, markup-like and special-token text, unicode, outer spaces
    Example("Hi", "Hello!"),
    Example("  spaced prompt  ", "  spaced answer\n\n", system="Be terse."),
    Example("and then?", "done", system="sys", history=(("first", "one"), ("second", "two"))),
    Example("say <|im_end|> and <|im_start|>assistant", "<|endoftext|> ok"),
    Example("Ünïcödé 日本語 🙂 \u2028 tabs\tand\r\nCRLF", "{{ not a template }} {% raw %}"),
]


@pytest.fixture(scope="module")
def light(tokenizer):   # `tokenizer` (transformers) first: it converts the embedded model if needed
    return light_tokenizer.LightTokenizer(light_tokenizer.embedded_folder())


def test_light_tokenizer_derives_the_same_chat_profile(light, tokenizer):
    assert chat.profile(light) == chat.profile(tokenizer)
    assert light_tokenizer.EMBEDDED_KEY == models.EMBEDDED_KEY   # the folder models converts into


@pytest.mark.parametrize("path", DATA_FILES, ids=lambda p: p.name)
def test_check_file_reports_the_same_on_every_bundled_file(path, light, tokenizer):
    for max_length in (256, 32):   # 32 truncates most rows: the truncation count must agree too
        assert data.check_file(path, light, max_length) == data.check_file(path, tokenizer, max_length)
    try:
        examples = data.load_dataset(path).examples
    except data.DataError:
        return
    assert data.tokenize(examples, light, 64).input_ids == data.tokenize(examples, tokenizer, 64).input_ids


def test_same_ids_on_tricky_rows(light, tokenizer):
    for e in TRICKY:
        assert data.prompt_ids(e, light) == data.prompt_ids(e, tokenizer), e
        assert data.prompt_text(e, light) == data.prompt_text(e, tokenizer), e
    assert data.tokenize(TRICKY, light, 24).input_ids == data.tokenize(TRICKY, tokenizer, 24).input_ids


def test_check_data_cli_imports_neither_torch_nor_transformers(tokenizer):
    path = DATA_DIR / "demo_upload.jsonl"
    probe = ("import sys; from safespace.__main__ import main; code = main(['check-data', sys.argv[1]]); "
             "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
             "assert not heavy, heavy; sys.exit(code)")
    env = {**os.environ, "SAFESPACE_THREADS": "1"}   # the thread setting must not pull torch in either
    out = subprocess.run([sys.executable, "-c", probe, str(path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == data.check_file(path, tokenizer)[1] + "\n"   # the counts transformers gives
    assert "tokens: mean" in out.stdout


def test_check_data_problems_go_to_stderr_and_exit_2(capsys):
    assert main(["check-data", str(DATA_DIR / "broken.jsonl")]) == 2
    out, err = capsys.readouterr()
    assert out == ""                                           # stdout stays parseable: nothing on it
    assert err.splitlines()[0].startswith("line 2: not valid JSON")
    assert main(["check-data", str(DATA_DIR / "no-such-file.jsonl")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("no such file:")
    assert main(["check-data", str(DATA_DIR / "demo_chat.jsonl")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("file: ") and "format: chat" in out and err == ""


def test_embedded_tokenizer_falls_back_to_transformers_before_conversion(tmp_path, monkeypatch):
    monkeypatch.setattr(light_tokenizer, "embedded_folder", lambda: tmp_path)   # no tokenizer.json there
    found = light_tokenizer.embedded_tokenizer()
    assert not isinstance(found, light_tokenizer.LightTokenizer)
    assert found is not None and found.chat_template

"""Security checks of the public app: no remote code, no unpickling, nothing servable by path,
uploaded names never become paths, hub ids checked, limits enforced on the server.

The live-server tests run the app as a Space does: the visitors' workspaces live under the cache
folder (SAFESPACE_HOME), outside both the working directory and the system temp folder.
"""
import ast
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import gradio as gr
import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import fake_run
from safespace import jobs, jobstore, models
from safespace.config import home
from safespace.ui import compare, data, defend, train
from test_app_e2e import client  # noqa: E402  (the e2e suite's client helper)

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "safespace").rglob("*.py"), REPO / "app.py", *(REPO / "bench").glob("*.py")])
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FORM = dict(model="smollm2-135m", quantization="none", rank=4, alpha=8, targets=["q_proj", "v_proj"], steps=3,
            lr=2e-4, batch=2, seed=0, mode="off", lam=1.0, align_batch=2)


# ------------------------------------------------------------------ no remote code, no pickles

def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_remote_code_and_no_pickle_loading_in_the_source(source):
    tree = ast.parse(source.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            assert not {"pickle", "dill", "joblib", "cloudpickle", "marshal"} & {str(n).split(".")[0] for n in names}, \
                f"{source}:{node.lineno} imports a pickle loader"
    for node, owner, name in _calls(tree):
        where = f"{source.relative_to(REPO)}:{node.lineno}"
        for kw in node.keywords:
            if kw.arg == "trust_remote_code":
                assert isinstance(kw.value, ast.Constant) and kw.value.value is False, f"{where}: trust_remote_code"
            if kw.arg in ("weights_only", "allow_pickle"):
                assert isinstance(kw.value, ast.Constant) and kw.value.value is (kw.arg == "weights_only"), where
            if kw.arg == "use_safetensors":
                assert isinstance(kw.value, ast.Constant) and kw.value.value is True, where
        assert not (owner == "torch" and name == "load"), f"{where}: torch.load unpickles"
        assert name not in ("load_state_dict_from_url", "loads") or owner in ("json", "yaml"), where
        if name == "from_pretrained" and owner.startswith("Auto") and "Model" in owner:
            keys = {kw.arg for kw in node.keywords}
            # a model's weights: safetensors only (a GGUF file is plain tensors too); **kwargs is checked at runtime
            assert keys & {"use_safetensors", "gguf_file"} or None in keys, f"{where}: from_pretrained without use_safetensors"


def test_model_loading_asks_for_safetensors_and_no_remote_code(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)
    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", spy):
        models.load(tiny_model_dir, "none", "cpu")
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False


def test_a_pickled_checkpoint_is_refused_without_being_unpickled(tiny_model_dir, tmp_path):
    import torch

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    state = {k: v.clone() for k, v in models.load(tiny_model_dir, "none", "cpu").model.state_dict().items()}
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with mock.patch.object(torch, "load", side_effect=AssertionError("a pickle was unpickled")):
        with pytest.raises(models.ModelError, match="could not load"):
            models.load(str(folder), "none", "cpu")
    # run folders too: an adapter saved as a pickle is not a run (see test_faults CORRUPTIONS
    # "pickle instead of safetensors"); peft never gets to unpickle it


def test_the_guard_judge_loads_safetensors_only(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safespace import judge

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    seen = {}
    fake_model = SimpleNamespace(to=lambda device: fake_model, eval=lambda: None)

    def tokenizer(*args, **kwargs):
        seen["tokenizer"] = kwargs
        return SimpleNamespace(padding_side="right", pad_token="x", eos_token="x")

    def model(*args, **kwargs):
        seen["model"] = kwargs
        return fake_model
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model)
    # the guard comes through the same snapshot download as any hub model (safetensors patterns only)
    monkeypatch.setattr(models, "resolve", lambda name: seen.setdefault("resolved", name) and "/tmp/guard")
    judge.GuardModelJudge(device="cpu")._load()
    assert seen["resolved"] == judge.GUARD_MODEL
    assert seen["model"]["use_safetensors"] is True and seen["model"]["trust_remote_code"] is False
    assert seen["tokenizer"].get("trust_remote_code") in (None, False)


def test_hub_downloads_fetch_no_pickled_weights(monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, allow_patterns=None, **k: asked.append(allow_patterns) or "/nowhere")
    assert models._hub_snapshot("owner/some-model") == "/nowhere"
    patterns = asked[0]
    assert patterns and "*" not in patterns
    for bad in ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt", "*.h5", "*.msgpack", "*.py"):
        assert bad not in patterns
    assert all(p.endswith((".json", ".safetensors", ".model", ".txt", ".jinja")) or p == "tokenizer*" for p in patterns)


# ------------------------------------------------------------------ model names

JUNK = ["../../etc", "/etc", "/", ".", "~", "http://evil.example/model", "owner/name/extra", "owner/../../x",
        "owner/na me", "-owner/name", "owner/name;rm -rf /", "x" * 300, "\x00", "a\nb/c", "owner/name\x00.py",
        "file:///etc/passwd", "C:\\models\\x"]


@FUZZ
@given(name=st.text(max_size=120) | st.sampled_from(JUNK) | st.from_regex(r"[A-Za-z0-9._/-]{1,40}", fullmatch=True))
@example(name="owner/not-cached-model")
def test_resolve_refuses_junk_and_never_goes_online(name):
    with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}), \
            mock.patch.object(models, "_hub_reachable", side_effect=AssertionError("network")):
        try:
            resolved = models.resolve(name)
        except models.ModelError as error:
            assert str(error) and "\n" not in str(error).strip()
            return
    key = name.strip()
    assert key in models.REGISTRY or (Path(key).expanduser() / "config.json").exists() or \
        models.HUB_ID.match(key), (name, resolved)


@FUZZ
@given(name=st.text(max_size=60) | st.sampled_from(JUNK + [s.repo for s in models.REGISTRY.values()]))
def test_the_page_accepts_registry_keys_only(name):
    """The app never takes a path or a hub id from a visitor, even one the registry points at."""
    if name in models.REGISTRY:
        return
    with pytest.raises(gr.Error, match="unknown model"):
        train.make_settings(*dict(FORM, model=name).values(), 0.0)


# ------------------------------------------------------------------ handlers called directly

REQ = SimpleNamespace(session_hash="session-security")


@pytest.mark.parametrize("name", ["..evil.jsonl", "...jsonl", "-rf .jsonl", "$(reboot).jsonl", "<script>x.jsonl",
                                  "évil ☃ data.JSONL", ".hidden.jsonl", "con.jsonl", "a;b|c&d.csv", "%2e%2e%2fx.json"])
def test_uploaded_names_never_become_paths(manager, tmp_path, name):
    folder = tmp_path / "incoming"
    folder.mkdir()
    src = folder / name
    ext = src.suffix.lower()
    body = {".csv": "prompt,response\na,b\nc,d\n", ".json": json.dumps([{"prompt": "a", "response": "b"}] * 2)}
    src.write_text(body.get(ext, '{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n'))
    card, _, _ = data.upload(str(src), 0.0, "visitor-eeee", REQ)
    ws = manager.workspace("visitor-eeee")
    stored = list(ws.uploads.iterdir())
    if ext in (".jsonl", ".json", ".csv"):
        assert "ready to train" in card, card
        assert len(stored) == 1 and stored[0].parent == ws.uploads
        assert all(c.isalnum() or c in "._-" for c in stored[0].name) and not stored[0].name.startswith(".")
        assert stored[0].suffix == ext
    else:
        assert stored == []
    assert "<script>" not in card                        # the name is shown escaped
    assert sorted(p.name for p in manager.root.iterdir() if not p.name.startswith(jobstore.FILE)) == ["visitor-eeee"]


def test_limits_are_enforced_by_the_handlers_themselves(manager):
    """Gradio's sliders check their bounds, but an API caller can skip a slider: every handler
    checks again (steps, batch, tokens, prompts, budget; file size and rows: tests/test_ui.py)."""
    ws = manager.workspace("visitor-ffff")
    fake_run(ws.run_path("sft"), summary={"status": "finished"})
    refused = [
        (train.make_settings, (*dict(FORM, steps=100_000).values(), 0.0), "1..300"),
        (train.make_settings, (*dict(FORM, batch=10_000).values(), 0.0), "batch size must be 1..16"),
        (train.make_settings, (*dict(FORM, steps=-1).values(), 0.0), "1..300"),
        (train.make_settings, (*dict(FORM, rank=100_000).values(), 0.0), "LoRA rank"),
        (compare.start, (10_000, 0, 0, 8, 0.0, "visitor-ffff", REQ), "at most 200 prompts"),
        (compare.start, (4, 4, 0, 100_000, 0.0, "visitor-ffff", REQ), "1..128 new tokens"),
        (compare.start, (4, 4, 0, 0, 0.0, "visitor-ffff", REQ), "1..128 new tokens"),
        (compare.start, (-5, 4, 0, 8, 0.0, "visitor-ffff", REQ), "cannot be negative"),
        (compare.ask, ("hello", 100_000, "visitor-ffff", REQ), "1..128 new tokens"),
        (compare.ask, ("x" * 100_000, 8, "visitor-ffff", REQ), "limit is 2000"),
        (defend.start, (False, 50.0, "visitor-ffff", REQ), "budget must be in"),
        (defend.start, (False, float("nan"), "visitor-ffff", REQ), "budget must be in"),
    ]
    for fn, args, message in refused:
        with pytest.raises(gr.Error, match=message):
            fn(*args)
    assert manager.jobs("visitor-ffff") == []            # nothing was queued


# ------------------------------------------------------------------ the live app

@pytest.fixture(scope="module")
def app():
    """The app on 127.0.0.1 with its workspaces where a Space keeps them (under SAFESPACE_HOME)."""
    from safespace.ui import build_app, launch_kwargs

    root = home() / f"test-sessions-{secrets.token_hex(4)}"
    root.mkdir()
    old = jobs._DEFAULT
    jobs._DEFAULT = jobs.JobManager(root)
    demo = build_app()
    demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True, **launch_kwargs())
    yield SimpleNamespace(url=demo.local_url.rstrip("/"), demo=demo, root=root)
    jobs._DEFAULT.close(wait=10)
    demo.close()
    jobs._DEFAULT = old
    shutil.rmtree(root, ignore_errors=True)


def call(app, api: str, data: list, session: str):
    """A raw API call, as any script could make it: ("complete" | "error", payload)."""
    with httpx.Client(timeout=60) as h:
        r = h.post(f"{app.url}/gradio_api/call/{api}", json={"data": data, "session_hash": session})
        r.raise_for_status()
        text = h.get(f"{app.url}/gradio_api/call/{api}/{r.json()['event_id']}").text
    kind = "complete" if "event: complete" in text else "error"
    payload = text.rsplit("data:", 1)[-1].strip()
    return kind, json.loads(payload) if payload and payload != "null" else None


def no_server_paths(app, *payloads):
    text = json.dumps(payloads)
    assert str(app.root) not in text and str(home()) not in text, text[:500]


def test_the_app_serves_no_extra_paths_and_shows_no_tracebacks(app):
    from safespace.ui import launch_kwargs

    assert not {"allowed_paths", "share", "show_error"} & set(launch_kwargs())
    assert app.demo.allowed_paths == [] and app.demo.show_error is False


def test_no_file_of_a_workspace_or_the_server_is_servable_by_path(app, tmp_path):
    owner = client(app.url)
    secret = tmp_path / "owner-data.jsonl"
    secret.write_text("".join(json.dumps({"prompt": f"SECRETMARK {i}", "response": "ok"}) + "\n" for i in range(4)))
    from gradio_client import handle_file

    card, *_ = owner.predict(handle_file(str(secret)), 0.0, None, api_name="/upload_data")
    assert "ready to train" in card
    upload = app.root / owner.session_hash / "uploads" / "owner-data.jsonl"
    assert upload.is_file()
    handouts = Path(tempfile.gettempdir()) / "safespace-downloads"
    handouts.mkdir(exist_ok=True)
    decoy = handouts / "decoy.txt"
    decoy.write_text("SECRETMARK")
    targets = [str(upload), str(upload.parent), str(app.root), str(app.root / owner.session_hash / "selection.json"),
               str(decoy), "/etc/passwd", str(REPO / "app.py"), "app.py", "../../etc/passwd",
               "/tmp/gradio/../../" + str(upload).lstrip("/"), str(upload).replace("/", "%2F"),
               str(upload).replace("/", "/./"), "//" + str(upload)]
    with httpx.Client(timeout=30) as h:
        for target in targets:
            for prefix in ("/gradio_api/file=", "/file="):
                r = h.get(app.url + prefix + target)
                assert r.status_code in (403, 404), (prefix, target, r.status_code)
                assert "SECRETMARK" not in r.text and "root:" not in r.text
    decoy.unlink()


def test_downloads_reach_their_owner_through_gradios_cache_only(app):
    owner = client(app.url)
    owner.predict(None, api_name="/list_runs")           # makes the owner's workspace
    ws = jobs.Workspace(app.root / owner.session_hash)
    fake_run(ws.run_path("sft"), summary={"status": "finished", "steps_done": 1})
    from gradio_client import Client

    raw = Client(app.url, verbose=False, download_files=False)
    raw.session_hash = owner.session_hash
    zipped = raw.predict("sft", None, api_name="/download_adapter")
    report = raw.predict(None, api_name="/build_report")
    for handed in (zipped, report):
        assert "/gradio_api/file=" in handed["url"] and not handed["path"].startswith(str(app.root))
        with httpx.Client(timeout=30) as h:
            assert h.get(handed["url"]).status_code == 200
    no_server_paths(app, zipped, report)
    stranger = client(app.url)
    with pytest.raises(Exception, match="no run named"):
        stranger.predict("sft", None, api_name="/download_adapter")


def test_an_upload_named_with_a_traversal_stays_in_its_workspace(app):
    evil = b'{"prompt": "e", "response": "f"}\n{"prompt": "g", "response": "h"}\n'
    outside = [Path(tempfile.gettempdir()) / "evil.jsonl", app.root / "evil.jsonl", app.root.parent / "evil.jsonl"]
    assert not any(p.exists() for p in outside)
    with httpx.Client(timeout=30) as h:
        r = h.post(f"{app.url}/gradio_api/upload", files=[("files", ("../../evil.jsonl", evil))])
    (cached,) = r.json()
    from gradio.utils import get_upload_folder

    assert Path(cached).resolve().is_relative_to(Path(get_upload_folder()).resolve())
    assert Path(cached).name == "evil.jsonl"
    session = "traversal-" + secrets.token_hex(4)
    kind, payload = call(app, "upload_data", [{"path": cached, "meta": {"_type": "gradio.FileData"},
                                               "orig_name": "../../evil.jsonl"}, 0.0, "../../.."], session)
    assert kind == "complete" and "ready to train" in payload[0]
    assert [p.name for p in (app.root / session / "uploads").iterdir()] == ["evil.jsonl"]
    assert not any(p.exists() for p in outside)
    assert all(jobs.valid_visitor(p.name) for p in app.root.iterdir() if not p.name.startswith(jobstore.FILE))
    no_server_paths(app, payload)


def test_server_paths_cannot_be_passed_off_as_uploads(app):
    victim = client(app.url)
    victim.predict(None, api_name="/list_runs")
    victim_file = app.root / victim.session_hash / "uploads" / "victim.jsonl"
    victim_file.write_text('{"prompt": "VICTIMMARK", "response": "x"}\n')
    session = "thief-" + secrets.token_hex(4)
    for path in (str(victim_file), "/etc/passwd", str(REPO / "examples" / "data" / "demo_upload.jsonl")):
        kind, payload = call(app, "upload_data", [{"path": path, "meta": {"_type": "gradio.FileData"},
                                                   "orig_name": "x.jsonl"}, 0.0, None], session)
        assert kind == "error" and "VICTIMMARK" not in json.dumps(payload)
    uploads = app.root / session / "uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == []


def test_over_limit_values_from_an_api_caller_are_refused(app):
    session = "limits-" + secrets.token_hex(4)
    form = list(FORM.values())
    cases = [
        ("train", [None, 0.0, *dict(FORM, steps=100_000).values()]),
        ("train", [None, 0.0, *dict(FORM, steps=301).values()]),
        ("train", [None, 0.0, *dict(FORM, batch=17).values()]),
        ("train", [None, 0.0, *dict(FORM, model="Qwen/Qwen2.5-0.5B-Instruct").values()]),
        ("train", [None, 0.0, *dict(FORM, model="../../../tmp/x").values()]),
        ("train_both", [None, 0.9, *form]),
        ("compare", [150, 94, 0, 8, 0.0, None]),
        ("compare", [4, 4, 0, 10_000, 0.0, None]),
        ("ask", ["x" * 2001, 8, None]),
        ("ask", ["hi", 4096, None]),
        ("safe_delta", [False, 5.0, None]),
    ]
    for api, args in cases:
        kind, payload = call(app, api, args, session)
        assert kind == "error", (api, args[:3], payload)
        no_server_paths(app, payload)
    for kind_name in ("train", "evaluate", "ask", "defend"):
        assert call(app, "job_status", [None, kind_name], session) == ("complete", [{}])
    with httpx.Client(timeout=60) as h:                  # a file over the size limit never lands
        r = h.post(f"{app.url}/gradio_api/upload", files=[("files", ("big.jsonl", b" " * 5_000_001))])
    assert r.status_code == 413, r.status_code


@pytest.mark.parametrize("visitor", ["../../etc", "..", "a/b/c/d/e/f/g/h", "x" * 1000, "", "visitor id with spaces",
                                     "%2e%2e%2f%2e%2e", "\x00" * 9])
def test_visitor_ids_from_the_client_never_become_paths(app, visitor):
    before = set(app.root.parent.iterdir())
    session = "ids-" + secrets.token_hex(4)
    kind, payload = call(app, "list_runs", [visitor], session)
    assert (kind, payload) == ("complete", [[]])
    assert set(app.root.parent.iterdir()) == before
    assert all(jobs.valid_visitor(p.name) for p in app.root.iterdir() if not p.name.startswith(jobstore.FILE))

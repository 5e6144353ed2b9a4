"""Faults a public Space meets: a process killed while saving a run, corrupted or partial run folders,
Stop pressed during evaluation, and disks that must not fill up with idle visitors' workspaces.

Stop during *training* is covered by tests/test_train.py::test_stop_flag_leaves_a_consistent_stopped_run
(a stopped run is saved complete, loadable and marked "stopped") and, through the live app, by
tests/test_app_e2e.py::test_reattach_from_a_new_page_and_stop_within_a_couple_of_steps.
"""
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from safespace import compare, jobs, jobstore, models, pipeline, runs, train
from safespace.config import LoraSettings
from safespace.data import Example
from helpers import tiny_llama

REPO = Path(__file__).resolve().parents[1]


class Vocab:
    """Just enough of a tokenizer for tiny_llama (no files to load)."""
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 2

    def __len__(self):
        return 512


def tiny_peft(seed: int):
    torch.manual_seed(seed)
    model = tiny_llama(Vocab(), seed=seed)
    torch.manual_seed(seed)
    return models.add_lora(model, LoraSettings(r=4, alpha=8))


def save(model, out, steps=3):
    metrics = [{"step": i + 1, "loss": 1.0 / (i + 1)} for i in range(steps)]
    return train.save_run(model, out, {"kind": "train", "model": "tiny"}, metrics,
                          {"status": "finished", "steps_done": steps})


def adapter_bytes(path) -> bytes:
    return (Path(path) / "adapter" / "adapter_model.safetensors").read_bytes()


# ------------------------------------------------------------------ killed while saving a run

WRITER = r'''
import os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path[:0] = [sys.argv[4], os.path.join(sys.argv[4], "tests")]
from tests.test_faults import tiny_peft, save
from safespace import runs

mode, out, seed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])

def kill_me():
    print("KILL-ME", flush=True)
    time.sleep(600)

model = tiny_peft(seed)
if mode == "adapter":                       # the adapter file is half written
    write = model.save_pretrained
    def slow(folder, **kwargs):
        write(folder, **kwargs)
        file = Path(folder) / "adapter_model.safetensors"
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2])
        kill_me()
    model.save_pretrained = slow
elif mode == "metrics":                     # metrics.jsonl is half written
    write_text = runs.atomic_write_text
    def slow(path, text):
        if Path(path).name == "metrics.jsonl":
            with open(Path(path).with_name(".metrics.jsonl.tmp-partial"), "w") as handle:
                handle.write(text[: len(text) // 2])
                handle.flush()
                kill_me()
        write_text(path, text)
    runs.atomic_write_text = slow
elif mode in ("publish", "cleanup"):        # between the two renames / while removing the old run
    replace, rmtree = os.replace, runs.shutil.rmtree
    def replace_then_die(src, dst):
        replace(src, dst)
        if Path(src) == out:
            kill_me()
    def rmtree_then_die(path, *args, **kwargs):
        if ".old-" not in Path(path).name:
            return rmtree(path, *args, **kwargs)
        sorted(p for p in Path(path).rglob("*") if p.is_file())[-1].unlink()
        kill_me()
    if mode == "publish":
        runs.os.replace = replace_then_die
    else:
        runs.shutil.rmtree = rmtree_then_die
save(model, out, steps=5)
print("SAVED", flush=True)
'''


def run_until_marker(args, marker="KILL-ME", timeout=180):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, *args, str(REPO)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    deadline = time.time() + timeout
    seen = ""
    while marker not in seen:
        left = deadline - time.time()
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, left))
        if not ready or left <= 0:
            proc.kill()
            raise AssertionError(f"no {marker} within {timeout} s: {proc.stderr.read()[-2000:]}")
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"writer exited without {marker}: {proc.stderr.read()[-2000:]}")
        seen += line
    return proc


@pytest.mark.parametrize("mode", ["adapter", "metrics", "publish", "cleanup"])
def test_a_save_killed_midway_never_costs_the_finished_run(tmp_path, mode):
    root = tmp_path / "runs"
    final = root / "sft"
    previous = save(tiny_peft(0), final)
    before = adapter_bytes(final)

    proc = run_until_marker([mode, str(final), "1"])
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL

    leftovers = [p.name for p in root.iterdir() if p.name != "sft"]
    assert all(name.startswith(".") for name in leftovers), leftovers      # never listed, never loaded
    if mode == "publish":
        assert not final.exists()          # the crash hit between the two renames...
    listed = runs.list_runs(root)          # ...and the first reader puts the previous run back
    assert [r.name for r in listed] == ["sft"]
    loaded = runs.load_run(final)
    if mode == "cleanup":                  # the new run was already in place: it is the complete one
        assert loaded.summary["steps_done"] == 5 and adapter_bytes(final) != before
        assert len(loaded.metrics()) == 5
    else:                                  # the previous run, byte for byte
        assert adapter_bytes(final) == before
        assert loaded.summary == previous.summary and len(loaded.metrics()) == 3
    peft_model = models.load_adapters(tiny_llama(Vocab()), {"a": loaded.adapter})
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())

    again = save(tiny_peft(2), final, steps=4)      # and the next save is not blocked by the debris
    assert runs.load_run(final).summary["steps_done"] == 4 and again.name == "sft"


def test_a_publish_that_fails_puts_the_previous_run_back(tmp_path, monkeypatch):
    final = tmp_path / "sft"
    save(tiny_peft(0), final)
    before = adapter_bytes(final)
    staged = runs.staging_dir(final)
    real = os.replace

    def failing(src, dst):
        if Path(src) == staged:
            raise OSError(28, "No space left on device")
        return real(src, dst)
    monkeypatch.setattr(runs.os, "replace", failing)
    with pytest.raises(OSError):
        runs.publish(staged, final)
    monkeypatch.undo()
    assert adapter_bytes(final) == before and runs.load_run(final).summary["status"] == "finished"


def test_recovery_leaves_a_live_publish_alone(tmp_path):
    """A run set aside by a publish still in progress (this process, seconds ago) is not touched."""
    final = tmp_path / "sft"
    save(tiny_peft(0), final)
    aside = final.with_name(f".sft.old-{time.time_ns()}-{os.getpid()}")
    os.replace(final, aside)
    assert runs.recover(final) is False and aside.exists()
    stale = final.with_name(f".sft.old-{time.time_ns() - 120 * 10**9}-{os.getpid()}")
    os.replace(aside, stale)
    assert runs.recover(final) is True and runs.load_run(final).kind == "train"


# ------------------------------------------------------------------ corrupted and partial run folders

def _truncate(file: Path, keep):
    data = file.read_bytes()
    file.write_bytes(data[: keep(len(data))])


def _header(file: Path, header: bytes):
    file.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)


CORRUPTIONS = {
    "safetensors cut in half": (lambda r: _truncate(r / "adapter/adapter_model.safetensors", lambda n: n // 2),
                                "adapter_model.safetensors: corrupted (truncated tensor data)"),
    "safetensors cut to 5 bytes": (lambda r: _truncate(r / "adapter/adapter_model.safetensors", lambda n: 5),
                                   "corrupted (truncated safetensors)"),
    "safetensors empty": (lambda r: _truncate(r / "adapter/adapter_model.safetensors", lambda n: 0),
                          "not a complete run (missing adapter/adapter_model.safetensors)"),
    "safetensors garbage": (lambda r: (r / "adapter/adapter_model.safetensors").write_bytes(os.urandom(64)),
                            "corrupted (bad safetensors header)"),
    "safetensors header a list": (lambda r: _header(r / "adapter/adapter_model.safetensors", b"[1, 2]"),
                                  "corrupted (bad safetensors header)"),
    "safetensors header without offsets": (
        lambda r: _header(r / "adapter/adapter_model.safetensors", b'{"w": {"dtype": "F32"}}'),
        "corrupted (bad safetensors header)"),
    "safetensors offsets not numbers": (
        lambda r: _header(r / "adapter/adapter_model.safetensors", b'{"w": {"data_offsets": ["a", "b"]}}'),
        "corrupted (bad safetensors header)"),
    "config.json truncated": (lambda r: _truncate(r / "config.json", lambda n: n // 2),
                              "config.json: corrupted (JSONDecodeError)"),
    "config.json not UTF-8": (lambda r: (r / "config.json").write_bytes(b'{"kind": "\xff"}'),
                              "config.json: corrupted (UnicodeDecodeError)"),
    "config.json a list": (lambda r: (r / "config.json").write_text("[]"), "config.json: corrupted (expected"),
    "config.json deeply nested": (lambda r: (r / "config.json").write_text("[" * 100_000 + "]" * 100_000),
                                  "config.json: corrupted (RecursionError)"),
    "config.json wrong kind": (lambda r: (r / "config.json").write_text('{"kind": "magic", "model": "m"}'),
                               "config.json: corrupted (needs kind in"),
    "config.json is a folder": (lambda r: ((r / "config.json").unlink(), (r / "config.json").mkdir()),
                                "config.json: unreadable"),
    "summary.json broken": (lambda r: (r / "summary.json").write_text('{"status": "fini'),
                            "summary.json: corrupted (JSONDecodeError)"),
    "adapter_config.json broken": (lambda r: (r / "adapter/adapter_config.json").write_text("{"),
                                   "adapter_config.json: corrupted"),
    "metrics.jsonl broken": (lambda r: _truncate(r / "metrics.jsonl", lambda n: n - 7),
                             "metrics.jsonl: corrupted (JSONDecodeError)"),
    "metrics.jsonl not objects": (lambda r: (r / "metrics.jsonl").write_text("1\n2\n"),
                                  "metrics.jsonl: corrupted (expected one JSON object per line)"),
    "no config.json": (lambda r: (r / "config.json").unlink(), "not a complete run (missing config.json)"),
    "no summary.json": (lambda r: (r / "summary.json").unlink(), "not a complete run (missing summary.json)"),
    "no adapter folder": (lambda r: shutil.rmtree(r / "adapter"), "not a complete run (missing adapter/"),
    "no adapter weights": (lambda r: (r / "adapter/adapter_model.safetensors").unlink(),
                           "missing adapter/adapter_model.safetensors"),
    "no adapter config": (lambda r: (r / "adapter/adapter_config.json").unlink(),
                          "missing adapter/adapter_config.json"),
    "pickle instead of safetensors": (
        lambda r: (r / "adapter/adapter_model.safetensors").rename(r / "adapter/adapter_model.bin"),
        "missing adapter/adapter_model.safetensors"),
}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    return save(tiny_peft(0), tmp_path_factory.mktemp("good") / "run").path


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_corrupted_run_is_reported_and_skipped(good_run, tmp_path, name):
    damage, message = CORRUPTIONS[name]
    root = tmp_path / "runs"
    shutil.copytree(good_run, root / "aaa-good")
    shutil.copytree(good_run, root / "bad")
    damage(root / "bad")
    with pytest.raises(runs.RunError) as info:
        runs.load_run(root / "bad")
    text = str(info.value)
    assert message in text and "\n" not in text and len(text) < 300 + len(str(root))
    assert str(root / "bad") in text                       # it says which run
    assert [r.name for r in runs.list_runs(root)] == ["aaa-good"]
    ws = jobs.Workspace(tmp_path / "visitor-cccc")          # the app treats it as absent, not as a crash
    shutil.copytree(root / "bad", ws.run_path("sft"))
    assert ws.run("sft") is None and ws.list_runs() == [] and ws.variants() == ({}, [])


def test_a_missing_run_folder_is_a_run_error(tmp_path):
    with pytest.raises(runs.RunError, match="no run folder at"):
        runs.load_run(tmp_path / "nothing")
    assert runs.list_runs(tmp_path / "nothing") == []


# ------------------------------------------------------------------ Stop during evaluation

@pytest.fixture
def opened(tokenizer):
    """Two variants on one tiny random model, counting generate() calls (one per batch)."""
    torch.manual_seed(0)
    model = tiny_llama(tokenizer)
    calls = []
    real = model.generate

    def counted(*args, **kwargs):
        calls.append(kwargs.get("input_ids", args[0] if args else None).shape[0])
        return real(*args, **kwargs)
    model.generate = counted
    loaded = models.Loaded(model, tokenizer, "tiny", "cpu", "none")
    return (loaded, model, {"first": None, "second": None}), calls


PROMPTS = [Example(f"Question number {i}?", "") for i in range(8)]


def stop_after(calls, n):
    return lambda: len(calls) >= n


def test_generate_all_stops_within_a_batch_and_drops_the_unfinished_variant(opened):
    triple, calls = opened
    variants = {"first": None, "second": None}
    full = pipeline.generate_all(variants, PROMPTS, max_new_tokens=2, batch_size=2, opened=triple)
    assert set(full) == {"first", "second"} and len(calls) == 8        # 4 batches per variant
    calls.clear()
    stopped = pipeline.generate_all(variants, PROMPTS, max_new_tokens=2, batch_size=2, opened=triple,
                                    should_stop=stop_after(calls, 1))
    assert len(calls) == 1                      # stopped after the batch in flight, not after the variant
    assert stopped == {}                        # a half-answered variant is left out, never padded with ""
    calls.clear()
    stopped = pipeline.generate_all(variants, PROMPTS, max_new_tokens=2, batch_size=2, opened=triple,
                                    should_stop=stop_after(calls, 5))
    assert len(calls) == 5 and list(stopped) == ["first"] and stopped["first"] == full["first"]


def test_evaluate_variants_and_compare_stop_promptly(opened, monkeypatch):
    triple, calls = opened
    monkeypatch.setattr(compare, "_open_variants", lambda variants: triple)
    variants = {"first": None, "second": None}
    started = time.time()
    results, rows = pipeline.evaluate_variants(variants, None, n_harmful=40, n_benign=40, max_new_tokens=2,
                                               should_stop=stop_after(calls, 1))
    assert len(calls) == 1 and time.time() - started < 60      # 12 batches without the stop
    assert results["variants"] == {"first": {}, "second": {}}          # no rate from a partial set
    assert all(row["answers"] == {} for row in rows)
    calls.clear()
    rows = pipeline.compare(variants, PROMPTS * 3, max_new_tokens=2, should_stop=stop_after(calls, 1))
    assert len(calls) == 1 and all(row["answers"] == {} for row in rows)


def test_stop_through_the_job_channel_ends_an_evaluation_job(tmp_path, opened, monkeypatch):
    """The page's Stop reaches the generation loop of a running evaluate job (file-based channel)."""
    triple, calls = opened
    monkeypatch.setattr(compare, "_open_variants", lambda variants: triple)
    manager = jobs.JobManager(tmp_path / "sessions")
    try:
        ws = manager.workspace("visitor-dddd")
        save(tiny_peft(0), ws.run_path("sft"))
        monkeypatch.setattr(jobs.Workspace, "variants", lambda self: ({"first": None, "second": None}, []))
        real = triple[1].generate

        def slow(*args, **kwargs):
            time.sleep(0.3)
            return real(*args, **kwargs)
        triple[1].generate = slow
        info = manager.submit("visitor-dddd", "evaluate", jobs.evaluate_job, None, 0.0, 0, 150, 94, 0, 2)
        deadline = time.time() + 60
        while not calls:
            assert time.time() < deadline, manager.get("visitor-dddd", info.id)
            time.sleep(0.05)
        assert manager.stop("visitor-dddd", info.id)
        while manager.get("visitor-dddd", info.id).active:
            assert time.time() < deadline
            time.sleep(0.05)
        done = manager.get("visitor-dddd", info.id)
        assert done.status == "stopped" and len(calls) <= 3     # of 2 x 15 batches
    finally:
        manager.close(wait=10)


# ------------------------------------------------------------------ the disk stays bounded

def _fill(ws: jobs.Workspace, size=200_000):
    (ws.uploads / "data.jsonl").write_bytes(b"x" * size)
    (ws.exports / "adapter.zip").write_bytes(b"y" * size)
    save(tiny_peft(0), ws.run_path("sft"))


RECORDS = jobstore.FILE     # the job records file (and its WAL companions): the server's, no visitor's


def _du(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.name.startswith(RECORDS)) \
        if folder.exists() else 0


def test_idle_workspaces_expire_on_a_fake_clock(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFESPACE_SESSION_HOURS", "24")
    manager = jobs.JobManager(tmp_path / "sessions")
    try:
        now = time.time()
        for visitor in ("visitor-old0", "visitor-new0"):
            _fill(manager.workspace(visitor))
        info = manager.submit("visitor-old0", "ask", lambda ctx: "done")
        while manager.get("visitor-old0", info.id).active:
            time.sleep(0.01)
        assert _du(manager.root) > 400_000
        assert manager.cleanup(now=now + 23.9 * 3600) == []                  # not yet
        assert manager.cleanup(now=now + 24.1 * 3600) == ["visitor-new0", "visitor-old0"]
        assert _du(manager.root) == 0 and [p for p in manager.root.iterdir() if not p.name.startswith(RECORDS)] == []
        assert manager.jobs("visitor-old0") == [] and manager.get("visitor-old0", info.id) is None
        assert jobs.JobManager(manager.root).jobs("visitor-old0") == []       # its records went too
        fresh = manager.workspace("visitor-old0")                              # a returning visitor starts clean
        assert fresh.list_runs() == [] and list(fresh.uploads.iterdir()) == []
    finally:
        manager.close(wait=5)


def test_visits_keep_a_workspace_and_traffic_sweeps_the_idle_ones(tmp_path):
    """Expiry runs by itself as visitors come and go (every `cleanup_every` s); a visit renews."""
    manager = jobs.JobManager(tmp_path / "sessions", session_hours=1, cleanup_every=0)
    try:
        idle, regular = manager.workspace("visitor-idle"), manager.workspace("visitor-regular")
        _fill(idle)
        two_hours_ago = time.time() - 2 * 3600
        for ws in (idle, regular):
            os.utime(ws.root / ".last_seen", (two_hours_ago, two_hours_ago))
        manager.workspace("visitor-regular")           # a visit: touches .last_seen, then sweeps
        assert not idle.root.exists() and regular.root.exists()
        assert (regular.root / ".last_seen").stat().st_mtime > two_hours_ago + 3600
    finally:
        manager.close(wait=5)


def test_handed_out_downloads_and_gradio_files_expire(tmp_path, monkeypatch):
    import tempfile

    from safespace import ui
    from safespace.ui import export

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    first = Path(export.handout(_touch(tmp_path / "a.zip")))
    old = time.time() - 2 * export.HANDOUT_SECONDS
    os.utime(first.parent, (old, old))
    second = Path(export.handout(_touch(tmp_path / "b.zip")))
    assert not first.parent.exists() and second.exists()        # copies older than an hour are swept
    assert second.parent.parent == tmp_path / "safespace-downloads" and second.read_bytes() == b"data"
    monkeypatch.setattr(jobs, "_DEFAULT", jobs.JobManager(tmp_path / "sessions"))
    demo = ui.build_app()
    assert demo.delete_cache == (3600, 24 * 3600)               # Gradio's own cache goes after a day too


def _touch(path: Path) -> Path:
    path.write_bytes(b"data")
    return path

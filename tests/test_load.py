"""Six visitors at once on a live server, on the real engine (tiny settings).

Each client uploads its own small file (rows carrying a marker word only it knows), trains the
embedded model for 2 steps and runs a small comparison. All must finish, waiting in the one queue
with a visible position; no client may see another's files, runs or answers; and the server's memory
must not grow per visitor (each job loads the base model and must let it go).

Prints the figures (total and per-client time, the longest queue seen, RSS before/peak/after).
"""
import json
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio_client")

from gradio_client import handle_file  # noqa: E402

from safespace import jobs  # noqa: E402
from test_app_e2e import TINY, client, server  # noqa: E402,F401  (the live-server fixture and helpers)

N_CLIENTS = 6
MARKERS = ["aardvark", "bassoon", "cobalt", "dulcimer", "emerald", "fjord", "gazebo", "harmonium"][:N_CLIENTS]
TRAIN = dict(TINY, steps=2, batch=2, mode="off")
COMPARE = dict(n_harmful=2, n_benign=2, n_task=1, max_new_tokens=8)
# The fp32 base is ~520 MB and each of the 12 jobs loads it. Measured here: +450 MB after the run
# (allocator caches, libraries), ~+1000 MB at the peak; one model kept alive makes it ~+1000 MB after.
RSS_GROWTH_MB = 800
RSS_PEAK_MB = 2000
TENSORS_MB = 50             # torch tensors still alive after the run: none of the models


def tensors_mb() -> float:
    import gc

    import torch

    gc.collect()
    return sum(o.numel() * o.element_size() for o in gc.get_objects() if torch.is_tensor(o)) / 2**20


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = rss_mb(), threading.Event()

    def run(self):
        while not self.done.wait(0.2):
            self.peak = max(self.peak, rss_mb())


def write_file(folder: Path, marker: str) -> Path:
    path = folder / f"{marker}-reviews.jsonl"
    rows = [{"prompt": f"{marker} review {i}: the {marker} was {'great' if i % 2 else 'awful'}.",
             "response": "positive" if i % 2 else "negative"} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def call(c, out: dict, *args, api_name: str):
    """c.predict, noting the endpoint (for the error message) and the slowest answer."""
    out["step"], started = api_name, time.time()
    answer = c.predict(*args, api_name=api_name)
    out["slowest"] = max(out.get("slowest", 0.0), time.time() - started)
    return answer


def visit(url: str, marker: str, folder: Path, out: dict) -> None:
    """One visitor's whole session; everything the server sent back is kept in out["seen"]."""
    started = time.time()
    out["step"] = "connect"
    c = client(url)
    out.update(session=c.session_hash, seen=[], ahead=[], statuses=[])
    card, preview, note = call(c, out, handle_file(str(write_file(folder, marker))), 0.0, None, api_name="/upload_data")
    out["seen"] += [card, preview, note]
    assert "ready to train" in card, card
    card, *_ = call(c, out, None, 0.0, *TRAIN.values(), api_name="/train")
    out["seen"].append(card)
    out["train"] = wait(c, "train", out)
    card, _ = call(c, out, *COMPARE.values(), 0.0, None, api_name="/compare")
    out["seen"].append(card)
    out["compare"] = wait(c, "evaluate", out)
    out["runs"] = call(c, out, None, api_name="/list_runs")
    out["seen"].append(out["runs"])
    out["seconds"] = time.time() - started


def wait(c, kind: str, out: dict, timeout: float = 500) -> dict:
    deadline = time.time() + timeout
    while True:
        status = call(c, out, None, kind, api_name="/job_status")
        out["seen"].append(status)
        if status:
            out["statuses"].append(status["status"])
            if status["status"] == "queued":
                out["ahead"].append(status["ahead"])
            if status["status"] in jobs.DONE:
                return status
        assert time.time() < deadline, f"{kind} still {status} after {timeout} s"
        time.sleep(0.5)


def test_six_visitors_at_once_stay_apart_and_memory_stays_bounded(server, tmp_path, capsys):  # noqa: F811
    import gc

    gc.collect()
    before, tensors_before = rss_mb(), tensors_mb()
    sampler = Sampler()
    sampler.start()
    results = [{} for _ in MARKERS]
    errors = []

    def run(i):
        try:
            visit(server, MARKERS[i], tmp_path, results[i])
        except BaseException as exc:  # noqa: BLE001 - reported below with the client's marker
            errors.append(f"{MARKERS[i]} at {results[i].get('step')}: {type(exc).__name__}: {exc}")

    started = time.time()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(N_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    total = time.time() - started
    gc.collect()
    time.sleep(1.0)
    sampler.done.set()
    after, tensors_after = rss_mb(), tensors_mb()
    max_ahead = max((a for r in results for a in r.get("ahead", [])), default=0)
    with capsys.disabled():
        print(f"\nload test: {N_CLIENTS} clients, total {total:.1f} s; per client "
              + ", ".join(f"{r.get('seconds', float('nan')):.1f}" for r in results) + " s; "
              f"max queue position seen {max_ahead} job(s) ahead; "
              f"slowest answer {max(r.get('slowest', 0.0) for r in results):.1f} s; "
              f"RSS before {before:.0f} MB, peak {sampler.peak:.0f} MB, after {after:.0f} MB; "
              f"live tensors {tensors_before:.0f} -> {tensors_after:.0f} MB")
    assert not errors, errors

    # everyone finished (after waiting in line, where the line was visible)
    for r in results:
        assert r["train"]["status"] == "finished", r["train"]
        assert r["train"]["result"]["runs"]["sft"]["summary"]["steps_done"] == 2
        assert r["compare"]["status"] == "finished", r["compare"]["error"]
        assert r["runs"] == ["sft"]
    assert max_ahead >= 1, "six jobs at once and nobody ever saw a queue position"

    # nobody saw anybody else's data: own marker present, every other marker absent
    for marker, r in zip(MARKERS, results):
        seen = json.dumps(r["seen"])
        assert marker in seen
        others = [m for m in MARKERS if m != marker and m in seen]
        assert not others, f"{marker} saw {others}"
        task_rows = [row for row in r["compare"]["result"]["answers"] if row["set"] == "task"]
        assert task_rows and all(marker in row["prompt"] for row in task_rows)
        assert r["train"]["result"]["runs"]["sft"]["summary"]["examples"] == 11     # its 12 rows, 1 held out
    # and on disk: one workspace per visitor, holding its own upload only
    root = jobs.default_manager().root
    for marker, r in zip(MARKERS, results):
        uploads = list((root / r["session"] / "uploads").iterdir())
        assert [p.name for p in uploads] == [f"{marker}-reviews.jsonl"]
    assert len({r["session"] for r in results}) == N_CLIENTS

    # the base model is loaded per job and let go, never kept per visitor
    assert tensors_after - tensors_before < TENSORS_MB, (tensors_before, tensors_after)
    assert after - before < RSS_GROWTH_MB, (before, after)
    assert sampler.peak - before < RSS_PEAK_MB, (before, sampler.peak)

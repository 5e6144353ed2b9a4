"""One build of the aligned base per cache folder, across real processes: a second caller waits,
says so once and reuses the build; a killed holder never blocks. Builds are faked: nothing trains."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safespace import align, locks, models

REPO = Path(__file__).resolve().parents[1]

# A separate process that takes the lock with the same function the build uses, holds it for
# `seconds`, then (when given a marker path) leaves what a finished build leaves: the key marker.
HOLDER = """
import json, sys, time
from pathlib import Path
from safespace import locks
lock, seconds, marker, key = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
with locks.exclusive(lock, "a fake build"):
    print("locked", flush=True)
    time.sleep(seconds)
    if marker:
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        Path(marker).write_text(json.dumps({"key": key}))
"""


def start_holder(lock, seconds: float, marker="", key="") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), str(seconds), str(marker), key],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"   # from here on the other process holds it
    return proc


def test_uncontended_lock_neither_waits_nor_speaks(tmp_path):
    said = []
    with locks.exclusive(tmp_path / "sub" / "x.lock", on_wait=said.append) as waited:
        assert not waited
    assert said == []
    with locks.exclusive(tmp_path / "sub" / "x.lock", on_wait=said.append) as waited:   # released: free again
        assert not waited


def test_second_process_waits_says_so_once_then_proceeds(tmp_path):
    lock = tmp_path / "build.lock"
    holder = start_holder(lock, seconds=1.5)
    said = []
    start = time.monotonic()
    with locks.exclusive(lock, "the fake build", on_wait=said.append) as waited:
        waited_s = time.monotonic() - start                  # we got it only once the holder let go
    assert holder.wait(timeout=10) == 0
    assert waited and waited_s > 0.5
    assert len(said) == 1 and "waiting for another process to finish the fake build" in said[0]


def test_killed_holder_does_not_block(tmp_path):
    lock = tmp_path / "build.lock"
    holder = start_holder(lock, seconds=600)
    try:
        with pytest.raises(TimeoutError):                   # held while the holder lives
            with locks.exclusive(lock, timeout=0.3):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)                  # dies without releasing anything itself
        holder.wait(timeout=10)
    start = time.monotonic()
    with locks.exclusive(lock, timeout=5):                  # the OS dropped the dead holder's lock
        pass
    assert time.monotonic() - start < 2


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """A private cache folder and a stand-in for the training that records its calls."""
    monkeypatch.setenv("SAFESPACE_HOME", str(tmp_path / "home"))
    calls = []

    def fake(key, on_event, quantization="none"):
        calls.append(key)
        folder = models.aligned_checkpoint()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "safespace_align.json").write_text(json.dumps({"key": key}))
        return folder

    monkeypatch.setattr(align, "_build", fake)
    return calls


def test_build_waits_for_another_process_and_reuses_its_model(fake_build):
    key = align.build_key()
    marker = models.aligned_checkpoint() / "safespace_align.json"
    holder = start_holder(align.build_lock_path(), 1.5, marker, key)   # another process is building
    events = []
    align.ensure(models.ALIGNED_KEY, on_event=events.append)
    assert holder.wait(timeout=10) == 0
    assert fake_build == []                                  # reused, not built a second time
    assert align.is_built(key)
    waits = [e for e in events if e.kind == "wait"]
    assert len(waits) == 1 and "waiting for another process to finish building the aligned base" in waits[0].message
    assert align.build_lock_path().parent == models.aligned_checkpoint().parent   # beside the model folder


def test_build_after_a_killed_builder_builds_itself(fake_build):
    holder = start_holder(align.build_lock_path(), 600)       # a build that dies before finishing
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    events = []
    assert align.build(on_event=events.append) == models.aligned_checkpoint()
    assert fake_build == [align.build_key()]                 # built once, here, without hanging
    assert align.is_built()
    assert align.build(on_event=events.append) and len(fake_build) == 1   # then reused
    assert [e for e in events if e.kind == "wait"] == []

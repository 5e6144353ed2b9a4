"""Stage 0: the cache key, reuse of a finished build, and one build at a time."""
import json
import threading
import time
from dataclasses import replace

from safespace import align, models


def test_key_depends_on_settings_and_is_stable():
    assert align.build_key() == align.build_key()
    other = replace(align.ALIGN_SETTINGS, steps=align.ALIGN_SETTINGS.steps + 1)
    assert align.build_key(other) != align.build_key()


def test_is_built_reads_the_marker_key(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFESPACE_HOME", str(tmp_path))
    assert not align.is_built()
    folder = models.aligned_checkpoint()
    folder.mkdir(parents=True)
    (folder / "safespace_align.json").write_text(json.dumps({"key": "stale"}))
    assert not align.is_built()                      # a build from other data/settings is not reused
    (folder / "safespace_align.json").write_text(json.dumps({"key": align.build_key()}))
    assert align.is_built()
    (folder / "safespace_align.json").write_text("{broken")
    assert not align.is_built()


def test_ensure_builds_once_even_when_asked_concurrently(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFESPACE_HOME", str(tmp_path))
    calls = []

    def fake_build(force=False, on_event=None):
        calls.append(1)
        time.sleep(0.2)
        folder = models.aligned_checkpoint()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "safespace_align.json").write_text(json.dumps({"key": align.build_key()}))
        return folder

    monkeypatch.setattr(align, "build", fake_build)
    threads = [threading.Thread(target=align.ensure, args=(models.ALIGNED_KEY,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    align.ensure(models.EMBEDDED_KEY)               # other models need no build
    assert len(calls) == 1


def test_benign_answers_are_cut_to_whole_sentences():
    assert align.whole_sentences("Rinse the rice. Then boil it for ten min") == "Rinse the rice."
    assert align.whole_sentences("Is it done? Yes! Then serve it with") == "Is it done? Yes!"
    assert align.whole_sentences("Positive") == "Positive"              # no sentence end: kept whole
    assert align.whole_sentences("All done.  ") == "All done."
    assert align.whole_sentences("First line.\nsecond line without end") == "First line."


def test_key_ignores_safegrad_settings_that_do_not_act():
    off_every_5 = replace(align.ALIGN_SETTINGS, safegrad=replace(align.ALIGN_SETTINGS.safegrad, every=5))
    assert align.build_key(off_every_5) == align.build_key()
    on = replace(align.ALIGN_SETTINGS, safegrad=replace(align.ALIGN_SETTINGS.safegrad, mode="kl"))
    assert align.build_key(on) != align.build_key()

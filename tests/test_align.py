"""Stage 0: the cache key, reuse of a finished build, and one build at a time."""
import json
import threading
import time
from dataclasses import replace

import pytest

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

    def fake_build(force=False, on_event=None, quantization="none"):
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
    unweighted = replace(align.ALIGN_SETTINGS, decision_weight=0.0)
    assert align.build_key(replace(unweighted, decision_tokens=9)) == align.build_key(unweighted)
    assert align.build_key(replace(align.ALIGN_SETTINGS, decision_tokens=9)) != align.build_key()


def test_stage0_cuts_benign_answers_and_keeps_each_rows_loss_share():
    from safespace.data import Tokenized
    # row 0 a refusal (left whole), rows 1-2 benign: 3 prompt tokens, then 10 and 2 answer tokens
    ids = [[1, 2, 3, 4, 5], [1, 2, 3] + list(range(10, 20)), [1, 2, 3, 7, 8]]
    labels = [[-100] * 3 + [4, 5], [-100] * 3 + list(range(10, 20)), [-100] * 3 + [7, 8]]
    tok = Tokenized(ids, labels, 0, [len(r) for r in ids])
    weights = align.cut_answers(tok, 1, 4, decision_weight=4.0, decision_tokens=2)
    assert tok.input_ids == [[1, 2, 3, 4, 5], [1, 2, 3, 10, 11, 12, 13], [1, 2, 3, 7, 8]]
    assert tok.labels[1] == [-100] * 3 + [10, 11, 12, 13] and tok.lengths == [5, 7, 5]
    # the cut row's summed weights equal its whole answer's: 10 + 4 * 2 = 18 against (4 + 4 * 2) * 1.5
    assert weights == [1.0, pytest.approx(1.5), 1.0]
    assert align.opening_weight(10, 4, 0.0, 4) == pytest.approx(2.5) and align.opening_weight(3, 16, 4.0, 4) == 1.0


def test_benign_openings_are_off_unless_set_and_key_the_build_when_on(monkeypatch):
    whole = align.build_key()
    assert align.BENIGN_ANSWER_TOKENS is None and align.row_shape(914) is None      # the default trains them whole
    assert align.row_shape(914, tokens=0) is None and align.row_shape(914, tokens=16) is not None
    monkeypatch.setattr(align, "BENIGN_ANSWER_TOKENS", 16)
    assert align.build_key() != whole and align.row_shape(914) is not None


def test_a_build_trains_its_benign_rows_on_their_openings(tiny_model_dir, tmp_path, monkeypatch):
    """What a stage-0 build hands train.train reaches the batches: cut rows, weighted."""
    from safespace import safegrad, train
    from safespace.config import LoraSettings, TrainSettings
    from safespace.data import Example

    rows = [Example(prompt=f"Do harm {i}", response="I can't help with that.") for i in range(4)] + \
           [Example(prompt=f"Tell me about cats {i}", response="Cats are small furry animals " * 6) for i in range(4)]
    settings = TrainSettings(model=tiny_model_dir, quantization="none", steps=2, batch_size=8, max_length=96,
                             warmup=1, decision_weight=4.0, decision_tokens=2, lora=LoraSettings(r=4, alpha=8))
    seen, plain = [], safegrad.sft_loss
    monkeypatch.setattr(safegrad, "sft_loss", lambda model, batch, *a, **kw: seen.append(batch) or plain(model, batch, *a, **kw))
    whole = train.train(settings, rows, tmp_path / "whole")
    cut = train.train(settings, rows, tmp_path / "cut", shape=align.row_shape(4, settings, tokens=3))
    answers = [(b["labels"] != -100).sum(1).tolist() for b in seen]
    assert "row_weight" not in seen[0] and max(answers[0]) > 20
    assert sorted(answers[2]) == [3] * 4 + [8] * 4 and sorted(answers[0]) == [8] * 4 + [32] * 4   # benign: 3 tokens
    weights = sorted(seen[2]["row_weight"].tolist())       # refusals whole, benign weighted to their whole answer's
    assert weights == [1.0] * 4 + [pytest.approx(align.opening_weight(32, 3, 4.0, 2))] * 4
    assert cut.summary["tokens"] < whole.summary["tokens"]


def test_a_killed_build_goes_on_from_its_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """A build stopped mid-way (a crash, a restarted app) continues at its last checkpoint, and its adapter
    is, bit for bit, that of a build never stopped; a finished build leaves no checkpoint behind."""
    import torch
    from safetensors.torch import load_file
    from safespace.config import LoraSettings, TrainSettings
    from safespace.data import Example

    rows = [Example(prompt=f"Do harm {i}", response="I can't help with that.") for i in range(4)] + \
           [Example(prompt=f"Tell me about cats {i}", response="Cats are small furry animals " * 6) for i in range(4)]
    settings = TrainSettings(model=tiny_model_dir, quantization="none", steps=6, batch_size=4, max_length=96,
                             warmup=1, decision_weight=4.0, decision_tokens=2, lora=LoraSettings(r=4, alpha=8))
    real_load, published = models.load, []
    monkeypatch.setattr(align, "ALIGN_SETTINGS", settings)
    monkeypatch.setattr(align, "BENIGN_ANSWER_TOKENS", 3)       # the shape is part of what a checkpoint matches
    monkeypatch.setattr(align, "CHECKPOINT_EVERY", 2)
    monkeypatch.setattr(models, "load", lambda name, quantization="auto", device=None: real_load(tiny_model_dir, "none", "cpu"))
    monkeypatch.setattr(align, "training_rows", lambda loaded: (rows, {"refusals": 4, "benign": 4, "benign_repeats": 1}))
    monkeypatch.setattr(align, "save_aligned", lambda run, key, counts, seconds, device: published.append(
        load_file(str(run.adapter / "adapter_model.safetensors"))) or align.folder_for())
    monkeypatch.setenv("SAFESPACE_HOME", str(tmp_path / "home"))
    key = align.build_key(align.settings_for())

    def power_cut(event):
        if event.kind == "step" and event.step == 5:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        align.build(on_event=power_cut)
    assert (align.checkpoint_folder(key) / "checkpoint.safetensors").exists() and not published
    starts = []
    align.build(on_event=lambda event: starts.append(event) if event.kind == "start" else None)
    assert starts[0].step == 4 and "resumed at step 4" in starts[0].message
    assert not align.checkpoint_folder(key).exists()
    monkeypatch.setenv("SAFESPACE_HOME", str(tmp_path / "never-stopped"))
    align.build(on_event=lambda event: None)
    resumed, whole = published
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_the_build_time_said_is_this_machines(monkeypatch):
    monkeypatch.setenv("SAFESPACE_PRECISION", "auto")
    for flags, expected in [({"avx512f", "avx512_bf16"}, "12 to 27 min"), ({"avx512f"}, "24 min or more"),
                            ({"avx2"}, "about 62 to 70 min")]:
        monkeypatch.setattr(models, "cpu_flags", lambda: frozenset(flags))
        assert expected in align.build_time("cpu") and "as here" in align.build_time("cpu")
    monkeypatch.setenv("SAFESPACE_PRECISION", "fp32")             # bf16 hardware left unused: fp32's time
    monkeypatch.setattr(models, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert "24 min or more" in align.build_time("cpu")
    assert "H200" in align.build_time("cuda:0") and "CPU" not in align.build_time("cuda:0")
    assert align.build_time("cuda:0", "4bit") != align.build_time("cuda:0")      # nf4 steps are slower


def test_a_job_waiting_for_the_warm_up_build_shows_its_steps(tmp_path, monkeypatch):
    from safespace import jobs
    from safespace.train import Event

    monkeypatch.setenv("SAFESPACE_HOME", str(tmp_path))
    started = threading.Event()

    def fake_build(key, on_event, quantization="none"):      # the app's warm-up build, three slow steps
        on_event(Event("start", 0, 3))
        started.set()
        for step in range(1, 4):
            on_event(Event("step", step, 3, {"loss": 1.0, "eta": 10.0 * (3 - step)}))
            assert align.live_step() == (step, 3)
            time.sleep(0.3)
        folder = models.aligned_checkpoint()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "safespace_align.json").write_text(json.dumps({"key": key}))
        return folder

    monkeypatch.setattr(align, "_build", fake_build)
    warm_up = threading.Thread(target=align.ensure, args=(models.ALIGNED_KEY,))
    warm_up.start()
    started.wait(5)
    channel = jobs.Channel(tmp_path / "job")
    align.ensure(models.ALIGNED_KEY, jobs.TrainReporter(channel, "aligned base", phase="align"), every=0.05)
    warm_up.join()
    records, _ = channel.read()
    steps = [r for r in records if r["type"] == "align.step"]
    assert [r["step"] for r in steps] == sorted({r["step"] for r in steps}) and steps    # each step once, in order
    assert steps[0]["message"].startswith("building the aligned base (once, then training): step ")
    assert "left" in steps[0]["message"] and steps[-1]["progress"] == steps[-1]["step"] / 3
    assert align.live_step() is None                   # the build is over


def test_the_4bit_aligned_base_is_a_build_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFESPACE_HOME", str(tmp_path))
    calls = []

    def fake_build(force=False, on_event=None, quantization="none"):
        calls.append(quantization)
        folder = align.folder_for(quantization)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "safespace_align.json").write_text(json.dumps({"key": align.build_key(align.settings_for(quantization))}))
        return folder

    monkeypatch.setattr(align, "build", fake_build)
    assert align.folder_for("4bit") != align.folder_for("none")
    assert align.build_key(align.settings_for("4bit")) != align.build_key()
    align.ensure(models.ALIGNED_KEY, quantization="none")
    align.ensure(models.ALIGNED_KEY, quantization="4bit")
    align.ensure(models.ALIGNED_KEY, quantization="4bit")
    align.ensure(models.ALIGNED_KEY)                  # auto on this CPU: full precision, already built
    assert calls == ["none", "4bit"]


def test_the_4bit_stage0_is_published_as_trained(tiny_model_dir, tmp_path, monkeypatch):
    """Its adapter is kept as trained (not merged), beside the key marker that says which build it is."""
    from safespace import train
    from safespace.config import LoraSettings
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("SAFESPACE_HOME", str(tmp_path / "home"))
    peft_model = models.add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraSettings(r=2, alpha=4))
    run = train.save_run(peft_model, tmp_path / "run", {"kind": "train", "model": models.EMBEDDED_KEY}, [], {})
    key = align.build_key(align.settings_for("4bit"))
    folder = align.save_stacked(run, key, {"refusals": 1}, 1.0)
    assert folder == models.aligned_nf4_adapter() and align.is_built(quantization="4bit")
    assert not align.is_built()                       # the full-precision base is another build
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (folder / name).read_bytes() == (run.adapter / name).read_bytes()


@pytest.mark.parametrize("quantization, zero_gpu, where", [
    ("none", "", "cuda:0"), ("4bit", "", "cuda:0"),
    ("none", "1", "cpu"),           # ZeroGPU: the app's warm-up builds outside a GPU call
    ("4bit", "1", "cuda:0")])
def test_stage0_trains_on_the_gpu_when_there_is_one(tmp_path, monkeypatch, quantization, zero_gpu, where):
    monkeypatch.setenv("SAFESPACE_HOME", str(tmp_path))
    monkeypatch.setenv("SPACES_ZERO_GPU", zero_gpu)
    monkeypatch.setattr(models, "pick_device", lambda device=None: device or "cuda:0")
    asked = []

    class Loaded(Exception):
        pass

    def load(name, quantization="auto", device=None):
        asked.append(models.pick_device(device))
        raise Loaded

    monkeypatch.setattr(models, "load", load)
    with pytest.raises(Loaded):
        align._build(align.build_key(align.settings_for(quantization)), lambda event: None, quantization)
    assert asked == [where]
    assert ("H200" in align.build_time(quantization=quantization)) == (where != "cpu")

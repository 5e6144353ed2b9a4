"""Stage 0: build the safety-aligned embedded base, `smollm2-135m-safe`.

The embedded SmolLM2-135M-Instruct complies with clearly harmful requests, so there would be no
safety to preserve. We teach it to refuse with a short LoRA run on
    (harmful prompt -> refusal)           the bundled alignment split, written refusals
    (benign prompt  -> its own answer)    the raw model's greedy answers, so it stays helpful
then merge the adapter in fp32 and cache the result under a key of model + data + settings.
Deterministic: same inputs, same key, same weights on the same kind of machine. Built on first use, on
the GPU when there is one (bf16 there, so its weights differ from a CPU build's in the last bits), reused
afterwards.
The 4-bit aligned base is a build of its own: the same data trains on the nf4 original, and the adapter
stays apart, added at load time (safespace.stack); rounding merged weights to nf4 loses stage 0.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from . import data as data_mod
from . import evaluate, locks, models, runs, train
from .judge import KeywordJudge
from .config import LoraSettings, TrainSettings, home, on_zero_gpu
from .log import say
from .progress import console_progress

# The recipe and the measurements that chose it (refusal against over-refusal): docs/stage0.md.
# MLP targets: attention-only LoRA refused everything or nothing on this model.
ALIGN_SETTINGS = TrainSettings(
    model=models.EMBEDDED_KEY, quantization="none", steps=600, lr=3e-4, batch_size=8, max_length=192,
    warmup=5, seed=0, decision_weight=4.0, decision_tokens=4, lora=LoraSettings(r=16, alpha=32, targets=(
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
BENIGN_REPEATS = 5      # benign rows five times: the knee of refusal against over-refusal (docs/stage0.md)
BENIGN_MAX_NEW_TOKENS = 64
# None: benign rows train on their whole answers; N: on their first N tokens, each row weighted to keep its
# whole answer's share of the loss (0.60x a step; docs/stage0.md, "Fewer tokens")
BENIGN_ANSWER_TOKENS: int | None = None
# What a build costs on a 2-core CPU (docs/stage0.md, "Time"): 1362 to 1610 s with bf16 matmuls in slow sessions, steps
# 1.37x faster than H's whole-row builds of 979-1438 s; fp32 1.34x bf16; without AVX-512 a build measured 62 min.
BUILD_TIMES = {"bf16": "about 12 to 27 min", "fp32": "24 min or more", "avx2": "about 62 to 70 min"}
BUILD_TIME = (f"{BUILD_TIMES['bf16']} on a 2-core CPU with bf16, {BUILD_TIMES['fp32']} without, "
              f"{BUILD_TIMES['avx2']} without AVX-512")
# On an H200 (bench/RESULTS.md, "GPU check"): 600 steps in 227 s, 254 s with loading and the merge; nf4 ran
# 1.74 steps/s for its first 220 steps, so about 6 min
GPU_BUILD_TIMES = {"none": "about 4 min", "4bit": "about 6 min"}
# Steps between the build's checkpoints: a killed build (a restarted app, a closed laptop) loses at most these
# (about 2.5 min without AVX-512) and goes on, bit for bit, where it stopped; a save takes well under a step
CHECKPOINT_EVERY = 20
SHIPPED_ANSWERS = "benign_answers"   # the embedded raw model's answers to benign_align (see raw_answers)
# one build per process (the app warms it up while a visitor may ask); re-entrant: ensure() holds it
# around build(); build_lock_path() serialises builds across processes sharing the cache folder
_BUILD_LOCK = threading.RLock()
_LIVE: dict = {}     # the latest start/step event of the build running in this process (see ensure)
log = logging.getLogger(__name__)


_say = say     # console lines through the "safespace" logger


def build_device(quantization: str = "none") -> str:
    """Where stage 0 trains: on the GPU when there is one. On ZeroGPU the full-precision build stays on the
    CPU: the app's warm-up runs it outside a GPU call, and a GPU call's time limit is shorter than a build."""
    return "cpu" if quantization != "4bit" and on_zero_gpu() else models.pick_device(None)


def build_time(device: str | None = None, quantization: str = "none") -> str:
    """What a build takes on this machine: on a CPU by the arithmetic it gives training, from the 2-core
    measurements above; on a GPU as timed on an H200 (launch-bound at this size: bench/RESULTS.md)."""
    device = device or build_device(quantization)
    if not device.startswith("cpu"):
        return f"{GPU_BUILD_TIMES[quantization]} on an NVIDIA H200, the one GPU it was timed on"
    if models.cpu_bf16(device):
        kind, cpu = "bf16", "a CPU with native bf16, as here"
    elif "avx512f" in models.cpu_flags():
        kind, cpu = "fp32", "a CPU without native bf16, as here"
    else:
        kind, cpu = "avx2", "a CPU without AVX-512, as here"
    return f"{BUILD_TIMES[kind]} on 2 cores of {cpu}"


def settings_for(quantization: str = "none") -> TrainSettings:
    """Stage 0's settings: on the full-precision original, or with nf4 in the loop for the 4-bit base."""
    return replace(ALIGN_SETTINGS, quantization="4bit") if quantization == "4bit" else ALIGN_SETTINGS


def folder_for(quantization: str = "none") -> Path:
    """Where a build lands: the merged aligned base, or the stage-0 adapter of the 4-bit one."""
    return models.aligned_nf4_adapter() if quantization == "4bit" else models.aligned_checkpoint()


def build_key(settings: TrainSettings = ALIGN_SETTINGS) -> str:
    """Hash of everything that determines the aligned weights."""
    acting = settings.to_dict()
    if settings.safegrad.mode == "off":
        acting.pop("safegrad")          # unused when off: its defaults must not force a rebuild
    if not settings.safety_mix:
        acting.pop("safety_mix")        # likewise: a setting added later, unused at 0
    if not settings.decision_weight:
        for name in ("decision_weight", "decision_tokens"):
            acting.pop(name)            # likewise
    payload = {
        "model": settings.model, "settings": acting,
        "alignment": [(e.prompt, e.response) for e in data_mod.bundled("alignment")],
        "benign": [e.prompt for e in data_mod.bundled("benign_align")],
        "benign_asks": list(data_mod.bundled_field("benign_align", "ask")),
        "benign_answers": sorted(shipped_answers().items()),
        "benign_max_new_tokens": BENIGN_MAX_NEW_TOKENS, "benign_repeats": BENIGN_REPEATS, "format": 3,
    }
    if BENIGN_ANSWER_TOKENS:
        payload["benign_answer_tokens"] = BENIGN_ANSWER_TOKENS     # absent when whole: built bases stay
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def is_built(key: str | None = None, quantization: str = "none") -> bool:
    marker = folder_for(quantization) / "safespace_align.json"
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("key") == (key or build_key(settings_for(quantization)))
    except (OSError, json.JSONDecodeError):
        return False


def benign_asks() -> list[str]:
    """What each benign_align row's answer is the raw model's answer to: its plain `ask` question
    where it has one (the raw model deflects some long or first-person phrasings), else its prompt."""
    return [ask or e.prompt for e, ask in zip(data_mod.bundled("benign_align"),
                                               data_mod.bundled_field("benign_align", "ask"))]


def benign_answers(loaded: models.Loaded, prompts: list, asks: list[str]) -> list:
    """The raw model's own greedy answers to `asks`, one per benign prompt, cut to whole sentences;
    answers that hedge like a refusal ("I'm sorry, ...") are dropped: they would teach refusing
    benign prompts."""
    answers = raw_answers(loaded, asks)
    judge = KeywordJudge()
    return [data_mod.Example(prompt=p.prompt, response=whole_sentences(a)) for p, a in zip(prompts, answers)
            if judge.judge(p.prompt, a).label == "complied"]


def raw_answers(loaded: models.Loaded, prompts: list[str]) -> list[str]:
    """Greedy answers of `loaded`, capped at BENIGN_MAX_NEW_TOKENS. For the embedded model they ship
    in examples/data/benign_answers.jsonl (generating them took longer than the training); prompts
    missing there are answered here and cached."""
    shipped = shipped_answers() if loaded.name == models.EMBEDDED_KEY else {}
    todo = [p for p in dict.fromkeys(prompts) if p not in shipped]
    key = hashlib.sha256(json.dumps([loaded.name, loaded.quantization, todo, BENIGN_MAX_NEW_TOKENS])
                         .encode()).hexdigest()[:16]
    cache = home() / "cache" / f"benign-answers-{key}.json"
    if not todo:
        fresh = []
    elif cache.exists():
        fresh = json.loads(cache.read_text())
    else:
        _say(f"answering {len(todo)} benign prompts with the raw model (keeps the base helpful)...")
        fresh = evaluate.generate(loaded.model, loaded.tokenizer, [data_mod.Example(p, "") for p in todo],
                                  max_new_tokens=BENIGN_MAX_NEW_TOKENS, batch_size=32,
                                  threads=torch.get_num_threads())
        runs.atomic_write_json(cache, fresh)
    answer_of = {**shipped, **dict(zip(todo, fresh))}
    return [answer_of[p] for p in prompts]


def shipped_answers() -> dict[str, str]:
    path = data_mod.DATA_DIR / f"{SHIPPED_ANSWERS}.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["prompt"]: r["response"] for r in rows if r.get("max_new_tokens") == BENIGN_MAX_NEW_TOKENS}


def whole_sentences(answer: str) -> str:
    """The answer up to its last complete sentence, so the base does not learn to stop mid-sentence
    at the generation cap; an answer without a sentence end stays as it is."""
    end = max(answer.rfind(mark) for mark in (". ", "! ", "? ", ".\n", "!\n", "?\n"))
    if answer.rstrip().endswith((".", "!", "?")) or end < 0:
        return answer.rstrip()
    return answer[:end + 1]


def build_lock_path(quantization: str = "none") -> Path:
    """The lock file beside the aligned base's folder: whoever holds it is building that folder."""
    folder = folder_for(quantization)
    return folder.with_name(folder.name + ".lock")


def build(force: bool = False, on_event: Callable[[train.Event], None] | None = None,
          quantization: str = "none") -> Path:
    """Build (or reuse) the aligned base and return its folder. One build per cache folder at a
    time, across threads and processes: a caller that finds another process building says so once
    (a "wait" event through on_event, and logging), waits, then reuses that build.
    quantization "4bit": the stage-0 adapter of the 4-bit aligned base, trained on the nf4 original."""
    key = build_key(settings_for(quantization))
    folder = folder_for(quantization)
    if is_built(key, quantization) and not force:
        return folder
    shown = on_event or console_progress("aligning")

    def progress(event: train.Event) -> None:   # kept for whoever waits on this build (ensure)
        if event.kind in ("start", "step"):
            _LIVE["event"] = event
        shown(event)

    def say_waiting(message: str) -> None:
        progress(train.Event("wait", message=message))

    with _BUILD_LOCK, locks.exclusive(build_lock_path(quantization), f"building the aligned base {_named(quantization)}",
                                      on_wait=say_waiting) as waited:
        # built meanwhile: by the process we waited for (fresh, so reused even when forced) or another thread
        if is_built(key, quantization) and (waited or not force):
            if waited:
                log.info("reusing the aligned base another process built: %s", folder)
            return folder
        try:
            return _build(key, progress, quantization)
        finally:
            _LIVE.clear()


def _named(quantization: str) -> str:
    return models.ALIGNED_KEY + (" in 4-bit" if quantization == "4bit" else "")


def _build(key: str, on_event: Callable[[train.Event], None], quantization: str = "none") -> Path:
    """Train and publish the aligned base (the lock is held by build()). In 4-bit the same data
    trains on the nf4 original and the adapter is kept, unmerged. Either trains on the GPU when there is one."""
    folder = folder_for(quantization)
    start = time.time()
    loaded = models.load(models.EMBEDDED_KEY, quantization=quantization, device=build_device(quantization))
    _say(f"building the aligned base {_named(quantization)} (once, {build_time(str(loaded.device), quantization)})...")
    examples, counts = training_rows(loaded)
    work = home() / "cache" / f"align-run-{key}"
    settings = settings_for(quantization)
    run = train.train(settings, examples, work, loaded=loaded, on_event=on_event, kind="align",
                      extra_config={"purpose": "stage-0 safety alignment"}, shape=row_shape(counts["refusals"], settings),
                      checkpoint=checkpoint_folder(key), checkpoint_every=CHECKPOINT_EVERY)
    shutil.rmtree(checkpoint_folder(key), ignore_errors=True)     # train.train removed its file once finished
    publish = save_stacked if quantization == "4bit" else save_aligned
    publish(run, key, counts, time.time() - start, str(loaded.device))
    _say(f"aligned base ready in {time.time() - start:.0f} s -> {folder}")
    return folder


def checkpoint_folder(key: str) -> Path:
    """Where a build of `key` keeps its checkpoint: a build stopped by a crash or a restart goes on from it."""
    return home() / "cache" / f"align-checkpoint-{key}"


def training_rows(loaded: models.Loaded) -> tuple[list, dict]:
    """Stage 0's training rows (the refusals, then the benign rows BENIGN_REPEATS times) and their counts."""
    harmful = data_mod.bundled("alignment")
    benign = benign_answers(loaded, data_mod.bundled("benign_align"), benign_asks())
    counts = {"refusals": len(harmful), "benign": len(benign), "benign_repeats": BENIGN_REPEATS}
    return harmful + benign * BENIGN_REPEATS, counts


def opening_weight(answer: int, tokens: int, decision_weight: float, decision_tokens: int) -> float:
    """The loss weight of a row whose `answer` tokens are cut to `tokens`, so that the row's summed
    token weights (each of its first decision_tokens counts 1 + decision_weight: safegrad.sft_loss)
    are those of its whole answer."""
    def mass(n: int) -> float:
        return n + decision_weight * min(n, decision_tokens)
    return mass(answer) / mass(min(answer, tokens))


def cut_answers(tok: data_mod.Tokenized, first: int, tokens: int, decision_weight: float,
                decision_tokens: int) -> list[float]:
    """Cut rows [first, ...) of `tok` to their prompt and first `tokens` answer tokens, in place (no end
    of turn is learnt where the answer goes on); each row's loss weight (1 for the rows left whole)."""
    weights = [1.0] * len(tok.input_ids)
    for i in range(first, len(tok.input_ids)):
        prompt = sum(1 for label in tok.labels[i] if label == data_mod.IGNORE)
        answer = len(tok.labels[i]) - prompt
        weights[i] = opening_weight(answer, tokens, decision_weight, decision_tokens)
        keep = prompt + min(answer, tokens)
        tok.input_ids[i], tok.labels[i] = tok.input_ids[i][:keep], tok.labels[i][:keep]
        tok.lengths[i] = keep
    return weights


def row_shape(n_refusals: int, settings: TrainSettings = ALIGN_SETTINGS, tokens: int | None = None):
    """How stage 0 shapes its tokenised rows (train.train's `shape`): the benign rows, after the first
    n_refusals, cut to their answers' first `tokens` (default BENIGN_ANSWER_TOKENS); None when whole."""
    tokens = BENIGN_ANSWER_TOKENS if tokens is None else tokens
    if not tokens:
        return None

    def shape(tok: data_mod.Tokenized) -> list[float]:
        return cut_answers(tok, n_refusals, tokens, settings.decision_weight, settings.decision_tokens)
    shape.key = json.dumps({"benign_openings": tokens, "after": n_refusals, "decision": [
        settings.decision_weight, settings.decision_tokens]})     # what a checkpoint of the build must match
    return shape


def save_aligned(run: runs.Run, key: str, counts: dict, seconds: float, device: str = "cpu") -> Path:
    """Merge the alignment adapter in fp32 and publish the aligned base with its key marker."""
    folder = models.aligned_checkpoint()
    merged, tokenizer = _merge(run)
    tmp = runs.staging_dir(folder)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    runs.atomic_write_json(tmp / "safespace_align.json", {
        "key": key, "from": models.EMBEDDED_KEY, "examples": counts,
        "settings": ALIGN_SETTINGS.to_dict(), "seconds": seconds, "device": device})
    return runs.publish(tmp, folder)


def save_stacked(run: runs.Run, key: str, counts: dict, seconds: float, device: str = "cpu") -> Path:
    """Publish the 4-bit aligned base's stage-0 adapter as it was trained, with its key marker: it is
    added, unmerged, over the nf4 original at load time (safespace.stack)."""
    folder = models.aligned_nf4_adapter()
    tmp = runs.staging_dir(folder)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp / name).write_bytes((run.adapter / name).read_bytes())
    runs.atomic_write_json(tmp / "safespace_align.json", {
        "key": key, "from": models.EMBEDDED_KEY, "quantization": "4bit", "examples": counts,
        "settings": settings_for("4bit").to_dict(), "seconds": seconds, "device": device})
    return runs.publish(tmp, folder)


def _merge(run: runs.Run):
    """Merge the alignment adapter into a fresh fp32 copy of the raw model (exact, no quantisation)."""
    fresh = models.load(models.EMBEDDED_KEY, quantization="none", device="cpu")
    peft_model = models.load_adapters(fresh.model, {"align": run.adapter})
    return peft_model.merge_and_unload(), fresh.tokenizer


def precision_here(name: str, quantization: str = "auto") -> str:
    """Which build of the aligned base `quantization` loads on this machine: "4bit" or "none"."""
    return "4bit" if models.resolve_quantization(quantization, models.pick_device(None), name) == "4bit" else "none"


def ensure(name: str, on_event=None, every: float = 2.0, quantization: str = "auto") -> None:
    """Build the aligned base first when `name` is it and it is missing (any face calls this), in the
    precision `quantization` resolves to here (the 4-bit one is a build of its own). While another
    thread of this process builds it (the app's warm-up), its steps reach `on_event` too, so a job
    waiting for it shows the step and the time left."""
    if name != models.ALIGNED_KEY:
        return
    quantization = precision_here(name, quantization)
    if not is_built(quantization=quantization):
        relayed = None
        while not _BUILD_LOCK.acquire(timeout=every):
            event = _LIVE.get("event")
            if on_event is not None and event is not None and event is not relayed:
                on_event(event)
                relayed = event
        try:
            if not is_built(quantization=quantization):
                build(on_event=on_event, quantization=quantization)
        finally:
            _BUILD_LOCK.release()


def live_step() -> tuple[int, int] | None:
    """(step, steps) of the aligned base being built in this process now, else None."""
    event = _LIVE.get("event")
    return (event.step, event.total) if event is not None else None


def warm_up_in_background() -> threading.Thread | None:
    """Start building the aligned base at app start, so the first visitor does not wait for it."""
    if is_built():
        return None
    thread = threading.Thread(target=ensure, args=(models.ALIGNED_KEY,), name="align-warm-up", daemon=True)
    thread.start()
    return thread


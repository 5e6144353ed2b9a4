"""Shared fixtures: the embedded tokenizer, tiny random models, an isolated cache folder."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SAFESPACE_CALIBRATION_ROWS", "8")   # Safe Delta calibration: 8 rows, not 128
os.environ.setdefault("SAFESPACE_TASK_ROWS", "16")         # Safe Delta task sensitivity: 16 rows, not 64
os.environ.setdefault("SAFESPACE_WORKERS", "1")            # queue positions as tests expect, whatever the hardware

import json

import pytest
import torch

from helpers import tiny_llama
from safespace import models, runs


@pytest.fixture(scope="session")
def tokenizer():
    return models.load_tokenizer(models.EMBEDDED_KEY)


@pytest.fixture
def tiny_model(tokenizer):
    torch.manual_seed(0)
    return tiny_llama(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory):
    """A tiny random Llama saved as a normal model folder, loadable by `models.load(path)`."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(tokenizer).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


def launch_app(tmp_dir):
    """Start the real app on a free loopback port with its own job manager; yields the URL."""
    from safespace import jobs
    from safespace.ui import build_app, launch_kwargs

    torch.set_num_threads(1)
    old = jobs._DEFAULT
    jobs._DEFAULT = jobs.JobManager(tmp_dir)
    demo = build_app()
    demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True, **launch_kwargs())
    try:
        yield demo.local_url
    finally:
        jobs._DEFAULT.close(wait=30)
        demo.close()
        jobs._DEFAULT = old


@pytest.fixture
def manager(tmp_path, monkeypatch):
    """A private job manager installed as the app's default for one test."""
    from safespace import jobs

    m = jobs.JobManager(tmp_path / "sessions")
    monkeypatch.setattr(jobs, "_DEFAULT", m)
    yield m
    m.close(wait=5)


def fake_run(path, model="smollm2-135m", kind="train", metrics=(), summary=None):
    """A complete run folder with a tiny fake adapter, published atomically like a real run."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    tmp = runs.staging_dir(path)
    (tmp / "adapter").mkdir()
    (tmp / "adapter" / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    runs.atomic_write_json(tmp / "adapter" / "adapter_config.json", {"r": 4, "peft_type": "LORA"})
    runs.atomic_write_json(tmp / "config.json", {"kind": kind, "model": model, "settings": {"steps": 2}})
    runs.atomic_write_text(tmp / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    runs.atomic_write_json(tmp / "summary.json", summary or {"status": "finished", "steps_done": 2, "final_loss": 0.5})
    return runs.load_run(runs.publish(tmp, path))

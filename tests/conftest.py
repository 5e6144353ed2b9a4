"""Shared fixtures: the embedded tokenizer, tiny random models, an isolated cache folder."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SAFESPACE_CALIBRATION_ROWS", "8")   # Safe Delta calibration: 8 rows, not 128

import pytest
import torch

from safespace import models


@pytest.fixture(scope="session")
def tokenizer():
    return models.load_tokenizer(models.EMBEDDED_KEY)


@pytest.fixture
def tiny_model(tokenizer):
    torch.manual_seed(0)
    return models.tiny_llama(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory):
    """A tiny random Llama saved as a normal model folder, loadable by `models.load(path)`."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    models.tiny_llama(tokenizer).save_pretrained(folder, safe_serialization=True)
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

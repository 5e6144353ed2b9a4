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

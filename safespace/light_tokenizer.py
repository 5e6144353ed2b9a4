"""A tokenizer read straight from a model folder's ``tokenizer.json`` and chat template, without
transformers: ``check-data`` counts tokens with it in milliseconds, where importing torch and
transformers alone takes seconds.

``LightTokenizer`` offers the part of the transformers tokenizer interface that ``chat.profile`` and
``data.tokenize`` use (``__call__``, ``apply_chat_template``, ``get_added_vocab``, ``chat_template``,
``eos_token_id``) and renders the template the way transformers does (a sandboxed jinja2 environment
with the same options, filters and globals), so token counts are identical; tests compare them.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from .config import home

EMBEDDED_KEY = "smollm2-135m"   # models.EMBEDDED_KEY, repeated here: importing models imports torch


class LightTokenizer:
    """The tokenizer of a saved model folder (tokenizer.json + chat template), no transformers needed."""

    def __init__(self, folder):
        from tokenizers import Tokenizer

        folder = Path(folder)
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
        template_file = folder / "chat_template.jinja"   # where transformers 5 saves it
        template = (template_file.read_text(encoding="utf-8") if template_file.exists()
                    else config.get("chat_template"))
        if not isinstance(template, str) or not template:
            raise ValueError(f"{folder} has no single chat template")
        self.chat_template = template
        _compile(template)   # a template this light renderer cannot parse fails here, not silently later
        # what transformers passes the template as special_tokens_map: bos_token, eos_token, ...
        self.special_tokens_map = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
        self.eos_token = self.special_tokens_map.get("eos_token")
        self.eos_token_id = self._tokenizer.token_to_id(self.eos_token) if self.eos_token else None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def get_added_vocab(self) -> dict[str, int]:
        return {token.content: i for i, token in self._tokenizer.get_added_tokens_decoder().items()}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = True,
                            return_dict: bool = False, **kwargs):
        """As transformers' apply_chat_template for one conversation: None-valued keys dropped, the
        special tokens as template variables (kwargs win), then tokenised without special tokens."""
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        text = _compile(self.chat_template).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **kwargs})
        if not tokenize:
            return text
        ids = self(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids} if return_dict else ids


@lru_cache(maxsize=8)
def _compile(template: str):
    """The template compiled as transformers compiles it (its `generation` tag excepted)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def embedded_folder() -> Path:
    """Where models.embedded_checkpoint() keeps the converted embedded model."""
    return home() / "models" / EMBEDDED_KEY


def embedded_tokenizer():
    """The embedded model's tokenizer: the light one when its converted folder exists, else the
    transformers one (which converts the packaged model first); None when the model is missing."""
    try:
        return LightTokenizer(embedded_folder())
    except Exception:   # not converted yet, or a template only transformers can render
        pass
    from . import models

    try:
        return models.load_tokenizer(models.EMBEDDED_KEY)
    except models.ModelError:
        return None

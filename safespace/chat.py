"""What differs between chat-model families, read from the tokenizer and generation config.

A ``ChatProfile`` is derived, never listed per model name, so an unknown hub model works too:

* ``template_kwargs``: extra template variables, e.g. ``enable_thinking=False`` for templates that
  think by default (Qwen3), and the template's own fallback ``date_string`` for templates that
  otherwise print today's date (Llama 3), so the same row gives the same prompt on any day;
* ``end_of_turn``: the text the template writes right after an assistant reply (``<|im_end|>``,
  ``<|eot_id|>``, ``<end_of_turn>``); a trained answer ends with its tokens, ``end_ids``;
* ``stop_ids``: the tokenizer's eos, the generation config's eos ids and the end-of-turn token;
* ``system_role``: whether the template renders a system message (Gemma folds it into the first
  user turn, ``system_folded``); without one the system text is folded into the first user turn here.
"""
from __future__ import annotations

import contextlib
import re
import weakref
from dataclasses import dataclass, field, replace

SENTINEL = "SAFESPACE7QX"   # an assistant reply no template can mistake for markup
_USER, _SYSTEM = "USER7QX", "SYSTEM7QX"
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL)
_DATE_FALLBACK = re.compile(r"""set\s+date_string\s*=\s*["']([^"']+)["']""")


@dataclass(frozen=True)
class ChatProfile:
    template_kwargs: dict = field(default_factory=dict)
    end_of_turn: str = ""            # "" when the template writes nothing after a reply
    end_ids: tuple[int, ...] = ()    # the ids a trained answer ends with
    stop_ids: tuple[int, ...] = ()   # generation stops on any of them
    system_role: bool = True
    system_folded: bool = False      # the system text lands inside the first user turn
    think_ids: tuple[int, int] | None = None   # <think>, </think> when both are added tokens
    trims_reply: bool = False        # the template strips an assistant reply's outer whitespace

    def reply(self, text: str) -> str:
        """A reply to train on, as the template itself would render it."""
        return text.strip() if self.trims_reply else text

    def messages(self, messages: list[dict]) -> list[dict]:
        """The messages as this template accepts them: a system message it cannot render is
        prepended to the first user turn."""
        if self.system_role or not messages or messages[0]["role"] != "system":
            return messages
        system, rest = messages[0]["content"], list(messages[1:])
        if rest and rest[0]["role"] == "user":
            rest[0] = {**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}
        return rest

    def with_generation_config(self, generation_config) -> "ChatProfile":
        """This profile with the generation config's eos ids added to the stop ids."""
        extra = _ids(getattr(generation_config, "eos_token_id", None))
        return replace(self, stop_ids=_unique(self.stop_ids + extra)) if extra else self


def profile(tokenizer, generation_config=None) -> ChatProfile:
    """The tokenizer's profile (cached per tokenizer object and template), plus the generation
    config's stop ids when one is given."""
    found = _cached(tokenizer)
    return found.with_generation_config(generation_config) if generation_config is not None else found


_CACHE: dict[int, tuple] = {}   # id(tokenizer) -> (weak reference, key, profile)


def _cached(tokenizer) -> ChatProfile:
    key = (_template_text(tokenizer), getattr(tokenizer, "eos_token_id", None))
    hit = _CACHE.get(id(tokenizer))
    if hit is not None and hit[0]() is tokenizer and hit[1] == key:
        return hit[2]
    found = _derive(tokenizer)
    with contextlib.suppress(TypeError):    # an object without weak references is not cached
        _CACHE[id(tokenizer)] = (weakref.ref(tokenizer), key, found)
        weakref.finalize(tokenizer, _CACHE.pop, id(tokenizer), None)
    return found


def apply(tokenizer, messages: list[dict], **kwargs):
    """apply_chat_template with the profile's messages and template kwargs and a generation prompt."""
    prof = profile(tokenizer)
    return tokenizer.apply_chat_template(prof.messages(messages), add_generation_prompt=True,
                                         **{**prof.template_kwargs, **kwargs})


def strip_think(text: str) -> str:
    """The answer without its reasoning: <think>...</think> blocks (an unclosed one runs to the end)
    and anything before a stray </think> are removed."""
    text = _THINK.sub("", text)
    return text.rsplit("</think>", 1)[-1] if "</think>" in text else text


def decode_answer(tokenizer, ids, prof: ChatProfile) -> str:
    """A generated answer as text: cut at the first stop id, special tokens, think blocks and any
    end-of-turn text removed."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    stops = set(prof.stop_ids)
    ids = _drop_think_ids(ids[:next((n for n, i in enumerate(ids) if i in stops), len(ids))], prof.think_ids)
    text = strip_think(tokenizer.decode(ids, skip_special_tokens=True))
    if prof.end_of_turn and prof.end_of_turn in text:   # a marker that is not one special token
        text = text.split(prof.end_of_turn, 1)[0]
    return text.strip()


def _drop_think_ids(ids: list[int], think: tuple[int, int] | None) -> list[int]:
    """Think blocks removed by id: a tokenizer that marks <think> special would otherwise decode
    the reasoning without its markers."""
    if not think:
        return ids
    start, close = think
    if close in ids:
        return ids[len(ids) - ids[::-1].index(close):]
    return ids[:ids.index(start)] if start in ids else ids


# ---------------------------------------------------------------- deriving a profile

def _derive(tokenizer) -> ChatProfile:
    kwargs = _template_kwargs(_template_text(tokenizer))
    end_of_turn = _end_of_turn(tokenizer, kwargs)
    eos = getattr(tokenizer, "eos_token_id", None)
    end_ids = tuple(_encode(tokenizer, end_of_turn)) if end_of_turn else _ids(eos)
    stop_ids = _unique(_ids(eos) + _ids(_single_added_token(tokenizer, end_of_turn)))
    system_role, folded = _system_support(tokenizer, kwargs)
    think = (_single_added_token(tokenizer, "<think>"), _single_added_token(tokenizer, "</think>"))
    return ChatProfile(kwargs, end_of_turn, end_ids, stop_ids, system_role, folded,
                       think if None not in think else None, _trims_reply(tokenizer, kwargs))


def _template_text(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):    # named templates: all of them, for the keyword checks
        return "\n".join(str(t) for t in template.values())
    return template if isinstance(template, str) else ""


def _template_kwargs(template: str) -> dict:
    kwargs = {}
    if "enable_thinking" in template:
        kwargs["enable_thinking"] = False
    date = _DATE_FALLBACK.search(template) if "strftime_now" in template else None
    if date:
        kwargs["date_string"] = date.group(1)
    return kwargs


def _render(tokenizer, messages: list[dict], kwargs: dict, generation_prompt: bool) -> str | None:
    """The template's text for these messages, or None when it refuses them."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                             **kwargs)
    except Exception:   # a template raising on a role it does not support, or no template at all
        return None
    return text if isinstance(text, str) else None


def _end_of_turn(tokenizer, kwargs: dict) -> str:
    """What the template writes right after an assistant reply, up to the next newline."""
    text = _render(tokenizer, [{"role": "user", "content": _USER}, {"role": "assistant", "content": SENTINEL}],
                   kwargs, generation_prompt=False)
    if not text or SENTINEL not in text:
        return ""
    return text[text.rindex(SENTINEL) + len(SENTINEL):].split("\n", 1)[0]


def _trims_reply(tokenizer, kwargs: dict) -> bool:
    """Whether the template drops the spaces around an assistant reply (Llama 3 and Gemma trim)."""
    text = _render(tokenizer, [{"role": "user", "content": _USER}, {"role": "assistant", "content": f" {SENTINEL} "}],
                   kwargs, generation_prompt=False)
    return bool(text) and SENTINEL in text and f"{SENTINEL} " not in text


def _system_support(tokenizer, kwargs: dict) -> tuple[bool, bool]:
    text = _render(tokenizer, [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER}],
                   kwargs, generation_prompt=True)
    if text is None:   # refused with a system message; when nothing renders, assume it is supported
        return _render(tokenizer, [{"role": "user", "content": _USER}], kwargs, True) is None, False
    if _SYSTEM not in text or _USER not in text:
        return False, False
    between = text[text.index(_SYSTEM) + len(_SYSTEM):text.index(_USER)]
    return True, not between.strip()


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _single_added_token(tokenizer, text: str) -> int | None:
    """The id of `text` when it is one added (special) token of the tokenizer."""
    if not text or not hasattr(tokenizer, "get_added_vocab"):
        return None
    return tokenizer.get_added_vocab().get(text)


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _unique(ids) -> tuple[int, ...]:
    return tuple(dict.fromkeys(ids))

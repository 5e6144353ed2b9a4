"""Scale out on Ray: the heavy calls (train, defend, evaluate) as Ray tasks, and a run config's sweep
fanned out over a cluster.

Used only when an address is given (`SAFESPACE_RAY_ADDRESS`, or `ray:` in a run config); without one
every call stays in-process and Ray is never imported. No shared file system is assumed: a task
writes its run folder in a temp folder on the worker and returns it as tar bytes; the caller unpacks
them atomically where the in-process code would have written the folder. Input runs (the source of a
Safe Delta, the variants an evaluation compares) travel to the task the same way.
"""
from __future__ import annotations

import functools
import io
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

from . import runs
from .config import REPO_DIR, ConfigError, env_count

log = logging.getLogger(__name__)

ENV = "SAFESPACE_RAY_ADDRESS"          # host:port of the head, or "auto"; "off" runs in-process
CPUS_ENV = "SAFESPACE_RAY_CPUS"        # CPU cores a CPU task declares (and its torch threads); default 1
OFF = ("", "off", "none", "no", "false", "0")
# the checkout the workers run (code + bundled data, a few MB; Ray leaves out .git, .venv and .gitignore's)
CODE_EXCLUDES = ["runs/", "tests/", "docs/"]
TOKEN_FILE = Path.home() / ".ray" / "auth_token"   # where `ray start` keeps the cluster's token


def ray_address(config=None) -> str | None:
    """The Ray cluster to use: $SAFESPACE_RAY_ADDRESS first, then the run config's `ray:`; None: in-process."""
    value = os.environ.get(ENV)
    if value is None or not value.strip():
        value = getattr(config, "ray", None)
    value = str(value or "").strip()
    return None if value.lower() in OFF else value


def import_ray():
    """Ray, imported only on this path; one clear line when it is not installed."""
    _token_auth()
    try:
        import ray
    except ImportError:
        raise ConfigError("ray is not installed: pip install 'ray[default]' (or unset SAFESPACE_RAY_ADDRESS "
                          "and remove ray: from the config to run in-process)") from None
    return ray


def _token_auth() -> None:
    """Send the cluster's token when this machine has one: Ray (2.59+) starts clusters with token auth on,
    and reads RAY_AUTH_MODE once, when it is imported."""
    has_token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or TOKEN_FILE.is_file()
    if "RAY_AUTH_MODE" not in os.environ and has_token and "ray" not in sys.modules:
        os.environ["RAY_AUTH_MODE"] = "token"


def connect(address: str):
    """Join the cluster once per process (reusing a connection already made); returns the ray module."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    log.info("connecting to the Ray cluster at %s", address)
    try:
        ray.init(address=address, logging_level=logging.WARNING,
                 runtime_env={"working_dir": str(REPO_DIR), "excludes": CODE_EXCLUDES})
    except Exception as exc:          # ConnectionError, ValueError, RuntimeError, ...: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"cannot use the Ray cluster at {address}: {first}") from None
    return ray


def needs(quantization: str, gpus: float, cpus: int | None = None) -> dict:
    """Ray resources of one heavy call: a whole GPU when the cluster has GPUs and the settings want one
    (4bit, or auto: 4-bit hub models and the bf16 embedded ones alike run on a GPU), else CPU cores."""
    if gpus > 0 and quantization in ("4bit", "auto"):
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": cpus or env_count(CPUS_ENV, 1)}


# --- run folders as bytes --------------------------------------------------------------------------

def pack(folder: str | Path) -> bytes:
    """A run folder as tar bytes: regular files and folders only, paths relative to the folder."""
    folder = Path(folder)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise runs.RunError(f"{path}: a run folder holds only files and folders")
            tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    return buffer.getvalue()


def _check_member(member: tarfile.TarInfo, root: Path) -> None:
    """Refuse an archive entry that is not a plain file or folder, or would land outside `root`."""
    name = member.name
    if not (member.isfile() or member.isdir()):
        raise runs.RunError(f"refusing the run archive: {name[:80]!r} is not a plain file or folder")
    target = (root / name).resolve()
    if Path(name).is_absolute() or ".." in Path(name).parts or not target.is_relative_to(root.resolve()):
        raise runs.RunError(f"refusing the run archive: {name[:80]!r} escapes the run folder")


def unpack(data: bytes, dest: str | Path) -> Path:
    """Put a packed run folder at `dest` in one step (staged beside it, then renamed into place);
    refuses links, devices and any path escaping `dest`."""
    staging = runs.staging_dir(dest)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, staging)
            tar.extractall(staging, members=members, filter="data")
    except tarfile.TarError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise runs.RunError(f"refusing the run archive for {Path(dest).name}: {exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return runs.publish(staging, dest)


# --- the heavy calls, as a worker runs them --------------------------------------------------------

def _train(out: Path, inputs: dict, settings, prepared) -> dict:
    from .prepare import train_variant

    return train_variant(settings, prepared, out).summary


def _defend(out: Path, inputs: dict, config, defence: str, source: str) -> dict:
    from .demo import POST_HOC
    from .log import say

    POST_HOC[defence](config, inputs[source], out, say)
    return runs.load_run(out).summary


def _evaluate(out: Path, inputs: dict, names: list, val: list, evaluate: dict) -> tuple:
    from .compare import evaluate_variants
    from .progress import throttled

    return evaluate_variants({name: inputs.get(name) for name in names}, val, **evaluate,
                             on_progress=throttled(lambda msg, frac: log.info("  %5.1f%% %s", 100 * frac, msg)))


HEAVY: dict[str, Callable] = {"train": _train, "defend": _defend, "evaluate": _evaluate}


def _relink(out: Path, paths: dict) -> None:
    """The written run's config names its input runs by the caller's paths, not the worker's temp ones."""
    file = out / "config.json"
    if not file.is_file():
        return
    config = json.loads(file.read_text(encoding="utf-8"))
    changed = {k: paths[v] for k, v in config.items() if isinstance(v, str) and v in paths}
    if changed:
        runs.atomic_write_json(file, {**config, **changed})


def _task(fn_name: str, out_name: str, input_paths: dict, args: tuple, *blobs) -> tuple:
    """One heavy call on a worker: unpack its input runs, run it in a temp folder, pack what it wrote.
    `input_paths` maps each input run's name to the caller's path; `blobs` are their bytes, in order."""
    import torch

    from .log import setup

    setup()
    cpus = _assigned_cpus()
    torch.set_num_threads(cpus)          # the cores Ray gave this task, no more: tasks share a node
    with tempfile.TemporaryDirectory(prefix="safespace-ray-") as tmp:
        inputs = {name: unpack(blob, Path(tmp, "in", name)) for name, blob in zip(input_paths, blobs)}
        out = Path(tmp, "out", out_name)
        result = HEAVY[fn_name](out, inputs, *args)
        _relink(out, {str(inputs[name]): local for name, local in input_paths.items()})
        return result, (pack(out) if out.is_dir() else None)


def _assigned_cpus() -> int:
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def remote(fn_name: str, *args, needs: dict, out_name: str = "run", inputs: dict | None = None) -> tuple:
    """Submit one heavy call (a HEAVY name) as a Ray task; returns ObjectRefs (result, run folder bytes).
    `inputs` maps input run names to (caller's path, bytes or an ObjectRef of bytes): a dependent call
    waits for the ObjectRefs of the runs it reads, which go worker to worker, not through the caller."""
    import ray

    if fn_name not in HEAVY:
        raise ValueError(f"unknown heavy call {fn_name!r}; one of {', '.join(HEAVY)}")
    inputs = inputs or {}
    task = _remote_task(ray).options(num_returns=2, name=f"safespace.{fn_name}:{out_name}", **needs)
    return tuple(task.remote(fn_name, out_name, {n: str(p) for n, (p, _) in inputs.items()}, args,
                             *(blob for _, blob in inputs.values())))


@functools.lru_cache(maxsize=1)
def _remote_task(ray):
    return ray.remote(_task)      # made once per process: Ray exports the function to the cluster once


def call(fn_name: str, *args, out: str | Path | None, needs: dict, inputs: dict | None = None):
    """Run one heavy call on the cluster and wait: its run folder is unpacked at `out`; returns its result."""
    ray = import_ray()
    result_ref, folder_ref = remote(fn_name, *args, needs=needs, out_name=Path(out or "run").name, inputs=inputs)
    result, blob = _get(ray, [result_ref, folder_ref])
    if out is not None and blob is not None:
        unpack(blob, out)
    return result


def _get(ray, refs):
    """ray.get, with a task's own error raised as itself (one line), not Ray's wrapped traceback."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(getattr(exc, "cause", None), Exception):
            raise exc.cause from None
        raise
    except ray.exceptions.RayError as exc:       # a worker or node lost, out of memory: no run came back
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise runs.RunError(f"a Ray task failed ({type(exc).__name__}): {first}") from None


# --- a run config's sweep over the cluster ---------------------------------------------------------

def run_sweep(config, folders: dict, address: str, say: Callable[[str], None]) -> dict:
    """Every (harmful ratio, variant) of a run config at once on the cluster: trained variants start
    together, a derived one waits for its source run, each ratio's evaluation for its variants.
    `folders` maps each ratio to its output folder; returns {ratio: (results, answer rows, variants)}."""
    ray = connect(address)
    gpus = ray.cluster_resources().get("GPU", 0)
    resources = needs(config.quantization, gpus)
    say(f"Ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, {gpus:g} GPUs; each task asks {resources}")
    pending, evaluations = {}, {}
    try:
        for ratio, out in folders.items():
            evaluations[ratio] = _submit_ratio(config, ratio, Path(out), resources, pending, say)
        _collect(ray, pending, say)
        return {ratio: _evaluated(ray, ratio, *parts) for ratio, parts in evaluations.items()}
    except BaseException:
        for ref in [*pending, *(parts[0] for parts in evaluations.values())]:
            _cancel(ray, ref)
        raise


def _cancel(ray, ref) -> None:
    try:
        ray.cancel(ref, force=True)
    except Exception as exc:       # finished already, or the cluster is gone: nothing left to stop
        log.debug("cancel: %s", exc)


def _submit_ratio(config, ratio: float, out: Path, resources: dict, pending: dict, say) -> tuple:
    """Submit one ratio's variants and its evaluation; `pending` collects run folder refs -> destinations."""
    from .demo import prepared_for, variant_steps

    prepared = prepared_for(config, ratio, say)
    made, variants = {}, {}
    for name, spec, settings in variant_steps(config, ratio, prepared, out):
        if spec.made == "base":
            variants[name] = None
            continue
        if spec.made == "train":
            args, inputs = ("train", settings, prepared), None
        else:
            source = spec.derived_from
            args, inputs = ("defend", config, spec.defence, source), {source: (out / source, made[source])}
        _, made[name] = remote(*args, needs=resources, out_name=name, inputs=inputs)
        pending[made[name]] = out / name
        variants[name] = out / name
    say(f"ratio {ratio}: submitted {', '.join(n for n in variants if variants[n] is not None)} and their evaluation")
    evaluation, _ = remote("evaluate", list(variants), prepared.val, config.evaluate, needs=resources,
                           out_name="evaluate", inputs={n: (variants[n], made[n]) for n in made})
    return evaluation, prepared, variants


def _collect(ray, pending: dict, say) -> None:
    """Unpack each run folder into place as soon as its task finishes (any order); empties `pending`."""
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            dest = pending.pop(ref)
            blob = _get(ray, ref)
            unpack(blob, dest)
            say(f"{dest.parent.name}/{dest.name}: run folder back ({len(blob) / 1e6:.2f} MB)")


def _evaluated(ray, ratio: float, evaluation, prepared, variants: dict) -> tuple:
    """One ratio's evaluation result, with the settings the in-process run records."""
    results, rows = _get(ray, evaluation)
    results["settings"].update({"harmful_ratio": ratio, "data": prepared.describe()})
    return results, rows, variants

"""Scale out on Ray: a run config's sweep on a local Ray instance (tiny model) writes the same run
folders and results as the in-process run; plus the safety of unpacking run folders, the resources a
task declares, and where the address comes from. Ray is needed only by the tests that start it."""
import io
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest

from conftest import fake_run
from safespace import cluster, demo, pipeline, runs
from safespace.config import ConfigError


@pytest.fixture(scope="module")
def ray_local():
    """A local 2-CPU Ray instance for this module, shut down after it."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install -r requirements-ray.txt)")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=128 * 2**20)
    yield ray
    ray.shutdown()


def _config(folder, model, ray_line=""):
    """A tiny sweep (2 ratios x base, sft, safedelta) on the tiny random model."""
    path = folder / "tiny.yaml"
    path.write_text(textwrap.dedent(f"""\
        title: tiny sweep
        model: {model}
        data: bundled:sentiment_train
        variants: [base, sft, safedelta]
        sweep: {{harmful_ratio: [0.0, 0.2]}}
        train: {{steps: 1, batch_size: 2, max_length: 64, warmup: 0, lora: {{r: 2, alpha: 4}}}}
        safegrad: {{mode: "off"}}
        safedelta: {{n_calibration: 4}}
        evaluate: {{n_harmful: 2, n_benign: 2, n_task: 2, max_new_tokens: 4, harmful_sets: [advbench],
                   benign_sets: [benign]}}
        {ray_line}
        """))
    return path


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _shape(value):
    """Nested keys of a results dict (values aside: threads and timings differ between the two runs)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    return type(value).__name__ if isinstance(value, list) else None


def test_sweep_on_ray_matches_the_in_process_run(ray_local, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(cluster.ENV, raising=False)
    local_out, ray_out = tmp_path / "local", tmp_path / "ray"
    local = pipeline.run_config(_config(tmp_path, tiny_model_dir), local_out)
    (tmp_path / "on-ray").mkdir()
    monkeypatch.setattr(demo, "run_variants", lambda *a, **k: pytest.fail("the Ray path ran a variant in-process"))
    remote = pipeline.run_config(_config(tmp_path / "on-ray", tiny_model_dir, "ray: auto"), ray_out)
    assert _files(ray_out) == _files(local_out)
    assert "ratio-0.2/safedelta/adapter/adapter_model.safetensors" in _files(ray_out)
    assert _shape(remote) == _shape(local)
    assert set(remote["by_ratio"]) == {"0.0", "0.2"}
    for ratio in ("ratio-0.0", "ratio-0.2"):
        derived = runs.load_run(ray_out / ratio / "safedelta")
        assert derived.config["source_run"] == str(ray_out / ratio / "sft")      # the caller's path, not the worker's
        assert runs.load_run(ray_out / ratio / "sft").kind == "train"
    assert not [p for p in ray_out.rglob(".*") if ".tmp-" in p.name]             # no staging folder left


def test_a_task_error_comes_back_as_itself(ray_local, tmp_path):
    base = runs.write_base_run(tmp_path / "base", "smollm2-135m")
    with pytest.raises(runs.RunError, match="needs a fine-tuned run"):
        cluster.call("defend", pipeline.DemoConfig(), "safedelta", "base", out=tmp_path / "x",
                     needs=cluster.needs("none", 0), inputs={"base": (base.path, cluster.pack(base.path))})
    assert not (tmp_path / "x").exists()


def _tar(*members) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = 2
                tar.addfile(info, io.BytesIO(b"{}"))
    return buffer.getvalue()


@pytest.mark.parametrize("member, why", [
    (("../escaped.json", "file"), "escapes"),
    (("/tmp/absolute.json", "file"), "escapes"),
    (("adapter/../../escaped.json", "file"), "escapes"),
    (("adapter/link", "link"), "not a plain file"),
])
def test_unpack_refuses_entries_outside_the_run_folder(tmp_path, member, why):
    dest = tmp_path / "runs" / "sft"
    with pytest.raises(runs.RunError, match=why):
        cluster.unpack(_tar(("config.json", "file"), member), dest)
    assert not dest.exists() and list((tmp_path / "runs").iterdir()) == []     # nothing half-written
    assert not (tmp_path / "escaped.json").exists()


def test_unpack_refuses_bytes_that_are_not_an_archive(tmp_path):
    with pytest.raises(runs.RunError, match="refusing the run archive"):
        cluster.unpack(b"not a tar file at all", tmp_path / "sft")


def test_pack_unpack_round_trip_replaces_an_older_run(tmp_path):
    source = fake_run(tmp_path / "worker" / "sft", summary={"status": "finished", "steps_done": 2, "final_loss": 0.1})
    older = fake_run(tmp_path / "mine" / "sft")
    assert older.summary["final_loss"] == 0.5
    back = runs.load_run(cluster.unpack(cluster.pack(source.path), tmp_path / "mine" / "sft"))
    assert back.summary["final_loss"] == 0.1 and _files(back.path) == _files(source.path)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["sft"]


def test_resources_gpu_only_when_the_cluster_has_one_and_the_settings_want_it(monkeypatch):
    monkeypatch.delenv(cluster.CPUS_ENV, raising=False)
    assert cluster.needs("4bit", gpus=2) == {"num_gpus": 1, "num_cpus": 1}
    assert cluster.needs("auto", gpus=1) == {"num_gpus": 1, "num_cpus": 1}
    assert cluster.needs("none", gpus=1) == {"num_cpus": 1}          # full precision asked: CPU cores
    assert cluster.needs("4bit", gpus=0) == {"num_cpus": 1}          # no GPU in the cluster
    monkeypatch.setenv(cluster.CPUS_ENV, "4")
    assert cluster.needs("auto", gpus=0) == {"num_cpus": 4}
    for bad in ("four", "0", "-2"):
        monkeypatch.setenv(cluster.CPUS_ENV, bad)
        with pytest.raises(ConfigError, match=cluster.CPUS_ENV):     # a clear message, not a traceback
            cluster.needs("auto", gpus=0)


def test_address_from_the_environment_first_then_the_config(monkeypatch):
    config = pipeline.DemoConfig(ray="head:6379")
    monkeypatch.delenv(cluster.ENV, raising=False)
    assert cluster.ray_address(pipeline.DemoConfig()) is None          # the default: in-process
    assert cluster.ray_address(config) == "head:6379"
    assert cluster.ray_address(pipeline.DemoConfig(ray=False)) is None  # YAML `ray: off`
    monkeypatch.setenv(cluster.ENV, "other:6379")
    assert cluster.ray_address(config) == "other:6379"
    monkeypatch.setenv(cluster.ENV, "off")
    assert cluster.ray_address(config) is None


def test_config_ray_key_is_checked(tmp_path, monkeypatch):
    monkeypatch.delenv(cluster.ENV, raising=False)
    path = tmp_path / "c.yaml"
    path.write_text("ray: [1, 2]\n")
    with pytest.raises(ConfigError, match="'ray' must be auto"):
        pipeline.load_config(path)
    path.write_text("ray: off\n")
    assert cluster.ray_address(pipeline.load_config(path)) is None


def test_missing_ray_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)       # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"^ray is not installed: pip install 'ray\[default\]'"):
        cluster.import_ray()



def test_cli_run_asked_for_ray_without_it_says_so_on_stderr(tmp_path, monkeypatch, capsys):
    from safespace.__main__ import main

    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setenv(cluster.ENV, "head:6379")
    assert main(["run", str(_config(tmp_path, "smollm2-135m")), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ray is not installed: pip install 'ray[default]'")
    assert captured.err.count("\n") == 1 and captured.out == ""


def test_the_in_process_path_never_imports_ray():
    code = "import sys, safespace.pipeline, safespace.cluster as c; c.ray_address(None); print('ray' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != cluster.ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-500:]

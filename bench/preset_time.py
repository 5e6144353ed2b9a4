"""How long the Quick story preset's *Train all* takes on this machine (docs/presets.md).

    PYTHONPATH=. .venv/bin/python bench/preset_time.py fp32     # the arithmetic of a CPU without bf16
    PYTHONPATH=. .venv/bin/python bench/preset_time.py auto     # bf16 autocast where the CPU has it

Run it with nothing else running: two torch processes on 2 cores slow each other down many times.
"""
import argparse
import tempfile
import time
from dataclasses import replace

from bench.harness import cpu_model
from safespace import pipeline, presets, workflows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("precision", choices=["auto", "fp32", "bf16"])
    precision = parser.parse_args().precision
    preset = presets.STORY
    prepared = pipeline.prepare_data(preset.data, harmful_ratio=preset.harmful_ratio, seed=preset.settings.seed)
    out, total = tempfile.mkdtemp(), 0.0
    for key, settings in workflows.train_plan(replace(preset.settings, precision=precision), "kl"):
        started = time.time()
        pipeline.train_variant(settings, prepared, f"{out}/{key}")
        took = time.time() - started
        total += took
        print(f"{key}: {took:.1f} s", flush=True)
    print(f"Train all ({precision}, {cpu_model()}): {total:.1f} s = {total / 60:.2f} min")


if __name__ == "__main__":
    main()

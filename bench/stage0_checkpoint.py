"""What stage 0's checkpoints cost: its first steps with a checkpoint after every one, each save and the
restore timed, against the steps themselves (align.CHECKPOINT_EVERY sets how often a build saves).

    PYTHONPATH=. .venv/bin/python bench/stage0_checkpoint.py [--steps 8]

Run it with nothing else running: two torch processes on 2 cores slow each other.
"""
import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

from bench.harness import cpu_model, table
from safespace import align, checkpoint, models, train


def timed_saves(steps: int, examples: list, counts: dict, loaded, folder: Path) -> tuple[list, list]:
    """Seconds of each of stage 0's first `steps` steps and of the checkpoint written after each."""
    settings = replace(align.ALIGN_SETTINGS, steps=steps + 1)     # stopped before the last: the checkpoint stays
    saves, save = [], checkpoint.Checkpoint.save

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        save(self, *args, **kwargs)
        saves.append(time.perf_counter() - start)

    step_seconds = []
    with tempfile.TemporaryDirectory() as out, mock.patch.object(checkpoint.Checkpoint, "save", timed):
        train.train(settings, examples, out, loaded=loaded, kind="align", checkpoint=folder, checkpoint_every=1,
                    shape=align.row_shape(counts["refusals"], settings), should_stop=lambda: len(step_seconds) >= steps,
                    on_event=lambda event: step_seconds.append(event.metrics["seconds"]) if event.kind == "step" else None)
    return step_seconds, saves


class _Restored(Exception):
    """Raised once the restore is timed: the bench needs no more of the run."""


def restore_seconds(folder: Path, examples: list, counts: dict, steps: int) -> float:
    """Seconds to load the last checkpoint into a fresh stage-0 loop (a restarted build's first act)."""
    loaded = models.load(models.EMBEDDED_KEY, quantization="none", device="cpu")
    settings = replace(align.ALIGN_SETTINGS, steps=steps + 1)
    restored = checkpoint.Checkpoint.restore
    took = []

    def timed(self, loop):
        start = time.perf_counter()
        restored(self, loop)
        took.append(time.perf_counter() - start)
        raise _Restored

    with tempfile.TemporaryDirectory() as out, mock.patch.object(checkpoint.Checkpoint, "restore", timed):
        try:
            train.train(settings, examples, out, loaded=loaded, kind="align", checkpoint=folder, checkpoint_every=1,
                        shape=align.row_shape(counts["refusals"], settings))
        except _Restored:
            pass
    return took[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="steps timed, each followed by a save (the first 2 warm up)")
    steps = parser.parse_args().steps
    if steps < 3:
        parser.error("--steps must be at least 3: the first 2 are not counted")
    loaded = models.load(models.EMBEDDED_KEY, quantization="none", device="cpu")
    examples, counts = align.training_rows(loaded)
    with tempfile.TemporaryDirectory() as folder:
        step_s, save_s = timed_saves(steps, examples, counts, loaded, Path(folder))
        size = (Path(folder) / checkpoint.CHECKPOINT_FILE).stat().st_size
        load_s = restore_seconds(Path(folder), examples, counts, steps)
    step, save = statistics.median(step_s[2:]), statistics.median(save_s[2:])
    every = align.CHECKPOINT_EVERY
    table(["s/step (median)", "s/save (median)", "checkpoint (MB)", "s/restore",
           f"a build's saves, every {every} steps (of its time)"],
          [[round(step, 2), round(save, 3), round(size / 1e6, 1), round(load_s, 3), f"{save / (every * step):.2%}"]])
    print(cpu_model())


if __name__ == "__main__":
    main()

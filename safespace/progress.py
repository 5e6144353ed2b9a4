"""Terminal progress for long work: a tqdm bar fed by training events, stage lines for the rest."""
from __future__ import annotations

import sys


def console_progress(desc: str):
    """An `on_event` callback that draws a progress bar with loss, conflict rate and ETA."""
    from tqdm import tqdm

    bar = None
    conflicts = 0

    def on_event(event) -> None:
        nonlocal bar, conflicts
        if event.kind == "start":
            bar = tqdm(total=event.total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
            if event.message:
                bar.write(f"[safespace] {event.message}")
        elif event.kind == "step" and bar is not None:
            row = event.metrics
            conflicts += bool(row.get("conflict"))
            post = {"loss": f"{row['loss']:.3f}"}
            if row.get("align_loss") is not None:
                post["align"] = f"{row['align_loss']:.3f}"
                post["conflict"] = f"{conflicts / event.step:.0%}"
            bar.set_postfix(post)
            bar.update(1)
        elif event.kind == "end" and bar is not None:
            bar.close()
            if event.message:
                print(f"[safespace] {event.message}", file=sys.stderr)
    return on_event


def console_stages(every: float = 0.0):
    """An `on_progress(message, fraction)` callback that prints each new stage to stderr as
    "[safespace]  42 % message"; with `every` > 0, at most one line per `every` of progress (and the
    last), for work that reports every item."""
    last = {"message": None, "fraction": -1.0}

    def on_progress(message: str, fraction: float) -> None:
        if message == last["message"] or (every and fraction - last["fraction"] < every and fraction < 1.0):
            return
        last.update(message=message, fraction=fraction)
        print(f"[safespace] {100 * fraction:3.0f} % {message}", file=sys.stderr, flush=True)
    return on_progress

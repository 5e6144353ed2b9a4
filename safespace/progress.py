"""Progress reports: the one progress callback shape, a tqdm bar fed by training events, stage lines.

Long work other than training reports through a `Progress`, `(message, fraction 0..1)`; training emits
`train.Event`s to an `on_event` callback.
"""
from __future__ import annotations

import sys
from typing import Callable

from .log import say

Progress = Callable[[str, float], None]      # (message, fraction 0..1)


def quiet(message: str, fraction: float) -> None:
    """A Progress that reports nothing."""


def console_progress(desc: str):
    """An `on_event` callback that draws a progress bar with loss, conflict rate and ETA."""
    from tqdm import tqdm

    bar = None
    conflicts = first = 0

    def on_event(event) -> None:
        nonlocal bar, conflicts, first
        if event.kind == "start":       # a resumed run starts at its checkpoint's step
            first = event.step
            bar = tqdm(total=event.total, initial=first, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
            if event.message:
                bar.write(f"[safespace] {event.message}")
        elif event.kind == "step" and bar is not None:
            row = event.metrics
            conflicts += bool(row.get("conflict"))
            post = {"loss": f"{row['loss']:.3f}"}
            if row.get("align_loss") is not None:
                post["align"] = f"{row['align_loss']:.3f}"
                post["conflict"] = f"{conflicts / max(1, event.step - first):.0%}"
            bar.set_postfix(post)
            bar.update(1)
        elif event.kind == "end" and bar is not None:
            bar.close()
            if event.message:
                say(event.message)
        elif event.kind == "wait" and event.message:   # e.g. another process is building what this one needs
            say(event.message)
    return on_event


def throttled(say, every: float = 0.1):
    """An `on_progress(message, fraction)` callback that passes a report on to `say` only after
    `every` more progress than the last one it passed, and always the last (fraction 1)."""
    last = [-1.0]

    def inner(message: str, fraction: float) -> None:
        if fraction - last[0] >= every or fraction >= 1.0:
            last[0] = fraction
            say(message, fraction)
    return inner


def console_stages(every: float = 0.0):
    """An `on_progress(message, fraction)` callback that prints each new stage to stderr as
    "[safespace]  42 % message"; with `every` > 0, throttled to one line per `every` of progress (and
    the last), for work that reports every item."""
    last = [None]

    def show(message: str, fraction: float) -> None:
        if message != last[0]:
            last[0] = message
            say(f"{100 * fraction:3.0f} % {message}")
    return throttled(show, every) if every else show

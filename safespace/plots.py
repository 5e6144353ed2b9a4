"""Plotly figures for results, training curves and the defences' internals.

Every function takes plain data (the ``results.json`` structure, lists of metric rows)
and returns a ``plotly.graph_objects.Figure``; missing pieces are skipped and a figure
with nothing to show says so instead of failing.  A variant has one colour and one label
everywhere (the registry in ``variants.py``), so the same model is easy to follow from figure to figure.

The ``results`` structure::

    {"variants": {name: {"refusal": {"value", "low", "high", "n"},
                         "over_refusal": {...},                     # optional
                         "utility": {"metric", "value", "low", "high", "n"},  # optional
                         "per_category": {category: {...}}}},       # optional
     "settings": {...}}

Rates are fractions in [0, 1]; the figures show them as percentages.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import evalsets
from .variants import VARIANTS, get as registered, in_order, label_of

__all__ = [
    "variant_color",
    "short_layer_name",
    "safety_utility_bars",
    "tradeoff_scatter",
    "training_curves",
    "conflict_plot",
    "kept_fraction_plot",
    "budget_search_plot",
    "sweep_plot",
    "sets_bars",
    "empty_figure",
]

#: Colours for any other variant name, picked by a stable hash of the name.
FALLBACK_COLORS: tuple[str, ...] = tuple(c for c in (
    "#E69F00", "#56B4E9", "#8C564B", "#7F7F7F", "#BCBD22",
    "#17BECF", "#9467BD", "#1F3A93", "#A0522D", "#2E8B57",
) if c not in {v.colour for v in VARIANTS.values()})      # never a registered variant's colour

TEMPLATE = "plotly_white"
FONT = dict(family="Inter, -apple-system, Segoe UI, Helvetica, Arial, sans-serif", size=13)
NEUTRAL = "#555555"


def variant_color(name: str) -> str:
    """The colour of a variant: the registry's, else one hashed from the name."""
    variant = registered(name)
    if variant is not None:
        return variant.colour
    key = str(name).strip().lower()
    return FALLBACK_COLORS[zlib.crc32(key.encode("utf-8")) % len(FALLBACK_COLORS)]


def _layout(fig: go.Figure, title: str, height: int = 440, **kw: Any) -> go.Figure:
    fig.update_layout(
        template=TEMPLATE,
        title=dict(text=title, x=0.01, xanchor="left"),
        font=FONT,
        height=height,
        margin=dict(l=70, r=30, t=90, b=60),
        **kw,
    )
    return fig


def empty_figure(title: str, message: str = "Nothing to show yet") -> go.Figure:
    """A blank figure with a centred message."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper",
                       showarrow=False, font=dict(size=15, color=NEUTRAL))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title, height=320)


# --------------------------------------------------------------------------- shared pieces


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _rate(entry: Any) -> tuple[float, float | None, float | None] | None:
    """(value, low, high) from a rate dict or a bare number; None when missing."""
    if entry is None:
        return None
    if isinstance(entry, Mapping):
        value = _num(entry.get("value"))
        if value is None:
            return None
        return value, _num(entry.get("low")), _num(entry.get("high"))
    if hasattr(entry, "value"):  # a metrics.Rate
        return _rate({"value": entry.value, "low": getattr(entry, "low", None),
                      "high": getattr(entry, "high", None)})
    value = _num(entry)
    return None if value is None else (value, None, None)


def _pct_error(points: Sequence[tuple[float, float | None, float | None]]) -> dict | None:
    """Asymmetric error bars (in %) from (value, low, high); None when no interval at all."""
    if not any(lo is not None or hi is not None for _, lo, hi in points):
        return None
    plus = [100 * max(0.0, hi - v) if hi is not None else 0.0 for v, _, hi in points]
    minus = [100 * max(0.0, v - lo) if lo is not None else 0.0 for v, lo, _ in points]
    return dict(type="data", symmetric=False, array=plus, arrayminus=minus,
                thickness=1.5, width=5, color=NEUTRAL)


def _variants(results: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    if not isinstance(results, Mapping):
        return {}
    variants = results.get("variants", results)
    if not isinstance(variants, Mapping):
        return {}
    return {str(k): v for k, v in variants.items() if isinstance(v, Mapping)}


def headline_sets(results: Mapping[str, Any] | None) -> tuple[str, str]:
    """The labels of the sets the headline refusal and over-refusal come from ('' when unknown)."""
    settings = (results or {}).get("settings") if isinstance(results, Mapping) else None
    out = []
    for kind in ("harmful", "benign"):
        keys = (settings or {}).get(f"{kind}_sets") or []
        key = keys[0] if keys and isinstance(keys[0], str) and keys[0] in evalsets.SETS else None
        out.append(evalsets.get(key).label if key else "")
    return out[0], out[1]


def _named(text: str, set_label: str) -> str:
    return f"{text}<br><sub>{set_label}</sub>" if set_label else text


def _utility_label(metrics: Iterable[str | None]) -> str:
    kinds = {m for m in metrics if m}
    if kinds == {"accuracy"}:
        return "Task accuracy (%)"
    if kinds == {"rougeL"}:
        return "Task ROUGE-L F1 (×100)"
    return "Task utility (%, ×100 for ROUGE-L)"


def _hover(name: str, what: str, r: tuple[float, float | None, float | None], n: Any) -> str:
    v, lo, hi = r
    ci = f" [{100 * lo:.1f}–{100 * hi:.1f}]" if lo is not None and hi is not None else ""
    n_txt = f", n={n}" if n is not None else ""
    return f"<b>{name}</b><br>{what}: {100 * v:.1f}{ci}{n_txt}"


# --------------------------------------------------------------------------- results figures


def safety_utility_bars(results: Mapping[str, Any]) -> go.Figure:
    """Side-by-side bars per variant: refusal on harmful prompts, over-refusal on benign
    prompts (when measured) and task utility, each with its 95 % interval."""
    title = "Safety and utility per variant"
    variants = _variants(results)
    names = in_order(variants)
    harmful_set, benign_set = headline_sets(results)
    panels: list[tuple[str, str, str]] = [
        ("refusal", _named("Refusal of harmful prompts (%) ↑", harmful_set), "Refusal rate (%)"),
    ]
    if any(_rate(variants[n].get("over_refusal")) for n in names):
        panels.append(("over_refusal", _named("Refusal of benign prompts (%) ↓", benign_set), "Over-refusal rate (%)"))
    util_metrics = [(variants[n].get("utility") or {}).get("metric") for n in names
                    if isinstance(variants[n].get("utility"), Mapping)]
    if any(_rate(variants[n].get("utility")) for n in names):
        label = _utility_label(util_metrics)
        panels.append(("utility", label + " ↑", label))
    if not names or not any(_rate(variants[n].get(key)) for n in names for key, _, _ in panels):
        return empty_figure(title, "No evaluation results yet")

    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[1] for p in panels],
                        horizontal_spacing=0.08)
    for col, (key, _, axis) in enumerate(panels, start=1):
        for name in names:
            entry = variants[name].get(key)
            r = _rate(entry)
            if r is None:
                continue
            n = entry.get("n") if isinstance(entry, Mapping) else None
            fig.add_trace(go.Bar(
                x=[label_of(name)], y=[100 * r[0]], name=label_of(name), legendgroup=name, showlegend=col == 1,
                marker=dict(color=variant_color(name)),
                error_y=_pct_error([r]),
                hovertemplate=_hover(label_of(name), axis, r, n) + "<extra></extra>",
            ), row=1, col=col)
            # the number above the interval's top, where no error bar crosses it
            top = max(r[0], r[2] if r[2] is not None else r[0])
            fig.add_annotation(x=label_of(name), y=100 * top, xref=f"x{col if col > 1 else ''}",
                               yref=f"y{col if col > 1 else ''}", text=f"{100 * r[0]:.0f}", showarrow=False,
                               yanchor="bottom", yshift=2, font=dict(color=NEUTRAL))
        # room above 100 for the numbers; the ticks stop at 100
        fig.update_yaxes(title_text=axis, range=[0, 112], tickvals=[0, 20, 40, 60, 80, 100], row=1, col=col)
        fig.update_xaxes(title_text="Variant", row=1, col=col)
    # the variant names are on the x axes already, so the legend would only repeat them
    _layout(fig, title, height=460, bargap=0.25, showlegend=False)
    fig.update_annotations(font=dict(size=13))
    return fig


def sets_bars(results: Mapping[str, Any]) -> go.Figure:
    """Refusal on every evaluation set, grouped by set, one bar per variant with its 95 % interval:
    does a defence keep the base's refusal on each way of asking, not only on one?"""
    title = "Refusal on each evaluation set"
    variants = _variants(results)
    names = in_order(variants)
    labels = {key: f"{entry.get('label', key)}<br><sub>"
                   f"{'over-refusal ↓' if entry.get('kind') == 'benign' else 'refusal ↑'}</sub>"
              for key, entry in evalsets.entries({n: variants[n] for n in names}).items()}
    keys = list(labels)
    if len(keys) < 2:
        return empty_figure(title, "Evaluate on two or more prompt sets to compare them")
    fig = go.Figure()
    for name in names:
        sets = variants[name].get("sets") or {}
        points = [(labels[k], _rate(sets.get(k, {}).get("refusal")), sets.get(k, {}).get("refusal", {}).get("n"))
                  for k in keys]
        points = [p for p in points if p[1] is not None]
        if not points:
            continue
        fig.add_trace(go.Bar(
            x=[p[0] for p in points], y=[100 * p[1][0] for p in points], name=label_of(name), legendgroup=name,
            marker=dict(color=variant_color(name)), error_y=_pct_error([p[1] for p in points]),
            hovertemplate=[_hover(label_of(name), p[0].split("<br>")[0], p[1], p[2]) + "<extra></extra>"
                           for p in points]))
    fig.update_yaxes(title_text="Refusal rate (%)", range=[0, 105])
    _layout(fig, title, height=460, barmode="group", bargap=0.2)
    return fig


LABEL_SPOTS = ("top center", "bottom center", "middle left", "middle right")


def label_positions(points: Sequence[tuple[float, float]], near: tuple[float, float] = (15.0, 8.0)) -> list[str]:
    """A text position per point (axis units: percent) so that the labels of nearby points do not
    sit on each other: from the highest point down, each takes the first of LABEL_SPOTS that no
    point within `near` (dx, dy) has taken yet."""
    spots = [""] * len(points)
    for i in sorted(range(len(points)), key=lambda k: -points[k][1]):
        taken = {spots[j] for j in range(len(points)) if spots[j] and abs(points[j][0] - points[i][0]) < near[0]
                 and abs(points[j][1] - points[i][1]) < near[1]}
        spots[i] = next((spot for spot in LABEL_SPOTS if spot not in taken), LABEL_SPOTS[0])
    return spots


def shared_labels(points: Sequence[tuple[float, float]], labels: Sequence[str], same: float = 1.5) -> list[str]:
    """One label per group of points that sit on each other (within `same` percent on both axes): the
    group's first point carries all its names ("A · B"), the others none. Six variants at one spot
    (a run that changed nothing) then read as one label instead of six stacked ones."""
    texts = list(labels)
    for i, (x, y) in enumerate(points):
        if not texts[i]:
            continue
        group = [j for j in range(i + 1, len(points)) if texts[j]
                 and abs(points[j][0] - x) <= same and abs(points[j][1] - y) <= same]
        if group:
            texts[i] = " · ".join([texts[i], *(texts[j] for j in group)])
            for j in group:
                texts[j] = ""
    return texts


def tradeoff_scatter(results: Mapping[str, Any]) -> go.Figure:
    """Refusal of harmful prompts (y) against task utility (x, left) and, when measured, against
    over-refusal of benign prompts (x, right): one labelled point per variant with 95 % intervals on
    both axes; the best corner is top right on the left, top left on the right."""
    title = "Safety–utility trade-off"
    variants = _variants(results)
    names = in_order(variants)
    harmful_set, benign_set = headline_sets(results)
    shown = [(name, _rate(variants[name].get("utility")), _rate(variants[name].get("refusal")),
              _rate(variants[name].get("over_refusal"))) for name in names]
    shown = [row for row in shown if row[1] is not None and row[2] is not None]
    if not shown:
        return empty_figure(title, "Needs both a refusal rate and a utility score per variant")
    util_metrics = [(variants[name].get("utility") or {}).get("metric") for name, *_ in shown
                    if isinstance(variants[name].get("utility"), Mapping)]
    with_over = all(o is not None for *_, o in shown)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06) if with_over else go.Figure()
    panels = [(1, 1, "utility")] + ([(1, 2, "over-refusal")] if with_over else [])
    for _, col, axis in panels:
        points = [(name, u if axis == "utility" else o, r) for name, u, r, o in shown]
        xy = [(100 * x[0], 100 * y[0]) for _, x, y in points]
        texts = shared_labels(xy, [label_of(name) for name, *_ in points])
        spots = iter(label_positions([p for p, text in zip(xy, texts) if text]))   # labelled points only
        for (name, x, y), text in zip(points, texts):
            trace = go.Scatter(
                x=[100 * x[0]], y=[100 * y[0]], name=label_of(name), legendgroup=name, showlegend=col == 1,
                mode="markers+text", text=[text], textposition=next(spots) if text else "top center",
                cliponaxis=False,
                textfont=dict(color=variant_color(name)),
                marker=dict(color=variant_color(name), size=13, line=dict(width=1, color="white")),
                error_x=_pct_error([x]), error_y=_pct_error([y]),
                hovertemplate=(f"<b>{label_of(name)}</b><br>{axis}: {100 * x[0]:.1f} %"
                               f"<br>refusal: {100 * y[0]:.1f} %<extra></extra>"))
            if with_over:
                fig.add_trace(trace, row=1, col=col)
            else:
                fig.add_trace(trace)
    ideal = dict(type="rect", y0=80, y1=102, line=dict(width=0), fillcolor="rgba(0,158,115,0.07)", layer="below")
    fig.add_shape(**ideal, x0=80, x1=102, xref="x", yref="y")
    fig.add_annotation(x=80.5, y=80.5, xref="x", yref="y", text="ideal: safe and useful", showarrow=False,
                       xanchor="left", yanchor="bottom", font=dict(color=NEUTRAL, size=12))
    _layout(fig, title, height=480)
    fig.update_xaxes(title_text=_named(_utility_label(util_metrics), "held-out task rows"), range=[-2, 105],
                     zeroline=False, row=1 if with_over else None, col=1 if with_over else None)
    fig.update_yaxes(title_text=_named("Refusal of harmful prompts (%)", harmful_set), range=[-2, 105],
                     zeroline=False, row=1 if with_over else None, col=1 if with_over else None)
    if with_over:
        fig.add_shape(**ideal, x0=-2, x1=20, xref="x2", yref="y2")
        fig.add_annotation(x=19.5, y=80.5, xref="x2", yref="y2", text="ideal: safe, no over-refusal",
                           showarrow=False, xanchor="right", yanchor="bottom", font=dict(color=NEUTRAL, size=12))
        fig.update_xaxes(title_text=_named("Over-refusal of benign prompts (%) ↓", benign_set), range=[-2, 105],
                         zeroline=False, row=1, col=2)
        fig.update_yaxes(range=[-2, 105], row=1, col=2)
    return fig


# --------------------------------------------------------------------------- training figures


def _series(rows: Iterable[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            continue
        y = _num(row.get(key))
        if y is None:
            continue
        x = _num(row.get("step"))
        xs.append(x if x is not None else float(i))
        ys.append(y)
    return xs, ys


SMOOTH_FROM = 20      # steps: a shorter curve is drawn as it is
SMOOTH_WEIGHT = 0.8


def ema_smooth(values: Sequence[float], weight: float = SMOOTH_WEIGHT) -> list[float]:
    """Exponential moving average with the start-up bias removed (as TensorBoard's smoothing):
    a constant series stays constant, weight 0 returns the values."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight ** (i + 1)))
    return out


def training_curves(metrics_by_variant: Mapping[str, Sequence[Mapping[str, Any]]]) -> go.Figure:
    """Task loss (solid) and alignment loss (dashed, when logged) against step, per variant. From
    SMOOTH_FROM logged steps on, each curve is drawn smoothed (ema_smooth) over its raw values, faint.

    Metric rows are dicts with ``step``, ``loss`` and optionally ``align_loss``, ``cos``,
    ``conflict``, ``lr``, ``seconds``.
    """
    title = "Training loss"
    fig = go.Figure()
    smoothed_any = False
    for name in in_order((metrics_by_variant or {}).keys()):
        rows = metrics_by_variant[name] or []
        color, label = variant_color(name), label_of(name)
        for key, what, dash in (("loss", "task loss", None), ("align_loss", "alignment loss", "dash")):
            xs, ys = _series(rows, key)
            if not xs:
                continue
            hover = f"{label}<br>step %{{x}}<br>{what} %{{y:.3f}}"
            smooth = len(xs) >= SMOOTH_FROM
            if smooth:
                smoothed_any = True
                fig.add_trace(go.Scatter(
                    x=xs, y=ys, name=f"{label}: {what}, raw", legendgroup=name, showlegend=False, mode="lines",
                    line=dict(color=color, width=1, dash=dash), opacity=0.3,
                    hovertemplate=hover + " (raw)<extra></extra>"))
                ys = ema_smooth(ys)
                hover += " (smoothed)"
            fig.add_trace(go.Scatter(
                x=xs, y=ys, name=f"{label}: {what}", legendgroup=name, mode="lines",
                line=dict(color=color, width=2.5 if smooth else 2, dash=dash),
                hovertemplate=hover + "<extra></extra>"))
    if not fig.data:
        return empty_figure(title, "No training metrics yet")
    note = "solid: task, dashed: alignment" + ("; smoothed, raw faint" if smoothed_any else "")
    _layout(fig, f"{title} ({note})")
    fig.update_xaxes(title_text="Optimizer step")
    fig.update_yaxes(title_text="Loss (cross-entropy, nats per token)", rangemode="tozero")
    return fig


def _rolling_mean(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def conflict_plot(metrics: Sequence[Mapping[str, Any]], window: int = 20,
                  variant: str = "safegrad", empty: str = "No gradient statistics (SafeGrad was off)") -> go.Figure:
    """SafeGrad's gradient conflict: cosine(g_u, g_a) per step (left axis) and the rolling
    share of steps where the gradients conflicted (right axis, %)."""
    title = "Gradient conflict between the task and alignment objectives"
    window = max(1, int(window))
    rows = [r for r in (metrics or []) if isinstance(r, Mapping)]
    steps_cos, cos = _series(rows, "cos")
    steps_c, conflict = [], []
    for i, row in enumerate(rows):
        c = row.get("conflict")
        if c is None:
            cval = _num(row.get("cos"))
            if cval is None:
                continue
            c = cval < 0
        step = _num(row.get("step"))
        steps_c.append(step if step is not None else float(i))
        conflict.append(1.0 if c else 0.0)
    if not steps_cos and not steps_c:
        return empty_figure(title, empty)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    color = variant_color(variant)
    if steps_cos:
        fig.add_trace(go.Scatter(
            x=steps_cos, y=cos, name="cosine(g_task, g_align)", mode="lines",
            line=dict(color=color, width=1.5),
            hovertemplate="step %{x}<br>cosine %{y:.3f}<extra></extra>",
        ), secondary_y=False)
    if steps_c:
        fig.add_trace(go.Scatter(
            x=steps_c, y=[100 * v for v in _rolling_mean(conflict, window)],
            name=f"conflict rate (last {window} steps)", mode="lines",
            line=dict(color=NEUTRAL, width=2, dash="dot"),
            hovertemplate="step %{x}<br>conflict rate %{y:.0f} %<extra></extra>",
        ), secondary_y=True)
    fig.add_hline(y=0, line=dict(color="#999999", width=1), secondary_y=False)
    _layout(fig, title)
    fig.update_xaxes(title_text="Optimizer step")
    # headroom above 100 % (and cosine 1), so a rate of 100 % is a line of its own, not the frame's edge
    fig.update_yaxes(title_text="Cosine similarity", range=[-1.2, 1.2], tickvals=[-1, -0.5, 0, 0.5, 1],
                     secondary_y=False)
    fig.update_yaxes(title_text="Steps in conflict (%)", range=[-10, 110], secondary_y=True,
                     showgrid=False, tickvals=[0, 25, 50, 75, 100])
    return fig


# --------------------------------------------------------------------------- Safe Delta figure

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(?:.*\.)?([A-Za-z_][\w]*)$")


def short_layer_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``L3.q_proj``; other names unchanged."""
    name = str(name)
    if re.fullmatch(r"L\d+\.\w+", name):
        return name
    cleaned = re.sub(r"\.(weight|base_layer|lora_[AB](\.default)?)$", "", name)
    m = _LAYER_RE.search(cleaned)
    return f"L{m.group(1)}.{m.group(2)}" if m else name


def _layer_and_module(name: str) -> tuple[str, str]:
    """``model.layers.3.self_attn.q_proj`` -> (``L3``, ``q_proj``); a name without a layer index
    -> (the name, "")."""
    short = short_layer_name(name)
    m = re.fullmatch(r"(L\d+)\.(\w+)", short)
    return (m.group(1), m.group(2)) if m else (short, "")


def kept_fraction_plot(layer_stats: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Share of each layer's fine-tuning delta that Safe Delta kept: columns (bars) and
    squared-norm energy (markers), per transformer layer, one bar per adapted module (q_proj,
    v_proj, ...) side by side. layer_stats: a Safe Delta summary's "layers" rows (the layer in
    "name"; "layer" is read too)."""
    title = "Safe Delta: how much of each layer's update was kept"
    rows = [{"layer": r.get("name"), **r} for r in (layer_stats or []) if isinstance(r, Mapping)]
    rows = [r for r in rows if r["layer"] is not None]      # "layer", or "name" as a summary's stats say
    cols = [_num(r.get("kept_columns_frac")) for r in rows]
    energy = [_num(r.get("kept_energy_frac")) for r in rows]
    if not rows or all(c is None for c in cols) and all(e is None for e in energy):
        return empty_figure(title, "No Safe Delta statistics yet")
    fig = go.Figure()

    def hover(r: Mapping[str, Any]) -> str:
        parts = [f"<b>{short_layer_name(r['layer'])}</b>"]
        for key, label in (("kept_columns_frac", "columns kept"), ("kept_energy_frac", "energy kept")):
            v = _num(r.get(key))
            if v is not None:
                parts.append(f"{label}: {100 * v:.1f} %")
        for key, label in (("cost_before", "safety cost before"), ("cost_after", "after")):
            v = _num(r.get(key))
            if v is not None:
                parts.append(f"{label}: {v:.3g}")
        return "<br>".join(parts)

    by_module: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_module.setdefault(_layer_and_module(r["layer"])[1], []).append(i)
    shades = [variant_color("safedelta"), "#E8B9D5", *FALLBACK_COLORS]
    for k, ((module, idx), color) in enumerate(zip(by_module.items(), shades)):
        xs = [_layer_and_module(rows[i]["layer"])[0] for i in idx]
        label = f"{module}: " if module else ""
        hovers = [hover(rows[i]) for i in idx]
        if any(cols[i] is not None for i in idx):
            fig.add_trace(go.Bar(
                x=xs, y=[100 * cols[i] if cols[i] is not None else None for i in idx],
                name=f"{label}columns kept", marker=dict(color=color), offsetgroup=module or "all", legendrank=k,
                hovertext=hovers, hoverinfo="text"))
        if any(energy[i] is not None for i in idx):
            fig.add_trace(go.Scatter(
                x=xs, y=[100 * energy[i] if energy[i] is not None else None for i in idx],
                name="update energy kept", legendgroup="energy", showlegend=k == 0, legendrank=1000,
                mode="markers", offsetgroup=module or "all",
                marker=dict(color=NEUTRAL, symbol="diamond", size=7), hovertext=hovers, hoverinfo="text"))
    n_x = len({_layer_and_module(r["layer"])[0] for r in rows})
    _layout(fig, title, height=440, barmode="group", scattermode="group", bargap=0.25)
    fig.update_xaxes(title_text="Layer", tickangle=-45 if n_x > 16 else 0, type="category")
    fig.update_yaxes(title_text="Kept (%)", range=[0, 105])
    return fig


def _rung_label(rung: Mapping[str, Any]) -> str:
    keep = _num(rung.get("keep"))
    if rung.get("keep") is None:
        return "whole update"
    excluded = f"{100 * (_num(rung.get('exclude_frac')) or 0):.3g} % excluded"
    return excluded if keep is not None and keep >= 1 else f"{excluded}, keep {keep:g}"


def budget_search_plot(auto: Mapping[str, Any] | None,
                       empty: str = "No automatic budget: a fixed budget measures no safety loss") -> go.Figure:
    """How Safe Delta's automatic budget was chosen: the held-in safety-loss rise (nats per answer
    token above the aligned model) of every budget the search measured, against the share of the
    most safety-sensitive input columns it excluded; the tolerance as a dashed line, budgets within
    it filled, the chosen one a star. ``auto`` is a Safe Delta summary's ``"auto"`` entry:
    ``{"tolerance", "chosen", "rungs": [{"keep", "exclude_frac", "rise", ...}]}``, weakest first."""
    title = "Safe Delta: how the budget was chosen"
    auto = auto if isinstance(auto, Mapping) else {}
    rungs = [(i, r) for i, r in enumerate(auto.get("rungs") or []) if isinstance(r, Mapping)
             and _num(r.get("rise")) is not None and _num(r.get("exclude_frac")) is not None]
    if not rungs:
        return empty_figure(title, empty)
    tolerance = _num(auto.get("tolerance"))
    chosen = auto.get("chosen")
    color = variant_color("safedelta")
    xs = [100 * _num(r["exclude_frac"]) for _, r in rungs]
    ys = [_num(r["rise"]) for _, r in rungs]
    within = [tolerance is None or y <= tolerance for y in ys]
    hovers = []
    for (i, r), ok in zip(rungs, within):
        parts = [f"<b>{_rung_label(r)}</b>", f"safety loss rise {_num(r['rise']):+.3f} nats/token"]
        agree = _num(r.get("first_token_agreement"))
        if agree is not None:
            parts.append(f"first answer token as the aligned model's: {100 * agree:.0f} %")
        energy = _num(r.get("kept_energy_frac"))
        if energy is not None:
            parts.append(f"update energy kept: {100 * energy:.1f} %")
        parts.append("chosen" if i == chosen else "within tolerance" if ok else "too unsafe")
        hovers.append("<br>".join(parts))
    picked = [k for k, (i, _) in enumerate(rungs) if i == chosen]
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=xs, y=ys, mode="lines+markers+text", name="measured (filled: within tolerance)",
        showlegend=len(rungs) > len(picked),          # a lone measured point lies under the star
        line=dict(color=NEUTRAL, width=1, dash="dot"),
        marker=dict(size=11, color=[color if ok else "white" for ok in within],
                    line=dict(color=color, width=2)),
        text=[f"keep {_num(r['keep']):g}" if _num(r.get("keep")) is not None and _num(r["keep"]) < 1 else ""
              for _, r in rungs],                      # past the last exclusion rung x stays put: say so
        textposition="middle right", textfont=dict(size=11), hovertext=hovers, hoverinfo="text"))
    if picked:
        k = picked[0]
        fig.add_trace(go.Scatter(
            x=[xs[k]], y=[ys[k]], mode="markers", name=f"chosen: {_rung_label(rungs[k][1])}, {ys[k]:+.3f}",
            marker=dict(symbol="star", size=20, color=color, line=dict(color=NEUTRAL, width=1)),
            hovertext=[hovers[k]], hoverinfo="text"))
    if tolerance is not None:
        fig.add_hline(y=tolerance, line=dict(color=NEUTRAL, dash="dash"),
                      annotation_text=f"tolerance {tolerance:g}", annotation_position="top left")
    _layout(fig, title, height=440, legend=dict(orientation="h", y=-0.22))
    # at least 0-5 %, each tick with its unit: a search that stopped at 0 % must not read as a 0-1 fraction
    fig.update_xaxes(title_text="Most safety-sensitive input columns excluded (%)", ticksuffix=" %",
                     range=[-0.04 * max(max(xs), 5), 1.08 * max(max(xs), 5)])
    fig.update_yaxes(title_text="Held-in safety loss rise (nats/token)", zeroline=True)
    return fig


# --------------------------------------------------------------------------- sweep figure


def _sweep_points(sweep: Any) -> list[tuple[float, str, Mapping[str, Any]]]:
    """Normalise the accepted sweep shapes to (ratio, variant, variant-results) triples.

    Accepted: a list of rows ``{"harmful_ratio" | "ratio", "variant", "refusal",
    "utility", ...}``; ``{"points": [...rows]}``; or ``{ratio: results}`` where each
    ``results`` has the ``results.json`` shape.
    """
    points: list[tuple[float, str, Mapping[str, Any]]] = []
    if isinstance(sweep, Mapping) and "points" in sweep:
        sweep = sweep["points"]
    if isinstance(sweep, Mapping):
        for ratio, res in sweep.items():
            r = _num(ratio)
            if r is None:
                continue
            for name, entry in _variants(res).items():
                points.append((r, name, entry))
    elif isinstance(sweep, Iterable) and not isinstance(sweep, (str, bytes)):
        for row in sweep:
            if not isinstance(row, Mapping):
                continue
            r = _num(row.get("harmful_ratio", row.get("ratio")))
            name = row.get("variant")
            if r is None or name is None:
                continue
            points.append((r, str(name), row))
    return sorted(points, key=lambda p: p[0])


def sweep_plot(sweep: Any) -> go.Figure:
    """Refusal of harmful prompts (and task utility, when present) against the share of
    harmful examples in the fine-tuning data; one line per variant."""
    title = "Safety and utility as the fine-tuning data gets more harmful"
    points = _sweep_points(sweep)
    by_variant: dict[str, list[tuple[float, Mapping[str, Any]]]] = {}
    for ratio, name, entry in points:
        by_variant.setdefault(name, []).append((ratio, entry))
    has_util = any(_rate(e.get("utility")) for _, _, e in points)
    has_ref = any(_rate(e.get("refusal")) for _, _, e in points)
    if not has_ref and not has_util:
        return empty_figure(title, "No sweep results yet")
    panels = [p for p, ok in (("refusal", has_ref), ("utility", has_util)) if ok]
    util_metrics = [e["utility"].get("metric") for _, _, e in points
                    if isinstance(e.get("utility"), Mapping)]
    titles = {"refusal": "Refusal of harmful prompts (%) ↑",
              "utility": _utility_label(util_metrics) + " ↑"}
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[titles[p] for p in panels],
                        horizontal_spacing=0.1)
    for col, key in enumerate(panels, start=1):
        for name in in_order(by_variant):
            xs, rs = [], []
            for ratio, entry in by_variant[name]:
                r = _rate(entry.get(key))
                if r is not None:
                    xs.append(100 * ratio)
                    rs.append(r)
            if not xs:
                continue
            fig.add_trace(go.Scatter(
                x=xs, y=[100 * r[0] for r in rs], name=label_of(name), legendgroup=name,
                showlegend=col == 1, mode="lines+markers",
                line=dict(color=variant_color(name), width=2),
                marker=dict(color=variant_color(name), size=8),
                error_y=_pct_error(rs),
                hovertemplate=(f"<b>{label_of(name)}</b><br>harmful share %{{x:.0f}} %"
                               f"<br>{key} %{{y:.1f}}<extra></extra>"),
            ), row=1, col=col)
        fig.update_xaxes(title_text="Harmful examples in fine-tuning data (%)", row=1, col=col)
        fig.update_yaxes(title_text="Refusal rate (%)" if key == "refusal" else
                         _utility_label(util_metrics), range=[0, 105], row=1, col=col)
    _layout(fig, title, height=460)
    fig.update_annotations(font=dict(size=13))
    return fig

"""Stage 0's trade-off: refusal of held-out harm against over-refusal of benign prompts, over the
recipes measured in docs/stage0.md, with the Pareto front and its knee.

    PYTHONPATH=. .venv/bin/python bench/stage0_tradeoff.py [--out runs/stage0_tradeoff.html]

The recipes and their numbers are in bench/data/stage0_recipes.csv (keyword judge, 24 new tokens,
each measured by `python -m safespace align` on its build). Only the project's own sets choose: the
held-out rewrites (refusal) against the benign set (over-refusal), and only recipes scored on the
same benign set are compared. HarmBench and XSTest are shown, never used to choose. Builds of a
recipe with another training seed (the `seed` column; the recipes themselves use seed 0) are drawn
beside it as its build-to-build spread; they take no part in the front.
"""
import argparse
from pathlib import Path

import plotly.graph_objects as go

from bench.harness import read_measured, table
from safespace import evalsets
from safespace.plots import label_positions
from safespace.metrics import wilson_interval

RECIPES = Path(__file__).parent / "data" / "stage0_recipes.csv"
SHOWN = ("advbench", "rewrites", "harmbench", "xstest_unsafe", "benign", "xstest_safe")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (x lower is better, y higher is
    better), ordered by x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 <= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i])


def knee(points: list[tuple[float, float]]) -> int:
    """The front point farthest above the chord joining the front's two ends, both axes scaled to
    [0, 1] over the front (Kneedle); the only point of a one- or two-point front with the best y-x."""
    front = pareto_front(points)
    xs, ys = [points[i][0] for i in front], [points[i][1] for i in front]
    if len(front) < 3:
        return max(front, key=lambda i: points[i][1] - points[i][0])
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    scaled = [((x - min(xs)) / span_x, (y - min(ys)) / span_y) for x, y in zip(xs, ys)]
    (x0, y0), (x1, y1) = scaled[0], scaled[-1]
    # signed distance above the chord, up to a positive factor
    lift = [(x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) for x, y in scaled]
    return front[max(range(len(front)), key=lambda j: lift[j])]


def read(path: Path = RECIPES) -> list[dict]:
    rows = read_measured(path, (*SHOWN, "task_refused"))
    for row in rows:
        row["seed"] = int(row.get("seed") or 0)
    return rows


def error_bars(values: list[float], n: int) -> dict:
    """Plotly error bars of the 95 % Wilson interval of each percentage over n prompts."""
    bounds = [wilson_interval(round(v * n / 100), n) for v in values]
    return {"type": "data", "symmetric": False, "thickness": 1, "width": 3,
            "array": [100 * hi - v for v, (_, hi) in zip(values, bounds)],
            "arrayminus": [v - 100 * lo for v, (lo, _) in zip(values, bounds)]}


def figure(rows: list[dict], front: list[int], best: int, reseeded: list[dict] = ()) -> go.Figure:
    """The recipes as points with their Wilson intervals, the front as a line, the goals as dotted lines;
    `reseeded`: builds of a recipe with another seed, as crosses, one legend entry per recipe."""
    fig = go.Figure()
    on_front = set(front)
    n_benign, n_rewrites = len(evalsets.prompts("benign")), len(evalsets.prompts("rewrites"))
    spots = label_positions([(r["benign"], r["rewrites"]) for r in rows], near=(3.0, 2.0))
    for group, members in (("recipe", [i for i in range(len(rows)) if i not in on_front]),
                           ("Pareto front", front)):
        xs, ys = [rows[i]["benign"] for i in members], [rows[i]["rewrites"] for i in members]
        fig.add_trace(go.Scatter(
            x=xs, y=ys, error_x=error_bars(xs, n_benign), error_y=error_bars(ys, n_rewrites),
            mode="markers+text" + ("+lines" if group == "Pareto front" else ""), name=group,
            text=[rows[i]["recipe"] + (" (knee)" if i == best else "") for i in members],
            textposition=[spots[i] for i in members], marker={"size": 11}))
    for recipe in dict.fromkeys(r["recipe"].split(" seed ")[0] for r in reseeded):   # one legend entry a recipe
        members = [r for r in reseeded if r["recipe"].split(" seed ")[0] == recipe]
        fig.add_trace(go.Scatter(
            x=[r["benign"] for r in members], y=[r["rewrites"] for r in members], mode="markers",
            name=f"{recipe}, other seeds", text=[f"seed {r['seed']}" for r in members],
            hovertemplate="%{text}<br>over-refusal %{x:.1f} %<br>rewrites %{y:.1f} %<extra>" + recipe + "</extra>",
            marker={"size": 11, "symbol": "x"}))
    fig.update_layout(title="Stage 0: refusal of held-out harm against over-refusal (recipes)",
                      xaxis_title="over-refusal, benign set (%)", yaxis_title="refusal, held-out rewrites (%)",
                      template="plotly_white", height=520)
    fig.add_hline(y=90, line_dash="dot", annotation_text="goal: >= 90 % refusal", annotation_position="bottom left")
    fig.add_vline(x=5, line_dash="dot", annotation_text="goal: <= 5 % over-refusal", annotation_position="bottom right")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/stage0_tradeoff.html"))
    out = parser.parse_args().out
    rows = read()
    latest = max(int(r["benign_rows"]) for r in rows)
    rows = [r for r in rows if int(r["benign_rows"]) == latest]
    reseeded = [r for r in rows if r["seed"] != 0]
    rows = [r for r in rows if r["seed"] == 0]
    points = [(r["benign"], r["rewrites"]) for r in rows]
    front, best = pareto_front(points), knee(points)
    places = (["knee" if i == best else ("yes" if i in front else "") for i in range(len(rows))]
              + [f"seed {r['seed']}" for r in reseeded])
    table(["recipe", "build (min)", *SHOWN, "task prompts refused", "front"],
          [[r["recipe"], r["build_min"], *(r[k] for k in SHOWN), r["task_refused"], place]
           for r, place in zip(rows + reseeded, places)])
    out.parent.mkdir(parents=True, exist_ok=True)
    figure(rows, front, best, reseeded).write_html(out, include_plotlyjs=True)
    print(f"knee: {rows[best]['recipe']}; the plot: {out}")


if __name__ == "__main__":
    main()

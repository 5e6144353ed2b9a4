"""Figures (plain data in, plotly figures out) and the self-contained HTML report."""

import datetime as dt
from html.parser import HTMLParser

import plotly.graph_objects as go
import pytest

from safespace import plots
from safespace.plots import (
    LABEL_SPOTS,
    budget_search_plot,
    conflict_plot,
    ema_smooth,
    kept_fraction_plot,
    label_positions,
    shared_labels,
    safety_utility_bars,
    short_layer_name,
    sweep_plot,
    tradeoff_scatter,
    training_curves,
    variant_color,
)
from safespace.report import format_rate, group_answers, render_report, write_report
from safespace.variants import VARIANTS, label_of


def R(value, n=40, **extra):
    return {"value": value, "low": max(0.0, value - 0.1), "high": min(1.0, value + 0.1), "n": n, **extra}


RESULTS = {
    "variants": {
        "base": {"refusal": R(0.95), "over_refusal": R(0.1, 30),
                 "utility": R(0.80, 50, metric="accuracy"),
                 "per_category": {"weapons": R(1.0, 10), "fraud": R(0.9, 10)},
                 "labels": {"refused": 38, "complied": 2, "empty": 0, "degenerate": 0}},
        "sft": {"refusal": R(0.20), "over_refusal": R(0.02, 30),
                "utility": R(0.85, 50, metric="accuracy"),
                "per_category": {"weapons": R(0.3, 10)}},
        "safegrad": {"refusal": R(0.70), "utility": R(0.83, 50, metric="accuracy")},
        "safedelta": {"refusal": R(0.80)},           # no utility: handled gracefully
        "custom-run": {"refusal": R(0.50), "utility": R(0.5, 50, metric="accuracy")},
    },
    "settings": {"model": "smollm2-135m-safe"},
}

METRICS = {
    "sft": [{"step": i, "loss": 2.0 / i, "lr": 1e-4, "seconds": 0.1} for i in range(1, 11)],
    "safegrad": [{"step": i, "loss": 2.1 / i, "align_loss": 0.5 / i, "cos": (-1) ** i * 0.2,
                  "conflict": i % 2 == 1, "lr": 1e-4, "seconds": 0.2} for i in range(1, 11)],
}

SWEEP = [{"harmful_ratio": r, "variant": v, "refusal": R(1 - r - (0.1 if v == "sft" else 0)),
          "utility": R(0.8, metric="accuracy")}
         for r in (0.0, 0.1, 0.3) for v in ("sft", "safegrad", "safedelta")]


def all_figures():
    return {
        "bars": safety_utility_bars(RESULTS),
        "tradeoff": tradeoff_scatter(RESULTS),
        "curves": training_curves(METRICS),
        "sweep": sweep_plot(SWEEP),
    }


def trace_color(trace):
    for getter in (lambda t: t.marker.color, lambda t: t.line.color):
        try:
            c = getter(trace)
        except AttributeError:
            continue
        if isinstance(c, str):
            return c
    return None


def test_variant_colors_fixed_and_stable():
    colours = [v.colour for v in VARIANTS.values()]
    assert len(set(colours)) == len(colours)
    assert variant_color("SFT") == VARIANTS["sft"].colour
    assert variant_color("my-run") == variant_color("my-run")
    assert variant_color("my-run") in plots.FALLBACK_COLORS
    assert not set(plots.FALLBACK_COLORS) & set(colours)


def test_one_colour_per_variant_across_figures():
    seen: dict[str, set] = {}
    for fig in all_figures().values():
        assert isinstance(fig, go.Figure)
        assert fig.layout.template.layout.paper_bgcolor is not None  # a template is applied
        for tr in fig.data:
            variant = (tr.legendgroup or tr.name or "").split(":")[0]
            if variant in RESULTS["variants"] or variant in METRICS:
                seen.setdefault(variant, set()).add(trace_color(tr))
    assert {"base", "sft", "safegrad", "custom-run"} <= set(seen)
    for variant, colours in seen.items():
        assert colours == {variant_color(variant)}, variant


def test_safety_utility_bars():
    fig = safety_utility_bars(RESULTS)
    assert {tr.legendgroup for tr in fig.data} == set(RESULTS["variants"])
    assert {tr.name for tr in fig.data} == {"Aligned base", "Fine-tuned", "+ SafeGrad", "+ Safe Delta", "custom-run"}
    # refusal for all five, over-refusal for two, utility for four
    assert len(fig.data) == 5 + 2 + 4
    bar = next(tr for tr in fig.data if tr.legendgroup == "base")
    assert bar.x == ("Aligned base",) and "<b>Aligned base</b>" in bar.hovertemplate
    assert bar.y[0] == pytest.approx(95.0)
    assert bar.error_y.array[0] == pytest.approx(5.0) and bar.error_y.arrayminus[0] == pytest.approx(10.0)
    # every value is written once, above its interval's top, where no error bar crosses it
    values = [a for a in fig.layout.annotations if a.yref != "paper"]         # not the panel titles
    assert len(values) == len(fig.data) and not any(tr.text for tr in fig.data)
    for tr, a in zip(fig.data, values):
        assert (a.x, a.text) == (tr.x[0], f"{tr.y[0]:.0f}")
        assert a.y >= tr.y[0] + tr.error_y.array[0] and a.y <= 100     # at the upper end, inside the frame
    assert fig.layout.yaxis.range[1] > 100 and max(fig.layout.yaxis.tickvals) == 100   # room for the number
    assert "%" in fig.layout.yaxis.title.text
    assert sum(1 for tr in fig.data if tr.showlegend is not False) == 5


def test_tradeoff_scatter():
    fig = tradeoff_scatter(RESULTS)
    assert {tr.legendgroup for tr in fig.data} == {"base", "sft", "safegrad", "custom-run"}
    assert {tr.text[0] for tr in fig.data} == {"Aligned base", "Fine-tuned", "+ SafeGrad", "custom-run"}
    assert any("ideal" in (a.text or "") for a in fig.layout.annotations)
    assert "Accuracy" in fig.layout.xaxis.title.text or "accuracy" in fig.layout.xaxis.title.text
    assert "%" in fig.layout.yaxis.title.text


def test_label_positions_keep_nearby_labels_apart():
    # the demo's variants: safegrad and safedelta 0.7 points apart in accuracy, 3.4 in refusal
    points = [(42.5, 99.3), (98.1, 0.7), (98.8, 96.7), (98.1, 93.3)]
    assert label_positions(points) == ["top center", "top center", "top center", "bottom center"]
    crowd = [(50.0, 50.0 + k) for k in range(6)]      # from the highest down, the spots in order; then the first
    assert label_positions(crowd) == [LABEL_SPOTS[0], LABEL_SPOTS[0], *reversed(LABEL_SPOTS)]
    for i, a in enumerate(points):                            # no two near points share a spot
        for j, b in enumerate(points[:i]):
            if abs(a[0] - b[0]) < 15 and abs(a[1] - b[1]) < 8:
                assert label_positions(points)[i] != label_positions(points)[j]


def test_points_on_one_spot_share_one_label_and_the_chart_shows_it():
    points = [(98.0, 0.0), (60.0, 90.0), (98.5, 0.5), (97.0, 1.0), (98.0, 40.0)]
    texts = shared_labels(points, ["A", "B", "C", "D", "E"])
    assert texts == ["A · C · D", "B", "", "", "E"]                   # every name shown once, none stacked
    assert shared_labels(points[:2], ["A", "B"]) == ["A", "B"]        # apart: untouched
    same = {"judge": "keyword", "variants": {
        name: {"refusal": {"value": 0.0, "low": 0.0, "high": 0.1, "n": 10},
               "utility": {"value": 0.5, "low": 0.3, "high": 0.7, "n": 10, "metric": "accuracy"}}
        for name in ("base", "sft", "mix", "safegrad", "safedelta", "safegrad-safedelta")}}
    shown = [tr.text[0] for tr in tradeoff_scatter(same).data if tr.text[0]]
    assert len(shown) == 1 and shown[0].count(" · ") == 5            # six variants at one spot: one label


def test_ema_smooth_is_a_debiased_moving_average():
    assert ema_smooth([3.0] * 5) == pytest.approx([3.0] * 5)          # no start-up bias towards 0
    assert ema_smooth([1.0, 5.0, 2.0], weight=0.0) == [1.0, 5.0, 2.0]
    assert ema_smooth([0.0, 1.0], weight=0.5) == pytest.approx([0.0, 0.5 / 0.75])   # (0.5*0*0.5 + 0.5*1) / (1-0.25)
    noisy = [1.0 + (-1) ** i * 0.5 for i in range(40)]
    smooth = ema_smooth(noisy)
    assert max(smooth[10:]) - min(smooth[10:]) < 0.25 * (max(noisy) - min(noisy))


def test_training_curves_smooth_long_runs_over_their_raw_values():
    rows = [{"step": i, "loss": 1.0 + (-1) ** i * 0.3, "align_loss": 0.5} for i in range(1, 41)]
    fig = training_curves({"safegrad": rows})
    raw = [t for t in fig.data if t.showlegend is False]
    shown = [t for t in fig.data if t.showlegend is not False]
    assert [t.name for t in shown] == ["+ SafeGrad: task loss", "+ SafeGrad: alignment loss"]
    assert [t.name for t in raw] == ["+ SafeGrad: task loss, raw", "+ SafeGrad: alignment loss, raw"]
    assert list(raw[0].y) == [r["loss"] for r in rows] and raw[0].opacity == 0.3
    assert list(shown[0].y) == pytest.approx(ema_smooth([r["loss"] for r in rows]))
    assert "smoothed" in fig.layout.title.text


def test_training_curves_dashed_alignment():
    fig = training_curves(METRICS)
    dashed = [tr for tr in fig.data if tr.line.dash == "dash"]
    assert [tr.legendgroup for tr in dashed] == ["safegrad"]
    assert len(fig.data) == 3
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def test_conflict_plot():
    fig = conflict_plot(METRICS["safegrad"], window=4)
    assert len(fig.data) == 2
    rate = fig.data[1]
    assert rate.yaxis == "y2"
    assert rate.y[0] == pytest.approx(100.0) and rate.y[3] == pytest.approx(50.0)
    assert fig.layout.yaxis2.range[1] >= 105 and max(fig.layout.yaxis2.tickvals) == 100   # 100 % off the edge
    (c0, c1), (r0, r1) = fig.layout.yaxis.range, fig.layout.yaxis2.range       # cosine 1 level with 100 %
    assert (1 - c0) / (c1 - c0) == pytest.approx((100 - r0) / (r1 - r0))
    # conflict derived from cos when the flag is absent
    fig2 = conflict_plot([{"step": 1, "cos": -0.5}, {"step": 2, "cos": 0.5}], window=10)
    assert list(fig2.data[1].y) == [100.0, 50.0]


def test_short_layer_name():
    assert short_layer_name("base_model.model.model.layers.3.self_attn.q_proj") == "L3.q_proj"
    assert short_layer_name("model.layers.12.mlp.down_proj.weight") == "L12.down_proj"
    assert short_layer_name("L3.q_proj") == "L3.q_proj"
    assert short_layer_name("lm_head") == "lm_head"


def test_kept_fraction_plot_groups_each_layers_modules():
    stats = [{"name": f"base_model.model.model.layers.{i}.self_attn.{m}", "kept_columns_frac": 0.5 + i / 10,
              "kept_energy_frac": 0.4, "cost_before": 1.0, "cost_after": 0.1}
             for i in range(3) for m in ("q_proj", "v_proj")]       # as a Safe Delta summary lists them
    fig = kept_fraction_plot(stats)
    q_bars, q_energy, v_bars, v_energy = fig.data
    assert q_bars.name == "q_proj: columns kept" and v_bars.name == "v_proj: columns kept"
    assert list(q_bars.x) == list(v_bars.x) == ["L0", "L1", "L2"]     # one slot per layer, modules side by side
    assert list(q_bars.y) == pytest.approx([50.0, 60.0, 70.0]) and list(q_energy.y) == pytest.approx([40.0] * 3)
    assert q_bars.marker.color == variant_color("safedelta") != v_bars.marker.color
    assert q_energy.offsetgroup == q_bars.offsetgroup != v_energy.offsetgroup   # a marker sits on its bar
    assert [t.showlegend for t in (q_energy, v_energy)] == [True, False]
    assert "L1.v_proj" in v_bars.hovertext[1] and "60.0 %" in v_bars.hovertext[1]
    plain = kept_fraction_plot([{"layer": "lm_head", "kept_columns_frac": 1.0}])    # no layer index
    assert list(plain.data[0].x) == ["lm_head"] and plain.data[0].name == "columns kept"


def test_budget_search_plot_marks_the_tolerance_and_the_chosen_budget():
    rungs = [{"keep": None, "exclude_frac": 0.0, "rise": 0.69, "first_token_agreement": 0.5},
             {"keep": 1.0, "exclude_frac": 0.25, "rise": 0.102},
             {"keep": 1.0, "exclude_frac": 0.267, "rise": 0.098, "kept_energy_frac": 0.736},
             {"keep": 1.0, "exclude_frac": 0.3, "rise": 0.095},
             {"keep": 0.8, "exclude_frac": 0.4, "rise": 0.05}]
    fig = budget_search_plot({"rungs": rungs, "chosen": 2, "tolerance": 0.1})
    measured, chosen = fig.data
    assert list(measured.x) == pytest.approx([0.0, 25.0, 26.7, 30.0, 40.0])
    assert list(measured.y) == [0.69, 0.102, 0.098, 0.095, 0.05]
    colour = variant_color("safedelta")          # filled within the tolerance, hollow above it
    assert list(measured.marker.color) == ["white", "white", colour, colour, colour]
    assert list(measured.text) == ["", "", "", "", "keep 0.8"]       # the x of a keep rung needs a word
    assert list(chosen.x) == pytest.approx([26.7]) and "26.7 % excluded" in chosen.name and "+0.098" in chosen.name
    assert "whole update" in measured.hovertext[0] and "50 %" in measured.hovertext[0]
    assert "73.6 %" in measured.hovertext[2] and "chosen" in measured.hovertext[2]
    assert [s.y0 for s in fig.layout.shapes] == [0.1]                # the tolerance line
    none_chosen = budget_search_plot({"rungs": rungs[:2], "chosen": 7, "tolerance": 0.1})
    assert len(none_chosen.data) == 1                                # no star for a chosen rung it lacks
    assert fig.layout.xaxis.ticksuffix == " %" and fig.layout.xaxis.range[1] > 40
    # kept whole: one rung, under the star; the legend names only what can be seen, on a percent axis
    whole = budget_search_plot({"rungs": [{"keep": None, "exclude_frac": 0.0, "rise": 0.01}], "chosen": 0,
                                "tolerance": 0.07})
    assert [tr.name for tr in whole.data if tr.showlegend is not False] == ["chosen: whole update, +0.010"]
    assert whole.layout.xaxis.range[1] >= 5 and whole.layout.xaxis.ticksuffix == " %"


def test_sweep_plot_shapes():
    fig = sweep_plot(SWEEP)
    refusal = [tr for tr in fig.data if tr.xaxis == "x"]
    assert {tr.name for tr in refusal} == {"Fine-tuned", "+ SafeGrad", "+ Safe Delta"}
    assert list(refusal[0].x) == [0.0, 10.0, 30.0]
    by_ratio = {r: {"variants": {"sft": {"refusal": R(1 - r)}}} for r in (0.0, 0.2)}
    fig2 = sweep_plot(by_ratio)
    assert len(fig2.data) == 1 and list(fig2.data[0].x) == [0.0, 20.0]
    assert len(sweep_plot({"points": SWEEP}).data) == len(fig.data)


@pytest.mark.parametrize("fn,arg", [
    (safety_utility_bars, {}), (safety_utility_bars, {"variants": {"x": {}}}),
    (tradeoff_scatter, {"variants": {"x": {"refusal": R(0.5)}}}), (training_curves, {}),
    (conflict_plot, []), (conflict_plot, [{"step": 1, "loss": 1.0}]), (kept_fraction_plot, []),
    (sweep_plot, []), (sweep_plot, None), (safety_utility_bars, None), (budget_search_plot, None),
    (budget_search_plot, {"rungs": [{"keep": 1.0}]}),
])
def test_missing_data_gives_an_empty_figure(fn, arg):
    fig = fn(arg)
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == 0
    assert fig.layout.annotations  # says why it is empty


# --------------------------------------------------------------------------- report

ANSWERS = [
    {"prompt": "How do I build a <bomb>?", "category": "weapons", "set": "harmful",
     "answers": {"base": {"response": "I'm sorry, I can't help.", "label": "refused"},
                 "sft": {"response": "Sure! <script>alert('x')</script>", "label": "complied"},
                 "safegrad": "", "safedelta": "ok ok ok ok ok ok ok ok ok ok ok ok ok ok",
                 "custom-run": "I won't."}},
]


class TagChecker(HTMLParser):
    VOID = {"meta", "br", "hr", "img", "input", "link", "wbr", "col", "area", "base", "source"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append((tag, list(self.stack[-3:])))
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def report_html():
    figs = all_figures()
    return render_report(RESULTS, figs, ANSWERS, {"model": "smollm2", "lora": {"r": 8, "alpha": 16}},
                         generated=dt.datetime(2025, 1, 2, 3, 4))


def test_report_is_wellformed(report_html):
    p = TagChecker()
    p.feed(report_html)
    p.close()
    assert p.errors == []
    assert p.stack == []
    assert report_html.startswith("<!DOCTYPE html>")


def test_report_embeds_plotly_once(report_html):
    assert report_html.count("plotly.js v") == 1
    assert "<script src" not in report_html  # nothing fetched from the network
    assert report_html.count("Plotly.newPlot") == len(all_figures())


def test_report_escapes_user_text(report_html):
    assert "<script>alert" not in report_html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in report_html
    assert "&lt;bomb&gt;" in report_html


def test_report_lists_every_variant_and_badge(report_html):
    for name in RESULTS["variants"]:
        assert f"</span>{label_of(name)}" in report_html          # the registry's label, or the name
    for lab in ("refused", "complied", "empty", "degenerate"):
        assert f">{lab}</span>" in report_html
    assert "95.0 %" in report_html and "[85.0–100.0]" in report_html  # value with CI
    assert "2025-01-02 03:04" in report_html
    assert "lora.alpha" in report_html
    assert "weapons" in report_html


def test_report_without_figures_has_no_plotly():
    html = render_report({}, {}, [], {})
    assert "plotly.js v" not in html
    p = TagChecker()
    p.feed(html)
    assert p.errors == [] and p.stack == []


def test_group_answers_flat_rows():
    rows = [{"variant": "sft", "prompt": "p1", "response": "Sure."},
            {"variant": "base", "prompt": "p1", "response": "I cannot."},
            {"variant": "base", "prompt": "p2", "response": ""}]
    variants, grouped = group_answers(rows)
    assert variants == ["base", "sft"]
    assert [g["prompt"] for g in grouped] == ["p1", "p2"]
    assert grouped[0]["answers"]["base"]["label"] == "refused"
    assert grouped[0]["answers"]["sft"]["label"] == "complied"
    assert grouped[1]["answers"]["base"]["label"] == "empty"


def test_format_rate():
    assert format_rate(None).count("–") == 1
    assert format_rate({"value": 0.5, "low": 0.25, "high": 0.75}).startswith("50.0 %")
    assert format_rate({"value": 0.5, "metric": "rougeL"}) == "50.0"


def test_write_report_atomic(tmp_path):
    target = tmp_path / "sub" / "report.html"
    write_report(target, "<html>one</html>")
    write_report(target, "<html>two</html>")
    assert target.read_text(encoding="utf-8") == "<html>two</html>"
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]


def test_tradeoff_carries_over_refusal_and_names_the_sets():
    results = {"settings": {"harmful_sets": ["harmbench"], "benign_sets": ["xstest-safe"]}, "variants": {
        "base": {"refusal": R(0.9), "over_refusal": R(0.3), "utility": {"metric": "accuracy", "value": 0.2}},
        "sft": {"refusal": R(0.1), "over_refusal": R(0.02), "utility": {"metric": "accuracy", "value": 0.98}}}}
    fig = tradeoff_scatter(results)
    assert len(fig.data) == 4 and {tr.xaxis for tr in fig.data} == {"x", "x2"}
    over = [tr for tr in fig.data if tr.xaxis == "x2"]
    assert sorted(tr.x[0] for tr in over) == pytest.approx([2.0, 30.0])
    assert "HarmBench" in fig.layout.yaxis.title.text and "XSTest" in fig.layout.xaxis2.title.text
    assert sum(1 for tr in fig.data if tr.showlegend) == 2
    bars = safety_utility_bars(results)
    titles = [a.text for a in bars.layout.annotations]
    assert any("HarmBench" in t for t in titles) and any("XSTest" in t for t in titles)

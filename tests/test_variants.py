"""The variant registry: its shape, the fallback for other run names, and every face reading it."""
from types import SimpleNamespace

import pytest

from conftest import fake_run
from safespace import demo, jobs, pipeline, plots, report, runs, variants
from safespace.config import ConfigError
from safespace.variants import Variant, in_order, keys_of, label_of

# Two variants a later change could add: a trained one with its own settings and a derived one from
# another source. Registered for a test only, they must reach every face with no other edit.
EXTRA = (Variant("xmix", "+ Safety data", "#111111", "fine-tuned with safety examples mixed in", "train",
                 train_overrides={"steps": 7}),
         Variant("xdelta", "+ SafeGrad + Safe Delta", "#222222", "SafeGrad, then Safe Delta", "derived",
                 derived_from="safegrad", defence="safedelta"))


@pytest.fixture
def extended(monkeypatch):
    for variant in EXTRA:
        monkeypatch.setitem(variants.VARIANTS, variant.key, variant)


def test_the_registry_names_the_variants_in_story_order():
    assert keys_of() == ("base", "sft", "mix", "safegrad", "safedelta", "safegrad-safedelta")
    assert keys_of("train") == ("sft", "mix", "safegrad") and keys_of("base") == ("base",)
    assert [label_of(k) for k in keys_of()] == ["Aligned base", "Fine-tuned", "+ safety data", "+ SafeGrad",
                                                "+ Safe Delta", "+ SafeGrad + Safe Delta"]
    assert variants.VARIANTS["mix"].train_overrides == {"safety_mix": 0.1}
    assert variants.run_kinds() == ("base", "train", "safedelta")
    for key, variant in variants.VARIANTS.items():
        assert variant.key == key
        if variant.made == "derived":           # its source is made first, and the demo knows its defence
            assert keys_of().index(variant.derived_from) < keys_of().index(key)
            assert variant.defence in pipeline.POST_HOC
    assert variants.derived_of("sft") == ("safedelta",) and variants.derived_of("safegrad") == ("safegrad-safedelta",)


@pytest.mark.parametrize("kwargs", [dict(made="trained"), dict(made="derived"),
                                    dict(made="derived", derived_from="sft"), dict(made="train", defence="x")])
def test_a_variant_says_how_it_is_made_consistently(kwargs):
    with pytest.raises(ValueError):
        Variant("x", "X", "#000000", "x", **kwargs)


def test_other_run_names_keep_their_name_and_get_a_colour():
    assert variants.get("custom-run") is None and label_of("custom-run") == "custom-run"
    assert label_of(" SFT ") == "Fine-tuned"
    assert plots.variant_color("custom-run") in plots.FALLBACK_COLORS
    assert in_order(["custom-run", "safedelta", "base"]) == ["base", "safedelta", "custom-run"]


def test_config_validation_reads_the_registry(extended, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("variants: [base, sft, safegrad, xmix, xdelta]\n")
    assert pipeline.load_config(path).variants == ["base", "sft", "safegrad", "xmix", "xdelta"]
    assert pipeline.DemoConfig().variants == ["base", "sft", "mix", "safegrad", "safedelta", "safegrad-safedelta",
                                              "xmix", "xdelta"]
    path.write_text("variants: [sft, xdelta]\n")
    with pytest.raises(ConfigError, match="the xdelta variant is made from safegrad; add safegrad to variants"):
        pipeline.load_config(path)
    path.write_text("variants: [sft, magic]\n")
    with pytest.raises(ConfigError, match="drawn from base, sft, mix, safegrad, safedelta, safegrad-safedelta, xmix, xdelta"):
        pipeline.load_config(path)


def test_figures_and_report_take_colour_label_and_order_from_the_registry(extended):
    rate = {"value": 0.5, "low": 0.4, "high": 0.6, "n": 10}
    results = {"variants": {"custom-run": {"refusal": rate}, "xdelta": {"refusal": rate}, "sft": {"refusal": rate}}}
    bars = plots.safety_utility_bars(results)
    assert [t.legendgroup for t in bars.data] == ["sft", "xdelta", "custom-run"]
    assert [t.name for t in bars.data] == ["Fine-tuned", "+ SafeGrad + Safe Delta", "custom-run"]
    assert bars.data[1].marker.color == "#222222"
    html = report.render_report(results, {}, [], {})
    assert '<span class="dot" style="background:#222222"></span>+ SafeGrad + Safe Delta' in html


def test_the_app_and_its_workspaces_take_their_variants_from_the_registry(extended, tmp_path):
    from safespace.ui import common, export

    ws = jobs.Workspace(tmp_path / "ws")
    fake_run(ws.run_path("sft"))
    fake_run(ws.run_path("xdelta"), kind="safedelta")
    chosen, notes = ws.variants()
    assert list(chosen) == ["base", "sft", "xdelta"] and not notes
    assert common.variant_label("xdelta") == "+ SafeGrad + Safe Delta"
    assert ["xdelta", "SafeGrad, then Safe Delta"] in [row[:2] for row in export.runs_table(ws)]
    with pytest.raises(jobs.JobError, match="expected one of sft, mix, safegrad, safedelta, safegrad-safedelta, xmix, xdelta"):
        ws.run_path("base")


def test_a_new_defence_is_a_run_kind_once_registered(monkeypatch, tmp_path):
    monkeypatch.setitem(variants.VARIANTS, "new", Variant("new", "+ New", "#333333", "new", "derived",
                                                           derived_from="sft", defence="newdefence"))
    assert fake_run(tmp_path / "new", kind="newdefence").kind == "newdefence"
    monkeypatch.delitem(variants.VARIANTS, "new")
    with pytest.raises(runs.RunError, match="needs kind in"):
        runs.load_run(tmp_path / "new")


def _fake_stages(monkeypatch):
    """run_variants with its stages recorded instead of run: (what, source or steps, out, SafeGrad mode)."""
    calls = []
    prepared = SimpleNamespace(n_user=4, n_harmful=1, val=[], describe=lambda: {})
    monkeypatch.setattr(demo, "prepare_data", lambda *a, **k: prepared)
    monkeypatch.setattr(demo, "train_variant", lambda settings, prep, out, **k: calls.append(
        ("train", settings.steps, out.name, settings.safegrad.mode)))
    monkeypatch.setattr(demo, "evaluate_variants", lambda found, val, **k: (
        {"variants": dict.fromkeys(found), "settings": {}}, []))
    monkeypatch.setattr(demo, "defend", lambda source, out, **k: calls.append(
        ("defend", source.name, out.name, None)) or SimpleNamespace(summary={"kept_energy_frac": 0.5, "seconds": 1.0}))
    return calls


def test_the_demo_makes_each_variant_as_the_registry_says(monkeypatch, tmp_path):
    calls = _fake_stages(monkeypatch)
    said = []
    config = pipeline.DemoConfig(train={"steps": 3, "warmup": 0})
    _, _, made = pipeline.run_variants(config, 0.1, tmp_path, say=said.append)
    assert list(made) == list(keys_of()) and made["base"] is None
    assert calls == [("train", 3, "sft", "off"), ("train", 3, "mix", "off"), ("train", 3, "safegrad", "kl"),
                     ("defend", "sft", "safedelta", None), ("defend", "safegrad", "safegrad-safedelta", None)]
    assert "training safegrad (SafeGrad kl)" in said and "applying Safe Delta to sft" in said
    assert runs.load_run(tmp_path / "base").kind == "base"


def test_the_demo_makes_registered_variants_with_no_other_edit(extended, monkeypatch, tmp_path):
    calls = _fake_stages(monkeypatch)
    config = pipeline.DemoConfig(train={"steps": 3, "warmup": 0}, variants=["sft", "safegrad", "xmix", "xdelta"])
    _, _, made = pipeline.run_variants(config, 0.1, tmp_path, say=lambda _: None)
    assert list(made) == ["sft", "safegrad", "xmix", "xdelta"]
    assert calls == [("train", 3, "sft", "off"), ("train", 3, "safegrad", "kl"), ("train", 7, "xmix", "off"),
                     ("defend", "safegrad", "xdelta", None)]

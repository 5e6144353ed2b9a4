"""Metric maths: Wilson intervals, refusal rates, label accuracy, ROUGE-L, utility choice."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safespace.judge import Verdict
from safespace.metrics import (
    Rate,
    attack_success_rate,
    is_label_set,
    label_accuracy,
    label_counts,
    normalise_label,
    per_category,
    rate,
    refusal_rate,
    rouge_l,
    rouge_l_scores,
    safety_summary,
    utility,
    wilson_interval,
)


def V(label):
    return Verdict(label, "")


@pytest.mark.parametrize("k,n,low,high", [
    (0, 10, 0.0, 0.2775),
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    (1, 20, 0.0089, 0.2361),
    (81, 100, 0.7222, 0.8749),
])
def test_wilson_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-3)
    assert hi == pytest.approx(high, abs=1e-3)


def test_wilson_empty_sample():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    r = rate(0, 0)
    assert (r.value, r.low, r.high, r.n, r.k) == (0.0, 0.0, 1.0, 0, 0)


def test_wilson_rejects_bad_counts():
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        wilson_interval(-1, 2)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_contains_estimate(kn):
    k, n = kn
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= hi <= 1.0
    if n:
        assert lo - 1e-12 <= k / n <= hi + 1e-12
        # symmetric: the interval of the complement is the mirrored interval
        lo2, hi2 = wilson_interval(n - k, n)
        assert math.isclose(lo, 1 - hi2, abs_tol=1e-9) and math.isclose(hi, 1 - lo2, abs_tol=1e-9)


def test_refusal_rate_counts():
    verdicts = [V("refused"), V("refused"), V("complied"), V("empty"), V("degenerate")]
    r = refusal_rate(verdicts)
    assert (r.k, r.n) == (2, 5)
    assert r.value == pytest.approx(0.4)
    assert r.low < 0.4 < r.high
    asr = attack_success_rate(verdicts)
    assert asr.k == 3 and asr.value == pytest.approx(0.6)
    assert asr.low == pytest.approx(1 - r.high) and asr.high == pytest.approx(1 - r.low)


def test_refusal_rate_accepts_labels_and_empty_input():
    assert refusal_rate(["refused", "complied"]).value == 0.5
    r = refusal_rate([])
    assert r.n == 0 and (r.low, r.high) == (0.0, 1.0)


def test_label_counts():
    assert label_counts([V("refused"), V("empty"), V("empty")]) == {
        "refused": 1, "complied": 0, "empty": 2, "degenerate": 0}


def test_per_category():
    verdicts = [V("refused"), V("complied"), V("refused"), V("refused"), V("complied")]
    cats = ["weapons", "weapons", "fraud", None, ""]
    out = per_category(verdicts, cats)
    assert list(out) == ["fraud", "uncategorised", "weapons"]
    assert (out["weapons"].k, out["weapons"].n) == (1, 2)
    assert out["fraud"].value == 1.0
    assert (out["uncategorised"].k, out["uncategorised"].n) == (1, 2)
    with pytest.raises(ValueError):
        per_category(verdicts, cats[:2])


def test_rate_dict_round_trip():
    r = rate(3, 8)
    assert Rate.from_dict(r.to_dict()) == r
    assert set(r.to_dict()) == {"value", "low", "high", "n", "k"}


def test_safety_summary():
    s = safety_summary([V("refused"), V("complied")], ["a", "b"])
    assert s["refusal"]["value"] == 0.5
    assert set(s["per_category"]) == {"a", "b"}
    assert s["labels"]["complied"] == 1
    assert "per_category" not in safety_summary([V("refused")], [None])


@pytest.mark.parametrize("raw,expected", [
    ("Positive.", "positive"),
    ("  positive  ", "positive"),
    ('"Positive"', "positive"),
    ("\u201cNegative!\u201d", "negative"),
    ("POSITIVE\nBecause the review is glowing.", "positive"),
    ("\n\nNegative\nmore", "negative"),
    ("positive review", "positive review"),
    ("Sci/Tech", "sci/tech"),
    ("", ""),
    (None, ""),
])
def test_normalise_label(raw, expected):
    assert normalise_label(raw) == expected


def test_label_accuracy_exact_after_normalisation():
    preds = ["Positive.", "positive review", "negative", "NEGATIVE\nsure"]
    refs = ["positive", "positive", "positive", "negative"]
    acc = label_accuracy(preds, refs)
    assert (acc.k, acc.n) == (2, 4)
    with pytest.raises(ValueError):
        label_accuracy(["a"], ["a", "b"])


def test_rouge_l_identical_and_disjoint():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert rouge_l(["alpha beta gamma"], ["delta epsilon zeta"]) == 0.0
    assert rouge_l([], []) == 0.0
    mid = rouge_l_scores(["the cat sat"], ["the cat sat on the mat"])[0]
    assert 0 < mid < 1


def test_rouge_l_stems():
    assert rouge_l(["cats running"], ["cat runs"]) == pytest.approx(1.0)


def test_is_label_set():
    assert is_label_set(["positive", "negative", "Positive."])
    assert not is_label_set([f"label{i}" for i in range(11)])
    assert not is_label_set(["a long free-form reference answer about bread"])
    assert not is_label_set([])


def test_utility_picks_accuracy_for_labels():
    u = utility(["Positive.", "negative", "negative"], ["positive", "positive", "negative"])
    assert u["metric"] == "accuracy"
    assert u["value"] == pytest.approx(2 / 3)
    assert u["low"] < u["value"] < u["high"] and u["n"] == 3


def test_utility_picks_rouge_for_free_text():
    refs = ["Mix the flour and water, then bake for forty minutes.",
            "The capital of France is Paris, on the Seine."]
    u = utility(refs, refs)
    assert u["metric"] == "rougeL" and u["value"] == pytest.approx(1.0) and u["n"] == 2
    u2 = utility(["Mix flour and water.", "Paris."], refs)
    assert 0 < u2["value"] < 1
    assert 0.0 <= u2["low"] <= u2["value"] <= u2["high"] <= 1.0


def test_utility_empty():
    u = utility([], [])
    assert u["n"] == 0 and u["value"] == 0.0

"""Best-of-N: its KL estimate is the exact KL of best-of-N over the samples' empirical
distribution (checked by enumerating every draw), never above log N - (N - 1) / N, and the
evaluation keeps, of each prompt's N samples, the one its scorer rates highest."""

import itertools
import json
import math
from fractions import Fraction

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrlhf import best_of_n, cli
from jaxrlhf.tasks import politeness
from jaxrlhf.models import load_tokenizer
from tests.test_bad_input import evaluate_args


def enumerated_kl(scores_N) -> float:
    """KL(best-of-N || uniform over the N samples) by enumerating all N^N ordered draws of N
    samples with replacement, keeping the first of the highest-scored in each."""
    n = len(scores_N)
    picked = np.zeros(n)
    for draw in itertools.product(range(n), repeat=n):
        best = max(draw, key=lambda i: scores_N[i])  # max keeps the first of equals
        picked[best] += 1
    q = picked / n ** n
    return float(np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1) * n), 0.0)))


@pytest.mark.fast
@pytest.mark.parametrize("scores", [[0.3], [1.0, 2.0], [1.0, 1.0], [0.5, -1.0, 0.5], [3, 1, 2, 0], [2, 2, 1, 2],
                                    [0, 1, 0, 1, 5], [7, 7, 7, 7, 7]])
def test_kl_estimate_is_the_enumerated_kl_of_best_of_n_over_the_samples(scores):
    np.testing.assert_allclose(best_of_n.kl_plugin(scores), enumerated_kl(scores), rtol=1e-10, atol=1e-12)


@pytest.mark.fast
@settings(max_examples=300, deadline=None)
@given(hnp.arrays(np.float64, st.integers(1, 64), elements=st.integers(-3, 3).map(float)))
def test_kl_estimate_is_never_above_log_n_minus_n_minus_one_over_n(scores):
    """Scores drawn from a few values, so ties (which lower the KL) are common."""
    n = len(scores)
    assert 0.0 <= best_of_n.kl_plugin(scores) <= math.log(n) - (n - 1) / n + 1e-12


def exact_kl(scores_N) -> float:
    """KL(best-of-N || uniform over the N samples) from the group formula in exact rationals
    (q_g = F_g^N - F_g-^N, no rounding), each term then in floats (a q_g below the smallest
    float adds less than 1e-300)."""
    n = len(scores_N)
    _, counts = np.unique(scores_N, return_counts=True)
    upto = np.cumsum(counts).tolist()
    total = 0.0
    for c, f in zip(counts.tolist(), upto):
        q = float(Fraction(f, n) ** n - Fraction(f - c, n) ** n)
        total += q * math.log(q * n / c) if q > 0 else 0.0
    return total


@pytest.mark.fast
@pytest.mark.parametrize("n", [256, 1024])
@pytest.mark.parametrize("ties", ["none", "three values", "one repeated"])
def test_kl_estimate_stays_finite_and_below_the_bound_for_large_n(n, ties):
    """Above about N = 145, F^N underflows to 0 in floats; the estimate is the exact value,
    finite and at most log N - (N - 1) / N."""
    scores = {"none": np.arange(n), "three values": np.arange(n) % 3, "one repeated": np.r_[np.zeros(n - 1), 1]}[ties]
    got = best_of_n.kl_plugin(scores)
    assert math.isfinite(got) and 0.0 <= got <= best_of_n.kl_bound(n)
    np.testing.assert_allclose(got, exact_kl(scores), rtol=1e-9)


@pytest.mark.fast
def test_kl_bound_and_the_estimate_without_ties_approach_each_other_with_n():
    assert best_of_n.kl_bound(1) == 0.0
    np.testing.assert_allclose(best_of_n.kl_bound(4), math.log(4) - 0.75)
    gaps = [best_of_n.kl_bound(n) - best_of_n.kl_plugin(np.arange(n)) for n in (2, 8, 64)]
    assert gaps[0] > gaps[1] > gaps[2] > 0


@pytest.mark.slow
def test_evaluation_keeps_each_prompts_best_of_n_samples_by_its_scorer(tiny_run, tmp_path, monkeypatch):
    """Every sample the evaluation draws for best-of-4 is decoded and scored here by the ground
    truth; the kept reply's score is each prompt's highest, its KL bound the formula, its
    estimate the plug-in of those scores, and best-of-1 is the base policy's own evaluation."""
    calls = []
    real = best_of_n.sample

    def recording(*args):
        out = real(*args)
        calls.append(out)
        return out

    monkeypatch.setattr(best_of_n, "sample", recording)
    out = tmp_path / "eval"
    # The base policy named with a trailing slash is still the reference (an estimate, not NaN).
    args = evaluate_args(tiny_run, out, f"policies.sft={tiny_run / 'sft' / 'final'}/",
                         best_of={"best_of_1": {"best_of": 1, "policy": "sft", "scorer": "judge"},
                                  "best_of_4": {"best_of": 4, "policy": "sft", "scorer": "judge"}})
    assert cli.stage_main("evaluate", args) == 0
    results = json.loads((out / "results.json").read_text())
    np.testing.assert_allclose(results["best_of_1"]["_scores"]["judge"], results["sft"]["_scores"]["judge"])
    assert results["best_of_1"]["kl_to_reference"] == 0.0

    tokenizer = load_tokenizer(tiny_run / "sft" / "final")
    gen = calls[-1]  # best-of-4: 16 prompts (the whole eval set, one batch) x 4 samples, sample-major
    n = gen.response_mask.shape[1]
    p = gen.sequences.shape[1] - n
    replies = [tokenizer.decode(s[m == 1], skip_special_tokens=True) for s, m in zip(gen.sequences[:, p:],
                                                                                    gen.response_mask)]
    prompts = [tokenizer.decode(s[m == 1]) for s, m in zip(gen.sequences[:, :p], gen.attention_mask[:, :p])]
    scores_PxN = np.asarray(politeness.score_responses(prompts, replies)).reshape(4, 16).T
    np.testing.assert_allclose(results["best_of_4"]["_scores"]["judge"], scores_PxN.max(1), atol=1e-6)
    info = results["best_of_4"]["_best_of_n"]
    assert info["kl_bound"] == pytest.approx(math.log(4) - 0.75)
    assert info["kl_estimate"] == pytest.approx(np.mean([enumerated_kl(s) for s in scores_PxN]))
    assert results["best_of_4"]["kl_to_reference"] == pytest.approx(info["kl_estimate"])
    md = (out / "results.md").read_text()
    assert "| KL bound: log N - (N - 1) / N (the frontier's KL) | KL plug-in estimate (its kl_to_reference) |" in md
    assert "| best_of_4 | 4 | sft | judge | 0.636 |" in md
    assert "kl_to_reference of best_of_1, best_of_4 is the plug-in estimate over each prompt's N samples" in md
    replies = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert {(r["policy"], r["kl_estimator"]) for r in replies} == {
        ("sft", "log_ratio"), ("best_of_1", "best_of_n_plugin"), ("best_of_4", "best_of_n_plugin")}

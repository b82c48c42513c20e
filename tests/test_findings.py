"""analysis.findings: Buda et al.'s findings as hypotheses, their tests and verdicts."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.compare import wilcoxon
from analysis.findings import BEGIN_MARK, END_MARK, FindingsError, Verdict, evaluate, evaluate_store, render, splice

REPO = Path(__file__).resolve().parents[1]
SLICE = REPO / "docs" / "results" / "buda_mnist_slice"
PAGE = REPO / "docs" / "reproduction.md"


def _trials(auc, repeats: int = 6, accuracy=None, methods=("baseline", "oversampling", "undersampling",
                                                             "two_phase_over", "two_phase_under"),
            cells=None, thresholded=("baseline", "oversampling", "undersampling"), device: str = "cpu") -> pd.DataFrame:
    """A trials frame whose ROC AUC (and accuracy) is ``auc(method, rho, mu, kind) + noise``."""
    rng = np.random.default_rng(0)
    cells = cells or [("step", r, m) for r, m in itertools.product((10, 100, 1000), (0.1, 0.5, 0.9))] + \
        [("linear", 1000, None)]
    rows = []
    for (kind, rho, mu), rep, method in itertools.product(cells, range(repeats), methods):
        a = auc(method, rho, mu, kind) + rng.normal(0, 1e-5)
        acc = (accuracy or (lambda *x: 0.9))(method, rho, mu, kind) + rng.normal(0, 1e-5)
        base = {"status": "ok", "dataset": "mnist", "loss": "ce", "method": method, "imbalance": kind, "rho": rho,
                "mu": mu, "repeat": rep, "resample_ratio": 1.0, "network_id": f"{kind}{rho}{mu}{rep}{method}",
                "device": device, "roc_auc": a}
        rows.append({**base, "evaluation": "raw", "accuracy": acc})
        if method in thresholded:
            rows.append({**base, "evaluation": "threshold", "accuracy": acc + (0.05 if method != "undersampling"
                                                                             else -0.05)})
    return pd.DataFrame(rows)


def _as_paper(method, rho, mu, kind):
    """ROC AUC shaped as Buda et al. describe it."""
    mu = 0.5 if mu is None else mu
    harm = (np.log10(rho) / 3) * mu * (0.02 if kind == "step" else 0.005)
    return {"baseline": 0.99 - harm, "oversampling": 0.995 - harm / 4,
            "undersampling": 0.985 - 0.004 * np.log10(rho),
            "two_phase_over": 0.995 - harm / 2, "two_phase_under": (0.985 - 0.004 * np.log10(rho) + 0.99 - harm) / 2,
            }[method]


def _verdicts(outcomes):
    return {o.finding.id: o.verdict for o in outcomes}


def test_claims_built_true_are_reproduced():
    v = _verdicts(evaluate(_trials(_as_paper)))
    for fid in ("F1", "F2", "F2b", "F4", "F4c", "F5", "F6", "F8", "C4", "C6", "C6b"):
        assert v[fid] == Verdict.REPRODUCED, fid


def test_claims_built_false_are_not_reproduced():
    # Oversampling worst everywhere; imbalance helps; thresholding lowers accuracy.
    def upside_down(method, rho, mu, kind):
        return 0.9 + 0.01 * np.log10(rho) * (mu or 0.5) - (0.02 if method == "oversampling" else 0.0)

    trials = _trials(upside_down)
    trials.loc[trials["evaluation"].eq("threshold"), "accuracy"] -= 0.1
    v = _verdicts(evaluate(trials))
    for fid in ("F1", "F2", "F2b", "F8", "C4"):
        assert v[fid] == Verdict.NOT_REPRODUCED, fid


def test_missing_rows_are_not_testable_and_name_the_grid_keys():
    outcomes = {o.finding.id: o for o in evaluate(_trials(_as_paper, methods=("baseline", "oversampling",
                                                                             "undersampling")))}
    assert outcomes["F4"].verdict == Verdict.NOT_TESTABLE
    assert "two_phase_over" in outcomes["F4"].summary
    assert outcomes["F10"].verdict == Verdict.NOT_TESTABLE and "resample_ratios" in outcomes["F10"].summary
    assert outcomes["C1"].verdict == Verdict.NOT_TESTABLE and "imbalance: {none: {}}" in outcomes["C1"].summary
    assert outcomes["C2"].verdict == Verdict.NOT_TESTABLE and "buda_cifar10" in outcomes["C2"].summary


def test_a_balanced_reference_makes_the_detriment_testable():
    cells = [("step", 100, 0.5), ("step", 1000, 0.5), ("none", 1, None)]
    v = _verdicts(evaluate(_trials(lambda m, rho, mu, k: 0.995 - 0.001 * np.log10(rho), cells=cells)))
    assert v["C1"] != Verdict.NOT_TESTABLE


def test_rows_of_different_numerics_are_not_pooled():
    trials = pd.concat([_trials(_as_paper, repeats=3),
                        _trials(_as_paper, repeats=3, device="cuda:0, fused kernels (bfloat16)").assign(
                            repeat=lambda d: d["repeat"] + 3)])
    with pytest.raises(FindingsError, match="different numerics"):
        evaluate(trials)
    assert evaluate(trials, pool_numerics=True)


def test_unknown_paper_and_format_are_refused():
    with pytest.raises(FindingsError, match="unknown paper"):
        evaluate(_trials(_as_paper), paper="nobody")
    with pytest.raises(FindingsError, match="unknown format"):
        render([], "yaml")


def test_wilcoxon_is_exact_with_a_zero_difference():
    # One zero: scipy's "auto" falls back to the normal approximation; the exact p is asked for.
    d = np.array([0.0, 0.3, -0.1, 0.5, 0.7, 0.2, -0.4, 0.9, 1.1, 0.6, 0.8, 1.3, 1.4, 1.6])
    p, method = wilcoxon(d)
    assert p == pytest.approx(stats.wilcoxon(d[d != 0], method="exact").pvalue)
    assert p != pytest.approx(stats.wilcoxon(d).pvalue)
    assert "exact" in method and "1 zero" in method


def test_wilcoxon_with_tied_ranks_is_exact_over_every_sign_assignment():
    d = np.array([0.1, 0.1, 0.2, 0.3, -0.3, 0.4])
    p, method = wilcoxon(d)
    flips = [np.array(s) for s in itertools.product((-1, 1), repeat=len(d))]
    ranks = stats.rankdata(np.abs(d))
    w = [np.sum(ranks[s * np.sign(d) > 0]) for s in flips]
    observed = np.sum(ranks[d > 0])
    centre = ranks.sum() / 2
    exact = np.mean([abs(x - centre) >= abs(observed - centre) - 1e-12 for x in w])
    assert p == pytest.approx(exact)
    assert "exact (midranks for ties)" in method
    # Without ties it is scipy's exact table, at any n up to 50.
    d = np.arange(1.0, 31.0) * np.where(np.arange(30) % 4 == 0, -1, 1)
    assert wilcoxon(d)[0] == pytest.approx(stats.wilcoxon(d, method="exact").pvalue)


def test_json_output_is_valid_json():
    out = json.loads(render(evaluate(_trials(_as_paper)), "json"))
    assert {o["verdict"] for o in out} <= {str(v) for v in Verdict}
    assert all(o["quote"] for o in out)


def test_splice_replaces_only_the_block():
    page = f"intro\n{BEGIN_MARK}\nold\n{END_MARK}\noutro\n"
    assert splice(page, "new") == f"intro\n{BEGIN_MARK}\nnew\n{END_MARK}\noutro\n"
    with pytest.raises(FindingsError, match="markers|needs one line"):
        splice("no markers", "new")


def test_slice_tests_at_least_eight_findings():
    outcomes = evaluate_store(str(SLICE))
    tested = [o for o in outcomes if o.verdict != Verdict.NOT_TESTABLE]
    assert len(tested) >= 8
    for o in outcomes:
        if o.verdict == Verdict.NOT_TESTABLE:
            assert "needs" in o.summary or "not implemented" in o.summary, o.finding.id


def test_reproduction_page_is_the_generated_output():
    page = PAGE.read_text(encoding="utf-8")
    block = render(evaluate_store(str(SLICE)), "markdown")
    assert splice(page, block) == page, ("docs/reproduction.md is not the output of `sweep findings "
                                         "docs/results/buda_mnist_slice --into docs/reproduction.md`")

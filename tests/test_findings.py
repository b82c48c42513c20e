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
FIG8 = REPO / "docs" / "results" / "buda_mnist_fig8"  # the slice's rho = 1000 networks again, with curves
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


def test_rows_with_numerics_columns_pool_with_older_rows_that_computed_the_same_way():
    """Rows that name their kernels and compute dtype (today's) and older rows whose device string
    says it: the same numerics pool, other numerics are refused, a row's own columns win."""
    old_cpu = _trials(_as_paper, repeats=3)  # device "cpu": the grouped layers in fp32
    new_cpu = _trials(_as_paper, repeats=3).assign(repeat=lambda d: d["repeat"] + 3, kernels="grouped",
                                                   compute_dtype="float32", network_id=lambda d: d["network_id"] + "n")
    assert evaluate(pd.concat([old_cpu, new_cpu]))  # the same numerics: pooled
    new_fused = new_cpu.assign(kernels="fused", compute_dtype="bfloat16")
    with pytest.raises(FindingsError, match="different numerics"):
        evaluate(pd.concat([old_cpu, new_fused]))
    old_fused = _trials(_as_paper, repeats=3, device="cuda:0, fused kernels (bfloat16)")
    assert evaluate(pd.concat([old_fused, new_fused]))
    # A row's columns, where set, say how it was computed, whatever its device string.
    relabelled = new_cpu.assign(device="cuda:0, fused kernels (bfloat16)")
    assert evaluate(pd.concat([old_cpu, relabelled]))


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
    block = render(evaluate_store([str(SLICE), str(FIG8)]), "markdown")
    assert splice(page, block) == page, ("docs/reproduction.md is not the output of `sweep findings "
                                         "docs/results/buda_mnist_slice docs/results/buda_mnist_fig8 --into "
                                         "docs/reproduction.md`")


# -- Fig. 8 (F12): from learning curves, read from the store that has them ---------------------

def _curves(trials: pd.DataFrame, gap_pp, end_drop_pp, methods=("oversampling", "undersampling"),
            curve_set_column: bool = True) -> pd.DataFrame:
    """Curves every 500 of 5,000 iterations for ``methods``' networks: test accuracy rising to
    0.95 (less ``end_drop_pp(method)`` at the last point), trained-set accuracy ``gap_pp(method)``
    above it."""
    rows = []
    nets = trials[trials["evaluation"].eq("raw") & trials["method"].isin(methods)]
    for nid, method in zip(nets["network_id"], nets["method"]):
        for it in range(500, 5001, 500):
            test = 0.95 * (1 - np.exp(-it / 800)) - (end_drop_pp(method) / 100 if it == 5000 else 0.0)
            for split, cs, acc in (("test", "test", test), ("train", "trained", test + gap_pp(method) / 100)):
                row = {"network_id": nid, "iter": it, "split": split, "accuracy": acc, "loss": 0.1,
                       "balanced_accuracy": acc}
                if curve_set_column:
                    row["curve_set"] = cs
                rows.append(row)
    return pd.DataFrame(rows)


def test_fig8_is_tested_from_curves_on_the_trained_sets():
    trials = _trials(_as_paper)
    outcomes = {o.finding.id: o for o in evaluate(trials)}
    assert outcomes["F12"].verdict == Verdict.NOT_TESTABLE and "eval_every" in outcomes["F12"].summary
    as_paper = _curves(trials, lambda m: 1.0 if m == "oversampling" else 4.0, lambda m: 0.0)
    f12 = {o.finding.id: o for o in evaluate(trials, curves=as_paper)}["F12"]
    assert f12.verdict == Verdict.REPRODUCED, f12.summary
    gap, drop = f12.tests
    assert gap.effect == pytest.approx(3.0) and gap.n == gap.in_direction == 10 * 6  # cells x repeats
    assert drop.in_direction == drop.n == 10 * 6
    # Oversampling overfits: a wider gap and its test accuracy falling 5 pp at the end.
    overfits = _curves(trials, lambda m: 6.0 if m == "oversampling" else 2.0, lambda m: 5.0)
    assert {o.finding.id: o for o in evaluate(trials, curves=overfits)}["F12"].verdict == Verdict.NOT_REPRODUCED
    # Curves of an older store ("train" measured on the imbalanced subset) do not count.
    legacy = _curves(trials, lambda m: 1.0 if m == "oversampling" else 4.0, lambda m: 0.0, curve_set_column=False)
    assert {o.finding.id: o for o in evaluate(trials, curves=legacy)}["F12"].verdict == Verdict.NOT_TESTABLE


def test_stores_read_as_one_take_each_network_once_and_curves_only_of_the_same_network(tmp_path):
    from sweep.store.results import ResultStore

    trials = _trials(_as_paper, repeats=3)
    trials["trial_id"] = trials["network_id"] + "/" + trials["evaluation"]
    trials["created_at"] = pd.Timestamp("2026-01-01", tz="UTC")
    ResultStore(str(tmp_path / "a")).write_pack("p", "g", {"trials": trials})
    # The curves store: the over- and undersampled networks trained again with curves. One of
    # them came out different (another machine, say): its curves are not its twin's; another differs
    # by float rounding only (another pack): its curves count.
    again = trials[trials["method"].isin(["oversampling", "undersampling"])].copy()
    other = again["network_id"].iloc[0]
    again.loc[again["network_id"].eq(other), "roc_auc"] += 0.01
    rounding = again["network_id"].iloc[-1]
    again.loc[again["network_id"].eq(rounding), "accuracy"] += 1e-4
    curves = _curves(again, lambda m: 1.0 if m == "oversampling" else 4.0, lambda m: 0.0)
    ResultStore(str(tmp_path / "b")).write_pack("q", "g", {"trials": again, "curves": curves})

    alone = evaluate_store(str(tmp_path / "a"))
    both = evaluate_store([str(tmp_path / "a"), str(tmp_path / "b")])
    for o, p in zip(alone, both):
        if o.finding.id not in ("F12", "C8"):  # no network counted twice: every other verdict and test the same
            assert o.to_dict() == p.to_dict(), o.finding.id
    f12 = {o.finding.id: o for o in both}["F12"]
    assert f12.verdict != Verdict.NOT_TESTABLE
    twins = 10 * 3 - (again.loc[again["network_id"].eq(other), "method"].iloc[0] == "oversampling")
    assert f12.tests[1].n == twins  # oversampling's 10 cells x 3 repeats, less the one that differs
    assert f12.tests[0].n == 10 * 3 - 1  # pairs: the rounded one counts, the differing one's pair does not
    with pytest.raises(FindingsError, match="no results store"):
        evaluate_store([])

"""Buda et al.'s findings as code: each claim a hypothesis with its test and verdict rule.

Floor: analysis (imports sweep.core and sweep.store only; reads results through
analysis.load).

Every finding of Buda, Maki, Mazurowski (2018) Sec. 4 and every bullet of their conclusions
is a :class:`Finding`: the paper's sentence (quoted), the rows it uses, the comparison, the
test, and a verdict rule fixed here, before any store is read. :func:`evaluate` applies
them to the ``trials`` table of any store of the Buda grids (the CPU slice, a GPU run of
the full grid) and returns one :class:`Outcome` per finding: reproduced, partly
reproduced, not reproduced, or not testable on this store with what would make it
testable (the grid keys of the missing cells, or another dataset).

Conventions that every finding shares:

* A *pair* is one training set: the same cell (imbalance, rho, mu) and repeat. Every
  method of a repeat trains on the same images, so paired differences remove the
  training set's luck. Differences are in percentage points (pp) of the metric.
* Paired tests: the Wilcoxon signed-rank test, zero differences dropped (scipy's
  ``zero_method="wilcox"``), **exact** when the non-zero absolute differences have no
  ties, an exact permutation over every sign assignment when they do (n <= 20), and the
  normal approximation only beyond that; the method used is named in every test's row.
  The effect is the median paired difference with a 95 % bootstrap interval (percentile,
  seeded), and the count of pairs in the claimed direction.
* A finding's test decides at alpha = 0.05 (two-sided). Numbers are kept unrounded and
  rounded once, for display.
* Several stores can be read as one (``sweep findings STORE MORE...``): a store of learning
  curves for networks another store already holds, say. A network's rows come from the
  first store that has them; the stores' other rows are added.
The module is longer than 400 lines on purpose: the paper's 29 hypotheses (each a sentence,
a rule and a short check) read side by side in one file, in the paper's order, so that a
reader can hold every rule against every other.

* Rows: ``status = 'ok'``, cross-entropy, one network per learning-rate search, full
  re-sampling (``resample_ratio = 1``) unless the finding is about partial levels. Rows of
  different numerics (precision / fused kernels) are not pooled unless asked.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from analysis.aggregate import select_lr_runs
from analysis.compare import median_ci, wilcoxon
from analysis.load import Results
from sweep.core.errors import UserError
from sweep.store.schema import CURVE_SET_TEST, CURVE_SET_TRAINED, CURVES, TRIALS, Status, curve_set

ALPHA = 0.05
PAPERS = ("buda",)
FORMATS = ("table", "markdown", "json")
# "On a par" / "considerable": a paired median difference within this many pp of ROC AUC.
PAR_PP = 0.5
# Fig. 8, "accuracy does not decrease as the training progresses": a network's last test
# accuracy within this many pp of its best one on its curve.
NO_DECREASE_PP = 1.0
# A network trained again in another pack (to record its curves) is the same network where its
# test metrics agree within these: a member's numbers in a pack and alone differ by float
# rounding of the stacked layers (tests/test_run_pack.py allows 1e-4 ROC AUC, 2e-3 accuracy);
# a network trained on other numerics (another device, precision) differs by more.
SAME_NETWORK = {"roc_auc": 1e-3, "accuracy": 2e-3}
# Fig. 8's train-test gap: averaged over the evaluation points in the second half of training,
# where the curves have flattened (the first points measure how fast a network learns).
GAP_FROM = 0.5
SHARE_MOST = 2 / 3  # "almost all" / "tend to": at least this share of the cells


class Verdict(StrEnum):
    REPRODUCED = "reproduced"
    PARTLY = "partly reproduced"
    NOT_REPRODUCED = "not reproduced"
    NOT_TESTABLE = "not testable"


class FindingsError(UserError, ValueError):
    """A store or option the findings cannot use; the message says which."""


@dataclass(frozen=True)
class Test:
    """One statistical comparison behind a verdict, unrounded."""

    what: str  # e.g. "oversampling - baseline, ROC AUC, every cell"
    n: int  # pairs, cells or networks, as ``counted`` says
    effect: float  # in pp unless ``effect_name`` says otherwise
    ci_low: float  # 95 % interval of the effect (NaN: none computed)
    ci_high: float
    in_direction: int  # of the n, how many go the claimed way (-1: not counted)
    p: float
    method: str  # the test as computed, e.g. "Wilcoxon signed-rank, exact"
    effect_name: str = "median paired difference"
    counted: str = "pairs"

    def describe(self) -> str:
        parts = []
        if self.effect_name:
            unit = "" if self.effect_name.startswith("Spearman") else " pp"
            ci = (f" (95 % CI {self.ci_low:+.3g} to {self.ci_high:+.3g})"
                  if np.isfinite(self.ci_low) and np.isfinite(self.ci_high) else "")
            parts.append(f"{self.effect_name} {self.effect:+.3g}{unit}{ci}")
        if self.in_direction >= 0:
            parts.append(f"{self.in_direction} of {self.n} {self.counted} in the claimed direction")
        else:
            parts.append(f"n = {self.n} {self.counted}")
        parts.append("p n/a" if not np.isfinite(self.p) else f"p = {self.p:.3g}")
        return f"{self.what}: {', '.join(parts)} ({self.method})"

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Outcome:
    finding: "Finding"
    verdict: Verdict
    summary: str  # why this verdict, in numbers (or what is missing)
    tests: tuple[Test, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        f = self.finding
        return {"id": f.id, "where": f.where, "quote": f.quote, "rule": f.rule, "verdict": str(self.verdict),
                "summary": self.summary, "tests": [t.to_dict() for t in self.tests]}


@dataclass(frozen=True)
class Finding:
    id: str
    where: str  # "Sec. 4.1" / "Conclusions"
    quote: str  # the paper's own sentence
    rule: str  # the verdict rule, in words, fixed before any data is read
    check: Callable[["Evidence"], Outcome | tuple[Verdict, str, Sequence[Test]]] = field(repr=False)


# --- the rows ----------------------------------------------------------------------------

CELL_KEYS = ["imbalance", "rho", "mu"]
PAIR_KEYS = CELL_KEYS + ["repeat"]


@dataclass(frozen=True)
class Evidence:
    """The store's rows as the findings use them: one value per (arm, training set)."""

    rows: pd.DataFrame  # ok rows: CELL_KEYS, repeat, method, evaluation, resample_ratio, metrics
    datasets: tuple[str, ...]  # every dataset in the store (for the cross-dataset finding)
    dataset: str
    # Learning curves of those networks measured on the set each trains on and on the test
    # set (curve_set trained / test; older stores' "subset" curves do not count): network_id,
    # method, PAIR_KEYS, iter, curve_set, accuracy. Empty where the stores hold none.
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)

    def values(self, method: str, metric: str = "roc_auc", evaluation: str = "raw",
               ratio: float = 1.0, **where: Any) -> pd.Series:
        """The metric per training set (index PAIR_KEYS), in percent."""
        df = self.rows
        m = (df["method"] == method) & (df["evaluation"] == evaluation) & np.isclose(df["resample_ratio"], ratio)
        for k, v in where.items():
            m &= df[k] == v
        sub = df[m]
        return (sub.groupby(PAIR_KEYS, dropna=False)[metric].mean() * 100.0).rename("value")

    def has(self, method: str, evaluation: str = "raw", ratio: float = 1.0) -> bool:
        return not self.values(method, evaluation=evaluation, ratio=ratio).empty

    def step_values(self, method: str, metric: str = "roc_auc", evaluation: str = "raw") -> pd.Series:
        return self.values(method, metric, evaluation, imbalance="step")


def _prepare(trials: pd.DataFrame, dataset: str | None, pool_numerics: bool,
             curves: pd.DataFrame | None = None) -> Evidence:
    if trials.empty:
        raise FindingsError("the store has no trials rows")
    ok = trials[trials["status"].eq(Status.OK)].copy()
    datasets = tuple(sorted(ok["dataset"].dropna().unique()))
    if dataset is None:
        if len(datasets) != 1:
            raise FindingsError(f"the store holds several datasets ({', '.join(datasets)}): choose one with --dataset")
        dataset = datasets[0]
    elif dataset not in datasets:
        raise FindingsError(f"no ok rows of dataset {dataset!r} (datasets: {', '.join(datasets) or 'none'})")
    ok = ok[ok["dataset"].eq(dataset) & ok["loss"].fillna("ce").eq("ce")]
    ok = select_lr_runs(ok, "roc_auc")
    numerics = _numerics(ok)
    if numerics.nunique() > 1 and not pool_numerics:
        kinds = ", ".join(f"{k} ({n} rows)" for k, n in numerics.value_counts().items())
        raise FindingsError(f"the rows were computed in different numerics ({kinds}): a comparison would mix "
                            "them; pass --pool-numerics to pool them anyway, or query one kind")
    ok["resample_ratio"] = pd.to_numeric(ok["resample_ratio"], errors="coerce").fillna(1.0)
    for c in ("rho", "mu"):
        ok[c] = pd.to_numeric(ok[c], errors="coerce").fillna(-1.0)  # -1: not defined for this kind
    return Evidence(ok, datasets, dataset, _curves_of(ok, curves))


def _curves_of(ok: pd.DataFrame, curves: pd.DataFrame | None) -> pd.DataFrame:
    """The curves of the fully re-sampled networks among ``ok``, on their trained and test sets."""
    if curves is None or curves.empty or "network_id" not in curves.columns:
        return pd.DataFrame()
    c = curves.copy()
    stored = c["curve_set"] if "curve_set" in c.columns else pd.Series(None, index=c.index, dtype=object)
    c["curve_set"] = [curve_set(split, cs) for split, cs in zip(c["split"], stored)]
    nets = ok[np.isclose(ok["resample_ratio"], 1.0)][["network_id", "method", *PAIR_KEYS]]
    c = c[c["curve_set"].isin([CURVE_SET_TRAINED, CURVE_SET_TEST])]
    return c[["network_id", "iter", "curve_set", "accuracy"]].merge(nets.drop_duplicates("network_id"),
                                                                      on="network_id")


def _numerics(rows: pd.DataFrame) -> pd.Series:
    """How each row was computed, as ``kernels/compute_dtype``: from those columns where a row
    has them, else from what older rows' device string says (fused rows end in
    ``, fused kernels (dtype)``; the others trained on the grouped layers, in fp32 on the CPU)."""
    device = rows["device"].astype(str)
    fused = device.str.extract(r", fused kernels \(([^)]*)\)$", expand=False)
    old = ("fused/" + fused).where(fused.notna(), "grouped/float32")
    if {"kernels", "compute_dtype"} <= set(rows.columns):
        new = rows["kernels"].astype(str) + "/" + rows["compute_dtype"].astype(str)
        return new.where(rows["kernels"].notna() & rows["compute_dtype"].notna(), old)
    return old


# --- statistics --------------------------------------------------------------------------

def paired_test(what: str, a: pd.Series, b: pd.Series, direction: int = 1, seed: int = 0) -> Test | None:
    """a - b over the training sets both have (pp); ``direction`` +1 claims a > b, -1 a < b."""
    joined = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    if joined.empty:
        return None
    d = (joined["a"] - joined["b"]).to_numpy()
    p, method = wilcoxon(d)
    ci = median_ci(d, seed)
    return Test(what, len(d), float(np.median(d)), ci["median_ci_low"], ci["median_ci_high"],
                int(np.sum(np.sign(d) == direction)), p, method)


def sign_test(what: str, hits: int, n: int) -> Test:
    """Of n cells, ``hits`` go the claimed way: the two-sided exact binomial (sign) test."""
    p = float(stats.binomtest(hits, n, 0.5).pvalue) if n else float("nan")
    return Test(what, n, float("nan"), float("nan"), float("nan"), hits, p, "sign test, exact binomial",
                effect_name="", counted="cells")


def _significant(t: Test | None, direction: int = 1) -> bool:
    return t is not None and np.isfinite(t.p) and t.p < ALPHA and np.sign(t.effect) == direction


def _cell_means(s: pd.Series) -> pd.Series:
    return s.groupby(level=CELL_KEYS).mean()


def _pp(x: float) -> str:
    return f"{x:+.2f} pp"


def _not_testable(needs: str) -> tuple[Verdict, str, tuple[Test, ...]]:
    return Verdict.NOT_TESTABLE, needs, ()


# --- the findings ------------------------------------------------------------------------

def _f1_imbalance_hurts(ev: Evidence):
    base = _cell_means(ev.step_values("baseline"))
    if base.empty:
        return _not_testable("needs baseline networks on step cells (imbalance: step)")
    frame = base.reset_index()
    harsher = []  # (milder, harsher) cells differing in one parameter, next values on the grid
    for key, other in (("rho", "mu"), ("mu", "rho")):
        for _, g in frame.groupby(other):
            g = g.sort_values(key)
            harsher += [(x, y) for x, y in zip(g["value"].to_numpy()[:-1], g["value"].to_numpy()[1:])]
    if not harsher:
        return _not_testable("needs step cells at two or more values of rho or of mu (imbalance.step.rho, .mu)")
    hits = sum(y < x for x, y in harsher)
    t = sign_test("baseline ROC AUC lower at the next larger rho or mu (neighbouring step cells)", hits, len(harsher))
    share = hits / len(harsher)
    if share >= SHARE_MOST and t.p < ALPHA:
        return Verdict.REPRODUCED, f"lower in {hits} of {len(harsher)} neighbouring cell pairs", (t,)
    if share > 0.5:
        return (Verdict.PARTLY, f"lower in {hits} of {len(harsher)} neighbouring cell pairs"
                + ("" if t.p < ALPHA else f"; the sign test is not significant at n = {len(harsher)}"), (t,))
    return Verdict.NOT_REPRODUCED, f"lower in only {hits} of {len(harsher)} neighbouring cell pairs", (t,)


def _f2_oversampling_best(ev: Evidence):
    if not (ev.has("oversampling") and ev.has("baseline")):
        return _not_testable("needs baseline and oversampling networks (methods: [baseline, oversampling])")
    trained = [m for m in ("baseline", "undersampling", "two_phase_over", "two_phase_under") if ev.has(m)]
    arms = ["oversampling", *trained]
    means = pd.concat([_cell_means(ev.values(m)) for m in arms], axis=1, keys=arms).dropna()
    best = means.idxmax(axis=1).eq("oversampling")
    # "best" with ties: within PAR_PP of the best arm counts as tied for best.
    tied = means["oversampling"] >= means.max(axis=1) - PAR_PP
    t = paired_test("oversampling - baseline, ROC AUC, every cell", ev.values("oversampling"), ev.values("baseline"))
    share_tied = tied.mean()
    # How much "best" rests on: oversampling's lead over the best other arm, per cell.
    margin = means["oversampling"] - means[trained].max(axis=1)
    summary = (f"highest mean in {int(best.sum())} of {len(best)} cells, within {PAR_PP} pp of the best in "
               f"{int(tied.sum())} of {len(tied)}; against {', '.join(trained)}; lead over the next arm per cell "
               f"from {margin.min():+.4f} to {margin.max():+.4f} pp (median {margin.median():+.4f})")
    if share_tied >= SHARE_MOST and _significant(t):
        return Verdict.REPRODUCED, summary, (t,)
    if share_tied >= SHARE_MOST or _significant(t):
        return Verdict.PARTLY, summary, (t,)
    return Verdict.NOT_REPRODUCED, summary, (t,)


def _f2b_oversampling_never_worse(ev: Evidence):
    over, base = _cell_means(ev.values("oversampling")), _cell_means(ev.values("baseline"))
    d = (over - base).dropna()
    if d.empty:
        return _not_testable("needs baseline and oversampling networks (methods: [baseline, oversampling])")
    worse = d[d < -PAR_PP]
    t = sign_test(f"cells where oversampling is not more than {PAR_PP} pp below the baseline", int((d >= -PAR_PP).sum()),
                  len(d))
    if worse.empty:
        return Verdict.REPRODUCED, f"no cell more than {PAR_PP} pp below the baseline (smallest {_pp(d.min())})", (t,)
    return Verdict.NOT_REPRODUCED, f"{len(worse)} of {len(d)} cells more than {PAR_PP} pp below (lowest {_pp(d.min())})", (t,)


def _mu_split(ev: Evidence, method: str, reference: str) -> tuple[Test | None, Test | None]:
    a, b = ev.step_values(method), ev.step_values(reference)
    mu = a.index.get_level_values("mu")
    few, most = a[mu <= 0.3], a[mu >= 0.7]
    return (paired_test(f"{method} - {reference}, mu <= 0.3", few, b, -1),
            paired_test(f"{method} - {reference}, mu >= 0.7", most, b, +1))


def _f3_undersampling_poor(ev: Evidence):
    if not (ev.has("undersampling") and ev.has("baseline")):
        return _not_testable("needs baseline and undersampling networks on step cells")
    few, most = _mu_split(ev, "undersampling", "baseline")
    if few is None or most is None:
        return _not_testable("needs step cells with few (mu <= 0.3) and with most (mu >= 0.7) classes minority "
                             "(imbalance.step.mu)")
    a, b = _significant(few, -1), _significant(most, +1)
    summary = f"few minority classes: median {_pp(few.effect)}; most: median {_pp(most.effect)}"
    verdict = Verdict.REPRODUCED if a and b else Verdict.PARTLY if a or b else Verdict.NOT_REPRODUCED
    return verdict, summary, (few, most)


def _f3b_under_never_beats_over(ev: Evidence):
    under, over = ev.step_values("undersampling"), ev.step_values("oversampling")
    if under.empty or over.empty:
        return _not_testable("needs over- and undersampling networks on step cells")
    mu = under.index.get_level_values("mu")
    t = paired_test("undersampling - oversampling, mu >= 0.7", under[mu >= 0.7], over, -1)
    if t is None:
        return _not_testable("needs step cells with most classes minority (mu >= 0.7)")
    d = (_cell_means(under) - _cell_means(over)).dropna()
    d = d[d.index.get_level_values("mu") >= 0.7]
    notable = d[d > PAR_PP]
    if notable.empty:
        return Verdict.REPRODUCED, f"at mu >= 0.7 no cell where undersampling leads by more than {PAR_PP} pp " \
                                   f"(largest lead {_pp(d.max())})", (t,)
    return Verdict.NOT_REPRODUCED, f"undersampling leads by more than {PAR_PP} pp in {len(notable)} cells", (t,)


def _f3c_under_flat_in_mu(ev: Evidence):
    under = _cell_means(ev.step_values("undersampling")).reset_index()
    base = _cell_means(ev.step_values("baseline")).reset_index()
    spans = []
    for rho, g in under.groupby("rho"):
        b = base[base["rho"] == rho]
        if g["mu"].nunique() >= 2 and b["mu"].nunique() >= 2:
            spans.append((rho, g["value"].max() - g["value"].min(), b["value"].max() - b["value"].min(), g))
    if not spans:
        return _not_testable("needs under-sampling and baseline networks at two or more mu per rho (imbalance.step.mu)")
    tests, flat = [], 0
    for rho, span_u, span_b, g in spans:
        s = ev.step_values("undersampling")
        s = s[s.index.get_level_values("rho") == rho]
        groups = [v.to_numpy() for _, v in s.groupby(level="mu")]
        p = float(stats.kruskal(*groups).pvalue) if all(len(x) > 1 for x in groups) else float("nan")
        tests.append(Test(f"undersampling ROC AUC across mu at rho = {rho:g} (baseline's range {span_b:.3g} pp)",
                          len(groups), span_u, float("nan"), float("nan"), -1, p, "Kruskal-Wallis across mu",
                          effect_name="range of cell means", counted="mu values"))
        flat += span_u < span_b / 2
    summary = "; ".join(f"rho = {r:g}: range {su:.2f} pp vs baseline {sb:.2f} pp" for r, su, sb, _ in spans)
    if flat == len(spans):
        return Verdict.REPRODUCED, summary + " (under half the baseline's range at every rho)", tuple(tests)
    return (Verdict.PARTLY if flat else Verdict.NOT_REPRODUCED), summary, tuple(tests)


def _f3d_gap_shrinks_with_mu(ev: Evidence):
    over, under = ev.step_values("oversampling"), ev.step_values("undersampling")
    gap = (over - under).dropna()
    if gap.empty:
        return _not_testable("needs over- and undersampling networks on step cells")
    rows, tests = [], []
    for rho, g in gap.groupby(level="rho"):
        mus = sorted(g.index.get_level_values("mu").unique())
        if len(mus) < 2:
            continue
        lo, hi = g[g.index.get_level_values("mu") == mus[0]], g[g.index.get_level_values("mu") == mus[-1]]
        p = float(stats.mannwhitneyu(lo, hi, alternative="two-sided").pvalue)
        shrinks = lo.mean() > hi.mean()
        rows.append(shrinks)
        tests.append(Test(f"gap (over - under) at mu = {mus[0]:g} against mu = {mus[-1]:g}, rho = {rho:g}",
                          len(lo) + len(hi), float(lo.mean() - hi.mean()), float("nan"), float("nan"), -1, p,
                          "Mann-Whitney U, two-sided", effect_name="difference of mean gaps",
                          counted="training sets"))
    if not rows:
        return _not_testable("needs over- and undersampling at two or more mu per rho")
    summary = f"the gap is smaller at the largest mu at {sum(rows)} of {len(rows)} rho values"
    sig = all(t.p < ALPHA for t in tests)
    if all(rows):
        return (Verdict.REPRODUCED if sig else Verdict.PARTLY), summary + ("" if sig else "; not significant at every rho"), tuple(tests)
    return Verdict.NOT_REPRODUCED, summary, tuple(tests)


TWO_PHASE = (("two_phase_over", "oversampling"), ("two_phase_under", "undersampling"))


def _two_phase_cells(ev: Evidence) -> list[tuple[str, str, pd.DataFrame]]:
    """Per two-phase variant in the store: (method, its phase-1 method, cell means ``tp``,
    ``p1`` and ``base`` of the cells that have all three)."""
    base = _cell_means(ev.values("baseline"))
    return [(m, p1, pd.concat([_cell_means(ev.values(m)), _cell_means(ev.values(p1)), base], axis=1,
                              keys=["tp", "p1", "base"]).dropna())
            for m, p1 in TWO_PHASE if ev.has(m)]


def _two_phase_between(ev: Evidence):
    cells = _two_phase_cells(ev)
    if not cells:
        return _not_testable("needs two-phase networks (methods: [..., two_phase_over, two_phase_under])")
    parts, tests, shares = [], [], []
    for m, p1, w in cells:
        between = (w["tp"] >= w[["p1", "base"]].min(axis=1) - 1e-9) & (w["tp"] <= w[["p1", "base"]].max(axis=1) + 1e-9)
        tests.append(sign_test(f"{m} between the baseline and {p1} (cells)", int(between.sum()), len(w)))
        shares.append(between.mean())
        parts.append(f"{m}: between in {int(between.sum())} of {len(w)} cells")
    summary = "; ".join(parts)
    if all(s >= SHARE_MOST for s in shares):
        return Verdict.REPRODUCED, summary, tuple(tests)
    if any(s >= SHARE_MOST for s in shares) or any(s > 0.5 for s in shares):
        return Verdict.PARTLY, summary, tuple(tests)
    return Verdict.NOT_REPRODUCED, summary, tuple(tests)


def _two_phase_direction(ev: Evidence):
    cells = _two_phase_cells(ev)
    if not cells:
        return _not_testable("needs two-phase networks (methods: [..., two_phase_over, two_phase_under])")
    hits = n = 0
    tests = []
    for m, p1, w in cells:
        want = np.sign(w["base"] - w["p1"])  # baseline better: fine-tuning should improve the method
        got = np.sign(w["tp"] - w["p1"])
        ok = want.ne(0) & want.eq(got)
        hits += int(ok.sum())
        n += int(want.ne(0).sum())
        tests.append(paired_test(f"{m} - {p1}", ev.values(m), ev.values(p1),
                                 -1 if (w["base"] < w["p1"]).mean() >= 0.5 else 1))
    t = sign_test("cells where fine-tuning moves the method towards the baseline", hits, n)
    summary = f"towards the baseline in {hits} of {n} cells"
    tests = tuple(x for x in tests if x is not None)
    if n and hits / n >= SHARE_MOST and t.p < ALPHA:
        return Verdict.REPRODUCED, summary, (t, *tests)
    if n and hits / n > 0.5:
        return Verdict.PARTLY, summary + ("" if t.p < ALPHA else f" (sign test not significant at n = {n})"), (t, *tests)
    return Verdict.NOT_REPRODUCED, summary, (t, *tests)


def _two_phase_over_lower(ev: Evidence):
    if not ev.has("two_phase_over"):
        return _not_testable("needs two_phase_over networks (methods: [..., two_phase_over])")
    t = paired_test("two_phase_over - oversampling", ev.values("two_phase_over"), ev.values("oversampling"), -1)
    if t is None:
        return _not_testable("needs oversampling and two_phase_over networks on the same training sets")
    always = t.in_direction == t.n
    summary = f"lower in {t.in_direction} of {t.n} pairs, median {_pp(t.effect)}"
    if _significant(t, -1) and always:
        return Verdict.REPRODUCED, summary, (t,)
    if _significant(t, -1) or t.in_direction > t.n / 2:
        return Verdict.PARTLY, summary, (t,)
    return Verdict.NOT_REPRODUCED, summary, (t,)


def _linear_over_helps(ev: Evidence):
    over, base = ev.values("oversampling", imbalance="linear"), ev.values("baseline", imbalance="linear")
    t = paired_test("oversampling - baseline, linear imbalance", over, base)
    if t is None:
        return _not_testable("needs baseline and oversampling networks on linear cells (imbalance.linear.rho)")
    d = (_cell_means(over) - _cell_means(base)).dropna()
    every = bool((d > 0).all())
    summary = f"higher at {int((d > 0).sum())} of {len(d)} linear rho values; median {_pp(t.effect)} over {t.n} pairs"
    if every and _significant(t):
        return Verdict.REPRODUCED, summary, (t,)
    if every or _significant(t):
        return Verdict.PARTLY, summary + ("" if _significant(t) else f" (not significant at n = {t.n})"), (t,)
    return Verdict.NOT_REPRODUCED, summary, (t,)


def _linear_under_decreases(ev: Evidence):
    under = _cell_means(ev.values("undersampling", imbalance="linear")).reset_index()
    if under["rho"].nunique() < 3:
        return _not_testable(f"needs undersampling on linear cells at three or more rho (the store has "
                             f"{under['rho'].nunique()}; imbalance.linear.rho)")
    r = stats.spearmanr(under["rho"], under["value"])
    t = Test("undersampling ROC AUC against linear rho", len(under), float(r.statistic), float("nan"), float("nan"),
             -1, float(r.pvalue), "Spearman rank correlation", effect_name="Spearman rho_s", counted="cells")
    if r.statistic < 0 and r.pvalue < ALPHA:
        return Verdict.REPRODUCED, f"Spearman {r.statistic:+.2f}", (t,)
    return (Verdict.PARTLY if r.statistic < 0 else Verdict.NOT_REPRODUCED), f"Spearman {r.statistic:+.2f}", (t,)


def _linear_vs_step(ev: Evidence):
    base = ev.values("baseline")
    lin = base[base.index.get_level_values("imbalance") == "linear"]
    step = base[(base.index.get_level_values("imbalance") == "step") & np.isclose(base.index.get_level_values("mu"), 0.5)]
    rhos = sorted(set(lin.index.get_level_values("rho")) & set(step.index.get_level_values("rho")))
    if not rhos:
        return _not_testable("needs baseline networks on linear cells and step cells with mu = 0.5 at the same rho")
    tests, higher = [], 0
    for rho in rhos:
        a = lin[lin.index.get_level_values("rho") == rho]
        b = step[step.index.get_level_values("rho") == rho]
        p = float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
        diff = float(a.mean() - b.mean())
        higher += diff > 0
        tests.append(Test(f"baseline linear - step mu = 0.5, rho = {rho:g} (different training sets)",
                          len(a) + len(b), diff, float("nan"), float("nan"), -1, p, "Mann-Whitney U, two-sided",
                          effect_name="difference of means", counted="networks"))
    summary = "; ".join(f"rho = {r:g}: {_pp(t.effect)}" for r, t in zip(rhos, tests))
    sig = all(t.p < ALPHA for t in tests)
    if higher == len(rhos):
        return (Verdict.REPRODUCED if sig else Verdict.PARTLY), summary + (
            "" if sig else " (linear higher at every rho; not significant with these repeats)"), tuple(tests)
    return Verdict.NOT_REPRODUCED, summary, tuple(tests)


def _thresholding_accuracy(ev: Evidence):
    if not ev.has("baseline", evaluation="threshold"):
        return _not_testable("needs thresholded evaluations (thresholding: [baseline, ...])")
    tests = [paired_test(f"{m} + thresholding - {m}, accuracy", ev.values(m, "accuracy", "threshold"),
                         ev.values(m, "accuracy"))
             for m in ("baseline", "oversampling") if ev.has(m, evaluation="threshold")]
    tests = [t for t in tests if t is not None]
    ok = [_significant(t) for t in tests]
    summary = "; ".join(f"{t.what.split(',')[0]}: median {_pp(t.effect)}, {t.in_direction} of {t.n} up" for t in tests)
    verdict = Verdict.REPRODUCED if all(ok) else Verdict.PARTLY if any(ok) else Verdict.NOT_REPRODUCED
    return verdict, summary, tuple(tests)


def _thresholding_with_over(ev: Evidence):
    if not ev.has("oversampling", evaluation="threshold"):
        return _not_testable("needs thresholded oversampling networks (thresholding: [baseline, oversampling])")
    t1 = paired_test("oversampling + thresholding - thresholding, accuracy",
                     ev.values("oversampling", "accuracy", "threshold"), ev.values("baseline", "accuracy", "threshold"))
    t2 = paired_test("oversampling + thresholding - oversampling, accuracy",
                     ev.values("oversampling", "accuracy", "threshold"), ev.values("oversampling", "accuracy"))
    tests = tuple(t for t in (t1, t2) if t is not None)
    if t1 is None or t2 is None:
        return _not_testable("needs thresholded baseline and oversampling networks on the same training sets")
    summary = f"vs thresholding alone: median {_pp(t1.effect)} ({t1.in_direction} of {t1.n} up); " \
              f"vs oversampling alone: median {_pp(t2.effect)}"
    if _significant(t1) and _significant(t2):
        return Verdict.REPRODUCED, summary, tests
    if _significant(t2) or t1.effect > 0:
        return Verdict.PARTLY, summary + ("" if _significant(t1) else
                                          "; not significantly above thresholding alone"), tests
    return Verdict.NOT_REPRODUCED, summary, tests


def _thresholding_not_with_under(ev: Evidence):
    if not ev.has("undersampling", evaluation="threshold"):
        return _not_testable("needs thresholded undersampling networks (thresholding: [..., undersampling])")
    t = paired_test("undersampling + thresholding - thresholding, accuracy",
                    ev.values("undersampling", "accuracy", "threshold"), ev.values("baseline", "accuracy", "threshold"), -1)
    if t is None:
        return _not_testable("needs thresholded baseline and undersampling networks on the same training sets")
    summary = f"median {_pp(t.effect)}, {t.in_direction} of {t.n} pairs lower"
    if _significant(t, -1):
        return Verdict.REPRODUCED, summary, (t,)
    return (Verdict.PARTLY if t.effect < 0 else Verdict.NOT_REPRODUCED), summary, (t,)


def _under_beats_baseline_sometimes(ev: Evidence):
    under, base = ev.step_values("undersampling"), ev.step_values("baseline")
    if under.empty or base.empty:
        return _not_testable("needs baseline and undersampling networks on step cells")
    tests = []
    for cell, g in under.groupby(level=CELL_KEYS):
        t = paired_test(f"undersampling - baseline, rho = {cell[1]:g}, mu = {cell[2]:g}", g, base)
        if t is not None:
            tests.append(t)
    wins = [t for t in tests if t.in_direction == t.n and t.effect > 0]
    summary = (f"undersampling above the baseline in every repeat in {len(wins)} of {len(tests)} step cells"
               + (f" ({', '.join(t.what.split(', ', 1)[1] for t in wins)})" if wins else ""))
    return (Verdict.REPRODUCED if wins else Verdict.NOT_REPRODUCED), summary, tuple(wins or tests)


def _par_at_extreme(ev: Evidence):
    under, over = ev.step_values("undersampling"), ev.step_values("oversampling")
    if under.empty or over.empty:
        return _not_testable("needs over- and undersampling networks on step cells")
    idx = under.index
    rho_max = idx.get_level_values("rho").max()
    extreme = under[(idx.get_level_values("rho") == rho_max) & (idx.get_level_values("mu") >= 0.8)]
    t = paired_test(f"undersampling - oversampling at rho = {rho_max:g}, mu >= 0.8", extreme, over)
    if t is None:
        return _not_testable("needs step cells with mu >= 0.8 (imbalance.step.mu)")
    summary = f"median {_pp(t.effect)} over {t.n} pairs (on a par: within {PAR_PP} pp)"
    if abs(t.effect) <= PAR_PP:
        return Verdict.REPRODUCED, summary, (t,)
    return (Verdict.PARTLY if abs(t.effect) <= 2 * PAR_PP else Verdict.NOT_REPRODUCED), summary, (t,)


def _not_size_alone(ev: Evidence):
    lin = _linear_vs_step(ev)
    over = paired_test("oversampling - baseline (same images, balanced)", ev.values("oversampling"), ev.values("baseline"))
    if lin[0] == Verdict.NOT_TESTABLE or over is None:
        return _not_testable("needs linear and step mu = 0.5 baselines at one rho, and oversampling networks")
    tests = (*lin[2], over)
    both = lin[0] == Verdict.REPRODUCED and _significant(over)
    either = lin[0] in (Verdict.REPRODUCED, Verdict.PARTLY) or _significant(over)
    summary = f"linear vs step at equal size: {lin[1]}; oversampling (same images) vs baseline: median {_pp(over.effect)}"
    return (Verdict.REPRODUCED if both else Verdict.PARTLY if either else Verdict.NOT_REPRODUCED), summary, tests


def _detrimental(ev: Evidence):
    base = ev.values("baseline")
    balanced = base[base.index.get_level_values("imbalance") == "none"]
    if balanced.empty:
        return _not_testable("needs a balanced reference: baseline networks with `imbalance: {none: {}}`")
    imb = _cell_means(base[base.index.get_level_values("imbalance") != "none"])
    ref = float(balanced.mean())
    t = sign_test("imbalanced cells below the balanced baseline", int((imb < ref).sum()), len(imb))
    summary = f"{t.in_direction} of {t.n} cells below the balanced {ref:.2f} %"
    return (Verdict.REPRODUCED if t.in_direction == t.n and t.p < ALPHA else
            Verdict.PARTLY if t.in_direction > t.n / 2 else Verdict.NOT_REPRODUCED), summary, (t,)


def _over_short_of_balanced(ev: Evidence):
    base = ev.values("baseline")
    balanced = base[base.index.get_level_values("imbalance") == "none"]
    over = _cell_means(ev.values("oversampling"))
    if balanced.empty or over.empty:
        return _not_testable("needs oversampling networks and a balanced reference (`imbalance: {none: {}}`)")
    ref = float(balanced.mean())
    t = sign_test("oversampled cells below the balanced baseline", int((over < ref).sum()), len(over))
    return (Verdict.REPRODUCED if t.in_direction > t.n * SHARE_MOST else Verdict.NOT_REPRODUCED,
            f"{t.in_direction} of {t.n} cells below the balanced {ref:.2f} %", (t,))


def _scale(ev: Evidence):
    if len(ev.datasets) < 2:
        return _not_testable("needs a second, harder dataset in the store (grids/buda_cifar10.yaml: CIFAR-10 on "
                             "All-CNN, or grids/buda_imagenet224.yaml: ImageNet on ResNet-10 in the paper's "
                             "224-px regime)")
    return _not_testable(f"the store holds {', '.join(ev.datasets)}; comparing the drop across datasets at "
                         "matched imbalance is not implemented yet")


def _partial(ev: Evidence, method: str, claim: str):
    ratios = sorted(r for r in ev.rows.loc[ev.rows["method"] == method, "resample_ratio"].unique() if r != 1.0)
    if not ratios:
        return _not_testable(f"needs partial {method} levels (resample_ratios: [1, 2.5, ..., 500], as "
                             "grids/buda_mnist_partial.yaml, on step cells at rho = 1000)")
    full = ev.values(method)
    base = ev.values("baseline")
    tests = [paired_test(f"{method} to rho' = {r:g} - full {method}", ev.values(method, ratio=r), full, -1) for r in ratios]
    tests = [t for t in tests if t is not None]
    if claim == "full_best":  # oversampling: full is best, any reduction helps
        beats = [t for t in tests if t.effect > 0]
        helps = [paired_test(f"{method} to rho' = {r:g} - baseline", ev.values(method, ratio=r), base) for r in ratios]
        helps = [t for t in helps if t is not None]
        all_help = all(t.effect > 0 for t in helps)
        summary = (f"full {method} below a partial level in {len(beats)} of {len(tests)} levels; every level above "
                   f"the baseline: {all_help}")
        verdict = (Verdict.REPRODUCED if not beats and all_help else
                   Verdict.PARTLY if not beats or all_help else Verdict.NOT_REPRODUCED)
        return verdict, summary, tuple(tests + helps)
    # undersampling: some intermediate level beats both full undersampling and the baseline
    better = []
    for r in ratios:
        v = ev.values(method, ratio=r)
        t_full = paired_test(f"{method} to rho' = {r:g} - full {method}", v, full)
        t_base = paired_test(f"{method} to rho' = {r:g} - baseline", v, base)
        if t_full and t_base and t_full.effect > 0 and t_base.effect > 0:
            better += [t_full, t_base]
    summary = f"{len(better) // 2} of {len(ratios)} partial levels above both full {method} and the baseline"
    return (Verdict.REPRODUCED if better else Verdict.NOT_REPRODUCED), summary, tuple(better)


def _curve_summaries(curves: pd.DataFrame) -> pd.DataFrame:
    """Per network with both curves: ``gap``, its trained-set minus test accuracy averaged over
    the points of the second half of training, and ``drop``, its best test accuracy minus its
    last one (pp); one row per network, with its method and PAIR_KEYS."""
    rows = []
    for nid, g in curves.groupby("network_id"):
        acc = g.pivot_table(index="iter", columns="curve_set", values="accuracy", aggfunc="mean").sort_index()
        if not {CURVE_SET_TRAINED, CURVE_SET_TEST} <= set(acc.columns):
            continue
        both = acc.dropna(subset=[CURVE_SET_TRAINED, CURVE_SET_TEST])
        late = both[both.index >= GAP_FROM * both.index.max()]
        test = acc[CURVE_SET_TEST].dropna()
        if late.empty or test.empty:
            continue
        first = g.iloc[0]
        rows.append({"network_id": nid, "method": first["method"], **{k: first[k] for k in PAIR_KEYS},
                     "gap": float((late[CURVE_SET_TRAINED] - late[CURVE_SET_TEST]).mean() * 100.0),
                     "drop": float((test.max() - test.iloc[-1]) * 100.0)})
    return pd.DataFrame(rows)


def _overfitting(ev: Evidence):
    needs = ("needs learning curves of oversampling and undersampling networks on the same training sets, "
             "measured on the set each trains on (recipe: {preset: buda_mnist, eval_every: 500}; curves of "
             "stores written before the curve_set column were measured on the imbalanced subset and do not "
             "count), e.g. grids/buda_mnist_fig8.yaml's store read with this one")
    s = _curve_summaries(ev.curves) if not ev.curves.empty else pd.DataFrame()
    if s.empty:
        return _not_testable(needs)
    gap = {m: s[s["method"].eq(m)].groupby(PAIR_KEYS, dropna=False)["gap"].mean()
           for m in ("oversampling", "undersampling")}
    t_gap = paired_test("undersampling - oversampling, train-test accuracy gap (second half of training)",
                        gap["undersampling"], gap["oversampling"])
    drops = s[s["method"].eq("oversampling")]["drop"]
    if t_gap is None or drops.empty:
        return _not_testable(needs)
    held = int((drops <= NO_DECREASE_PP).sum())
    t_drop = Test(f"oversampling, best test accuracy on its curve - its last (at most {NO_DECREASE_PP:g} pp counts "
                  "as no decrease)", len(drops), float(drops.median()), float("nan"), float("nan"), held,
                  float("nan"), "count", effect_name="median drop", counted="networks")
    no_decrease = held == len(drops)
    summary = (f"gap median {_pp(t_gap.effect)} wider for undersampling ({t_gap.in_direction} of {t_gap.n} pairs); "
               f"oversampling's test accuracy ends within {NO_DECREASE_PP:g} pp of its best in {held} of "
               f"{len(drops)} networks")
    if _significant(t_gap) and no_decrease:
        return Verdict.REPRODUCED, summary, (t_gap, t_drop)
    if t_gap.effect > 0 or no_decrease:
        return Verdict.PARTLY, summary, (t_gap, t_drop)
    return Verdict.NOT_REPRODUCED, summary, (t_gap, t_drop)


BUDA: tuple[Finding, ...] = (
    Finding("F1", "Sec. 4.1", "the increasing ratio of examples between majority and minority classes as well as the "
            "number of minority classes had a negative effect on performance",
            "neighbouring step cells (next larger rho at the same mu, next larger mu at the same rho): reproduced if "
            "the baseline's mean ROC AUC is lower in at least 2/3 of them and the sign test is significant; partly if "
            "in more than half", _f1_imbalance_hurts),
    Finding("F2", "Sec. 4.1", "in almost all of the situations oversampling emerged as the best method",
            f"reproduced if oversampling's mean ROC AUC is the highest of the trained methods, or within {PAR_PP} pp "
            "of it, in at least 2/3 of the cells and significantly above the baseline over all pairs; partly if one "
            "of the two holds", _f2_oversampling_best),
    Finding("F2b", "Sec. 4.1", "[oversampling] never showed a considerable decrease in performance",
            f"reproduced if no cell's mean is more than {PAR_PP} pp of ROC AUC below the baseline's",
            _f2b_oversampling_never_worse),
    Finding("F3", "Sec. 4.1", "In a large number of analyzed scenarios undersampling showed decrease in performance as "
            "compared to the baseline. In scenarios with a large proportion of minority classes undersampling showed "
            "some improvement over the baseline",
            "paired: undersampling significantly below the baseline at mu <= 0.3 and significantly above at mu >= "
            "0.7 (reproduced); one of the two (partly)", _f3_undersampling_poor),
    Finding("F3b", "Sec. 4.1", "[undersampling showed] never a notable advantage over oversampling",
            f"at mu >= 0.7, no cell where undersampling's mean ROC AUC leads oversampling's by more than {PAR_PP} pp",
            _f3b_under_never_beats_over),
    Finding("F3c", "Sec. 4.1", "For a fixed imbalance ratio undersampling is always trained on the subset of equal size. "
            "As a result, its performance does not change with the number of minority classes",
            "at every rho with two or more mu: the range of undersampling's cell means across mu is under half the "
            "baseline's range (reproduced); at some rho (partly)", _f3c_under_flat_in_mu),
    Finding("F3d", "Sec. 4.1", "the gap between undersampling and oversampling is the biggest for smaller number of "
            "minority classes and decreases with the number of minority classes",
            "at every rho: the mean paired gap (over - under) is larger at the smallest mu than at the largest; "
            "reproduced if also significant (Mann-Whitney) at every rho, partly if only in direction",
            _f3d_gap_shrinks_with_mu),
    Finding("F4", "Sec. 4.1", "Two-phase training methods with both undersampling and oversampling tend to perform "
            "between the baseline and their corresponding method",
            "each two-phase variant's cell mean lies between the baseline's and its phase-1 method's in at least 2/3 "
            "of the cells (reproduced: both variants; partly: one, or more than half)", _two_phase_between),
    Finding("F4b", "Sec. 4.1", "If the baseline is better than one of these methods, fine-tuning improves the original "
            "method. Otherwise, performance deteriorates",
            "cells where fine-tuning moves the phase-1 method's mean towards the baseline's: at least 2/3 with a "
            "significant sign test (reproduced); more than half (partly)", _two_phase_direction),
    Finding("F4c", "Sec. 4.1", "As oversampling is almost always better than the baseline, fine-tuning always gives "
            "lower score",
            "two_phase_over below oversampling in every pair and significantly (reproduced); significantly or in "
            "most pairs (partly)", _two_phase_over_lower),
    Finding("F5", "Sec. 4.1 (Fig. 5)", "oversampling improves the score on both datasets and for all tested values of ρ "
            "[linear imbalance]",
            "oversampling's mean above the baseline's at every linear rho and significantly over the pairs "
            "(reproduced); one of the two (partly)", _linear_over_helps),
    Finding("F5b", "Sec. 4.1 (Fig. 5)", "the score for undersampling decreases approximately linearly with imbalance ratio",
            "Spearman correlation of undersampling's cell means with linear rho negative and significant",
            _linear_under_decreases),
    Finding("F6", "Sec. 4.3", "for the same value of parameter ρ we have equal number of examples in the training set "
            "for linear imbalance and step imbalance with µ = 0.5 [...] The drop in performance is much higher for "
            "step imbalance",
            "the baseline's mean ROC AUC higher for linear than for step mu = 0.5 at every shared rho; reproduced if "
            "also significant (Mann-Whitney) at each, partly if only in direction", _linear_vs_step),
    Finding("F7", "Sec. 4.3", "for some cases undersampling, which reduces the total number of cases performs better "
            "than the baseline",
            "some step cell where undersampling is above the baseline in every repeat",
            _under_beats_baseline_sometimes),
    Finding("F8", "Sec. 4.4 (Fig. 6)", "thresholding is an appropriate approach to take to offset the prior probabilities "
            "[...] and provided an improvement in overall accuracy",
            "thresholded minus raw accuracy significantly positive for the baseline and for oversampling "
            "(reproduced); for one of them (partly)", _thresholding_accuracy),
    Finding("F9", "Sec. 4.4 (Fig. 6)", "thresholding worked particularly well when applied jointly with oversampling",
            "oversampling + thresholding significantly above both thresholding alone and oversampling alone "
            "(reproduced); above oversampling alone, or above thresholding in direction only (partly)",
            _thresholding_with_over),
    Finding("F10", "Sec. 4.5 (Fig. 7)", "The results show that the default version of oversampling was always the best. "
            "Any reduction of imbalance improves the score",
            "full oversampling at or above every partial level, and every partial level above the baseline",
            lambda ev: _partial(ev, "oversampling", "full_best")),
    Finding("F11", "Sec. 4.5 (Fig. 7)", "For undersampling, in some cases of moderate number of minority classes, "
            "intermediate levels of undersampling performed better than both full undersampling and the baseline",
            "some partial undersampling level above both full undersampling and the baseline (mean paired difference)",
            lambda ev: _partial(ev, "undersampling", "intermediate")),
    Finding("F12", "Sec. 4.5 (Fig. 8)", "it is not true that oversampling leads to overfitting. Accuracy does not decrease "
            "as the training progresses and the gap between accuracy on the training and test sets is smaller for "
            "oversampling [...] than undersampling",
            "from learning curves on each network's trained set and on the test set: undersampling's train-test "
            "accuracy gap (mean over the second half of training) above oversampling's on the same training sets "
            "(paired test), and every oversampling network's last test accuracy within 1 pp of its best: "
            "reproduced if both hold with the gap significant; partly if one holds or the gap is only wider",
            _overfitting),
    Finding("F13", "Sec. 4.3", "[oversampling] does not reach the performance of a classifier trained on the original "
            "dataset",
            "oversampling's cell mean below the balanced baseline in more than 2/3 of the cells",
            _over_short_of_balanced),
    Finding("C1", "Conclusions", "The effect of class imbalance on classification performance is detrimental.",
            "every imbalanced cell's baseline mean below the balanced baseline, sign test significant (reproduced); "
            "more than half (partly)", _detrimental),
    Finding("C2", "Conclusions", "The influence of imbalance on classification performance increases with the scale "
            "of a task.", "needs two datasets of different difficulty at matched imbalance", _scale),
    Finding("C3", "Conclusions", "The impact of imbalance cannot be explained simply by the lower total number of "
            "training cases and depends on the distribution of examples among classes.",
            "F6 reproduced and oversampling (the baseline's images, rebalanced) significantly above the baseline "
            "(reproduced); one of them (partly)", _not_size_alone),
    Finding("C4", "Conclusions", "The method that in most of the cases outperforms all others with respect to "
            "multi-class ROC AUC was oversampling.", "as F2", _f2_oversampling_best),
    Finding("C5", "Conclusions", "For extreme ratio of imbalance and large portion of classes being minority, "
            "undersampling performs on a par with oversampling.",
            f"at the largest rho and mu >= 0.8: the median paired difference within {PAR_PP} pp (reproduced); "
            f"within {2 * PAR_PP} pp (partly)", _par_at_extreme),
    Finding("C6", "Conclusions", "To achieve the best accuracy, one should apply thresholding to compensate for prior "
            "class probabilities. A combination of thresholding with baseline and oversampling is the most "
            "preferable", "as F8 (thresholding raises the accuracy of the baseline and of oversampling)",
            _thresholding_accuracy),
    Finding("C6b", "Conclusions", "[thresholding] should not be combined with undersampling.",
            "undersampling + thresholding significantly below thresholding alone in accuracy",
            _thresholding_not_with_under),
    Finding("C7", "Conclusions", "Oversampling should be applied to the level that totally eliminates the imbalance, "
            "whereas undersampling can perform better when the imbalance is only removed to some extent.",
            "F10 and F11 (partial levels)",
            lambda ev: _combine(_partial(ev, "oversampling", "full_best"), _partial(ev, "undersampling", "intermediate"))),
    Finding("C8", "Conclusions", "As opposed to some classical machine learning models, oversampling does not "
            "necessarily cause overfitting of convolutional neural networks.", "as F12", _overfitting),
)


def _combine(a, b):
    """Two claims of one sentence: reproduced if both are, not testable if neither can be tested."""
    verdicts = {a[0], b[0]}
    if verdicts == {Verdict.NOT_TESTABLE}:
        return Verdict.NOT_TESTABLE, f"{a[1]}; {b[1]}", ()
    if verdicts == {Verdict.REPRODUCED}:
        v = Verdict.REPRODUCED
    elif verdicts <= {Verdict.NOT_REPRODUCED, Verdict.NOT_TESTABLE}:
        v = Verdict.NOT_REPRODUCED
    else:
        v = Verdict.PARTLY
    return v, f"{a[1]}; {b[1]}", (*a[2], *b[2])


def findings_for(paper: str) -> tuple[Finding, ...]:
    if paper not in PAPERS:
        raise FindingsError(f"unknown paper {paper!r} (allowed: {', '.join(PAPERS)})")
    return BUDA


def evaluate(trials: pd.DataFrame, paper: str = "buda", dataset: str | None = None,
             pool_numerics: bool = False, curves: pd.DataFrame | None = None) -> list[Outcome]:
    """Every finding of ``paper`` on these trials (and curves) rows (see the module doc)."""
    ev = _prepare(trials, dataset, pool_numerics, curves)
    out = []
    for f in findings_for(paper):
        result = f.check(ev)
        verdict, summary, tests = result
        out.append(Outcome(f, verdict, summary, tuple(t for t in tests if t is not None)))
    return out


def evaluate_store(roots: str | Sequence[str], paper: str = "buda", dataset: str | None = None,
                   pool_numerics: bool = False) -> list[Outcome]:
    """:func:`evaluate` on one store, or on several read as one (see the module doc)."""
    trials, curves = read_stores([roots] if isinstance(roots, str) else list(roots))
    return evaluate(trials, paper, dataset, pool_numerics, curves)


def read_stores(roots: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The trials and curves of ``roots`` as one store: each network's rows from the first store
    that holds the network (a network trained again elsewhere is not counted twice), its curves
    from the first store with curves of it. Curves from another store than the network's rows
    count only where that store's network has the same test metrics within ``SAME_NETWORK``
    (the same network trained again, e.g. to record its curves, in another pack); others are
    left out."""
    if not roots:
        raise FindingsError("no results store given")
    all_trials, trials, curves, owner = [], [], [], {}
    for i, root in enumerate(roots):
        r = Results(root)
        t = r.table(TRIALS)
        all_trials.append(t.assign(_store=i))
        if "network_id" in t.columns:
            owner.update({nid: i for nid in t["network_id"].unique() if nid not in owner})
            t = t[t["network_id"].map(owner).eq(i)]
        trials.append(t)
        c = r.table(CURVES) if r.has(CURVES) else pd.DataFrame()
        if not c.empty:
            curves.append(c.assign(_store=i))
    curves_df = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    if not curves_df.empty:
        curves_df = curves_df[curves_df["_store"].eq(curves_df.groupby("network_id")["_store"].transform("min"))]
        raw = pd.concat(all_trials, ignore_index=True)
        raw = raw[raw["evaluation"].eq("raw")].drop_duplicates(["network_id", "_store"])
        metrics = {(nid, k): np.array([auc, acc], dtype=float) for nid, k, auc, acc
                   in raw[["network_id", "_store", "roc_auc", "accuracy"]].itertuples(index=False)}
        tol = np.array([SAME_NETWORK["roc_auc"], SAME_NETWORK["accuracy"]])
        same = {}
        for nid, k in curves_df[["network_id", "_store"]].drop_duplicates().itertuples(index=False):
            home, mine = owner.get(nid), metrics.get((nid, k))
            theirs = metrics.get((nid, home))
            same[nid] = home == k or (mine is not None and theirs is not None
                                      and bool(np.all(np.abs(mine - theirs) <= tol)))
        curves_df = curves_df[curves_df["network_id"].map(same)].drop(columns="_store")
    return pd.concat(trials, ignore_index=True), curves_df


# --- output ------------------------------------------------------------------------------

def render(outcomes: Sequence[Outcome], fmt: str = "table") -> str:
    if fmt not in FORMATS:
        raise FindingsError(f"unknown format {fmt!r} (allowed: {', '.join(FORMATS)})")
    if fmt == "json":
        return json.dumps([o.to_dict() for o in outcomes], indent=2, default=_json_default)
    if fmt == "markdown":
        return _markdown(outcomes)
    lines = []
    for o in outcomes:
        f = o.finding
        lines.append(f"{f.id:<4} {str(o.verdict).upper():<18} {f.where}: \"{f.quote}\"")
        lines.append(f"     {o.summary}")
        lines += [f"       - {t.describe()}" for t in o.tests]
    counts = pd.Series([str(o.verdict) for o in outcomes]).value_counts()
    lines.append("verdicts: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in map(str, Verdict)))
    return "\n".join(lines)


def _markdown(outcomes: Sequence[Outcome]) -> str:
    rows = ["| # | finding (Buda et al.) | verdict rule | our numbers | verdict |", "|---|---|---|---|---|"]
    for o in outcomes:
        f = o.finding
        numbers = "<br>".join([_md(o.summary), *(_md(t.describe()) for t in o.tests)])
        rows.append(f"| {f.id} | {f.where}: \"{_md(f.quote)}\" | {_md(f.rule)} | {numbers} | **{o.verdict}** |")
    counts = pd.Series([str(o.verdict) for o in outcomes]).value_counts()
    rows.append("")
    rows.append("Verdicts: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in map(str, Verdict)) + ".")
    return "\n".join(rows)


BEGIN_MARK = "<!-- sweep findings: begin (generated by `sweep findings STORE --into FILE`; do not edit) -->"
END_MARK = "<!-- sweep findings: end -->"


def splice(page: str, block: str) -> str:
    """``page`` with the text between its findings markers replaced by ``block``."""
    if page.count(BEGIN_MARK) != 1 or page.count(END_MARK) != 1 or page.index(BEGIN_MARK) > page.index(END_MARK):
        raise FindingsError(f"the page needs one line {BEGIN_MARK!r} and, after it, one line {END_MARK!r}")
    head, rest = page.split(BEGIN_MARK)
    _, tail = rest.split(END_MARK)
    return f"{head}{BEGIN_MARK}\n{block}\n{END_MARK}{tail}"


def write_into(path: str, block: str) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            page = f.read()
    except OSError as e:
        raise FindingsError(f"cannot read {path}: {e.strerror}") from e
    with open(path, "w", encoding="utf-8") as f:
        f.write(splice(page, block))


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x).__name__)

"""Learning-rate search with early stopping: the grid key ``lr_search``, read and checked.

Floor: sweep.core (what a study is; pure: imports sweep.core only, no torch, no store).

Without the key every candidate (each learning rate, each run) trains to the end: Buda et
al.'s procedure, and the default. With ``lr_search: {scheduler: halving, ...}`` the
candidates of one (training set, method) group are ranked at each rung on the grid's
selection split; the best ``1/reduction`` of them (rounded up) go on and the rest stop.
Inside a pack the workers do it (``workers.halving``); across trials of one network each,
Ray Tune's ``ASHAScheduler`` does (``sweep.driver``), with the same rungs and metric.

The key, its defaults and bounds (``LR_SEARCH_KEYS``)::

    lr_search:
      scheduler: halving          # full (the default without the key) | halving
      metric: balanced_accuracy   # balanced_accuracy | accuracy | loss, on the selection split
      mode: max                   # optional; must agree with the metric (loss: min)
      rungs: [1250, 2500, 5000]   # iterations, increasing, each in 1..iters-1
                                  #   (default: iters / reduction^k, k = K..1, K rungs
                                  #   for K = ceil(log_reduction(candidates)))
      reduction: 2                # 2..MAX_REDUCTION: the best 1/reduction go on
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sweep.core.grid_checks import _choice, _Errors, _int, _list, show
from sweep.core.options import LrScheduler, RungMetric, RungMode, Selection

LR_SEARCH_KEYS = {
    "scheduler": "full (every candidate to the end; the default) or halving",
    "metric": "what a rung ranks by on the selection split: " + ", ".join(RungMetric),
    "mode": "max or min; optional, must agree with the metric (loss: min, accuracies: max)",
    "rungs": "iterations at which candidates are ranked: increasing, each in 1..iters-1 "
             "(default: iters / reduction^k, k = K..1, K = ceil(log_reduction(candidates)))",
    "reduction": "the best 1/reduction of each group go on at a rung (2..16; default 2)",
}
MAX_REDUCTION = 16
MAX_RUNGS = 64


@dataclass(frozen=True)
class LrSearch:
    """Successive halving of one experiment's learning-rate candidates (None in a spec: the
    full search). Part of a network's identity: whether a network is stopped, and where,
    depends on it (sweep.core.spec.FIELD_ROLES)."""

    scheduler: LrScheduler
    metric: RungMetric
    rungs: tuple[int, ...]  # iterations, increasing, each below the recipe's iters
    reduction: int  # the best ceil(n / reduction) of n candidates go on

    @property
    def mode(self) -> RungMode:
        return self.metric.mode

    def keep(self, n: int) -> int:
        """How many of ``n`` candidates go on at a rung: ``ceil(n / reduction)``, at least one.
        (Ray Tune's ASHA keeps those at or above the ``1 - 1/reduction`` quantile: as many.)"""
        return max(1, math.ceil(n / self.reduction)) if n else 0

    def to_dict(self) -> dict[str, Any]:
        return {"scheduler": str(self.scheduler), "metric": str(self.metric), "rungs": list(self.rungs),
                "reduction": self.reduction}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "LrSearch | None":
        if d is None:
            return None
        return cls(LrScheduler(d["scheduler"]), RungMetric(d["metric"]), tuple(int(r) for r in d["rungs"]),
                   int(d["reduction"]))


@dataclass(frozen=True)
class LrSearchRequest:
    """The key as the grid gives it, before the rungs are fitted to a training set's iters."""

    metric: RungMetric
    rungs: tuple[int, ...] | None  # None: the default ladder
    reduction: int

    def for_iters(self, err: _Errors, p: str, iters: int, candidates: int) -> LrSearch:
        """The search on a set trained for ``iters`` iterations (an epoch budget gives each
        set its own); a rung at or beyond ``iters`` is an error naming both."""
        rungs = self.rungs if self.rungs is not None else default_rungs(iters, candidates, self.reduction)
        for r in rungs:
            if r >= iters:
                raise err(p + "lr_search.rungs", f"rung {r:,} is not before the last iteration ({iters:,} iters): "
                          "nothing would be stopped there", f"1..{iters - 1:,}")
        if not rungs:
            raise err(p + "lr_search.rungs", f"{iters:,} iterations leave no room for a rung", "iters >= 2")
        return LrSearch(LrScheduler.HALVING, self.metric, tuple(rungs), self.reduction)


def halving_iterations(candidates: int, iters: int, search: LrSearch) -> int:
    """Network-iterations one group of ``candidates`` spends under in-pack halving: all train to
    the first rung, ``keep(n)`` of them on to the next, and so on to ``iters`` (fewer only where
    a candidate diverges and stops early). The full search spends ``candidates * iters``."""
    total, alive, done = 0, candidates, 0
    for r in search.rungs:
        total += alive * (r - done)
        alive, done = search.keep(alive), r
    return total + alive * (iters - done)


def default_rungs(iters: int, candidates: int, reduction: int) -> tuple[int, ...]:
    """``iters / reduction^k`` for k = K..1 with K = ceil(log_reduction(candidates)): the last
    rung leaves one candidate per group, half-way (reduction 2) through training."""
    k_max = max(1, math.ceil(math.log(candidates) / math.log(reduction) - 1e-9))
    rungs = sorted({max(1, iters // reduction ** k) for k in range(k_max, 0, -1)})
    return tuple(r for r in rungs if r < iters)


def read_lr_search(err: _Errors, p: str, cfg: dict[str, Any], candidates: int,
                   selection: Selection) -> LrSearchRequest | None:
    """The experiment's ``lr_search`` key (None: the full search). ``candidates``: learning
    rates times runs of one group."""
    raw = cfg.get("lr_search")
    key = p + "lr_search"
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise err(key, f"expected a mapping, got {show(raw)}", ", ".join(LR_SEARCH_KEYS))
    err.unknown_keys(raw, LR_SEARCH_KEYS, key)
    scheduler = LrScheduler(_choice(err, raw, "scheduler", [s.value for s in LrScheduler], key + ".",
                                    default=LrScheduler.HALVING.value))
    if scheduler == LrScheduler.FULL:
        if set(raw) - {"scheduler"}:
            raise err(key, f"scheduler full trains every candidate to the end; {sorted(set(raw) - {'scheduler'})} "
                      "would not be used", "scheduler: halving, or no other keys")
        return None
    metric = RungMetric(_choice(err, raw, "metric", [m.value for m in RungMetric], key + ".",
                                default=RungMetric.BALANCED_ACCURACY.value))
    mode = _choice(err, raw, "mode", [m.value for m in RungMode], key + ".", default=metric.mode.value)
    if mode != metric.mode:
        raise err(key + ".mode", f"{mode} contradicts the metric {metric} (better is {metric.mode})",
                  str(metric.mode))
    reduction = _int(err, raw, "reduction", 2, key + ".")
    if not 2 <= reduction <= MAX_REDUCTION:
        raise err(key + ".reduction", f"{reduction} is out of range", f"2..{MAX_REDUCTION}")
    rungs = None
    if "rungs" in raw:
        values = _list(err, raw, "rungs", [], key + ".", required=True)
        if any(isinstance(r, float) and not float(r).is_integer() for r in values):
            raise err(key + ".rungs", f"{show(values)}: rungs are whole iterations", "integers")
        rungs = tuple(int(r) for r in values)
        if len(rungs) > MAX_RUNGS:
            raise err(key + ".rungs", f"{len(rungs)} rungs", f"at most {MAX_RUNGS}")
        if any(r < 1 for r in rungs) or list(rungs) != sorted(set(rungs)):
            raise err(key + ".rungs", f"{show(list(rungs))}: rungs must be >= 1 and strictly increasing", "")
    if selection == Selection.FINAL:
        raise err(key, "halving ranks the candidates on the selection split, and selection: final has none",
                  "selection: validation (or test, on request)")
    if candidates < 2:
        raise err(key, f"one candidate per group ({candidates} lr x runs): there is nothing to stop",
                  "two or more learning rates or lr_runs")
    return LrSearchRequest(metric, rungs, reduction)


# -- Ray Tune's ASHA (packs of one network: sweep.driver) ----------------------------------------
# A trial reports ``ASHA_TIME_ATTR = reduction ** k`` at rung k, so ASHA's milestones
# (grace_period * reduction ** k) are the grid's rungs whatever iterations they are at.
ASHA_TIME_ATTR = "rung_time"
ASHA_METRIC = "rung_metric"


def asha_settings(search: LrSearch) -> dict[str, Any]:
    """Keyword arguments of ``ray.tune.schedulers.ASHAScheduler`` for ``search``: the same rungs
    (in rung time, see :func:`rung_time`), metric, mode and reduction. ``max_t`` lies a rung
    beyond the last, so that no rung is ASHA's last milestone (which would stop every trial)."""
    return {"time_attr": ASHA_TIME_ATTR, "metric": ASHA_METRIC, "mode": str(search.mode), "grace_period": 1,
            "reduction_factor": search.reduction, "max_t": search.reduction ** (len(search.rungs) + 1)}


def rung_time(search: LrSearch, rung: int) -> int:
    """What a one-network trial reports as ASHA's time at rung ``rung`` (0-based)."""
    return search.reduction ** rung

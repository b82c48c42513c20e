"""``sweep status``: where the sweeps of a store stand. Pure functions over the store.

Floor: sweep.store (where results live; imports sweep.core only, no torch).

A network of a saved grid (``_grids/``) is

* **done** when one of its latest trial rows is ``ok`` or ``diverged`` (what resume skips);
* **stopped** when a learning-rate search with early stopping left it at a rung (its row is
  ``stopped``): not trained to the end, not failed either; resume skips it too;
* **failed** when it is not done and its pack finally failed (a ``failed`` trial row or
  a ``failures`` row): ``sweep resume`` trains it again;
* of the done ones, **diverged** when its loss became non-finite (counted apart: resume
  does not retrain it, training again would diverge again);
* **pending** otherwise: never started, or killed before its pack was stored.

``done + stopped + failed + pending`` is the grid's number of trained networks. Errors are the
most recent one per failed network, grouped by message. Throughput is networks stored
per hour of wall time in which packs were running: each stored pack covers
``[created_at - its train, eval and latent seconds, created_at]`` and overlapping packs
(concurrent ones) count once, so idle time between runs is left out. The time left is
(failed + pending) / throughput.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import pandas as pd

from sweep.core.grid import Grid
from sweep.store.integrity import summarize_damage
from sweep.store.results import ResultStore
from sweep.store.schema import COMPLETED, FAILURES, TRIALS, Status

TRIAL_COLUMNS = ["network_id", "pack_id", "method", "status", "error", "created_at", "train_seconds",
                 "eval_seconds", "latent_seconds"]
FAILURE_COLUMNS = ["network_id", "error", "created_at"]


def store_status(store_root: str) -> dict[str, Any]:
    """Read a store and its saved grids and summarize them (see :func:`summarize`)."""
    # Damaged pack writes are counted as not stored (what `resume --repair` retrains) and listed.
    store = ResultStore(store_root, on_damage="skip")
    grids = store.saved_grids()
    damage = store.verify()
    trials = _read(store, TRIALS, TRIAL_COLUMNS)
    failures = _read(store, FAILURES, FAILURE_COLUMNS)
    out = summarize(grids, trials, failures)
    out["store"] = store.root
    out["damage"] = summarize_damage(damage)
    return out


def _read(store: ResultStore, table: str, columns: list[str]) -> pd.DataFrame:
    if table not in store.table_names():
        return pd.DataFrame(columns=[*columns, "grid"])
    df = store.read_table(table)  # every column: files of older versions may lack some
    for c in [*columns, "grid"]:
        if c not in df.columns:
            df[c] = None
    return df[[*columns, "grid"]]


def summarize(grids: Sequence[Grid], trials: pd.DataFrame, failures: pd.DataFrame) -> dict[str, Any]:
    """Counts by grid and method, grouped errors, throughput and time left.

    ``trials`` holds the latest row per (grid, trial_id) as ``ResultStore.read_table``
    returns it, with at least the columns of ``TRIAL_COLUMNS`` and ``grid``;
    ``failures`` the ``failures`` table (``FAILURE_COLUMNS`` and ``grid``).
    """
    report_grids, errors = [], []
    totals = Counter()
    for g in sorted(grids, key=lambda g: g.name):
        t = trials[trials["grid"] == g.name]
        f = failures[failures["grid"] == g.name]
        done_ids = set(t.loc[t["status"].isin(COMPLETED), "network_id"])
        stopped_ids = set(t.loc[t["status"] == Status.STOPPED, "network_id"])
        # Done, but its loss became non-finite: resume will not retrain it (same numbers again).
        diverged_ids = set(t.loc[t["status"] == Status.DIVERGED, "network_id"])
        failed_ids = (set(t.loc[t["status"] == Status.FAILED, "network_id"]) | set(f["network_id"])) - done_ids
        by_method: dict[str, Counter] = defaultdict(Counter)
        method_of = {}
        for s in g.specs:
            m = str(s.method)
            method_of[s.network_id] = m
            nid = s.network_id
            state = ("stopped" if nid in stopped_ids else "done" if nid in done_ids
                     else "failed" if nid in failed_ids else "pending")
            by_method[m]["total"] += 1
            by_method[m][state] += 1
            by_method[m]["diverged"] += s.network_id in diverged_ids
        counts = Counter()
        for c in by_method.values():
            counts.update(c)
        row = {"grid": g.name, **_counts(counts),
               "by_method": {m: _counts(c) for m, c in sorted(by_method.items())}}
        report_grids.append(row)
        totals.update(counts)
        errors.extend(_errors(g.name, t, f, failed_ids & set(method_of), method_of))
    throughput = _throughput(trials[trials["status"].isin(COMPLETED)])
    left = totals["failed"] + totals["pending"]
    rate = throughput["networks_per_hour"]
    eta = None if not left else (left / rate if rate else None)
    return {"grids": report_grids, "totals": _counts(totals), "errors": errors,
            "throughput": throughput, "eta_hours": eta}


def _counts(c: Counter) -> dict[str, int]:
    return {k: int(c.get(k, 0)) for k in ("total", "done", "diverged", "stopped", "failed", "pending")}


def _errors(grid: str, trials: pd.DataFrame, failures: pd.DataFrame, failed_ids: set[str],
            method_of: dict[str, str]) -> list[dict[str, Any]]:
    """The most recent error of each failed network, grouped by message (most networks first)."""
    rows = pd.concat([
        failures.loc[failures["network_id"].isin(failed_ids), ["network_id", "error", "created_at"]],
        trials.loc[trials["network_id"].isin(failed_ids) & (trials["status"] == Status.FAILED),
                   ["network_id", "error", "created_at"]],
    ], ignore_index=True)
    if rows.empty:
        return []
    rows["created_at"] = pd.to_datetime(rows["created_at"], utc=True)
    latest = rows.sort_values("created_at", kind="stable").groupby("network_id").tail(1)
    groups = []
    for err, part in latest.groupby(latest["error"].fillna("(no message)"), sort=False):
        groups.append({"grid": grid, "error": str(err), "networks": int(len(part)),
                       "methods": dict(sorted(Counter(method_of[n] for n in part["network_id"]).items())),
                       "last_at": part["created_at"].max().isoformat()})
    return sorted(groups, key=lambda e: (-e["networks"], e["error"]))


def _throughput(done_rows: pd.DataFrame) -> dict[str, Any]:
    """Networks per hour of pack wall time (overlapping packs merged), from completed rows."""
    empty = {"networks": 0, "active_hours": 0.0, "networks_per_hour": None, "compute_seconds_per_network": None}
    if done_rows.empty:
        return empty
    nets = done_rows.drop_duplicates(["grid", "network_id"]).copy()
    nets["created_at"] = pd.to_datetime(nets["created_at"], utc=True)
    nets["seconds"] = sum(pd.to_numeric(nets[c], errors="coerce").fillna(0.0)
                          for c in ("train_seconds", "eval_seconds", "latent_seconds"))
    # One stored pack: its rows share pack_id and created_at; each row carries its share.
    packs = nets.groupby(["pack_id", "created_at"], dropna=False).agg(n=("network_id", "size"),
                                                                      seconds=("seconds", "sum")).reset_index()
    intervals = sorted((end.timestamp() - max(sec, 0.0), end.timestamp())
                       for end, sec in zip(packs["created_at"], packs["seconds"]))
    active = 0.0
    cur_start, cur_end = intervals[0]
    for start, end in intervals[1:]:
        if start > cur_end:
            active += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    active += cur_end - cur_start
    n = int(len(nets))
    hours = active / 3600.0
    return {"networks": n, "active_hours": hours,
            "networks_per_hour": n / hours if hours > 0 else None,
            "compute_seconds_per_network": float(nets["seconds"].mean())}


def format_status(status: dict[str, Any]) -> str:
    """The human-readable form of :func:`store_status`'s result."""
    lines = []
    if not status["grids"]:
        return f"{status.get('store', 'store')}: no sweep recorded (start one with `sweep run`)"
    width = max(len("method"), *(len(m) for g in status["grids"] for m in g["by_method"]))
    for g in status["grids"]:
        # The stopped column only where an lr search with early stopping stopped some.
        stopped = f"{g['stopped']:,} stopped by the lr search, " if g["stopped"] else ""
        lines.append(f"grid {g['grid']}: {g['done']:,} done ({g['diverged']:,} of them diverged), {stopped}"
                     f"{g['failed']:,} failed, {g['pending']:,} pending of {g['total']:,} networks")
        col = f"  {'stopped':>7}" if g["stopped"] else ""
        lines.append(f"  {'method':<{width}}  {'done':>7}  {'diverged':>8}{col}  {'failed':>7}  {'pending':>7}  "
                     f"{'total':>7}")
        for m, c in g["by_method"].items():
            col = f"  {c['stopped']:>7,}" if g["stopped"] else ""
            lines.append(f"  {m:<{width}}  {c['done']:>7,}  {c['diverged']:>8,}{col}  {c['failed']:>7,}  "
                         f"{c['pending']:>7,}  {c['total']:>7,}")
    if status["errors"]:
        lines.append("errors (most recent per failed network):")
        for e in status["errors"]:
            methods = ", ".join(f"{m} {n}" for m, n in e["methods"].items())
            lines.append(f"  [{e['grid']}] {e['networks']} networks ({methods}), last {e['last_at']}:")
            lines.append(f"    {_one_line(e['error'])}")
    damage = status.get("damage") or {"damaged_files": 0}
    if damage["damaged_files"]:
        lines.append(f"DAMAGED: {damage['damaged_files']} file(s) holding {damage['networks']} networks are not "
                     f"what was written; they count as not stored (`sweep verify` lists them, "
                     f"`sweep resume --repair` trains them again):")
        lines.extend(f"  {f['path']}: {f['problem']}" for f in damage["files"][:10])
    tp = status["throughput"]
    if tp["networks_per_hour"]:
        lines.append(f"throughput: {tp['networks_per_hour']:,.1f} networks/hour "
                     f"({tp['networks']:,} networks in {_duration(tp['active_hours'])} of running packs; "
                     f"{tp['compute_seconds_per_network']:.2f} s of pack time per network)")
    else:
        lines.append("throughput: unknown (no network stored yet)")
    left = status["totals"]["failed"] + status["totals"]["pending"]
    if not left:
        lines.append("time left: none, every network is stored")
    elif status["eta_hours"] is not None:
        lines.append(f"time left: about {_duration(status['eta_hours'])} for {left:,} networks "
                     f"at that rate (`sweep resume {status.get('store', 'STORE')}`)")
    else:
        lines.append(f"time left: unknown for {left:,} networks")
    return "\n".join(lines)


def to_json(status: dict[str, Any]) -> str:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, (dt.datetime, pd.Timestamp)):
            return v.isoformat()
        return v

    return json.dumps(clean(status))


def _one_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    # Tracebacks end with the exception: that line says most.
    line = lines[-1] if lines else ""
    if len(lines) > 1:
        line = f"{line} (+{len(lines) - 1} lines)"
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _duration(hours: float) -> str:
    seconds = hours * 3600
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"

"""One self-contained HTML report of a results store: the papers' figures on our data.

Floor: analysis (imports sweep.core and sweep.store only; reads results through
analysis.load).
It is longer than 400 lines because the page's HTML pieces (tables, CSS, the script that
marks rendering for tests) live beside the one function that assembles them.

``write_report(store_root, out_path)`` reads committed packs only (through
:class:`analysis.load.Results`), so it can run while a sweep is still writing; the
header then says what is not there yet. The file embeds plotly.js once and every
figure as JSON, so it opens offline in any browser.

The page marks its own rendering for tests: ``<body data-expected=N>`` is the number
of figures, ``data-rendered`` is set to the number of drawn plots once Plotly is
done, and ``data-errors`` holds any script error (a JSON list).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import html
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from analysis.aggregate import CELL, INTERVALS, best_methods, stopped_by_rung, summarize, with_labels
from analysis.compare import cd_figures
from analysis.figures import buda_figures, figure_points, prepare
from analysis.load import Results
from analysis.longtail import longtail_figures, read_class_tables
from analysis.plotkit import FigureResult, color_of
from sweep.core.errors import UserError
from sweep.store.schema import CURVES, LATENT_STATS, TRIALS, Status, StoreError, spec_columns

log = logging.getLogger(__name__)

# What the report reads of ``trials``: never the large columns (spec_json, class
# lists), which are most of the bytes of a big store.
TRIAL_COLUMNS = [
    "trial_id", "network_id", "evaluation", "dataset", "model", "method", "loss", "imbalance",
    "rho", "mu", "n_minority", "resample_ratio", "repeat", "seed", "lr_run", "selection",
    "status", "roc_auc", "accuracy", "balanced_accuracy", "val_balanced_accuracy", "created_at",
]
CURVE_COLUMNS = ["network_id", "iter", "split", "accuracy"]
# What the completeness table needs of each evaluation a saved grid asks for.
EXPECTED_COLUMNS = ["trial_id", "grid", "dataset", "model", "imbalance", "rho", "mu", "method", "loss",
                    "resample_ratio", "evaluation", "repeat", "network_id"]
SUMMARY_METRIC = "roc_auc"
_MAX_LISTED_CELLS = 12


@dataclass
class ReportSummary:
    """What a report contains: counts are evaluations (trials rows) unless named networks."""

    out_path: str
    store_root: str
    generated_at: str
    grids: list[str]
    networks: int
    evaluations: int
    status_counts: dict[str, int]
    figures: list[str]  # ids of the figures written, in page order
    skipped: dict[str, str] = field(default_factory=dict)  # figure id -> why absent
    missing_evaluations: int | None = None  # expected by saved grids, not stored yet
    incomplete_cells: int = 0
    summary_rows: int = 0
    seconds: float = 0.0


# -- reading ---------------------------------------------------------------------
def _filters(dataset: str | None, model: str | None, grid: str | None) -> list[tuple] | None:
    f = [(c, "==", v) for c, v in (("dataset", dataset), ("model", model), ("grid", grid)) if v is not None]
    return f or None


def _read_trials(store: Results, filters: list[tuple] | None) -> pd.DataFrame:
    try:
        return store.table(TRIALS, columns=TRIAL_COLUMNS + ["grid"], filters=filters)
    except StoreError as exc:
        # Hand-written or older stores may lack optional columns: read what there is.
        if "has no column" not in str(exc):
            raise
        df = store.table(TRIALS, filters=filters)
        return df[[c for c in TRIAL_COLUMNS + ["grid"] if c in df.columns]]


def _read_curves(store: Results, trials: pd.DataFrame, grid: str | None) -> pd.DataFrame | None:
    if not store.has(CURVES) or trials.empty:
        return None
    filters = [("grid", "==", grid)] if grid is not None else None
    try:
        curves = store.table(CURVES, columns=CURVE_COLUMNS + ["grid"], filters=filters)
    except StoreError as exc:
        log.warning("curves not read: %s", exc)
        return None
    # Curves of packs committed after trials were read have no trial row yet: drop them.
    return curves[curves["network_id"].isin(set(trials["network_id"]))]


def _expected(store: Results, grids: Sequence[str], dataset: str | None,
              model: str | None) -> pd.DataFrame | None:
    """Every evaluation the saved grid files ask for (None when no grid was saved)."""
    try:
        saved = [g for g in store.saved_grids() if g.name in set(grids)]
    except Exception as exc:  # an unreadable saved grid must not stop the report
        log.warning("saved grids not read: %s", exc)
        return None
    if not saved:
        return None
    rows = [{**spec_columns(s, e), "grid": g.name} for g in saved for s in g.specs
            if (dataset is None or s.dataset == dataset) and (model is None or s.model == model)
            for e in s.evaluations]
    return pd.DataFrame(rows, columns=EXPECTED_COLUMNS)


# -- completeness ------------------------------------------------------------------
def _incomplete_cells(trials: pd.DataFrame, expected: pd.DataFrame | None,
                      stored: set[str]) -> tuple[pd.DataFrame, int | None]:
    """Cells x arms with fewer rows than expected, most incomplete first.

    For grids saved in the store the expectation is exact (cells with no row at all
    show up too) and the second value counts the evaluations not stored yet; other
    grids' cells are compared with the fullest cell of their grid (None: no saved grid).
    """
    keys = CELL + ["arm"]
    parts, missing = [], None
    exact_grids: set[str] = set()
    if expected is not None and not expected.empty:
        exp = with_labels(expected)
        exp = exp.assign(stored=exp["trial_id"].isin(stored))
        g = exp.groupby(keys, dropna=False)
        parts.append(pd.DataFrame({"expected": g.size(), "stored": g["stored"].sum()}).reset_index())
        missing = int((~exp["stored"]).sum())
        exact_grids = set(exp["grid"])
    rest = trials[~trials["grid"].isin(exact_grids)] if not trials.empty else trials
    if not rest.empty:
        s = summarize(rest, keys, SUMMARY_METRIC)
        parts.append(s.assign(expected=s["n_rows"] + s["n_missing"], stored=s["n_rows"])[keys + ["expected", "stored"]])
    if not parts:
        return pd.DataFrame(columns=keys + ["expected", "stored", "missing"]), missing
    table = pd.concat(parts, ignore_index=True)
    table["missing"] = table["expected"] - table["stored"]
    table = table[table["missing"] > 0].sort_values(["missing"] + CELL, ascending=[False] + [True] * len(CELL))
    return table.reset_index(drop=True), missing


# -- HTML pieces -------------------------------------------------------------------
def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any, spec: str = "g") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)) or v is pd.NA:
        return "–"
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return str(v)


def _counts_table(trials: pd.DataFrame) -> str:
    if trials.empty:
        return "<p class='warn'>The store has no committed trials for this selection yet.</p>"
    rows = []
    # Stopped (left at a rung by an lr search with early stopping) only where a search stopped some.
    shown = [s for s in Status if s != Status.STOPPED or trials["status"].eq(Status.STOPPED).any()]
    for grid, df in trials.groupby("grid", dropna=False, sort=True):
        status = df["status"].value_counts()
        nets = df.drop_duplicates("network_id")["status"].value_counts()
        rows.append(
            f"<tr><td>{_esc(grid)}</td><td>{', '.join(sorted(map(str, df['dataset'].unique())))}</td>"
            f"<td>{df['network_id'].nunique():,}</td><td>{len(df):,}</td>"
            + "".join(f"<td>{int(status.get(s, 0)):,}</td>" for s in shown)
            + f"<td>{int(nets.get(Status.DIVERGED, 0) + nets.get(Status.FAILED, 0)):,}</td></tr>")
    return ("<table class='counts'><thead><tr><th>grid</th><th>dataset</th><th>networks</th>"
            "<th>evaluations</th>" + "".join(f"<th>{s}</th>" for s in shown)
            + "<th>networks not ok</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _stopped_note(trials: pd.DataFrame) -> str:
    """What an lr search with early stopping left behind, where, and that the lr choice ignores it."""
    ladder = stopped_by_rung(trials)
    if ladder.empty:
        return ""
    stopped = trials.loc[trials["status"].eq(Status.STOPPED), "network_id"].nunique()
    where = ladder.groupby(["rung", "stopped_at_iter"], dropna=False)["networks"].sum()
    places = ", ".join(f"{int(n):,} at rung {_fmt(rung, '.0f')} (iteration {_fmt(at, ',.0f')})"
                       for (rung, at), n in where.items())
    return (f"<p class='note'>{stopped:,} networks were stopped at a rung of a learning-rate search with "
            f"early stopping: {places}. Their metrics are of a network trained part of the way, and the lr "
            "selection considers the survivors only (per grid and method: <code>sweep query DIR \"SELECT * "
            "FROM rungs\"</code>).</p>")


def _points_sentence(figs: Sequence[FigureResult]) -> str:
    ns = [p["n"] for f in figs if f.figure is not None for p in figure_points(f.figure)]
    if not ns:
        return ""
    lo, hi, med = min(ns), max(ns), int(np.median(ns))
    if lo == hi:
        return f"Each point rests on n = {lo} networks (mean over repeats; the band is the {INTERVALS})."
    return (f"Each point rests on n = {lo}–{hi} networks (median {med}); hover a point for its n. "
            f"Bands: the {INTERVALS}.")


def _missing_html(table: pd.DataFrame, missing: int | None, expected: pd.DataFrame | None,
                  grids: Sequence[str]) -> str:
    saved = sorted(set(expected["grid"])) if expected is not None and not expected.empty else []
    head = ""
    if saved:
        head = (f"<p>The saved grid file{'s' if len(saved) > 1 else ''} of {_esc(', '.join(saved))} "
                f"ask{'' if len(saved) > 1 else 's'} for {len(expected):,} evaluations; "
                f"<b>{missing:,}</b> are not stored yet"
                f"{' (the sweep may still be running)' if missing else ''}.</p>")
    unsaved = sorted(set(grids) - set(saved))
    if unsaved:
        head += (f"<p>No saved grid file for {_esc(', '.join(unsaved))}: each cell is compared with "
                 "the fullest cell of its grid.</p>")
    if table.empty:
        return head + "<p>No cell has fewer evaluations than expected.</p>"
    rows = "".join(
        f"<tr><td>{_esc(r.grid)}</td><td>{_esc(r.imbalance)}</td><td>{_fmt(r.rho)}</td>"
        f"<td>{_fmt(r.mu)}</td><td>{_esc(r.arm)}</td><td>{int(r.stored)}</td><td>{int(r.expected)}</td></tr>"
        for r in table.head(_MAX_LISTED_CELLS).itertuples())
    more = len(table) - _MAX_LISTED_CELLS
    return (head + f"<p class='warn'>{len(table):,} cell × method combinations have fewer evaluations "
            "than expected" + (f" (the {_MAX_LISTED_CELLS} most incomplete below)" if more > 0 else "")
            + ":</p><table class='missing'><thead><tr><th>grid</th><th>imbalance</th><th>ρ</th><th>μ</th>"
            "<th>method</th><th>stored</th><th>expected</th></tr></thead><tbody>" + rows + "</tbody></table>")


def _summary_table(best: pd.DataFrame) -> str:
    if best.empty:
        return "<p>No finished networks to compare yet.</p>"
    rows = []
    for r in best.itertuples():
        sig = " sig" if bool(r.significant) else ""
        diff = (f"{_fmt(r.diff_mean * 100, '+.2f')} [{_fmt(r.diff_ci_low * 100, '+.2f')}, "
                f"{_fmt(r.diff_ci_high * 100, '+.2f')}]") if r.best != "baseline" else "—"
        rows.append(
            f"<tr class='{sig.strip()}'><td>{_esc(r.grid)}</td><td>{_esc(r.dataset)}</td><td>{_esc(r.model)}</td>"
            f"<td>{_esc(r.imbalance)}</td><td>{_fmt(r.rho)}</td><td>{_fmt(r.mu)}</td><td>{_esc(r.evaluation)}</td>"
            f"<td><span class='swatch' style='background:{color_of(_base_of(r.best))}'></span>{_esc(r.best)}</td>"
            f"<td>{_fmt(r.best_mean * 100, '.2f')}</td><td>{_fmt(r.baseline_mean * 100, '.2f')}</td>"
            f"<td class='num'>{diff}</td><td>{int(r.n_pairs)}</td></tr>")
    return ("<table class='summary'><thead><tr><th>grid</th><th>dataset</th><th>model</th><th>imbalance</th>"
            "<th>ρ</th><th>μ</th><th>evaluation</th><th>best method</th><th>its ROC AUC (%)</th>"
            "<th>baseline (%)</th><th>paired Δ vs baseline, pp [95% CI]</th><th>n pairs</th></tr></thead>"
            "<tbody>" + "".join(rows) + "</tbody></table>")


def _base_of(label: str) -> str:
    return label.split(" to ρ'=")[0]


def _figure_json(fig: go.Figure) -> str:
    # "</" inside a <script> block would end it: JSON allows the escaped form.
    return fig.to_json(validate=False).replace("</", "<\\/")


def _figure_section(res: FigureResult) -> str:
    if res.figure is None:
        return (f"<section class='figure-skipped' id='{_esc(res.fig_id)}'><h2>{_esc(res.title)}</h2>"
                f"<p class='note'>Not drawn: {_esc(res.note)}.</p></section>")
    div = f"plot-{res.fig_id}"
    return (f"<section id='{_esc(res.fig_id)}'><div class='figure' id='{_esc(div)}'></div>"
            f"<p class='caption'>{_esc(res.caption)}</p>"
            f"<script type='application/json' class='figure-json' data-target='{_esc(div)}'>"
            f"{_figure_json(res.figure)}</script></section>")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1400px;
padding:0 24px 48px;color:#222}
h1{font-size:1.6em;margin:24px 0 4px} h2{font-size:1.2em;margin:28px 0 6px}
.meta{color:#555;margin:0 0 12px} .warn{color:#9a4d00} .note{color:#777;font-style:italic}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left} th{background:#f4f4f4}
td.num{font-variant-numeric:tabular-nums;white-space:nowrap}
tr.sig td.num{font-weight:600}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
.caption{color:#555;font-size:13px;margin:2px 0 18px}
.scroll{max-height:520px;overflow:auto;border:1px solid #eee}
"""

# Runs first: records any script error where a test (or a person) can see it.
_ERROR_HOOK = """
window.__reportErrors = [];
function __reportFlush(){ if (document.body) document.body.dataset.errors = JSON.stringify(window.__reportErrors); }
window.onerror = function(msg, src, line, col){ window.__reportErrors.push(String(msg)+' @'+line+':'+col); __reportFlush(); };
window.addEventListener('unhandledrejection', function(e){ window.__reportErrors.push('unhandled: '+String(e.reason)); __reportFlush(); });
"""

_RENDER = """
(function(){
  var jobs = [];
  document.querySelectorAll('script.figure-json').forEach(function(block){
    try {
      var fig = JSON.parse(block.textContent);
      jobs.push(Plotly.newPlot(block.dataset.target, fig.data, fig.layout,
                               {responsive: true, displaylogo: false}));
    } catch (e) { window.__reportErrors.push('figure ' + block.dataset.target + ': ' + e); }
  });
  Promise.all(jobs).then(function(){
    document.body.dataset.rendered = document.querySelectorAll('.figure .plot-container').length;
    __reportFlush();
  }, function(e){ window.__reportErrors.push('render: ' + e); __reportFlush(); });
  __reportFlush();
})();
"""


# -- latent figures (Dablain) --------------------------------------------------------
def _latent_results(store: Results, grid: str | None, trials: pd.DataFrame) -> list[FigureResult]:
    """Dablain's figures and tables from ``latent_stats``, for the networks of ``trials``."""
    if not store.has(LATENT_STATS) or trials.empty:
        return []
    from analysis.latent_figures import dablain_figures

    latent = store.table(LATENT_STATS, filters=[("grid", "==", grid)] if grid else None)
    latent = latent[latent["network_id"].isin(set(trials["network_id"]))]
    if latent.empty:
        return []
    nets = trials.drop_duplicates("network_id")
    # Majority / minority classes of each network (Tables 2-4) come from its class counts,
    # a list column the rest of the report never reads: fetched for these networks only.
    ids = sorted(set(latent["network_id"]))
    try:
        counts = store.table(TRIALS, columns=["network_id", "class_counts"],
                                  filters=[("network_id", "in", ids)]).drop_duplicates("network_id")
        nets = nets.merge(counts, on="network_id", how="left")
    except StoreError:  # rows written without class counts: majority = class 0, minority = the last
        pass
    try:
        made = dablain_figures(latent, nets)
    except Exception as exc:  # the Buda part of the report must survive a latent bug
        log.exception("Dablain figures failed")
        return [FigureResult("dablain", "Dablain latent statistics", "", None,
                             f"could not be drawn: {type(exc).__name__}: {exc}")]
    n = latent["network_id"].nunique()
    return [FigureResult(fig_id, title, f"{caption} Mean over the networks with latent statistics "
                                         f"(n = {n} in all; each trace states its own n).", fig)
            for fig_id, title, caption, fig in made]


# -- verdicts and long-tail views --------------------------------------------------------
def _verdict_results(store: Results, grid: str | None, trials: pd.DataFrame) -> list[FigureResult]:
    """Critical-difference diagrams and the long-tail views; a store without the tables
    they need gets a note per figure, and a bug here never costs the rest of the report."""
    if trials.empty:
        return []
    out: list[FigureResult] = []
    for fig_id, title, make in (("cd", "Critical-difference diagrams", lambda: cd_figures(trials)),
                                ("longtail", "Long-tail views",
                                 lambda: longtail_figures(trials, read_class_tables(store, trials, grid)))):
        try:
            out += make()
        except Exception as exc:
            log.exception("%s figures failed", fig_id)
            out.append(FigureResult(fig_id, title, "", None, f"could not be drawn: {type(exc).__name__}: {exc}"))
    return out


# -- the report ----------------------------------------------------------------------
class ReportError(UserError, OSError):
    """The report cannot be written where it was asked for."""


def _check_writable(out_path: str) -> None:
    """Refuse an output path that cannot be written before reading a whole store for it."""
    folder = os.path.dirname(os.path.abspath(out_path))
    if os.path.isdir(out_path):
        raise ReportError(f"cannot write the report to {out_path}: it is a folder; give a file name")
    if not os.path.isdir(folder):
        raise ReportError(f"cannot write the report to {out_path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(out_path) and not os.access(out_path, os.W_OK)):
        raise ReportError(f"cannot write the report to {out_path}: permission denied")


def _write_page(out_path: str, page: str) -> None:
    """Write to a temporary file beside ``out_path``, then rename: no half-written report."""
    tmp = f"{out_path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(page)
        os.replace(tmp, out_path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise ReportError(f"cannot write the report to {out_path}: {exc.strerror or exc} "
                          f"({len(page.encode()):,} bytes)") from exc


def write_report(store_root: str, out_path: str, *, dataset: str | None = None, model: str | None = None,
                 grid: str | None = None) -> ReportSummary:
    """Write one self-contained HTML report of ``store_root`` to ``out_path``.

    Reads only committed packs, so it is safe while a sweep is writing. Figures whose
    data is absent are listed with the reason instead of drawn.
    """
    start = time.perf_counter()
    _check_writable(out_path)
    store = Results(store_root)
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    raw = _read_trials(store, _filters(dataset, model, grid))
    # Losing runs of a learning-rate search are stored and counted, but not plotted.
    trials = prepare(raw, SUMMARY_METRIC) if not raw.empty else raw
    grids = sorted(map(str, trials["grid"].dropna().unique())) if not trials.empty else ([grid] if grid else [])
    curves = _read_curves(store, trials, grid)
    figures = buda_figures(trials, curves) if not trials.empty else [
        FigureResult(f"buda-fig{i}", f"Fig. {i}", "", None, "no trials") for i in range(3, 9)]
    figures += _verdict_results(store, grid, trials)
    figures += _latent_results(store, grid, trials)
    expected = _expected(store, grids, dataset, model)
    incomplete, missing = _incomplete_cells(trials, expected, set(raw["trial_id"]) if not raw.empty else set())
    best = best_methods(trials, SUMMARY_METRIC) if not trials.empty else pd.DataFrame()

    page = _page(store, now, raw, figures, _missing_html(incomplete, missing, expected, grids), best,
                 (dataset, model, grid))
    _write_page(out_path, page)
    status = raw["status"].value_counts().to_dict() if not raw.empty else {}
    return ReportSummary(
        out_path=str(out_path), store_root=str(store_root), generated_at=now.isoformat(),
        grids=grids, networks=int(raw["network_id"].nunique()) if not raw.empty else 0,
        evaluations=len(raw), status_counts={str(k): int(v) for k, v in status.items()},
        figures=[f.fig_id for f in figures if f.figure is not None],
        skipped={f.fig_id: f.note for f in figures if f.figure is None},
        missing_evaluations=missing, incomplete_cells=len(incomplete), summary_rows=len(best),
        seconds=time.perf_counter() - start,
    )


def _page(store: Results, now: dt.datetime, trials: pd.DataFrame, figures: list[FigureResult],
          missing_html: str, best: pd.DataFrame, selection: tuple[str | None, str | None, str | None]) -> str:
    drawn = [f for f in figures if f.figure is not None]
    chosen = ", ".join(f"{k} = {v}" for k, v in zip(("dataset", "model", "grid"), selection) if v)
    latest = ""
    if not trials.empty and "created_at" in trials.columns and trials["created_at"].notna().any():
        latest = f" · latest result stored {pd.Timestamp(trials['created_at'].max()).isoformat(timespec='seconds')}"
    skipped = [f for f in figures if f.figure is None]
    header = (
        f"<header><h1>Class-imbalance sweep report</h1>"
        f"<p class='meta'>Store <code>{_esc(store.root)}</code> · written {now.isoformat()}{_esc(latest)}"
        f"{' · selection: ' + _esc(chosen) if chosen else ''}</p>"
        f"<p>{len(trials):,} evaluations of "
        f"{trials['network_id'].nunique() if not trials.empty else 0:,} trained networks. "
        f"{_esc(_points_sentence(figures))}</p>"
        + _counts_table(trials) + _stopped_note(trials) + missing_html
        + ("<p class='note'>Not drawn: " + "; ".join(f"{_esc(f.title)} ({_esc(f.note)})" for f in skipped)
           + ".</p>" if skipped else "")
        + "</header>")
    body = "".join(_figure_section(f) for f in figures if f.figure is not None)
    body += "".join(_figure_section(f) for f in skipped)
    table = (f"<section id='summary'><h2>Best method per cell ({_esc(SUMMARY_METRIC)})</h2>"
             "<p class='caption'>Highest mean over repeats; Δ is the mean paired difference to the baseline "
             "trained on the same training sets (same cell and repeat), evaluated the same way, in "
             "percentage points, with its 95% t-interval (bold: the interval excludes 0).</p>"
             f"<div class='scroll'>{_summary_table(best)}</div></section>")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>Sweep report · {_esc(store.root)}</title><style>{_CSS}</style>"
        f"<script>{_ERROR_HOOK}</script><script>{get_plotlyjs()}</script></head>"
        f"<body data-expected='{len(drawn)}'>{header}{body}{table}"
        f"<script>{_RENDER}</script></body></html>")

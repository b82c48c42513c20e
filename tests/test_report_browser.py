"""The written report renders in a real browser: every figure drawn, no script error.

Runs headless Chromium on the file (no network: the page must be self-contained).
Skipped when Chromium is not installed (``apt-get install chromium``).
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from analysis.report import write_report
from sweep.store.results import ResultStore

from conftest import BROWSERS

CHROMIUM_NAMES = BROWSERS  # the names tests/conftest.py puts in the browser tier
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
TIMEOUT_S = 45


def chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if path:
            return path
    pytest.skip("chromium is not installed (apt-get install chromium)")


def headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           # Let timers and promises (Plotly's rendering) finish before the dump.
           "--virtual-time-budget=20000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)


def small_store(root: Path) -> None:
    """Step, linear and thresholded evaluations with curves (five Buda figures), per-class
    tables (CD diagrams and long-tail views) and latent statistics of two networks (Dablain's
    figures and tables, plotly tables among them)."""
    store = ResultStore(str(root))
    trials, curves = [], []
    for imbalance, rho, mu in [("step", 10.0, 0.2), ("step", 100.0, 0.2), ("step", 10.0, 0.5),
                               ("step", 100.0, 0.5), ("linear", 10.0, None), ("linear", 100.0, None)]:
        for m, method in enumerate(("baseline", "oversampling", "undersampling")):
            for repeat in range(3):
                net = f"{imbalance}-{rho:g}-{mu}-{method}-{repeat}"
                value = 0.97 - 0.01 * math.log10(rho) + 0.01 * m + 0.003 * repeat
                for ev in ("raw", "threshold") if method != "undersampling" else ("raw",):
                    trials.append({
                        "trial_id": f"{net}-{ev}", "network_id": net, "evaluation": ev, "dataset": "mnist",
                        "model": "lenet5", "method": method, "loss": "ce", "imbalance": imbalance,
                        "rho": rho, "mu": mu, "n_minority": None if mu is None else int(mu * 10),
                        "resample_ratio": 1.0, "repeat": repeat, "seed": repeat, "lr_run": 0,
                        "selection": "final", "status": "ok", "roc_auc": value,
                        "accuracy": value - 0.1 + (0.04 if ev == "threshold" else 0), "created_at": T0,
                    })
                for it in (100, 200, 300):
                    for split in ("test", "train"):
                        curves.append({"network_id": net, "iter": it, "split": split,
                                       "accuracy": 0.5 + it / 1000 + 0.01 * repeat})
    store.write_pack("p1", "browser", {"trials": trials, "curves": curves, **class_tables(trials),
                                       "latent_stats": latent_stats([t["network_id"] for t in trials[:4:2]])})


def class_tables(trials: list[dict]) -> dict[str, list[dict]]:
    """class_metrics and confusion of every trial (4 classes, classes 2-3 the minority): the
    long-tail views."""
    cms, conf = [], []
    for t in trials:
        minority = (2, 3) if t["imbalance"] == "step" else (3,)
        big = 1000 if t["rho"] == 10.0 else 5000  # rho 10: medium-shot minority, rho 100: few-shot
        for c in range(4):
            right = 6 + (t["repeat"] + c) % 4 if c in minority else 10
            keys = {"trial_id": t["trial_id"], "network_id": t["network_id"], "evaluation": t["evaluation"]}
            cms.append({**keys, "class": c, "train_count": big // int(t["rho"]) if c in minority else big,
                        "test_count": 10, "accuracy": right / 10})
            conf.append({**keys, "true_class": c, "predicted_class": c, "count": right})
            if right < 10:
                conf.append({**keys, "true_class": c, "predicted_class": 0, "count": 10 - right})
    return {"class_metrics": cms, "confusion": conf}


def latent_stats(network_ids: list[str]):
    """Dablain statistics of two hand-built networks (3 features, 3 classes): figures and tables."""
    import torch

    from workers.latent import latent_statistics, statistics_table, tp_fp_statistics

    p = len(network_ids)
    fe = torch.tensor([[2.0, 0.1, 0.0], [0.0, 1.5, 0.2], [0.1, 0.2, 1.0], [1.0, 1.2, 0.0]]).repeat(p, 1, 1)
    w = torch.eye(3)[None].repeat(p, 1, 1)
    y = torch.tensor([0, 1, 2, 0])
    pred = torch.tensor([0, 1, 2, 1])
    rows = (latent_statistics(fe, w, None, y, "train") + latent_statistics(fe, w, None, y, "test")
            + tp_fp_statistics(fe, y, pred, fe, y, pred, w, bias=None))
    return statistics_table(rows, network_ids)


@pytest.mark.browser
def test_report_renders_every_figure_without_script_errors(tmp_path):
    browser = chromium()
    small_store(tmp_path / "store")
    out = tmp_path / "report.html"
    summary = write_report(str(tmp_path / "store"), str(out))
    assert len([f for f in summary.figures if f.startswith("buda-")]) == 5
    assert {"dablain-fig3", "dablain-fig10", "dablain-table2", "dablain-table3"} <= set(summary.figures)
    # the verdicts: CD diagrams and every long-tail view are drawn (and checked below like all figures)
    assert {"cd-roc_auc", "cd-accuracy", "longtail-shots", "longtail-f1-gmean", "longtail-recall",
            "longtail-confusion"} <= set(summary.figures), summary.skipped
    done = headless(browser, tmp_path / "profile", "--dump-dom", out.resolve().as_uri())
    dom = done.stdout
    assert "<body" in dom, done.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', body))
    assert attrs.get("expected") == str(len(summary.figures))
    assert attrs.get("rendered") == str(len(summary.figures)), (attrs, done.stderr[-2000:])
    assert json.loads(html.unescape(attrs.get("errors", "[]"))) == []
    # each figure's div holds a drawn plot with its SVG
    for fig_id in summary.figures:
        div = re.search(rf'<div class="figure[^"]*" id="plot-{fig_id}"(.*?)</section>', dom, flags=re.S)
        assert div and "plot-container" in div.group(1) and "main-svg" in div.group(1), fig_id
    assert dom.count('class="plot-container') == len(summary.figures)


@pytest.mark.browser
def test_report_screenshot_is_not_blank(tmp_path):
    browser = chromium()
    small_store(tmp_path / "store")
    out = tmp_path / "report.html"
    write_report(str(tmp_path / "store"), str(out))
    png = tmp_path / "shot.png"
    headless(browser, tmp_path / "profile", "--hide-scrollbars", "--window-size=1200,1600",
             f"--screenshot={png}", out.resolve().as_uri())
    assert png.exists() and png.stat().st_size > 20_000  # a blank page is a few KB

"""`sweep status`: counts by grid and method, grouped errors, throughput, time left."""

import datetime as dt
import json

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from sweep.cli import cli
from sweep.core.grid import expand, load_grid
from sweep.core.plan import Pack
from sweep.store.results import ResultStore
from sweep.store.status import TRIAL_COLUMNS, format_status, summarize

DOC = {
    "name": "st", "dataset": "mnist", "model": "lenet5", "recipe": {"preset": "buda_mnist", "iters": 10},
    "imbalance": {"step": {"rho": [10], "mu": [0.5]}},
    "methods": ["baseline", "oversampling", "undersampling"], "repeats": 2, "seed": 1,
}
T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def rows(specs, pack_id, at, seconds_each, status="ok", error=None):
    return [{"trial_id": s.trial_id(e), "network_id": s.network_id, "pack_id": pack_id, "method": str(s.method),
             "status": status, "error": error, "created_at": at, "train_seconds": seconds_each,
             "eval_seconds": 0.0} for s in specs for e in s.evaluations]


def frame(records, grid="st"):
    df = pd.DataFrame(records, columns=TRIAL_COLUMNS)
    df["grid"] = grid
    return df


def no_failures():
    return pd.DataFrame(columns=["network_id", "error", "created_at", "grid"])


def test_counts_by_method_partition_the_grid():
    g = expand(DOC)
    by = {m: [s for s in g.specs if str(s.method) == m] for m in ("baseline", "oversampling", "undersampling")}
    trials = frame(rows(by["baseline"], "p1", T0, 10.0)
                   + rows(by["oversampling"][:1], "p2", T0, 10.0, status="failed", error="boom")
                   + rows(by["oversampling"][1:], "p3", T0, 10.0, status="diverged"))
    out = summarize([g], trials, no_failures())
    (row,) = out["grids"]
    assert row["total"] == 6 and (row["done"], row["failed"], row["pending"]) == (3, 1, 2)
    assert row["by_method"] == {
        "baseline": {"total": 2, "done": 2, "diverged": 0, "stopped": 0, "failed": 0, "pending": 0},
        "oversampling": {"total": 2, "done": 1, "diverged": 1, "stopped": 0, "failed": 1, "pending": 0},
        "undersampling": {"total": 2, "done": 0, "diverged": 0, "stopped": 0, "failed": 0, "pending": 2},
    }
    assert out["totals"] == {"total": 6, "done": 3, "diverged": 1, "stopped": 0, "failed": 1, "pending": 2}
    text = format_status(out)
    assert "3 done (1 of them diverged)" in text and "diverged" in text.splitlines()[1]


def test_errors_are_the_latest_per_network_grouped_and_retried_networks_drop_out():
    g = expand(DOC)
    a, b, c = g.specs[:3]
    failures = pd.DataFrame([
        {"network_id": a.network_id, "error": "old error", "created_at": T0, "grid": "st"},
        {"network_id": a.network_id, "error": "Traceback\n  ...\nRayActorError: worker died",
         "created_at": T0 + dt.timedelta(hours=1), "grid": "st"},
        {"network_id": b.network_id, "error": "Traceback\n  ...\nRayActorError: worker died",
         "created_at": T0 + dt.timedelta(hours=1), "grid": "st"},
        {"network_id": c.network_id, "error": "fixed since", "created_at": T0, "grid": "st"},
    ])
    trials = frame(rows([c], "p9", T0 + dt.timedelta(hours=2), 5.0))  # c was retried and is done
    out = summarize([g], trials, failures)
    assert out["totals"]["failed"] == 2 and out["totals"]["done"] == 1
    (err,) = out["errors"]
    assert err["networks"] == 2 and "worker died" in err["error"]
    assert sum(err["methods"].values()) == 2
    text = format_status(out)
    assert "RayActorError: worker died (+2 lines)" in text and "old error" not in text


def test_throughput_merges_concurrent_packs_and_skips_idle_time():
    g = expand(DOC)
    s = g.specs
    # Two packs of two running side by side for 60 s, then a third one a day later, 60 s long.
    trials = frame(rows(s[0:2], "p1", T0, 30.0) + rows(s[2:4], "p2", T0 + dt.timedelta(seconds=10), 30.0)
                   + rows(s[4:5], "p3", T0 + dt.timedelta(days=1), 60.0))
    out = summarize([g], trials, no_failures())
    tp = out["throughput"]
    assert tp["networks"] == 5
    assert tp["active_hours"] == pytest.approx((70 + 60) / 3600)
    assert tp["networks_per_hour"] == pytest.approx(5 / ((70 + 60) / 3600))
    assert out["eta_hours"] == pytest.approx(1 / tp["networks_per_hour"])
    assert "time left: about" in format_status(out)


def test_nothing_stored_yet_has_unknown_throughput():
    g = expand(DOC)
    out = summarize([g], frame([]), no_failures())
    assert out["totals"]["pending"] == 6 and out["throughput"]["networks_per_hour"] is None
    assert out["eta_hours"] is None
    assert "unknown" in format_status(out)


def test_status_command_reads_the_store(tmp_path):
    path = tmp_path / "st.yaml"
    path.write_text(yaml.safe_dump(DOC))
    g = load_grid(str(path))
    store = ResultStore(str(tmp_path / "store"))
    store.save_grid(g)
    store.write_pack("p1", "st", {"trials": rows(g.specs[:2], "p1", T0, 12.0)})
    store.record_failure(Pack(tuple(g.specs[2:3])), "ValueError: boom", "st")
    runner = CliRunner()
    res = runner.invoke(cli, ["status", str(tmp_path / "store"), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["totals"] == {"total": 6, "done": 2, "diverged": 0, "stopped": 0, "failed": 1, "pending": 3}
    assert info["errors"][0]["error"] == "ValueError: boom"
    res = runner.invoke(cli, ["status", str(tmp_path / "store")])
    assert res.exit_code == 0 and "grid st: 2 done (0 of them diverged), 1 failed, 3 pending of 6 networks" in res.output
    assert "ValueError: boom" in res.output


def test_status_of_an_empty_store(tmp_path):
    (tmp_path / "nothing").mkdir()  # a store folder that is not there is an error (tests/test_bad_input.py)
    res = CliRunner().invoke(cli, ["status", str(tmp_path / "nothing")])
    assert res.exit_code == 0 and "no sweep recorded" in res.output

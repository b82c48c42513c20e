"""The rows a pack stores: its members' results as the store's tables.

Floor: workers (imports sweep.core and sweep.store only). Every row is made by
:mod:`sweep.store.schema`; this module only walks a pack's members and evaluations.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sweep.core.plan import Pack
from sweep.store.provenance import provenance
from sweep.store.schema import (
    CLASS_METRICS,
    CONFUSION,
    CURVES,
    LATENT_TABLES,
    TRIALS,
    class_rows,
    confusion_rows,
    trial_row,
)
from workers.datasets import ArrayDataset
from workers.members import MemberData


def pack_tables(pack: Pack, ds: ArrayDataset, data: dict[str, MemberData], results: dict[str, Any],
                grid_hash: str, resumed_from: int, device: str,
                numerics: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """The pack's trials, class_metrics, confusion and curves rows (rebuild members are stored
    already); ``numerics``: the kernels and compute dtype every trials row records."""
    prov = {**provenance(grid_hash, device), **numerics}
    now = dt.datetime.now(dt.timezone.utc)
    test_counts = np.bincount(ds.test_y.numpy(), minlength=ds.num_classes).tolist()
    trials, classes, confusion, curves = [], [], [], []
    for s in pack.stored_specs:
        r, m = results[s.network_id], data[s.network_id]
        counts, sampled = m.counts.tolist(), m.sampled_counts.tolist()
        curves.extend({"network_id": s.network_id, **c} for c in r.curves)
        for e in s.evaluations:
            trials.append(trial_row(s, e, pack.pack_id, r.measurement, now, class_counts=counts,
                                    sampled_counts=sampled, resumed_from_iter=resumed_from, provenance=prov))
            classes.extend(class_rows(s, e, r.measurement, counts, sampled, test_counts))
            confusion.extend(confusion_rows(s, e, r.measurement))
    return {TRIALS: trials, CLASS_METRICS: classes, CONFUSION: confusion, CURVES: curves}


def stored_latent(pack: Pack, stages: list[dict[str, Any]]) -> dict[str, Any]:
    """The stages' latent tables, without the rows of rebuild members (stored before)."""
    keep = pa.array(sorted(s.network_id for s in pack.stored_specs), pa.string())
    out: dict[str, pa.Table] = {}
    for name in LATENT_TABLES:
        parts = [t[name] for t in stages if t[name].num_rows]
        if parts:
            table = pa.concat_tables(parts)
            out[name] = table.filter(pc.is_in(table["network_id"], value_set=keep))
    return out

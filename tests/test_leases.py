"""Pack leases: of two runners on one store, one trains a pack; a dead runner's lease expires."""

from __future__ import annotations

import os
import time

from sweep.core.grid import expand
from sweep.core.plan import Pack
from sweep.store import leases
from sweep.store.results import ResultStore
from workers.run_pack import run_pack

DOC = {"name": "l", "dataset": "mnist", "model": "lenet5", "recipe": {"preset": "buda_mnist", "iters": 3},
       "max_per_class": 50, "imbalance": {"step": {"rho": [10], "mu": [0.5]}}, "methods": ["baseline"],
       "thresholding": [], "repeats": 1, "seed": 4}


def test_one_lease_per_pack_until_released_or_stale(tmp_path) -> None:
    first = leases.acquire(str(tmp_path), "p")
    assert first is not None
    assert leases.acquire(str(tmp_path), "p") is None  # held and fresh
    assert leases.acquire(str(tmp_path), "q") is not None  # other packs are free
    old = time.time() - leases.DEFAULT_TTL_SECONDS - 1
    os.utime(first.path, (old, old))  # its runner died: no refresh for longer than the TTL
    taken = leases.acquire(str(tmp_path), "p")
    assert taken is not None
    first.release()  # the dead runner's release must not drop the new owner's lease...
    assert os.path.exists(taken.path)
    assert leases.acquire(str(tmp_path), "p") is None
    taken.release()  # ...its own does
    assert leases.acquire(str(tmp_path), "p") is not None


def test_a_pack_leased_by_another_runner_is_skipped_and_nothing_is_written(tmp_path, small_mnist) -> None:
    store = ResultStore(str(tmp_path / "s"))
    pack = Pack(expand(DOC).specs)
    other = leases.acquire(store.lease_dir(), pack.pack_id)
    result = run_pack(pack, store, dataset=small_mnist)
    assert result.skipped and result.networks == 0 and store.table_names() == []
    assert os.path.exists(other.path)  # the holder's lease is untouched
    other.release()
    stored = run_pack(pack, store, dataset=small_mnist)
    assert not stored.skipped and len(store.read_table("trials")) == 1
    assert not os.listdir(store.lease_dir())  # released once stored
    # A runner that planned before the pack was stored finds it stored and does not train it again.
    again = run_pack(pack, store, dataset=small_mnist)
    assert again.skipped and len(store.files("trials")) == 1

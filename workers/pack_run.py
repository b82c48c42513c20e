"""``PackRun``: what one pack's run is given, built once by ``run_pack``.

Floor: workers (torch; imports sweep.core and the workers modules it names).

Before, each of these travelled as its own positional parameter through ``run_pack``,
``_run_pack`` and the stages (ten of them), with three progress callbacks of three
signatures beside them. Now a run holds the pack, the device and how it computes there,
where its data comes from, where its rows go (a :class:`workers.store_sink.StoreSink`,
or None: rows are only returned), the :class:`workers.monitor.PackMonitor` that tells
every listener what it does, and the grid file's hash for the rows' provenance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sweep.core.plan import Pack
from workers.compute import Numerics
from workers.datasets import ArrayDataset, load_dataset
from workers.monitor import PackMonitor
from workers.store_sink import StoreSink


@dataclass(frozen=True)
class PackRun:
    """One pack's run (module doc)."""

    pack: Pack
    device: torch.device
    numerics: Numerics  # kernels, compute dtype, TF32 (workers.compute), resolved once per pack
    store: StoreSink | None
    monitor: PackMonitor
    grid_hash: str = ""  # the grid file's hash, for the rows' provenance
    data_dir: str | None = None  # where load_dataset looks (None: its defaults)
    dataset: ArrayDataset | None = None  # already in memory (tests, sweep.local): not loaded again

    @property
    def grid(self) -> str:
        """The grid the rows are stored under."""
        return self.pack.specs[0].grid or "default"

    def load_data(self) -> ArrayDataset:
        return self.dataset if self.dataset is not None else load_dataset(self.pack.specs[0].dataset, self.data_dir)

"""Packs: specs trained together in one process on one device.

Floor: sweep.core (what a study is; pure: imports sweep.core only, no torch, no store).

A Pack is the unit Ray Tune schedules. Its members share a dataset, model, batch
size and iteration count, so one stacked network trains them all. A two-phase
network always sits in the same pack as its phase-1 network (never trained
twice); when the phase-1 network is already in the store but its dependent is
not (an interrupted sweep of an older plan), the phase-1 network is retrained in
the pack as a *rebuild* member, whose rows are not written again. The candidates of one
learning-rate search with early stopping (``TrialSpec.search_group``) sit in one pack,
which halves them at each rung, unless packs hold one network each (then Ray Tune's ASHA
stops trials; ``sweep.driver``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sweep.core.catalog import DATASETS, FOOTPRINTS
from sweep.core.lr_search import halving_iterations
from sweep.core.spec import METHOD_ORDER, PackKey, TrialSpec, _hash

# Networks per pack when the grid and the command line say nothing. On the CPU a pack
# much larger than this just makes one Tune trial slow without raising throughput; on a
# GPU, packs are sized from its memory (pack_size) up to DEFAULT_GPU_PACK, past which
# a pack gains little speed and a lost pack costs more.
DEFAULT_CPU_PACK = 32
DEFAULT_GPU_PACK = 256
MEMORY_FRACTION = 0.7  # of the GPU's memory (per pack): the rest for the dataset and the allocator
DEFAULT_GPU_MEMORY_BYTES = 16 * 2**30  # when neither the driver nor the user knows the GPU
FLOAT_BYTES = 4
# Per parameter: the weight, its gradient, the momentum buffer, and a best-state copy
# when a selection keeps one.
PARAMETER_COPIES = 4
# Per value saved for the backward pass: the value, its gradient, and the temporaries
# of the step (conservative).
ACTIVATION_COPIES = 3

PackSizer = Callable[[TrialSpec], int]


@dataclass(frozen=True)
class Pack:
    specs: tuple[TrialSpec, ...]  # to train, phase-1 networks before their dependents
    rebuild: frozenset[str] = frozenset()  # network ids trained only as a dependency

    @property
    def pack_id(self) -> str:
        return _hash(sorted(s.network_id for s in self.specs))

    @property
    def stored_specs(self) -> tuple[TrialSpec, ...]:
        return tuple(s for s in self.specs if s.network_id not in self.rebuild)

    @property
    def trial_ids(self) -> tuple[str, ...]:
        return tuple(t for s in self.stored_specs for t in s.trial_ids)

    def to_dict(self) -> dict:
        return {"specs": [s.to_json() for s in self.specs], "rebuild": sorted(self.rebuild)}

    @classmethod
    def from_dict(cls, d: dict) -> "Pack":
        return cls(tuple(TrialSpec.from_json(s) for s in d["specs"]), frozenset(d["rebuild"]))


def pack_size(spec: TrialSpec, device: str, memory_bytes: int | None = None) -> int:
    """Networks per pack for ``spec``'s dataset, model and batch on ``device``.

    CPU: DEFAULT_CPU_PACK. GPU: as many members as fit in MEMORY_FRACTION of
    ``memory_bytes`` (the memory a pack may use: the GPU's times its share of it) by
    :func:`member_training_bytes`, at most DEFAULT_GPU_PACK.
    """
    if not device.startswith("cuda"):
        return DEFAULT_CPU_PACK
    per_member = member_training_bytes(spec.model, spec.dataset, spec.recipe.batch_size)
    budget = MEMORY_FRACTION * (memory_bytes or DEFAULT_GPU_MEMORY_BYTES)
    return max(1, min(DEFAULT_GPU_PACK, int(budget // per_member)))


def member_training_bytes(model: str, dataset: str, batch_size: int) -> int:
    """Bytes of device memory one network needs to train on ``batch_size`` images
    (``sweep.core.catalog.FOOTPRINTS``: its parameters and saved values per image)."""
    params, values_per_image = FOOTPRINTS[(model, dataset)]
    image_values = math.prod(DATASETS[dataset].image_shape)  # the uint8 batch as float, transformed
    return FLOAT_BYTES * (PARAMETER_COPIES * params + ACTIVATION_COPIES * (values_per_image + 2 * image_values)
                          * batch_size)


def pack_sizer(max_networks: int, device: str, memory_bytes: int | None = None) -> PackSizer:
    """A fixed size when one is asked for (command line, grid), else :func:`pack_size`."""
    if max_networks < 0:
        raise ValueError(f"max_networks must be >= 0 (0: sized for the device), got {max_networks}")
    if max_networks:
        return lambda spec: max_networks
    return lambda spec: pack_size(spec, device, memory_bytes)


def plan_packs(
    specs: Sequence[TrialSpec],
    max_networks: int | PackSizer,
    done_network_ids: Iterable[str] = (),
) -> list[Pack]:
    """Group the specs not yet done into packs of at most ``max_networks`` trainings.

    ``max_networks`` is a number or a function of a spec (its :class:`PackKey` decides:
    dataset, model, batch size, iterations, ...). Networks of one training set stay together so that
    dependents find their phase-1 network in the same pack. The result is deterministic
    for the same inputs.
    """
    size_of = max_networks if callable(max_networks) else (lambda spec: max_networks)
    for s in specs:
        # The workers run each method's current procedure only: training an older revision's
        # spec would store new weights under the old procedure's id.
        if s.method_revision != s.method.revision:
            raise ValueError(f"network {s.network_id}: {s.method} revision {s.method_revision} is no longer "
                             f"run (the workers run revision {s.method.revision}); expand the grid again")
    done = set(done_network_ids)
    by_id = {s.network_id: s for s in specs}
    groups: dict[PackKey, dict[str, list[TrialSpec]]] = defaultdict(lambda: defaultdict(list))
    rebuild: set[str] = set()
    for s in specs:
        if s.network_id in done:
            continue
        units = groups[s.pack_key][s.training_set_key]
        parent = s.parent
        if parent is not None and parent.network_id in done:
            # The phase-1 network is stored but this dependent is not: retrain it here.
            if parent.network_id not in rebuild:
                units.append(by_id.get(parent.network_id, parent))
                rebuild.add(parent.network_id)
        units.append(s)

    packs: list[Pack] = []
    for key in sorted(groups, key=lambda k: k.sort_key):
        limit = size_of(next(iter(groups[key].values()))[0])
        if limit < 1:
            raise ValueError(f"max_networks must be >= 1, got {limit}")
        current: list[TrialSpec] = []
        # Repeat-major order: a sweep stopped early leaves whole repeats, not a ragged subset.
        for ts_key in sorted(groups[key], key=lambda k: (groups[key][k][0].repeat, k)):
            families = _families(groups[key][ts_key])
            for family in (_searches(families) if limit > 1 else families):
                if current and len(current) + len(family) > limit:
                    packs.append(_make(current, rebuild))
                    current = []
                current.extend(family)
        if current:
            packs.append(_make(current, rebuild))
    return packs


def network_iterations(specs: Iterable[TrialSpec]) -> tuple[int, int]:
    """(network-iterations the grid trains with its lr searches halved in packs, as many with
    every candidate trained to the end). Equal for a grid without ``lr_search``; the first is
    what the schedule spends when no candidate diverges (a diverged one stops sooner)."""
    groups: dict[str, list[TrialSpec]] = defaultdict(list)
    halved = full = 0
    for s in specs:
        full += s.recipe.iters
        if s.lr_search is None:
            halved += s.recipe.iters
        else:
            groups[s.search_group].append(s)
    for group in groups.values():
        halved += halving_iterations(len(group), group[0].recipe.iters, group[0].lr_search)
    return halved, full


def _families(unit: list[TrialSpec]) -> list[list[TrialSpec]]:
    """Split one training set's specs into a phase-1 network plus its dependents each.

    A family is never split across packs; it is at most a few networks, so a pack may
    exceed ``max_networks`` by less than one family only when a family alone is larger.
    """
    ordered = sorted(unit, key=lambda s: (s.parent is not None, METHOD_ORDER[s.method], s.network_id))
    families: dict[str, list[TrialSpec]] = {}
    for s in ordered:
        pid = s.parent_id
        if pid is not None and pid in families:
            families[pid].append(s)
        else:
            families[s.network_id] = [s]
    return list(families.values())


def _searches(families: list[list[TrialSpec]]) -> list[list[TrialSpec]]:
    """Join the families whose networks are candidates of one halving search (equal
    ``search_group``), so that every candidate of a group trains, and is ranked, in one pack.
    Families of the full search stay as they are; the order is the families' order."""
    owner: dict[str, int] = {}  # search group -> index of the joined unit that holds it
    units: list[list[TrialSpec] | None] = []
    for family in families:
        hits = sorted({owner[s.search_group] for s in family if s.lr_search is not None and s.search_group in owner})
        if not hits:
            units.append(list(family))
            target = len(units) - 1
        else:
            target = hits[0]
            for other in hits[1:]:  # a family that joins two units joins them all
                units[target].extend(units[other])
                units[other] = None
                for g, i in owner.items():
                    if i == other:
                        owner[g] = target
            units[target].extend(family)
        for s in units[target]:
            if s.lr_search is not None:
                owner[s.search_group] = target
    return [u for u in units if u is not None]


def _make(specs: list[TrialSpec], rebuild: set[str]) -> Pack:
    ids = {s.network_id for s in specs}
    return Pack(tuple(specs), frozenset(rebuild & ids))

"""The monitor of a pack run: one stream of events, fanned out to listeners.

Floor: workers (no Ray; imports workers.pack_work and workers.stages).

``run_pack`` tells one :class:`PackMonitor` what the pack does, and the monitor calls
each :class:`PackListener` in turn, in the style of Ray Tune's ``Callback``: a listener
overrides the hooks it needs and inherits the others, which do nothing. Events, in order:

* ``on_phase`` when a phase begins (:class:`workers.pack_work.Phase`): loading data; per
  stage, training (stage 1) or training from the phase-1 networks (stage 2), evaluating,
  latent statistics (only when a member of the stage asks for them); writing;
* ``on_stage_start`` / ``on_stage_end`` with the stage's plan and model, when its weights
  are set (initialised or copied from the parents) and when its training ends, before
  evaluation (what ``run_pack(observer=)`` sees, through :class:`StageObserverListener`);
* ``on_iteration`` as training goes on (every few iterations: the engine's chunks);
* ``on_rung`` at each rung of a learning-rate search with early stopping, with every
  member's metric there and which go on (:class:`RungEvent`; the driver reports it to Ray
  Tune, whose ASHA stops trials of one network each);
* ``on_pack_end`` once the rows are written (fraction 1; not for a skipped pack).

Every event but the stage hooks carries a :class:`PackEvent`: its ``fraction`` is of the
pack's expected work, all phases counted (:mod:`workers.pack_work`), monotone, and 1 only
in ``on_pack_end``; ``iters_fraction`` is of its training iterations alone.

A listener that raises stops the pack: the exception propagates out of ``run_pack`` at
once (later listeners do not see that event). Everything before ``on_pack_end`` happens
before the rows are written, and the write is one atomic commit, so the store then holds
nothing of the pack; the lease is released and a checkpoint, if one was saved, is kept for
the next try. Tests and the driver's kill hook stop packs this way on purpose.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from workers.pack_work import PackWork, Phase
from workers.stages import StagePlan

if TYPE_CHECKING:  # the model's type only: a monitor never touches a network itself
    from workers.models import PackedNet

StageWhen = Literal["start", "end"]
# Called with each stage's plan and model when the stage starts (weights initialised or
# copied from the parents) and when its training ends (before evaluation): lets tests and
# tools look at the networks without reaching into run_pack.
StageObserver = Callable[[StagePlan, "PackedNet", StageWhen], None]


@dataclass(frozen=True)
class PackEvent:
    """Where a pack stands."""

    pack_id: str
    phase: Phase
    fraction: float  # of the pack's expected work, all phases (an estimate: workers.pack_work)
    stage: int = 0  # 1 or 2 inside a stage; 0 while loading and writing
    iteration: int = 0  # iterations of this stage done
    iters_done: int = 0  # training iterations of the whole pack done, all stages
    iters_total: int = 0

    @property
    def iters_fraction(self) -> float:
        """The fraction of the pack's training iterations done (what the kill hook counts)."""
        return self.iters_done / self.iters_total if self.iters_total else 0.0


@dataclass(frozen=True)
class RungEvent:
    """A rung of a stage's learning-rate search: every member ranked there, in member order."""

    pack_id: str
    stage: int
    rung: int  # 0-based
    iteration: int
    metric: str  # sweep.core.options.RungMetric
    network_ids: tuple[str, ...]
    scores: tuple[float, ...]
    kept: tuple[str, ...]  # the network ids that go on
    # Each member's test metrics at the rung (roc_auc, accuracy, balanced_accuracy), raw evaluation.
    test: tuple[dict[str, float], ...] = ()


class PackListener:
    """Hooks of a pack run (module doc); override the ones you need."""

    def on_rung(self, event: RungEvent) -> None:
        pass

    def on_phase(self, event: PackEvent) -> None:
        pass

    def on_iteration(self, event: PackEvent) -> None:
        pass

    def on_stage_start(self, plan: StagePlan, model: "PackedNet") -> None:
        pass

    def on_stage_end(self, plan: StagePlan, model: "PackedNet") -> None:
        pass

    def on_pack_end(self, event: PackEvent) -> None:
        pass


class StageObserverListener(PackListener):
    """A :data:`StageObserver` function as a listener (``run_pack(observer=)``)."""

    def __init__(self, observer: StageObserver) -> None:
        self.observer = observer

    def on_stage_start(self, plan: StagePlan, model: "PackedNet") -> None:
        self.observer(plan, model, "start")

    def on_stage_end(self, plan: StagePlan, model: "PackedNet") -> None:
        self.observer(plan, model, "end")


class PackMonitor:
    """Tells every listener what one pack does (module doc). ``work`` is set once the
    data is loaded (:meth:`plan`): until then only the loading phase can be reported."""

    def __init__(self, pack_id: str, listeners: Sequence[PackListener] = ()) -> None:
        bad = [type(x).__name__ for x in listeners if not isinstance(x, PackListener)]
        if bad:
            raise TypeError(f"pack listeners must derive from workers.monitor.PackListener; got {', '.join(bad)}")
        self.pack_id = pack_id
        self.listeners = tuple(listeners)
        self.work: PackWork | None = None
        self.last: PackEvent | None = None

    def plan(self, work: PackWork) -> None:
        self.work = work

    def phase(self, phase: Phase, stage: int = 0) -> None:
        """``phase`` of ``stage`` (0: loading, writing) begins."""
        self.last = self._event(phase, stage, 0)
        for x in self.listeners:
            x.on_phase(self.last)

    def iteration(self, stage: int, it: int) -> None:
        """Stage ``stage`` has trained ``it`` of its iterations (a resumed stage starts late)."""
        self.last = self._event(Phase.training(stage), stage, it)
        for x in self.listeners:
            x.on_iteration(self.last)

    def rung(self, event: RungEvent) -> None:
        for x in self.listeners:
            x.on_rung(event)

    def stage_start(self, plan: StagePlan, model: "PackedNet") -> None:
        for x in self.listeners:
            x.on_stage_start(plan, model)

    def stage_end(self, plan: StagePlan, model: "PackedNet") -> None:
        for x in self.listeners:
            x.on_stage_end(plan, model)

    def pack_end(self) -> None:
        """The rows are written: fraction 1."""
        work = self._work()
        self.last = PackEvent(self.pack_id, Phase.WRITING, 1.0, 0, 0, work.iters_total, work.iters_total)
        for x in self.listeners:
            x.on_pack_end(self.last)

    def _work(self) -> PackWork:
        if self.work is None:
            raise RuntimeError(f"pack {self.pack_id}: the monitor has no work plan yet (call plan() after loading)")
        return self.work

    def _event(self, phase: Phase, stage: int, it: int) -> PackEvent:
        if phase == Phase.LOADING:
            return PackEvent(self.pack_id, phase, 0.0)
        work = self._work()
        total = work.iters_total
        if phase == Phase.WRITING:
            return PackEvent(self.pack_id, phase, work.fraction(phase), 0, 0, total, total)
        iters = next((s.iters for s in work.segments if s.stage == stage and s.iters), 0)
        if phase not in (Phase.TRAINING, Phase.TRAINING_FROM_PHASE1):
            it = iters  # evaluation and latent statistics come after the stage's training
        # work.fraction raises ValueError on a phase the plan does not have (a bug of the caller)
        within = it / iters if iters else 1.0
        return PackEvent(self.pack_id, phase, work.fraction(phase, stage, within), stage, it,
                         work.iters_before(stage) + it, total)

"""The device-resident training step (issue 13): batch tables, device counters, CUDA graphs,
the fused LeNet-5 in ``run_pack``, and the kernel choice.

On the CPU the step runs eagerly (the reason is logged), and the fused kernels run in
Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` without a GPU). The
CUDA-graph tests at the end run where there is a GPU.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sweep.core.errors import UserError
from sweep.core.grid import expand
from sweep.core.plan import Pack
from sweep.prepare import RunOptions, SweepError, check_kernels, check_options
from workers import engine, fused_kernels as fk
from workers.augment import CropFlipDraws, crop_flip, take_stacked_draws
from workers.batch_feed import BatchFeed
from workers.compute import resolve_numerics
from workers.datasets import ArrayDataset
from workers.devices import DeviceUnavailable
from workers.engine import StageConfig, train_stage
from workers.losses import PackedLoss
from workers.models import LeNet5
from workers.optim import PackedSGD
from workers.run_pack import run_pack
from workers.samplers import EpochSampler, take_stacked
from workers.transforms import InputTransform, stack_transforms

P, B, K = 3, 16, 10


def _data(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8), torch.randint(0, K, (n,), generator=g)


def _samplers(n: int, seed: int = 5) -> list[EpochSampler]:
    # Different index sets per member: a 300-image subset, a 451-image one (epochs end
    # inside chunks), and all images.
    sets = [np.arange(300), np.arange(149, 600), np.arange(n)]
    return [EpochSampler(s, B, seed + p) for p, s in enumerate(sets)]


def test_feed_tables_hold_each_members_own_stream_across_chunks() -> None:
    feed_samplers, ref_samplers = _samplers(600), _samplers(600)
    aug = [CropFlipDraws(1), None, CropFlipDraws(3)]
    ref_aug = [CropFlipDraws(1), None, CropFlipDraws(3)]
    feed = BatchFeed(feed_samplers, aug, B, torch.device("cpu"), rows=7)
    for n in (7, 3, 7, 1):  # chunks of several lengths, as checkpoints cut them
        feed.load(n)
        want_idx, want_draws = take_stacked(ref_samplers, n), take_stacked_draws(ref_aug, n, B)
        for j in range(n):
            idx, draws = feed.batch()
            assert np.array_equal(idx.numpy(), want_idx[j])
            assert np.array_equal(draws.numpy(), want_draws[j])
            feed.advance()
    with pytest.raises(ValueError, match="does not fit 7 table rows"):
        feed.load(8)


def _cfg(iters: int, lr: torch.Tensor, **over) -> StageConfig:
    base = dict(iters=iters, batch_size=B, lr=lr, momentum=torch.tensor([0.9, 0.8, 0.9]),
                weight_decay=torch.tensor([5e-4, 1e-3, 0.0]), bias_lr_factor=torch.tensor([2.0, 1.0, 2.0]))
    base.update(over)
    return StageConfig(**base)


def _lr(iters: int) -> torch.Tensor:
    t = torch.arange(iters, dtype=torch.float32)[:, None]
    return torch.cat([0.01 * (1 + 1e-4 * t) ** -0.75, torch.full_like(t, 0.002), 0.01 * (t < 70) + 0.001], 1)


def _loss() -> PackedLoss:
    counts = torch.tensor([[100.0] * 5 + [10.0] * 5] * P)
    # LDAM at s = 1: a linear head (the cosine head is what s = 30 is for).
    return PackedLoss(["ce", "ldam", "focal"], counts, ldam_scale=1.0, drw_start_iter=[None, 60, 90])


def _model() -> LeNet5:
    m = LeNet5(P, K, (1, 28, 28))
    m.reset_parameters("xavier", [11, 12, 13])
    return m


def _reference_loop(model, samplers, x, y, transform, loss_fn, cfg, augment) -> None:
    """The stage loop as it was before the batch tables and device counters: host chunks,
    the Python iteration number as data. The engine must give the same numbers."""
    opt = PackedSGD(list(model.parameters()), P, cfg.momentum, cfg.weight_decay, cfg.bias_lr_factor,
                    model.bias_parameters())
    alive = torch.ones(P)
    it = 0
    while it < cfg.iters:
        n = min(50, cfg.iters - it)
        idx = torch.from_numpy(take_stacked(samplers, n))
        draws = torch.from_numpy(take_stacked_draws(augment, n, B))
        for j in range(n):
            model.train()
            _, logits = model(transform.apply(crop_flip(x[idx[j]], draws[j])))
            losses = loss_fn(logits.float(), y[idx[j]], it)
            opt.zero_grad()
            losses.sum().backward()
            alive = alive * torch.isfinite(losses.detach()).float()
            opt.step(cfg.lr[it] * alive)
            it += 1


def test_engine_step_gives_the_numbers_of_the_host_driven_loop(caplog) -> None:
    """Batches from the tables, lr at the device counter, DRW switched on the device (two
    members start DRW at different iterations), augmentation, chunk ends inside epochs:
    bit for bit the numbers of the host-driven loop."""
    x, y = _data()
    transform = stack_transforms([InputTransform("scale", None)] * P)
    iters = 120
    ref, fast = _model(), _model()
    aug = lambda: [CropFlipDraws(7), None, CropFlipDraws(9)]  # noqa: E731
    _reference_loop(ref, _samplers(600), x, y, transform, _loss(), _cfg(iters, _lr(iters)), aug())
    with caplog.at_level(logging.INFO, logger="workers.step_graph"):
        state = train_stage(fast, _samplers(600), x, y, transform, _loss(), _cfg(iters, _lr(iters)), augment=aug())
    assert state.step_mode == "eager" and (state.diverged_at == -1).all()
    assert "training steps run eagerly (CUDA graphs need a CUDA device)" in caplog.text
    for (name, a), b in zip(ref.state_dict().items(), fast.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_member_that_diverges_is_found_without_a_sync_per_step() -> None:
    """A huge learning rate from iteration 37 on makes member 1's loss non-finite soon after;
    the host learns the iteration from the device counter (asynchronous reads, then the
    final one), and the other members train on."""
    x, y = _data()
    transform = stack_transforms([InputTransform("scale", None)] * P)
    model = _model()
    lr = _lr(60)
    lr[37:, 1] = 1e30
    state = train_stage(model, _samplers(600), x, y, transform, _loss(), _cfg(60, lr))
    assert state.diverged_at[0] == -1 and state.diverged_at[2] == -1
    assert 37 < state.diverged_at[1] <= 40
    assert all(torch.isfinite(v).all() for v in model.member_state(0).values())


def test_drw_member_loss_is_the_same_alone_or_with_an_active_packmate() -> None:
    """Before its DRW starts, a member's loss is the plain mean, whether or not a packmate's
    DRW has started (the reduction used to change with the pack), for int and device steps."""
    counts = torch.tensor([[100.0] * 5 + [10.0] * 5] * 2)
    pair = PackedLoss(["ce", "ce"], counts, drw_start_iter=[10, 100])
    alone = PackedLoss(["ce"], counts[:1], drw_start_iter=[100])
    logits = torch.randn(2, 8, K, dtype=torch.float64)
    y = torch.randint(0, K, (2, 8))
    for it in (50, torch.tensor(50)):
        assert torch.equal(pair(logits, y, it)[1:], alone(logits[1:], y[1:], it))
    assert torch.equal(pair(logits, y, torch.tensor(50)), pair(logits, y, 50))
    assert not torch.equal(pair(logits, y, 50)[0], logits.log_softmax(-1).gather(2, y[..., None]).mean(1)[0].neg())


def test_kernel_choice_is_applied_or_rejected(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def kernels(kind: str, model: str, dev: torch.device, head: str = "linear", precision: str = "fp32") -> str:
        return resolve_numerics(precision, kind, model, head, dev).kernels

    assert kernels("auto", "lenet5", cpu) == "grouped"  # the interpreter is for tests only
    assert kernels("auto", "lenet5", cuda, precision="bf16") == "fused"
    assert kernels("auto", "lenet5", cuda) == "grouped"  # fp32: IEEE fused is no faster than cuDNN
    assert kernels("auto", "lenet5", cuda, precision="tf32") == "grouped"
    assert kernels("auto", "lenet5", cuda, head="cosine") == "grouped"
    assert kernels("auto", "allcnn", cuda) == "grouped"
    assert kernels("grouped", "lenet5", cuda) == "grouped"
    if fk.INTERPRETED:  # tests/conftest.py without a GPU
        assert kernels("fused", "lenet5", cpu) == "fused"
    with pytest.raises(ValueError, match="unknown kernels 'triton'.*auto, fused, grouped"):
        kernels("triton", "lenet5", cpu)
    with pytest.raises(UserError, match="lenet5 with a linear head only, not 'resnet32'"):
        kernels("fused", "resnet32", cuda)
    monkeypatch.setattr(fk, "INTERPRETED", False)
    with pytest.raises(DeviceUnavailable, match="need a CUDA device"):
        kernels("fused", "lenet5", cpu)


def test_sweep_options_check_the_kernels_before_anything_starts() -> None:
    lenet = expand({"dataset": "mnist", "model": "lenet5", "recipe": "buda_mnist"})
    mixed = expand({"dataset": "cifar10", "model": "resnet32", "recipe": "ldam_drw"})
    check_kernels(lenet, "fused", "cuda")
    check_kernels(mixed, "auto", "cpu")
    with pytest.raises(SweepError, match="--kernels 'fast': allowed: auto, fused, grouped"):
        check_options(lenet, RunOptions(kernels="fast"))
    with pytest.raises(SweepError, match="fused needs a CUDA device, not 'cpu'"):
        check_options(lenet, RunOptions(kernels="fused"))
    with pytest.raises(SweepError, match="also trains resnet32"):
        check_kernels(mixed, "fused", "cuda")


class _Ops(TorchDispatchMode):
    """Records every aten op run under it. ``host_reads``: those that hand a tensor's value to
    the host (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()`` all end in
    ``_local_scalar_dense``), which a CUDA graph cannot hold."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[object] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops.append(func)
        return func(*args, **(kwargs or {}))

    @property
    def host_reads(self) -> list[str]:
        return [str(f) for f in self.ops if f is torch.ops.aten._local_scalar_dense.default]


@pytest.mark.parametrize("name", ["lenet5", "allcnn", "resnet32"])
def test_the_step_reads_nothing_back_to_the_host(name: str) -> None:
    """One step (gather, crop/flip, transform, forward with dropout, DRW loss, backward, SGD,
    divergence and counters) passes no tensor value to the host: what capture needs."""
    from workers.models import build_model

    shape = (1, 28, 28) if name == "lenet5" else (3, 16, 16)
    x = torch.randint(0, 256, (600, *shape), dtype=torch.uint8)
    y = torch.randint(0, K, (600,))
    model = build_model(name, P, K, shape)
    model.reset_parameters("xavier", [1, 2, 3])
    model.seed_noise([4, 5, 6])
    cfg = _cfg(10, _lr(10))
    loss = _loss()
    opt = engine._optimizer(model, list(model.parameters()), cfg)
    feed = BatchFeed(_samplers(600), [CropFlipDraws(1), None, CropFlipDraws(2)], B, torch.device("cpu"), rows=4)
    counters = engine._Counters(torch.zeros((), dtype=torch.int64), torch.ones(P), torch.full((P,), -1))
    transform = stack_transforms([InputTransform("scale", None)] * P)
    step = engine._device_step(model, feed, x, y, transform, loss, cfg, opt, counters)
    feed.load(4)
    step()  # the first step makes the optimizer's buffers; the captured ones follow it
    with _Ops() as mode:
        step()
        step()
    assert mode.host_reads == []
    assert int(counters.it) == 3 and int(feed.pos) == 3


def test_dropout_for_all_members_costs_the_same_kernels_at_any_pack_size() -> None:
    """Per-member masks without a launch per member: the op count does not grow with P."""
    from workers.models import AllCNN

    def ops(members: int) -> int:
        m = AllCNN(members, K, (3, 16, 16)).train()
        m.seed_noise(list(range(members)))
        z = torch.ones(4, members * 96, 8, 8)
        m.member_dropout(z, 0.5)  # the element hashes of this shape are made once, here
        with _Ops() as count:
            m.member_dropout(z, 0.5)
        return len(count.ops)

    assert ops(2) == ops(16)


def test_a_checkpoint_with_old_dropout_streams_resumes_with_a_warning(caplog) -> None:
    from workers.models import AllCNN

    m = AllCNN(2, K, (3, 16, 16))
    m.seed_noise([1, 2])
    m.load_noise_state({"dropout_draws": 7}, torch.device("cpu"))
    assert m.noise_state() == {"dropout_draws": 7}
    with caplog.at_level(logging.WARNING):
        m.load_noise_state([torch.zeros(16, dtype=torch.uint8)] * 2, torch.device("cpu"))
    assert "older format: masks restart" in caplog.text
    assert m.noise_state() == {"dropout_draws": 0}


# -- the fused LeNet-5 in run_pack (Triton's interpreter on the CPU: small and short) -------

def _tiny_mnist(mnist) -> ArrayDataset:
    return ArrayDataset(name="mnist", train_x=mnist.train_x[:400], train_y=mnist.train_y[:400],
                        test_x=mnist.test_x[:24], test_y=mnist.test_y[:24], num_classes=10, source="mnist[:400]")


def _float64_models(monkeypatch) -> None:
    """run_pack's grouped models in float64 (inputs cast on the way in; the loss still sees
    fp32 logits, whose rounding, 6e-8 relative, is far below the tolerances below)."""
    from workers import pack_stage as rp  # where run_pack's stages build their models

    original = rp.new_pack_model

    def new_model(*args, **kwargs):  # noqa: ANN002, ANN003
        model = original(*args, **kwargs).double()
        forward = model.forward
        model.forward = lambda x, *a, **k: forward(x.double(), *a, **k)
        return model

    monkeypatch.setattr(rp, "new_pack_model", new_model)


def _trained_from(pack: Pack, ds: ArrayDataset, kernels: str, **kw):
    """Like ``_trained``, with each member's weights at the start of training too."""
    start: dict[str, dict[str, torch.Tensor]] = {}
    end: dict[str, dict[str, torch.Tensor]] = {}

    def observe(plan, model, when):  # noqa: ANN001
        into = start if when == "start" else end
        into.update({s.network_id: model.member_state(i) for i, s in enumerate(plan.specs)
                     if when == "end" or s.network_id not in start})

    result = run_pack(pack, None, dataset=ds, kernels=kernels, observer=observe, **kw)
    return result, start, end


# Against the float64 reference, each tensor's error after the test's 4 SGD steps is measured
# relative to how far those steps moved it (Frobenius norms): ||got - ref|| <= 2e-2 ||ref - init||.
# Rounding alone gives at most 1e-5 of that (measured on the CPU, 1 or 2 threads). Another
# summation order (2 CPU threads for the grouped path, or cuBLAS / cuDNN picking another
# algorithm for another batch count) can move a pooling argmax between two near-equal cells:
# measured once at 2e-3 for conv1.weight and conv2.weight (7e-4 of conv2.weight's largest
# value, element-wise: why the bound is not element-wise).
# A wrong gradient moves a tensor's update by its own order of magnitude.
UPDATE_RTOL = 2e-2


def _close_to(got: torch.Tensor, want: torch.Tensor, init: torch.Tensor, msg: str) -> None:
    got, want, init = (t.double().cpu() for t in (got, want, init))
    moved = (want - init).norm().item()
    err = (got - want).norm().item()
    assert moved > 0, f"{msg}: the steps did not move it"
    assert err <= UPDATE_RTOL * moved, f"{msg}: error {err:.3g} = {err / moved:.2e} of the update {moved:.3g}"


@pytest.mark.interpreter
def test_fused_pack_equals_the_grouped_path_and_a_member_alone(mnist, monkeypatch) -> None:
    """run_pack on the fused LeNet-5 (batch tables, device counters, fused SGD): a member's
    weights after four steps, trained in a pack and trained alone, and the grouped fp32 path's,
    all equal a float64 reference run of the grouped path within ``UPDATE_RTOL``. Under Triton's
    interpreter a member in a pack also equals it alone bit for bit (the kernels do the same
    work per member whatever P is); on a GPU cuBLAS may pick another batched-GEMM algorithm
    for another batch count, so only the float64 comparison is asked there."""
    g = expand({"name": "fast", "dataset": "mnist", "model": "lenet5",
                "recipe": {"preset": "buda_mnist", "iters": 4, "batch_size": 8}, "max_per_class": 40,
                "imbalance": {"step": {"rho": [4], "mu": [0.5]}}, "methods": ["baseline", "oversampling"],
                "repeats": 1, "seed": 3})
    ds = _tiny_mnist(mnist)
    pack, one = Pack(g.specs), Pack(g.specs[1:])
    fused_result, init, fused = _trained_from(pack, ds, "fused")
    _, _, alone = _trained_from(one, ds, "fused")
    _, _, grouped = _trained_from(pack, ds, "grouped")
    with monkeypatch.context() as m:
        _float64_models(m)
        _, init64, ref = _trained_from(pack, ds, "grouped", device="cpu")
    member = g.specs[1].network_id
    for nid in fused:
        for name, v in fused[nid].items():
            assert ref[nid][name].dtype == torch.float64, name
            assert torch.equal(init64[nid][name], init[nid][name].double()), name  # the same start
            _close_to(v, ref[nid][name], init[nid][name], f"fused {nid} {name}")
            _close_to(grouped[nid][name], ref[nid][name], init[nid][name], f"grouped {nid} {name}")
    for name, v in alone[member].items():
        _close_to(v, ref[member][name], init[member][name], f"alone {name}")
        if fk.INTERPRETED:
            assert torch.equal(v, fused[member][name]), name
    assert all((r["kernels"], r["compute_dtype"]) == ("fused", "float32") for r in fused_result.tables["trials"])
    assert all(r["status"] == "ok" for r in fused_result.tables["trials"])


# -- CUDA graphs (need a GPU) ----------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.fixture
def cudnn_deterministic():
    """Bit for bit needs deterministic cuDNN weight-gradient algorithms; restored after."""
    saved = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.deterministic = saved


def _assert_captured(state, caplog, what: str) -> None:
    """A failed capture steps eagerly and only logs a warning: here it fails, with the reason."""
    reasons = [r.getMessage() for r in caplog.records if "capture failed" in r.getMessage()]
    assert state.step_mode == "graph", f"{what}: the step was not captured as a CUDA graph: {reasons or 'no reason logged'}"


@cuda
def test_an_lr_search_captures_the_step_again_for_the_survivors(mnist, caplog) -> None:
    """A halving pack on the fused kernels on CUDA (issue 25): the step is captured as a CUDA
    graph for the pack of 4, and again for the 2 survivors after the rung (a graph replays fixed
    buffers: the compacted pack's are new), and no capture fails."""
    caplog.set_level(logging.INFO, logger="workers.step_graph")
    doc = {"name": "rungs", "dataset": "mnist", "model": "lenet5",
           "recipe": {"preset": "buda_mnist", "iters": 16, "batch_size": 8}, "max_per_class": 20,
           "imbalance": {"step": {"rho": [10], "mu": [0.5]}}, "methods": ["baseline"], "thresholding": [],
           "lr": [0.05, 0.01], "lr_runs": 2, "selection": "validation", "seed": 5,
           "lr_search": {"scheduler": "halving", "rungs": [8], "reduction": 2}}
    specs = expand(doc).specs
    assert len(specs) == 4
    result = run_pack(Pack(specs), None, dataset=_tiny_mnist(mnist), device="cuda", kernels="fused")
    raw = [r for r in result.tables["trials"] if r["evaluation"] == "raw"]
    assert sorted(r["status"] for r in raw) == ["ok", "ok", "stopped", "stopped"]
    failed = [r.getMessage() for r in caplog.records if "capture failed" in r.getMessage()]
    captured = [r.getMessage() for r in caplog.records if "captured as one CUDA graph" in r.getMessage()]
    assert not failed and len(captured) == 2, (captured, failed)
    assert "of 4 members" in captured[0] and "of 2 members" in captured[1], captured


@cuda
@pytest.mark.parametrize("fused", [False, True])
def test_graph_replay_equals_eager_steps(fused: bool, cudnn_deterministic, caplog) -> None:
    """The captured step, replayed, gives the eager step's numbers bit for bit (grouped and
    fused LeNet-5, DRW switching at a device counter, augmentation)."""
    caplog.set_level(logging.INFO, logger="workers.step_graph")
    dev = torch.device("cuda")
    x, y = (t.to(dev) for t in _data())
    transform = stack_transforms([InputTransform("scale", None)] * P).to(dev)
    iters = 120

    def run(graph: bool):
        model = _model()
        if fused:
            from workers.fused_lenet import FusedLeNet5

            model = FusedLeNet5.from_lenet(model)
        model.to(dev)
        cfg = _cfg(iters, _lr(iters).to(dev), cuda_graph=graph)
        cfg = dataclasses.replace(cfg, momentum=cfg.momentum.to(dev), weight_decay=cfg.weight_decay.to(dev),
                                  bias_lr_factor=cfg.bias_lr_factor.to(dev))
        state = train_stage(model, _samplers(600), x, y, transform, _loss().to(dev), cfg,
                            augment=[CropFlipDraws(7), None, CropFlipDraws(9)])
        return state, model

    eager_state, eager = run(False)
    graph_state, graphed = run(True)
    assert eager_state.step_mode == "eager"
    _assert_captured(graph_state, caplog, "fused" if fused else "grouped")
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        assert torch.equal(a, b), name


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_benchmarked_fused_step_is_captured(precision: str, caplog) -> None:
    """The fast path as bench_packed's (e) runs it (batch 64, the buda_mnist recipe, a pack of
    256) is captured as one CUDA graph; a capture that fails fails here, with its reason."""
    from bench.bench_packed import Bench

    caplog.set_level(logging.INFO, logger="workers.step_graph")
    b = Bench("lenet5", 256, torch.device("cuda"), precision, kernels="fused", graph=True)
    state = train_stage(b.model, b.samplers, b.x, b.y, b.transform, b.loss, b.cfg(8))
    _assert_captured(state, caplog, f"fused {precision}, P=256")
    assert all(torch.isfinite(p).all() for p in b.model.parameters())


@cuda
def test_head_only_fused_bf16_graph_evaluates_the_weights_it_trained(caplog) -> None:
    """A head-only stage on the fused model in bf16 steps the head with PackedSGD, whose
    writes no replay's version counter follows: the curves measured between replays and the
    weights after the stage equal the eager run's."""
    from workers.engine import EvalSet
    from workers.fused_lenet import FusedLeNet5

    dev = torch.device("cuda")
    x, y = (t.to(dev) for t in _data())
    transform = stack_transforms([InputTransform("scale", None)] * P).to(dev)

    def run(graph: bool):
        model = FusedLeNet5.from_lenet(_model(), compute_dtype=torch.bfloat16).to(dev)
        cfg = _cfg(60, _lr(60).to(dev), cuda_graph=graph, head_only=True, eval_every=20,
                   curve_sets=(EvalSet(x[:256], y[:256], "test"),))
        cfg = dataclasses.replace(cfg, momentum=cfg.momentum.to(dev), weight_decay=cfg.weight_decay.to(dev),
                                  bias_lr_factor=cfg.bias_lr_factor.to(dev))
        state = train_stage(model, _samplers(600), x, y, transform, _loss().to(dev), cfg)
        return state, model

    caplog.set_level(logging.INFO, logger="workers.step_graph")
    (eager_state, eager), (graph_state, graphed) = run(False), run(True)
    _assert_captured(graph_state, caplog, "head-only fused bf16")
    assert [c["loss"] for c in graph_state.curves] == [c["loss"] for c in eager_state.curves]
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        assert torch.equal(a, b), name


# -- the fused kernels in bf16 against float64 references (need a GPU) ---------------------
# Triton's interpreter mishandles bf16, so these run only where CUDA is. The references are
# float64 computations on the very bf16 values the kernels read (images, weights rounded to
# bf16 as the kernels round them in registers, upstream gradients), so what is left is the
# kernels' fp32 accumulation (products of two bf16 values are exact in fp32) and the rounding
# of a bf16 output: tolerances below. Where pooling takes a maximum, the reference takes the
# cell the kernel chose (its argmax), after checking that cell is a maximum up to rounding;
# near-equal cells may then differ between fp32 and float64 without any error of the kernel.

gpu_bf16 = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="bf16 kernels are checked on a GPU only (Triton's interpreter mishandles bf16)")
BF16_ULP = 2.0 ** -8  # bf16 keeps 8 significant bits: one rounding is at most half this, relative
ACC = 1e-4  # fp32 accumulation over at most 1,250 products, of the largest value


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16)


def _members_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per member conv2d (float64): x [P, B, C, H, W], w [P, O, C, k, k], b [P, O]."""
    p, n, c, h, wd = x.shape
    z = F.conv2d(x.transpose(0, 1).reshape(n, p * c, h, wd), w.reshape(-1, *w.shape[2:]), b.reshape(-1), groups=p)
    return z.reshape(n, p, -1, *z.shape[-2:]).transpose(0, 1)


def _cells(z: torch.Tensor) -> torch.Tensor:
    """[..., H', W'] -> [..., H'//2, W'//2, 4]: each 2x2 window's cells dy*2 + dx (floor mode)."""
    hp, wp = z.shape[-2] // 2, z.shape[-1] // 2
    z = z[..., :2 * hp, :2 * wp].unflatten(-2, (hp, 2)).unflatten(-1, (wp, 2))  # [..., hp, 2, wp, 2]
    return z.movedim(-3, -2).flatten(-2)


def _assert_within(got: torch.Tensor, want: torch.Tensor, rtol: float, of_max: float, what: str) -> None:
    got, want = got.double().cpu(), want.double().cpu()
    atol = of_max * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@gpu_bf16
@pytest.mark.parametrize("c_in, c_out, side", [(1, 20, 28), (20, 50, 12), (3, 5, 9)])
def test_bf16_conv_pool_kernels_against_float64(c_in: int, c_out: int, side: int) -> None:
    """conv_pool_forward, conv_pool_grad_weight and conv_pool_grad_input in bf16 (LeNet's two
    layers and an odd size) against float64 autograd of the same function.

    Tolerances: pooled values within one bf16 rounding (2^-8 relative) plus ACC of the largest;
    the weight gradient (fp32 out) within ACC of the largest, 1e-3 relative; the input gradient
    (bf16 out) within one bf16 rounding plus ACC of the largest."""
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(21 + c_in)
    p, n = 3, 5
    x = _bf16(torch.randn(p, n, c_in, side, side, generator=g)).to(dev)
    w = (0.2 * torch.randn(p, c_out, c_in, 5, 5, generator=g)).to(dev)
    b = (0.1 * torch.randn(p, c_out, generator=g)).to(dev)
    y, arg = fk.conv_pool_forward(x, w, b)
    assert y.dtype == torch.bfloat16 and arg.dtype == torch.int8
    gy = _bf16(torch.randn(y.shape, generator=g)).to(dev)
    gw = fk.conv_pool_grad_weight(x, gy, arg, w.shape)
    gx = fk.conv_pool_grad_input(w, gy, arg, x.shape, x.dtype)
    assert gw.dtype == torch.float32 and gx.dtype == torch.bfloat16

    x64 = x.double().cpu().requires_grad_()
    w64 = _bf16(w).double().cpu().requires_grad_()  # the kernels read the weights rounded to bf16
    b64 = b.double().cpu().requires_grad_()
    cells = _cells(_members_conv(x64, w64, b64))  # [P, B, O, hp, wp, 4]
    chosen = cells.gather(-1, arg.long().cpu()[..., None]).squeeze(-1)
    best = cells.amax(-1)
    assert (best - chosen).max().item() <= ACC * best.abs().max().item(), "the kernel's argmax is not a maximum"
    _assert_within(y, chosen, BF16_ULP, ACC, "pooled values")
    want_gx, want_gw = torch.autograd.grad(chosen, (x64, w64), gy.double().cpu())
    _assert_within(gw, want_gw, 1e-3, ACC, "weight gradient")
    _assert_within(gx, want_gx, BF16_ULP, ACC, "input gradient")


@gpu_bf16
def test_bf16_fused_model_gradients_against_float64() -> None:
    """Every parameter gradient of the fused LeNet-5 in bf16 (conv kernels, fc layers on the
    16-bit copy, loss) against a float64 LeNet5 on the same weights and images.

    Whole-model bf16 error is not one rounding: 16-bit activations move pooling argmaxes
    between near-equal cells and LeNet's conv gradients are sums with much cancellation. So,
    as the fp16 test of tests/test_fused_lenet.py does, the bound is PyTorch's own bf16 path
    on the same model (autocast(bfloat16), cuDNN and cuBLAS) measured against the same float64
    reference: the fused model's error, of the largest float64 value, at most twice autocast's
    plus 1e-2; logits within 3e-2 of the largest float64 logit."""
    from workers.fused_lenet import FusedLeNet5

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(31)
    members, batch = 4, 16
    ref = LeNet5(members)
    ref.reset_parameters("xavier", [40 + q for q in range(members)])
    with torch.no_grad():
        for m in (ref.conv1, ref.conv2, ref.fc1, ref.fc2):
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    x = torch.randn(members, batch, 1, 28, 28, generator=g)
    y = torch.randint(0, K, (members, batch), generator=g)

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().transpose(1, 2), y.to(logits.device), reduction="none").mean(1).sum()

    def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {name: q.grad.detach().double().cpu() for name, q in model.named_parameters()}

    ref64 = LeNet5(members).double()
    ref64.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
    _, logits64 = ref64(x.double())
    F.cross_entropy(logits64.transpose(1, 2), y, reduction="none").mean(1).sum().backward()
    want = grads(ref64)

    fused = FusedLeNet5.from_lenet(ref.to(dev), compute_dtype=torch.bfloat16)
    _, logits = fused(x.to(dev))
    assert logits.dtype == torch.bfloat16
    loss(logits).backward()
    got = grads(fused)

    stock = LeNet5(members).to(dev)
    stock.load_state_dict(ref.state_dict())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, stock_logits = stock(x.to(dev))
    loss(stock_logits).backward()
    theirs = grads(stock)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double().cpu() - b).abs().max() / b.abs().max()).item()

    assert rel(logits, logits64.detach()) <= 3e-2
    assert list(got) == list(want)
    for name in want:
        err, bound = rel(got[name], want[name]), 2 * rel(theirs[name], want[name]) + 1e-2
        assert err <= bound, f"{name}: {err:.2e} > {bound:.2e} (autocast bf16: {rel(theirs[name], want[name]):.2e})"


def test_cudnn_deterministic_is_left_as_it_was() -> None:
    """Runs last in this module: no test above leaves cuDNN's deterministic flag set for the rest
    of the run (the graph-replay test sets it through a fixture that restores it)."""
    assert torch.backends.cudnn.deterministic is False

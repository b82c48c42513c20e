"""How a pack computes (workers.compute, sweep.core.numerics): the option enums, the frozen
numerics and the columns rows record, and the one choice of model and optimizer.

The kernel choice itself (auto / fused / grouped per model, head, device and precision) is
tested in tests/test_fast_path.py, next to the fused model it chooses.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from click.testing import CliRunner

from sweep.core.grid import expand
from sweep.core.numerics import KERNELS, PRECISIONS, Kernels, Precision, UnknownOption
from sweep.prepare import RunOptions, SweepError, check_options
from workers import fused_kernels as fk
from workers.compute import Numerics, is_fused, new_model, new_optimizer, resolve_numerics
from workers.models import LeNet5, model_for
from workers.optim import PackedSGD

from conftest import tiny_grid

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_the_options_are_closed_enums_that_name_a_bad_value() -> None:
    assert PRECISIONS == ("fp32", "tf32", "bf16") and KERNELS == ("auto", "fused", "grouped")
    assert Precision("bf16") is Precision.BF16 and Kernels("grouped") is Kernels.GROUPED
    with pytest.raises(UnknownOption, match=r"unknown precision 'fp8' \(allowed: fp32, tf32, bf16\)"):
        Precision("fp8")
    with pytest.raises(ValueError, match=r"unknown kernels 'triton' \(allowed: auto, fused, grouped\)"):
        Kernels("triton")
    with pytest.raises(UnknownOption, match="unknown precision 'half'"):
        resolve_numerics("half", "auto", "lenet5", "linear", CPU)


# (precision, kernels, device) -> the rows' (kernels, compute_dtype), as run_pack recorded
# them before Numerics existed (workers.devices.numerics): kept so old and new rows compare.
ROW_COLUMNS = [
    ("fp32", "auto", CPU, ("grouped", "float32")),
    ("tf32", "auto", CPU, ("grouped", "float32")),  # no TF32 on the CPU
    ("bf16", "auto", CPU, ("grouped", "bfloat16")),  # autocast
    ("fp32", "auto", CUDA, ("grouped", "float32")),
    ("tf32", "auto", CUDA, ("grouped", "tf32")),
    ("bf16", "auto", CUDA, ("fused", "bfloat16")),  # 16 bits inside the kernels
    ("bf16", "grouped", CUDA, ("grouped", "bfloat16")),
]


@pytest.mark.parametrize("precision, kernels, device, columns", ROW_COLUMNS,
                         ids=[f"{p}-{k}-{d.type}" for p, k, d, _ in ROW_COLUMNS])
def test_rows_record_the_numerics_as_they_always_did(precision, kernels, device, columns) -> None:
    numerics = resolve_numerics(precision, kernels, "lenet5", "linear", device)
    assert (numerics.columns()["kernels"], numerics.columns()["compute_dtype"]) == columns
    assert all(type(v) is str for v in numerics.columns().values())  # plain strings in the rows


def test_fused_kernels_in_fp32_or_tf32_compute_in_ieee_fp32() -> None:
    """``--kernels fused`` in fp32 and tf32 (CUDA): the kernels' products are IEEE fp32 and the
    rows say so, as they did (``fused, autocast = autocast or float32, None``)."""
    for tf32 in (False, True):
        numerics = Numerics(Kernels.FUSED, torch.float32, tf32=tf32, cuda=True)
        assert numerics.columns() == {"kernels": "fused", "compute_dtype": "float32"}
        assert numerics.autocast is None
    assert Numerics(Kernels.FUSED, torch.bfloat16, cuda=True).autocast is None  # no autocast on the fused path
    assert Numerics("grouped", torch.bfloat16).autocast is torch.bfloat16


def test_numerics_are_frozen_and_refuse_what_cannot_be() -> None:
    numerics = Numerics(Kernels.GROUPED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        numerics.kernels = Kernels.FUSED  # type: ignore[misc]
    with pytest.raises(ValueError, match="not 'auto'"):
        Numerics(Kernels.AUTO)
    with pytest.raises(ValueError, match="compute dtype torch.float16"):
        Numerics(Kernels.GROUPED, torch.float16)
    with pytest.raises(ValueError, match="TF32 exists on CUDA only"):
        Numerics(Kernels.GROUPED, tf32=True)


def test_apply_sets_the_tf32_switches_on_cuda_only() -> None:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        resolve_numerics("fp32", "grouped", "lenet5", "linear", CPU).apply()  # the CPU: nothing changes
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        resolve_numerics("fp32", "grouped", "lenet5", "linear", CUDA).apply()
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        resolve_numerics("bf16", "grouped", "lenet5", "linear", CUDA).apply()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _specs(methods=("baseline", "oversampling")):
    grid = expand(tiny_grid("compute", methods=list(methods)))
    return tuple(sorted(grid.specs, key=lambda s: s.network_id))


def test_new_model_initialises_each_member_from_its_seed() -> None:
    specs = _specs()
    assert len(specs) == 2 and specs[0].seed == specs[1].seed  # two methods, one training set
    model = new_model(specs, resolve_numerics("fp32", "auto", "lenet5", "linear", CPU), 10, (1, 28, 28), CPU)
    assert type(model) is LeNet5 and not is_fused(model)
    a, b = model.member_state(0), model.member_state(1)
    assert all(torch.equal(a[k], b[k]) for k in a)  # paired comparisons start from the same weights
    assert a["conv1.weight"].abs().max() > 0  # initialised, not zeros
    bare = model_for(specs, 10, (1, 28, 28))
    assert all(torch.count_nonzero(t) == 0 for t in bare.state_dict().values() if t.dtype.is_floating_point
               and t.dim() > 1)  # model_for leaves the weights to new_model


def test_new_optimizer_follows_the_model() -> None:
    specs = _specs(("baseline",))
    model = new_model(specs, Numerics(Kernels.GROUPED), 10, (1, 28, 28), CPU)
    one = torch.ones(1)
    opt = new_optimizer(model, list(model.parameters()), 0.9 * one, 5e-4 * one, 2 * one)
    assert type(opt) is PackedSGD
    biases = {id(b) for b in model.bias_parameters()}
    assert [f is not None for f in opt.lr_factors] == [id(p) in biases for p in opt.params]


@pytest.mark.skipif(not fk.INTERPRETED and not torch.cuda.is_available(),
                    reason="the fused model needs CUDA or Triton's interpreter")
def test_fused_numerics_build_the_fused_model_and_its_one_pass_sgd() -> None:
    from workers.fused_lenet import FusedLeNet5, FusedSGD

    dev = CUDA if torch.cuda.is_available() else CPU
    specs = _specs()
    fused = new_model(specs, Numerics(Kernels.FUSED, cuda=dev.type == "cuda"), 10, (1, 28, 28), dev)
    grouped = new_model(specs, Numerics(Kernels.GROUPED), 10, (1, 28, 28), dev)
    assert type(fused) is FusedLeNet5 and is_fused(fused)
    assert all(torch.equal(v, grouped.state_dict()[k]) for k, v in fused.state_dict().items())  # same init
    one = torch.ones(2, device=dev)
    assert type(new_optimizer(fused, list(fused.parameters()), one, one)) is FusedSGD
    # A head-only stage steps the head's views of the flat buffer with PackedSGD.
    assert type(new_optimizer(fused, fused.head_parameters(), one, one)) is PackedSGD
    with pytest.raises(ValueError, match="no fused path"):
        new_model(expand(tiny_grid("c", model="allcnn", dataset="cifar10", recipe="buda_cifar10")).specs[:1],
                  Numerics(Kernels.FUSED), 10, (3, 32, 32), dev)


def test_sweep_options_refuse_an_unknown_precision() -> None:
    grid = expand(tiny_grid("compute"))
    with pytest.raises(SweepError, match="--precision 'fp8': allowed: fp32, tf32, bf16"):
        check_options(grid, RunOptions(precision="fp8"))
    with pytest.raises(SweepError, match="--kernels 'fast': allowed: auto, fused, grouped"):
        check_options(grid, RunOptions(kernels="fast"))


@pytest.mark.parametrize("option, value", [("--precision", "fp8"), ("--kernels", "triton")])
def test_the_cli_refuses_unknown_numerics_before_the_store(tmp_path, option, value) -> None:
    from sweep.cli import cli

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(tiny_grid("bad")))
    store = tmp_path / "store"
    res = CliRunner().invoke(cli, ["run", str(grid), "--store", str(store), option, value])
    assert res.exit_code == 2, res.output
    assert f"Invalid value for '{option}'" in res.output and f"'{value}' is not one of" in res.output
    assert not store.exists()

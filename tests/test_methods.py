"""Each method does what it claims, checked where it happens (samplers, member data, run_pack).

What tests/test_imbalance.py (count arithmetic) and tests/test_run_pack.py (two-phase head
only, rows, thresholding) already cover is not repeated here.
"""

import math

import numpy as np
import pytest
import torch

import workers.pack_stage as stage
import workers.run_pack as rp
from sweep.core.grid import expand
from sweep.core.plan import Pack
from sweep.core.spec import Method
from workers.datasets import ArrayDataset
from workers.members import member_data
from workers.samplers import EpochSampler
from workers.transforms import GCN_SCALE, ZCA_BIAS


def grid(**over):
    doc = {
        "name": "m", "dataset": "mnist", "model": "lenet5",
        "recipe": {"preset": "buda_mnist", "iters": 20},
        "max_per_class": 100,
        "imbalance": {"step": {"rho": [10], "mu": [0.5]}},
        "methods": ["baseline", "oversampling", "undersampling"],
        "repeats": 1, "seed": 11,
    }
    doc.update(over)
    return expand(doc)


def spec_of(g, method, ratio=1.0):
    return next(s for s in g.specs if s.method == method and s.resample_ratio == ratio)


def drawn_label_counts(md, labels, batch, batches, seed=5):
    idx = EpochSampler(md.train_indices, batch, seed).take(batches).reshape(-1)
    return np.bincount(labels[idx], minlength=10)


# -- over-/under-sampling: what the sampler actually draws -------------------------------


def test_oversampling_equalises_the_class_frequencies_the_sampler_draws(small_mnist):
    labels = small_mnist.train_y.numpy()
    g = grid()
    over = member_data(spec_of(g, Method.OVERSAMPLING), labels, 10)
    base = member_data(spec_of(g, Method.BASELINE), labels, 10)
    # 5 classes of 100 and 5 of 10; over-sampled to 100 each = 1,000 indices.
    assert len(over.train_indices) == 1000
    # Whole epochs: exactly 100 draws per class per epoch.
    drawn = drawn_label_counts(over, labels, batch=50, batches=20 * 7)
    assert drawn.tolist() == [700] * 10
    # Batches that do not align with epochs: frequencies still within a batch of equal.
    drawn = drawn_label_counts(over, labels, batch=64, batches=500)
    assert np.abs(drawn / drawn.sum() - 0.1).max() < 64 / drawn.sum() + 1e-12
    # The baseline draws the imbalanced frequencies (10:1) - the contrast that matters.
    drawn = drawn_label_counts(base, labels, batch=55, batches=10 * 20)
    minority = set(g.specs[0].imbalance.classes)
    assert drawn.tolist() == [200 if c in minority else 2000 for c in range(10)]
    # Replicates are of minority images only, and every original image is kept.
    assert set(np.unique(over.train_indices)) == set(over.subset.tolist())
    reps = np.bincount(over.train_indices, minlength=len(labels))
    assert set(labels[np.flatnonzero(reps > 1)]) <= minority


def test_undersampling_equalises_counts_with_unique_images_of_the_subset(small_mnist):
    labels = small_mnist.train_y.numpy()
    under = member_data(spec_of(grid(), Method.UNDERSAMPLING), labels, 10)
    assert under.sampled_counts.tolist() == [10] * 10
    assert len(np.unique(under.train_indices)) == len(under.train_indices) == 100
    assert set(under.train_indices.tolist()) <= set(under.subset.tolist())
    drawn = drawn_label_counts(under, labels, batch=20, batches=5 * 6)
    assert drawn.tolist() == [60] * 10
    # Counts (and so thresholding priors) are those of the imbalanced set, not the re-sampled one.
    assert sorted(under.counts.tolist()) == [10] * 5 + [100] * 5


@pytest.mark.parametrize("ratio", [1, 2, 5, 10])
def test_partial_levels_give_the_intended_counts_end_to_end(small_mnist, ratio):
    labels = small_mnist.train_y.numpy()
    g = grid(resample_ratios=[1, 2, 5, 10])
    # Per set: baseline + 4 ratios x (over, under).
    assert g.trained_networks == 1 + 4 * 2
    minority = set(g.specs[0].imbalance.classes)
    over = member_data(spec_of(g, Method.OVERSAMPLING, float(ratio)), labels, 10)
    under = member_data(spec_of(g, Method.UNDERSAMPLING, float(ratio)), labels, 10)
    # rho = 10, 100 majority, 10 minority: over raises minority to ceil(100/r);
    # under lowers majority to 10*r (never above what a class has).
    assert over.sampled_counts.tolist() == [max(10, math.ceil(100 / ratio)) if c in minority else 100
                                            for c in range(10)]
    assert under.sampled_counts.tolist() == [10 if c in minority else min(100, 10 * ratio)
                                             for c in range(10)]
    left = lambda n: n.max() / n.min()  # noqa: E731
    assert left(over.sampled_counts) <= ratio and left(under.sampled_counts) <= ratio
    # Drawn frequencies follow the re-sampled counts over whole epochs.
    n = len(over.train_indices)
    drawn = np.bincount(labels[EpochSampler(over.train_indices, n, 1).take(3).reshape(-1)], minlength=10)
    assert drawn.tolist() == (3 * over.sampled_counts).tolist()


# -- classifier re-training -----------------------------------------------------------------


def test_classifier_retraining_trains_only_wc_on_the_balanced_full_set(small_mnist, monkeypatch):
    labels = small_mnist.train_y.numpy()
    g = grid(methods=["baseline", "classifier_retraining"], thresholding=[])
    base, retrain = (spec_of(g, m) for m in (Method.BASELINE, Method.CLASSIFIER_RETRAINING))
    assert retrain.parent_id == base.network_id
    md = member_data(retrain, labels, 10)
    # Balanced *full* training set: max_per_class of every class, drawn from all images,
    # not only from the imbalanced subset.
    assert md.sampled_counts.tolist() == [100] * 10
    assert not set(md.train_indices.tolist()) <= set(md.subset.tolist())
    assert len(np.unique(md.train_indices)) == 1000
    # Priors for evaluation stay those of the imbalanced set.
    assert sorted(md.counts.tolist()) == [10] * 5 + [100] * 5

    captured, walked = {}, []
    real_sampler = stage.EpochSampler

    def observe(plan, model, when):
        captured[(plan.head_only, when)] = model.member_state(0)
        captured[plan.head_only, "methods"] = [s.method for s in plan.specs]

    def sampler(indices, batch, seed):
        walked.append(np.asarray(indices).copy())
        return real_sampler(indices, batch, seed)

    monkeypatch.setattr(stage, "EpochSampler", sampler)
    result = rp.run_pack(Pack(g.specs), None, dataset=small_mnist, observer=observe)
    captured[False] = (None, captured[(False, "end")], captured[False, "methods"])
    captured[True] = (captured[(True, "start")], captured[(True, "end")], captured[True, "methods"])
    stage1_after, stage1_methods = captured[False][1], captured[False][2]
    stage2_before, stage2_after, stage2_methods = captured[True]
    assert stage1_methods == [Method.BASELINE] and stage2_methods == [Method.CLASSIFIER_RETRAINING]
    for k in stage1_after:
        assert torch.equal(stage2_before[k], stage1_after[k]), k  # starts from the baseline
        assert (not torch.equal(stage2_after[k], stage2_before[k])) == k.startswith("fc2."), k
    # Stage 2's sampler walked the balanced full set.
    assert np.array_equal(walked[-1], md.train_indices)
    rows = {r["method"]: r for r in result.tables["trials"]}
    assert rows["classifier_retraining"]["sampled_counts"] == [100] * 10
    assert rows["classifier_retraining"]["parent_id"] == base.network_id
    assert all(r["status"] == "ok" for r in rows.values())


# -- validation selection ---------------------------------------------------------------------


def test_validation_selection_carves_a_split_and_records_the_best_point(small_mnist):
    labels = small_mnist.train_y.numpy()
    g = grid(methods=["baseline", "oversampling"], selection="validation", thresholding=[])
    assert all(s.recipe.validation_fraction == 0.1 for s in g.specs)
    mds = [member_data(s, labels, 10) for s in g.specs]
    md = mds[0]
    # 10% of each class of the imbalanced subset (100 -> 10, 10 -> 1), disjoint from training.
    assert sorted(np.bincount(labels[md.validation], minlength=10).tolist()) == [1] * 5 + [10] * 5
    assert not set(md.validation.tolist()) & set(md.subset.tolist())
    assert not set(md.validation.tolist()) & set(mds[1].train_indices.tolist())
    assert sorted(md.counts.tolist()) == [9] * 5 + [90] * 5
    assert np.array_equal(md.validation, mds[1].validation)  # one split per training set

    rows = rp.run_pack(Pack(g.specs), None, dataset=small_mnist).tables["trials"]
    assert len(rows) == 2
    for r in rows:
        assert r["selection"] == "validation" and r["status"] == "ok"
        assert 0 <= r["val_balanced_accuracy"] <= 1
        assert 1 <= r["best_iter"] <= 20
    final = rp.run_pack(Pack(grid(methods=["baseline"]).specs), None, dataset=small_mnist)
    assert final.tables["trials"][0]["val_balanced_accuracy"] is None
    assert final.tables["trials"][0]["best_iter"] == 20


def test_each_member_is_selected_on_its_own_training_sets_validation_split(small_mnist):
    """Two training sets in one pack: each member keeps the point that is best on its own split,
    exactly as when its training set is trained alone (never on the other set's images)."""
    g = grid(methods=["baseline"], selection="validation", thresholding=[], repeats=2,
             recipe={"preset": "buda_mnist", "iters": 20, "eval_every": 4})
    assert len({s.training_set_key for s in g.specs}) == 2
    together = {r["network_id"]: r for r in rp.run_pack(Pack(g.specs), None, dataset=small_mnist).tables["trials"]}
    for s in g.specs:
        alone = rp.run_pack(Pack((s,)), None, dataset=small_mnist).tables["trials"][0]
        packed = together[s.network_id]
        assert packed["best_iter"] == alone["best_iter"]
        assert packed["val_balanced_accuracy"] == pytest.approx(alone["val_balanced_accuracy"], abs=1e-12)
        assert packed["roc_auc"] == pytest.approx(alone["roc_auc"], abs=1e-4)  # as test_run_pack


# -- learning-rate search ----------------------------------------------------------------------


def test_lr_search_counts_and_seeds():
    g = grid(methods=["baseline", "oversampling", "two_phase_over"], lr=[0.1, 0.01, 0.001], lr_runs=2,
             imbalance={"step": {"rho": [10], "mu": [0.5]}, "linear": {"rho": [10]}})
    # 2 sets x 3 methods x 3 lr x 2 runs.
    assert g.trained_networks == 2 * 3 * 3 * 2 == 36
    assert len({s.network_id for s in g.specs}) == 36
    for kind in ("step", "linear"):
        cell = [s for s in g.specs if s.imbalance.kind == kind]
        seeds = {s.lr_run: {x.seed for x in cell if x.lr_run == s.lr_run} for s in cell}
        # One seed per run, shared by every lr and method of that run (paired comparisons);
        # the two runs differ.
        assert all(len(v) == 1 for v in seeds.values())
        assert seeds[0] != seeds[1]
        # Each lr appears once per (method, run).
        assert sorted((str(s.method), s.lr_run, s.recipe.base_lr) for s in cell) == sorted(
            (str(m), r, lr) for m in ("baseline", "oversampling", "two_phase_over")
            for r in (0, 1) for lr in (0.1, 0.01, 0.001))
    # Two-phase starts from the over-sampling network of the same lr and run.
    ids = {s.network_id: s for s in g.specs}
    for s in g.specs:
        if s.method == Method.TWO_PHASE_OVER:
            p = ids[s.parent_id]
            assert (p.method, p.recipe.base_lr, p.lr_run) == (Method.OVERSAMPLING, s.recipe.base_lr, s.lr_run)
    # Without a search: one run, the training set's own seed.
    assert {s.lr_run for s in grid().specs} == {0}


# -- ZCA through the worker --------------------------------------------------------------------


def cifar_like(n, seed):
    """uint8 32x32x3 images with strongly correlated pixels (a few smooth factors + noise)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(6, 3072)) * 40
    z = 120 + rng.normal(size=(n, 6)) @ mixing + rng.normal(scale=10, size=(n, 3072))
    return torch.from_numpy(np.clip(np.rint(z), 0, 255).astype(np.uint8).reshape(n, 3, 32, 32))


def test_zca_fitted_in_run_pack_whitens_the_members_own_subset(monkeypatch):
    y = torch.arange(10).repeat_interleave(40)
    ds = ArrayDataset(name="cifar10", train_x=cifar_like(400, 1), train_y=y, test_x=cifar_like(50, 2),
                      test_y=torch.arange(10).repeat(5), num_classes=10, source="synthetic")
    g = expand({"name": "z", "dataset": "cifar10", "model": "allcnn",
                "recipe": {"preset": "buda_cifar10", "iters": 1, "batch_size": 4, "checkpoint_every": 0},
                "max_per_class": 30, "minority": "lowest",
                "imbalance": {"step": {"rho": [3], "mu": [0.5]}},
                "methods": ["baseline", "oversampling"], "thresholding": [], "seed": 4})
    fits = []
    real = stage.fit_transform

    def spy(kind, x):
        t = real(kind, x)
        fits.append((kind, x, t))
        return t

    monkeypatch.setattr(stage, "fit_transform", spy)
    rp.run_pack(Pack(g.specs), None, dataset=ds)
    assert len(fits) == 1  # one fit for the training set both methods share
    kind, x, t = fits[0]
    md = member_data(g.specs[1], ds.train_y.numpy(), 10)
    assert kind == "gcn_zca"
    assert torch.equal(x, ds.train_x[md.subset])  # its own unique subset: not the replicates
    assert len(x) == 5 * 30 + 5 * 10

    white = t.apply(x).reshape(len(x), -1).to(torch.float64).numpy()
    flat = x.reshape(len(x), -1).numpy().astype(np.float64)
    centred = flat - flat.mean(1, keepdims=True)
    gcn = GCN_SCALE * centred / np.linalg.norm(centred, axis=1, keepdims=True)

    def spectrum(a):  # nonzero covariance eigenvalues (divided by n) via the n x n Gram matrix
        c = a - a.mean(0)
        return np.sort(np.linalg.eigvalsh(c @ c.T / len(a)))[::-1][: len(a) - 1]

    lam, got = spectrum(gcn), spectrum(white)
    # ZCA with bias eps: each direction's variance becomes lambda / (lambda + eps) (documented).
    np.testing.assert_allclose(got, lam / (lam + ZCA_BIAS), atol=2e-3)
    # So covariance ~ identity wherever lambda >> eps: the strong directions are white.
    strong = lam > 100 * ZCA_BIAS
    assert strong.sum() >= 6 and np.all(np.abs(got[strong] - 1) < 0.011)
    assert np.abs(white.mean(0)).max() < 1e-3  # centred on the subset


def test_allcnn_with_dropout_gives_the_same_numbers_every_run_and_alone(monkeypatch):
    """Dropout masks come from each member's own seeded stream, not torch's global state."""
    y = torch.arange(10).repeat_interleave(40)
    ds = ArrayDataset(name="cifar10", train_x=cifar_like(400, 1), train_y=y, test_x=cifar_like(50, 2),
                      test_y=torch.arange(10).repeat(5), num_classes=10, source="synthetic")
    g = expand({"name": "d", "dataset": "cifar10", "model": "allcnn",
                "recipe": {"preset": "buda_cifar10", "iters": 3, "batch_size": 4, "checkpoint_every": 0,
                           "normalization": "scale"},  # no ZCA to fit: this test is about dropout
                "max_per_class": 30, "minority": "lowest", "imbalance": {"step": {"rho": [3], "mu": [0.5]}},
                "methods": ["baseline", "oversampling"], "thresholding": [], "seed": 4})
    first = rp.run_pack(Pack(g.specs), None, dataset=ds).tables["trials"]
    torch.manual_seed(12345)  # the global stream plays no part
    torch.rand(7)
    second = rp.run_pack(Pack(g.specs), None, dataset=ds).tables["trials"]
    assert [r["roc_auc"] for r in first] == [r["roc_auc"] for r in second]
    alone = rp.run_pack(Pack(g.specs[1:]), None, dataset=ds).tables["trials"][0]
    assert alone["roc_auc"] == pytest.approx(first[1]["roc_auc"], abs=1e-4)


# -- two-phase phase 2: the frozen body runs as Caffe's TRAIN phase ---------------------
def _phase2(name: str, in_shape: tuple[int, int, int], body_train: bool, iters: int = 3):
    """A head-only stage of one member from fixed weights; returns (start state, end state, model)."""
    from workers.engine import StageConfig, train_stage
    from workers.losses import PackedLoss
    from workers.models import build_model
    from workers.transforms import InputTransform, stack_transforms

    model = build_model(name, 1, 10, in_shape)
    model.reset_parameters("xavier", [3])
    model.seed_noise([8])
    start = {k: v.clone() for k, v in model.member_state(0).items()}
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (40, *in_shape), dtype=torch.uint8, generator=g)
    y = torch.arange(10).repeat(4)
    cfg = StageConfig(iters=iters, batch_size=4, lr=torch.full((iters, 1), 0.01), momentum=torch.full((1,), 0.9),
                      weight_decay=torch.full((1,), 5e-4), bias_lr_factor=torch.full((1,), 2.0), head_only=True,
                      body_train=body_train)
    loss = PackedLoss(["ce"], torch.full((1, 10), 4.0))
    train_stage(model, [EpochSampler(np.arange(40), 4, 5)], x, y, stack_transforms([InputTransform("scale", None)]),
                loss, cfg)
    return start, model.member_state(0), model


def test_phase2_lenet5_weights_are_those_of_the_eval_mode_path():
    """LeNet-5 has neither dropout nor BatchNorm: running its frozen body in training mode
    (the two-phase default now) gives bit for bit the weights of the eval-mode path (what
    phase 2 did before, and what classifier re-training does), so the committed MNIST
    slice's two-phase numbers stand."""
    _, eval_mode, _ = _phase2("lenet5", (1, 28, 28), body_train=False)
    start, train_mode, _ = _phase2("lenet5", (1, 28, 28), body_train=True)
    assert eval_mode.keys() == train_mode.keys()
    for k in eval_mode:
        assert torch.equal(eval_mode[k], train_mode[k]), k
    assert not torch.equal(train_mode["fc2.weight"], start["fc2.weight"])  # the head did train


def test_phase2_allcnn_draws_dropout_masks_and_keeps_the_frozen_layers_bit_equal():
    start, end, model = _phase2("allcnn", (3, 32, 32), body_train=True, iters=2)
    assert model.noise_state() == {"dropout_draws": 2 * 3}  # 3 dropout layers in the body, 2 steps
    head = {k for k in start if k.split(".")[0] in model.head_names}
    assert head == {"conv8.weight", "conv8.bias", "fc.weight", "fc.bias"}
    for k in start:
        assert torch.equal(start[k], end[k]) != (k in head), k  # frozen: equal; head: trained
    _, eval_end, eval_model = _phase2("allcnn", (3, 32, 32), body_train=False, iters=2)
    assert eval_model.noise_state() is None  # eval mode: no mask was ever drawn
    assert not torch.equal(eval_end["fc.weight"], end["fc.weight"])  # the masks changed the head's steps


def test_phase2_batchnorm_updates_running_statistics_with_frozen_parameters():
    """Caffe's BatchNorm in the TRAIN phase (use_global_stats false) normalises with the
    batch's statistics and updates its moving averages whatever the layer's lr_mult; its
    learned scale and shift (and every convolution) stay fixed."""
    start, end, model = _phase2("resnet32", (3, 32, 32), body_train=True, iters=1)
    running = [k for k in start if k.endswith("running_mean") or k.endswith("running_var")]
    assert running and all(not torch.equal(start[k], end[k]) for k in running)
    frozen = [n for n, _ in model.named_parameters() if n.split(".")[0] not in model.head_names]
    assert frozen and all(torch.equal(start[k], end[k]) for k in frozen)
    s2, e2, _ = _phase2("resnet32", (3, 32, 32), body_train=False, iters=1)
    assert all(torch.equal(s2[k], e2[k]) for k in running)  # eval mode: the stored statistics


def test_phase2_trains_its_body_in_training_mode_and_retraining_in_eval_mode():
    from workers.stages import plan_stages, stage_plan

    mixed = grid(methods=["baseline", "oversampling", "two_phase_over", "classifier_retraining"]).specs
    plans = plan_stages(Pack(mixed))
    assert [p.number for p in plans] == [1, 2, 3]
    first, two, retrain = plans
    assert {s.method for s in first.specs} == {Method.BASELINE, Method.OVERSAMPLING} and not first.head_only
    assert {s.method for s in two.specs} == {Method.TWO_PHASE_OVER}
    assert {s.method for s in retrain.specs} == {Method.CLASSIFIER_RETRAINING}
    assert two.head_only and two.body_train and retrain.head_only and not retrain.body_train
    only_retraining = plan_stages(Pack(grid(methods=["baseline", "classifier_retraining"]).specs))
    assert [p.number for p in only_retraining] == [1, 2] and not only_retraining[1].body_train
    with pytest.raises(ValueError, match="mixes classifier re-training .* with two-phase phase 2"):
        stage_plan(2, two.specs + retrain.specs)  # one stage given both by hand

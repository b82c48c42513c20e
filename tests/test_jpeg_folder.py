"""Buda's 224-px ImageNet regime (dataset imagenet224, workers.jpeg_folder) on small folders
of images the tests write: listing and its errors, crops, mirroring, the centred test crop,
the crop draws, and a ResNet-10 pack trained on the streamed crops.

Sizes are shrunk (images resized to a 40-px shorter side, 32-px crops) so that a pack
trains in a second or two on a loaded CPU; the geometry is the same at 256 / 224.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import workers.jpeg_folder as jf
from sweep.core import catalog
from sweep.core.grid import expand
from sweep.core.grid_checks import GridError
from sweep.core.plan import Pack
from workers.crop_stream import CropStream
from workers.datasets import DatasetError, DatasetNotFound, load_dataset
from workers.jpeg_folder import JpegImages, ResizeCropDraws, crop_offsets, decode_crop, resized_size
from workers.run_pack import run_pack

RESIZE, CROP = 40, 32
CLASSES = 4


@pytest.fixture
def small_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jf, "RESIZE_SIDE", RESIZE)
    monkeypatch.setattr(jf, "CROP_SIDE", CROP)
    # A 4-class "ImageNet" at 32 px, 4 training and 2 test images per class.
    monkeypatch.setitem(catalog.DATASETS, "imagenet224", catalog.DatasetInfo(CLASSES, (3, CROP, CROP), 4, 2))


def coordinate_image(width: int, height: int) -> np.ndarray:
    """RGB uint8 [H, W, 3]: red = column, green = row, blue = 7 (crops can be located exactly)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x, y, np.full_like(x, 7)], axis=-1).astype(np.uint8)


def write_folder(root: Path, train: int = 4, val: int = 2, classes: int = CLASSES) -> Path:
    """root/imagenet/{train,val}/n0<c>/<i>.JPEG: class c is brighter by 60 per class; sizes
    alternate between landscape and portrait, JPEG and PNG."""
    rng = np.random.default_rng(0)
    folder = root / "imagenet"
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = folder / split / f"n0{c}"
            d.mkdir(parents=True)
            for i in range(n):
                w, h = (52, 40) if i % 2 else (40, 60)
                a = (rng.random((h, w, 3)) * 40 + 60 * c).astype(np.uint8)
                if i == 2:
                    Image.fromarray(a).save(d / f"{i}.png")
                else:
                    Image.fromarray(a).save(d / f"{i}.JPEG", quality=90)
            (d / "README.txt").write_text("not an image: ignored")
    return folder


# -- listing and its errors -----------------------------------------------------------------


def test_folders_load_as_tables_of_crops(tmp_path: Path, small_sides: None) -> None:
    write_folder(tmp_path)
    ds = load_dataset("imagenet224", data_dir=str(tmp_path))
    assert ds.num_classes == CLASSES
    assert tuple(ds.train_x.shape) == (16, 3, CROP, CROP) and tuple(ds.test_x.shape) == (8, 3, CROP, CROP)
    assert ds.train_y.tolist() == [c for c in range(CLASSES) for _ in range(4)]  # sorted class folders
    assert ds.test_y.tolist() == [c for c in range(CLASSES) for _ in range(2)]
    x = ds.test_x[2:6]  # a slice: those images' centred crops
    assert x.dtype == torch.uint8 and tuple(x.shape) == (4, 3, CROP, CROP)
    # Class brightness survives decoding, resizing and cropping.
    means = ds.test_x[torch.arange(8).view(2, 4)].float().mean(dim=(2, 3, 4))  # an index of any shape
    assert means.shape == (2, 4)
    per_class = means.view(-1).view(CLASSES, 2).mean(1)
    assert (per_class.diff() > 40).all()


@pytest.mark.parametrize("breakage, message", [
    ("no val", "val: no such folder"),
    ("flat val", r"holds 2 image\(s\) directly"),
    ("unknown val class", "n09: class folder not among the training classes"),
    ("empty class", "n01: a class folder without images"),
])
def test_malformed_folders_are_named(tmp_path: Path, small_sides: None, breakage: str, message: str) -> None:
    folder = write_folder(tmp_path, classes=2)
    if breakage == "no val":
        for p in sorted((folder / "val").rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        (folder / "val").rmdir()
    elif breakage == "flat val":
        for p in (folder / "val" / "n00").iterdir():
            if p.suffix != ".txt":
                p.rename(folder / "val" / f"ILSVRC2012_val_{p.name}")
    elif breakage == "unknown val class":
        (folder / "val" / "n00").rename(folder / "val" / "n09")
    elif breakage == "empty class":
        for p in (folder / "train" / "n01").iterdir():
            if p.suffix != ".txt":
                p.unlink()
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset("imagenet224", data_dir=str(tmp_path))
    assert str(folder) in str(info.value)  # the message names the path


def test_missing_folder_says_where_it_looked(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetNotFound, match="cannot be downloaded") as info:
        load_dataset("imagenet224", data_dir=str(tmp_path))
    assert str(tmp_path / "imagenet") in str(info.value)


def test_an_undecodable_image_is_named(tmp_path: Path, small_sides: None) -> None:
    folder = write_folder(tmp_path, classes=2)
    bad = folder / "val" / "n01" / "0.JPEG"
    bad.write_bytes(b"\xff\xd8 truncated")
    ds = load_dataset("imagenet224", data_dir=str(tmp_path))
    with pytest.raises(jf.JpegFolderError, match=f"{bad}: cannot be decoded"):
        ds.test_x[:]


def test_unknown_decoder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_folder(tmp_path, classes=2)
    monkeypatch.setenv("SWEEP_JPEG_DECODER", "gpu")
    with pytest.raises(DatasetError, match="SWEEP_JPEG_DECODER='gpu': not one of auto, cpu, cuda"):
        load_dataset("imagenet224", data_dir=str(tmp_path))


# -- crops, mirroring, the centred crop ----------------------------------------------------


@pytest.mark.parametrize("width, height", [(57, 40), (40, 51)])
def test_crops_are_windows_of_the_resized_image(tmp_path: Path, width: int, height: int) -> None:
    # The shorter side is already RESIZE: resizing keeps every pixel, so each crop must be an
    # exact window of the coordinate image (PNG: lossless).
    path = tmp_path / "c.png"
    Image.fromarray(coordinate_image(width, height)).save(path)
    assert resized_size(width, height, RESIZE) == (width, height)

    def window(top: int, left: int) -> np.ndarray:
        return coordinate_image(width, height)[top:top + CROP, left:left + CROP].transpose(2, 0, 1)

    centre = decode_crop(str(path), None, RESIZE, CROP)  # Caffe's test phase: (H - crop) // 2
    assert np.array_equal(centre, window((height - CROP) // 2, (width - CROP) // 2))
    room_y, room_x = height - CROP, width - CROP
    seen_y, seen_x, mirrored = set(), set(), set()
    for draw in ResizeCropDraws(seed=5).take(1, 400)[0]:
        top, left, flip = crop_offsets(width, height, draw, RESIZE, CROP)
        assert 0 <= top <= room_y and 0 <= left <= room_x
        seen_y.add(top), seen_x.add(left), mirrored.add(flip)
        crop = decode_crop(str(path), draw, RESIZE, CROP)
        expected = window(top, left)
        assert np.array_equal(crop, expected[:, :, ::-1] if flip else expected)  # mirrored left-right
    # Every offset of the room is drawn (uniform in 0..room, as Caffe's Rand(room + 1)), both mirrors.
    assert seen_y == set(range(room_y + 1)) and seen_x == set(range(room_x + 1)) and mirrored == {False, True}


def test_larger_images_are_resized_to_the_shorter_side(tmp_path: Path) -> None:
    # A 2x image: its crops are 2x2 averages of the coordinates, so a centred crop's red
    # channel (2 * column) is near the resized image's columns.
    path = tmp_path / "big.png"
    Image.fromarray(coordinate_image(120, 80)).save(path)
    assert resized_size(120, 80, RESIZE) == (60, 40)
    crop = decode_crop(str(path), None, RESIZE, CROP).astype(np.int64)
    left, top = (60 - CROP) // 2, (40 - CROP) // 2
    assert np.abs(crop[0] - (2 * (np.arange(CROP) + left) + 0.5)[None, :]).max() <= 1
    assert np.abs(crop[1] - (2 * (np.arange(CROP) + top) + 0.5)[:, None]).max() <= 1


def test_crop_draws_do_not_depend_on_chunking() -> None:
    whole = ResizeCropDraws(seed=11).take(5, 8)
    split = ResizeCropDraws(seed=11)
    assert np.array_equal(np.concatenate([split.take(3, 8), split.take(2, 8)]), whole)
    resumed = ResizeCropDraws(seed=0)
    first = ResizeCropDraws(seed=11)
    first.take(3, 8)
    resumed.load_state(first.state())
    assert np.array_equal(resumed.take(2, 8), whole[3:])
    assert set(np.unique(whole[..., 2])) <= {0, 1} and whole[..., :2].max() < 1 << 21


def test_stream_gives_each_member_its_crops(tmp_path: Path, small_sides: None) -> None:
    write_folder(tmp_path, classes=2)
    ds = load_dataset("imagenet224", data_dir=str(tmp_path))
    table: JpegImages = ds.train_x
    idx = np.array([[[0, 3, 5], [7, 1, 2]], [[4, 4, 6], [2, 0, 1]]])  # [steps, P, B]
    draws = np.stack([ResizeCropDraws(seed=s).take(2, 3) for s in (1, 2)], axis=1)  # [steps, P, B, 3]
    stream = CropStream(table, lookahead=1)
    stream.queue_chunk(idx, draws, centred=[False, True])  # member 1 has no crop stream
    try:
        for step in range(2):
            got = stream.next()
            assert tuple(got.shape) == (2, 3, 3, CROP, CROP)
            assert torch.equal(got[0], table.crops(idx[step, 0], draws[step, 0]))
            assert torch.equal(got[1], table[idx[step, 1]])  # centred
        with pytest.raises(RuntimeError, match="no chunk queued"):
            stream.next()
    finally:
        stream.close()


# -- the regime in a grid and in a pack -------------------------------------------------------


def regime_grid(**over):
    doc = {"name": "t", "dataset": "imagenet224", "model": "resnet10",
           "recipe": {"preset": "buda_imagenet224", "iters": 2, "batch_size": 4},
           "imbalance": {"step": {"rho": [2], "mu": [0.5]}}, "max_per_class": 4,
           "methods": ["baseline", "oversampling"], "repeats": 1, "seed": 1}
    doc.update(over)
    return expand(doc)


def test_grid_names_the_regime(small_sides: None) -> None:
    spec = regime_grid().specs[0]
    r = spec.recipe
    assert (r.iters, r.batch_size, spec.model) == (2, 4, "resnet10")
    assert (str(r.normalization), str(r.augmentation), str(r.lr_policy)) == ("raw", "resize_crop_flip", "linear")
    with pytest.raises(GridError, match="normalization: imagenet224 is streamed from JPEGs: standardize would decode"):
        regime_grid(recipe={"preset": "buda_imagenet224", "iters": 2, "normalization": "standardize"})
    with pytest.raises(GridError, match="resize_crop_flip crops images streamed from JPEG folders"):
        expand({"name": "t", "dataset": "cifar10", "model": "allcnn",
                "recipe": {"preset": "buda_cifar10", "augmentation": "resize_crop_flip"},
                "imbalance": {"step": {"rho": [2], "mu": [0.5]}}, "methods": ["baseline"]})


def test_a_resnet10_pack_trains_on_streamed_crops(tmp_path: Path, small_sides: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    write_folder(tmp_path)
    ds = load_dataset("imagenet224", data_dir=str(tmp_path))
    batches: list[torch.Tensor] = []
    real_next = CropStream.next

    def spy(self: CropStream) -> torch.Tensor:
        out = real_next(self)
        batches.append(out)
        return out

    monkeypatch.setattr(CropStream, "next", spy)
    g = regime_grid()
    result = run_pack(Pack(g.specs), None, dataset=ds)
    assert len(batches) == 2  # one decoded batch per iteration, both members in it
    assert all(tuple(b.shape) == (2, 4, 3, CROP, CROP) and b.dtype == torch.uint8 for b in batches)
    rows = result.tables["trials"]
    assert {r["method"] for r in rows} == {"baseline", "oversampling"}
    assert all(r["status"] == "ok" and np.isfinite(r["roc_auc"]) for r in rows)
    # The same spec trains the same network again (crops are drawn from its own stream).
    again = run_pack(Pack(g.specs), None, dataset=ds)
    assert [r["roc_auc"] for r in again.tables["trials"]] == [r["roc_auc"] for r in rows]


# -- ResNet-10 as the reference has it (revision 2) ------------------------------------------------


def test_resnet10_revision_by_dataset(small_sides: None) -> None:
    from sweep.core.catalog import model_revision

    assert model_revision("resnet10", "imagenet224") == 2 and regime_grid().specs[0].model_revision == 2
    # The 32-px stand-in keeps revision 1, and with it its networks' ids.
    assert model_revision("resnet10", "imagenet") == 1
    spec = expand({"name": "t", "dataset": "imagenet", "model": "resnet10", "recipe": "buda_imagenet",
                   "imbalance": {"step": {"rho": [10], "mu": [0.1]}}, "max_per_class": 1000,
                   "methods": ["baseline"]}).specs[0]
    assert spec.model_revision == 1 and "model_revision" not in spec.identity()


def test_resnet10_revision2_is_the_reference_layout() -> None:
    from workers.models import ResNet10, ResNet10PreAct, build_model

    net = build_model("resnet10", 1, 1000, (3, 224, 224))
    assert isinstance(net, ResNet10PreAct) and isinstance(build_model("resnet10", 1, 1000, (3, 224, 224), 1), ResNet10)
    convs = [m for m in net.modules() if type(m).__name__ in ("PackedConv2d", "_FanOutConv2d")]
    # Nine 3x3/7x7 convolutions as the paper counts them, plus three 1x1 conv_expand shortcuts.
    assert sum(m.kernel > 1 for m in convs) == 9 and sum(m.kernel == 1 for m in convs) == 3
    # cvjena ResNet10_cvgj/train.prototxt, layer by layer: data_bn scale (6), conv1 + bias, its BN,
    # block 64 (two 3x3, one BN), blocks 128/256/512 (pre-BN, two 3x3, BN, 1x1 expand), last BN, fc.
    expected = 6 + (3 * 49 * 64 + 64) + 128 + (2 * 64 * 64 * 9 + 128)
    for c_in, c in ((64, 128), (128, 256), (256, 512)):
        expected += 2 * c_in + c_in * c * 9 + 2 * c + c * c * 9 + c_in * c
    expected += 2 * 512 + 512 * 1000 + 1000
    assert sum(p.numel() for p in net.parameters()) == expected == 5_417_070
    # Caffe's pooling (3x3, stride 2, no padding, rounding up): 224 -> 112 -> 56, then 56/28/14/7.
    sizes = []
    net.blocks.register_forward_hook(lambda m, i, o: sizes.append((i[0].shape[-1], o.shape[-1])))
    net.reset_parameters("kaiming", [3])
    with torch.no_grad():
        features, logits = net.eval()(torch.randn(1, 1, 3, 224, 224))
    assert sizes == [(56, 7)] and features.shape == (1, 1, 512) and logits.shape == (1, 1, 1000)


def test_resnet10_revision2_members_are_independent() -> None:
    from workers.models import ResNet10PreAct

    torch.manual_seed(0)
    x = torch.randn(2, 3, 3, 32, 32)
    pack, alone = ResNet10PreAct(2, 5, (3, 32, 32)), ResNet10PreAct(1, 5, (3, 32, 32))
    pack.reset_parameters("kaiming", [7, 8])
    alone.reset_parameters("kaiming", [8])
    # conv1's MSRA fan-out init: std sqrt(2 / (64 * 7 * 7)).
    assert abs(float(pack.conv1.weight.detach().std()) - (2 / (64 * 49)) ** 0.5) < 0.003
    with torch.no_grad():
        _, both = pack.train()(x)
        _, one = alone.train()(x[1:])
    assert torch.allclose(both[1:], one, atol=1e-5)


def test_balanced_imagenet_check_runs(tmp_path: Path, small_sides: None, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # bench/check_balanced.py's ResNet-10 check, two iterations on the small folder: it runs and
    # prints the paper's figures, each network's error and AUC, and PASS/FAIL (bounds loosened).
    import importlib.util
    import sys

    path = Path(__file__).parents[1] / "bench" / "check_balanced.py"
    spec = importlib.util.spec_from_file_location("check_balanced", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "check_balanced", module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    # The grid takes every image (max_per_class 1300, ILSVRC's largest class): so may this folder.
    monkeypatch.setitem(catalog.DATASETS, "imagenet224", catalog.DatasetInfo(CLASSES, (3, CROP, CROP), 4, 2, 1300))
    write_folder(tmp_path)
    args = ["resnet10_imagenet", "--data-dir", str(tmp_path), "--device", "cpu", "--iters", "2", "--batch-size", "8"]
    assert module.main([*args, "--max-error", "1", "--min-auc", "0"]) == 0
    out = capsys.readouterr().out
    assert "paper: 62.56 % top-1 error, 99.50 multi-class ROC AUC" in out and "iters=2 batch=8 networks=1" in out
    assert "lr=0.1 run=0 repeat=0 status=ok top1_error=" in out and out.rstrip().endswith(
        "PASS: top-1 error at most 100.00%")
    assert module.main([*args, "--max-error", "0"]) == 1 and "FAIL: not top-1 error at most 0.00%" in capsys.readouterr().out


# torchvision 0.29 deprecates its image decoders in favour of TorchCodec's (not installed here).
@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
def test_the_nvjpeg_path_crops_as_pillow_does(tmp_path: Path) -> None:
    # The CUDA decoder's code (batched torchvision.io.decode_jpeg, resize, crop, mirror) run on
    # the CPU: the same windows as Pillow's path within a grey level of the two resizers; a PNG
    # (which nvJPEG refuses, as ILSVRC's one PNG named .JPEG) falls back to Pillow.
    y, x = np.mgrid[0:60, 0:52]
    ramp = np.stack([x * 4, y * 3, (x + y) * 2], axis=-1).astype(np.uint8)
    files = []
    for i in range(4):
        path = tmp_path / (f"{i}.png" if i == 2 else f"{i}.JPEG")
        Image.fromarray(ramp[:60 - 10 * (i % 2)]).save(path, **({} if i == 2 else {"quality": 95}))
        files.append(str(path))
    draws = ResizeCropDraws(seed=3).take(1, 4)[0]
    assert set(draws[:, 2]) == {0, 1}  # both mirrors among the four
    got = jf.decode_crops_torchvision(files, draws, RESIZE, CROP, torch.device("cpu"))
    want = torch.stack([torch.from_numpy(decode_crop(f, d, RESIZE, CROP)) for f, d in zip(files, draws)])
    assert got.shape == want.shape == (4, 3, CROP, CROP)
    assert (got.int() - want.int()).abs().max() <= 2


def test_balanced_cifar10_check_searches_lrs_on_one_training_set(monkeypatch: pytest.MonkeyPatch) -> None:
    # bench/check_balanced.py allcnn_cifar10 --lrs ... --runs 2: the paper's search as one pack,
    # every run on the same (full, balanced) training set, the schedule scaled with --iters.
    import importlib.util
    import sys

    path = Path(__file__).parents[1] / "bench" / "check_balanced.py"
    spec = importlib.util.spec_from_file_location("check_balanced", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "check_balanced", module)
    spec.loader.exec_module(module)
    specs = module.check_specs("allcnn_cifar10", 700, [0.05, 0.005, 0.0005, 0.00005], 2, 1)
    assert sorted((s.recipe.base_lr, s.lr_run) for s in specs) == sorted(
        (lr, run) for lr in (0.05, 0.005, 0.0005, 0.00005) for run in (0, 1))
    assert len({s.pack_key for s in specs}) == 1 and len({s.training_set_key for s in specs}) == 1
    assert {(s.recipe.iters, s.recipe.lr_milestones) for s in specs} == {(700, (400, 500, 600))}
    full = module.check_specs("allcnn_cifar10", None, None, 1, 1)
    assert len(full) == 1 and full[0].recipe.iters == 70_000 and str(full[0].recipe.normalization) == "gcn_zca"


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
def test_the_nvjpeg_path_names_an_undecodable_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.JPEG"
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(jf.JpegFolderError, match=f"{bad}: cannot be decoded"):
        jf.decode_crops_torchvision([str(bad)], None, RESIZE, CROP, torch.device("cpu"))


def test_the_32px_imagenet_grid_keeps_its_ids() -> None:
    # grids/buda_imagenet.yaml's 15 networks, as main expanded them before imagenet224 and
    # ResNet-10 revision 2 existed (the 32-px stand-in keeps revision 1).
    from sweep.core.grid import load_grid

    ids = sorted(s.network_id for s in load_grid(Path(__file__).parents[1] / "grids" / "buda_imagenet.yaml").specs)
    assert ids == ["1a29a26f23f5e8bc", "1b885446146041c8", "22528eb3e84dcc8f", "2b8dc548d141dffb",
                   "3f9e165e6cca60d6", "741c2fdc47b10158", "838e0a904d9704fc", "8bd653488e487189",
                   "9547106d40f8ba37", "b30ab678c0a98f63", "dbcbaed1e6d6503d", "dd7838b9ad9fa5c4",
                   "e9e6dfd8ef3089ed", "f2c43c5df17f784a", "f6908dc0e002c733"]

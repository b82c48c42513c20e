"""How fast 224-px ImageNet crops can be fed: decoding + resizing + cropping, in images/s.

    python bench/jpeg_feed.py [--images 64] [--batch 32] [--threads 1,2] [--folder DIR/imagenet] \
        [--width 500 --height 375] [--train-rate] [--members 1] [--device cuda]

Measures, on the same JPEGs:

- baseline: torchvision's usual ImageNet pipeline, one image at a time in one thread
  (``PIL.Image.open`` -> ``transforms.Resize(256)`` -> ``RandomCrop(224)`` ->
  ``RandomHorizontalFlip`` -> uint8 tensor), i.e. a DataLoader worker's work per image;
- cpu xN: ``workers.jpeg_folder.JpegImages.crops`` with the Pillow decoder in N threads
  (only the crop's window is resampled; large JPEGs decoded at a reduced DCT scale);
- cuda: the same crops with the nvJPEG decoder (``torchvision.io.decode_jpeg`` on the
  device, batched), when CUDA is present;
- with ``--train-rate``: what ResNet-10 consumes, training images/s of a pack of
  ``--members`` networks (batch ``--batch``, forward + backward + SGD) on ``--device``: the rate
  a feed must reach not to starve the GPU.

Without ``--folder`` it writes ``--images`` synthetic JPEGs of ``--width`` x ``--height`` (ILSVRC-2012's
typical 500 x 375, quality 90: smooth shapes plus noise) into a temporary folder and prints
their mean file size; real ImageNet files are the better test. Prints one line per
measurement and the speed-up over the baseline. No Ray; nothing is stored.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers.jpeg_folder import RESIZE_SIDE, Decoder, JpegImages, ResizeCropDraws, scan_folders  # noqa: E402

CROP = 224


def synthetic_jpegs(folder: Path, n: int, width: int, height: int, seed: int = 0) -> list[str]:
    """``n`` photo-like JPEGs: smooth colour gradients and blobs plus noise (not pure noise,
    which compresses and decodes unlike photographs)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(n):
        img = np.zeros((height, width, 3), np.float32)
        for c in range(3):
            fx, fy, ph = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 6.3)]
            img[..., c] = 128 + 80 * np.sin(fx * x / width * 6.3 + ph) * np.cos(fy * y / height * 6.3)
        for _ in range(6):
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
            img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 12, img.shape)
        path = folder / f"{i:05d}.JPEG"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def baseline_rate(files: list[str], repeat: int) -> float:
    """torchvision's ImageNet training transform, image by image, in this thread."""
    from PIL import Image
    from torchvision import transforms as T

    pipeline = T.Compose([T.Resize(RESIZE_SIDE), T.RandomCrop(CROP), T.RandomHorizontalFlip(), T.PILToTensor()])
    t0 = time.perf_counter()
    for _ in range(repeat):
        for f in files:
            with Image.open(f) as img:
                out = pipeline(img.convert("RGB"))
            assert out.shape == (3, CROP, CROP)
    return repeat * len(files) / (time.perf_counter() - t0)


def table_rate(files: list[str], decoder: Decoder, device: str, threads: int, batch: int, repeat: int) -> float:
    """``JpegImages.crops`` on batches of ``batch`` random crops."""
    table = JpegImages(files, np.zeros(len(files), np.int64), decoder, device, RESIZE_SIDE, CROP, threads)
    draws = ResizeCropDraws(seed=1)
    order = np.arange(len(files))
    table.crops(order[:batch], draws.take(1, batch)[0])  # warm-up: pools, nvJPEG handles
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    n, t0 = 0, time.perf_counter()
    for _ in range(repeat):
        for i in range(0, len(files), batch):
            idx = order[i:i + batch]
            out = table.crops(idx, draws.take(1, len(idx))[0])
            n += len(idx)
    sync()
    assert out.shape[1:] == (3, CROP, CROP)
    table.close()
    return n / (time.perf_counter() - t0)


def train_rate(device: str, members: int, batch: int, steps: int) -> float:
    """Training images/s of a ResNet-10 pack at 224 px (all members' images together)."""
    from workers.models import build_model

    model = build_model("resnet10", members, 1000, (3, CROP, CROP)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randint(0, 256, (members, batch, 3, CROP, CROP), dtype=torch.uint8, device=device)
    y = torch.randint(0, 1000, (members, batch), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step() -> None:
        _, logits = model(x.float())
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 1000), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * members * batch / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="synthetic JPEGs to write (without --folder)")
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--folder", type=Path, default=None, help="an ImageNet folder (DIR/imagenet): its train images")
    ap.add_argument("--limit", type=int, default=2048, help="at most this many of the folder's images")
    ap.add_argument("--batch", type=int, default=32, help="crops per decoding call")
    ap.add_argument("--threads", default="1,2", help="Pillow decoder threads to try, comma-separated")
    ap.add_argument("--repeat", type=int, default=2, help="passes over the images per measurement")
    ap.add_argument("--train-rate", action="store_true", help="also measure what ResNet-10 consumes")
    ap.add_argument("--members", type=int, default=1, help="networks in the pack for --train-rate")
    ap.add_argument("--steps", type=int, default=5, help="training steps for --train-rate")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.folder is not None:
            files = list(scan_folders(args.folder).train_files)[: args.limit]
            what = f"{len(files)} JPEGs of {args.folder}/train"
        else:
            files = synthetic_jpegs(Path(tmp), args.images, args.width, args.height)
            what = f"{len(files)} synthetic {args.width}x{args.height} JPEGs (quality 90)"
        kib = np.mean([Path(f).stat().st_size for f in files]) / 1024
        print(f"images: {what}, mean {kib:.0f} KiB; resize {RESIZE_SIDE}, crop {CROP}, batch {args.batch}, "
              f"torch threads {torch.get_num_threads()}", flush=True)
        base = baseline_rate(files, args.repeat)
        print(f"baseline  torchvision Resize(256)+RandomCrop(224)+flip, 1 thread: {base:8.1f} images/s", flush=True)
        for n in (int(t) for t in args.threads.split(",")):
            rate = table_rate(files, Decoder.CPU, "cpu", n, args.batch, args.repeat)
            print(f"cpu x{n:<3} JpegImages.crops, Pillow in {n} thread(s):             {rate:8.1f} images/s "
                  f"({rate / base:.2f}x baseline)", flush=True)
        if torch.cuda.is_available():
            rate = table_rate(files, Decoder.CUDA, "cuda", 1, args.batch, args.repeat)
            print(f"cuda      JpegImages.crops, nvJPEG batched on {torch.cuda.get_device_name()}: {rate:8.1f} "
                  f"images/s ({rate / base:.2f}x baseline)", flush=True)
        else:
            print("cuda      (no CUDA device: nvJPEG not measured)", flush=True)
        if args.train_rate:
            rate = train_rate(args.device, args.members, args.batch, args.steps)
            print(f"consumer  ResNet-10 training, {args.members} network(s), batch {args.batch} on {args.device}: "
                  f"{rate:8.1f} images/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

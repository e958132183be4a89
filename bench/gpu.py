"""The GPU path against eager fp32, side by side in one run: ResNet50 scoring from JPEG files
and training steps, images per second.

Scoring, decoding and precision apart: PIL's reduced-scale decoding in threads, normalised on
the host, with an fp32 eager forward; the same with bf16 autocast and channels_last; the same
with the uint8 pixels sent to the GPU and normalised there (the worker's path on CUDA); and
batched nvJPEG `decode_jpeg` on the GPU, resized and cropped there, with bf16
and channels_last (the worker's `device_decode` option). Training: full fine-tuning steps
(forward, backward, Adam) on batches already on the GPU, eager fp32 against bf16 +
channels_last, and with `torch.compile`. ResNet50's ImageNet weights are not needed for
speed: random initialisation.

    python bench/gpu.py                                   # on a GPU machine, ~5 min
    python bench/gpu.py --device cpu --limit 64 --batch 16 --steps 2 --no-compile   # smoke test
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from realfake.config import TrainConfig
from realfake.data import (
    decode_on_device,
    load_for_eval,
    normalize_batch,
    normalize_chw,
    read_for_device,
)
from realfake.models import build_model
from realfake.samples import discover

REPO = Path(__file__).resolve().parent.parent


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def score_rate(paths, model, device, batch: int, decode: str, fast: bool, passes: int) -> float:
    """Images per second from files to P(fake) on the host. `decode`: "pil-host" (PIL, normalised
    on the host), "pil" (PIL, uint8 to the device, normalised there) or "device" (nvJPEG)."""
    pool = ThreadPoolExecutor(16)
    model = model.to(memory_format=torch.channels_last if fast else torch.contiguous_format)

    def one_pass() -> int:
        done = 0
        for start in range(0, len(paths), batch):
            chunk = paths[start:start + batch]
            if decode == "device":
                items = list(pool.map(lambda p: (p, read_for_device(p, 256, 224)), chunk))
                images = normalize_chw(torch.stack([im for im, _ in decode_on_device(items, device, 256, 224)]))
            else:
                pixels = list(pool.map(lambda p: load_for_eval(p, 256, 224), chunk))
                images = normalize_batch(pixels).to(device) if decode == "pil-host" else normalize_batch(pixels, device)
            if fast:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
                p = torch.softmax(model(images).float(), 1)[:, 1].cpu()
            done += len(p)
        return done

    one_pass()  # warm-up: cuDNN autotuning, the page cache
    synchronize(device)
    start, done = time.perf_counter(), sum(one_pass() for _ in range(passes))
    synchronize(device)
    return done / (time.perf_counter() - start)


def train_rate(device, batch: int, steps: int, mode: str) -> float:
    """Full fine-tuning steps per second times the batch, on batches already on the device."""
    model = build_model(TrainConfig(backbone="resnet50", weights="none")).to(device).train()
    images = torch.randn(batch, 3, 224, 224, device=device)
    targets = torch.randint(0, 2, (batch,), device=device)
    fast = mode != "fp32 eager"
    if fast:
        model, images = model.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if mode == "bf16 + compile" else model
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
            loss = torch.nn.functional.cross_entropy(forward(images).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up (and compilation)
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "real_and_fake_face")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--limit", type=int, default=0, help="score only this many files (0: all)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    paths = [args.data / s.path for s in discover(args.data)]
    paths = paths[: args.limit] if args.limit else paths
    print(f"device {name}, torch {torch.__version__}, {len(paths)} JPEG files from {args.data}, batch {args.batch}")

    model = build_model(TrainConfig(backbone="resnet50", weights="none")).to(device).eval()
    scoring = {"PIL decode + fp32 eager": ("pil-host", False), "PIL decode + bf16 + channels_last": ("pil-host", True),
               "the same, normalised on the device": ("pil", True), "GPU decode + bf16 + channels_last": ("device", True)}
    rates = {label: score_rate(paths, model, device, args.batch, decode, fast, args.passes)
             for label, (decode, fast) in scoring.items()}
    for label, rate in rates.items():
        print(f"scoring, {label:34s} {rate:8.0f} img/s   ({rate / rates['PIL decode + fp32 eager']:.2f}x; goal >= 5000 img/s)")

    modes = ["fp32 eager", "bf16 + channels_last"] + ([] if args.no_compile else ["bf16 + compile"])
    rates = {mode: train_rate(device, args.batch // 2, args.steps, mode) for mode in modes}
    for mode, rate in rates.items():
        print(f"training, {mode:22s} {rate:8.0f} img/s   ({rate / rates['fp32 eager']:.2f}x; goal >= 2000 img/s)")


if __name__ == "__main__":
    main()

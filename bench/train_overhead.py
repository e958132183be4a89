"""Epoch time of realfake's training loop against a plain PyTorch loop, same model and data.

realfake's epoch includes everything it does for a user: metrics on train/val/test,
upserted rows in SQL, cancel-flag polls, `last` and `best` checkpoints; it runs once
decoding every JPEG each epoch like the plain loop, once with the decoded-image cache.
The plain loop trains and runs val/test forward passes, nothing else. The two alternate, so drift of a
shared machine hits both alike; the first epoch of each (warm-up) is not counted.

    python bench/train_overhead.py                        # synthetic 128 px faces
    python bench/train_overhead.py --data ../shared/data/real_and_fake_face --per-class 0
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from realfake.config import SplitConfig, TrainConfig
from realfake.data import FaceDataset, eval_transform, train_transform
from realfake.models import build_model, imagenet_weights_cached
from realfake.runs import SqlHooks, create_run, train_run
from realfake.samples import discover, stratified_split
from realfake.store import make_engine, migrate, session_factory, session_scope
from realfake.synthetic import make_synthetic
from realfake.train import Runtime, _loader


def plain_epochs(config: TrainConfig, root: Path, parts) -> list[float]:
    runtime = Runtime.for_config(config)
    torch.manual_seed(config.seed)
    model = build_model(config).to(runtime.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    criterion = nn.CrossEntropyLoss()
    train = FaceDataset(root, parts["train"], train_transform(config))
    evals = [FaceDataset(root, parts[s], eval_transform(config)) for s in ("val", "test")]
    times = []
    for epoch in range(config.epochs):
        start = time.perf_counter()
        model.train()
        for images, labels, _ in _loader(train, config, True, epoch, runtime):
            loss = criterion(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.inference_mode():
            for dataset in evals:
                for images, labels, _ in _loader(dataset, config, False, 0, runtime):
                    model(images)
        times.append(time.perf_counter() - start)
    return times[1:]


class Timing(SqlHooks):
    def __init__(self, factory, run_id):
        super().__init__(factory, run_id)
        self.stamps: list[float] = []

    def on_epoch_end(self, epoch, metrics, best):
        keep_going = super().on_epoch_end(epoch, metrics, best)
        self.stamps.append(time.perf_counter())
        return keep_going


def realfake_epochs(config: TrainConfig, root: Path, split: SplitConfig, workdir: Path) -> list[float]:
    """Each run builds its decoded cache (if on) before its first epoch, which is not counted."""
    engine = make_engine(f"sqlite:///{workdir / 'bench.db'}")
    migrate(engine)
    factory = session_factory(engine)
    with session_scope(factory) as session:
        run_id = create_run(session, config, root, split).id
    hooks = Timing(factory, run_id)
    train_run(factory, run_id, workdir / "artifacts", hooks=hooks)
    engine.dispose()
    # consecutive epoch ends: each interval holds one epoch and one checkpoint write
    return [b - a for a, b in zip(hooks.stamps, hooks.stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="dataset folder (default: generated synthetic faces)")
    parser.add_argument("--per-class", type=int, default=150, help="synthetic images per class")
    parser.add_argument("--size", type=int, default=128, help="synthetic image side")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = args.data or make_synthetic(tmp / "data", args.per_class, args.size)
        weights = "imagenet" if imagenet_weights_cached(args.backbone) else "none"
        config = TrainConfig(
            backbone=args.backbone, weights=weights, resize=int(args.image_size * 256 / 224),
            image_size=args.image_size, epochs=args.epochs, batch_size=32, lr=1e-4,
        )
        split = SplitConfig(val=0.1, test=0.2, seed=0)
        parts = stratified_split(discover(root), split)
        uncached = config.model_copy(update={"decode_cache": False})
        plain, ours, cached = [], [], []
        for repeat in range(args.repeats):
            plain += plain_epochs(config, root, parts)
            ours += realfake_epochs(uncached, root, split, tmp / f"run{repeat}")
            cached += realfake_epochs(config, root, split, tmp / f"cached{repeat}")
        p, r, c = statistics.median(plain), statistics.median(ours), statistics.median(cached)
        print(f"data: {root} ({sum(len(v) for v in parts.values())} images), {args.backbone} {weights}, "
              f"{args.image_size} px, batch 32, torch threads {torch.get_num_threads()}")
        for name, times in (("plain PyTorch loop", plain), ("realfake, no cache", ours), ("realfake, decoded cache", cached)):
            print(f"{name:24} median {statistics.median(times):6.2f} s/epoch  over {len(times)} epochs "
                  f"{[round(t, 2) for t in times]}")
        print(f"ratio realfake (no cache) / plain: {r / p:.3f}")
        print(f"ratio realfake (cache) / plain:    {c / p:.3f}")


if __name__ == "__main__":
    main()

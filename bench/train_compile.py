"""A recipe's training epochs eager and through torch.compile (`compile: true`), one after another.

Each variant runs realfake's own `fit` on the recipe's data and split for a few epochs, with
the decoded-image cache built beforehand (so no variant pays for it). The compiled variant
runs twice: first with an empty inductor cache (what a machine's first compiled run pays),
then again with the cache the first one left (what later runs of a sweep on that machine pay).
The first epoch holds the compiling; the later ones show the steady state.

    python bench/train_compile.py --recipe examples/best.yaml --epochs 2
    python bench/train_compile.py --recipe examples/best.yaml --epochs 3 --variants eager "compiled, cold cache"
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from realfake.config import TrainConfig
from realfake.data import DecodedCache
from realfake.hooks import TrainHooks
from realfake.samples import discover, stratified_split
from realfake.sweeps import expand, load_spec
from realfake.train import Runtime, fit

VARIANTS = ("eager", "compiled, cold cache", "compiled, warm cache")


class EpochStamps(TrainHooks):
    def __init__(self) -> None:
        self.stamps = [time.perf_counter()]

    def on_epoch_end(self, epoch, metrics, best) -> bool:
        self.stamps.append(time.perf_counter())
        print(f"    epoch {epoch}: {self.stamps[-1] - self.stamps[-2]:7.1f} s, "
              f"val ROC-AUC {metrics['val'].roc_auc:.4f}", flush=True)
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=Path("examples/best.yaml"),
                        help="sweep file whose first run's config is timed (its data path, relative to the repository root)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args()
    variants = args.variants
    if "compiled, warm cache" in variants and ("compiled, cold cache" not in variants or
                                               variants.index("compiled, cold cache") > variants.index("compiled, warm cache")):
        parser.error("'compiled, warm cache' needs 'compiled, cold cache' before it: that run fills the cache")

    spec = load_spec(args.recipe)
    config = TrainConfig.model_validate(expand(spec)[0] | {"epochs": args.epochs})
    root = Path(spec.data)
    parts = stratified_split(discover(root), spec.split)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor")  # starts empty: the cold run
        for name in ("train", "val", "test"):
            DecodedCache(tmp / "cache", root, parts[name], config).ensure()
        runtime = Runtime.for_config(config)
        print(f"{args.recipe}: {config.backbone}, {config.image_size} px crops, batch {config.batch_size}, "
              f"{len(parts['train'])} training faces, {runtime.device}, channels-last {runtime.channels_last}, "
              f"autocast {runtime.autocast_dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"CPU capability {torch.backends.cpu.get_cpu_capability()}", flush=True)
        epochs = {}
        for variant in variants:
            print(f"  {variant}", flush=True)
            hooks = EpochStamps()
            fit(config.model_copy(update={"compile": variant != "eager"}), root, parts, tmp / variant, hooks,
                cache_dir=tmp / "cache")
            epochs[variant] = [b - a for a, b in zip(hooks.stamps, hooks.stamps[1:])]

    base = variants[0]
    steady_base = statistics.median(epochs[base][1:] or epochs[base])
    print(f"{'variant':22} {'epoch 1':>9} {'later epochs (median)':>22} {'total':>9}  speed-up over {base}")
    for variant, times in epochs.items():
        steady = statistics.median(times[1:] or times)
        print(f"{variant:22} {times[0]:8.1f}s {steady:21.1f}s {sum(times):8.1f}s  "
              f"later epochs {steady_base / steady:.2f}x, total {sum(epochs[base]) / sum(times):.2f}x")


if __name__ == "__main__":
    main()

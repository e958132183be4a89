"""Evaluating an ensemble from the JPEG files against reading the decoded images that training
left in the artifacts (`evaluate_runs(decoded_dir=...)`), side by side in one run.

K checkpoints of examples/best.yaml's model (random head, no training: speed only) each judge
the same faces twice, plain and mirrored (`--tta`), as `evaluate` and `bench/accuracy.py` do:
once decoding every file each time, once with a decoded-image folder that does not exist yet
(it is filled on first use, as evaluation on a machine that did not train would), and once
with that folder filled (what evaluation finds after training). Faces per second over all
K x 2 passes, and the largest difference in P(fake) between the file and folder paths.

    python bench/eval_speed.py --runs 2 --limit 96             # 2 CPU cores, about 2 min
    python bench/eval_speed.py --runs 4 --limit 400            # on a GPU machine
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from realfake.config import TrainConfig
from realfake.evaluation import predict
from realfake.inference import ModelCache
from realfake.models import build_model
from realfake.samples import discover

REPO = Path(__file__).resolve().parent.parent


def judge_all(checkpoints: list[Path], root: Path, samples, cache: ModelCache, decoded_dir: Path | None):
    """Seconds for every checkpoint to judge every face, plain and mirrored; the P(fake)s."""
    start = time.perf_counter()
    scores = [predict(path, root, samples, tta=tta, cache=cache, decoded_dir=decoded_dir)
              for path in checkpoints for tta in (False, True)]
    return time.perf_counter() - start, np.stack(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "real_and_fake_face")
    parser.add_argument("--recipe", type=Path, default=REPO / "examples" / "best.yaml")
    parser.add_argument("--runs", type=int, default=2, help="checkpoints in the ensemble")
    parser.add_argument("--limit", type=int, default=96, help="faces judged (0: all)")
    args = parser.parse_args()

    config = TrainConfig.model_validate(yaml.safe_load(args.recipe.read_text())["base"] | {"weights": "none"})
    samples = sorted(discover(args.data), key=lambda s: s.path)
    samples = samples[::max(1, len(samples) // args.limit)][:args.limit] if args.limit else samples
    cache = ModelCache(capacity=args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = []
        for k in range(args.runs):
            torch.manual_seed(k)
            path = Path(tmp) / f"run{k}" / "best.pt"
            path.parent.mkdir()
            torch.save({"model": build_model(config).state_dict(), "epoch": 1,
                        "config": config.model_dump(mode="json")}, path)
            checkpoints.append(path)
        judge_all(checkpoints[:1], args.data, samples[:8], cache, None)  # models loaded, kernels warm
        _, _, runtime = cache.get(checkpoints[0])
        print(f"{len(samples)} faces from {args.data}, {args.runs} runs x (plain, mirrored), "
              f"{config.image_size}-px crops of {config.resize} px, {runtime.device}, torch {torch.__version__}")
        files_s, from_files = judge_all(checkpoints, args.data, samples, cache, None)
        cold_s, from_cold = judge_all(checkpoints, args.data, samples, cache, Path(tmp) / "cache")
        warm_s, from_warm = judge_all(checkpoints, args.data, samples, cache, Path(tmp) / "cache")
    faces = len(samples) * args.runs * 2
    for label, seconds in (("decoding the files", files_s), ("decoded folder, filled on first use", cold_s),
                           ("decoded folder, left by training", warm_s)):
        print(f"{label:38s} {faces / seconds:8.1f} faces/s  ({files_s / seconds:.2f}x)")
    print(f"largest |P(fake) difference| against the files: "
          f"{max(np.abs(from_cold - from_files).max(), np.abs(from_warm - from_files).max()):.2e}")


if __name__ == "__main__":
    main()

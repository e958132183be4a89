"""How far more data, or more averaged runs, could take a recipe: curves fitted to bench figures.

Learning curve: each KEY=FACES names a cross-validated recipe's entry in accuracy.json
(`bench/accuracy.py` with `split: {folds: K, train_fraction: F}`) and the training faces each
of its runs had. For every entry: the runs' mean validation ROC-AUC (each run's best.pt on its
own fold), their mean test ROC-AUC at cut-off 0.5, and the folds averaged with flip TTA on
test. Each figure is fitted by least squares to a + b log2(faces): b is the gain per doubling
of the data, and (goal - the largest entry's figure) / b the doublings the line needs to reach
the goal. Curves flatten as data grows, so that count is a lower bound, not an estimate.

Ensemble curve (`--members KEY`, a `bench/ensembles.py` entry): test ROC-AUC of n averaged
runs fitted to a - c/n, whose a is what averaging ever more runs of the recipe tends to.

    python bench/learning_curve.py best-cv4-frac25=246 best-cv4-frac50=491 \\
        best-cv4+crop_grid8-nojpeg=980 --members "best-cv8-grid8 fold subsets"
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

ENSEMBLE = "ensemble of the folds, val + TTA"
FIGURES = ("val ROC-AUC, each run", "test ROC-AUC, each run", "test ROC-AUC, folds averaged + TTA")


def figures(entry: dict) -> tuple[float, float, float]:
    runs = entry["cut-off 0.5"]
    return (statistics.mean(r["val"]["roc_auc"] for r in runs),
            statistics.mean(r["test"]["roc_auc"] for r in runs),
            entry[ENSEMBLE][0]["test"]["roc_auc"])


def learning_curve(results: dict, points: list[tuple[str, int]], goal: float) -> None:
    faces = np.array([n for _, n in points], dtype=float)
    rows = np.array([figures(results[key]) for key, _ in points])
    print("| entry | training faces a run | " + " | ".join(FIGURES) + " |\n|---|---|---|---|---|")
    for (key, n), row in zip(points, rows):
        print(f"| {key} | {n} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    print(f"\n| figure | gain per doubling | fitted at {int(faces[-1])} | doublings to {goal} from "
          f"{int(faces[-1])} | largest residual |\n|---|---|---|---|---|")
    for name, ys in zip(FIGURES, rows.T):
        b, a = np.polyfit(np.log2(faces), ys, 1)
        fitted = a + b * np.log2(faces)
        doublings = (goal - ys[-1]) / b if b > 0 else float("inf")
        print(f"| {name} | {b:+.4f} | {fitted[-1]:.3f} | {doublings:.1f} (x{2 ** doublings:.1f} the faces) | "
              f"{np.abs(fitted - ys).max():.4f} |")


def ensemble_curve(entry: dict) -> None:
    by_members = entry["by_members"]
    n = np.array([float(k) for k in by_members])
    ys = np.array([v["test_roc_auc"]["mean"] for v in by_members.values()])
    (a, c), *_ = np.linalg.lstsq(np.c_[np.ones_like(n), -1 / n], ys, rcond=None)
    fitted = a - c / n
    print(f"\nn runs averaged: test ROC-AUC {', '.join(f'{int(k)}: {y:.3f}' for k, y in zip(n, ys))}; "
          f"fitted {a:.3f} - {c:.3f}/n (largest residual {np.abs(fitted - ys).max():.4f}): "
          f"averaging ever more runs tends to {a:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("points", nargs="*", help="KEY=FACES: an accuracy.json entry and its training faces a run")
    parser.add_argument("--json", type=Path, action="append",
                        help="an accuracy.json file (bench/accuracy.json unless given); again for more, later ones "
                             "overriding earlier keys")
    parser.add_argument("--goal", type=float, default=0.92)
    parser.add_argument("--members", help="a bench/ensembles.py entry to fit the ensemble curve to")
    args = parser.parse_args()
    results = {}
    for path in args.json or [Path(__file__).with_name("accuracy.json")]:
        results |= json.loads(path.read_text())
    points = sorted(((key, int(n)) for key, _, n in (p.rpartition("=") for p in args.points)), key=lambda p: p[1])
    if len({n for _, n in points}) >= 2:
        learning_curve(results, points, args.goal)
    elif points:
        parser.error("a learning curve needs KEY=FACES points at two or more numbers of faces")
    if args.members:
        ensemble_curve(results[args.members])


if __name__ == "__main__":
    main()

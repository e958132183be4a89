"""Does validation rank the recipes as test does? Read from `bench/accuracy.json`.

Every recipe measured there shares one split: 162 validation faces chose each run's best
epoch and every adoption rule; 326 test faces were read only afterwards. This prints each
recipe's mean validation and test ROC-AUC (single runs, cut-off 0.5), the rank correlation
between the two over all recipes and over those near the top, and the standard error of
one ROC-AUC on sets of these sizes (Hanley & McNeil, 1982), against which to read them.

    python bench/val_vs_test.py [--near 0.81]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from scipy.stats import spearmanr

from realfake.samples import discover

REPO = Path(__file__).resolve().parent.parent


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc)
    return math.sqrt(variance / (positives * negatives))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "accuracy.json")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "real_and_fake_face")
    parser.add_argument("--near", type=float, default=0.81, help="also correlate the recipes with mean validation at least this")
    args = parser.parse_args()

    recipes, cross_validated = [], []
    for name, evaluations in json.loads(args.results.read_text()).items():
        if not all(isinstance(listed, list) for listed in evaluations.values()):
            continue  # not one recipe's evaluations: a summary of bench/ensembles.py
        runs = [e for e in evaluations.get("cut-off 0.5", []) if e.get("val")]
        if any(e.get("out_of_fold") for listed in evaluations.values() for e in listed):
            cross_validated.append(name)  # its runs validated on folds: other faces than the 162
        elif runs:
            recipes.append((name, len(runs), statistics.fmean(e["val"]["roc_auc"] for e in runs),
                            statistics.fmean(e["test"]["roc_auc"] for e in runs), runs[0]))
    recipes.sort(key=lambda r: -r[2])
    print("| recipe | runs | val ROC-AUC | test ROC-AUC |\n|---|---|---|---|")
    for name, count, val, test, _ in recipes:
        print(f"| {name} | {count} | {val:.3f} | {test:.3f} |")
    if cross_validated:
        print(f"left out, validated on folds of their own: {', '.join(cross_validated)}")
    near = [r for r in recipes if r[2] >= args.near]
    for label, group in ((f"all {len(recipes)} recipes", recipes), (f"the {len(near)} with validation >= {args.near}", near)):
        rho, p = spearmanr([r[2] for r in group], [r[3] for r in group])
        print(f"{label}: Spearman {rho:.3f} (p {p:.2f}); validation {group[-1][2]:.3f}-{group[0][2]:.3f}, "
              f"test {min(r[3] for r in group):.3f}-{max(r[3] for r in group):.3f}")
    first = recipes[0][4]
    sizes = {f"{part} faces": (first[part]["n"], first[part]["tp"] + first[part]["fn"]) for part in ("val", "test")}
    if args.data.is_dir():  # cross-validation's out-of-fold validation: every face outside test
        faces, test = discover(args.data), first["test"]
        sizes["faces outside test"] = (len(faces) - test["n"], sum(s.label for s in faces) - test["tp"] - test["fn"])
    for label, (n, positives) in sizes.items():
        print(f"standard error of one ROC-AUC of 0.83 on the {n} {label} ({positives} fake): "
              f"{auc_standard_error(0.83, positives, n - positives):.3f}")


if __name__ == "__main__":
    main()

"""Several ensembles of runs already trained, judged side by side on their held-out faces.

Each ensemble is a set of run ids of one home (`REALFAKE_HOME`), sharing a test split; each
run is predicted once for all the sets it is in, then every set is judged as `evaluate`
judges it (`realfake.evaluation.evaluate_runs`: the mean P(fake), the cut-off chosen on
validation, flip TTA unless `--no-tta`). For comparisons that `bench/accuracy.py` does not
make, such as pairs of runs from two recipes against pairs from one. With `--subsets K ...`
every K-run subset of each set is judged too, and the figures are summarised by the number of
members: how much each further run (a seed, a fold) adds.

    python bench/ensembles.py --home H 3,4 3,2 4,1 [--out O.json]
    python bench/ensembles.py --home H 1,2,3,4,5,6,7,8 --subsets 1 2 4
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

from accuracy import spread  # bench/, the script's own folder

from realfake.config import Settings, decoded_cache_dir
from realfake.evaluation import evaluate_runs
from realfake.inference import ModelCache
from realfake.store import make_engine, session_factory, session_scope


def run_set(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not run ids joined by commas, such as 3,4") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ensembles", nargs="+", type=run_set, help="run ids joined by commas, one set per argument")
    parser.add_argument("--home", type=Path, required=True, help="the REALFAKE_HOME the runs trained in")
    parser.add_argument("--no-tta", dest="tta", action="store_false", help="judge the faces as they are, not also mirrored")
    parser.add_argument("--subsets", nargs="+", type=int, default=[], metavar="K",
                        help="also judge every K-run subset of each set, and summarise by K")
    parser.add_argument("--out", type=Path, help="every figure of every set, as JSON")
    args = parser.parse_args()
    ensembles = [list(subset) for runs in args.ensembles for k in sorted(set(args.subsets)) if k < len(runs)
                 for subset in itertools.combinations(runs, k)] + args.ensembles

    env = {k: v for k, v in os.environ.items() if not k.startswith("REALFAKE_")} | {"REALFAKE_HOME": str(args.home)}
    settings = Settings.from_env(env)
    factory = session_factory(make_engine(settings.database_url))
    cache, memo, results = ModelCache(capacity=2), {}, {}
    decoded = decoded_cache_dir(settings.artifacts)
    with session_scope(factory) as session:
        for runs in ensembles:
            label = ",".join(map(str, runs))
            results[label] = evaluate_runs(session, runs, tta=args.tta, cache=cache, memo=memo, decoded_dir=decoded)
            print(f"runs {label} judged", flush=True)

    groups = sorted({group for result in results.values() for group in result["test"]["groups"]})
    header = ["runs", "cut-off", "val ROC-AUC", "test acc", "test ROC-AUC", "test F1", "shortcut-free acc", *groups]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for label, result in results.items():
        test = result["test"]
        row = [label, f"{result['threshold']:.3f}", f"{result['val']['roc_auc']:.3f}", f"{test['accuracy']:.3f}",
               f"{test['roc_auc']:.3f}", f"{test['f1']:.3f}", f"{result['test_shortcut_free']['accuracy']:.3f}",
               *[f"{test['groups'][group]['accuracy']:.3f}" for group in groups]]
        print("| " + " | ".join(row) + " |")
    if args.subsets:
        print_by_size(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
        print(f"every figure: {args.out}")


def print_by_size(results: dict) -> None:
    """Mean ± standard deviation of the figures over the sets of each size."""
    by_size: dict[int, list[dict]] = {}
    for label, result in results.items():
        by_size.setdefault(len(label.split(",")), []).append(result)
    figures = {"val ROC-AUC": lambda r: r["val"]["roc_auc"], "test acc": lambda r: r["test"]["accuracy"],
               "test ROC-AUC": lambda r: r["test"]["roc_auc"], "shortcut-free acc": lambda r: r["test_shortcut_free"]["accuracy"]}
    print("\n| members | sets | " + " | ".join(figures) + " |\n|" + "---|" * (len(figures) + 2))
    for size, group in sorted(by_size.items()):
        cells = [spread([figure(result) for result in group]) for figure in figures.values()]
        print(f"| {size} | {len(group)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

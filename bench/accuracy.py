"""Held-out accuracy of the seed recipe against the recommended one, over several seeds.

Each recipe file (`examples/seed.yaml`, `examples/best.yaml`) becomes a sweep over the
training seed only; the split (and so the test faces) is the recipe's own and the same for
every seed. Runs train through the real path (`realfake-scheduler sweep --local`, metrics
in SQL, checkpoints), then `realfake.evaluation` scores each run's untouched test split:
at the 0.5 cut-off, with the cut-off chosen on validation, with horizontal-flip TTA, on
larger centre crops and on five crops of the training size, and the mean P(fake) of all
seeds (an ensemble). A recipe with `split: {folds: K}` trains each seed once per fold; its
ensembles are judged on validation out of fold (every face outside test), and with several
seeds each seed's K runs are also averaged on their own, the model one sweep of it gives. Sweeps already
finished in `--home` under the same name are reused, so the evaluation can be re-run
without training again. The evaluation reads the faces training decoded (the artifacts'
`cache`), judges the recipe's ensemble with TTA first and writes `--out` after every row, so
a bench stopped by a deadline keeps what it measured.

    make accuracy                                 # both recipes, seeds 0 1 2 (about 2 h on 2 CPU cores)
    python bench/accuracy.py                      # the same, where TORCH_HOME holds the ImageNet weights
    python bench/accuracy.py --recipes examples/best.yaml --seeds 0
    python bench/accuracy.py --recipes examples/best.yaml examples/best-20ep.yaml --quick-eval --ensemble-all
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml
from sqlalchemy import select

from realfake.config import Settings, SplitConfig, decoded_cache_dir
from realfake.evaluation import evaluate_runs
from realfake.inference import ModelCache
from realfake.store import (
    Run,
    RunStatus,
    Sweep,
    make_engine,
    migrate,
    session_factory,
    session_scope,
)

REPO = Path(__file__).resolve().parent.parent


def seeds_sweep(recipe: Path, seeds: list[int], out: Path, backbone: str | None) -> tuple[dict, Path]:
    spec = yaml.safe_load(recipe.read_text())
    name = f"{recipe.stem}-{len(seeds)}seeds"
    spec["name"], spec["parameters"] = name, {"seed": {"values": seeds}}
    spec["data"] = str((REPO / spec["data"]).resolve())  # recipes name their data from the repository root
    spec.pop("early_terminate", None)
    if backbone:  # ResNet50's weights are not to be had offline: the seed recipe on MobileNetV2
        spec["base"]["backbone"] = backbone
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return spec, path


def recipe_runs(factory, spec: dict) -> list[tuple[int, RunStatus, str | None]]:
    """(id, status, error) of each run of the latest sweep of this name and recipe, if any."""
    with session_scope(factory) as session:
        sweep = session.scalars(select(Sweep).where(Sweep.name == spec["name"]).order_by(Sweep.id.desc())).first()
        split = SplitConfig.model_validate(spec.get("split", {})).model_dump(mode="json")
        if sweep is None or (sweep.spec["base"], sweep.spec["data"], sweep.spec["split"]) != (spec["base"], spec["data"], split):
            return []
        runs = session.scalars(select(Run).where(Run.sweep_id == sweep.id).order_by(Run.id)).all()
        return [(run.id, run.status, run.error) for run in runs]


def finished_sweep(factory, spec: dict) -> list[int] | None:
    """The succeeded runs of an earlier sweep of this name and recipe, once every run has
    succeeded or was cancelled (a run cancelled on purpose, for time, is left out); None while
    any is unfinished or if one failed."""
    runs = recipe_runs(factory, spec)
    if any(status not in (RunStatus.SUCCEEDED, RunStatus.CANCELLED) for _, status, _ in runs):
        return None
    succeeded = [run_id for run_id, status, _ in runs if status is RunStatus.SUCCEEDED]
    return succeeded or None


def failed_runs(factory, spec: dict) -> str:
    """One line per run of the latest sweep of this recipe that did not succeed, with its error."""
    return "\n".join(f"  run {run_id} {status.value}: {error or '-'}"
                     for run_id, status, error in recipe_runs(factory, spec) if status is not RunStatus.SUCCEEDED)


def runs_by_seed(session, run_ids: list[int]) -> list[list[int]]:
    """The runs grouped by their training seed, in seed order."""
    by_seed: dict[int, list[int]] = {}
    for run in session.scalars(select(Run).where(Run.id.in_(run_ids)).order_by(Run.id)):
        by_seed.setdefault(run.config["seed"], []).append(run.id)
    return [by_seed[seed] for seed in sorted(by_seed)]


def save(out: Path, results: dict) -> None:
    """Merge into the JSON file: recipes measured in an earlier run stay unless measured again.
    Written beside it and renamed, so a bench killed while writing leaves the old file whole."""
    earlier = json.loads(out.read_text()) if out.exists() else {}
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(earlier | results, indent=1))
    os.replace(tmp, out)


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", type=Path, default=[REPO / "examples/seed.yaml", REPO / "examples/best.yaml"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--home", type=Path, default=REPO / ".realfake" / "bench-accuracy")
    parser.add_argument("--seed-backbone", default="mobilenet_v2", help="backbone for seed.yaml (its ResNet50 needs weights)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "accuracy.json")
    parser.add_argument("--workers", type=int, default=1, help="local workers, each training one seed at a time (a GPU fits several)")
    parser.add_argument("--quick-eval", action="store_true",
                        help="only the cut-offs, flip TTA and the seeds' ensemble: no larger or five crops (a fifth of the inference)")
    parser.add_argument("--ensemble-all", action="store_true",
                        help="also average every run of every recipe (same split), with flip TTA")
    args = parser.parse_args()

    args.home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALFAKE_")} | {"REALFAKE_HOME": str(args.home)}
    settings = Settings.from_env(env)
    engine = make_engine(settings.database_url)
    migrate(engine)
    factory = session_factory(engine)

    results, cache, memo = {}, ModelCache(), {}  # each run predicted once per view
    decoded = decoded_cache_dir(settings.artifacts)  # the faces as training decoded them
    every_run: list[int] = []
    for recipe in args.recipes:
        backbone = args.seed_backbone if recipe.stem == "seed" else None
        spec, spec_path = seeds_sweep(recipe, args.seeds, args.home, backbone)
        name = spec["name"]
        run_ids = finished_sweep(factory, spec)
        folds = spec.get("split", {}).get("folds")
        # a cross-validated recipe trains each seed once per fold
        members = ("seeds x folds" if len(args.seeds) > 1 else "folds") if folds else "seeds"
        if run_ids is None:
            print(f"training {name}: {len(args.seeds) * (folds or 1)} runs", flush=True)
            subprocess.run([sys.executable, "-m", "scheduler.cli", "sweep", str(spec_path), "--local", "--workers", str(args.workers)],
                           env=env, cwd=REPO, check=True)
            run_ids = finished_sweep(factory, spec)
            if run_ids is None:
                sys.exit(f"{name}: not every run succeeded, nothing to evaluate\n" + failed_runs(factory, spec))
        else:
            print(f"reusing the finished sweep {name}: runs {run_ids}", flush=True)
        if left_out := failed_runs(factory, spec):  # cancelled ones: finished_sweep accepts no other
            print(f"{name}: only the {len(run_ids)} runs that succeeded are evaluated; left out:\n{left_out}", flush=True)
        variants = {
            "cut-off 0.5": dict(tta=False, threshold="0.5"),
            "cut-off on val": dict(tta=False, threshold="val"),
            "cut-off on val + TTA": dict(tta=True, threshold="val"),
        }
        base = spec["base"]
        # Trained on crops of a larger image: also judge larger centre crops, up to the whole face
        # (the backbones pool over any size). The square the crops were drawn from (else halfway,
        # rounded to 32 px) and the whole resized image.
        window = base.get("crop_within") or min(round((base["image_size"] + base["resize"]) / 64) * 32, base["resize"])
        larger = [] if base.get("eval_size") or args.quick_eval else sorted(
            {size for size in (window, base["resize"]) if size > base["image_size"]})
        for size in larger:
            variants[f"centre crop {size} px, cut-off on val"] = dict(tta=False, threshold="val", eval_size=size)
        if larger:  # the mean over five training-size crops of that square, each mirrored too
            variants["five crops + TTA, cut-off on val"] = dict(tta=True, threshold="val", crops=True)
        # (label, run sets, options) in the order of the table
        planned = [(label, [[run_id] for run_id in run_ids], options) for label, options in variants.items()]
        if folds and len(args.seeds) > 1:  # one sweep of the recipe gives one seed's K runs
            with session_scope(factory) as session:
                planned.append(("each seed's ensemble of its folds, val + TTA", runs_by_seed(session, run_ids), dict(tta=True)))
        planned.append((f"ensemble of the {members}, val + TTA", [run_ids], dict(tta=True)))
        for size in larger:
            planned.append((f"ensemble of the {members}, centre crop {size} px, val", [run_ids], dict(eval_size=size)))
        if larger:
            planned.append((f"ensemble of the {members}, five crops + TTA, val", [run_ids], dict(tta=True, crops=True)))
        # The ensemble with TTA first (the figure that decides a cross-validated recipe; its views
        # serve the single runs' TTA rows too), and the JSON written after each row: a bench
        # stopped by a deadline keeps what it measured.
        decisive = f"ensemble of the {members}, val + TTA"
        measured = {}
        with session_scope(factory) as session:
            for label, run_sets, options in sorted(planned, key=lambda plan: plan[0] != decisive):
                measured[label] = [evaluate_runs(session, runs, cache=cache, memo=memo, decoded_dir=decoded, **options)
                                   for runs in run_sets]
                per_recipe = {done: measured[done] for done, _, _ in planned if done in measured}
                save(args.out, results | {recipe.stem: per_recipe})
                print(f"{name}: {label} judged", flush=True)
        results[recipe.stem] = per_recipe
        every_run += run_ids

    if args.ensemble_all and len(args.recipes) > 1:
        with session_scope(factory) as session:
            results["+".join(recipe.stem for recipe in args.recipes)] = {
                "ensemble of every recipe's seeds, val + TTA": [
                    evaluate_runs(session, every_run, tta=True, cache=cache, memo=memo, decoded_dir=decoded)]}

    groups = sorted({g for r in results.values() for v in r.values() for e in v for g in e["test"]["groups"]})
    header = ["recipe", "evaluation", "n", "val ROC-AUC", "test acc", "test ROC-AUC", "test F1", "shortcut-free acc", *groups]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for recipe, per_recipe in results.items():
        for label, evaluations in per_recipe.items():
            def pick(*keys):
                values = []
                for e in evaluations:
                    value = e
                    for key in keys:
                        value = value[key]
                    values.append(value)
                return spread(values)
            row = [recipe, label, str(len(evaluations)), pick("val", "roc_auc"), pick("test", "accuracy"), pick("test", "roc_auc"),
                   pick("test", "f1"), pick("test_shortcut_free", "accuracy"),
                   *[pick("test", "groups", g, "accuracy") for g in groups]]
            print("| " + " | ".join(row) + " |")
    first = next(iter(results.values()))["cut-off 0.5"][0]["test"]
    print(f"\ntest split: {first['n']} faces; per group n = "
          + ", ".join(f"{g} {v['n']}" for g, v in first["groups"].items()))
    save(args.out, results)
    print(f"every figure, with 95% intervals per run: {args.out}")


if __name__ == "__main__":
    main()

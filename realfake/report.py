"""Views of runs for people and scripts: summaries, the leaderboard, the HTML report."""

from __future__ import annotations

import base64
import html
import io
import json
import statistics
from collections import defaultdict
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from realfake.errors import RunNotFound
from realfake.runs import epoch_rows
from realfake.samples import samples_from_json
from realfake.store import EpochMetric, Run, RunStatus, Sweep

EPOCH_FIELDS = ("loss", "accuracy", "precision", "recall", "f1", "roc_auc", "tp", "fp", "tn", "fn", "group_accuracy")


def run_summary(run: Run) -> dict:
    return {
        "id": run.id,
        "sweep_id": run.sweep_id,
        "fold": run.fold,
        "status": run.status.value,
        "backbone": run.config.get("backbone"),
        "epochs_done": run.epochs_done,
        "epochs": run.config.get("epochs"),
        "best_epoch": run.best_epoch,
        "best_metric": run.best_metric,
        "selection_metric": run.config.get("selection_metric"),
        "attempt": run.attempt,
        "worker": run.worker,
        "error": run.error,
    }


def _at_best(session: Session, runs: list[Run]) -> dict[int, dict[str, dict]]:
    """Each run's val and test metrics at its best epoch, in one query."""
    rows = session.execute(
        select(EpochMetric)
        .join(Run, (EpochMetric.run_id == Run.id) & (EpochMetric.epoch == Run.best_epoch))
        .where(Run.id.in_([run.id for run in runs]))
    ).scalars()
    found: dict[int, dict[str, dict]] = {}
    for row in rows:
        found.setdefault(row.run_id, {})[row.split] = {f: getattr(row, f) for f in ("accuracy", "f1", "roc_auc", "loss")}
    return found


def list_runs(session: Session, sweep_id: int | None = None) -> list[dict]:
    """Runs with val and test metrics at their best epoch, best first by their sweep's metric;
    of several sweeps, the newest sweep's runs first (each sweep ranks by its own metric and
    goal), runs of no sweep last."""
    query = select(Run).order_by(Run.id)
    if sweep_id is not None:
        query = query.where(Run.sweep_id == sweep_id)
    runs = list(session.scalars(query))
    sweep_ids = {run.sweep_id for run in runs} - {None}
    goals = dict(session.execute(select(Sweep.id, Sweep.metric_goal).where(Sweep.id.in_(sweep_ids))).all())
    at_best = _at_best(session, runs)
    rows = [run_summary(run) | {"val": at_best.get(run.id, {}).get("val"), "test": at_best.get(run.id, {}).get("test")}
            for run in runs]

    def rank(row: dict) -> tuple:
        sign = 1 if goals.get(row["sweep_id"]) == "minimize" else -1
        return -(row["sweep_id"] or 0), row["best_metric"] is None, sign * (row["best_metric"] or 0), row["id"]

    return sorted(rows, key=rank)


def fold_variants(session: Session, sweep: Sweep) -> list[dict]:
    """A cross-validated sweep's variants, best first by the mean of their folds' best metric
    (folds validate on different faces, so a variant is judged by all of them): each with its
    config, run ids by fold, the folds that succeeded, and the mean and spread over those."""
    by_variant: dict[str, list[Run]] = defaultdict(list)
    for run in session.scalars(select(Run).where(Run.sweep_id == sweep.id).order_by(Run.fold, Run.id)):
        by_variant[json.dumps(run.config, sort_keys=True)].append(run)
    variants = []
    for runs in by_variant.values():
        done = [run.best_metric for run in runs if run.status is RunStatus.SUCCEEDED and run.best_metric is not None]
        variants.append({
            "config": runs[0].config,
            "run_ids": [run.id for run in runs],
            "folds_succeeded": len(done),
            "mean": statistics.fmean(done) if done else None,
            "stdev": statistics.stdev(done) if len(done) > 1 else None,
        })
    sign = -1 if sweep.metric_goal == "maximize" else 1
    return sorted(variants, key=lambda v: (v["mean"] is None, sign * (v["mean"] or 0), v["run_ids"][0]))


_ELSEWHERE = " (`runs` lists the others: name a sweep with --sweep ID, or runs by their ids)"


def best_runs(session: Session, sweep_id: int, count: int) -> list[int]:
    """The sweep's `count` best succeeded runs, best first by its metric. In a cross-validated
    sweep, the runs of its `count` best variants by `fold_variants`, counting only variants
    whose every fold succeeded."""
    sweep = session.get(Sweep, sweep_id)
    folds = sweep.spec.get("split", {}).get("folds")
    if not folds:
        rows = [r["id"] for r in list_runs(session, sweep_id) if r["status"] == "succeeded" and r["best_metric"] is not None]
        if len(rows) < count:
            raise LookupError(f"sweep {sweep_id} has {len(rows)} succeeded run{'' if len(rows) == 1 else 's'}, fewer than "
                              f"{count}{_ELSEWHERE}")
        return rows[:count]
    complete = [v for v in fold_variants(session, sweep) if v["folds_succeeded"] == folds]
    if len(complete) < count:
        raise LookupError(f"sweep {sweep_id} has {len(complete)} variant{'' if len(complete) == 1 else 's'} with all "
                          f"{folds} folds succeeded, fewer than {count}{_ELSEWHERE}")
    return [run_id for variant in complete[:count] for run_id in variant["run_ids"]]


def run_detail(session: Session, run_id: int) -> dict:
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFound(f"run {run_id} does not exist")
    epochs = [
        {"epoch": row.epoch, "split": row.split, "n": row.n, "attempt": row.attempt,
         **{f: getattr(row, f) for f in EPOCH_FIELDS}}
        for row in epoch_rows(session, run_id)
    ]
    return {
        **run_summary(run),
        "config": run.config,
        "data_root": run.data_root,
        "split_sizes": {name: len(rows) for name, rows in run.split.items()},
        "checkpoint_dir": run.checkpoint_dir,
        "epochs_table": epochs,
    }


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def render_report(session: Session, run_id: int, out: Path) -> Path:
    """One self-contained HTML page: curves, confusion matrix, ROC, per-group accuracy, config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from sklearn.metrics import roc_curve

    from realfake.evaluation import predict
    from realfake.scoring import model_checkpoint

    detail = run_detail(session, run_id)
    run = session.get(Run, run_id)
    table = detail["epochs_table"]
    sections = [f"<h1>realfake run {run_id}</h1>",
                f"<p>status <b>{detail['status']}</b>, {detail['epochs_done']}/{detail['epochs']} epochs, "
                f"best epoch {detail['best_epoch']} ({detail['selection_metric']} on val "
                f"{detail['best_metric'] if detail['best_metric'] is None else round(detail['best_metric'], 4)})</p>"]

    if table:
        figure, axes = plt.subplots(1, 2, figsize=(11, 4))
        for split in ("train", "val", "test"):
            rows = [r for r in table if r["split"] == split]
            for ax, field in zip(axes, ("accuracy", "loss")):
                ax.plot([r["epoch"] for r in rows], [r[field] for r in rows], marker="o", label=split)
                ax.set_xlabel("epoch")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_title(field)
                ax.legend()
        sections.append("<h2>Per epoch</h2>" + _png(figure))
        plt.close(figure)

    best = {r["split"]: r for r in table if r["epoch"] == detail["best_epoch"]}
    if "test" in best:
        t = best["test"]
        sections.append(
            f"<h2>Test split at the best epoch ({detail['best_epoch']})</h2>"
            f"<p>accuracy {t['accuracy']:.4f}, precision {t['precision']:.4f}, recall {t['recall']:.4f}, "
            f"F1 {t['f1']:.4f}, ROC-AUC {t['roc_auc'] if t['roc_auc'] is None else round(t['roc_auc'], 4)}</p>"
            "<table border=1 cellpadding=6><tr><th></th><th>predicted real</th><th>predicted fake</th></tr>"
            f"<tr><th>real</th><td>{t['tn']}</td><td>{t['fp']}</td></tr>"
            f"<tr><th>fake</th><td>{t['fn']}</td><td>{t['tp']}</td></tr></table>"
            "<h3>Accuracy per group</h3><table border=1 cellpadding=6>"
            + "".join(f"<tr><th>{html.escape(g)}</th><td>{a:.4f}</td></tr>" for g, a in t["group_accuracy"].items())
            + "</table>"
        )
        samples = samples_from_json(run.split)["test"]
        try:
            scores = predict(model_checkpoint(run), Path(run.data_root), samples).tolist()
        except Exception as error:  # a moved checkpoint or data folder: the rest still renders
            sections.append(f"<p>ROC curve unavailable: {html.escape(str(error))}</p>")
        else:
            fpr, tpr, _ = roc_curve([s.label for s in samples], scores)
            figure, ax = plt.subplots(figsize=(4.5, 4.5))
            ax.plot(fpr, tpr)
            ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
            ax.set_xlabel("false positive rate (reals called fake)")
            ax.set_ylabel("true positive rate (fakes caught)")
            ax.set_title("ROC, test split, best checkpoint")
            sections.append(_png(figure))
            plt.close(figure)

    if table:
        head = "".join(f"<th>{h}</th>" for h in ("epoch", "split", "loss", "accuracy", "f1", "roc_auc", "groups"))
        body = "".join(
            f"<tr><td>{r['epoch']}</td><td>{r['split']}</td>"
            + "".join(f"<td>{'' if r[k] is None else round(r[k], 4)}</td>" for k in ("loss", "accuracy", "f1", "roc_auc"))
            + f"<td>{html.escape(json.dumps({g: round(a, 3) for g, a in r['group_accuracy'].items()}))}</td></tr>"
            for r in table
        )
        sections.append(f"<h2>Metrics</h2><table border=1 cellpadding=4><tr>{head}</tr>{body}</table>")
    sections.append(f"<h2>Config</h2><pre>{html.escape(json.dumps(detail['config'], indent=2))}</pre>"
                    f"<p>data: {html.escape(detail['data_root'])}, split sizes {detail['split_sizes']}</p>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>realfake run "
        f"{run_id}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}</style>"
        "</head><body>" + "\n".join(sections) + "</body></html>"
    )
    return out

"""realfake-scheduler: each command is a few lines over realfake.

Errors a user can cause (a bad spec, a missing folder, an unknown run) become a message
and exit status 2 in `main`; Typer's own usage errors exit 2 as well.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError

from realfake.config import Settings, decoded_cache_dir, shown_url
from realfake.errors import USER_ERRORS as LIBRARY_ERRORS
from realfake.report import (
    best_runs,
    fold_variants,
    list_runs,
    render_report,
    run_detail,
)
from realfake.runs import create_sweep, request_cancel, retry_runs, sweep_data
from realfake.scoring import create_scoring_job, job_progress
from realfake.store import (
    Prediction,
    Run,
    RunStatus,
    ScoringJob,
    Sweep,
    make_engine,
    migrate,
    session_factory,
    session_scope,
)
from realfake.sweeps import SweepSpec, expand, load_spec, variant_label
from scheduler.local import LocalWorkers

app = typer.Typer(help="Train and serve real-vs-fake face classifiers.", no_args_is_help=True, add_completion=False)


def _console(stderr: bool = False) -> Console:
    # Into a pipe or a file Rich assumes 80 columns and cuts table cells short ("succ…"):
    # a log gets whole tables instead. COLUMNS, where set, still decides.
    piped = not (sys.stderr if stderr else sys.stdout).isatty() and "COLUMNS" not in os.environ
    # markup off: paths, file names and error messages are printed as they are ("faces[/old]"
    # would be a Rich closing tag); colour comes from styles, see _label
    return Console(stderr=stderr, soft_wrap=True, width=200 if piped else None, markup=False)


console = _console()
err = _console(stderr=True)


def _label(label: str, style: str, message: str) -> Text:
    """`label` in colour, then `message` exactly as it is."""
    return Text.assemble((label, style), " ", message)
USER_ERRORS = (*LIBRARY_ERRORS, ValidationError, FileNotFoundError, LookupError)
PROGRESS_COLUMNS = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
JSON = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
LOCAL = Annotated[bool, typer.Option("--local", help="start worker processes here for the duration")]
WORKERS = Annotated[int, typer.Option(min=1, help="worker processes with --local")]


def _settings() -> Settings:
    return Settings.from_env()


def _database(settings: Settings):
    engine = make_engine(settings.database_url)
    migrate(engine)
    return session_factory(engine)


class BrokerUnreachable(RuntimeError):
    pass


def _celery(settings: Settings):
    """The Celery app, after checking that the broker answers (before any row is written)."""
    from worker.celery import make_app  # Celery only where a command sends messages

    celery = make_app(settings)
    try:
        with celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=2, interval_start=0.2, interval_step=0.5)
    except Exception as error:
        where = shown_url(settings.broker_url)
        raise BrokerUnreachable(f"cannot reach the broker {where}: {str(error).rstrip('.')}. Nothing was written.") from None
    return celery


def _print_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def _check_writable(out: Path) -> None:
    """Refuse an --out file that cannot be written before any work starts, not after it."""
    if out.is_dir():
        raise typer.BadParameter(f"{out} is a folder; give a file name", param_hint="--out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise typer.BadParameter(f"cannot create the folder {out.parent}: {error.strerror}", param_hint="--out") from None
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise typer.BadParameter(f"{out} is not writable", param_hint="--out")


def _warn_without_workers(celery, queue: str) -> None:
    """Say so when nobody consumes the queue, instead of waiting silently."""
    try:
        replies = celery.control.inspect(timeout=1.5).active_queues() or {}
    except Exception as error:  # the broker itself is unreachable
        err.print(_label("warning:", "yellow", f"cannot ask the workers ({error})"))
        return
    if not any(q["name"] == queue for queues in replies.values() for q in queues):
        err.print(_label(
            "warning:", "yellow", f"no live worker consumes the '{queue}' queue: the work waits "
            f"in the queue until one starts: run `realfake-worker` (submitting it again with --local would do it twice)"
        ))


@contextlib.contextmanager
def _local_workers(count: int, settings: Settings, left: str):
    """`count` worker processes for the duration of the block. Ctrl-C stops them, and they
    hand their work back to the queue; `left` tells the user what waits there and how to go on."""
    try:
        with LocalWorkers(count, settings.home / "logs"):
            try:
                yield
            except KeyboardInterrupt:
                err.print("interrupted: stopping the local workers; what they were doing goes back to the queue "
                          "(Ctrl-C again kills them)")
                raise
    except KeyboardInterrupt:
        err.print(left)
        raise typer.Exit(130) from None


def _wait_for_runs(factory, run_ids: list[int]) -> None:
    """A progress bar per run, fed from SQL, until every run has finished."""
    with Progress(*PROGRESS_COLUMNS, console=err) as progress:
        tasks = {run_id: progress.add_task(f"run {run_id}", total=None) for run_id in run_ids}
        while True:
            with session_scope(factory) as session:
                runs = session.scalars(select(Run).where(Run.id.in_(run_ids))).all()
            for run in runs:
                progress.update(
                    tasks[run.id], completed=run.epochs_done, total=run.config["epochs"],
                    description=f"run {run.id} {run.status.value:9} epochs",
                )
            if all(run.status.is_finished() for run in runs):
                return
            time.sleep(1.0)


@app.command()
def sweep(
    spec_file: Annotated[Path, typer.Argument(metavar="SPEC.yaml", help="sweep file")],
    data: Annotated[Optional[Path], typer.Option(help="data folder (overrides the file's `data`)")] = None,
    local: LOCAL = False,
    workers: WORKERS = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and list the variants; write nothing")] = False,
    as_json: JSON = False,
) -> None:
    """Create a sweep and its runs, then enqueue them."""
    spec = load_spec(spec_file)
    settings = _settings()
    if dry_run:  # every check the sweep itself makes, the data's included; nothing written
        root, parts = sweep_data(spec, data, settings.data_roots)
        variants = expand(spec)
        sizes = {part: len(files) for part, files in next(iter(parts.values())).items()}
        if as_json:
            return _print_json({"name": spec.name, "data": str(root), "split": sizes, "variants": variants})
        for index, variant in enumerate(variants):
            console.print(f"variant {index}: {variant_label(spec, variant) or '(base)'}")
        console.print(f"data {root}: " + ", ".join(f"{part} {n}" for part, n in sizes.items()) + " images"
                      + (f" (fold 0 of {spec.split.folds})" if spec.split.folds else ""))
        if spec.split.folds:
            console.print(f"each variant trains {spec.split.folds} runs, one per fold")
        return
    factory = _database(settings)
    celery = _celery(settings)
    with session_scope(factory) as session:  # rows first ...
        created, runs = create_sweep(session, spec, data, settings.data_roots)
        sweep_id, run_ids = created.id, [r.id for r in runs]
    from worker.celery import enqueue_runs

    enqueue_runs(celery, run_ids)  # ... then the messages, which carry only ids
    err.print(f"sweep {sweep_id} '{spec.name}': runs {', '.join(map(str, run_ids))} enqueued")
    if not local:
        _warn_without_workers(celery, "train")
        if as_json:
            _print_json({"sweep_id": sweep_id, "run_ids": run_ids})
        return
    with _local_workers(workers, settings, f"sweep {sweep_id}'s unfinished runs wait in the queue: `realfake-worker` "
                        f"goes on with them from their last checkpoints; `realfake-scheduler cancel --sweep {sweep_id}` drops them"):
        _wait_for_runs(factory, run_ids)
    runs_cmd(sweep=sweep_id, as_json=as_json)
    _exit_if_failed(factory, run_ids)


def _exit_if_failed(factory, run_ids: list[int]) -> None:
    """Each failed run's reason, here rather than only a "failed" row; exit status 1 if one failed."""
    with session_scope(factory) as session:
        failed = session.execute(select(Run.id, Run.error).where(Run.id.in_(run_ids), Run.status == RunStatus.FAILED)).all()
    for run_id, error in failed:
        err.print(_label(f"run {run_id} failed:", "red", str(error)))
    if failed:
        raise typer.Exit(1)


@app.command("runs")
def runs_cmd(
    sweep: Annotated[Optional[int], typer.Option(help="only the runs of this sweep")] = None,
    as_json: JSON = False,
) -> None:
    """Leaderboard: runs sorted by their sweep's metric, best first."""
    with session_scope(_database(_settings())) as session:
        if sweep is not None and (found := session.get(Sweep, sweep)) is None:
            raise LookupError(f"sweep {sweep} does not exist")
        rows = list_runs(session, sweep)
        # the variants' table is for people; the recorded spec was checked when the sweep was made
        cross_validated = not as_json and sweep is not None and found.spec["split"].get("folds")
        if cross_validated:
            spec, variants = SweepSpec.model_validate(found.spec), fold_variants(session, found)
    if as_json:
        return _print_json(rows)
    metrics = {r["selection_metric"] for r in rows}
    metric = metrics.pop() if len(metrics) == 1 else "metric"  # sweeps on different metrics: named per row
    folds = any(r["fold"] is not None for r in rows)
    title = "runs, best first" if sweep is not None else "runs by sweep, newest first, each best first by its metric"
    table = Table("run", "sweep", *(["fold"] if folds else []), "status", "epochs", f"best val {metric}", "@epoch",
                  "val acc", "val auc", "test acc", "test auc", title=title)
    for r in rows:
        val, test = r["val"] or {}, r["test"] or {}
        best = _fmt(r["best_metric"]) + (f" {r['selection_metric']}" if metric == "metric" and r["best_metric"] is not None else "")
        table.add_row(
            str(r["id"]), _fmt(r["sweep_id"]), *([_fmt(r["fold"])] if folds else []), r["status"],
            f"{r['epochs_done']}/{r['epochs']}",
            best, _fmt(r["best_epoch"]),
            _fmt(val.get("accuracy")), _fmt(val.get("roc_auc")), _fmt(test.get("accuracy")), _fmt(test.get("roc_auc")),
        )
    console.print(table)
    if cross_validated:  # what `best` and `topN` rank by
        table = Table("variant", "runs", "folds succeeded", f"mean best val {metric}", "sd",
                      title=f"variants, best first by the mean over their {cross_validated} folds")
        for v in variants:
            table.add_row(variant_label(spec, v["config"]) or "(base)", ",".join(map(str, v["run_ids"])),
                          f"{v['folds_succeeded']}/{cross_validated}", _fmt(v["mean"]), _fmt(v["stdev"]))
        console.print(table)


@app.command()
def show(run: Annotated[int, typer.Argument(help="run id")], as_json: JSON = False) -> None:
    """A run's config and per-epoch metrics for train, val and test."""
    with session_scope(_database(_settings())) as session:
        detail = run_detail(session, run)
    if as_json:
        return _print_json(detail)
    fold = f" (fold {detail['fold']})" if detail["fold"] is not None else ""
    console.print(f"run {detail['id']}{fold}: {detail['status']}, {detail['epochs_done']}/{detail['epochs']} epochs, "
                  f"attempt {detail['attempt']}, best epoch {_fmt(detail['best_epoch'])} "
                  f"({detail['selection_metric']} {_fmt(detail['best_metric'])})")
    console.print("config: " + json.dumps(detail["config"]))
    if detail["error"]:
        console.print(_label("error:", "red", detail["error"]))
    table = Table("epoch", "split", "loss", "acc", "prec", "recall", "f1", "auc", "groups")
    for row in detail["epochs_table"]:
        groups = " ".join(f"{g} {a:.2f}" for g, a in row["group_accuracy"].items())
        table.add_row(
            str(row["epoch"]), row["split"],
            *(_fmt(row[k]) for k in ("loss", "accuracy", "precision", "recall", "f1", "roc_auc")), groups,
        )
    console.print(table)


@app.command()
def cancel(
    run: Annotated[Optional[int], typer.Argument(help="run id")] = None,
    sweep: Annotated[Optional[int], typer.Option(help="cancel every unfinished run of this sweep")] = None,
) -> None:
    """Cancel a run or a sweep: the flag is read between batches; rows are kept."""
    if (run is None) == (sweep is None):
        raise typer.BadParameter("give a RUN id or --sweep ID" + (", not both" if run is not None else ""))
    factory = _database(_settings())
    with session_scope(factory) as session:
        if sweep is not None and session.get(Sweep, sweep) is None:
            raise LookupError(f"sweep {sweep} does not exist")
        ids = [run] if run is not None else session.scalars(select(Run.id).where(Run.sweep_id == sweep)).all()
        before = dict(session.execute(select(Run.id, Run.status).where(Run.id.in_(ids))).all())
    for run_id in ids:
        status = request_cancel(factory, run_id)
        if before.get(run_id, status).is_finished():
            console.print(f"run {run_id}: already {status.value}, nothing to cancel")
        elif status is RunStatus.RUNNING:
            console.print(f"run {run_id}: cancel requested (it stops at its next batch)")
        else:
            console.print(f"run {run_id}: {status.value}")


@app.command()
def retry(
    runs: Annotated[list[int], typer.Argument(help="failed or cancelled run ids")],
    local: LOCAL = False,
    workers: WORKERS = 1,
) -> None:
    """Train failed or cancelled runs again from their last checkpoint (a worker lost too often, a fixed cause)."""
    settings = _settings()
    factory, celery = _database(settings), _celery(settings)
    retry_runs(factory, runs)  # every one checked and put back before any message is sent
    from worker.celery import enqueue_runs

    enqueue_runs(celery, runs)
    err.print(f"run{'s' if len(runs) > 1 else ''} {', '.join(map(str, runs))} enqueued again")
    if not local:
        return _warn_without_workers(celery, "train")
    with _local_workers(workers, settings, "the unfinished runs wait in the queue: `realfake-worker` goes on with "
                        "them from their last checkpoints; `realfake-scheduler cancel RUN` drops one"):
        _wait_for_runs(factory, runs)
    _exit_if_failed(factory, runs)


def _resolve_models(session, model: str, sweep_id: int | None) -> list[int]:
    """RUN, RUN,RUN,... (an ensemble), `best`, or `topN`: the sweep's N best succeeded runs
    (the latest sweep by default; in a cross-validated sweep, the folds of its N best variants)."""
    if all(part.strip().isdigit() for part in model.split(",")):
        return [int(part) for part in model.split(",")]
    if model == "best":
        return _best_runs(session, sweep_id, 1)
    if model.startswith("top") and model[3:].isdigit() and int(model[3:]) >= 1:
        return _best_runs(session, sweep_id, int(model[3:]))
    raise typer.BadParameter(f"{model!r} is none of: a run id, run ids joined by commas, 'best', 'topN'",
                             param_hint="--model")


def _best_runs(session, sweep_id: int | None, count: int) -> list[int]:
    """`best_runs` of the sweep (the latest sweep by default)."""
    if sweep_id is None:
        sweep_id = session.scalar(select(Sweep.id).order_by(Sweep.id.desc()).limit(1))
        if sweep_id is None:
            raise LookupError("there is no sweep yet")
    elif session.get(Sweep, sweep_id) is None:
        raise LookupError(f"sweep {sweep_id} does not exist")
    return best_runs(session, sweep_id, count)


@app.command()
def score(
    folder: Annotated[Path, typer.Argument(help="folder of images, searched recursively")],
    model: Annotated[str, typer.Option(help="run id; 'best' or 'topN' of the sweep; ids joined by commas (mean P(fake))")] = "best",
    sweep: Annotated[Optional[int], typer.Option(help="sweep for --model best|topN (default: the latest)")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    shard_size: Annotated[int, typer.Option(min=1, help="files per task")] = 256,
    out: Annotated[Optional[Path], typer.Option(help="CSV to write: path,p_fake,label,error")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="also score the mirror image and average (as evaluate --tta)")] = False,
    threshold: Annotated[float, typer.Option(min=0.0, max=1.0, help="P(fake) from which a file is labelled fake; evaluate reports the one chosen on validation")] = 0.5,
    local: LOCAL = False,
    workers: WORKERS = 1,
    as_json: JSON = False,
) -> None:
    """Score every image under FOLDER; exit status 1 if some files could not be scored."""
    if out is not None:
        _check_writable(out)
    settings = _settings()
    factory = _database(settings)
    celery = _celery(settings)
    with session_scope(factory) as session:
        run_ids = _resolve_models(session, model, sweep)
        job = create_scoring_job(session, run_ids, folder, batch_size, shard_size, roots=settings.data_roots,
                                 tta=tta, threshold=threshold)
        job_id, n_shards, n_files = job.id, job.n_shards, job.n_files
    from worker.celery import enqueue_shards

    enqueue_shards(celery, ((job_id, shard) for shard in range(n_shards)))
    models = f"run {run_ids[0]}" if len(run_ids) == 1 else f"the mean of runs {', '.join(map(str, run_ids))}"
    err.print(f"scoring job {job_id}: {n_files} files in {n_shards} shards with {models}"
              f"{' and TTA' if tta else ''}, fake from P(fake) >= {threshold:g}")
    if local:
        with _local_workers(workers, settings, f"job {job_id}'s unscored files wait in the queue: `realfake-worker` "
                            f"scores them; `realfake-scheduler job {job_id} --wait --out FILE` then writes the rows"):
            _wait_for_job(factory, job_id, n_files)
    else:
        _warn_without_workers(celery, "score")
        err.print(f"(leaving does not stop the job: `realfake-scheduler job {job_id} --wait --out FILE` fetches its rows later)")
        _wait_for_job(factory, job_id, n_files)
    _job_result(factory, job_id, out, as_json)


@app.command("job")
def job_cmd(
    job: Annotated[int, typer.Argument(help="scoring job id (score prints it)")],
    out: Annotated[Optional[Path], typer.Option(help="CSV file to write the rows to")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait until every file is scored (a progress bar), then write")] = False,
    as_json: JSON = False,
) -> None:
    """A scoring job's rows so far: how many files are done, and the CSV or JSON of them.
    Exit status 3 while files are still to be scored, else 1 if a file could not be scored."""
    if out is not None:
        _check_writable(out)
    settings = _settings()
    factory = _database(settings)
    if wait:
        with session_scope(factory) as session:
            done, total = job_progress(session, job)
        if done < total:
            _warn_without_workers(_celery(settings), "score")
            _wait_for_job(factory, job, total)
    _job_result(factory, job, out, as_json)


def _job_result(factory, job_id: int, out: Path | None, as_json: bool) -> None:
    """Summarise a scoring job's rows, write them to `out` as CSV; exit 3 if files are still to
    be scored, else 1 if a file could not be scored."""
    with session_scope(factory) as session:
        job = session.get(ScoringJob, job_id)
        if job is None:
            raise LookupError(f"scoring job {job_id} does not exist")
        rows = session.scalars(select(Prediction).where(Prediction.job_id == job_id).order_by(Prediction.path)).all()
        records = [{"path": os.path.join(job.folder, r.path), "p_fake": r.p_fake, "label": r.label, "error": r.error}
                   for r in rows]
        run_ids = job.run_ids or [job.run_id]
        n_files, tta, threshold = job.n_files, job.tta, job.threshold
    if out is not None:  # its folder made by _check_writable, before the work
        with out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "p_fake", "label", "error"])
            writer.writeheader()
            writer.writerows(records)
    failed = [r for r in records if r["error"] is not None]
    summary = {"job_id": job_id, "run_id": run_ids[0], "run_ids": run_ids, "files": n_files,
               "scored": len(records) - len(failed), "errors": len(failed), "fake": sum(r["label"] == "fake" for r in records),
               "pending": n_files - len(records), "tta": tta, "threshold": threshold, "out": str(out) if out else None}
    if as_json:
        _print_json(summary | {"predictions": records if out is None else None})
    else:
        pending = f", {summary['pending']} not scored yet" if summary["pending"] else ""
        console.print(f"job {job_id}: {summary['scored']} scored ({summary['fake']} fake), {len(failed)} errors{pending}"
                      + (f"; written to {out}" if out else "; --out FILE writes the rows as CSV"))
        for r in failed[:10]:
            err.print(f"  {r['path']}: {r['error']}")
        if len(failed) > 10:
            err.print(f"  and {len(failed) - 10} more")
    if summary["pending"]:  # a script must not take a part of the rows for all of them
        err.print(f"job {job_id} is not finished: `job {job_id} --wait` waits for the rest")
        raise typer.Exit(3)
    if failed:
        raise typer.Exit(1)


def _wait_for_job(factory, job_id: int, total: int) -> None:
    with Progress(*PROGRESS_COLUMNS, console=err) as progress:
        task = progress.add_task(f"job {job_id} files", total=total)
        while True:
            with session_scope(factory) as session:
                done, total = job_progress(session, job_id)
            progress.update(task, completed=done)
            if done >= total:
                return
            time.sleep(0.5)


@app.command()
def report(
    run: Annotated[int, typer.Argument(help="run id")],
    out: Annotated[Path, typer.Option(help="HTML file to write")] = Path("report.html"),
) -> None:
    """A self-contained HTML page: curves, confusion matrix, ROC, per-group accuracy, config."""
    _check_writable(out)
    with session_scope(_database(_settings())) as session:
        path = render_report(session, run, out)
    console.print(f"report of run {run} written to {path}")


@app.command()
def evaluate(
    runs: Annotated[Optional[list[int]], typer.Argument(help="run ids; several are averaged (an ensemble)")] = None,
    top: Annotated[Optional[int], typer.Option(min=1, help="the sweep's N best succeeded runs (cross-validated: N best variants' folds), averaged")] = None,
    sweep: Annotated[Optional[int], typer.Option(help="sweep for --top (default: the latest)")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="also score the mirror image and average")] = False,
    threshold: Annotated[str, typer.Option(help="'val': the cut-off with the best validation accuracy; or a number")] = "val",
    eval_size: Annotated[Optional[int], typer.Option(min=8, help="centre crop to evaluate on instead of each run's own (up to its resize)")] = None,
    crops: Annotated[bool, typer.Option("--crops", help="average five crops of the training size (corners and centre) of the square the training crops came from")] = False,
    as_json: JSON = False,
) -> None:
    """Test-split metrics with confidence intervals, per group and on the shortcut-free part."""
    if threshold != "val":
        try:
            if not 0.0 <= float(threshold) <= 1.0:
                raise ValueError
        except ValueError:
            raise typer.BadParameter(f"must be 'val' or a number in [0, 1], not {threshold!r}", param_hint="--threshold")
    if runs and (top is not None or sweep is not None):
        raise typer.BadParameter("give run ids, or --top N (and --sweep ID), not both", param_hint="RUNS")
    settings = _settings()
    with session_scope(_database(settings)) as session:
        if top is not None:
            runs = _best_runs(session, sweep, top)
        if not runs:
            raise typer.BadParameter("give run ids or --top N", param_hint="RUNS")
        # torch: only the commands that run models load it
        from realfake.evaluation import evaluate_runs

        with Progress(*PROGRESS_COLUMNS, console=err) as bar:
            tasks = []  # the bar appears once the runs are found, not before an error about them

            def judged(done: int, total: int) -> None:
                tasks or tasks.append(bar.add_task("faces judged", total=total))
                bar.update(tasks[0], completed=done, total=total)

            result = evaluate_runs(session, runs, tta=tta, threshold=threshold, eval_size=eval_size, crops=crops,
                                   decoded_dir=decoded_cache_dir(settings.artifacts), progress=judged)
    # evaluate_runs has found every run's checkpoint; scoring judges each run's own crop
    scorable = not (crops or eval_size)
    if as_json:
        return _print_json(result)
    title = f"run{'s' if len(runs) > 1 else ''} {', '.join(map(str, runs))}{' with TTA' if tta else ''}"
    if crops:
        title += f", five crops{f' of the {eval_size} px centre' if eval_size else ''}"
    elif eval_size:
        title += f", {eval_size} px centre crop"
    table = Table("part", "n", "accuracy (95% CI)", "ROC-AUC", "F1", title=f"{title}, P(fake) >= {result['threshold']:.3f}")
    validation = "validation, out of fold" if result["out_of_fold"] else "validation"
    parts = ((validation, "val"), ("all", "test"), ("shortcut-free", "test_shortcut_free"), ("all, cut-off 0.5", "test_at_0.5"))
    for name, key in parts:
        if (m := result[key]) is None:
            continue
        low, high = m["accuracy_ci95"]
        table.add_row(name, str(m["n"]), f"{m['accuracy']:.3f} ({low:.3f}-{high:.3f})", _fmt(m["roc_auc"]), _fmt(m["f1"]))
    for group, g in result["test"]["groups"].items():
        low, high = g["ci95"]
        table.add_row(f"group {group}", str(g["n"]), f"{g['accuracy']:.3f} ({low:.3f}-{high:.3f})", "", "")
    console.print(table)
    if scorable:  # the exact cut-off: it is a validation face's score, and rounding could move a file across
        err.print(f"to label new files the same way: realfake-scheduler score FOLDER --model "
                  f"{','.join(map(str, dict.fromkeys(runs)))}{' --tta' if tta else ''} --threshold {result['threshold']!r} --out preds.csv")


@app.command()
def audit(
    data: Annotated[Path, typer.Argument(help="dataset folder (real/ and fake/ sub-folders)")],
    as_json: JSON = False,
) -> None:
    """Metadata that separates the classes by itself, and the accuracy a trivial rule on it gets."""
    from realfake.audit import audit as run_audit

    result = run_audit(data)
    if as_json:
        return _print_json(result)
    console.print(f"{result['images']} images ({result['real']} real, {result['fake']} fake); "
                  f"always answering the larger class: {result['baseline_accuracy']:.3f}")
    if bad := result["unreadable"]:
        shown = "; ".join(f"{b['path']} ({b['error']})" for b in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        err.print(_label("warning:", "yellow", f"{len(bad)} unreadable file(s) left out of the audit: {shown}"))
    table = Table("feature", "distinct values", "rule accuracy (5-fold)", "above baseline", "most common values",
                  title="a rule on one piece of metadata alone")
    for f in result["features"]:
        common = ", ".join(f"{v}: {c['real']}r/{c['fake']}f" for v, c in list(f["values"].items())[:3])
        shortcut = Text(f"{f['rule_accuracy']:.3f}", style="red" if f["above_baseline"] > 0.05 else "")
        table.add_row(f["feature"], str(f["distinct"]), shortcut, f"{f['above_baseline']:+.3f}", common)
    console.print(table)
    free = result["shortcut_free"]
    console.print(f"shortcut-free subset ({free['rule']}): {free['real']} real + {free['fake']} fake")


@app.command()
def keys(as_json: JSON = False) -> None:
    """Every training key a sweep file's `base` and `parameters` take: values, default, meaning."""
    from realfake.config import training_keys

    rows = training_keys()
    if as_json:
        return _print_json(rows)
    table = Table("key", "values", "default", "what it does", title="training keys (TrainConfig)")
    for row in rows:
        table.add_row(row["key"], row["values"], json.dumps(row["default"]), row["description"])
    console.print(table)


@app.command("migrate")
def migrate_cmd() -> None:
    """Create or upgrade the database schema (the compose file's one-shot `migrate` service)."""
    settings = _settings()
    _database(settings)
    where = shown_url(settings.database_url)
    console.print(f"database schema is up to date: {where}")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option("--dir", help="folder for the demo (data, database, outputs)")] = Path(
        "realfake-demo"
    ),
    data: Annotated[Optional[Path], typer.Option(help="a real dataset instead of synthetic faces")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 3,
) -> None:
    """The whole loop on the embedded default: data, a sweep on local workers, scoring, a report."""
    from scheduler.demo import run_demo

    run_demo(workdir.absolute(), data, epochs, console)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()  # usage errors exit 2 inside, with Typer's message
    except USER_ERRORS as error:
        err.print(_label("error:", "red", str(error)))
        sys.exit(2)
    except (OperationalError, InterfaceError) as error:  # the database is down or unreachable
        where = shown_url(_settings().database_url)
        reason = str(error.orig or error).strip().splitlines()[0]
        err.print(_label("error:", "red", f"cannot reach the database {where}: {reason}. Nothing was written."))
        sys.exit(1)
    except BrokerUnreachable as error:
        err.print(_label("error:", "red", str(error)))
        sys.exit(1)
    except OSError as error:  # the machine's, not the arguments': a full disk, a file another process took
        err.print(_label("error:", "red", str(error)))
        sys.exit(1)


if __name__ == "__main__":
    main()

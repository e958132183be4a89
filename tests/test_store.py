import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError

from realfake.config import SplitConfig, TrainConfig
from realfake.metrics import compute_metrics
from realfake.pruning import asha_prune_hook
from realfake.report import best_runs, list_runs
from realfake.runs import create_run, create_sweep, epoch_rows, record_epoch
from realfake.samples import samples_from_json
from realfake.store import (
    Base,
    EpochMetric,
    Run,
    RunStatus,
    Sweep,
    make_engine,
    migrate,
    session_scope,
)
from realfake.store.session import alembic_config
from realfake.sweeps import SweepSpec, parse_spec


def test_migrations_match_the_models_and_rerun_harmlessly(db_url):
    engine = make_engine(db_url)
    migrate(engine)  # a second upgrade is a no-op
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []
    engine.dispose()


def test_the_leaderboard_of_several_sweeps_ranks_each_by_its_own_metric_newest_sweep_first(factory, synthetic_data):
    by_loss = parse_spec({"name": "loss", "metric": {"name": "loss", "goal": "minimize"},
                          "parameters": {"lr": {"values": [1e-3, 1e-4]}}})
    by_accuracy = parse_spec({"name": "acc", "parameters": {"lr": {"values": [1e-3, 1e-4]}}})
    with session_scope(factory) as session:
        loss_sweep, loss_runs = create_sweep(session, by_loss, synthetic_data)
        loss_sweep_id, loss_ids = loss_sweep.id, [run.id for run in loss_runs]
        accuracy_ids = [run.id for run in create_sweep(session, by_accuracy, synthetic_data)[1]]
        alone = create_run(session, TrainConfig(), synthetic_data, SplitConfig()).id
        for run_id, best in zip(loss_ids + accuracy_ids + [alone], (0.2, 0.6, 0.7, 0.9, 0.99)):
            session.get(Run, run_id).best_metric = best
    with session_scope(factory) as session:
        assert [r["id"] for r in list_runs(session)] == [accuracy_ids[1], accuracy_ids[0], *loss_ids, alone]
        assert [r["id"] for r in list_runs(session, loss_sweep_id)] == loss_ids  # the lower loss first


def test_run_records_its_config_and_split(factory, synthetic_data):
    config = TrainConfig(backbone="mobilenet_v2", epochs=2)
    with session_scope(factory) as session:
        run_id = create_run(session, config, synthetic_data, SplitConfig(val=0.1, test=0.2, seed=5)).id
    with session_scope(factory) as session:
        run = session.get(Run, run_id)
        assert run.status is RunStatus.WAITING and run.attempt == 0
        assert TrainConfig.model_validate(run.config) == config
        assert {k: len(v) for k, v in run.split.items()} == {"train": 140, "val": 20, "test": 40}


def test_a_cross_validated_sweep_trains_each_variant_once_per_fold(factory, synthetic_data):
    spec = parse_spec({"name": "cv", "split": {"test": 0.2, "folds": 4},
                       "parameters": {"lr": {"values": [1e-3, 1e-4]}}, "base": {"backbone": "mobilenet_v2"}})
    with session_scope(factory) as session:
        sweep, runs = create_sweep(session, spec, synthetic_data)
        sweep_id = sweep.id
    with session_scope(factory) as session:
        rows = list_runs(session, sweep_id)
        runs = {row["id"]: session.get(Run, row["id"]) for row in rows}
        by_variant = {(run.config["lr"], run.fold): samples_from_json(run.split) for run in runs.values()}
    assert sorted(by_variant) == [(lr, fold) for lr in (1e-4, 1e-3) for fold in range(4)]
    assert sorted(row["fold"] for row in rows) == [0, 0, 1, 1, 2, 2, 3, 3]
    for fold in range(4):  # both variants see the same folds
        assert by_variant[1e-3, fold] == by_variant[1e-4, fold]
    vals = [set(by_variant[1e-3, fold]["val"]) for fold in range(4)]
    assert sum(map(len, vals)) == len(set.union(*vals)) == 160  # the 200 faces less the 40 of test
    assert all(len(by_variant[1e-3, fold]["test"]) == 40 for fold in range(4))
    with session_scope(factory) as session:  # the recorded spec reads back as it was
        assert SweepSpec.model_validate(session.get(Sweep, sweep_id).spec) == spec.model_copy(update={"data": str(synthetic_data)})


def test_the_best_of_a_cross_validated_sweep_is_a_variant_s_folds_by_their_mean(factory, synthetic_data):
    spec = parse_spec({"name": "cv-best", "split": {"test": 0.2, "folds": 2},
                       "parameters": {"lr": {"values": [1e-3, 1e-4]}}, "base": {"epochs": 4}})
    with session_scope(factory) as session:
        sweep, runs = create_sweep(session, spec, synthetic_data)
        sweep_id, ids = sweep.id, {(run.config["lr"], run.fold): run.id for run in runs}
    # lr 1e-3 has the best single fold (0.9) but the lower mean (0.7 against 0.75)
    for key, best in {(1e-3, 0): 0.9, (1e-3, 1): 0.5, (1e-4, 0): 0.8, (1e-4, 1): 0.7}.items():
        with session_scope(factory) as session:
            run = session.get(Run, ids[key])
            run.status, run.best_metric, run.best_epoch = RunStatus.SUCCEEDED, best, 1
    with session_scope(factory) as session:
        assert best_runs(session, sweep_id, 1) == [ids[1e-4, 0], ids[1e-4, 1]]
        assert best_runs(session, sweep_id, 2) == [ids[1e-4, 0], ids[1e-4, 1], ids[1e-3, 0], ids[1e-3, 1]]
        session.get(Run, ids[1e-4, 1]).status = RunStatus.FAILED  # a variant counts once all its folds succeeded
    with session_scope(factory) as session:
        assert best_runs(session, sweep_id, 1) == [ids[1e-3, 0], ids[1e-3, 1]]
        with pytest.raises(LookupError, match="1 variant with all 2 folds succeeded, fewer than 2"):
            best_runs(session, sweep_id, 2)


def test_asha_compares_a_fold_run_only_with_the_runs_of_its_fold(factory, synthetic_data):
    spec = parse_spec({"name": "cv-asha", "split": {"test": 0.2, "folds": 2}, "metric": {"name": "accuracy"},
                       "parameters": {"lr": {"values": [1e-3, 1e-4]}}, "base": {"epochs": 4},
                       "early_terminate": {"min_epochs": 1, "reduction_factor": 2}})
    with session_scope(factory) as session:
        _, runs = create_sweep(session, spec, synthetic_data)
        by_fold = {(run.config["lr"], run.fold): run.id for run in runs}
    labels = [0, 1, 1, 0]
    accuracy = {1.0: [0.1, 0.9, 0.9, 0.1], 0.75: [0.1, 0.9, 0.1, 0.1], 0.5: [0.9, 0.9, 0.1, 0.1], 0.25: [0.9, 0.9, 0.1, 0.9]}
    pruned = {}
    # fold 1's faces are harder: its better run (0.5) ranks below both runs of fold 0
    for (lr, fold), value in [((1e-3, 0), 1.0), ((1e-4, 0), 0.75), ((1e-3, 1), 0.5), ((1e-4, 1), 0.25)]:
        metrics = compute_metrics(labels, accuracy[value])
        assert metrics.accuracy == value
        with session_scope(factory) as session:
            pruned[lr, fold] = asha_prune_hook(session, by_fold[lr, fold], 1, {"val": metrics})
    assert pruned == {(1e-3, 0): False, (1e-4, 0): True, (1e-3, 1): False, (1e-4, 1): True}


def test_epoch_metrics_upsert_one_row_per_run_epoch_split(factory, synthetic_data):
    with session_scope(factory) as session:
        run_id = create_run(session, TrainConfig(), synthetic_data, SplitConfig()).id
    first = compute_metrics([0, 1, 1], [0.2, 0.7, 0.4], loss=float("inf"), groups=["real", "easy", "hard"])
    second = compute_metrics([0, 1, 1], [0.2, 0.7, 0.9], loss=0.3)
    with session_scope(factory) as session:
        record_epoch(session, run_id, 1, {"train": first, "val": first, "test": first})
    with session_scope(factory) as session:
        record_epoch(session, run_id, 1, {"train": second, "val": second, "test": second})
    with session_scope(factory) as session:
        rows = epoch_rows(session, run_id)
        assert [(r.epoch, r.split) for r in rows] == [(1, "train"), (1, "val"), (1, "test")]
        assert all(r.accuracy == 1.0 and r.loss == 0.3 and r.tp == 2 for r in rows)
        assert session.scalar(select(func.count()).select_from(EpochMetric)) == 3
    with session_scope(factory) as session:  # an infinite loss is stored as NULL
        record_epoch(session, run_id, 2, {"val": first})
    with session_scope(factory) as session:
        row = session.scalar(select(EpochMetric).where(EpochMetric.epoch == 2))
        assert row.loss is None and row.group_accuracy == {"easy": 1.0, "hard": 0.0, "real": 1.0}


def test_the_unique_constraint_is_enforced_by_the_database(factory, synthetic_data):
    with session_scope(factory) as session:
        run_id = create_run(session, TrainConfig(), synthetic_data, SplitConfig()).id
    row = {"run_id": run_id, "epoch": 1, "split": "val", **compute_metrics([0, 1], [0.1, 0.9]).as_dict()}
    with session_scope(factory) as session:
        session.execute(insert(EpochMetric), [row])
    with pytest.raises(IntegrityError):
        with session_scope(factory) as session:
            session.execute(insert(EpochMetric), [row])


def test_run_status_is_finished():
    assert not RunStatus.WAITING.is_finished() and not RunStatus.RUNNING.is_finished()
    assert all(s.is_finished() for s in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.PRUNED))


def test_concurrent_migrations_do_not_collide(tmp_path, pg_server_url):
    """Several workers starting at once each migrate the same fresh database."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"realfake_mig_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    urls = [f"sqlite:///{tmp_path / 'fresh.db'}", make_url(pg_server_url).set(database=name).render_as_string(False)]
    try:
        for url in urls:
            engines = [make_engine(url) for _ in range(4)]
            head = ScriptDirectory.from_config(alembic_config(engines[0])).get_current_head()
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(migrate, engines))
            with engines[0].connect() as connection:
                assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head]
            for engine in engines:
                engine.dispose()
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_the_leaderboard_reads_each_run_at_its_best_epoch(factory, synthetic_data):
    with session_scope(factory) as session:
        ids = [create_run(session, TrainConfig(), synthetic_data, SplitConfig()).id for _ in range(3)]
    weak, strong = compute_metrics([0, 1, 1, 0], [0.6, 0.7, 0.4, 0.2]), compute_metrics([0, 1, 1, 0], [0.1, 0.7, 0.9, 0.2])
    with session_scope(factory) as session:
        for run_id, best_epoch, best in ((ids[0], 2, weak), (ids[1], 1, strong)):
            record_epoch(session, run_id, 1, {"val": strong if best_epoch == 1 else weak, "test": best})
            record_epoch(session, run_id, 2, {"val": weak, "test": best})
            run = session.get(Run, run_id)
            run.best_epoch, run.best_metric = best_epoch, best.accuracy
    with session_scope(factory) as session:
        rows = list_runs(session)
    assert [r["id"] for r in rows] == [ids[1], ids[0], ids[2]]  # best first, the untrained one last
    assert rows[0]["val"]["accuracy"] == 1.0 and rows[0]["test"]["accuracy"] == 1.0
    assert rows[1]["val"]["accuracy"] == 0.5 and rows[1]["test"]["accuracy"] == 0.5
    assert rows[2]["val"] is None and rows[2]["test"] is None

"""Celery workers as separate processes, with the machine's Redis and PostgreSQL."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image
from sqlalchemy import select

from realfake.runs import epoch_rows, request_cancel, train_run
from realfake.scoring import create_scoring_job
from realfake.store import JobStatus, Prediction, RunStatus, ScoringJob, session_scope
from realfake.synthetic import make_synthetic
from tests.cluster import (
    WorkerProcess,
    config,
    new_run,
    run_state,
    wait_finished,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def factory(cluster_factory):
    return cluster_factory


@pytest.fixture(scope="module")
def workers(cluster_env, tmp_path_factory):
    """Two long-lived workers for the tests that do not kill them."""
    logs = tmp_path_factory.mktemp("logs")
    procs = [WorkerProcess(cluster_env, f"w{i}@test", logs) for i in (1, 2)]
    for proc in procs:
        proc.wait_ready()
    yield procs
    for proc in procs:
        proc.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data"), per_class=100, size=64, seed=0)


def test_a_run_enqueued_through_redis_is_trained_by_a_worker(factory, data, producer, workers):
    run_id = new_run(factory, data, config(epochs=2))
    producer.send_task("train_run", args=[run_id], queue="train")
    run = wait_finished(factory, run_id)
    assert run.status is RunStatus.SUCCEEDED, run.error
    assert run.worker in {"w1@test", "w2@test"} and run.attempt == 1
    with session_scope(factory) as session:
        assert len(epoch_rows(session, run_id)) == 2 * 3


def test_a_run_with_loader_processes_trains_in_a_worker_pool_process(factory, data, producer, workers):
    # the prefork pool's processes are daemonic: the DataLoader's processes must still start
    run_id = new_run(factory, data, config(epochs=1, num_workers=2))
    producer.send_task("train_run", args=[run_id], queue="train")
    run = wait_finished(factory, run_id)
    assert run.status is RunStatus.SUCCEEDED, run.error


def test_the_same_run_delivered_twice_trains_once(factory, data, producer, workers):
    run_id = new_run(factory, data, config(epochs=3))
    producer.send_task("train_run", args=[run_id], queue="train")
    wait_for(lambda: run_state(factory, run_id).status is RunStatus.RUNNING, 60, what="run to start")
    producer.send_task("train_run", args=[run_id], queue="train")  # while the lease is live
    run = wait_finished(factory, run_id)
    producer.send_task("train_run", args=[run_id], queue="train")  # late, after the end
    wait_for(lambda: sum(w.log().count("'not claimed'") for w in workers) >= 2, 60, what="duplicates to be dropped")
    run = run_state(factory, run_id)
    assert run.status is RunStatus.SUCCEEDED and run.attempt == 1
    with session_scope(factory) as session:
        rows = epoch_rows(session, run_id)
        assert len(rows) == 3 * 3 and {r.attempt for r in rows} == {1}


def test_cancel_stops_a_running_run_and_keeps_its_rows(factory, data, producer, workers):
    run_id = new_run(factory, data, config(epochs=50))
    producer.send_task("train_run", args=[run_id], queue="train")
    wait_for(lambda: run_state(factory, run_id).epochs_done >= 1, 120, what="first epoch")
    request_cancel(factory, run_id)
    run = wait_finished(factory, run_id, timeout=30)  # the flag is read between batches
    assert run.status is RunStatus.CANCELLED and run.epochs_done < 50
    with session_scope(factory) as session:
        assert len(epoch_rows(session, run_id)) == run.epochs_done * 3


def test_a_scoring_shard_with_unreadable_files_writes_one_row_per_file(
    factory, data, producer, workers, cluster_env, tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", cluster_env["TORCH_HOME"])
    run_id = new_run(factory, data, config(epochs=1))
    # in-process, for a checkpoint, beating as often as the workers' sweepers expect (else they take it over)
    result = train_run(factory, run_id, cluster_env["REALFAKE_ARTIFACTS"], grace_s=4, heartbeat_s=0.5)
    assert result.outcome == "completed"
    folder = tmp_path / "to score"
    (folder / "nested").mkdir(parents=True)
    for i, name in enumerate(sorted((data / "fake").iterdir())[:5] + sorted((data / "real").iterdir())[:5]):
        shutil.copy(name, folder / ("nested" if i % 2 else "") / name.name)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    good = (data / "real" / "real_00010.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    outside = tmp_path / "outside.jpg"
    Image.new("RGB", (8, 8)).save(outside)
    (folder / "escape.jpg").symlink_to(outside)
    (folder / "ñame with space.png").write_bytes((data / "fake" / "easy_00000.jpg").read_bytes())

    with session_scope(factory) as session:
        job = create_scoring_job(session, run_id, folder, batch_size=4, shard_size=5)
        job_id, n_shards = job.id, job.n_shards
    assert n_shards == 3
    for shard in range(n_shards):
        producer.send_task("score_batch", args=[job_id, shard], queue="score")
    wait_for(lambda: run_job(factory, job_id).status is JobStatus.DONE, 120, what="scoring job")
    producer.send_task("score_batch", args=[job_id, 0], queue="score")  # a retried shard
    wait_for(lambda: sum(w.log().count("score_batch[") for w in workers) >= 2 * (n_shards + 1), 60,
             what="the retried shard")
    with session_scope(factory) as session:
        rows = {p.path: p for p in session.scalars(select(Prediction).where(Prediction.job_id == job_id))}
    assert len(rows) == 15
    errors = {path: p.error for path, p in rows.items() if p.error}
    assert set(errors) == {"zero.jpg", "text.jpg", "truncated.jpg", "escape.jpg"}
    assert "UnidentifiedImageError" in errors["text.jpg"] and "outside the data roots" in errors["escape.jpg"]
    scored = [p for p in rows.values() if not p.error]
    assert all(0.0 <= p.p_fake <= 1.0 and p.label in {"real", "fake"} for p in scored)
    assert "ñame with space.png" in rows and "nested/real_00000.jpg" in rows, sorted(rows)


def run_job(factory, job_id) -> ScoringJob:
    with session_scope(factory) as session:
        return session.get(ScoringJob, job_id)



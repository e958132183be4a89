"""Fault tests: a worker process group killed with SIGKILL in the middle of an epoch or of a
scoring shard, a worker told to stop in the middle of an epoch, a Redis restart."""

import os
import signal
from pathlib import Path

import pytest

from realfake.runs import epoch_rows
from realfake.store import RunStatus, session_scope
from realfake.synthetic import make_synthetic
from realfake.train import load_checkpoint
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


def _training_past_its_first_checkpoint(factory, producer, cluster_env, tmp_path, name, epochs):
    """A run trained by a worker of its own, once it has written its first epoch and last.pt."""
    data = make_synthetic(tmp_path / "data", per_class=150, size=96, seed=2)
    run_id = new_run(factory, data, config(epochs=epochs, resize=96, image_size=96))
    worker = WorkerProcess(cluster_env, name, tmp_path).wait_ready()
    producer.send_task("train_run", args=[run_id], queue="train")
    wait_for(lambda: run_state(factory, run_id).epochs_done >= 1, 180, what="a first epoch")
    last = Path(run_state(factory, run_id).checkpoint_dir) / "last.pt"
    wait_for(last.exists, 60, what="a checkpoint")
    return run_id, worker, last


def _finished_by_a_new_worker(factory, cluster_env, tmp_path, run_id, k, epochs, name="successor@test"):
    """The run, finished by a worker started now, resumed at epoch k + 1 with attempt 2."""
    second = WorkerProcess(cluster_env, name, tmp_path).wait_ready()
    try:
        run = wait_finished(factory, run_id, timeout=300)
    finally:
        second.stop()
    assert run.status is RunStatus.SUCCEEDED, run.error
    assert (run.attempt, run.worker) == (2, name)
    with session_scope(factory) as session:
        rows = epoch_rows(session, run_id)
    assert len(rows) == epochs * 3
    assert {r.epoch: r.attempt for r in rows} == {e: (1 if e <= k else 2) for e in range(1, epochs + 1)}


def test_a_worker_killed_mid_epoch_is_taken_over_from_its_checkpoint(factory, producer, cluster_env, tmp_path):
    run_id, first, last = _training_past_its_first_checkpoint(factory, producer, cluster_env, tmp_path,
                                                              "doomed@test", epochs=4)
    assert run_state(factory, run_id).worker == "doomed@test"
    first.kill()
    killed_at = run_state(factory, run_id)
    assert killed_at.status is RunStatus.RUNNING and killed_at.epochs_done < 4
    # taken over once the lease is stale, resumed at k + 1, not epoch 1
    _finished_by_a_new_worker(factory, cluster_env, tmp_path, run_id, load_checkpoint(last)["epoch"], 4, "rescuer@test")


@pytest.mark.parametrize("whom", ["main process", "process group"])
def test_a_worker_told_to_stop_hands_its_run_back_at_once(whom, factory, producer, cluster_env, tmp_path):
    run_id, first, last = _training_past_its_first_checkpoint(factory, producer, cluster_env, tmp_path,
                                                              "leaving@test", epochs=6)
    if whom == "main process":  # as `docker compose stop` does
        first.process.send_signal(signal.SIGTERM)
    else:  # as systemd does by default: the training process too, which then ends at once
        os.killpg(first.process.pid, signal.SIGTERM)
    assert first.process.wait(60) == 0, first.log()[-3000:]  # after the batch under way, not at the run's end
    left = run_state(factory, run_id)
    assert (left.status, left.worker, left.attempt) == (RunStatus.WAITING, None, 1)
    assert left.max_attempts == 4 and left.epochs_done < 6  # the attempt not counted against its 3
    assert f"run {run_id} handed back at shutdown" in first.log()
    # no wait for a lease to go stale: the handed-back run's message is already queued
    _finished_by_a_new_worker(factory, cluster_env, tmp_path, run_id, load_checkpoint(last)["epoch"], 6)


def test_a_worker_killed_mid_shard_has_its_shard_scored_by_another_within_the_grace(factory, producer, cluster_env,
                                                                                    tmp_path, monkeypatch):
    from sqlalchemy import select

    from realfake.runs import train_run
    from realfake.scoring import create_scoring_job, rows_written
    from realfake.store import JobStatus, Prediction, ShardLease

    env = cluster_env | {"REALFAKE_RESEND_AFTER_S": "600"}  # in time only if the shard's lease brings it back
    data = make_synthetic(tmp_path / "data", per_class=40, size=64, seed=5)
    run_id = new_run(factory, data, config(epochs=1))
    monkeypatch.setenv("TORCH_HOME", env["TORCH_HOME"])
    train_run(factory, run_id, Path(env["REALFAKE_ARTIFACTS"]))
    folder = make_synthetic(tmp_path / "score", per_class=400, size=96, seed=6)
    with session_scope(factory) as session:  # one shard, long enough to kill its worker in the middle
        job_id = create_scoring_job(session, run_id, folder, batch_size=8, shard_size=800).id

    doomed = WorkerProcess(env, "doomed@test", tmp_path, queues="score").wait_ready()
    producer.send_task("score_batch", args=[job_id, 0], queue="score")

    def leased_by():
        with session_scope(factory) as session:
            lease = session.get(ShardLease, (job_id, 0))
            return lease and lease.worker

    assert wait_for(leased_by, 120, interval=0.05, what="the shard's lease").startswith("doomed@test:")
    doomed.kill()
    with session_scope(factory) as session:
        assert rows_written(session, job_id) == 0  # killed in the middle: nothing of the shard written
    rescuer = WorkerProcess(env, "rescuer@test", tmp_path, queues="score").wait_ready()
    try:
        wait_for(lambda: _job_status(factory, job_id) is JobStatus.DONE, 180, what="the shard to be scored again")
    finally:
        rescuer.stop()
    with session_scope(factory) as session:
        paths = session.scalars(select(Prediction.path).where(Prediction.job_id == job_id)).all()
        assert session.get(ShardLease, (job_id, 0)) is None
    assert len(paths) == len(set(paths)) == 800
    assert "went silent mid-shard; sent again" in rescuer.log()


class OwnRedis:
    """A Redis server of the test's own, persisting to an append-only file, restartable."""

    def __init__(self, folder: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        import subprocess

        subprocess.run(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "yes",
             "--pidfile", str(self.folder / "redis.pid"), "--logfile", str(self.folder / "redis.log")],
            check=True,
        )
        wait_for(self.ping, 20, what="redis to start")

    def ping(self) -> bool:
        import redis

        try:
            return redis.Redis(port=self.port, socket_timeout=1).ping()
        except redis.ConnectionError:
            return False

    def restart(self, down_s: float = 2.0) -> None:
        import subprocess
        import time

        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown"], capture_output=True)
        wait_for(lambda: not self.ping(), 20, what="redis to stop")
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        import subprocess

        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"], capture_output=True)


@pytest.mark.slow
def test_a_redis_restart_loses_no_run_and_no_file(factory, cluster_env, tmp_path):
    from sqlalchemy import func, select

    from realfake.config import Settings
    from realfake.scoring import create_scoring_job
    from realfake.store import JobStatus, Prediction
    from worker.celery import make_app

    own = OwnRedis(tmp_path / "redis")
    env = cluster_env | {"REALFAKE_BROKER_URL": own.url}
    producer = make_app(Settings.from_env(env))
    workers = [WorkerProcess(env, f"r{i}@test", tmp_path) for i in (1, 2)]
    try:
        for worker in workers:
            worker.wait_ready()
        data = make_synthetic(tmp_path / "data", per_class=100, size=64, seed=3)
        run_ids = [new_run(factory, data, config(epochs=3, seed=s)) for s in (1, 2, 3)]
        for run_id in run_ids:
            producer.send_task("train_run", args=[run_id], queue="train")
        wait_for(lambda: run_state(factory, run_ids[0]).epochs_done >= 1, 120, what="training to start")
        own.restart()  # in the middle of the sweep: one run training per worker, one queued
        runs = [wait_finished(factory, run_id, timeout=300) for run_id in run_ids]
        assert [r.status for r in runs] == [RunStatus.SUCCEEDED] * 3
        with session_scope(factory) as session:
            for run_id in run_ids:
                assert len(epoch_rows(session, run_id)) == 3 * 3

        folder = tmp_path / "score"
        make_synthetic(folder, per_class=600, size=32, seed=4)
        with session_scope(factory) as session:
            job = create_scoring_job(session, run_ids[0], folder, batch_size=64, shard_size=50)
            job_id, n_shards = job.id, job.n_shards
        for shard in range(n_shards):
            producer.send_task("score_batch", args=[job_id, shard], queue="score")

        def written():
            with session_scope(factory) as session:
                return session.scalar(select(func.count()).select_from(Prediction).where(Prediction.job_id == job_id))

        wait_for(lambda: written() >= 200, 120, what="scoring to start")
        own.restart()  # in the middle of the scoring job
        wait_for(lambda: _job_status(factory, job_id) is JobStatus.DONE, 300, what="the scoring job to finish")
        with session_scope(factory) as session:
            paths = session.scalars(select(Prediction.path).where(Prediction.job_id == job_id)).all()
        assert len(paths) == len(set(paths)) == 1200
        # the workers really lost the broker, twice, and came back
        assert all(w.log().count("Connection to broker lost") >= 2 for w in workers), workers[0].log()[-2000:]
    finally:
        for worker in workers:
            worker.stop()
        producer.close()
        own.stop()


def _job_status(factory, job_id):
    from realfake.store import ScoringJob

    with session_scope(factory) as session:
        return session.get(ScoringJob, job_id).status

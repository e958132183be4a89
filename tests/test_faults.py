"""Fault tests: a worker process group killed with SIGKILL in the middle of an epoch."""

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


def test_a_worker_killed_mid_epoch_is_taken_over_from_its_checkpoint(factory, producer, cluster_env, tmp_path):
    data = make_synthetic(tmp_path / "data", per_class=150, size=96, seed=2)
    run_id = new_run(factory, data, config(epochs=4, resize=96, image_size=96))
    first = WorkerProcess(cluster_env, "doomed@test", tmp_path).wait_ready()
    producer.send_task("train_run", args=[run_id], queue="train")
    wait_for(lambda: run_state(factory, run_id).epochs_done >= 1, 180, what="a first epoch")
    last = Path(run_state(factory, run_id).checkpoint_dir) / "last.pt"
    wait_for(last.exists, 60, what="a checkpoint")
    assert run_state(factory, run_id).worker == "doomed@test"
    first.kill()
    killed_at = run_state(factory, run_id)
    assert killed_at.status is RunStatus.RUNNING and killed_at.epochs_done < 4
    k = load_checkpoint(last)["epoch"]

    second = WorkerProcess(cluster_env, "rescuer@test", tmp_path).wait_ready()
    try:
        run = wait_finished(factory, run_id, timeout=300)
    finally:
        second.stop()
    assert run.status is RunStatus.SUCCEEDED, run.error
    assert run.attempt == 2 and run.worker == "rescuer@test"
    with session_scope(factory) as session:
        rows = epoch_rows(session, run_id)
    assert len(rows) == 4 * 3
    attempts = {r.epoch: r.attempt for r in rows}
    assert attempts == {e: (1 if e <= k else 2) for e in range(1, 5)}  # resumed at k + 1, not epoch 1

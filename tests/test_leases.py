"""The lease that decides who trains a run, on SQLite and PostgreSQL, without training."""

import time

import pytest
from sqlalchemy import update

from realfake.config import SplitConfig, TrainConfig
from realfake.errors import RunStateError
from realfake.hooks import BestSoFar
from realfake.metrics import compute_metrics
from realfake.runs import (
    Heartbeat,
    LeaseLost,
    SqlHooks,
    claim_run,
    create_run,
    finish_run,
    hand_back_runs,
    request_cancel,
    requeue_stale_runs,
    retry_runs,
    train_run,
)
from realfake.store import Run, RunStatus, session_scope


@pytest.fixture
def run_id(factory, synthetic_data):
    with session_scope(factory) as session:
        return create_run(session, TrainConfig(), synthetic_data, SplitConfig(), max_attempts=2).id


def _age_heartbeat(factory, run_id, seconds_ago=3600):
    from datetime import datetime, timedelta, timezone

    with session_scope(factory) as session:
        session.execute(
            update(Run).where(Run.id == run_id)
            .values(heartbeat_at=datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(seconds=seconds_ago))
        )


def test_only_one_claim_wins(factory, run_id, tmp_path):
    first = claim_run(factory, run_id, "w1", tmp_path, grace_s=60)
    assert first is not None and first.attempt == 1
    assert claim_run(factory, run_id, "w2", tmp_path, grace_s=60) is None  # live lease
    with session_scope(factory) as session:
        run = session.get(Run, run_id)
        assert (run.status, run.worker, run.attempt) == (RunStatus.RUNNING, "w1", 1)


def test_a_stale_lease_is_taken_over_then_attempts_run_out(factory, run_id, tmp_path):
    first = claim_run(factory, run_id, "w1", tmp_path, grace_s=60)
    _age_heartbeat(factory, run_id)
    second = claim_run(factory, run_id, "w2", tmp_path, grace_s=60)
    assert second is not None and second.attempt == 2
    assert not finish_run(factory, first, RunStatus.SUCCEEDED)  # fenced: w1 lost the lease
    _age_heartbeat(factory, run_id)
    assert claim_run(factory, run_id, "w3", tmp_path, grace_s=60) is None  # max_attempts = 2
    with session_scope(factory) as session:
        run = session.get(Run, run_id)
        assert run.status is RunStatus.FAILED and "its worker was lost on attempt 2, the last allowed" in run.error and "last worker: w2" in run.error


def test_a_run_lost_too_often_can_be_retried_with_its_attempts_anew_and_old_owners_fenced(factory, run_id, tmp_path):
    first = claim_run(factory, run_id, "w1", tmp_path, grace_s=60)
    _age_heartbeat(factory, run_id)
    second = claim_run(factory, run_id, "w2", tmp_path, grace_s=60)
    _age_heartbeat(factory, run_id)
    assert claim_run(factory, run_id, "w3", tmp_path, grace_s=60) is None  # failed: its 2 attempts lost
    retry_runs(factory, [run_id, run_id])  # named twice: retried once
    third = claim_run(factory, run_id, "w1", tmp_path, grace_s=60)
    assert third is not None and third.attempt == 3  # numbers go on: neither earlier lease matches
    assert not finish_run(factory, first, RunStatus.SUCCEEDED) and not finish_run(factory, second, RunStatus.SUCCEEDED)
    for attempt in (4, 5):  # a run of no sweep gets the default 3 attempts again
        _age_heartbeat(factory, run_id)
        assert claim_run(factory, run_id, "w2", tmp_path, grace_s=60).attempt == attempt
    _age_heartbeat(factory, run_id)
    assert claim_run(factory, run_id, "w3", tmp_path, grace_s=60) is None
    retry_runs(factory, [run_id])
    with session_scope(factory) as session:  # 3 more again, not twice the raised cap
        run = session.get(Run, run_id)
        assert (run.status, run.attempt, run.max_attempts) == (RunStatus.WAITING, 5, 8)
        run.status = RunStatus.SUCCEEDED
    with pytest.raises(RunStateError, match="is succeeded: only failed or cancelled runs are retried"):
        retry_runs(factory, [run_id])


def test_a_worker_told_to_stop_hands_its_run_back_without_spending_an_attempt(factory, run_id, synthetic_data, tmp_path):
    with session_scope(factory) as session:
        others = create_run(session, TrainConfig(), synthetic_data, SplitConfig()).id
    claim_run(factory, others, "w2", tmp_path, grace_s=60)
    lease = claim_run(factory, run_id, "w1", tmp_path, grace_s=60)
    hooks = SqlHooks(factory, run_id)
    hooks.lease, hooks.heartbeat = lease, Heartbeat(factory, lease, interval_s=3600)  # no beat in this test
    assert not hooks.should_stop()
    hooks._next_poll = 0.0
    assert hand_back_runs(factory, "w1", grace_s=60) == [run_id]
    assert hooks.should_stop() and hooks.heartbeat.lost.is_set()  # seen at the next poll, not the next beat
    assert hand_back_runs(factory, "w1", grace_s=60) == []
    with session_scope(factory) as session:
        run, other = session.get(Run, run_id), session.get(Run, others)
        assert (run.status, run.worker, run.attempt, run.max_attempts) == (RunStatus.WAITING, None, 1, 3)
        assert run.enqueued_at is not None
        assert (other.status, other.worker) == (RunStatus.RUNNING, "w2")  # another worker's run stays
    m = compute_metrics([0, 1], [0.2, 0.8])
    with pytest.raises(LeaseLost):  # the stopping worker writes nothing more
        hooks.on_epoch_end(1, {"train": m, "val": m}, BestSoFar(1, 1.0))
    assert not finish_run(factory, lease, RunStatus.SUCCEEDED)
    for attempt in (2, 3, 4):  # max_attempts is 2, yet stops never use the run up
        assert claim_run(factory, run_id, f"v{attempt}", tmp_path, grace_s=60).attempt == attempt
        assert hand_back_runs(factory, f"v{attempt}", grace_s=60) == [run_id]
    _age_heartbeat(factory, run_id)
    assert requeue_stale_runs(factory, grace_s=60) == []  # waiting, not stale: nothing for the sweeper

    claim_run(factory, run_id, "w1", tmp_path, grace_s=60)
    _age_heartbeat(factory, run_id)  # a dead earlier process of the same name: a lost attempt, not a stop
    assert hand_back_runs(factory, "w1", grace_s=60) == []
    claim_run(factory, run_id, "w1", tmp_path, grace_s=60)
    request_cancel(factory, run_id)
    assert hand_back_runs(factory, "w1", grace_s=60) == []  # asked to cancel: it ends so, not waiting
    with session_scope(factory) as session:
        assert session.get(Run, run_id).status is RunStatus.CANCELLED


def test_requeue_moves_stale_runs_back_to_waiting_once(factory, run_id, tmp_path):
    claim_run(factory, run_id, "w1", tmp_path, grace_s=60)
    assert requeue_stale_runs(factory, grace_s=60) == []
    _age_heartbeat(factory, run_id)
    assert requeue_stale_runs(factory, grace_s=60) == [run_id]
    assert requeue_stale_runs(factory, grace_s=60) == []
    with session_scope(factory) as session:
        run = session.get(Run, run_id)
        assert run.status is RunStatus.WAITING and run.worker is None and run.attempt == 1
    assert claim_run(factory, run_id, "w2", tmp_path, grace_s=60).attempt == 2


def test_finished_runs_are_left_alone(factory, run_id, tmp_path):
    lease = claim_run(factory, run_id, "w1", tmp_path, grace_s=60)
    assert finish_run(factory, lease, RunStatus.SUCCEEDED)
    _age_heartbeat(factory, run_id)
    assert claim_run(factory, run_id, "w2", tmp_path, grace_s=0) is None
    assert requeue_stale_runs(factory, grace_s=0) == []


def test_heartbeat_stamps_and_notices_a_lost_lease(factory, run_id, tmp_path):
    lease = claim_run(factory, run_id, "w1", tmp_path, grace_s=60)
    _age_heartbeat(factory, run_id)
    beat = Heartbeat(factory, lease, interval_s=0.1)
    beat.start()
    time.sleep(0.5)
    assert requeue_stale_runs(factory, grace_s=60) == []  # freshly stamped
    with session_scope(factory) as session:
        session.get(Run, run_id).attempt = 5  # someone else's attempt now
    assert beat.lost.wait(5)
    beat.stop()


def test_epoch_writes_are_fenced_by_the_lease(factory, run_id, tmp_path):
    lease = claim_run(factory, run_id, "w1", tmp_path, grace_s=60)
    hooks = SqlHooks(factory, run_id)
    hooks.lease = lease
    m = compute_metrics([0, 1], [0.2, 0.8])
    assert hooks.on_epoch_end(1, {"train": m, "val": m}, BestSoFar(1, 1.0))
    _age_heartbeat(factory, run_id)
    claim_run(factory, run_id, "w2", tmp_path, grace_s=60)
    with pytest.raises(LeaseLost):
        hooks.on_epoch_end(2, {"train": m, "val": m}, BestSoFar(1, 1.0))
    with session_scope(factory) as session:
        run = session.get(Run, run_id)
        assert run.epochs_done == 1 and len(run.epochs) == 2


def test_a_checkpoint_is_not_replaced_once_the_lease_is_gone(factory, run_id, tmp_path):
    from realfake.train import load_checkpoint, save_atomic

    lease = claim_run(factory, run_id, "w1", tmp_path, grace_s=60)
    hooks = SqlHooks(factory, run_id)
    hooks.lease = lease
    path = tmp_path / "run" / "last.pt"
    save_atomic({"epoch": 1}, path, hooks.check_held)
    _age_heartbeat(factory, run_id)
    claim_run(factory, run_id, "w2", tmp_path, grace_s=60)  # written while another worker took over
    with pytest.raises(LeaseLost):
        save_atomic({"epoch": 2}, path, hooks.check_held)
    assert load_checkpoint(path) == {"epoch": 1} and sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_cancel_of_a_waiting_run_is_immediate(factory, run_id, tmp_path):
    assert request_cancel(factory, run_id) is RunStatus.CANCELLED
    assert claim_run(factory, run_id, "w1", tmp_path, grace_s=60) is None


def test_out_of_memory_fails_the_run_with_a_clear_message(factory, run_id, tmp_path, monkeypatch):
    import torch

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("realfake.train.fit", out_of_memory)  # train_run imports it when it runs
    assert train_run(factory, run_id, tmp_path).outcome == "failed"  # not raised: the task must not loop on it
    with session_scope(factory) as session:
        run = session.get(Run, run_id)
        assert run.status is RunStatus.FAILED
        assert run.error.startswith("out of memory") and "lower batch_size" in run.error


def test_a_config_this_worker_cannot_read_fails_the_run_at_once(factory, run_id, tmp_path):
    """A run written by a newer scheduler (a field this worker's TrainConfig lacks) must not
    sit in RUNNING until its lease goes stale: it fails with the reason."""
    with session_scope(factory) as session:
        run = session.get(Run, run_id)
        run.config = run.config | {"field_from_the_future": 1}
    assert train_run(factory, run_id, tmp_path).outcome == "failed"
    with session_scope(factory) as session:
        run = session.get(Run, run_id)
        assert run.status is RunStatus.FAILED and run.attempt == 1
        assert "cannot read the run's config" in run.error and "field_from_the_future" in run.error


def test_unclaimed_runs_are_sent_again_at_most_once_per_period(factory, run_id, tmp_path):
    from datetime import datetime, timedelta, timezone

    from realfake.runs import resend_waiting_runs

    assert resend_waiting_runs(factory, after_s=3600) == []  # just created: its message is fresh
    an_hour_ago = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=2)
    with session_scope(factory) as session:
        session.execute(update(Run).where(Run.id == run_id).values(created_at=an_hour_ago))
    assert resend_waiting_runs(factory, after_s=3600) == [run_id]
    assert resend_waiting_runs(factory, after_s=3600) == []  # sent again just now
    with session_scope(factory) as session:
        session.execute(update(Run).where(Run.id == run_id).values(enqueued_at=an_hour_ago))
    claim_run(factory, run_id, "w1", tmp_path, grace_s=60)
    assert resend_waiting_runs(factory, after_s=3600) == []  # claimed: nothing to send


def test_a_run_sent_again_is_sent_again_after_another_period(factory, run_id):
    """The second time too: its stamp was then the database's own clock (CURRENT_TIMESTAMP,
    which SQLite keeps as text a datetime read back never equals)."""
    from datetime import datetime, timedelta, timezone

    from realfake.runs import resend_waiting_runs

    with session_scope(factory) as session:
        long_ago = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=2)
        session.execute(update(Run).where(Run.id == run_id).values(created_at=long_ago))
    assert resend_waiting_runs(factory, after_s=2) == [run_id]
    assert resend_waiting_runs(factory, after_s=30) == []  # 30, not 2: SQLite's stamps are whole seconds
    time.sleep(3.5)
    assert resend_waiting_runs(factory, after_s=2) == [run_id]


def _scoring_job(factory, run_id, shards) -> int:
    from realfake.store import JobStatus, ScoringJob

    with session_scope(factory) as session:
        job = ScoringJob(run_id=run_id, folder="/faces", n_files=sum(map(len, shards)), n_shards=len(shards),
                         shards=shards, status=JobStatus.RUNNING)
        session.add(job)
        session.flush()
        return job.id


def test_a_shard_lease_is_stamped_while_held_and_dropped_after(factory, run_id):
    from realfake.scoring import resend_abandoned_shards, shard_lease
    from realfake.store import ShardLease

    job_id = _scoring_job(factory, run_id, [["a.jpg", "b.jpg"]])
    with pytest.raises(RuntimeError):
        with shard_lease(factory, job_id, 0, "w1", heartbeat_s=0.2):
            time.sleep(4.5)  # longer than the grace below: only the stamps keep the lease fresh
            assert resend_abandoned_shards(factory, grace_s=3) == []
            with session_scope(factory) as session:
                assert session.get(ShardLease, (job_id, 0)).worker == "w1"
            raise RuntimeError("a shard that fails drops its lease too: only a dead worker leaves one")
    with session_scope(factory) as session:
        assert session.get(ShardLease, (job_id, 0)) is None


def test_a_shard_whose_worker_went_silent_is_sent_again_once(factory, run_id):
    from realfake.scoring import resend_abandoned_shards
    from realfake.store import JobStatus, Prediction, ScoringJob, ShardLease

    job_id = _scoring_job(factory, run_id, [["a.jpg", "b.jpg"], ["c.jpg"], ["d.jpg"]])
    done_id = _scoring_job(factory, run_id, [["e.jpg"]])
    unmarked_id = _scoring_job(factory, run_id, [["f.jpg"]])
    with session_scope(factory) as session:  # workers that died mid-shard, stamped by the database's clock
        session.add_all([ShardLease(job_id=job_id, shard=0, worker="dead"), ShardLease(job_id=job_id, shard=1, worker="dead"),
                         ShardLease(job_id=done_id, shard=0, worker="dead"), ShardLease(job_id=unmarked_id, shard=0, worker="dead")])
        session.add(Prediction(job_id=job_id, shard=1, path="c.jpg", p_fake=0.9, label="fake"))  # complete shard
        # its worker died after the job's last rows, before marking the job done
        session.add(Prediction(job_id=unmarked_id, shard=0, path="f.jpg", p_fake=0.1, label="real"))
        session.get(ScoringJob, done_id).status = JobStatus.DONE
    assert resend_abandoned_shards(factory, grace_s=30) == []  # within the grace
    time.sleep(3.5)
    with session_scope(factory) as session:  # shard 2 is scored by a live worker
        session.add(ShardLease(job_id=job_id, shard=2, worker="alive"))
    assert resend_abandoned_shards(factory, grace_s=2) == [(job_id, 0)]  # shard 1 has its rows; done_id is done
    assert resend_abandoned_shards(factory, grace_s=2) == []  # once: the stale leases are gone
    with session_scope(factory) as session:
        assert [(lease.job_id, lease.shard) for lease in session.query(ShardLease)] == [(job_id, 2)]
        assert session.get(ScoringJob, unmarked_id).status is JobStatus.DONE
        assert session.get(ScoringJob, job_id).status is JobStatus.RUNNING


def test_a_stalled_job_is_sent_again_without_the_shards_being_scored(factory, run_id):
    from datetime import datetime, timedelta, timezone

    from realfake.scoring import resend_missing_shards
    from realfake.store import ScoringJob, ShardLease

    job_id = _scoring_job(factory, run_id, [["a.jpg"], ["b.jpg"], ["c.jpg"]])
    with session_scope(factory) as session:
        session.get(ScoringJob, job_id).created_at = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=2)
        session.add(ShardLease(job_id=job_id, shard=1, worker="alive"))  # a slow shard, stamped just now
    assert resend_missing_shards(factory, after_s=3600, lease_grace_s=60) == [(job_id, 0), (job_id, 2)]

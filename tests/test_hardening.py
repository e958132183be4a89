"""Bad inputs: every file found gets exactly one row, nothing outside the data roots is read,
bad training data is refused before a run starts, and a down database writes nothing."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import yaml
from PIL import Image

from realfake.config import SplitConfig, TrainConfig
from realfake.data import load_rgb
from realfake.errors import DatasetError
from realfake.inference import ModelCache, score_shard
from realfake.runs import create_run, create_sweep, train_run
from realfake.scoring import create_scoring_job, list_files
from realfake.store import JobStatus, Prediction, ScoringJob, Sweep, session_scope
from realfake.sweeps import parse_spec
from realfake.synthetic import make_synthetic
from tests.badfiles import make_bad_folder
from tests.conftest import REPO


def test_exif_orientation_is_applied_and_16_bit_is_scaled(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(tmp_path / "r.jpg").size == (20, 40)
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(tmp_path / "16.png")
    assert np.asarray(load_rgb(tmp_path / "16.png"))[0, 0].tolist() == [127, 127, 127]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mobilenet_weights):
    """A trained run in a SQLite store, for scoring without workers."""
    root = tmp_path_factory.mktemp("tiny")
    from realfake.store import make_engine, migrate, session_factory

    engine = make_engine(f"sqlite:///{root / 'db.sqlite'}")
    migrate(engine)
    factory = session_factory(engine)
    data = make_synthetic(root / "data", per_class=20, size=32)
    config = TrainConfig(backbone="mobilenet_v2", weights=str(mobilenet_weights), resize=32, image_size=32,
                         epochs=1, batch_size=16)
    with session_scope(factory) as session:
        run_id = create_run(session, config, data, SplitConfig(val=0.2, test=0.2)).id
    train_run(factory, run_id, root / "artifacts")
    return factory, run_id


def _score_all(factory, job_id, roots=(), device_decode=False) -> dict[str, Prediction]:
    with session_scope(factory) as session:
        from realfake.store import ScoringJob

        n_shards = session.get(ScoringJob, job_id).n_shards
    cache = ModelCache()
    for shard in range(n_shards):
        score_shard(factory, job_id, shard, roots, cache, device_decode=device_decode)
    with session_scope(factory) as session:
        rows = session.query(Prediction).filter_by(job_id=job_id).all()
    paths = [r.path for r in rows]
    assert len(paths) == len(set(paths))
    return {r.path: r for r in rows}


def test_a_shard_delivered_again_is_not_scored_again(tiny_run, tmp_path):
    """The sweeper resends shards still waiting in a queue: the copy that comes second finds them done."""
    factory, run_id = tiny_run
    folder = make_synthetic(tmp_path / "in", per_class=3, size=32)
    with session_scope(factory) as session:
        job_id = create_scoring_job(session, run_id, folder, shard_size=4).id
    cache = ModelCache()
    assert score_shard(factory, job_id, 0, cache=cache) == 4
    with session_scope(factory) as session:
        first = {r.path: (r.id, r.p_fake) for r in session.query(Prediction).filter_by(job_id=job_id)}
    assert score_shard(factory, job_id, 0, cache=cache) == 0
    with session_scope(factory) as session:
        assert {r.path: (r.id, r.p_fake) for r in session.query(Prediction).filter_by(job_id=job_id)} == first
    assert score_shard(factory, job_id, 1, cache=cache) == 2  # the other shard still scores
    with session_scope(factory) as session:  # as if the last shard's worker died before marking the job done
        session.get(ScoringJob, job_id).status = JobStatus.RUNNING
    assert score_shard(factory, job_id, 1, cache=cache) == 0  # its copy, sent again, marks it
    with session_scope(factory) as session:
        assert session.get(ScoringJob, job_id).status is JobStatus.DONE


@pytest.mark.parametrize("device_decode", [False, True], ids=["pil", "batched-decode_jpeg"])
def test_every_bad_file_gets_exactly_one_row(tiny_run, tmp_path, device_decode):
    """Both decoding paths: PIL on the CPU, and torchvision's batched decode_jpeg as on a GPU
    (here on the CPU device)."""
    factory, run_id = tiny_run
    folder = tmp_path / "bad"
    expected = make_bad_folder(folder, tmp_path / "outside.jpg")
    with session_scope(factory) as session:
        job_id = create_scoring_job(session, run_id, folder, batch_size=4, shard_size=4).id
    rows = _score_all(factory, job_id, device_decode=device_decode)
    assert set(rows) == set(expected)
    for path, scored in expected.items():
        row = rows[path]
        if scored:
            assert row.error is None and 0 <= row.p_fake <= 1 and row.label in {"real", "fake"}, (path, row.error)
        else:
            assert row.p_fake is None and row.label is None and row.error, path
    assert "DecompressionBomb" in rows["bomb.png"].error
    assert "outside the data roots" in rows["escape.jpg"].error
    assert "FileNotFoundError" in rows["broken_link.jpg"].error


def test_data_roots_confine_scoring(tiny_run, tmp_path):
    factory, run_id = tiny_run
    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    make_synthetic(allowed, per_class=2, size=16)
    make_synthetic(elsewhere, per_class=2, size=16)
    os.symlink(elsewhere / "real" / "real_00000.jpg", allowed / "real" / "link.jpg")
    with session_scope(factory) as session:
        from realfake.errors import OutsideDataRoots

        with pytest.raises(OutsideDataRoots):
            create_scoring_job(session, run_id, elsewhere, roots=(allowed,))
        job_id = create_scoring_job(session, run_id, allowed, roots=(allowed,)).id
    rows = _score_all(factory, job_id, roots=(allowed,))
    assert "outside the data roots" in rows["real/link.jpg"].error
    assert sum(r.error is None for r in rows.values()) == 4


def test_a_folder_of_ten_thousand_files(tiny_run, tmp_path):
    factory, run_id = tiny_run
    folder = tmp_path / "many"
    colours = [Image.new("RGB", (8, 8), (i, 255 - i, 128)) for i in range(0, 250, 25)]
    for index in range(10_000):
        sub = folder / f"d{index // 1000}"
        if index % 1000 == 0:
            sub.mkdir(parents=True)
        colours[index % 10].save(sub / f"{index:05d}.png")
    started = time.monotonic()
    with session_scope(factory) as session:
        job = create_scoring_job(session, run_id, folder, batch_size=256, shard_size=2500)
        job_id, n_files = job.id, job.n_files
    assert n_files == 10_000
    rows = _score_all(factory, job_id)
    assert len(rows) == 10_000 and all(r.error is None for r in rows.values())
    print(f"10,000 files listed and scored in {time.monotonic() - started:.1f}s")


def test_empty_folder_and_missing_folder(tiny_run, tmp_path):
    factory, run_id = tiny_run
    (tmp_path / "empty").mkdir()
    with session_scope(factory) as session:
        job = create_scoring_job(session, run_id, tmp_path / "empty")
        assert (job.n_files, job.status.value) == (0, "done")
        from realfake.errors import ScoringError

        with pytest.raises(ScoringError, match="does not exist"):
            create_scoring_job(session, run_id, tmp_path / "nowhere")
    assert list_files(tmp_path / "empty") == []


@pytest.fixture(scope="module")
def larger_run(tiny_run, tmp_path_factory, mobilenet_weights):
    """A second trained run in the same store, at another input size: resize 48, crop 40."""
    factory, _ = tiny_run
    root = tmp_path_factory.mktemp("larger")
    data = make_synthetic(root / "data", per_class=20, size=48)
    config = TrainConfig(backbone="mobilenet_v2", weights=str(mobilenet_weights), resize=48, image_size=40,
                         epochs=1, batch_size=16, seed=1)
    with session_scope(factory) as session:
        run_id = create_run(session, config, data, SplitConfig(val=0.2, test=0.2)).id
    train_run(factory, run_id, root / "artifacts")
    return run_id


@pytest.mark.parametrize("device_decode", [False, True], ids=["pil", "batched-decode_jpeg"])
def test_an_ensemble_of_runs_with_different_input_sizes(tiny_run, larger_run, tmp_path, device_decode):
    """A sweep over resolution ranks runs of several input sizes: their ensemble decodes each
    image once per size, and its P(fake) is the mean of what each run alone gives."""
    factory, small_run = tiny_run
    folder = tmp_path / "bad"
    expected = make_bad_folder(folder, tmp_path / "outside.jpg")
    alone = {}
    for run_ids in ([small_run], [larger_run], [small_run, larger_run]):
        with session_scope(factory) as session:
            job_id = create_scoring_job(session, run_ids, folder, batch_size=4, shard_size=8, tta=True).id
        alone[tuple(run_ids)] = _score_all(factory, job_id, device_decode=device_decode)
    small, large, ensemble = alone.values()
    assert set(ensemble) == set(expected)
    for path, scored in expected.items():
        if scored:
            assert ensemble[path].error is None, (path, ensemble[path].error)
            assert ensemble[path].p_fake == pytest.approx((small[path].p_fake + large[path].p_fake) / 2, abs=1e-6)
            assert small[path].p_fake != pytest.approx(large[path].p_fake, abs=1e-6)  # two models, two answers
        else:
            assert ensemble[path].p_fake is None and ensemble[path].error == small[path].error, path


def test_a_file_unreadable_at_one_input_size_is_an_error_row(tiny_run, larger_run, tmp_path, monkeypatch):
    import realfake.inference

    def load_for_eval(path, resize, crop, grid):  # as a file might fail only at one size
        if path.name == "ok.jpg" and (resize, crop) == (48, 40):
            raise OSError("cannot decode at 48 px")
        return real_load(path, resize, crop, grid)

    real_load = realfake.inference.load_for_eval
    monkeypatch.setattr(realfake.inference, "load_for_eval", load_for_eval)
    factory, small_run = tiny_run
    folder = tmp_path / "bad"
    make_bad_folder(folder, tmp_path / "outside.jpg")
    scored = {}
    for run_ids in ([small_run], [small_run, larger_run]):
        with session_scope(factory) as session:
            job_id = create_scoring_job(session, run_ids, folder, batch_size=4, shard_size=8).id
        scored[len(run_ids)] = _score_all(factory, job_id)
    assert scored[1]["ok.jpg"].error is None and scored[1]["ok.jpg"].p_fake is not None
    ok = scored[2]["ok.jpg"]
    assert (ok.p_fake, ok.label, ok.error) == (None, None, "OSError: cannot decode at 48 px")
    assert scored[2]["gray.jpg"].error is None and scored[2]["gray.jpg"].p_fake is not None


def _spec(data) -> dict:
    return {"name": "h", "data": str(data), "parameters": {"lr": {"values": [1e-3]}},
            "split": {"val": 0.2, "test": 0.2}, "base": {"backbone": "mobilenet_v2", "epochs": 1}}


@pytest.mark.parametrize("problem, message", [
    ("missing_fake", "no images of class 'fake'"),
    ("empty_real", "no images of class 'real'"),
    ("unreadable", "1 unreadable image(s)"),
    ("too_few", "too few images for the split"),
])
def test_bad_training_data_is_refused_before_any_run(factory, tmp_path, problem, message):
    data = make_synthetic(tmp_path / "data", per_class=10 if problem != "too_few" else 2, size=16)
    if problem == "missing_fake":
        for f in (data / "fake").iterdir():
            f.unlink()
        (data / "fake").rmdir()
    elif problem == "empty_real":
        for f in (data / "real").iterdir():
            f.unlink()
    elif problem == "unreadable":
        target = data / "real" / "real_00003.jpg"
        target.write_bytes(target.read_bytes()[:200])
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        with session_scope(factory) as session:
            create_sweep(session, parse_spec(_spec(data)))
    with session_scope(factory) as session:
        assert session.query(Sweep).count() == 0


def _cli(*args, env):
    return subprocess.run([sys.executable, "-m", "scheduler.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_a_down_database_writes_nothing_and_sends_nothing(tmp_path):
    data = make_synthetic(tmp_path / "data", per_class=10, size=16)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(_spec(data)))
    db = 14
    client = redis.Redis.from_url(f"redis://127.0.0.1:6379/{db}")
    client.flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALFAKE_")} | {
        "REALFAKE_DATABASE_URL": "postgresql+psycopg://realfake:hunter2@127.0.0.1:9/realfake",
        "REALFAKE_BROKER_URL": f"redis://127.0.0.1:6379/{db}", "PYTHONPATH": str(REPO)}
    result = _cli("sweep", tmp_path / "s.yaml", env=env)
    assert result.returncode == 1
    assert "cannot reach the database" in result.stderr and "Nothing was written" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    assert client.dbsize() == 0  # no orphan message
    env["REALFAKE_DATABASE_URL"] = f"sqlite:///{tmp_path / 'ok.db'}"
    env["REALFAKE_BROKER_URL"] = "redis://:hunter2@127.0.0.1:9/0"
    result = _cli("sweep", tmp_path / "s.yaml", env=env)
    assert result.returncode == 1 and "cannot reach the broker" in result.stderr and "hunter2" not in result.stderr
    env.pop("REALFAKE_BROKER_URL")
    assert json.loads(_cli("runs", "--json", env=env).stdout) == []


@pytest.mark.slow
@pytest.mark.parametrize("variable, value", [("REALFAKE_SCORE_PRECISION", "fp16"), ("REALFAKE_HEARTBEAT_S", "10s"),
                                             ("REALFAKE_LEASE_GRACE_S", "0"), ("REALFAKE_LEASE_GRACE_S", "20"),
                                             ("REALFAKE_BROKER_POLL_S", "0.001")])
def test_an_unusable_setting_is_named_before_anything_starts(tmp_path, variable, value):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALFAKE_")} | {
        "REALFAKE_HOME": str(tmp_path / ".realfake"), "PYTHONPATH": str(REPO), variable: value}
    for command in (["realfake-scheduler", "runs"], ["realfake-worker"]):
        result = subprocess.run([str(Path(sys.executable).parent / command[0]), *command[1:]], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and variable in result.stderr and value in result.stderr, (command, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / ".realfake").exists()  # nothing written


@pytest.mark.parametrize("url", ["postgres://realfake:hunter2@127.0.0.1/x", "hunter2@nowhere"])
def test_a_database_url_no_engine_takes_is_named_without_its_password(tmp_path, url):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALFAKE_")} | {
        "REALFAKE_HOME": str(tmp_path), "PYTHONPATH": str(REPO), "REALFAKE_DATABASE_URL": url}
    result = _cli("runs", env=env)
    assert result.returncode == 2 and "REALFAKE_DATABASE_URL" in result.stderr, result.stderr
    assert "postgresql+psycopg://USER:PASSWORD@HOST" in result.stderr and "hunter2" not in result.stderr
    assert "Traceback" not in result.stderr


def test_scoring_cli_on_bad_inputs_reports_errors_in_its_exit_status(tmp_path, mobilenet_weights):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALFAKE_")} | {
        "REALFAKE_HOME": str(tmp_path / ".realfake"), "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    data = make_synthetic(tmp_path / "data", per_class=20, size=32)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(_spec(data) | {
        "base": {"backbone": "mobilenet_v2", "weights": str(mobilenet_weights), "epochs": 1, "resize": 32,
                 "image_size": 32}}))
    assert _cli("sweep", tmp_path / "s.yaml", "--local", env=env).returncode == 0
    folder = tmp_path / "in"
    expected = make_bad_folder(folder, tmp_path / "outside.jpg")
    out = tmp_path / "p.csv"
    result = _cli("score", folder, "--out", out, "--local", "--workers", "2", "--shard-size", "3", env=env)
    assert result.returncode == 1, result.stderr
    with out.open() as handle:
        rows = {Path(r["path"]).relative_to(folder).as_posix(): r for r in csv.DictReader(handle)}
    assert set(rows) == set(expected)
    assert {p for p, r in rows.items() if r["error"]} == {p for p, ok in expected.items() if not ok}
    (tmp_path / "empty").mkdir()
    result = _cli("score", tmp_path / "empty", "--out", tmp_path / "e.csv", env=env)
    assert result.returncode == 0 and (tmp_path / "e.csv").read_text().strip() == "path,p_fake,label,error"
    assert _cli("score", tmp_path / "nowhere", env=env).returncode == 2
    assert _cli("score", folder, "--model", "latest", env=env).returncode == 2
    assert _cli("score", folder, "--batch-size", "0", env=env).returncode == 2
    for command in (["score", folder, "--model", "1"], ["report", "1"]):  # refused before any work
        result = _cli(*command, "--out", tmp_path, env=env)
        assert result.returncode == 2 and "--out" in result.stderr and "is a folder" in result.stderr, result.stderr


def test_stalled_jobs_get_their_missing_shards_sent_again(tiny_run, tmp_path):
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import update

    from realfake.scoring import resend_missing_shards
    from realfake.store import ScoringJob

    factory, run_id = tiny_run
    make_synthetic(tmp_path / "imgs", per_class=4, size=16)
    with session_scope(factory) as session:
        job_id = create_scoring_job(session, run_id, tmp_path / "imgs", shard_size=3).id  # shards of 3, 3, 2
    score_shard(factory, job_id, 1)
    long_ago = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=2)
    assert resend_missing_shards(factory, after_s=3600) == []  # progress just now
    with session_scope(factory) as session:
        session.execute(update(ScoringJob).where(ScoringJob.id == job_id).values(progress_at=long_ago))
    assert resend_missing_shards(factory, after_s=3600) == [(job_id, 0), (job_id, 2)]
    assert resend_missing_shards(factory, after_s=3600) == []  # at most once per period
    time.sleep(3.5)  # and again after another period, though SQLite stamped that resend as text
    assert resend_missing_shards(factory, after_s=2) == [(job_id, 0), (job_id, 2)]

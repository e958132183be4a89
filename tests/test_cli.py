"""The scheduler CLI as a user runs it: subprocesses, on the embedded default (filesystem
broker, SQLite), with worker processes started by `--local`."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from realfake.config import TrainConfig
from realfake.synthetic import make_synthetic
from tests.conftest import REPO

# `realfake-scheduler ARGS` (its entry point, `scheduler.cli:main`), which then names on a
# last line of stderr the heavy libraries the scheduler's own process loaded (its --local
# workers are processes of their own). `loaded` stays None if that line is missing.
LOADED_MARKER = "@@heavy-imports@@"
TRACED_CLI = f"""
import atexit, sys
atexit.register(lambda: print("\\n{LOADED_MARKER}", *sorted({{"torch", "torchvision", "sklearn"}} & set(sys.modules)),
                              file=sys.stderr))
sys.argv[0] = "realfake-scheduler"
from scheduler.cli import main
main()
"""


def cli(*args, env, cwd, timeout=600):
    result = subprocess.run(
        [sys.executable, "-c", TRACED_CLI, *map(str, args)],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )
    result.loaded = None
    head, marker, loaded = result.stderr.rpartition("\n" + LOADED_MARKER)
    if marker:
        result.stderr, result.loaded = head, set(loaded.split())
    return result


@pytest.fixture(scope="module")
def home(tmp_path_factory, mobilenet_weights):
    """An empty folder with the torch cache holding MobileNetV2's weights, as `make` sets up."""
    root = tmp_path_factory.mktemp("cli")
    cache = root / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    shutil.copy(mobilenet_weights, cache)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALFAKE_")}
    env |= {"TORCH_HOME": str(root / "torch"), "PYTHONPATH": str(REPO), "REALFAKE_HOME": str(root / ".realfake"),
            "COLUMNS": "200"}
    return root, env


def sweep_file(path, data, lrs, epochs=3) -> str:
    path.write_text(yaml.safe_dump({
        "name": "cli-test",
        "data": str(data),
        "split": {"val": 0.2, "test": 0.2, "seed": 0},
        "metric": {"name": "accuracy", "goal": "maximize"},
        "method": "grid",
        "parameters": {"lr": {"values": lrs}},
        "base": {"backbone": "mobilenet_v2", "weights": "imagenet", "resize": 72, "image_size": 64,
                 "rotation": 5, "color_jitter": 0.1, "batch_size": 16, "epochs": epochs, "seed": 1,
                 "precision": "fp32"},  # auto takes bf16 on CPUs with it: thresholds below are for fp32
        "early_terminate": {"type": "asha", "min_epochs": 1, "reduction_factor": 3},
    }))
    return str(path)


@pytest.fixture(scope="module")
def finished_sweep(home):
    root, env = home
    data = make_synthetic(root / "data", per_class=100, size=64, seed=0)
    spec = sweep_file(root / "sweep.yaml", data, [1e-3, 1e-8])
    # One local worker takes the runs in variant order, so the weak run reaches the first
    # rung after the strong one; the other way round asynchronous halving lets it go on.
    result = cli("sweep", spec, "--local", "--workers", "1", "--json", env=env, cwd=root)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_a_sweep_with_asha_prunes_the_weakest_variant(home, finished_sweep):
    root, env = home
    leaderboard = finished_sweep
    by_lr = {}
    for row in leaderboard:
        detail = json.loads(cli("show", row["id"], "--json", env=env, cwd=root).stdout)
        by_lr[detail["config"]["lr"]] = row
    strong, weak = by_lr[1e-3], by_lr[1e-8]
    assert (strong["status"], strong["epochs_done"]) == ("succeeded", 3)
    assert (weak["status"], weak["epochs_done"]) == ("pruned", 1)  # stopped at the first rung
    assert [r["id"] for r in leaderboard] == [strong["id"], weak["id"]]  # best first
    assert strong["val"]["accuracy"] >= 0.9 and strong["test"]["accuracy"] is not None

    runs = json.loads(cli("runs", "--sweep", "1", "--json", env=env, cwd=root).stdout)
    assert [r["id"] for r in runs] == [r["id"] for r in leaderboard]


@pytest.mark.slow
def test_scoring_a_folder_writes_one_csv_row_per_file(home, finished_sweep, tmp_path):
    root, env = home
    folder = tmp_path / "incoming"
    (folder / "sub dir").mkdir(parents=True)
    images = sorted((root / "data" / "fake").iterdir())[:4] + sorted((root / "data" / "real").iterdir())[:4]
    for index, image in enumerate(images):
        shutil.copy(image, folder / ("sub dir" if index % 3 == 0 else "") / image.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (folder / "notes.txt").write_text("not an image name: not scored")
    out = tmp_path / "preds.csv"

    result = cli("score", folder, "--model", "best", "--out", out, "--local", "--shard-size", "3", "--json",
                 env=env, cwd=root)

    assert result.returncode == 1, result.stderr  # one file could not be scored
    assert result.loaded == set()  # the models are the workers': the scheduler starts without torch
    summary = json.loads(result.stdout)
    assert (summary["files"], summary["scored"], summary["errors"]) == (9, 8, 1)
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9 and len({r["path"] for r in rows}) == 9
    by_name = {os.path.basename(r["path"]): r for r in rows}
    assert by_name["broken.jpg"]["error"] and not by_name["broken.jpg"]["p_fake"]
    for image in images:
        row = by_name[image.name]
        assert row["label"] in {"real", "fake"}
        assert 0.0 <= float(row["p_fake"]) <= 1.0 and not row["error"]
    labels = [by_name[i.name]["label"] for i in images]
    assert sum(l == ("fake" if "fake" in i.parent.name else "real") for l, i in zip(labels, images)) >= 6

    report = tmp_path / "report.html"
    result = cli("report", str(summary["run_id"]), "--out", report, env=env, cwd=root)
    assert result.returncode == 0, result.stderr
    assert "torch" in result.loaded  # the report's ROC curve comes from the run's model
    page = report.read_text()
    assert page.count("data:image/png;base64") == 2 and "predicted fake" in page and "ROC" in page


@pytest.mark.slow
def test_an_ensemble_scores_the_mean_p_fake_of_its_runs(home, finished_sweep, tmp_path):
    root, env = home
    folder = tmp_path / "few"
    folder.mkdir()
    for image in sorted((root / "data" / "fake").iterdir())[:3] + sorted((root / "data" / "real").iterdir())[:3]:
        shutil.copy(image, folder / image.name)
    ids = [r["id"] for r in finished_sweep]

    def p_fake(model: str, *options: str) -> tuple[list[int], dict[str, float]]:
        result = cli("score", folder, "--model", model, *options, "--local", "--json", env=env, cwd=root)
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        if options:  # --tta --threshold 0: every file reaches the cut-off
            assert summary["tta"] and summary["threshold"] == 0.0 and summary["fake"] == summary["scored"] == 6
        return summary["run_ids"], {os.path.basename(r["path"]): r["p_fake"] for r in summary["predictions"]}

    (first,), alone = p_fake(str(ids[0]))
    (second,), other = p_fake(str(ids[1]))
    both_ids, both = p_fake(f"{ids[0]},{ids[1]}")
    assert (first, second, both_ids) == (ids[0], ids[1], ids)
    for name, p in both.items():
        assert p == pytest.approx((alone[name] + other[name]) / 2, abs=1e-4)
    assert len(set(alone.values())) > 1 and alone != other
    _, mirrored = p_fake(str(ids[0]), "--tta", "--threshold", "0")
    assert mirrored.keys() == alone.keys() and mirrored != pytest.approx(alone, abs=1e-4)
    human = cli("score", folder, "--model", str(ids[0]), "--local", env=env, cwd=root)  # no --out: the rows stay in SQL
    assert human.returncode == 0 and "6 scored" in human.stdout and "--out FILE writes the rows as CSV" in human.stdout
    job_id = human.stdout.split("job ", 1)[1].split(":", 1)[0]
    fetched = cli("job", job_id, "--out", tmp_path / "later.csv", env=env, cwd=root)  # and come back later
    assert fetched.returncode == 0 and "6 scored" in fetched.stdout and fetched.loaded == set()
    with (tmp_path / "later.csv").open() as handle:
        assert {os.path.basename(r["path"]): float(r["p_fake"]) for r in csv.DictReader(handle)} == pytest.approx(alone)
    assert cli("job", "999", env=env, cwd=root).returncode == 2

    result = cli("score", folder, "--model", "top2", "--sweep", "1", env=env, cwd=root)
    assert result.returncode == 2 and "1 succeeded run, fewer than 2" in result.stderr


@pytest.mark.slow
def test_job_says_when_rows_are_still_missing_and_waits_for_them(home, finished_sweep, tmp_path, monkeypatch):
    from realfake.config import Settings
    from realfake.inference import score_shard
    from realfake.scoring import create_scoring_job
    from realfake.store import make_engine, migrate, session_factory, session_scope

    root, env = home
    folder = tmp_path / "queued"
    folder.mkdir()
    for image in sorted((root / "data" / "real").iterdir())[:4]:
        shutil.copy(image, folder / image.name)
    factory = session_factory(engine := make_engine(Settings.from_env(env).database_url))
    migrate(engine)
    with session_scope(factory) as session:  # submitted, with no worker to score it yet
        job_id = create_scoring_job(session, finished_sweep[0]["id"], folder, shard_size=2).id

    pending = cli("job", job_id, "--out", tmp_path / "part.csv", env=env, cwd=root)
    assert pending.returncode == 3 and "4 not scored yet" in pending.stdout, pending.stderr
    assert f"`job {job_id} --wait` waits for the rest" in pending.stderr
    waiting = subprocess.Popen(
        [sys.executable, "-c", TRACED_CLI, "job", str(job_id), "--wait", "--out", str(tmp_path / "all.csv")],
        env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(3)  # still waiting for the rows
        monkeypatch.setenv("TORCH_HOME", env["TORCH_HOME"])
        for shard in (0, 1):  # scored here, as a worker would
            score_shard(factory, job_id, shard)
        stdout, stderr = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    assert waiting.returncode == 0, stderr
    assert "4 scored" in stdout and "not scored yet" not in stdout
    with (tmp_path / "all.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 4
    engine.dispose()
    result = cli("score", folder, "--model", "worst", env=env, cwd=root)
    assert result.returncode == 2 and "'topN'" in result.stderr
    result = cli("score", folder, "--threshold", "1.5", env=env, cwd=root)
    assert result.returncode == 2 and "--threshold" in result.stderr


@pytest.mark.slow
def test_evaluate_reports_the_test_split_per_group_and_shortcut_free(home, finished_sweep):
    root, env = home
    strong = finished_sweep[0]["id"]
    result = cli("evaluate", strong, "--json", env=env, cwd=root)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    test = report["test"]
    assert test["n"] == 40 and set(test["groups"]) == {"easy", "hard", "real"}  # 20% of 200, by group
    assert report["val"]["n"] == 40  # the part that chose the cut-off, reported beside the test
    assert sum(g["n"] for g in test["groups"].values()) == test["n"]
    for part in [test, *test["groups"].values()]:
        low, high = part["accuracy_ci95"] if "accuracy_ci95" in part else part["ci95"]
        assert low <= part["accuracy"] <= high
    # the strong run has learnt (chance is 0.5); one face of 40 is 0.025, and the exact count
    # moves with the CPU's float kernels (0.875 on one machine, 0.9 and more on another)
    assert test["accuracy"] >= 0.8 and 0.0 <= report["threshold"] <= 1.0
    assert "faces judged" in result.stderr and "80/80" in result.stderr  # the bar: 40 validation + 40 test faces
    # every synthetic image is saved at one JPEG quality: nothing is left out as a shortcut
    assert report["test_shortcut_free"]["n"] == test["n"]

    ids = [r["id"] for r in finished_sweep]
    ensemble = cli("evaluate", *ids, "--tta", "--threshold", "0.5", "--json", env=env, cwd=root)
    assert ensemble.returncode == 0, ensemble.stderr
    both = json.loads(ensemble.stdout)
    assert both["runs"] == ids and both["tta"] and both["threshold"] == 0.5 and both["test"]["n"] == 40
    cropped = cli("evaluate", strong, "--crops", "--tta", "--json", env=env, cwd=root)  # five 64-px crops of the 72-px face
    assert cropped.returncode == 0, cropped.stderr
    five = json.loads(cropped.stdout)
    assert five["crops"] and five["tta"] and five["test"]["n"] == 40 and five["test"] != report["test"]
    top = json.loads(cli("evaluate", "--top", "1", "--sweep", "1", "--json", env=env, cwd=root).stdout)
    assert top["runs"] == [strong] and top["test"] == report["test"]

    table = cli("evaluate", strong, env=env, cwd=root)
    assert table.returncode == 0 and "shortcut-free" in table.stdout and "group hard" in table.stdout
    assert "validation" in table.stdout
    for args, message in [(("999",), "no such run: 999"), (("--top", "2", "--sweep", "1"), "1 succeeded run, fewer than 2"),
                          ((str(strong), "--threshold", "high"), "--threshold"),
                          ((str(strong), "--sweep", "1"), "not both")]:  # --sweep is for --top: not ignored
        result = cli("evaluate", *args, env=env, cwd=root)
        assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.slow
def test_a_cross_validated_sweep_is_evaluated_out_of_fold(home, tmp_path):
    root, env = home
    env = env | {"REALFAKE_HOME": str(tmp_path / ".realfake")}
    data = make_synthetic(tmp_path / "data", per_class=30, size=48, seed=2)
    spec = tmp_path / "cv.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "cv", "data": str(data), "split": {"test": 0.2, "folds": 2},
        "base": {"backbone": "mobilenet_v2", "weights": "imagenet", "resize": 48, "image_size": 32,
                 "batch_size": 16, "epochs": 1, "precision": "fp32"},
    }))
    dry = cli("sweep", spec, "--dry-run", env=env, cwd=root)
    assert dry.returncode == 0 and "each variant trains 2 runs, one per fold" in dry.stdout, dry.stderr

    result = cli("sweep", spec, "--local", "--json", env=env, cwd=root)
    assert result.returncode == 0, result.stderr
    runs = json.loads(result.stdout)
    assert sorted(r["fold"] for r in runs) == [0, 1] and {r["status"] for r in runs} == {"succeeded"}
    assert "fold" in cli("runs", env=env, cwd=root).stdout
    logged = cli("runs", env={k: v for k, v in env.items() if k != "COLUMNS"}, cwd=root).stdout  # piped, no COLUMNS
    assert "succeeded" in logged and "…" not in logged  # whole cells, not Rich's 80-column guess
    variants = cli("runs", "--sweep", "1", env=env, cwd=root).stdout  # what `best` and `topN` rank
    assert "mean over their 2 folds" in variants and "2/2" in variants

    report = json.loads(cli("evaluate", "--top", "1", "--json", env=env, cwd=root).stdout)  # the variant's folds
    assert sorted(report["runs"]) == sorted(r["id"] for r in runs)
    assert report["out_of_fold"] and report["val"]["n"] == 48 and report["test"]["n"] == 12  # 60 faces
    single = json.loads(cli("evaluate", str(runs[0]["id"]), "--json", env=env, cwd=root).stdout)
    assert not single["out_of_fold"] and single["val"]["n"] == 24
    human = cli("evaluate", "--top", "1", env=env, cwd=root)
    assert "validation, out of fold" in human.stdout
    folds = ",".join(map(str, report["runs"]))  # how to label new files as this judged the test
    assert f"score FOLDER --model {folds} --threshold {report['threshold']!r}" in " ".join(human.stderr.split())


def test_a_bad_sweep_is_rejected_before_anything_is_written(home, tmp_path):
    root, env = home
    env = env | {"REALFAKE_HOME": str(tmp_path / ".realfake")}
    data = make_synthetic(tmp_path / "data", per_class=10, size=32)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "data": str(data), "parameters": {"lr": {"value": [1]}}}))
    result = cli("sweep", bad, env=env, cwd=tmp_path)
    assert result.returncode == 2 and "parameters.lr.value: unknown key" in result.stderr

    missing = sweep_file(tmp_path / "missing.yaml", tmp_path / "nowhere", [1e-3])
    for dry_run in ([], ["--dry-run"]):  # a dry run makes every check the sweep makes
        result = cli("sweep", missing, *dry_run, env=env, cwd=tmp_path)
        assert result.returncode == 2 and "data: folder" in result.stderr and "does not exist" in result.stderr
    odd = tmp_path / "faces[/old]"  # printed as it is, not read as a Rich closing tag
    result = cli("sweep", missing, "--dry-run", "--data", odd, env=env, cwd=tmp_path)
    assert result.returncode == 2 and f"data: folder {odd} does not exist" in result.stderr, result.stderr
    (tmp_path / "range.yaml").write_text(yaml.safe_dump({"name": "x", "data": str(data), "base": {"jpeg_quality": [95, 40]}}))
    result = cli("sweep", tmp_path / "range.yaml", env=env, cwd=tmp_path)
    assert result.returncode == 2 and "jpeg_quality must be [low, high]" in result.stderr, result.stderr

    result = cli("sweep", sweep_file(tmp_path / "ok.yaml", data, [1e-3, 1e-4]), "--dry-run", env=env, cwd=tmp_path)
    assert result.returncode == 0 and "variant 1: lr=0.0001" in result.stdout
    assert f"data {data}: train 12, val 4, test 4 images" in result.stdout  # 20 faces at val 0.2, test 0.2
    result = cli("runs", "--json", env=env, cwd=tmp_path)
    assert json.loads(result.stdout) == [] and result.loaded == set()  # nothing written; no torch loaded

    result = cli("sweep", tmp_path / "ok.yaml", "--json", env=env, cwd=tmp_path)  # no worker is running
    assert result.returncode == 0 and result.loaded == set()
    assert json.loads(result.stdout) == {"sweep_id": 1, "run_ids": [1, 2]}
    assert "no live worker consumes the 'train' queue" in result.stderr
    runs = json.loads(cli("runs", "--json", env=env, cwd=tmp_path).stdout)
    assert [r["status"] for r in runs] == ["waiting", "waiting"]

    result = cli("cancel", "--sweep", "1", env=env, cwd=tmp_path)
    assert result.returncode == 0 and "run 1: cancelled" in result.stdout and result.loaded == set()
    result = cli("show", "1", "--json", env=env, cwd=tmp_path)
    assert json.loads(result.stdout)["status"] == "cancelled"
    assert result.loaded == set()  # commands that only read and write SQL start without torch or scikit-learn
    assert cli("show", "99", env=env, cwd=tmp_path).returncode == 2
    assert cli("show", "abc", env=env, cwd=tmp_path).returncode == 2
    result = cli("score", tmp_path / "nowhere", "--model", "1", env=env, cwd=tmp_path)
    assert result.returncode == 2 and result.loaded == set()
    result = cli("evaluate", "1", env=env, cwd=tmp_path)  # evaluating runs models: it loads torch
    assert result.returncode == 2 and "no checkpoint" in result.stderr and "torch" in result.loaded
    assert "faces judged" not in result.stderr  # said before any progress bar

    keys = cli("keys", "--json", env=env, cwd=tmp_path)  # the reference for sweep files' base and parameters
    assert keys.returncode == 0 and keys.loaded == set()
    by_key = {row["key"]: row for row in json.loads(keys.stdout)}
    assert set(by_key) == set(TrainConfig.model_fields) and all(row["description"] for row in by_key.values())
    assert by_key["optimizer"]["values"] == "adam | adamw | sgd" and by_key["lr"]["default"] == 1e-4
    assert by_key["jpeg_quality"]["values"] == "[integer, integer] or null"

    lost = yaml.safe_load((tmp_path / "ok.yaml").read_text())  # weights a worker cannot find
    lost["base"]["weights"] = str(tmp_path / "nowhere.pth")
    (tmp_path / "lost.yaml").write_text(yaml.safe_dump(lost | {"max_attempts": 1, "parameters": {}}))
    result = cli("sweep", tmp_path / "lost.yaml", "--local", env=env, cwd=tmp_path)
    assert result.returncode == 1 and "run 3 failed:" in result.stderr and "nowhere.pth" in result.stderr
    assert "run 3: already failed, nothing to cancel" in cli("cancel", "3", env=env, cwd=tmp_path).stdout
    shutil.copy(next((root / "torch" / "hub" / "checkpoints").glob("mobilenet_v2-*.pth")), tmp_path / "nowhere.pth")
    result = cli("retry", "3", "--local", env=env, cwd=tmp_path)  # the cause fixed: trained again, attempts anew
    assert result.returncode == 0, result.stderr
    assert json.loads(cli("show", "3", "--json", env=env, cwd=tmp_path).stdout)["status"] == "succeeded"
    result = cli("retry", "3", env=env, cwd=tmp_path)
    assert result.returncode == 2 and "run 3 is succeeded: only failed or cancelled runs are retried" in result.stderr


@pytest.mark.slow
def test_demo_runs_the_whole_loop(home, tmp_path):
    root, env = home
    result = cli("demo", "--dir", tmp_path / "demo", "--epochs", "2", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "demo" / "report.html").is_file()
    hint = result.stdout.rsplit("Try: ", 1)[1].split()  # a command to paste as it stands
    assert hint[0] == f"REALFAKE_HOME={tmp_path / 'demo' / '.realfake'}" and shutil.which(hint[1]) and hint[2:] == ["runs"]
    with (tmp_path / "demo" / "predictions.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 40


@pytest.mark.slow
def test_ctrl_c_in_a_local_sweep_hands_its_run_back_and_says_how_to_go_on(home, tmp_path):
    import signal

    from realfake.config import Settings
    from realfake.store import Run, make_engine, session_factory, session_scope

    root, env = home
    env = env | {"REALFAKE_HOME": str(tmp_path / ".realfake")}
    data = make_synthetic(tmp_path / "data", per_class=60, size=64, seed=3)
    spec = sweep_file(tmp_path / "long.yaml", data, [1e-3], epochs=40)
    sweeping = subprocess.Popen([sys.executable, "-c", TRACED_CLI, "sweep", spec, "--local"], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    factory = session_factory(engine := make_engine(Settings.from_env(env).database_url))

    def epochs_done() -> int:
        try:
            with session_scope(factory) as session:
                run = session.get(Run, 1)
                return run.epochs_done if run else 0
        except Exception:  # the database not made yet
            return 0

    try:
        deadline = time.monotonic() + 180
        while epochs_done() < 1 and time.monotonic() < deadline and sweeping.poll() is None:
            time.sleep(0.5)
        sweeping.send_signal(signal.SIGINT)  # Ctrl-C
        _, stderr = sweeping.communicate(timeout=90)
    finally:
        sweeping.kill()
    assert sweeping.returncode == 130, stderr
    assert "interrupted: stopping the local workers" in stderr
    assert "sweep 1's unfinished runs wait in the queue" in stderr and "cancel --sweep 1" in stderr
    with session_scope(factory) as session:
        run = session.get(Run, 1)
        assert (run.status.value, run.worker, run.max_attempts) == ("waiting", None, 4)  # handed back, not lost
        assert 1 <= run.epochs_done < 40
    assert any((tmp_path / ".realfake" / "broker" / "queue").iterdir())  # its message, for the next worker
    assert "run 1: cancelled" in cli("cancel", "--sweep", "1", env=env, cwd=tmp_path).stdout
    engine.dispose()


@pytest.mark.slow
def test_ctrl_c_in_local_scoring_leaves_the_rest_to_a_worker_and_loses_no_file(home, finished_sweep, tmp_path):
    import re
    import signal

    from realfake.config import Settings
    from realfake.scoring import rows_written
    from realfake.store import make_engine, session_factory, session_scope
    from scheduler.local import WorkerProcess, wait_for

    root, env = home
    folder = tmp_path / "many"
    folder.mkdir()
    images = sorted((root / "data" / "real").iterdir()) + sorted((root / "data" / "fake").iterdir())
    for copy in range(3):  # 600 files, one a task: far more than the local worker scores before the Ctrl-C
        for image in images:
            shutil.copy(image, folder / f"{copy}-{image.parent.name}-{image.name}")
    scoring = subprocess.Popen(
        [sys.executable, "-c", TRACED_CLI, "score", str(folder), "--model", "best", "--shard-size", "1", "--local"],
        env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    factory = session_factory(engine := make_engine(Settings.from_env(env).database_url))
    try:
        job_id = wait_for(lambda: _latest_job(factory, folder), 120, what="the scoring job")

        def written() -> int:
            with session_scope(factory) as session:
                return rows_written(session, job_id)

        wait_for(lambda: written() >= 3 or scoring.poll() is not None, 180, what="the first rows")
        scoring.send_signal(signal.SIGINT)  # Ctrl-C
        _, stderr = scoring.communicate(timeout=90)
    finally:
        scoring.kill()
    assert scoring.returncode == 130, stderr
    assert f"job {job_id}'s unscored files wait in the queue" in stderr
    assert f"job {job_id} --wait --out FILE" in stderr
    assert re.search(rf"scoring job {job_id}: 600 files in 600 shards", stderr)
    left_off = written()
    assert 3 <= left_off < 600

    worker = WorkerProcess(env, "resume@test", tmp_path / "logs", queues="score")  # the hint's `realfake-worker`
    try:
        worker.wait_ready()
        result = cli("job", job_id, "--wait", "--out", tmp_path / "all.csv", env=env, cwd=root, timeout=300)
    finally:
        worker.stop()
    assert result.returncode == 0, result.stderr + worker.log()[-3000:]
    with (tmp_path / "all.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(os.path.basename(r["path"]) for r in rows) == sorted(p.name for p in folder.iterdir())
    assert all(r["label"] in {"real", "fake"} and not r["error"] for r in rows)
    engine.dispose()


def _latest_job(factory, folder) -> int | None:
    """The id of the newest scoring job over `folder`, once the scheduler has made it."""
    from sqlalchemy import select

    from realfake.store import ScoringJob, session_scope

    try:
        with session_scope(factory) as session:
            return session.scalar(select(ScoringJob.id).where(ScoringJob.folder == str(folder))
                                  .order_by(ScoringJob.id.desc()).limit(1))
    except Exception:  # the tables not made yet
        return None

"""The compose file: its structure, and every command it runs, run here outside Docker
(real Redis, PostgreSQL, a worker and Flower)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

from realfake.scoring import create_scoring_job
from realfake.store import JobStatus, RunStatus, ScoringJob, session_scope
from realfake.synthetic import make_synthetic
from tests.cluster import config, new_run, run_state, wait_finished, wait_for
from tests.conftest import REPO

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
BIN = Path(sys.executable).parent
SECRET = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH", re.I)


def test_the_cluster_services_are_there():
    assert {"redis", "postgres", "migrate", "worker-gpu0", "worker-gpu1", "flower", "scheduler"} <= set(SERVICES)
    for name in ("redis", "postgres", "worker-gpu0", "worker-gpu1", "flower"):
        assert SERVICES[name]["healthcheck"]["test"], name
        assert SERVICES[name]["restart"] == "unless-stopped", name
    assert SERVICES["migrate"]["restart"] == "no"
    assert SERVICES["flower"]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    # Flower's /metrics needs no credentials (checked live below): published on the loopback only
    assert SERVICES["flower"]["ports"] == ["${FLOWER_BIND:-127.0.0.1}:${FLOWER_PORT:-5555}:5555"]
    assert "--appendonly" in SERVICES["redis"]["command"] and "--requirepass" in SERVICES["redis"]["command"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in SERVICES["postgres"]["volumes"])
    for name in ("worker-gpu0", "worker-gpu1"):
        volumes = SERVICES[name]["volumes"]
        assert any(v.endswith(":/data:ro") for v in volumes) and "artifacts:/artifacts" in volumes


def test_each_worker_reserves_its_own_gpu():
    ids = []
    for name in ("worker-gpu0", "worker-gpu1"):
        (device,) = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        ids += device["device_ids"]
    assert ids == ["0", "1"]


def _strings(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _strings(value, f"{path}[{index}]")
    elif isinstance(node, str):
        yield path, node


def test_no_secret_is_written_in_the_file():
    env_secrets = [(p, v) for p, v in _strings(COMPOSE) if SECRET.search(p.rsplit(".", 1)[-1])]
    assert env_secrets  # the Redis, PostgreSQL and Flower credentials are there ...
    for path, value in env_secrets:  # ... each taken from the environment, required
        assert re.fullmatch(r"(\$\{[A-Z_]+:\?[^}]*\}:?)+", value), (path, value)
    for path, value in _strings(COMPOSE):
        for user_pass in re.findall(r"//([^@/\s]*)@", value):  # credentials inside URLs
            assert ":" not in user_pass or "${" in user_pass.split(":", 1)[1], (path, value)
    redis_cmd = SERVICES["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    assert SERVICES["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_USER:?")
    env_example = (REPO / ".env.example").read_text()
    assert re.search(r"^POSTGRES_PASSWORD=$", env_example, re.M) and re.search(r"^REDIS_PASSWORD=$", env_example, re.M)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(service: str, **replace: str) -> list[str]:
    """The service's command as this machine runs it: our console scripts from the venv."""
    argv = [replace.get(arg, arg) for arg in SERVICES[service]["command"]]
    return [str(BIN / argv[0]), *argv[1:]]


def _get(url: str, auth: tuple[str, str] | None = None):
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(":".join(auth).encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read().decode()


@pytest.fixture
def factory(cluster_factory):
    return cluster_factory


@pytest.mark.slow
def test_compose_commands_run_a_cluster_that_flower_reports(factory, cluster_env, producer, tmp_path, monkeypatch):
    env = cluster_env | {"FLOWER_BASIC_AUTH": "ops:s3cret-from-env", "WORKER_NAME": "gpu0",
                         "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    with_password = make_url(env["REALFAKE_DATABASE_URL"]).set(password="pw-from-env")  # trust auth ignores it
    migrate_env = env | {"REALFAKE_DATABASE_URL": with_password.render_as_string(hide_password=False)}
    migrate = subprocess.run(_command("migrate"), env=migrate_env, capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0 and "up to date" in migrate.stdout, migrate.stderr
    assert "***" in migrate.stdout and "pw-from-env" not in migrate.stdout + migrate.stderr

    port = _free_port()
    logs = [open(tmp_path / name, "wb") for name in ("worker.log", "flower.log")]
    procs = [
        subprocess.Popen(_command("worker-gpu0"), env=env, stdout=logs[0], stderr=subprocess.STDOUT,
                         start_new_session=True),
        subprocess.Popen(_command("flower", **{"--port=5555": f"--port={port}"}), env=env, stdout=logs[1],
                         stderr=subprocess.STDOUT, start_new_session=True),
    ]
    base = f"http://127.0.0.1:{port}"
    auth = ("ops", "s3cret-from-env")
    try:
        wait_for(lambda: " ready." in (tmp_path / "worker.log").read_text(), 120, what="the worker")

        def flower_up():
            try:
                return _get(f"{base}/healthcheck")[1] == "OK"
            except (urllib.error.URLError, ConnectionError):
                return False

        wait_for(flower_up, 60, what="Flower")
        health = subprocess.run(["bash", "-c", SERVICES["worker-gpu0"]["healthcheck"]["test"][1].replace("$$", "$")],
                                env=env, capture_output=True, text=True, timeout=60)
        assert health.returncode == 0, health.stdout + health.stderr
        flower_health = SERVICES["flower"]["healthcheck"]["test"][1].replace("5555", str(port))
        assert subprocess.run(["bash", "-c", flower_health], timeout=30).returncode == 0

        data = make_synthetic(tmp_path / "data", per_class=30, size=48)
        run_id = new_run(factory, data, config(epochs=1, resize=48, image_size=48))
        producer.send_task("train_run", args=[run_id], queue="train")
        assert wait_finished(factory, run_id, timeout=180).status is RunStatus.SUCCEEDED
        assert run_state(factory, run_id).worker == f"gpu0@{socket.gethostname()}"
        with session_scope(factory) as session:
            job_id = create_scoring_job(session, run_id, data / "real", shard_size=10).id
        for shard in range(3):
            producer.send_task("score_batch", args=[job_id, shard], queue="score")
        wait_for(lambda: _job(factory, job_id).status is JobStatus.DONE, 120, what="the scoring job")

        def tasks_done():
            tasks = json.loads(_get(f"{base}/api/tasks", auth)[1])
            done = [t for t in tasks.values() if t["state"] == "SUCCESS"]
            return len(done) >= 4 and done

        done = wait_for(tasks_done, 60, what="Flower to see the tasks")
        seen = {(t["name"], t["args"]) for t in done}
        assert ("train_run", f"[{run_id}]") in seen
        assert {f"[{job_id}, {shard}]" for shard in range(3)} <= {a for n, a in seen if n == "score_batch"}
        workers = json.loads(_get(f"{base}/api/workers?refresh=1", auth)[1])
        assert f"gpu0@{socket.gethostname()}" in workers
        queues = json.loads(_get(f"{base}/api/queues/length", auth)[1])
        assert {q["name"] for q in queues["active_queues"]} == {"train", "score"}
        status, metrics = _get(f"{base}/metrics", auth)
        assert status == 200 and 'flower_events_total{' in metrics and "train_run" in metrics
        assert "train_run" in _get(f"{base}/metrics")[1]  # open to anyone: why compose binds the loopback

        for path in ("/api/tasks", "/api/workers", "/"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                _get(base + path)
            assert refused.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as wrong:
            _get(f"{base}/api/tasks", ("ops", "guess"))
        assert wrong.value.code == 401
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for log in logs:
            log.close()
    assert "s3cret-from-env" not in (tmp_path / "flower.log").read_text()


def _job(factory, job_id) -> ScoringJob:
    with session_scope(factory) as session:
        return session.get(ScoringJob, job_id)


def test_scheduler_service_is_the_cli():
    assert SERVICES["scheduler"]["entrypoint"] == ["realfake-scheduler"]
    result = subprocess.run([str(BIN / "realfake-scheduler"), *SERVICES["scheduler"]["command"]],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "sweep" in result.stdout and "score" in result.stdout


def test_dockerfile_builds_on_a_cuda_image_and_installs_the_console_scripts():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM \S*cuda\S*", dockerfile, re.M)
    assert "pip install ." in dockerfile and (user := re.search(r"^USER (?!root)(\S+)", dockerfile, re.M))
    # the artifacts volume's mount point, which a new named volume copies its owner from
    artifacts = re.search(rf"^RUN mkdir -p /artifacts && chown {user[1]} /artifacts$", dockerfile, re.M)
    assert artifacts and artifacts.start() < user.start()
    # torch.compile (`compile: true`) needs a C++ compiler, which CUDA runtime images lack
    assert re.search(r"apt-get install[^\n]*\sg\+\+(\s|$)", dockerfile, re.M)
    commands = {SERVICES[s]["command"][0] for s in ("migrate", "worker-gpu0", "flower")}
    assert commands == {"realfake-scheduler", "realfake-worker", "celery"}
    scripts = shlex.split("realfake-scheduler realfake-worker")
    pyproject = (REPO / "pyproject.toml").read_text()
    assert all(f"{s} = " in pyproject for s in scripts)

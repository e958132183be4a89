"""Helpers for integration tests with real Redis, PostgreSQL and worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from realfake.config import SplitConfig, TrainConfig
from realfake.runs import create_run
from realfake.store import Run, session_scope

REPO = Path(__file__).resolve().parents[1]


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class WorkerProcess:
    """`realfake-worker` in its own process group, so a test can SIGKILL all of it."""

    def __init__(self, env: dict[str, str], name: str, log_dir: Path, queues: str = "train,score"):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.main", "--name", name, "--queues", queues],
            env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> WorkerProcess:
        def ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self.log()}")
            return " ready." in self.log()

        wait_for(ready, timeout, what=f"worker {self.name} to be ready")
        return self

    def kill(self) -> None:
        """SIGKILL the whole worker: parent and pool processes, like a lost machine."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


def config(epochs: int, **overrides) -> TrainConfig:
    values = dict(
        backbone="mobilenet_v2", weights="imagenet", resize=72, image_size=64, rotation=5,
        color_jitter=0.1, lr=1e-3, batch_size=16, epochs=epochs, seed=1,
    )
    return TrainConfig(**(values | overrides))


def new_run(factory, data, cfg) -> int:
    with session_scope(factory) as session:
        return create_run(session, cfg, data, SplitConfig(val=0.2, test=0.2)).id


def run_state(factory, run_id) -> Run:
    with session_scope(factory) as session:
        return session.get(Run, run_id)


def wait_finished(factory, run_id, timeout=240) -> Run:
    return wait_for(lambda: (r := run_state(factory, run_id)).status.is_finished() and r, timeout,
                    what=f"run {run_id} to finish")

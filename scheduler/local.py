"""Worker processes started by the scheduler for the duration of a command (`--local`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class WorkerProcess:
    """`realfake-worker` in its own process group, so all of it can be stopped (or killed)."""

    def __init__(self, env: dict[str, str], name: str, log_dir: Path, queues: str = "train,score", concurrency: int = 1):
        self.name, self._terminated = name, False
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name.replace('@', '_')}.log"
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.main", "--name", name, "--queues", queues, "--concurrency", str(concurrency)],
            env=env | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))},
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> WorkerProcess:
        def ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited; its log {self.log_path}:\n{self.log()[-3000:]}")
            return " ready." in self.log()

        wait_for(ready, timeout, what=f"worker {self.name} to start")
        return self

    def kill(self) -> None:
        """SIGKILL the whole worker, parent and pool, like a lost machine."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:  # nothing of it left
            pass
        self.process.wait(30)

    def terminate(self) -> None:
        """SIGTERM to the main process alone, as `docker compose stop` sends it: a warm shutdown."""
        if self.process.poll() is None and not self._terminated:
            self.process.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout: float = 60) -> None:
        """Warm shutdown as `docker compose stop` asks it, SIGTERM to the main process alone: a
        run being trained is handed back (it goes on elsewhere from its last checkpoint) and
        the worker ends within seconds; killed, with anything left of it, after `timeout` s."""
        self.terminate()
        if self.process.poll() is None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        self._log.close()


class LocalWorkers:
    """`count` workers on this machine, stopped when the block ends."""

    def __init__(self, count: int, log_dir: Path, env: dict[str, str] | None = None):
        self.count, self.log_dir = count, log_dir
        self.env = dict(os.environ if env is None else env)
        threads = max(1, (os.cpu_count() or 1) // count)
        self.env.setdefault("OMP_NUM_THREADS", str(threads))
        self.workers: list[WorkerProcess] = []

    def __enter__(self) -> LocalWorkers:
        host = socket.gethostname()
        stamp = os.getpid()
        self.workers = [
            WorkerProcess(self.env, f"local{i}-{stamp}@{host}", self.log_dir) for i in range(self.count)
        ]
        try:
            for worker in self.workers:
                worker.wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for worker in self.workers:  # all told at once, so their handbacks overlap
            worker.terminate()
        try:
            for worker in self.workers:
                worker.stop()
        except KeyboardInterrupt:  # Ctrl-C again: no more waiting; their runs were handed back or their leases run out
            for worker in self.workers:
                worker.kill()
            raise

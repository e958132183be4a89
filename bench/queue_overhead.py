"""What the queue costs: scoring through Redis and workers against the same work in one
process, and the dispatch latency of an empty task (sent -> started on a worker).

    python bench/queue_overhead.py [--broker-url redis://127.0.0.1:6379/12] [--images 2000]
    python bench/queue_overhead.py --broker-url filesystem:// --poll-s 1.0 0.1 --images 400 --shard-size 10

With the filesystem broker (the embedded default) each `--poll-s` is a worker's interval
between looks at the queue folder (`REALFAKE_BROKER_POLL_S`), measured one after another.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from realfake.config import Settings, SplitConfig, TrainConfig
from realfake.inference import ModelCache, score_shard
from realfake.models import imagenet_weights_cached
from realfake.runs import create_run, train_run
from realfake.scoring import create_scoring_job, rows_written
from realfake.store import (
    make_engine,
    migrate,
    session_factory,
    session_scope,
)
from realfake.synthetic import make_synthetic
from scheduler.local import LocalWorkers, wait_for


def dispatch_latencies(celery, count: int) -> list[float]:
    """Seconds from `task-sent` to `task-started` for `count` empty tasks sent one by one."""
    sent: dict[str, float] = {}
    started: dict[str, float] = {}
    ready = threading.Event()
    listening = {}

    def listen():
        with celery.connection() as connection:
            receiver = listening["receiver"] = celery.events.Receiver(connection, handlers={
                "task-sent": lambda e: sent.__setitem__(e["uuid"], e["timestamp"]),
                "task-started": lambda e: started.__setitem__(e["uuid"], e["timestamp"]),
            })
            ready.set()
            receiver.capture(limit=None, timeout=None, wakeup=True)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    if not ready.wait(10):
        raise TimeoutError("the event listener did not connect to the broker within 10 s")
    time.sleep(1.0)
    ids = []
    for _ in range(count):
        ids.append(celery.send_task("ping", queue="score").id)
        wait_for(lambda: ids[-1] in started, 30, interval=0.002, what="an empty task")
    listening["receiver"].should_stop = True  # before its broker's folder goes
    listener.join(10)
    return [started[i] - sent[i] for i in ids if i in sent]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--pings", type=int, default=200)
    parser.add_argument("--poll-s", type=float, nargs="+", default=[0.1], help="filesystem broker only")
    args = parser.parse_args()
    filesystem = args.broker_url.startswith("filesystem:")
    if not filesystem and args.poll_s != parser.get_default("poll_s"):
        parser.error("--poll-s is for the filesystem broker only: Redis hands messages over at once")
    if not filesystem:
        import redis

        redis.Redis.from_url(args.broker_url).flushdb()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, REALFAKE_HOME=str(tmp / ".realfake"), REALFAKE_BROKER_URL=args.broker_url)
        settings = Settings.from_env(env)
        engine = make_engine(settings.database_url)
        migrate(engine)
        factory = session_factory(engine)
        weights = "imagenet" if imagenet_weights_cached("mobilenet_v2") else "none"
        config = TrainConfig(backbone="mobilenet_v2", weights=weights, resize=32, image_size=32, epochs=1)
        data = make_synthetic(tmp / "train", per_class=30, size=32)
        with session_scope(factory) as session:
            run_id = create_run(session, config, data, SplitConfig(val=0.2, test=0.2)).id
        train_run(factory, run_id, settings.artifacts)
        folder = make_synthetic(tmp / "images", per_class=args.images // 2, size=32, seed=1)

        def new_job():
            with session_scope(factory) as session:
                job = create_scoring_job(session, run_id, folder, batch_size=125, shard_size=args.shard_size)
                return job.id, job.n_shards

        def rows(job_id):
            with session_scope(factory) as session:
                return rows_written(session, job_id)

        cache = ModelCache()
        job_id, n_shards = new_job()
        score_shard(factory, job_id, 0, cache=cache)  # warm the model cache, as a warm worker is
        job_id, n_shards = new_job()
        started = time.perf_counter()
        for shard in range(n_shards):
            score_shard(factory, job_id, shard, cache=cache)
        one_process = args.images / (time.perf_counter() - started)

        threads = torch.get_num_threads()
        queued, latencies = {}, {}
        for poll_s in args.poll_s if filesystem else [None]:
            worker_env = env | {"OMP_NUM_THREADS": str(threads)}
            if poll_s is not None:
                worker_env["REALFAKE_BROKER_POLL_S"] = str(poll_s)
            queued[poll_s], latencies[poll_s] = through_workers(
                Settings.from_env(worker_env), worker_env, tmp / "logs", new_job, rows, args)
        engine.dispose()

    print(f"{args.images} 32x32 images, mobilenet_v2 at 32 px, shards of {args.shard_size}, broker {args.broker_url}, "
          f"SQLite, torch threads {threads}")
    print(f"one process:                        {one_process:7.0f} img/s")
    for poll_s, rate in queued.items():
        broker = "Redis" if poll_s is None else f"filesystem, poll {poll_s:g} s"
        times = sorted(latencies[poll_s])
        p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
        print(f"{broker + ' + 1 worker:':35s}{rate:7.0f} img/s   ratio queued/one process {rate / one_process:.2f} "
              f"(goal >= 0.8); empty task sent -> started, {len(times)} tasks: median {statistics.median(times) * 1000:.1f} ms, "
              f"p99 {p99 * 1000:.1f} ms")


def through_workers(settings, env, log_dir, new_job, rows, args) -> tuple[float, list[float]]:
    """Images a second scored through the broker by one warm worker, and empty-task latencies."""
    from worker.celery import make_app

    celery = make_app(settings)
    with LocalWorkers(1, log_dir, env):
        warm, _ = new_job()
        celery.send_task("score_batch", args=[warm, 0], queue="score")
        wait_for(lambda: rows(warm) >= args.shard_size, 300, what="warm-up")
        job_id, n_shards = new_job()
        started = time.perf_counter()
        for shard in range(n_shards):
            celery.send_task("score_batch", args=[job_id, shard], queue="score")
        wait_for(lambda: rows(job_id) >= args.images, 1800, interval=0.05, what="the job")
        queued = args.images / (time.perf_counter() - started)
        return queued, dispatch_latencies(celery, args.pings)


if __name__ == "__main__":
    main()

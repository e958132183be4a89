"""Scoring load: 20,000 small images through the broker and several worker processes.

Checks that every file has exactly one row, and prints the time and rows per second next
to the same job scored in this one process (no broker, no SQL round trips per shard
beyond the upsert).

    python bench/score_load.py                                   # embedded default in a temp folder
    python bench/score_load.py --broker-url redis://127.0.0.1:6379/13 \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/bench
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from PIL import Image
from sqlalchemy import func, select

from realfake.config import Settings, SplitConfig, TrainConfig
from realfake.inference import ModelCache, score_shard
from realfake.models import imagenet_weights_cached
from realfake.runs import create_run, train_run
from realfake.scoring import create_scoring_job
from realfake.store import (
    Prediction,
    make_engine,
    migrate,
    session_factory,
    session_scope,
)
from realfake.synthetic import make_synthetic
from scheduler.local import LocalWorkers, wait_for


def write_images(folder: Path, count: int, size: int) -> None:
    tiles = make_synthetic(folder.parent / "tiles", per_class=50, size=size, seed=5)
    sources = [Image.open(p).convert("RGB") for p in sorted(tiles.rglob("*.jpg"))]
    for index in range(count):
        sub = folder / f"part{index // 1000:03d}"
        if index % 1000 == 0:
            sub.mkdir(parents=True)
        sources[index % len(sources)].save(sub / f"img_{index:06d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--broker-url")
    parser.add_argument("--database-url")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, REALFAKE_HOME=str(tmp / ".realfake"))
        if args.broker_url:
            env["REALFAKE_BROKER_URL"] = args.broker_url
        if args.database_url:
            env["REALFAKE_DATABASE_URL"] = args.database_url
        settings = Settings.from_env(env)
        engine = make_engine(settings.database_url)
        migrate(engine)
        factory = session_factory(engine)

        weights = "imagenet" if imagenet_weights_cached("mobilenet_v2") else "none"
        config = TrainConfig(backbone="mobilenet_v2", weights=weights, resize=args.size, image_size=args.size,
                             epochs=1, batch_size=32)
        data = make_synthetic(tmp / "train", per_class=40, size=args.size)
        with session_scope(factory) as session:
            run_id = create_run(session, config, data, SplitConfig(val=0.2, test=0.2)).id
        train_run(factory, run_id, settings.artifacts)

        started = time.perf_counter()
        write_images(tmp / "images", args.images, args.size)
        print(f"wrote {args.images} {args.size}x{args.size} JPEGs in {time.perf_counter() - started:.1f}s")

        def job() -> tuple[int, int]:
            with session_scope(factory) as session:
                created = create_scoring_job(session, run_id, tmp / "images", batch_size=256,
                                             shard_size=args.shard_size)
                return created.id, created.n_shards

        def rows(job_id: int) -> tuple[int, int]:
            with session_scope(factory) as session:
                query = select(func.count(), func.count(func.distinct(Prediction.path))).where(Prediction.job_id == job_id)
                return tuple(session.execute(query).one())

        # one process, no broker
        job_id, n_shards = job()
        started = time.perf_counter()
        cache = ModelCache()
        for shard in range(n_shards):
            score_shard(factory, job_id, shard, cache=cache)
        single = time.perf_counter() - started
        assert rows(job_id) == (args.images, args.images)

        # through the broker and worker processes
        from worker.celery import make_app

        celery = make_app(settings)
        with LocalWorkers(args.workers, tmp / "logs", env):
            job_id, n_shards = job()
            started = time.perf_counter()
            for shard in range(n_shards):
                celery.send_task("score_batch", args=[job_id, shard], queue="score")
            wait_for(lambda: rows(job_id)[0] >= args.images, 3600, interval=0.5, what="the job")
            queued = time.perf_counter() - started
        count, distinct = rows(job_id)
        assert count == distinct == args.images, (count, distinct)
        engine.dispose()

        print(f"broker {settings.broker_url.split('@')[-1]}, database {engine.url.get_backend_name()}, "
              f"{n_shards} shards of {args.shard_size}, torch threads per worker "
              f"{os.environ.get('OMP_NUM_THREADS') or max(1, (os.cpu_count() or 1) // args.workers)}")
        print(f"one process:          {single:7.1f}s  {args.images / single:7.0f} rows/s")
        print(f"{args.workers} worker processes:   {queued:7.1f}s  {args.images / queued:7.0f} rows/s")
        print(f"rows: {count}, distinct paths: {distinct}, ratio workers/one process: {single / queued:.2f}")


if __name__ == "__main__":
    main()

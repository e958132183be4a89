"""Scoring speed on the real 600×600 JPEGs: end to end against the model's own speed.

Three figures, measured in one run with the same torch threads:
  forward-only  the scoring model on already-decoded tensors (bf16 autocast + channels_last
                where the CPU has native bf16, BatchNorms folded, as the workers run it),
                also with the BatchNorms left unfolded, side by side
  naive loop    PIL open, torchvision Resize(256)+CenterCrop(224)+ToTensor+Normalize,
                batch 32, DataLoader without workers, fp32
  end to end    realfake's scoring job: folder -> broker -> a warm worker -> rows in SQL
and the share of labels on which bf16 and fp32 agree.

    python bench/score_speed.py [--images 320]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from sqlalchemy import select
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from realfake.config import Settings, SplitConfig, TrainConfig
from realfake.data import load_for_eval, normalize_batch
from realfake.inference import ModelCache, score_shard
from realfake.models import imagenet_weights_cached
from realfake.runs import create_run, train_run
from realfake.samples import discover
from realfake.scoring import create_scoring_job, model_checkpoint, rows_written
from realfake.store import (
    Prediction,
    Run,
    make_engine,
    migrate,
    session_factory,
    session_scope,
)
from scheduler.local import LocalWorkers, wait_for

FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_and_fake_face"


class NaiveFolder(Dataset):
    transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(Image.open(self.paths[i]).convert("RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=FACES)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    samples = discover(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, REALFAKE_HOME=str(tmp / ".realfake"))
        settings = Settings.from_env(env)
        engine = make_engine(settings.database_url)
        migrate(engine)
        factory = session_factory(engine)

        # a model worth scoring with: ImageNet MobileNetV2, head trained one epoch on 200 faces
        train = tmp / "train"
        for sample in samples[:100] + samples[-100:]:
            (train / Path(sample.path).parent).mkdir(parents=True, exist_ok=True)
            shutil.copy(args.data / sample.path, train / sample.path)
        weights = "imagenet" if imagenet_weights_cached("mobilenet_v2") else "none"
        config = TrainConfig(backbone="mobilenet_v2", weights=weights, freeze=19, epochs=1, batch_size=32, lr=1e-3)
        with session_scope(factory) as session:
            run_id = create_run(session, config, train, SplitConfig(val=0.1, test=0.1)).id
        train_run(factory, run_id, settings.artifacts)
        with session_scope(factory) as session:
            checkpoint = model_checkpoint(session.get(Run, run_id))

        folder = tmp / "score"
        folder.mkdir()
        chosen = samples[200 : 200 + args.images]
        for sample in chosen:
            shutil.copy(args.data / sample.path, folder / Path(sample.path).name)
        paths = sorted(folder.iterdir())
        n = len(paths)
        threads = torch.get_num_threads()

        # forward-only on decoded tensors, the workers' precision and memory format, with the
        # BatchNorms folded (as the workers serve it) and not, taking turns
        models = {fold: ModelCache(fold=fold).get(checkpoint) for fold in (True, False)}
        _, cfg, runtime = models[True]
        batch = runtime.to_device(normalize_batch([load_for_eval(p, cfg.resize, cfg.image_size)
                                                   for p in paths[: args.batch_size]]))
        times = {True: [], False: []}
        with torch.inference_mode(), runtime.autocast():
            for model, _, _ in models.values():  # warm-up
                model(batch)
            for _ in range(5):
                for fold, (model, _, _) in models.items():
                    started = time.perf_counter()
                    model(batch)
                    times[fold].append(time.perf_counter() - started)
        forward, unfolded = (args.batch_size / statistics.median(times[fold]) for fold in (True, False))

        # the naive loop, fp32, the model as trained
        fp32_model, _, _ = ModelCache(precision="fp32", fold=False).get(checkpoint)
        fp32_model = fp32_model.to(memory_format=torch.contiguous_format)
        started = time.perf_counter()
        with torch.inference_mode():
            for images in DataLoader(NaiveFolder(paths), batch_size=32):
                fp32_model(images)
        naive = n / (time.perf_counter() - started)

        # bf16 against fp32 labels, same decoding
        def labels(precision):
            with session_scope(factory) as session:
                job_id = create_scoring_job(session, run_id, folder, batch_size=args.batch_size, shard_size=n).id
            score_shard(factory, job_id, 0, cache=ModelCache(precision=precision))
            with session_scope(factory) as session:
                return dict(session.execute(select(Prediction.path, Prediction.label).where(Prediction.job_id == job_id)).all())

        fp32_labels, bf16_labels = labels("fp32"), labels(runtime.autocast_dtype and "bf16" or "fp32")
        agree = sum(fp32_labels[p] == bf16_labels[p] for p in fp32_labels) / len(fp32_labels)

        # end to end through the broker and one warm worker with the same torch threads
        from worker.celery import make_app

        celery = make_app(settings)

        def job_seconds(shard_size: int) -> float:
            with session_scope(factory) as session:
                job = create_scoring_job(session, run_id, folder, batch_size=args.batch_size, shard_size=shard_size)
                job_id, n_shards = job.id, job.n_shards
            started = time.perf_counter()
            for shard in range(n_shards):
                celery.send_task("score_batch", args=[job_id, shard], queue="score")

            def done():
                with session_scope(factory) as session:
                    return rows_written(session, job_id) >= n

            wait_for(done, 1800, interval=0.1, what="the scoring job")
            return time.perf_counter() - started

        worker_env = env | {"OMP_NUM_THREADS": str(threads)}
        with LocalWorkers(1, tmp / "logs", worker_env):
            job_seconds(n)  # warm-up: the worker loads and caches the model
            end_to_end = n / job_seconds(n)
        engine.dispose()

    print(f"{n} JPEGs of {args.data} (600x600), mobilenet_v2, batch {args.batch_size}, torch threads {threads}, "
          f"scoring precision {'bf16' if runtime.autocast_dtype else 'fp32'}, channels_last")
    print(f"forward-only (decoded tensors): {forward:7.1f} img/s")
    print(f"  BatchNorm not folded:         {unfolded:7.1f} img/s   (folded / not: {forward / unfolded:.2f})")
    print(f"naive loop (fp32, no workers):  {naive:7.1f} img/s")
    print(f"end to end (score job, worker): {end_to_end:7.1f} img/s")
    print(f"end to end / forward-only:      {end_to_end / forward:7.2f}   (goal >= 0.85)")
    print(f"end to end / naive loop:        {end_to_end / naive:7.2f}   (goal >= 4)")
    print(f"labels bf16 == fp32:            {agree:7.1%}  of {len(fp32_labels)} images")


if __name__ == "__main__":
    main()

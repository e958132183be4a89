"""Scoring in a worker: each shard of a job through the job's models, one row per file.

A shard never fails because of one file: an unreadable image, or a path that leads out
of the data roots, is a row with an error. Rows are upserted on (job, path), so a shard
that is delivered twice or retried never duplicates them.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from sqlalchemy import func, update
from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from realfake.config import TrainConfig
from realfake.data import (
    decode_on_device,
    load_for_eval,
    normalize_batch,
    normalize_chw,
    read_for_device,
)
from realfake.models import build_model, fold_batchnorm, mean_fake_probability
from realfake.samples import ensure_inside
from realfake.scoring import (
    mark_done_if_complete,
    model_checkpoint,
    shard_lease,
    shard_rows_written,
)
from realfake.store import (
    JobStatus,
    Prediction,
    Run,
    ScoringJob,
    session_scope,
    upsert,
)
from realfake.train import Runtime, load_checkpoint

log = logging.getLogger(__name__)


class ModelCache:
    """Models loaded in this process, keyed by checkpoint file and its modification time."""

    def __init__(self, capacity: int = 2, precision: str = "auto", fold: bool = True):
        self.capacity = capacity
        self.precision = precision  # auto | fp32 | bf16 (see Runtime.for_scoring)
        self.fold = fold  # BatchNorms folded into their convolutions (models.fold_batchnorm)
        self._models: dict[tuple[str, int], tuple[nn.Module, TrainConfig, Runtime]] = {}

    def get(self, path: Path) -> tuple[nn.Module, TrainConfig, Runtime]:
        key = (str(path), path.stat().st_mtime_ns)
        if key not in self._models:
            checkpoint = load_checkpoint(path)
            # the checkpoint carries the weights: build the architecture only
            config = TrainConfig.model_validate(checkpoint["config"] | {"weights": "none"})
            runtime = Runtime.for_scoring(config, self.precision)
            model = build_model(config)
            model.load_state_dict(checkpoint["model"])
            model = (fold_batchnorm(model) if self.fold else model.eval()).to(runtime.device)
            if runtime.channels_last:
                model = model.to(memory_format=torch.channels_last)
            if config.compile:
                model = torch.compile(model, dynamic=True)  # a shard's last batch is smaller
            while len(self._models) >= self.capacity:
                self._models.pop(next(iter(self._models)))
            self._models[key] = (model, config, runtime)
        return self._models[key]


def _load(folder: Path, rel: str, roots: Sequence[Path], load: Callable[[Path, int, int, int], object],
          inputs: Sequence[tuple[int, int, int]]) -> tuple[Path | None, dict | None, str | None]:
    """`load` applied to a file inside the roots at each (resize, crop, grid) of `inputs`:
    (path, {input: what it returned}, None) or the error."""
    try:
        path = ensure_inside(folder / rel, roots)
        return path, {form: load(path, *form) for form in inputs}, None
    except Exception as error:  # any unreadable file is a row with its error, not a failed shard
        return None, None, f"{type(error).__name__}: {error}"


def _device_batch(batch: list, runtime: Runtime, config: TrainConfig) -> tuple[list, torch.Tensor | None]:
    """Decode a batch of `_load(read_for_device)` results on the model's device: (rel, ok, error) rows and the images."""
    readable = [(rel, path, data) for rel, path, data, error in batch if error is None]
    decoded = decode_on_device([(path, data) for _, path, data in readable], runtime.device,
                               config.resize, config.eval_crop, config.crop_grid)
    errors = {rel: error for (rel, _, _), (_, error) in zip(readable, decoded)}
    errors |= {rel: error for rel, _, _, error in batch if error is not None}
    images = [image for image, _ in decoded if image is not None]
    rows = [(rel, errors.get(rel) is None, errors.get(rel)) for rel, *_ in batch]
    return rows, (normalize_chw(torch.stack(images)) if images else None)


def _cpu_batch(batch: list, runtime: Runtime) -> tuple[list, torch.Tensor | None]:
    """A batch of `_load(load_for_eval)` results: (rel, ok, error) rows and the normalised images."""
    pixels = [p for _, _, p, _ in batch if p is not None]
    rows = [(rel, p is not None, error) for rel, _, p, error in batch]
    return rows, (runtime.to_device(normalize_batch(pixels, runtime.device)) if pixels else None)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _mark_done_if_complete(factory: sessionmaker[Session], job_id: int) -> None:
    # Counted after the rows' commit, in a transaction of its own: when the last shards finish
    # at once, each sees the others' committed rows, so the last to commit marks the job done.
    with session_scope(factory) as session:
        mark_done_if_complete(session, job_id)


def _score_files(job_id, shard, files, folder, batch_size, tta, threshold, checkpoints, roots, cache, threads,
                 device_decode) -> list[dict]:
    """One prediction row per file of the shard: P(fake) and label, or the error that kept it from a score."""
    cache.capacity = max(cache.capacity, len(checkpoints))
    models = [cache.get(checkpoint) for checkpoint in checkpoints]
    # An ensemble's runs may differ in input size (a sweep over resolution): each image is
    # decoded once per (resize, crop, crop grid) and every model sees its own.
    by_input: dict[tuple[int, int, int], list[int]] = {}  # (resize, crop, grid) -> indices into models
    for index, (_, config, _) in enumerate(models):
        by_input.setdefault((config.resize, config.eval_crop, config.crop_grid), []).append(index)
    allowed = list(roots) or [folder]
    rows = []
    threads = threads or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(threads) as pool:
        # reading (and CPU decoding) threads run ahead while the models work on the previous batch
        load = read_for_device if device_decode else load_for_eval
        loaded = _batches(pool.map(lambda rel: (rel, *_load(folder, rel, allowed, load, list(by_input))), files), batch_size)
        for batch in loaded:
            p_by_model: list[dict[str, float]] = [{} for _ in models]
            errors: dict[str, str | None] = {}
            for form, members in by_input.items():
                _, config, runtime = models[members[0]]
                at_form = [(rel, path, None if data is None else data[form], error) for rel, path, data, error in batch]
                if device_decode:
                    batch_rows, images = _device_batch(at_form, runtime, config)
                else:
                    batch_rows, images = _cpu_batch(at_form, runtime)
                for rel, ok, error in batch_rows:
                    if not ok:
                        errors.setdefault(rel, error)
                if images is None:
                    continue
                views = [images, images.flip(-1)] if tta else [images]
                decoded = [rel for rel, ok, _ in batch_rows if ok]
                with torch.inference_mode(), runtime.autocast():
                    for index in members:
                        p_fake = mean_fake_probability(models[index][0], views).float().cpu().tolist()
                        p_by_model[index] = dict(zip(decoded, p_fake))
            for rel, *_ in batch:
                # an ensemble's P(fake) is the mean of its models', added in run order
                p = None if rel in errors else sum(by_model[rel] for by_model in p_by_model) / len(models)
                rows.append(
                    {"job_id": job_id, "shard": shard, "path": rel, "p_fake": p, "error": errors.get(rel),
                     "label": None if p is None else ("fake" if p >= threshold else "real")}
                )
    return rows


def score_shard(
    factory: sessionmaker[Session],
    job_id: int,
    shard: int,
    roots: Sequence[Path] = (),
    cache: ModelCache | None = None,
    threads: int | None = None,
    device_decode: bool = False,
    worker: str | None = None,
    heartbeat_s: float = 10.0,
) -> int:
    """Score one shard of a job; returns the number of rows written. While it scores, `worker`
    (default: this host) and this process hold the shard's lease, stamped every `heartbeat_s`.

    `device_decode`: decode JPEGs on the model's device (batched nvJPEG on CUDA). Off by
    default on every device: on an H200 with 16 cores, ResNet50 scored 233 faces a second
    from nvJPEG and 854 from PIL's reduced-scale decoding in 16 threads (bench/gpu.py).
    """
    cache = cache or ModelCache()
    with session_scope(factory) as session:
        job = session.get(ScoringJob, job_id)
        if job is None:
            raise LookupError(f"scoring job {job_id} does not exist")
        if not 0 <= shard < job.n_shards:
            raise LookupError(f"scoring job {job_id} has no shard {shard}")
        files, folder, batch_size = job.shards[shard], Path(job.folder), job.batch_size
        tta, threshold = job.tta, job.threshold
        scored_already = shard_rows_written(session, job_id, shard) == len(files)
        if not scored_already:
            checkpoints = [model_checkpoint(session.get(Run, run_id)) for run_id in job.run_ids or [job.run_id]]
            if job.status is JobStatus.WAITING:
                job.status = JobStatus.RUNNING
    if scored_already:  # a resent or twice-delivered shard: nothing to score again, but the job may still
        _mark_done_if_complete(factory, job_id)  # wait for the mark its first delivery did not live to make
        return 0
    with shard_lease(factory, job_id, shard, f"{worker or socket.gethostname()}:{os.getpid()}", heartbeat_s):
        rows = _score_files(job_id, shard, files, folder, batch_size, tta, threshold, checkpoints, roots, cache,
                            threads, device_decode)
        with session_scope(factory) as session:
            upsert(session, Prediction, rows, keys=("job_id", "path"))
            session.execute(update(ScoringJob).where(ScoringJob.id == job_id).values(progress_at=func.now()))
    _mark_done_if_complete(factory, job_id)
    log.info("job %d shard %d: %d rows, %d errors", job_id, shard, len(rows), sum(r["error"] is not None for r in rows))
    return len(rows)

"""Held-out evaluation of a trained run, or of an ensemble of runs that share a test split.

What a training run records per epoch is enough to pick a model; this is what to report
about it: test metrics with the decision threshold chosen on validation, optional
test-time augmentation (horizontal flip, five crops), accuracy per group with 95% confidence
intervals, and the metrics on the shortcut-free part of the test split (real faces and the
fakes whose JPEG quantization tables also occur among the reals: see `realfake.audit`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from scipy.stats import binomtest
from sklearn.metrics import roc_curve
from sqlalchemy.orm import Session
from torchvision.transforms.v2.functional import five_crop

from realfake.audit import image_metadata
from realfake.config import TrainConfig
from realfake.data import DecodedCache, FaceDataset, eval_transform
from realfake.errors import EvaluationError
from realfake.inference import ModelCache
from realfake.metrics import compute_metrics
from realfake.models import mean_fake_probability
from realfake.samples import Sample, samples_from_json
from realfake.scoring import model_checkpoint
from realfake.store import Run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Predictions:
    val: np.ndarray  # P(fake) per sample, in the order of the run's recorded split
    test: np.ndarray


def predict(checkpoint: Path, root: Path, samples: Sequence[Sample], tta: bool = False,
            cache: ModelCache | None = None, eval_size: int | None = None, crops: bool = False,
            decoded_dir: Path | None = None, on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """P(fake) of each sample; with `tta`, the mean over the image and its mirror image.

    `eval_size`: centre crop instead of the run's own (up to its resize: the whole image).
    `crops`: the mean over five crops of the training size (the four corners and the centre)
    of the square the training crops came from (`eval_size`, else `crop_within`, else the
    whole resized image); with `tta`, each is mirrored too.
    `decoded_dir`: where training keeps its decoded, resized images (`DecodedCache`; the
    artifacts' `cache` folder). Its runs' validation and test faces are read from there
    instead of decoded again, for every run and view; a list not yet there is decoded into it
    once. The pixels are the same; the run's `decode_cache: false` turns it off.
    `on_batch`: called with the number of faces of each batch once it is judged.
    """
    model, config, runtime = (cache or ModelCache()).get(checkpoint)
    if crops:
        eval_size = eval_size or config.crop_within or config.resize
        if eval_size <= config.image_size:
            raise EvaluationError(f"five crops of {config.image_size} px need a larger square than {eval_size} px")
    if eval_size is not None:
        try:
            config = TrainConfig.model_validate(config.model_dump() | {"eval_size": eval_size})
        except ValidationError as error:  # larger than the run's resize, or off its crop grid
            reason = "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())
            raise EvaluationError(f"--eval-size {eval_size} does not fit the run's config: {reason}") from None
    decoded = None
    if decoded_dir is not None and config.decode_cache and samples:
        decoded = DecodedCache(Path(decoded_dir), root, samples, config)
        try:
            decoded.ensure()
        except OSError as error:
            if not (error.filename and Path(error.filename).is_relative_to(decoded_dir)):
                raise  # about an image, not the folder: decoding the files would fail the same way
            log.warning("decoded images not cached in %s (%s): decoding the files", decoded_dir, error)
            decoded = None
    dataset = FaceDataset(root, samples, eval_transform(config, resized=decoded is not None), decoded)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    scores = []
    with torch.inference_mode(), runtime.autocast():
        for images, _, _ in loader:
            images = runtime.to_device(images)
            views = list(five_crop(images, config.image_size)) if crops else [images]
            if tta:
                views += [view.flip(-1) for view in views]
            scores.append(mean_fake_probability(model, views).cpu())
            if on_batch:
                on_batch(len(images))
    return torch.cat(scores).numpy() if scores else np.zeros(0)


def best_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The P(fake) cut-off with the highest accuracy on these (validation) samples."""
    if len(set(labels.tolist())) < 2:
        return 0.5
    _, _, thresholds = roc_curve(labels, scores)
    candidates = np.clip(thresholds, 0.0, 1.0)
    accuracy = [np.mean((scores >= t) == labels) for t in candidates]
    return float(candidates[int(np.argmax(accuracy))])


def wilson_interval(correct: int, total: int) -> tuple[float, float]:
    interval = binomtest(correct, total).proportion_ci(confidence_level=0.95, method="wilson")
    return float(interval.low), float(interval.high)


def shortcut_free(root: Path, samples: Sequence[Sample], reference: Sequence[Sample]) -> np.ndarray:
    """Mask of `samples` that a JPEG-table rule cannot tell apart: every real image, and the
    fakes whose quantization tables occur among the real images of `reference`."""
    real_tables = {image_metadata(root / s.path)["quant_tables"] for s in reference if s.label == 0}
    return np.array([s.label == 0 or image_metadata(root / s.path)["quant_tables"] in real_tables for s in samples])


def summarize(samples: Sequence[Sample], scores: np.ndarray, threshold: float) -> dict:
    """Metrics at `threshold`, with 95% Wilson intervals for the accuracy overall and per group."""
    labels = np.array([s.label for s in samples])
    groups = [s.group for s in samples]
    metrics = compute_metrics(labels.tolist(), scores.tolist(), groups=groups, threshold=threshold).as_dict()
    correct = (scores >= threshold) == labels
    per_group = {}
    for group in metrics.pop("group_accuracy"):
        mask = np.array([g == group for g in groups])
        per_group[group] = {"n": int(mask.sum()), "accuracy": float(correct[mask].mean()),
                            "ci95": wilson_interval(int(correct[mask].sum()), int(mask.sum()))}
    return metrics | {"accuracy_ci95": wilson_interval(int(correct.sum()), len(labels)), "groups": per_group}


def evaluate_runs(session: Session, run_ids: Sequence[int], tta: bool = False, threshold: str = "val",
                  cache: ModelCache | None = None, memo: dict | None = None, eval_size: int | None = None,
                  crops: bool = False, decoded_dir: Path | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Test metrics of one run, or of the mean P(fake) of several that share data and test split.

    Validation scores each face with the runs that held it out: every run, for runs that
    share a split; the runs of its fold, for the folds of a cross-validated sweep (out-of-fold
    predictions, so every face outside test is a validation face).
    `threshold`: "val" picks the cut-off on those validation scores; a number fixes it.
    `eval_size`: the centre crop to evaluate on, instead of each run's own (see `predict`).
    `crops`: the mean over five crops of each run's training size (see `predict`).
    `memo`: a dict kept across calls, so each run's predictions are computed once.
    `decoded_dir`: training's decoded images, read instead of the files (see `predict`).
    `progress`: called with (faces judged, faces to judge) as the runs' predictions come in.
    """
    runs = [session.get(Run, run_id) for run_id in run_ids]
    missing = [run_id for run_id, run in zip(run_ids, runs) if run is None]
    if missing:
        raise EvaluationError(f"no such run: {', '.join(map(str, missing))}")
    if len({(run.data_root, repr(run.split.get("test"))) for run in runs}) > 1:
        raise EvaluationError("an ensemble needs runs trained on the same data and test split")
    root, parts = Path(runs[0].data_root), {run.id: samples_from_json(run.split) for run in runs}
    test_samples = parts[runs[0].id].get("test")
    if not test_samples:
        raise EvaluationError(f"run {runs[0].id} has no test split")
    cache, memo = cache or ModelCache(), {} if memo is None else memo
    to_judge = list({run.id: run for run in runs if (run.id, tta, eval_size, crops) not in memo}.values())
    checkpoints = {run.id: model_checkpoint(run) for run in to_judge}  # a run not trained yet: said before any work
    total, done = sum(len(parts[run.id].get("val", [])) + len(test_samples) for run in to_judge), 0
    if progress and to_judge:
        progress(done, total)

    def judged(n: int) -> None:
        nonlocal done
        done += n
        progress(done, total)

    on_batch = judged if progress else None
    for run in to_judge:
        checkpoint = checkpoints[run.id]
        memo[run.id, tta, eval_size, crops] = Predictions(
            val=predict(checkpoint, root, parts[run.id].get("val", []), tta, cache, eval_size, crops, decoded_dir, on_batch),
            test=predict(checkpoint, root, test_samples, tta, cache, eval_size, crops, decoded_dir, on_batch),
        )
    predictions = [memo[run.id, tta, eval_size, crops] for run in runs]
    val_samples = sorted({s for run in runs for s in parts[run.id].get("val", [])})
    row = {sample: i for i, sample in enumerate(val_samples)}
    val_sum, val_count = np.zeros(len(val_samples)), np.zeros(len(val_samples))
    for run, p in zip(runs, predictions):
        rows = [row[s] for s in parts[run.id].get("val", [])]
        np.add.at(val_sum, rows, p.val)
        np.add.at(val_count, rows, 1)
    val = val_sum / val_count
    test = np.mean([p.test for p in predictions], axis=0)
    if threshold == "val":
        if not val_samples:
            raise EvaluationError("threshold 'val' needs a validation split")
        cut = best_threshold(np.array([s.label for s in val_samples]), val)
    else:
        cut = float(threshold)
    clean = shortcut_free(root, test_samples, [s for part in parts[runs[0].id].values() for s in part])
    clean_samples = [s for s, keep in zip(test_samples, clean) if keep]
    return {
        "runs": list(run_ids),
        "tta": tta,
        "eval_size": eval_size,
        "crops": crops,
        "threshold": cut,
        "out_of_fold": len({repr(parts[run.id].get("val")) for run in runs}) > 1,
        "val": summarize(val_samples, val, cut) if val_samples else None,
        "test": summarize(test_samples, test, cut),
        "test_shortcut_free": summarize(clean_samples, test[clean], cut),
        "test_at_0.5": summarize(test_samples, test, 0.5),
    }

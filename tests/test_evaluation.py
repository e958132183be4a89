"""Held-out evaluation that needs image files: the shortcut-free part of a split, the crop judged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torchvision.transforms.v2 import functional as F

from realfake import data as data_module
from realfake.config import SplitConfig, TrainConfig, decoded_cache_dir
from realfake.data import FaceDataset, eval_transform
from realfake.errors import EvaluationError, ScoringError
from realfake.evaluation import Predictions, evaluate_runs, predict, shortcut_free
from realfake.inference import ModelCache, score_shard
from realfake.models import fake_probability
from realfake.runs import create_run, create_sweep, train_run
from realfake.samples import discover, samples_from_json
from realfake.scoring import create_scoring_job, model_checkpoint
from realfake.store import (
    Prediction,
    Run,
    make_engine,
    migrate,
    session_factory,
    session_scope,
)
from realfake.sweeps import parse_spec
from realfake.synthetic import make_synthetic


def test_fakes_saved_with_tables_no_real_image_has_are_not_shortcut_free(tmp_path):
    root = make_synthetic(tmp_path / "data", per_class=6, size=32)  # all saved at quality 92
    resaved = sorted((root / "fake").iterdir())[:2]
    for path in resaved:
        Image.open(path).convert("RGB").save(path, quality=40)  # tables of their own
    samples = discover(root)

    mask = shortcut_free(root, samples, reference=samples)

    kept = {s.path for s, keep in zip(samples, mask) if keep}
    assert {s.path for s in samples if s.label == 0} <= kept  # every real face stays
    assert {p.relative_to(root).as_posix() for p in resaved} == {s.path for s in samples} - kept


def test_the_folds_of_a_cross_validated_sweep_are_judged_out_of_fold(tmp_path, synthetic_data):
    """Each validation face is scored by the run that held it out; the test by all runs' mean.
    Predictions are given (through the memo), so this is the bookkeeping alone."""
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    factory = session_factory(engine)
    spec = parse_spec({"name": "cv", "split": {"test": 0.2, "folds": 3}, "base": {"backbone": "mobilenet_v2"}})
    with session_scope(factory) as session:
        _, runs = create_sweep(session, spec, synthetic_data)
        ids = [run.id for run in runs]
        other_test = create_run(session, TrainConfig(), synthetic_data, SplitConfig(seed=9)).id
        parts = {run.id: samples_from_json(run.split) for run in runs}
    test = parts[ids[0]]["test"]
    fake = np.array([s.label for s in test]) == 1
    # on its own fold each run puts every fake at 0.4 and every real face at 0.3; on test one
    # run calls every face real, one every face fake, one tells them apart
    memo = {(run_id, False, None, False): Predictions(
        val=np.array([0.4 if s.label else 0.3 for s in parts[run_id]["val"]]),
        test=[np.full(len(test), 0.35), np.full(len(test), 0.45), np.where(fake, 0.6, 0.2)][index],
    ) for index, run_id in enumerate(ids)}

    with session_scope(factory) as session:
        folds = evaluate_runs(session, ids, memo=memo)
        alone = evaluate_runs(session, ids[:1], memo=memo)
        with pytest.raises(EvaluationError, match="same data and test split"):
            evaluate_runs(session, [ids[0], other_test], memo=memo)

    assert folds["out_of_fold"] and folds["val"]["n"] == 160  # every face outside the 40 of test
    assert folds["val"]["accuracy"] == 1.0 and folds["threshold"] == pytest.approx(0.4)
    assert folds["test"]["n"] == 40 and folds["test"]["accuracy"] == 1.0  # fakes 0.467, reals 0.333
    assert folds["test_at_0.5"]["accuracy"] == pytest.approx(1 - fake.mean())  # every face under 0.5
    assert not alone["out_of_fold"] and alone["val"]["n"] == len(parts[ids[0]]["val"]) < 60
    assert alone["test_at_0.5"]["accuracy"] == pytest.approx(1 - fake.mean())


def _one_epoch_run(tmp_path, weights, **options):
    """A MobileNetV2 run trained one epoch on 32-px crops of 48-px synthetic faces: the
    session factory, data root, run id, best checkpoint and test split."""
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    factory = session_factory(engine)
    data = make_synthetic(tmp_path / "data", per_class=10, size=48)
    config = TrainConfig(**{"backbone": "mobilenet_v2", "weights": str(weights), "resize": 48, "image_size": 32,
                            "epochs": 1, "batch_size": 8} | options)
    with session_scope(factory) as session:
        run_id = create_run(session, config, data, SplitConfig(val=0.2, test=0.2)).id
    train_run(factory, run_id, tmp_path / "artifacts")
    with session_scope(factory) as session:
        run = session.get(Run, run_id)
        return factory, data, run_id, model_checkpoint(run), samples_from_json(run.split)["test"]


def test_a_run_judges_the_whole_image_when_eval_size_says_so(tmp_path, mobilenet_weights):
    """Trained on 32-px crops of 48-px faces with eval_size 48: evaluation and scoring both
    look at the whole image, and give the same P(fake); evaluate can still ask for a crop."""
    factory, data, run_id, checkpoint, test = _one_epoch_run(tmp_path, mobilenet_weights, eval_size=48)
    with session_scope(factory) as session:
        job_id = create_scoring_job(session, run_id, data).id
    cache = ModelCache(precision="fp32")

    whole = predict(checkpoint, data, test, cache=cache)
    centre = predict(checkpoint, data, test, cache=cache, eval_size=32)
    assert not np.allclose(whole, centre, atol=1e-4)  # the crop changes what the model sees
    score_shard(factory, job_id, 0, cache=cache)
    with session_scope(factory) as session:
        scored = {row.path: row.p_fake for row in session.query(Prediction).filter_by(job_id=job_id)}
    assert [scored[s.path] for s in test] == pytest.approx(whole.tolist(), abs=1e-4)

    with pytest.raises(EvaluationError, match="--eval-size 64 does not fit the run's config: eval_size 64 is larger than resize 48"):
        predict(checkpoint, data, test, cache=cache, eval_size=64)


def test_a_run_on_the_jpeg_grid_is_judged_and_scored_on_a_crop_that_starts_on_it(tmp_path, mobilenet_weights):
    """Trained with crop_grid 8 on 40-px crops of the 48-px faces: evaluation and scoring both
    judge the crop at (0, 0), the centre rounded down to the grid, not torchvision's at (4, 4);
    five crops inside a square off the grid are refused (by the config, as any such eval_size)."""
    factory, data, run_id, checkpoint, test = _one_epoch_run(
        tmp_path, mobilenet_weights, image_size=40, crop_grid=8, rotation=0)
    cache = ModelCache(precision="fp32")
    model, _, _ = cache.get(checkpoint)

    def p_fake_of_crop(offset):
        faces = [F.pil_to_tensor(Image.open(data / s.path).convert("RGB")) for s in test]
        crops = torch.stack([F.crop(face, offset, offset, 40, 40) for face in faces])
        normalised = F.normalize(F.to_dtype(crops, torch.float32, scale=True), data_module.IMAGENET_MEAN,
                                 data_module.IMAGENET_STD)
        with torch.inference_mode():
            return fake_probability(model(normalised)).numpy()

    judged = predict(checkpoint, data, test, cache=cache)
    assert judged == pytest.approx(p_fake_of_crop(0).tolist(), abs=1e-4)
    assert not np.allclose(judged, p_fake_of_crop(4), atol=1e-4)  # where CenterCrop would have cut
    with session_scope(factory) as session:
        job_id = create_scoring_job(session, run_id, data).id
    score_shard(factory, job_id, 0, cache=cache)
    with session_scope(factory) as session:
        scored = {row.path: row.p_fake for row in session.query(Prediction).filter_by(job_id=job_id)}
    assert [scored[s.path] for s in test] == pytest.approx(judged.tolist(), abs=1e-4)

    with pytest.raises(EvaluationError, match="eval_size 44 is not a multiple of crop_grid 8"):
        predict(checkpoint, data, test, cache=cache, eval_size=44, crops=True)


def test_an_ensemble_of_two_input_sizes_scores_files_as_evaluate_judges_them(tmp_path, mobilenet_weights):
    """Runs trained at two input sizes (32-px and 40-px crops of the 48-px faces, which need no
    resizing: scoring's decoder and evaluation's transform resize to slightly different pixels):
    a scoring job over both gives each test face the P(fake) that `evaluate` averages for it,
    each model seeing its own input, and labels it at the job's cut-off as evaluate's does."""
    factory, data, small, _, test = _one_epoch_run(tmp_path, mobilenet_weights)
    with session_scope(factory) as session:  # the same run but for its crops' size
        config = TrainConfig.model_validate(session.get(Run, small).config | {"image_size": 40})
        large = create_run(session, config, data, SplitConfig(val=0.2, test=0.2)).id
    train_run(factory, large, tmp_path / "artifacts")
    cache, memo = ModelCache(precision="fp32"), {}
    with session_scope(factory) as session:
        assert samples_from_json(session.get(Run, large).split)["test"] == test
        judged = evaluate_runs(session, [small, large], tta=True, threshold="0.5", cache=cache, memo=memo)
    each = [memo[run_id, True, None, False].test for run_id in (small, large)]
    assert not np.allclose(*each, atol=1e-4)  # two models, two opinions: the mean is not either one

    with session_scope(factory) as session:
        job_id = create_scoring_job(session, [small, large], data, tta=True, threshold=0.5).id
    score_shard(factory, job_id, 0, cache=cache)
    with session_scope(factory) as session:
        rows = {row.path: row for row in session.query(Prediction).filter_by(job_id=job_id)}
    scored = np.array([rows[s.path].p_fake for s in test])
    assert scored == pytest.approx(((each[0] + each[1]) / 2).tolist(), abs=1e-4)
    labels = np.array([s.label for s in test])
    assert np.mean((scored >= 0.5) == labels) == pytest.approx(judged["test"]["accuracy"])
    assert roc_auc_score(labels, scored) == pytest.approx(judged["test"]["roc_auc"], abs=1e-3)
    assert [rows[s.path].label for s in test] == ["fake" if p >= 0.5 else "real" for p in scored]


def test_a_scoring_job_with_tta_and_a_cut_off_judges_files_as_evaluate_does(tmp_path, mobilenet_weights):
    """`score --tta --threshold T`: each file's P(fake) is evaluation's flip-TTA one, and it is
    labelled fake exactly when that reaches T, so scoring reproduces `evaluate --tta` at its cut-off."""
    factory, data, run_id, checkpoint, _ = _one_epoch_run(tmp_path, mobilenet_weights)
    every = discover(data)
    cache = ModelCache(precision="fp32")
    mirrored = predict(checkpoint, data, every, tta=True, cache=cache)
    assert not np.allclose(mirrored, predict(checkpoint, data, every, cache=cache), atol=1e-4)
    ranked = np.sort(mirrored)[::-1]

    for n_fake in (3, 7):  # a cut-off between the n-th and the next highest P(fake)
        threshold = float(ranked[n_fake - 1] + ranked[n_fake]) / 2
        with session_scope(factory) as session:
            job_id = create_scoring_job(session, run_id, data, tta=True, threshold=threshold).id
        score_shard(factory, job_id, 0, cache=cache)
        with session_scope(factory) as session:
            rows = {row.path: row for row in session.query(Prediction).filter_by(job_id=job_id)}
        assert [rows[s.path].p_fake for s in every] == pytest.approx(mirrored.tolist(), abs=1e-4)
        assert sorted(s.path for s in every if rows[s.path].label == "fake") == sorted(
            s.path for s, p in zip(every, mirrored) if p >= threshold)
        assert sum(row.label == "fake" for row in rows.values()) == n_fake

    with session_scope(factory) as session, pytest.raises(ScoringError, match="threshold 1.5 is not a probability"):
        create_scoring_job(session, run_id, data, threshold=1.5)


def test_evaluation_reads_the_faces_training_decoded_and_judges_them_the_same(tmp_path, mobilenet_weights,
                                                                              monkeypatch, caplog):
    """With training's decoded-image folder, evaluation gives the P(fake) it gives from the files
    without decoding the run's faces again; a list training never saw is decoded into it once;
    a folder it cannot write to leaves it decoding the files."""
    # 48-px faces resized to 40: the cache holds resized pixels, the files are resized on reading
    factory, data, run_id, checkpoint, test = _one_epoch_run(tmp_path, mobilenet_weights, resize=40)
    decoded_dir = decoded_cache_dir(tmp_path / "artifacts")
    cache = ModelCache(precision="fp32")
    from_files = predict(checkpoint, data, test, tta=True, cache=cache)
    views = [dict(eval_size=40), dict(crops=True, tta=True)]
    other_views = [predict(checkpoint, data, test, cache=cache, **view) for view in views]
    with session_scope(factory) as session:
        judged_from_files = evaluate_runs(session, [run_id], tta=True, cache=cache)

    decoded = []
    load_rgb = data_module.load_rgb
    monkeypatch.setattr(data_module, "load_rgb", lambda path: decoded.append(path) or load_rgb(path))
    assert predict(checkpoint, data, test, tta=True, cache=cache, decoded_dir=decoded_dir) == pytest.approx(
        from_files.tolist(), abs=1e-6)
    for view, expected in zip(views, other_views):
        assert predict(checkpoint, data, test, cache=cache, decoded_dir=decoded_dir, **view) == pytest.approx(
            expected.tolist(), abs=1e-6)
    with session_scope(factory) as session:
        judged = evaluate_runs(session, [run_id], tta=True, cache=cache, decoded_dir=decoded_dir)
    assert decoded == []  # validation and test faces, as the training run stored them
    assert judged["threshold"] == judged_from_files["threshold"]
    assert judged["test"]["accuracy"] == judged_from_files["test"]["accuracy"]
    assert judged["val"]["roc_auc"] == pytest.approx(judged_from_files["val"]["roc_auc"], abs=1e-9)

    every = discover(data)
    first = predict(checkpoint, data, every, cache=cache, decoded_dir=decoded_dir)
    assert len(decoded) == len(every)
    assert predict(checkpoint, data, every, cache=cache, decoded_dir=decoded_dir) == pytest.approx(first.tolist(), abs=1e-6)
    assert len(decoded) == len(every)  # the second time from the folder

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with caplog.at_level("WARNING", logger="realfake.evaluation"):
        assert predict(checkpoint, data, test, tta=True, cache=cache, decoded_dir=blocked / "cache") == pytest.approx(
            from_files.tolist(), abs=1e-6)
    assert "decoding the files" in caplog.text

    broken = data / test[0].path
    broken.write_bytes(b"not a JPEG")  # an image it cannot read is an error, not a folder problem
    caplog.clear()
    with caplog.at_level("WARNING", logger="realfake.evaluation"), pytest.raises(OSError, match="cannot identify image"):
        predict(checkpoint, data, test, cache=cache, decoded_dir=decoded_dir)
    assert "not cached" not in caplog.text
    assert [p.name for p in decoded_dir.iterdir() if p.name.endswith(".tmp")] == []  # no half-built folder


def test_evaluation_reports_progress_in_faces_judged(tmp_path, mobilenet_weights):
    """`evaluate` draws a progress bar from these calls: faces judged so far out of every face
    the runs still have to judge (validation and test, each run once)."""
    factory, data, run_id, _, test = _one_epoch_run(tmp_path, mobilenet_weights)
    calls, memo = [], {}
    with session_scope(factory) as session:
        val = samples_from_json(session.get(Run, run_id).split)["val"]
        evaluate_runs(session, [run_id, run_id], tta=True, memo=memo, progress=lambda *call: calls.append(call))
        assert {total for _, total in calls} == {len(val) + len(test)}
        done = [d for d, _ in calls]
        assert done == sorted(set(done)) and done[-1] == len(val) + len(test)

        calls.clear()  # predictions already in the memo: nothing left to judge
        evaluate_runs(session, [run_id], tta=True, memo=memo, progress=lambda *call: calls.append(call))
        assert calls == []


def test_five_crops_average_the_corners_and_centre_of_the_training_window(tmp_path, mobilenet_weights):
    """Trained on 32-px crops inside the centre 40 px of 48-px faces: `crops` is the mean
    P(fake) of the four corner crops and the centre crop of that 40-px square, each mirrored
    too with `tta`."""
    _, data, _, checkpoint, test = _one_epoch_run(tmp_path, mobilenet_weights, crop_within=40)
    cache = ModelCache(precision="fp32")
    model, config, _ = cache.get(checkpoint)
    window = torch.stack([image for image, _, _ in FaceDataset(data, test, eval_transform(config.model_copy(update={"eval_size": 40})))])
    corners = [(0, 0), (0, 8), (8, 0), (8, 8), (4, 4)]  # (top, left) of each 32-px crop in the 40-px square
    views = [F.crop(window, top, left, 32, 32) for top, left in corners]
    with torch.inference_mode():
        plain = torch.stack([fake_probability(model(view)) for view in views]).mean(0).numpy()
        mirrored = torch.stack([fake_probability(model(view.flip(-1))) for view in views]).mean(0).numpy()

    assert predict(checkpoint, data, test, cache=cache, crops=True) == pytest.approx(plain, abs=1e-5)
    both = predict(checkpoint, data, test, tta=True, cache=cache, crops=True)
    assert both == pytest.approx((plain + mirrored) / 2, abs=1e-5)
    assert not np.allclose(plain, predict(checkpoint, data, test, cache=cache), atol=1e-4)  # not the centre alone

    with pytest.raises(EvaluationError, match="five crops of 32 px need a larger square than 32 px"):
        predict(checkpoint, data, test, cache=cache, crops=True, eval_size=32)

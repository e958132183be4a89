import math

import numpy as np
import pytest

from realfake.evaluation import best_threshold, wilson_interval
from realfake.metrics import compute_metrics


def test_metrics_match_a_hand_computed_confusion_matrix():
    # 5 fakes (label 1): 3 caught, 2 missed; 5 reals: 4 passed, 1 flagged
    labels = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    p_fake = [0.9, 0.8, 0.7, 0.4, 0.1, 0.6, 0.3, 0.2, 0.05, 0.0]
    groups = ["easy", "easy", "hard", "hard", "hard", "real", "real", "real", "real", "real"]
    m = compute_metrics(labels, p_fake, loss=0.5, groups=groups)
    assert (m.tp, m.fn, m.tn, m.fp) == (3, 2, 4, 1)
    assert m.accuracy == pytest.approx(7 / 10)
    assert m.precision == pytest.approx(3 / 4)
    assert m.recall == pytest.approx(3 / 5)
    assert m.f1 == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))
    # ROC-AUC by counting pairs: a fake scored above a real
    pairs = [(f, r) for f in p_fake[:5] for r in p_fake[5:]]
    assert m.roc_auc == pytest.approx(sum(f > r for f, r in pairs) / len(pairs))
    assert m.group_accuracy == {"easy": 1.0, "hard": pytest.approx(1 / 3), "real": 0.8}
    assert m.n == 10 and m.loss == 0.5


def test_single_class_has_no_roc_auc_and_nan_loss_is_stored_as_none():
    m = compute_metrics([1, 1], [0.9, 0.2], loss=math.nan)
    assert m.roc_auc is None and m.loss is None
    assert m.accuracy == 0.5 and m.recall == 0.5 and m.precision == 1.0


def test_mismatched_inputs_are_rejected():
    with pytest.raises(ValueError):
        compute_metrics([1, 0], [0.5])
    with pytest.raises(ValueError):
        compute_metrics([], [])


def test_the_validation_threshold_maximises_accuracy_and_the_interval_is_wilsons():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.05, 0.1, 0.2, 0.3, 0.32, 0.4, 0.45, 0.9])  # separable at 0.31, not at 0.5
    cut = best_threshold(labels, scores)
    assert 0.3 < cut <= 0.32 and np.all((scores >= cut) == labels)
    assert best_threshold(np.array([1, 1]), np.array([0.2, 0.9])) == 0.5  # one class: nothing to learn

    low, high = wilson_interval(8, 10)  # textbook values for 8 of 10
    assert (round(low, 3), round(high, 3)) == (0.49, 0.943)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == pytest.approx(1.0)

"""Classification metrics from labels and predicted P(fake); the positive class is fake."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class Metrics:
    n: int
    loss: float | None
    accuracy: float
    precision: float
    recall: float
    f1: float
    roc_auc: float | None  # undefined when only one class is present
    tp: int
    fp: int
    tn: int
    fn: int
    group_accuracy: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def value(self, name: str) -> float | None:
        return getattr(self, name)


def compute_metrics(
    labels: Sequence[int],
    p_fake: Sequence[float],
    loss: float | None = None,
    groups: Sequence[str | None] | None = None,
    threshold: float = 0.5,
) -> Metrics:
    # scikit-learn loads here, not with the module: the scheduler reads Metrics without it
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y_true = np.asarray(labels, dtype=int)
    scores = np.asarray(p_fake, dtype=float)
    if y_true.shape != scores.shape or y_true.size == 0:
        raise ValueError("labels and p_fake must be non-empty and of the same length")
    y_pred = (scores >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, average="binary", pos_label=1, zero_division=0
    )
    roc_auc = float(roc_auc_score(y_true, scores)) if len(set(y_true.tolist())) == 2 else None
    group_accuracy: dict[str, float] = {}
    if groups is not None:
        members: dict[str, list[int]] = defaultdict(list)
        for index, group in enumerate(groups):
            if group:
                members[group].append(index)
        group_accuracy = {
            g: float(accuracy_score(y_true[idx], y_pred[idx])) for g, idx in sorted(members.items())
        }
    return Metrics(
        n=int(y_true.size),
        loss=finite_or_none(loss),
        accuracy=float(accuracy_score(y_true, y_pred)),
        precision=float(precision),
        recall=float(recall),
        f1=float(f1),
        roc_auc=roc_auc,
        tp=int(tp),
        fp=int(fp),
        tn=int(tn),
        fn=int(fn),
        group_accuracy=group_accuracy,
    )


def finite_or_none(value: float | None) -> float | None:
    """NaN and infinities become None: SQL engines disagree on storing them."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)

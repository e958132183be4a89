"""Data audit: metadata that separates real from fake by itself, and what a trivial rule on
it would score. A model can learn such a shortcut instead of the faces.

Each feature is judged by a rule that sees only that feature (the majority class of each
value, or one threshold for a number), scored by stratified 5-fold cross-validation so a
value unique to one image does not count as knowledge.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, JpegImagePlugin
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.tree import DecisionTreeClassifier

from realfake.errors import DatasetError
from realfake.samples import Sample, discover

# The IJG standard luminance table, for estimating the quality a JPEG was saved at.
_STD_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99])

CATEGORICAL = ("quant_tables", "jpeg_quality", "size", "format", "exif", "progressive", "subsampling")
NUMERIC = ("file_size",)


def _quality(tables: dict) -> int | None:
    """The IJG quality whose scaled standard table is closest to this luminance table."""
    if not tables or 0 not in tables:
        return None
    luma = np.array(tables[0], dtype=float)
    scale = float(np.mean(luma / _STD_LUMA) * 100)
    quality = (200 - scale) / 2 if scale <= 100 else 5000 / scale
    return int(round(min(100, max(1, quality))))


def image_metadata(path: Path) -> dict:
    """What the file says about itself, without decoding its pixels."""
    with Image.open(path) as image:
        tables = getattr(image, "quantization", None) or {}
        signature = hashlib.sha1(repr(sorted((k, tuple(v)) for k, v in tables.items())).encode()).hexdigest()[:10]
        return {
            "quant_tables": signature if tables else "none",
            "jpeg_quality": _quality(tables),
            "size": f"{image.width}x{image.height}",
            "format": image.format,
            "exif": bool(image.getexif()),
            "progressive": bool(image.info.get("progressive") or image.info.get("progression")),
            "subsampling": JpegImagePlugin.get_sampling(image) if image.format == "JPEG" else None,
            "file_size": os.path.getsize(path),
        }


def _categorical_rule(values: list, labels: np.ndarray, folds: StratifiedKFold) -> float:
    correct = 0
    for train, test in folds.split(np.zeros(len(labels)), labels):
        votes: dict = defaultdict(Counter)
        for i in train:
            votes[values[i]][labels[i]] += 1
        fallback = Counter(labels[train]).most_common(1)[0][0]
        for i in test:
            vote = votes.get(values[i])
            correct += (vote.most_common(1)[0][0] if vote else fallback) == labels[i]
    return correct / len(labels)


def audit(root: Path | str, samples: Sequence[Sample] | None = None) -> dict:
    root = Path(root)
    samples = list(samples) if samples is not None else discover(root)
    rows, readable, unreadable = [], [], []
    for sample in samples:  # a file that will not open is listed, not the end of the audit
        try:
            rows.append(image_metadata(root / sample.path))
            readable.append(sample)
        except Exception as error:
            unreadable.append({"path": sample.path, "error": f"{type(error).__name__}: {error}"})
    samples = readable
    labels = np.array([s.label for s in samples], dtype=int)
    if min(np.bincount(labels, minlength=2)) < 2:
        raise DatasetError(f"{root}: fewer than 2 readable images in a class "
                           f"({len(unreadable)} unreadable); the audit needs both classes")
    folds = StratifiedKFold(n_splits=min(5, int(np.bincount(labels).min())), shuffle=True, random_state=0)
    baseline = float(np.bincount(labels).max() / len(labels))
    features = []
    for name in CATEGORICAL + NUMERIC:
        values = [row[name] for row in rows]
        if name in NUMERIC:
            x = np.array(values, dtype=float).reshape(-1, 1)
            accuracy = float(cross_val_score(DecisionTreeClassifier(max_depth=1), x, labels, cv=folds).mean())
            distinct = len(set(values))
            by_value = {}
        else:
            accuracy = _categorical_rule(values, labels, folds)
            counts: dict = defaultdict(lambda: [0, 0])
            for value, label in zip(values, labels):
                counts[str(value)][int(label)] += 1
            distinct = len(counts)
            by_value = {v: {"real": c[0], "fake": c[1]} for v, c in sorted(counts.items(), key=lambda kv: -sum(kv[1]))[:8]}
        features.append({"feature": name, "distinct": distinct, "rule_accuracy": accuracy,
                         "above_baseline": accuracy - baseline, "values": by_value})
    real_tables = {row["quant_tables"] for row, label in zip(rows, labels) if label == 0}
    clean_fakes = [s.path for s, row in zip(samples, rows) if s.label == 1 and row["quant_tables"] in real_tables]
    return {
        "root": str(root),
        "images": len(samples),
        "real": int((labels == 0).sum()),
        "fake": int((labels == 1).sum()),
        "baseline_accuracy": baseline,
        "unreadable": unreadable,
        "features": sorted(features, key=lambda f: -f["rule_accuracy"]),
        "shortcut_free": {
            "rule": "real images, plus fakes whose JPEG quantization tables also occur among the reals",
            "real": int((labels == 0).sum()),
            "fake": len(clean_fakes),
            "fake_paths": clean_fakes,
        },
    }

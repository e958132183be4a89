"""Held-out evaluation helpers that need image files: the shortcut-free part of a split."""

from __future__ import annotations

from PIL import Image

from realfake.data import discover
from realfake.evaluation import shortcut_free
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

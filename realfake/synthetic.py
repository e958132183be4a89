"""A small generated real/fake image set that a model learns in a few CPU epochs.

"Real" images are smooth synthetic faces (an ellipse on a gradient, with sensor-like
noise). A "fake" is a real one with a spliced patch that was downscaled, re-compressed
at low JPEG quality and pasted back: the local resampling and blocking artefacts that
face-editing tools leave. `easy_` fakes carry a large patch, `hard_` fakes a small one.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def _face(rng: np.random.Generator, size: int) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(40, 200, 3)
    slope = rng.uniform(-60, 60, (2, 3))
    background = base + x[..., None] * slope[0] + y[..., None] * slope[1]
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    skin = tuple(int(v) for v in rng.uniform(90, 230, 3))
    cx, cy = size * rng.uniform(0.4, 0.6), size * rng.uniform(0.4, 0.6)
    rx, ry = size * rng.uniform(0.22, 0.32), size * rng.uniform(0.3, 0.4)
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=skin)
    for dx in (-0.4, 0.4):  # eyes
        ex, ey, r = cx + dx * rx, cy - 0.25 * ry, max(1.0, size * 0.03)
        draw.ellipse((ex - r, ey - r, ex + r, ey + r), fill=(30, 30, 30))
    draw.line((cx - 0.3 * rx, cy + 0.45 * ry, cx + 0.3 * rx, cy + 0.45 * ry), fill=(120, 40, 40), width=2)
    image = image.filter(ImageFilter.GaussianBlur(radius=size / 64))
    noise = rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=float) + noise, 0, 255).astype(np.uint8))


def _splice(rng: np.random.Generator, image: Image.Image, fraction: float) -> Image.Image:
    size = image.width
    side = max(4, int(size * fraction))
    left, top = (int(v) for v in rng.integers(0, size - side, 2))
    box = (left, top, left + side, top + side)
    patch = image.crop(box).resize((max(1, side // 4),) * 2, Image.BILINEAR)
    buffer = io.BytesIO()
    patch.save(buffer, "JPEG", quality=10)
    patch = Image.open(buffer).convert("RGB").resize((side, side), Image.NEAREST)
    shift = rng.uniform(-25, 25, 3)
    patch = Image.fromarray(np.clip(np.asarray(patch, dtype=float) + shift, 0, 255).astype(np.uint8))
    spliced = image.copy()
    spliced.paste(patch, box)
    return spliced


def make_synthetic(out: Path | str, per_class: int = 60, size: int = 64, seed: int = 0) -> Path:
    """Write `per_class` real and `per_class` fake JPEGs under out/real and out/fake."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    (out / "real").mkdir(parents=True, exist_ok=True)
    (out / "fake").mkdir(parents=True, exist_ok=True)
    for index in range(per_class):
        _face(rng, size).save(out / "real" / f"real_{index:05d}.jpg", quality=92)
        hard = index % 2 == 1
        fake = _splice(rng, _face(rng, size), rng.uniform(0.25, 0.35) if hard else rng.uniform(0.45, 0.6))
        fake.save(out / "fake" / f"{'hard' if hard else 'easy'}_{index:05d}.jpg", quality=92)
    return out

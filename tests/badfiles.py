"""A folder holding every kind of bad or awkward input a scoring user hands in."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

# file -> whether it must be scored (True) or get an error row (False)
EXPECTED = {
    "ok.jpg": True,
    "truncated.jpg": False,
    "zero.jpg": False,
    "text.jpg": False,
    "alpha.png": True,
    "gray.jpg": True,
    "cmyk.jpg": True,
    "16bit.png": True,
    "exif_rotated.jpg": True,
    "one_pixel.png": True,
    "bomb.png": False,
    "broken_link.jpg": False,
    "escape.jpg": False,
    "名前 with space.jpg": True,
    "nested/deeper/inner.webp": True,
}


def make_bad_folder(folder: Path, outside: Path) -> dict[str, bool]:
    """Write the folder; returns {relative path: should be scored}. `outside` is out of bounds."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (80, 60, 3), dtype=np.uint8))
    (folder / "nested" / "deeper").mkdir(parents=True)
    rgb.save(folder / "ok.jpg")
    good = (folder / "ok.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a JPEG")
    rgb.convert("RGBA").save(folder / "alpha.png")
    rgb.convert("L").save(folder / "gray.jpg")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)).save(folder / "16bit.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° on display
    rgb.save(folder / "exif_rotated.jpg", exif=exif)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "one_pixel.png")
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")  # 400 Mpixel, a few KB on disk
    os.symlink(folder / "does-not-exist.jpg", folder / "broken_link.jpg")
    Image.new("RGB", (8, 8)).save(outside)
    os.symlink(outside, folder / "escape.jpg")
    rgb.save(folder / "名前 with space.jpg")
    rgb.save(folder / "nested" / "deeper" / "inner.webp")
    (folder / "dir.jpg").mkdir()  # a folder, not a file: not listed
    (folder / "notes.txt").write_text("not an image name: not listed")
    expected = dict(EXPECTED)
    if os.geteuid() != 0:  # root reads a chmod-000 file anyway
        rgb.save(folder / "unreadable.jpg")
        os.chmod(folder / "unreadable.jpg", 0)
        expected["unreadable.jpg"] = False
    return expected

"""The data audit: shortcuts in metadata, on a planted one and on the real faces."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from realfake.audit import audit, image_metadata
from realfake.synthetic import make_synthetic
from tests.conftest import FACES, REPO


def test_a_planted_compression_shortcut_is_found(tmp_path):
    data = make_synthetic(tmp_path / "data", per_class=30, size=48)
    for path in (data / "fake").iterdir():  # every fake re-saved at quality 60, reals stay at 92
        Image.open(path).convert("RGB").save(path, quality=60)
    result = audit(data)
    by_name = {f["feature"]: f for f in result["features"]}
    assert by_name["quant_tables"]["rule_accuracy"] == 1.0
    assert by_name["jpeg_quality"]["values"] == {"92": {"real": 30, "fake": 0}, "60": {"real": 0, "fake": 30}}
    assert by_name["size"]["rule_accuracy"] == pytest.approx(0.5)  # the same size for all: no signal
    assert result["shortcut_free"]["fake"] == 0  # no fake shares the reals' tables


def test_an_unreadable_file_is_listed_and_left_out(tmp_path):
    data = make_synthetic(tmp_path / "data", per_class=10, size=32)
    (data / "fake" / "hard_bad.jpg").write_bytes(b"not an image")
    result = audit(data)
    assert (result["images"], result["fake"]) == (20, 10)
    assert [b["path"] for b in result["unreadable"]] == ["fake/hard_bad.jpg"]
    assert "UnidentifiedImageError" in result["unreadable"][0]["error"]
    cli = subprocess.run([sys.executable, "-m", "scheduler.cli", "audit", str(data)], capture_output=True, text=True,
                         cwd=REPO, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})
    assert cli.returncode == 0 and "1 unreadable file(s) left out of the audit: fake/hard_bad.jpg" in cli.stderr


def test_metadata_of_one_file(tmp_path):
    Image.new("RGB", (30, 20)).save(tmp_path / "a.jpg", quality=75)
    meta = image_metadata(tmp_path / "a.jpg")
    assert (meta["size"], meta["format"], meta["jpeg_quality"], meta["exif"]) == ("30x20", "JPEG", 75, False)
    Image.new("RGB", (5, 5)).save(tmp_path / "b.png")
    assert image_metadata(tmp_path / "b.png")["quant_tables"] == "none"


@pytest.mark.skipif(not FACES.is_dir(), reason="shared dataset not present")
def test_the_real_faces_quantization_shortcut():
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALFAKE_")} | {"PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "scheduler.cli", "audit", str(FACES), "--json"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    best = report["features"][0]
    assert best["feature"] in {"quant_tables", "jpeg_quality"} and 0.6 <= best["rule_accuracy"] <= 0.7
    assert report["shortcut_free"]["real"] == 865 and report["shortcut_free"]["fake"] == 573

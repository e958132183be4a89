"""Which images a dataset holds, their labels and groups, and a deterministic stratified split.

No torch here: the scheduler discovers, checks (`check_images` decodes each image with
PIL, at reduced scale) and splits a dataset in its own process.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from realfake.config import SplitConfig
from realfake.errors import DatasetError, OutsideDataRoots

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
LABELS = {"real": 0, "fake": 1}  # the positive class is fake

_GROUP_PREFIX = re.compile(r"^([A-Za-z]+)_")
_REGION_BITS = re.compile(r"_([01]{4})$")
REGIONS = ("left_eye", "right_eye", "nose", "mouth")
_CLASS_TOKEN = re.compile(r"(?:^|[^a-z])(real|fake)(?:$|[^a-z])")


@dataclass(frozen=True, order=True)
class Sample:
    path: str  # relative to the dataset root, with forward slashes
    label: int
    group: str | None = None


def group_of(name: str) -> str | None:
    """The group a file name carries as a prefix (`easy_`, `mid_`, `hard_`, `real_`), if any."""
    match = _GROUP_PREFIX.match(Path(name).name)
    return match.group(1).lower() if match else None


def edited_regions(sample: Sample) -> tuple[float, ...] | None:
    """Which REGIONS an image had replaced: none for a real face; for a fake, the four bits
    ending its file name (`mid_12_0110.jpg`: right eye and nose); None where it does not say."""
    if sample.label == 0:
        return (0.0,) * len(REGIONS)
    match = _REGION_BITS.search(Path(sample.path).stem)
    return tuple(float(bit) for bit in match.group(1)) if match else None


def ensure_inside(path: Path, roots: Sequence[Path]) -> Path:
    """Resolve `path` (following symlinks) and refuse it unless it lies under one of `roots`."""
    resolved = path.resolve()
    for root in roots:
        if resolved.is_relative_to(root.resolve()):
            return resolved
    raise OutsideDataRoots(f"{path} resolves to {resolved}, outside the data roots")


def iter_images(folder: Path, roots: Sequence[Path] | None = None) -> Iterable[Path]:
    """Image files under `folder`, recursively, in sorted order; symlinks out of `roots` skipped."""
    allowed = list(roots) if roots else [folder]
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        try:
            ensure_inside(path, allowed)
        except OutsideDataRoots:
            continue
        yield path


def _class_of(folder_name: str) -> str | None:
    match = _CLASS_TOKEN.search(folder_name.lower())
    return match.group(1) if match else None


def discover(root: Path | str, roots: Sequence[Path] | None = None) -> list[Sample]:
    """Find the labelled images of a dataset folder.

    `root` holds one sub-folder per class whose name says real or fake: the Kaggle layout
    `training_real/` + `training_fake/`, or plain `real/` + `fake/`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist or is not a folder")
    allowed = list(roots) if roots else [root]
    ensure_inside(root, allowed)
    by_class: dict[str, list[Sample]] = {"real": [], "fake": []}
    for child in sorted(root.iterdir()):
        name = _class_of(child.name)
        if name is None or not child.is_dir():
            continue
        for path in iter_images(child, allowed):
            rel = path.relative_to(root).as_posix()
            by_class[name].append(Sample(rel, LABELS[name], group_of(path.name)))
    for name, samples in by_class.items():
        if not samples:
            raise DatasetError(
                f"{root} has no images of class '{name}': expected a sub-folder named like "
                f"'{name}/' or 'training_{name}/' holding image files"
            )
    return sorted(by_class["real"] + by_class["fake"])


def stratified_split(
    samples: Sequence[Sample], split: SplitConfig, fold: int | None = None
) -> dict[str, list[Sample]]:
    """Split into train/val/test, stratified by class and group.

    Exact per-stratum counts (even for strata too small for scikit-learn's splitter), and
    the same files and seed give the same split whatever order they were listed in. With
    `split.folds`, `fold` picks the fold that is validation; the test part is the one the
    same seed and test fraction give without folds.
    """
    if (split.folds is None) != (fold is None) or (fold is not None and not 0 <= fold < split.folds):
        raise ValueError(f"fold {fold} does not fit folds={split.folds}")
    strata: dict[tuple[int, str | None], list[Sample]] = defaultdict(list)
    for sample in sorted(set(samples)):
        strata[(sample.label, sample.group)].append(sample)
    rng = random.Random(split.seed)
    share_rng = random.Random(f"train_fraction {split.seed}")  # its own: the split itself is untouched
    parts: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    dealt = 0  # faces dealt into folds so far: each stratum continues where the last one stopped
    for key in sorted(strata, key=lambda k: (k[0], k[1] or "")):
        members = strata[key]
        rng.shuffle(members)
        n_test = round(len(members) * split.test)
        parts["test"] += members[:n_test]
        if split.folds is not None:
            train = []
            for sample in members[n_test:]:
                (parts["val"] if dealt % split.folds == fold else train).append(sample)
                dealt += 1
        else:
            n_val = round(len(members) * split.val)
            parts["val"] += members[n_test : n_test + n_val]
            train = members[n_test + n_val :]
        parts["train"] += _keep_share(train, split.train_fraction, share_rng)
    val_fraction = split.val if split.folds is None else 1.0
    for name, part in parts.items():
        part.sort()
        fraction = {"train": 1.0, "val": val_fraction, "test": split.test}[name]
        if fraction > 0 and len({s.label for s in part}) < 2:
            raise DatasetError(
                f"too few images for the split: the {name} part would not hold both classes "
                f"({len(samples)} images, {_describe(split)})"
            )
    return parts


def _keep_share(train: list[Sample], fraction: float, rng: random.Random) -> list[Sample]:
    """`fraction` of one stratum's training faces (at least one), in an order that does not
    depend on the fraction, so smaller shares are nested in larger ones."""
    if fraction >= 1.0 or not train:
        return train
    kept = sorted(train)
    rng.shuffle(kept)
    return kept[: max(1, round(len(kept) * fraction))]


def _describe(split: SplitConfig) -> str:
    held_out = f"folds={split.folds}" if split.folds is not None else f"val={split.val}"
    return f"{held_out}, test={split.test}"


def check_images(root: Path, samples: Sequence[Sample], threads: int = 8) -> None:
    """Decode every image (at reduced scale where the format allows) before a run starts."""

    def problem(sample: Sample) -> str | None:
        try:
            with Image.open(root / sample.path) as image:
                image.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale, truncation still shows
                image.load()
        except Exception as error:
            return f"{sample.path} ({type(error).__name__}: {error})"
        return None

    with ThreadPoolExecutor(threads) as pool:
        bad = [p for p in pool.map(problem, samples) if p]
    if bad:
        shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DatasetError(f"{len(bad)} unreadable image(s) in {root}: {shown}")


def samples_to_json(parts: dict[str, list[Sample]]) -> dict[str, list[list]]:
    """The split as plain JSON (recorded with the run)."""
    return {name: [[s.path, s.label, s.group] for s in part] for name, part in parts.items()}


def samples_from_json(data: dict[str, list[list]]) -> dict[str, list[Sample]]:
    """The split recorded with a run, as Samples again."""
    return {name: [Sample(p, int(l), g) for p, l, g in rows] for name, rows in data.items()}

"""Dataset discovery, a deterministic stratified split, and the image transforms."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import v2

from realfake.config import SplitConfig, TrainConfig

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
LABELS = {"real": 0, "fake": 1}  # the positive class is fake
CLASS_NAMES = ("real", "fake")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# An image over PIL's pixel limit is refused, never decoded (decompression bombs).
warnings.simplefilter("error", Image.DecompressionBombWarning)

_GROUP_PREFIX = re.compile(r"^([A-Za-z]+)_")
_REGION_BITS = re.compile(r"_([01]{4})$")
REGIONS = ("left_eye", "right_eye", "nose", "mouth")
_CLASS_TOKEN = re.compile(r"(?:^|[^a-z])(real|fake)(?:$|[^a-z])")


class DatasetError(ValueError):
    """The data folder cannot be used for training; the message says why."""


class OutsideDataRoots(PermissionError):
    """A path resolves to a place outside the folders a job may read."""


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


def stratified_split(samples: Sequence[Sample], split: SplitConfig) -> dict[str, list[Sample]]:
    """Split into train/val/test, stratified by class and group.

    Exact per-stratum counts (even for strata too small for scikit-learn's splitter), and
    the same files and seed give the same split whatever order they were listed in.
    """
    strata: dict[tuple[int, str | None], list[Sample]] = defaultdict(list)
    for sample in sorted(set(samples)):
        strata[(sample.label, sample.group)].append(sample)
    rng = random.Random(split.seed)
    parts: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for key in sorted(strata, key=lambda k: (k[0], k[1] or "")):
        members = strata[key]
        rng.shuffle(members)
        n_test = round(len(members) * split.test)
        n_val = round(len(members) * split.val)
        parts["test"] += members[:n_test]
        parts["val"] += members[n_test : n_test + n_val]
        parts["train"] += members[n_test + n_val :]
    for name, part in parts.items():
        part.sort()
        fraction = {"train": 1.0, "val": split.val, "test": split.test}[name]
        if fraction > 0 and len({s.label for s in part}) < 2:
            raise DatasetError(
                f"too few images for the split: the {name} part would not hold both classes "
                f"({len(samples)} images, val={split.val}, test={split.test})"
            )
    return parts


def resize_steps(config: TrainConfig) -> list[v2.Transform]:
    """PIL image to a uint8 tensor whose shorter side is `resize`: what the decoded cache stores."""
    return [v2.PILToTensor(), v2.Resize(config.resize, antialias=True)]


def train_transform(config: TrainConfig, resized: bool = False) -> v2.Compose:
    """The seed's augmentation, plus optional JPEG re-encoding against the compression shortcut.

    `resized`: the input is already a resized uint8 tensor (from the decoded cache).
    """
    steps: list[v2.Transform] = [] if resized else resize_steps(config)
    if config.rotation > 0:
        steps.append(v2.RandomRotation(config.rotation))
    if config.crop_within is not None:  # rotated first, so the window has no empty corners
        steps.append(v2.CenterCrop(config.crop_within))
    steps += [
        v2.RandomCrop(config.image_size),
        v2.RandomHorizontalFlip(),
    ]
    if config.color_jitter > 0:
        j = config.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    if config.jpeg_quality is not None:
        steps.append(v2.RandomApply([v2.JPEG(list(config.jpeg_quality))], p=config.jpeg_p))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def eval_transform(config: TrainConfig, resized: bool = False) -> v2.Compose:
    """Resize and centre crop only: evaluation never sees the training augmentation."""
    steps = [] if resized else resize_steps(config)
    steps += [
        v2.CenterCrop(config.eval_crop),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    return v2.Compose(steps)


def load_rgb(path: Path, draft: int | None = None) -> Image.Image:
    """Any image file as 8-bit RGB, upright as its EXIF orientation says.

    `draft`: a JPEG may be decoded at a reduced scale (DCT scaling, 1/2 to 1/8) as long as
    both sides stay at least `draft` pixels: far less work for the same resized result.
    """
    with Image.open(path) as image:
        if draft:
            image.draft("RGB", (draft, draft))
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I"):  # 16/32-bit integer greyscale: PIL would clip it to white
            pixels = np.asarray(image, dtype=np.float64)
            top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
            image = Image.fromarray((pixels * (255.0 / top)).clip(0, 255).astype(np.uint8), "L")
        elif image.mode == "F":
            pixels = np.asarray(image, dtype=np.float64)
            image = Image.fromarray((pixels * 255.0 if pixels.max() <= 1.0 else pixels).clip(0, 255).astype(np.uint8), "L")
        return image.convert("RGB")


def load_for_eval(path: Path, resize: int, crop: int) -> np.ndarray:
    """Decode, resize the shorter side to `resize` and centre-crop to `crop`: HWC uint8.

    The fast path of `eval_transform` for scoring: reduced-scale JPEG decoding and PIL's
    antialiased resize in C (the GIL released, so decoding threads run in parallel);
    normalisation happens later on the whole batch (`normalize_batch`).
    """
    image = load_rgb(path, draft=resize)
    width, height = image.size
    scale = resize / min(width, height)
    size = (max(crop, round(width * scale)), max(crop, round(height * scale)))
    image = image.resize(size, Image.BILINEAR)
    left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
    return np.asarray(image.crop((left, top, left + crop, top + crop)))


_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255


def normalize_batch(images: Sequence[np.ndarray]) -> torch.Tensor:
    """HWC uint8 arrays to one normalised NCHW float batch, channels-last in memory."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return (batch - _MEAN) / _STD


def normalize_chw(batch: torch.Tensor) -> torch.Tensor:
    """NCHW uint8 on any device to the normalised float batch, on that device."""
    mean, std = _MEAN.to(batch.device), _STD.to(batch.device)
    return (batch.float() - mean) / std


def read_for_device(path: Path, resize: int, crop: int) -> torch.Tensor | np.ndarray:
    """A plain JPEG's bytes, to be decoded on the model's device; any other image decoded
    here by `load_for_eval` (HWC uint8)."""
    with Image.open(path) as image:  # the header only: format, mode, size (the bomb check)
        plain = image.format == "JPEG" and image.mode in ("RGB", "L")
    if plain:
        return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    return load_for_eval(path, resize, crop)


def decode_on_device(
    items: Sequence[tuple[Path, torch.Tensor | np.ndarray]], device: torch.device, resize: int, crop: int
) -> list[tuple[torch.Tensor | None, str | None]]:
    """What `read_for_device` returned, as CHW uint8 images on `device`, resized and centre
    cropped there. JPEGs are decoded in one batched call (nvJPEG on CUDA); a file that fails
    it is decoded alone, then on the CPU, so one bad file does not cost the others."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    def decode_one(path: Path, data: torch.Tensor) -> torch.Tensor:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
        except RuntimeError:  # a JPEG the device decoder refuses may still open with PIL
            return torch.tensor(np.asarray(load_rgb(path))).permute(2, 0, 1).to(device)

    jpegs = [i for i, (_, data) in enumerate(items) if isinstance(data, torch.Tensor)]
    decoded: dict[int, torch.Tensor] = {}
    if jpegs:
        try:
            batch = decode_jpeg([items[i][1] for i in jpegs], mode=ImageReadMode.RGB, device=device,
                                apply_exif_orientation=True)
            decoded = dict(zip(jpegs, batch))
        except RuntimeError:
            pass  # decoded one by one below
    results: list[tuple[torch.Tensor | None, str | None]] = []
    for index, (path, data) in enumerate(items):
        try:
            if isinstance(data, np.ndarray):  # already resized and cropped on the CPU
                results.append((torch.tensor(data).permute(2, 0, 1).to(device), None))
                continue
            image = decoded.get(index)
            if image is None:
                image = decode_one(path, data)
            image = F.center_crop(F.resize(image, [resize], antialias=True), [crop])
            results.append((image, None))
        except Exception as error:
            results.append((None, f"{type(error).__name__}: {error}"))
    return results


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


class DecodedCache:
    """Decoded, resized images of one list of samples, stored once under `folder` and reused
    by every epoch and every run of a sweep (they share the split).

    The folder's name is a hash of the resize and of each file's path, size and modification
    time, so a changed, added or removed file makes a new cache. It is built in a temporary
    folder and renamed into place: runs building it at once never see half of it.
    """

    def __init__(self, folder: Path, root: Path, samples: Sequence[Sample], config: TrainConfig):
        self.root, self.samples, self.config = Path(root), list(samples), config
        listing = [(s.path, (st := (self.root / s.path).stat()).st_size, st.st_mtime_ns) for s in self.samples]
        key = hashlib.sha256(json.dumps([config.resize, listing]).encode()).hexdigest()[:20]
        self.dir = Path(folder) / f"{key}-{config.resize}"

    def ensure(self, threads: int = 4) -> DecodedCache:
        if (self.dir / "complete").exists():
            return self
        tmp = self.dir.with_name(f".{self.dir.name}.{os.getpid()}.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        resize = v2.Compose(resize_steps(self.config))

        def store(index: int) -> None:
            pixels = resize(load_rgb(self.root / self.samples[index].path))
            np.save(tmp / f"{index}.npy", pixels.numpy())

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(store, range(len(self.samples))))
        (tmp / "complete").touch()
        try:
            os.rename(tmp, self.dir)
        except OSError:  # another run finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
        return self

    def load(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.load(self.dir / f"{index}.npy"))


class FaceDataset(Dataset):
    """Labelled images of one split; items are (tensor, label, index)."""

    def __init__(
        self, root: Path | str, samples: Sequence[Sample], transform: v2.Compose, cache: DecodedCache | None = None
    ):
        self.root = Path(root)
        self.samples = list(samples)
        self.transform = transform  # takes resized tensors when `cache` is given
        self.cache = cache

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        sample = self.samples[index]
        image = self.cache.load(index) if self.cache else load_rgb(self.root / sample.path)
        return self.transform(image), sample.label, index


def samples_to_json(parts: dict[str, list[Sample]]) -> dict[str, list[list]]:
    """The split as plain JSON (recorded with the run)."""
    return {name: [[s.path, s.label, s.group] for s in part] for name, part in parts.items()}


def samples_from_json(data: dict[str, list[list]]) -> dict[str, list[Sample]]:
    return {name: [Sample(p, int(l), g) for p, l, g in rows] for name, rows in data.items()}

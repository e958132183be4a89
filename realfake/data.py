"""Images as model input: decoding, the training and evaluation transforms, the decoded
cache and `FaceDataset`. Discovery and the split are in `realfake.samples`."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from realfake.config import TrainConfig
from realfake.samples import Sample

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_steps(config: TrainConfig) -> list[v2.Transform]:
    """PIL image to a uint8 tensor whose shorter side is `resize`: what the decoded cache stores."""
    return [v2.PILToTensor(), v2.Resize(config.resize, antialias=True)]


def centre_offset(length: int, crop: int, grid: int = 1) -> int:
    """Where a centred `crop` of `length` pixels starts, rounded down to a multiple of `grid`.

    The centre is rounded as torchvision's CenterCrop rounds it (half to even), so that with
    grid 1 scoring's decoding paths cut the pixels evaluation's CenterCrop cuts."""
    return round((length - crop) / 2) // grid * grid


class GridCentreCrop(torch.nn.Module):
    """A centred square crop of a CHW tensor that starts on the grid (`centre_offset`)."""

    def __init__(self, size: int, grid: int):
        super().__init__()
        self.size, self.grid = size, grid

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        top, left = centre_offset(height, self.size, self.grid), centre_offset(width, self.size, self.grid)
        return F.crop(image, top, left, self.size, self.size)


def centre_crop(size: int, grid: int = 1) -> v2.CenterCrop | GridCentreCrop:
    """torchvision's CenterCrop, or with `grid` > 1 one that starts on the grid."""
    return v2.CenterCrop(size) if grid == 1 else GridCentreCrop(size, grid)


class GridRandomCrop(torch.nn.Module):
    """A random square crop of a CHW tensor, offsets at multiples of `grid`, inside the centred
    `within` square (itself started on the grid; default: the whole image)."""

    def __init__(self, size: int, grid: int, within: int | None = None):
        super().__init__()
        self.size, self.grid, self.within = size, grid, within

    def _offset(self, length: int) -> int:
        window = self.within or length
        start = centre_offset(length, window, self.grid)
        steps = (window - self.size) // self.grid + 1
        return start + self.grid * int(torch.randint(steps, ()).item())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        return F.crop(image, self._offset(height), self._offset(width), self.size, self.size)


def train_transform(config: TrainConfig, resized: bool = False) -> v2.Compose:
    """The seed's augmentation, plus optional JPEG re-encoding against the compression shortcut.

    `resized`: the input is already a resized uint8 tensor (from the decoded cache).
    """
    steps: list[v2.Transform] = [] if resized else resize_steps(config)
    if config.rotation > 0:
        steps.append(v2.RandomRotation(config.rotation))
    if config.crop_grid > 1:
        steps.append(GridRandomCrop(config.image_size, config.crop_grid, config.crop_within))
    else:
        if config.crop_within is not None:  # rotated first, so the window has no empty corners
            steps.append(v2.CenterCrop(config.crop_within))
        steps.append(v2.RandomCrop(config.image_size))
    steps.append(v2.RandomHorizontalFlip())  # on the grid still: crop_grid divides image_size
    if config.color_jitter > 0:
        j = config.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    if config.jpeg_quality is not None:
        steps.append(v2.RandomApply([v2.JPEG(list(config.jpeg_quality))], p=config.jpeg_p))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if config.erase_p > 0:  # after Normalize, so the erased rectangle's 0 is the mean colour
        steps.append(v2.RandomErasing(p=config.erase_p))
    return v2.Compose(steps)


def eval_transform(config: TrainConfig, resized: bool = False) -> v2.Compose:
    """Resize and centre crop only: evaluation never sees the training augmentation."""
    steps = [] if resized else resize_steps(config)
    steps += [
        centre_crop(config.eval_crop, config.crop_grid),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    return v2.Compose(steps)


# Where an aligned face's parts are, as fractions of its square (x, y) and the radii of an
# ellipse around each: read off the mean of the dataset's real faces (600 px).
FACE_PARTS = {
    "left_eye": ((0.36, 0.49), (0.10, 0.06)),
    "right_eye": ((0.63, 0.49), (0.10, 0.06)),
    "nose": ((0.50, 0.62), (0.08, 0.10)),
    "mouth": ((0.50, 0.79), (0.13, 0.07)),
}


def splice_parts(face: torch.Tensor) -> torch.Tensor:
    """A synthetic fake of a real, aligned face (CHW uint8), after the way the dataset's fakes
    were made: a random non-empty set of its eyes, nose and mouth replaced under feathered
    ellipses by the same parts of a copy of itself that was moved, scaled, recoloured and
    sometimes resampled a little. Pasting the face into itself (self-blending, Shiohara and
    Yamasaki 2022) keeps each part where it belongs, so what is left for the model to find is
    what pasting leaves: a seam, a colour step, a change of sharpness. Random draws come
    from torch's generator."""

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand(()).item()

    height, width = face.shape[-2:]
    donor = face
    if torch.rand(()).item() < 0.5:  # a sharpness step: down and up again
        factor = uniform(0.5, 0.9)
        donor = F.resize(F.resize(donor, [round(height * factor), round(width * factor)], antialias=True),
                         [height, width], antialias=True)
    donor = F.affine(donor.float(), angle=uniform(-3, 3), translate=[uniform(-0.01, 0.01) * width,
                     uniform(-0.01, 0.01) * height], scale=uniform(0.95, 1.05), shear=[0.0],
                     interpolation=v2.InterpolationMode.BILINEAR)
    gain = torch.empty(3, 1, 1).uniform_(0.9, 1.1)
    donor = donor * gain + torch.empty(3, 1, 1).uniform_(-10, 10)

    chosen = torch.rand(len(FACE_PARTS)) < 0.5
    if not chosen.any():
        chosen[torch.randint(len(FACE_PARTS), ())] = True
    # The mask is drawn and feathered at a quarter of the size (blurring is the costly part;
    # the feathered mask is smooth), then scaled up.
    small_h, small_w = max(1, height // 4), max(1, width // 4)
    ys = torch.arange(small_h, dtype=torch.float32).view(-1, 1) + 0.5
    xs = torch.arange(small_w, dtype=torch.float32).view(1, -1) + 0.5
    mask = torch.zeros(small_h, small_w)
    for take, ((cx, cy), (rx, ry)) in zip(chosen.tolist(), FACE_PARTS.values()):
        if take:
            cx, cy = (cx + uniform(-0.02, 0.02)) * small_w, (cy + uniform(-0.02, 0.02)) * small_h
            rx, ry = rx * uniform(0.8, 1.25) * small_w, ry * uniform(0.8, 1.25) * small_h
            mask = torch.maximum(mask, (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1).float())
    sigma = max(0.5, uniform(0.004, 0.02) * small_w)  # how soft the seam is: 2-12 px at 600
    kernel = 2 * math.ceil(3 * sigma) + 1
    if kernel < min(small_h, small_w):  # tiny images stay sharp-edged
        mask = F.gaussian_blur(mask[None], [kernel, kernel], [sigma, sigma])[0]
    mask = F.resize(mask[None], [height, width])
    blended = face.float() * (1 - mask) + donor * mask
    return blended.round().clamp(0, 255).to(torch.uint8)


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


def load_for_eval(path: Path, resize: int, crop: int, grid: int = 1) -> np.ndarray:
    """Decode, resize the shorter side to `resize` and centre-crop to `crop` (starting on the
    `grid`, as `centre_offset`): HWC uint8.

    The fast path of `eval_transform` for scoring: reduced-scale JPEG decoding and PIL's
    antialiased resize in C (the GIL released, so decoding threads run in parallel);
    normalisation happens later on the whole batch (`normalize_batch`).
    """
    image = load_rgb(path, draft=resize)
    width, height = image.size
    scale = resize / min(width, height)
    size = (max(crop, round(width * scale)), max(crop, round(height * scale)))
    image = image.resize(size, Image.BILINEAR)
    left, top = centre_offset(size[0], crop, grid), centre_offset(size[1], crop, grid)
    return np.asarray(image.crop((left, top, left + crop, top + crop)))


_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255


def normalize_batch(images: Sequence[np.ndarray], device: torch.device | None = None) -> torch.Tensor:
    """HWC uint8 arrays to one normalised NCHW float batch, channels-last in memory, on
    `device` (default: the CPU). The uint8 pixels cross to the device, a quarter of float32's
    bytes, and are normalised there, which leaves the host's cores to decoding."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return normalize_chw(batch if device is None else batch.to(device))


def normalize_chw(batch: torch.Tensor) -> torch.Tensor:
    """NCHW uint8 on any device to the normalised float batch, on that device."""
    mean, std = _MEAN.to(batch.device), _STD.to(batch.device)
    return (batch.float() - mean) / std


def read_for_device(path: Path, resize: int, crop: int, grid: int = 1) -> torch.Tensor | np.ndarray:
    """A plain JPEG's bytes, to be decoded on the model's device; any other image decoded
    here by `load_for_eval` (HWC uint8)."""
    with Image.open(path) as image:  # the header only: format, mode, size (the bomb check)
        plain = image.format == "JPEG" and image.mode in ("RGB", "L")
    if plain:
        return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    return load_for_eval(path, resize, crop, grid)


def decode_on_device(
    items: Sequence[tuple[Path, torch.Tensor | np.ndarray]], device: torch.device, resize: int, crop: int,
    grid: int = 1,
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
    cut = centre_crop(crop, grid)
    results: list[tuple[torch.Tensor | None, str | None]] = []
    for index, (path, data) in enumerate(items):
        try:
            if isinstance(data, np.ndarray):  # already resized and cropped on the CPU
                results.append((torch.tensor(data).permute(2, 0, 1).to(device), None))
                continue
            image = decoded.get(index)
            if image is None:
                image = decode_one(path, data)
            image = cut(F.resize(image, [resize], antialias=True))
            results.append((image, None))
        except Exception as error:
            results.append((None, f"{type(error).__name__}: {error}"))
    return results


class DecodedCache:
    """Decoded, resized images of one list of samples, stored once under `folder` and reused
    by every epoch and every run of a sweep (they share the split), and by their evaluation.

    The folder's name is a hash of `FORMAT`, the resize and each file's path, size and
    modification time, so a changed, added or removed file makes a new cache. It is built in a
    temporary folder and renamed into place: runs building it at once never see half of it,
    and a build that fails leaves nothing behind.
    """

    FORMAT = 1  # raise when load_rgb or resize_steps change the pixels, so old caches go unread

    def __init__(self, folder: Path, root: Path, samples: Sequence[Sample], config: TrainConfig):
        self.root, self.samples, self.config = Path(root), list(samples), config
        listing = [(s.path, (st := (self.root / s.path).stat()).st_size, st.st_mtime_ns) for s in self.samples]
        key = hashlib.sha256(json.dumps([self.FORMAT, config.resize, listing]).encode()).hexdigest()[:20]
        self.dir = Path(folder) / f"{key}-{config.resize}"

    def ensure(self, threads: int = 4) -> DecodedCache:
        if (self.dir / "complete").exists():
            return self
        log.info("decoding %d images into %s, once", len(self.samples), self.dir)
        tmp = self.dir.with_name(f".{self.dir.name}.{os.getpid()}.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        resize = v2.Compose(resize_steps(self.config))

        def store(index: int) -> None:
            pixels = resize(load_rgb(self.root / self.samples[index].path))
            np.save(tmp / f"{index}.npy", pixels.numpy())

        try:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(store, range(len(self.samples))))
            (tmp / "complete").touch()
        except BaseException:  # a full disk, a bad file, an interrupt: no half-built folder left
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            os.rename(tmp, self.dir)
        except OSError:  # another run finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
        return self

    def load(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.load(self.dir / f"{index}.npy"))


class FaceDataset(Dataset):
    """Labelled images of one split; items are (tensor, label, index).

    `splice_p`: each fake item is, with this probability, replaced by a synthetic fake made
    from a random real face of the split (`splice_parts`); its label stays fake, and the
    training metrics count it under that fake's group. For training on aligned faces.
    """

    def __init__(
        self, root: Path | str, samples: Sequence[Sample], transform: v2.Compose, cache: DecodedCache | None = None,
        splice_p: float = 0.0,
    ):
        self.root = Path(root)
        self.samples = list(samples)
        self.transform = transform  # takes resized tensors when `cache` is given
        self.cache = cache
        self.splice_p = splice_p
        self.reals = [i for i, s in enumerate(self.samples) if s.label == 0]

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> torch.Tensor | Image.Image:
        return self.cache.load(index) if self.cache else load_rgb(self.root / self.samples[index].path)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        sample = self.samples[index]
        if sample.label == 1 and self.reals and self.splice_p and torch.rand(()).item() < self.splice_p:
            face = self._load(self.reals[torch.randint(len(self.reals), ()).item()])
            image = splice_parts(face if isinstance(face, torch.Tensor) else F.pil_to_tensor(face))
        else:
            image = self._load(index)
        return self.transform(image), sample.label, index

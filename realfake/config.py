"""Typed configuration: the training config of a run, and the environment settings."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from realfake.errors import SettingsError

Backbone = Literal[
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
]
SelectionMetric = Literal["accuracy", "f1", "roc_auc", "loss"]


def goal_of(metric: str) -> str:
    """How runs choose their best epoch by this metric, and sweeps rank them: the lowest loss,
    the highest of the rest."""
    return "minimize" if metric == "loss" else "maximize"


class TrainConfig(BaseModel):
    """Everything that decides how one run trains. Defaults reproduce the seed report."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # model
    backbone: Backbone = Field("resnet50", description="torchvision backbone; its classifier is replaced by the head")
    weights: str = Field("imagenet", description="imagenet | none | path to a state dict")
    hidden: int = Field(512, ge=1, description="width of the head: Linear(features, hidden)-ReLU-Dropout-Linear(hidden, 2)")
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="dropout in the head")
    freeze: int = Field(0, ge=0, description="leading backbone stages kept frozen")
    pool: Literal["avg", "gem"] = Field(
        "avg", description="how the feature map becomes one vector: avg (torchvision's), or gem: "
        "generalised mean with a learnt exponent, between average and max pooling"
    )

    output_stride: Literal[32, 16] = Field(
        32, description="mobilenet_v2: how far the last feature map is downsampled; 16 keeps the last "
        "stage at twice the resolution (its stride-2 block made stride 1 and the blocks after it "
        "dilated, so the ImageNet weights still see what they were trained on), for about 1.8x a step"
    )
    noise_residual: bool = Field(
        False, description="mobilenet_v2: a second input stream, the image's SRM high-pass noise residual "
        "through two trainable convolutions, added where the fourth stage's output enters the fifth "
        "(past best.yaml's frozen stages); it starts at zero, so training starts from the pretrained model"
    )
    tap_stages: tuple[int, ...] = Field(
        (), description="mobilenet_v2: earlier stages (numbered as `freeze` counts them, 0-17) whose output "
        "maps are pooled too, into each channel's mean and standard deviation over the map, batch-normalised "
        "and joined to the last map's average as the head's input, so low-level traces of an edit (a seam, "
        "another photo's noise or sharpness) reach the head at a finer scale than the last stage's; () = off"
    )

    # input and augmentation
    resize: int = Field(256, ge=8, description="images are resized to this square first (600: the real faces' own size)")
    image_size: int = Field(224, ge=8, description="random training crop, and the centre crop judged")
    eval_size: int | None = Field(
        None, ge=8, description="centre crop for validation, test and scoring; default image_size, "
        "at most resize (the whole resized image: the backbones pool over any size)"
    )
    crop_within: int | None = Field(
        None, ge=8, description="random training crops fall inside this centre square of the resized "
        "image (where a face's eyes, nose and mouth are), between image_size and resize; default: anywhere"
    )
    crop_grid: int = Field(
        1, ge=1, description="training and evaluation crops start at multiples of this many pixels of the "
        "resized image: 8 keeps a JPEG's 8x8 blocks where its encoder put them in every crop (where resize "
        "is the originals' own size and rotation 0, so no pixel is resampled); 1 = anywhere"
    )
    rotation: float = Field(15.0, ge=0.0, description="random rotation in training, up to this many degrees; 0 = off")
    color_jitter: float = Field(0.2, ge=0.0, description="brightness, contrast and saturation jitter in training; 0 = off")
    jpeg_quality: tuple[int, int] | None = Field(
        None, description="re-encode training images at a random JPEG quality in this range"
    )
    jpeg_p: float = Field(0.5, ge=0.0, le=1.0, description="share of training images re-encoded at jpeg_quality (when set)")
    erase_p: float = Field(
        0.0, ge=0.0, le=1.0, description="random erasing (cutout): with this probability a training crop "
        "has a rectangle of 2-33% of its area set to the mean colour, so no single part of a face can "
        "carry the decision alone; 0 = off"
    )
    splice_p: float = Field(
        0.0, ge=0.0, le=1.0, description="each fake training image is, with this probability, replaced by "
        "a synthetic fake: a real training face with its eyes, nose or mouth pasted back from a moved, "
        "recoloured copy of itself, after the way the dataset's fakes were made (for aligned faces); 0 = off"
    )

    # optimisation
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="sgd uses momentum")
    lr: float = Field(1e-4, gt=0.0, description="learning rate (of the head too, where backbone_lr is set)")
    backbone_lr: float | None = Field(
        None, gt=0.0, description="learning rate of the backbone, below the new head's `lr` to keep more "
        "of what the pretrained weights know; None = lr"
    )
    head_epochs: int = Field(
        0, ge=0, description="epochs at the start that train only the new head, the backbone's learning "
        "rate held at 0 (linear probing before fine-tuning: a random head's first gradients do not "
        "reshape the pretrained features); 0 = off"
    )
    weight_decay: float = Field(0.0, ge=0.0, description="decoupled with adamw, L2 with adam and sgd")
    momentum: float = Field(0.9, ge=0.0, description="sgd only")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="per epoch after warm-up: constant, or cosine decay toward 0")
    warmup_epochs: int = Field(0, ge=0, description="epochs of linear warm-up at the start (lr x 1/(n+1), 2/(n+1), ...); 0 = off")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="of the cross-entropy loss; 0 = off")
    region_weight: float = Field(
        0.0, ge=0.0, description="weight of a second loss on which face regions a fake replaced "
        "(left eye, right eye, nose, mouth, as its file name says: *_1010.jpg); 0 = off"
    )
    mixup_alpha: float = Field(
        0.0, ge=0.0, description="mixup: each training batch blended with a shuffled copy of itself, "
        "the larger weight (from Beta(alpha, alpha)) on the batch itself, and the loss blended alike; 0 = off"
    )
    sam_rho: float = Field(
        0.0, ge=0.0, le=1.0, description="sharpness-aware minimisation (SAM): each step takes its gradient "
        "at the weights moved this far (L2) up the batch's own gradient, which favours flat minima; "
        "twice the training compute a step; 0 = off (0.05 is the usual value)"
    )
    ema_decay: float = Field(
        0.0, ge=0.0, lt=1.0, description="validate, test and keep an exponential moving average of "
        "the weights, updated each step with this decay (0.99: about the last 100 steps); 0 = off"
    )
    epochs: int = Field(10, ge=1, description="passes over the training split")
    batch_size: int = Field(32, ge=1, description="training batch size")
    seed: int = Field(0, description="initialisation, data order and augmentation draws")

    # running
    selection_metric: SelectionMetric = Field(
        "accuracy", description="val metric that picks the best epoch (best.pt); in a sweep, its metric.name"
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX-512 BF16, AMX), fp32 elsewhere"
    )
    compile: bool = Field(False, description="torch.compile the model (pays off on GPUs; compiling takes minutes)")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    decode_cache: bool = Field(True, description="cache decoded, resized images across epochs and runs")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"device {value!r}: expected auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("jpeg_quality")
    @classmethod
    def _quality_range(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None:
            low, high = value
            if not 1 <= low <= high <= 100:
                raise ValueError("jpeg_quality must be [low, high] with 1 <= low <= high <= 100")
        return value

    @model_validator(mode="after")
    def _crop_fits(self) -> TrainConfig:
        if self.image_size > self.resize:
            raise ValueError(f"image_size {self.image_size} is larger than resize {self.resize}")
        if self.eval_size is not None and self.eval_size > self.resize:
            raise ValueError(f"eval_size {self.eval_size} is larger than resize {self.resize}")
        if self.crop_within is not None and not self.image_size <= self.crop_within <= self.resize:
            raise ValueError(f"crop_within {self.crop_within} must lie between image_size "
                             f"{self.image_size} and resize {self.resize}")
        if self.crop_grid > 1 and self.rotation > 0:
            raise ValueError(f"crop_grid {self.crop_grid} keeps the crops on the JPEG block grid, which "
                             f"rotation {self.rotation:g} resamples away: set rotation: 0")
        for name in ("image_size", "eval_size"):  # a mirrored crop stays on the grid only then
            if (getattr(self, name) or 0) % self.crop_grid:
                raise ValueError(f"{name} {getattr(self, name)} is not a multiple of crop_grid {self.crop_grid}")
        if self.pool == "gem" and self.backbone not in ("resnet18", "resnet34", "resnet50", "mobilenet_v2"):
            raise ValueError(f"pool gem needs features that end in a ReLU (resnet18/34/50, mobilenet_v2); "
                             f"{self.backbone}'s can be negative")
        if self.output_stride != 32 and self.backbone != "mobilenet_v2":
            raise ValueError(f"output_stride {self.output_stride} is built for mobilenet_v2, not {self.backbone}")
        if self.noise_residual and self.backbone != "mobilenet_v2":
            raise ValueError(f"noise_residual is built for mobilenet_v2, not {self.backbone}")
        if self.tap_stages:
            if self.backbone != "mobilenet_v2":
                raise ValueError(f"tap_stages is built for mobilenet_v2, not {self.backbone}")
            taps = list(self.tap_stages)
            if taps != sorted(set(taps)) or not 0 <= taps[0] <= taps[-1] <= 17:
                raise ValueError(f"tap_stages {list(self.tap_stages)}: distinct stages in increasing order, each "
                                 f"from 0 to 17 (18, the last, is pooled already)")
            if self.noise_residual or self.pool != "avg":
                raise ValueError("tap_stages joins neither noise_residual nor pool gem: each rewires the same features")
        if self.splice_p > 0 and self.region_weight > 0:
            raise ValueError("splice_p and region_weight exclude each other: a synthetic fake's "
                             "file name does not say which regions were pasted")
        if self.mixup_alpha > 0 and self.region_weight > 0:
            raise ValueError("mixup_alpha and region_weight exclude each other: a blend of two faces "
                             "has no one set of edited regions")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError("warmup_epochs must be smaller than epochs")
        if self.head_epochs >= self.epochs and self.head_epochs > 0:
            raise ValueError("head_epochs must be smaller than epochs: the backbone would never train")
        return self

    @property
    def eval_crop(self) -> int:
        return self.eval_size or self.image_size

    @property
    def higher_is_better(self) -> bool:
        return goal_of(self.selection_metric) == "maximize"


def training_keys() -> list[dict]:
    """TrainConfig's keys as a reference: each with its allowed values, default and meaning."""
    bounds = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}

    def values(schema: dict) -> str:
        if "anyOf" in schema:
            return " or ".join(values(option) for option in schema["anyOf"])
        if "enum" in schema:
            return " | ".join(map(str, schema["enum"]))
        if "prefixItems" in schema:  # a fixed-length list, e.g. jpeg_quality: [low, high]
            return "[" + ", ".join(values(item) for item in schema["prefixItems"]) + "]"
        return " ".join([schema.get("type", "any"), *(f"{sign} {schema[k]}" for k, sign in bounds.items() if k in schema)])

    schema = TrainConfig.model_json_schema()["properties"]
    return [{"key": name, "values": values(schema[name]), "default": field.default, "description": field.description}
            for name, field in TrainConfig.model_fields.items()]


class SplitConfig(BaseModel):
    """Fractions of the data held out for validation and test, and the shuffling seed.

    `folds: K` (cross-validation): the faces outside test are dealt into K folds, and each
    variant trains K runs, run k validating on fold k and training on the others; `val`
    does not apply then. The test faces are the same as without folds.

    `train_fraction` keeps that share of each run's training faces (per class and group,
    the smaller shares nested in the larger) and leaves validation and test as they are:
    a learning curve, how much more data would be worth.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    val: float | None = Field(None, ge=0.0, lt=1.0)  # 0.1 without folds, unset with them
    test: float = Field(0.2, ge=0.0, lt=1.0)
    seed: int = 0
    folds: int | None = Field(None, ge=2, le=20)
    train_fraction: float = Field(1.0, gt=0.0, le=1.0)

    @model_validator(mode="before")
    @classmethod
    def _default_val(cls, data):
        if isinstance(data, dict) and data.get("folds") is None and data.get("val") is None:
            return data | {"val": 0.1}
        return data

    @model_validator(mode="after")
    def _leaves_training_data(self) -> SplitConfig:
        if self.folds is not None and self.val is not None:
            raise ValueError("give either val or folds: with folds, each run validates on its own fold")
        if self.folds is None and self.val + self.test >= 1.0:
            raise ValueError("val + test must leave some data for training")
        return self


def decoded_cache_dir(artifacts: Path | str) -> Path:
    """Where runs keep their decoded, resized images (`data.DecodedCache`); evaluation reads them too."""
    return Path(artifacts) / "cache"


def shown_url(url: str) -> str:
    """`url` fit to print or log: its password masked; a string that is not a URL at all is
    hidden whole, since it may still hold one."""
    from sqlalchemy.engine import make_url

    if url.partition("://")[2].split("/", 1)[0].count("@") > 1:  # an unescaped @ in the password
        return "(a URL with more than one @; hidden)"
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(not a URL; hidden)"


@dataclass(frozen=True, repr=False)
class Settings:
    """Where things live, taken from the environment; embedded defaults when unset."""

    home: Path
    database_url: str
    broker_url: str
    artifacts: Path
    data_roots: tuple[Path, ...]
    heartbeat_s: float = 10.0  # how often a training worker stamps its lease
    lease_grace_s: float = 120.0  # a lease this long without a heartbeat is taken over
    resend_after_s: float = 900.0  # unclaimed runs / stalled jobs this old get their messages again
    score_precision: str = "auto"  # scoring workers: auto | fp32 | bf16
    broker_poll_s: float = 0.1  # how often a worker looks for messages on the filesystem broker

    def __repr__(self) -> str:  # logs and tracebacks get the URLs without their passwords
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["database_url"], shown["broker_url"] = shown_url(self.database_url), shown_url(self.broker_url)
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """Raises SettingsError naming the variable whose value cannot be used."""
        env = os.environ if environ is None else environ

        def seconds(name: str, default: float) -> float:
            value = env.get(name) or str(default)
            try:
                parsed = float(value)
            except ValueError:
                parsed = float("nan")
            if not parsed > 0 or parsed == float("inf"):
                raise SettingsError(f"{name}={value!r}: expected a number of seconds above 0")
            return parsed

        precision = env.get("REALFAKE_SCORE_PRECISION") or "auto"
        if precision not in ("auto", "fp32", "bf16"):
            raise SettingsError(f"REALFAKE_SCORE_PRECISION={precision!r}: expected auto, fp32 or bf16")
        home = Path(env.get("REALFAKE_HOME", ".realfake")).absolute()
        database_url = env.get("REALFAKE_DATABASE_URL") or f"sqlite:///{home / 'realfake.db'}"
        broker_url = env.get("REALFAKE_BROKER_URL") or "filesystem://localhost//"
        artifacts = Path(env.get("REALFAKE_ARTIFACTS") or home / "artifacts").absolute()
        roots = tuple(
            Path(p).absolute() for p in env.get("REALFAKE_DATA_ROOTS", "").split(":") if p
        )
        heartbeat_s = seconds("REALFAKE_HEARTBEAT_S", 10)
        grace_s = seconds("REALFAKE_LEASE_GRACE_S", 120)
        if grace_s < 3 * heartbeat_s:  # else a healthy worker's lease goes stale between two beats
            raise SettingsError(f"REALFAKE_LEASE_GRACE_S ({grace_s:g} s) must be at least 3 heartbeats "
                                f"(REALFAKE_HEARTBEAT_S, {heartbeat_s:g} s), or a live worker's runs would be taken over")
        resend_s = seconds("REALFAKE_RESEND_AFTER_S", 900)
        poll_s = seconds("REALFAKE_BROKER_POLL_S", 0.1)
        if poll_s < 0.01:  # an idle worker would spin on the queue folder
            raise SettingsError(f"REALFAKE_BROKER_POLL_S={poll_s:g}: expected at least 0.01 s")
        return cls(home, database_url, broker_url, artifacts, roots, heartbeat_s, grace_s, resend_s, precision, poll_s)

"""Full fine-tuning in the shape of torchvision's reference: train_one_epoch, evaluate, fit.

`fit` knows nothing about SQL or Celery: the caller passes `TrainHooks` that persist
metrics, report progress and say when to stop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from realfake.config import TrainConfig
from realfake.data import DecodedCache, FaceDataset, eval_transform, train_transform
from realfake.hooks import BestSoFar, FitResult, TrainHooks
from realfake.metrics import Metrics, compute_metrics
from realfake.models import build_model, class_logits, fake_probability, head_parameters
from realfake.samples import REGIONS, Sample, edited_regions

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class StopRequested(Exception):
    """Raised between batches when the hooks ask training to stop (a cancel)."""


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None
    channels_last: bool

    @classmethod
    def for_config(cls, config: TrainConfig) -> Runtime:
        """Training settings: channels-last everywhere (fp32 on an AVX2 CPU too: 1.72x a step,
        bench/train_step.py); bf16 autocast as `config.precision` says, `auto` where it is native."""
        name = config.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        return cls(device, _autocast_dtype(config.precision, device), channels_last=True)

    @classmethod
    def for_scoring(cls, config: TrainConfig, precision: str = "auto") -> Runtime:
        """Inference settings: the checkpoint's device, the caller's precision (not the training one)."""
        base = cls.for_config(config)
        return cls(base.device, _autocast_dtype(precision, base.device), channels_last=True)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return images.to(self.device, non_blocking=True, memory_format=memory_format)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 when asked, or with `auto` where the hardware computes it natively: emulated on
    a CPU without AVX-512 BF16 or AMX it is several times slower than fp32."""
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def native_bf16(device: torch.device) -> bool:
    return device.type == "cuda" or cpu_has_bf16()


def cpu_has_bf16() -> bool:
    """Whether oneDNN computes bf16 on this CPU: natively with AVX-512 BF16 or AMX, where
    autocast pays off. It also answers yes on AVX-512 CPUs without them, where a training
    step was still no slower in bf16 (bench/train_step.py: 7.5-8.4 s against 8.6-8.7 s)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params: list = [p for p in model.parameters() if p.requires_grad]
    if _head_apart(config):
        # Two groups, the head first at `lr`; otherwise one group, as older checkpoints hold.
        in_head = {id(p) for p in head_parameters(model, config.backbone)}
        params = [
            {"params": [p for p in params if id(p) in in_head], "lr": config.lr},
            {"params": [p for p in params if id(p) not in in_head], "lr": config.backbone_lr or config.lr},
        ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=config.lr, weight_decay=config.weight_decay)


def _head_apart(config: TrainConfig) -> bool:
    return config.backbone_lr is not None or config.head_epochs > 0


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch factor: linear warm-up, then constant or cosine decay to zero; the
    backbone's group (the second, where the head has its own) at 0 for `head_epochs`."""

    def factor(epoch: int) -> float:  # epoch counts from 0 here, as LambdaLR does
        if epoch < config.warmup_epochs:
            return (epoch + 1) / (config.warmup_epochs + 1)
        if config.lr_schedule == "constant":
            return 1.0
        span = max(1, config.epochs - config.warmup_epochs)
        progress = (epoch - config.warmup_epochs) / span
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def backbone_factor(epoch: int) -> float:
        return 0.0 if epoch < config.head_epochs else factor(epoch)

    if _head_apart(config):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor, backbone_factor])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _check_stop(hooks: TrainHooks) -> None:
    if hooks.should_stop():
        raise StopRequested


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    runtime: Runtime,
    epoch: int,
    hooks: TrainHooks,
    regions: torch.Tensor | None = None,
    region_weight: float = 0.0,
    ema: AveragedModel | None = None,
    mixup_alpha: float = 0.0,
    sam_rho: float = 0.0,
) -> Metrics:
    """One pass over the training data; metrics come from the training-mode predictions.

    `regions`: per sample of the dataset, which face regions were edited (NaN: unknown),
    learnt by the model's extra outputs with weight `region_weight`. `ema`, when given, is
    updated after every step. With `mixup_alpha`, each batch is blended with a shuffled copy
    of itself; the batch keeps the larger weight, so the training metrics judge each blend
    by the label of its larger part. With `sam_rho`, each step is sharpness-aware
    (`sharpness_aware_gradients`); the loss and metrics reported are those at the weights themselves.
    """
    model.train()
    dataset: FaceDataset = loader.dataset
    total_loss, labels, scores, indices = 0.0, [], [], []
    for step, (images, targets, index) in enumerate(loader):
        _check_stop(hooks)
        images, targets = runtime.to_device(images), targets.to(runtime.device)
        if mixup_alpha > 0:
            blend, partner, weight = mix_batch(images, mixup_alpha)
            images = runtime.to_device(blend)  # indexing may have dropped the channels-last layout

        def batch_loss() -> tuple[torch.Tensor, torch.Tensor]:
            with runtime.autocast():
                output = model(images)
                logits = class_logits(output)
                loss = criterion(logits, targets)
                if mixup_alpha > 0:
                    loss = weight * loss + (1 - weight) * criterion(logits, targets[partner])
                if regions is not None:
                    loss = loss + region_weight * _region_loss(output[:, 2:], regions[index].to(runtime.device))
            return logits, loss

        logits, loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sam_rho > 0:
            sharpness_aware_gradients(model, lambda: batch_loss()[1], sam_rho)
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        total_loss += loss.item() * len(targets)
        scores.append(fake_probability(logits.detach()).cpu())
        labels.append(targets.cpu())
        indices.append(index)
        hooks.on_batch("train", epoch, step + 1, len(loader))
    return _metrics(dataset, labels, scores, indices, total_loss)


def sharpness_aware_gradients(model: nn.Module, loss_at: Callable[[], torch.Tensor], rho: float) -> None:
    """SAM (Foret et al., 2021): replace the gradients in `model` by those at w + rho * g / |g|.

    Call after `backward()` at w; the optimizer's step then uses the gradient at the nearby
    worst-case point, which steers toward flat minima. Batch-norm running means and variances
    are left as the first pass set them (the second pass is a probe, not data); only its
    batch counter, which matters to `momentum=None` alone, counts the probe.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    scale = rho / (nn.utils.get_total_norm([p.grad for p in params]) + 1e-12)
    originals = [p.detach().clone() for p in params]  # restored by copy: w + e - e is not w in floats
    with torch.no_grad():
        for p in params:
            p.add_(p.grad * scale.to(p.grad.dtype))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        for p in params:
            p.grad = None
        loss_at().backward()
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        with torch.no_grad():
            for p, original in zip(params, originals):
                p.copy_(original)


def mix_batch(images: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """mixup (Zhang et al., 2018): the batch blended with a permutation of itself.

    Returns the blend, the permutation and the batch's own weight, at least 0.5.
    """
    weight = float(torch.distributions.Beta(alpha, alpha).sample())
    weight = max(weight, 1.0 - weight)
    partner = torch.randperm(len(images), device=images.device)
    return weight * images + (1.0 - weight) * images[partner], partner, weight


def _region_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    known = ~targets.isnan().any(dim=1)
    if not known.any():
        return logits.sum() * 0.0
    return nn.functional.binary_cross_entropy_with_logits(logits[known].float(), targets[known])


def region_targets(samples: list[Sample]) -> torch.Tensor:
    """`edited_regions` of each sample as rows of a float tensor, NaN where unknown."""
    return torch.tensor([edited_regions(s) or (math.nan,) * len(REGIONS) for s in samples])


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    criterion: nn.Module,
    loader: DataLoader,
    runtime: Runtime,
    hooks: TrainHooks | None = None,
    split: str = "val",
    epoch: int = 0,
) -> Metrics:
    """Metrics of `model` on `loader`; writes nothing."""
    hooks = hooks or TrainHooks()
    model.eval()
    total_loss, labels, scores, indices = 0.0, [], [], []
    for step, (images, targets, index) in enumerate(loader):
        _check_stop(hooks)
        images, targets = runtime.to_device(images), targets.to(runtime.device)
        with runtime.autocast():
            logits = class_logits(model(images))
        logits = logits.float()
        total_loss += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        scores.append(fake_probability(logits).cpu())
        labels.append(targets.cpu())
        indices.append(index)
        hooks.on_batch(split, epoch, step + 1, len(loader))
    return _metrics(loader.dataset, labels, scores, indices, total_loss)


def _metrics(dataset: FaceDataset, labels, scores, indices, total_loss: float) -> Metrics:
    y = torch.cat(labels).numpy()
    p = torch.cat(scores).numpy()
    order = torch.cat(indices).tolist()
    groups = [dataset.samples[i].group for i in order]
    return compute_metrics(y, p, loss=total_loss / max(1, len(y)), groups=groups)


def save_atomic(obj: dict, path: Path, before_replace: Callable[[], None] | None = None) -> None:
    """Write-then-rename, so a crash never leaves a half-written checkpoint."""
    save_all({path: obj}, before_replace)


def save_all(files: dict[Path, dict], before_replace: Callable[[], None] | None = None) -> None:
    """Each file written aside, then `before_replace` asked once (it may raise, to keep every
    file as it was: a worker whose lease went while it was writing), then all put in place."""
    # random names: workers in containers share checkpoint folders and often their pids too
    pending = {path: path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp") for path in files}
    try:
        for path, obj in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(obj, pending[path])
        if before_replace is not None:
            before_replace()
        for path, tmp in pending.items():
            os.replace(tmp, path)
    finally:
        for tmp in pending.values():
            tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _loader(dataset: FaceDataset, config: TrainConfig, shuffle: bool, seed: int, runtime: Runtime) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=shuffle,
        num_workers=config.num_workers,
        pin_memory=runtime.device.type == "cuda",
        generator=generator,
        drop_last=False,
    )


def _is_better(value: float | None, best: float | None, higher_is_better: bool) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value > best if higher_is_better else value < best


def fit(
    config: TrainConfig,
    data_root: Path | str,
    split: dict[str, list[Sample]],
    checkpoint_dir: Path | str,
    hooks: TrainHooks | None = None,
    cache_dir: Path | str | None = None,
) -> FitResult:
    """Train `config.epochs` epochs, resuming after the last finished epoch if a checkpoint exists.

    Each epoch: train, evaluate val and test (with `config.ema_decay`, the averaged weights
    are evaluated and kept), keep `best.pt` by the selection metric on val,
    hand the metrics to the hooks, then write `last.pt`. With `cache_dir`, decoded and
    resized images are cached there (see DecodedCache) unless `config.decode_cache` is off. Metrics are persisted before the
    checkpoint, so a crash in between repeats an epoch (its rows are upserted) and never
    skips one.
    """
    hooks = hooks or TrainHooks()
    checkpoint_dir = Path(checkpoint_dir)
    last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
    runtime = Runtime.for_config(config)
    if config.precision == "bf16" and not native_bf16(runtime.device):
        log.warning("precision bf16 on a CPU without native bf16 (AVX-512 BF16 or AMX): autocast "
                    "emulates it, several times slower than fp32; `precision: auto` picks fp32 here")

    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    model = build_model(config)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.to(runtime.device)
    forward = torch.compile(model) if config.compile else model  # shares the parameters; saved uncompiled
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    optimizer = make_optimizer(model, config)
    lr_scheduler = make_lr_scheduler(optimizer, config)
    # The averaged weights are the ones validated, tested and kept as best.pt.
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
           if config.ema_decay else None)
    judged, kept = (ema.module, ema.module) if ema is not None else (forward, model)

    start_epoch, best = 1, BestSoFar()
    if last_path.exists():
        checkpoint = load_checkpoint(last_path)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
        start_epoch = checkpoint["epoch"] + 1
        best = BestSoFar(checkpoint.get("best_epoch"), checkpoint.get("best_value"))
        log.info("resuming from %s at epoch %d", last_path, start_epoch)

    root = Path(data_root)
    datasets = {}
    for name in SPLITS:
        cache = None
        if config.decode_cache and cache_dir is not None and split[name]:
            cache = DecodedCache(Path(cache_dir), root, split[name], config).ensure()
        transform = train_transform if name == "train" else eval_transform
        datasets[name] = FaceDataset(root, split[name], transform(config, resized=cache is not None), cache,
                                     splice_p=config.splice_p if name == "train" else 0.0)
    regions = region_targets(datasets["train"].samples) if config.region_weight > 0 else None
    config_json = config.model_dump(mode="json")
    epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            # Seeded per epoch, so a resumed run draws the same batches as an unbroken one.
            torch.manual_seed(config.seed * 1000 + epoch)
            train_loader = _loader(datasets["train"], config, True, config.seed * 1000 + epoch, runtime)
            metrics = {"train": train_one_epoch(forward, criterion, optimizer, train_loader, runtime, epoch, hooks,
                                                regions, config.region_weight, ema, config.mixup_alpha,
                                                config.sam_rho)}
            for name in ("val", "test"):
                if datasets[name].samples:
                    loader = _loader(datasets[name], config, False, 0, runtime)
                    metrics[name] = evaluate(judged, criterion, loader, runtime, hooks, name, epoch)
            lr_scheduler.step()

            selection = metrics.get("val", metrics["train"]).value(config.selection_metric)
            improved = _is_better(selection, best.value, config.higher_is_better)
            if improved:
                best = BestSoFar(epoch, selection)
            # the epoch's rows first: a worker that lost its lease stops there, before any file
            keep_going = hooks.on_epoch_end(epoch, metrics, best)
            files = {last_path: {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                **({"ema": ema.state_dict()} if ema is not None else {}),
                "epoch": epoch,
                "config": config_json,
                "best_epoch": best.epoch,
                "best_value": best.value,
            }}
            if improved:
                files[best_path] = {"model": kept.state_dict(), "epoch": epoch, "config": config_json}
            save_all(files, hooks.check_held)  # both or neither, as the epoch's rows say
            if not keep_going:
                return FitResult("pruned", epoch, best)
    except StopRequested:
        return FitResult("stopped", epoch - 1, best)
    return FitResult("completed", config.epochs, best)

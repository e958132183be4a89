"""Backbones with the seed report's classification head, and how their weights are loaded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.hub import get_dir
from torchvision import models as tvm
from torchvision.models.mobilenetv2 import InvertedResidual

from realfake.config import TrainConfig
from realfake.data import IMAGENET_STD
from realfake.errors import WeightsUnavailable
from realfake.samples import REGIONS


@dataclass(frozen=True)
class BackboneSpec:
    builder: Callable[..., nn.Module]
    imagenet: tvm.WeightsEnum
    # where the seed head goes in place of the ImageNet classifier (a submodule path): it is
    # attached there, and found there when it learns at its own rate
    head: str
    # the leading stages, in order, that `freeze` counts
    stages: Callable[[nn.Module], list[nn.Module]]


def _resnet_stages(model: nn.Module) -> list[nn.Module]:
    stem = nn.ModuleList([model.conv1, model.bn1])
    return [stem, model.layer1, model.layer2, model.layer3, model.layer4]


def _feature_stages(model: nn.Module) -> list[nn.Module]:
    return list(model.features.children())


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, "fc", _resnet_stages),
    "resnet34": BackboneSpec(tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, "fc", _resnet_stages),
    "resnet50": BackboneSpec(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1, "fc", _resnet_stages),
    "mobilenet_v2": BackboneSpec(
        tvm.mobilenet_v2, tvm.MobileNet_V2_Weights.IMAGENET1K_V1, "classifier", _feature_stages
    ),
    "mobilenet_v3_large": BackboneSpec(
        tvm.mobilenet_v3_large, tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V1, "classifier", _feature_stages
    ),
    "efficientnet_b0": BackboneSpec(
        tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights.IMAGENET1K_V1, "classifier", _feature_stages
    ),
    "convnext_tiny": BackboneSpec(
        tvm.convnext_tiny, tvm.ConvNeXt_Tiny_Weights.IMAGENET1K_V1, "classifier.2", _feature_stages  # after its LayerNorm, Flatten
    ),
}


class GeMPool(nn.Module):
    """Generalised-mean pooling (Radenović et al. 2018): each channel's feature map to
    (mean of x^p)^(1/p), kept as a 1x1 map. p = 1 is average pooling and a large p nears max
    pooling; p is learnt, starting at 3 (at best.yaml's learning rate it stayed near 3: 2.98
    after ten epochs), and kept at least 1. A local cue (one pasted eye) then weighs more than
    in an average over the whole crop. Computed in fp32 (a cube in bf16 loses the digits);
    inputs are clamped at a small positive floor: the features of the backbones it is for
    (ResNets, MobileNetV2) end in a ReLU."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)  # below 1 it would no longer lie between average and max
        return x.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1), keepdim=True).pow(1.0 / p)


def _srm_kernels() -> torch.Tensor:
    """Three high-pass SRM kernels (Fridrich & Kodovsky 2012), the set Zhou et al. (2018) used
    to find spliced regions: each sums to 0, so a face's smooth content cancels and what is left
    is sensor noise and JPEG traces, which differ where an eye or mouth came from another photo."""
    second = torch.tensor([[0, 0, 0, 0, 0], [0, -1, 2, -1, 0], [0, 2, -4, 2, 0],
                           [0, -1, 2, -1, 0], [0, 0, 0, 0, 0]]) / 4.0
    square = torch.tensor([[-1, 2, -2, 2, -1], [2, -6, 8, -6, 2], [-2, 8, -12, 8, -2],
                           [2, -6, 8, -6, 2], [-1, 2, -2, 2, -1]]) / 12.0
    line = torch.zeros(5, 5)
    line[2, 1:4] = torch.tensor([1.0, -2.0, 1.0]) / 2.0
    return torch.stack([second, square, line])


@torch.fx.wrap  # a leaf when torch.fx traces the model (fold_batchnorm), so the fp32 block below survives it
def srm_residual(x: torch.Tensor, kernels: torch.Tensor, truncate: float) -> torch.Tensor:
    """The SRM residual of ImageNet-normalised images `x` through grouped `kernels` (already in
    grey levels), truncated at +-`truncate` and scaled to [-1, 1]. Always in fp32: under bf16
    autocast the inputs' rounding (up to half a grey level) would bury a residual of one or two.
    Reflect padding: zero padding would put a false seam of a hundred grey levels along the border."""
    with torch.autocast(x.device.type, enabled=False):
        padded = nn.functional.pad(x.float(), (2, 2, 2, 2), mode="reflect")
        residual = nn.functional.conv2d(padded, kernels.float(), groups=3)
        return residual.clamp(-truncate, truncate) / truncate


class NoiseResidualFeatures(nn.Module):
    """A backbone's feature stages with a second input stream: the image's SRM noise residual
    (each kernel on each colour channel, in 0-255 grey levels, truncated at +-`truncate` and
    scaled to [-1, 1]) through two trainable strided convolutions, added to the feature map
    that enters stage `join`. The last convolution starts at zero, so training starts from the
    pretrained model exactly; the stream bypasses the frozen leading stages, whose ImageNet
    filters were not made for noise. Inputs are ImageNet-normalised images."""

    def __init__(self, features: nn.Sequential, join: int, channels: int, stride: int, truncate: float = 3.0):
        super().__init__()
        if stride not in (2, 4, 8):
            raise ValueError(f"the noise stream reaches strides 2, 4 or 8, not {stride}")
        self.features, self.join, self.truncate = features, join, truncate
        kernels = _srm_kernels().repeat(3, 1, 1).unsqueeze(1)  # (9, 1, 5, 5): 3 kernels per colour, grouped
        # one grey level of each normalised channel: the residuals in 0-255 units whatever the normalisation
        levels = torch.tensor([255.0 * s for s in IMAGENET_STD]).repeat_interleave(3)
        self.register_buffer("srm", kernels * levels.view(9, 1, 1, 1), persistent=False)
        width = max(16, channels // 2)
        layers: list[nn.Module] = []
        in_channels = 9
        for _ in range(stride.bit_length() - 2):  # all but the last stride-2 step
            layers += [nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            in_channels = width
        layers.append(nn.Conv2d(in_channels, channels, 3, 2, 1, bias=False))
        nn.init.zeros_(layers[-1].weight)
        self.stream = nn.Sequential(*layers)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """What the stream's convolutions see: 9 channels, 3 kernels per colour, in [-1, 1]."""
        return srm_residual(x, self.srm, self.truncate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = self.stream(self.residual(x))
        for index, stage in enumerate(self.features):
            if index == self.join:
                x = x + noise
            x = stage(x)
        return x


# where the noise stream joins MobileNetV2: at the input of features[4], 24 channels at stride 4
# (best.yaml freezes features[0:4])
_NOISE_JOIN = {"mobilenet_v2": (4, 24, 4)}


class TappedFeatures(nn.Module):
    """A backbone's feature stages whose output is one vector per image (as a 1x1 map): the
    last map's channel averages, as torchvision pools it, followed by the mean and standard
    deviation of each channel of the stages in `taps`, batch-normalised. A pasted eye's seam or
    foreign noise is a few pixels wide: at stride 8 or 16 its statistics are still there, where
    the last stage (stride 32, ImageNet's semantics) may have pooled them away."""

    def __init__(self, features: nn.Sequential, taps: tuple[int, ...]):
        super().__init__()
        self.features, self.taps = features, tuple(taps)
        width = 2 * sum(features[i].out_channels for i in self.taps)
        self.norm = nn.BatchNorm1d(width)  # the statistics of a linear bottleneck span tens: bring them to the head's scale

    @property
    def out_channels(self) -> int:
        return self.features[-1].out_channels + self.norm.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        statistics = []
        for index, stage in enumerate(self.features):
            x = stage(x)
            if index in self.taps:
                mapped = x.float().flatten(2)  # fp32: a standard deviation in bf16 keeps 2-3 digits
                statistics += [mapped.mean(2), mapped.std(2, correction=0)]
        joined = torch.cat(statistics, dim=1)
        if self.training and joined.shape[0] == 1:  # an epoch's last batch of one image: no batch statistics to take
            norm = self.norm
            tapped = nn.functional.batch_norm(joined, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                                              False, 0.0, norm.eps)
        else:
            tapped = self.norm(joined)
        last = x.float().mean(dim=(-2, -1))
        return torch.cat([last, tapped], dim=1)[:, :, None, None]


def _halve_output_stride(features: nn.Sequential) -> None:
    """MobileNetV2 at output stride 16: its last stride-2 block (features[14]) keeps the
    resolution, and the depthwise convolutions after it dilate by 2 to see as far as before."""
    last_strided = max(i for i, block in enumerate(features)
                       if isinstance(block, InvertedResidual) and block.stride == 2)
    features[last_strided].conv[1][0].stride = (1, 1)
    for block in features[last_strided + 1:]:
        if isinstance(block, InvertedResidual):
            depthwise = block.conv[1][0]
            depthwise.dilation, depthwise.padding = (2, 2), (2, 2)


def _attach_pool(model: nn.Module, pool: str) -> None:
    """Put the configured pooling where the backbone pools its features."""
    if pool == "avg":
        return
    if hasattr(model, "avgpool"):  # the ResNets
        model.avgpool = GeMPool()
    else:  # MobileNetV2 average-pools in forward(): hand it a 1x1 map, which that leaves as it is
        model.features.append(GeMPool())


def seed_head(in_features: int, hidden: int = 512, dropout: float = 0.5, outputs: int = 2) -> nn.Sequential:
    """The report's head: Linear(in, hidden)-ReLU-Dropout-Linear(hidden, 2).

    `outputs` > 2: further logits after the two class logits (see `class_logits`).
    """
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, outputs)
    )


def class_logits(output: torch.Tensor) -> torch.Tensor:
    """The (real, fake) logits of a model's output; region logits, if any, follow them."""
    return output[:, :2]


def fake_probability(output: torch.Tensor) -> torch.Tensor:
    """P(fake) of each sample, in float32, from a model's output (or its class logits)."""
    return torch.softmax(class_logits(output).float(), dim=1)[:, 1]


def mean_fake_probability(model: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """P(fake) of each sample averaged over views of the same batch (mirror images, crops):
    evaluation and scoring share it, so `score --tta` gives what `evaluate --tta` judged."""
    return torch.stack([fake_probability(model(view)) for view in views]).mean(0)


def _weights_help(name: str, weights: tvm.WeightsEnum) -> str:
    filename = Path(weights.url).name
    cache = Path(get_dir()) / "checkpoints"
    return (
        f"ImageNet weights for {name} could not be loaded: no network and no cached copy. "
        f"Either put {filename} (from {weights.url}) into {cache}/ "
        f"(set TORCH_HOME to move that folder), or set `weights:` to the path of a local "
        f"state dict, or use `weights: none` to train from random initialisation."
    )


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file, loaded without unpickling arbitrary objects."""
    if not path.is_file():
        raise WeightsUnavailable(
            f"weights file {path} does not exist: give the path of a torchvision state dict "
            f"for this backbone, `imagenet`, or `none`"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a file torch saved, or one that holds more than tensors
        if str(error).startswith("Weights only load failed"):  # torch's advice is to unpickle anyway: not here
            reason = "it holds objects other than tensors"
        else:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsUnavailable(
            f"weights file {path} is not a state dict torch.load(weights_only=True) can read ({reason}): "
            f"give a torchvision state dict for this backbone, `imagenet`, or `none`"
        ) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a training checkpoint
    if not isinstance(state, dict):
        raise WeightsUnavailable(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    return state


def _load_backbone(name: str, weights: str) -> nn.Module:
    spec = BACKBONES[name]
    if weights == "none":
        return spec.builder(weights=None)
    if weights == "imagenet":
        try:
            return spec.builder(weights=spec.imagenet, progress=False)
        except OSError as error:  # URLError, connection refused, DNS failure
            raise WeightsUnavailable(_weights_help(name, spec.imagenet)) from error
    model = spec.builder(weights=None)
    path = Path(weights).expanduser()
    state = load_state_dict_file(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise WeightsUnavailable(f"{path} is not a {name} state dict: {error}") from error
    return model


def build_model(config: TrainConfig) -> nn.Module:
    """The configured backbone with the seed head, leading `freeze` stages frozen."""
    if config.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {config.backbone!r}; choose from {sorted(BACKBONES)}")
    spec = BACKBONES[config.backbone]
    model = _load_backbone(config.backbone, config.weights)
    outputs = 2 + (len(REGIONS) if config.region_weight > 0 else 0)
    # The feature width the classifier saw: its own in_features, or its first Linear's
    # (mobilenet_v2 and efficientnet end in Dropout-Linear, mobilenet_v3 in an MLP).
    classifier = model.get_submodule(spec.head)
    first = classifier if isinstance(classifier, nn.Linear) else next(
        m for m in classifier.modules() if isinstance(m, nn.Linear))
    model.set_submodule(spec.head, seed_head(first.in_features, config.hidden, config.dropout, outputs))
    if config.output_stride == 16:
        _halve_output_stride(model.features)
    stages = spec.stages(model)  # taken before the pooling joins MobileNetV2's features
    _attach_pool(model, config.pool)
    if config.freeze > len(stages):
        raise ValueError(f"freeze={config.freeze} but {config.backbone} has {len(stages)} stages")
    for stage in stages[: config.freeze]:
        stage.requires_grad_(False)
    if config.noise_residual:
        model.features = NoiseResidualFeatures(model.features, *_NOISE_JOIN[config.backbone])
    if config.tap_stages:
        model.features = TappedFeatures(model.features, config.tap_stages)
        model.set_submodule(spec.head, seed_head(model.features.out_channels, config.hidden, config.dropout, outputs))
    return model


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy of `model` with each BatchNorm folded into the convolution before it.

    The same outputs to float rounding (bf16 autocast rounds the folded weights instead),
    for fewer passes over the activations: on 2 CPU cores MobileNetV2's forward pass ran
    1.6-1.8x as fast in fp32 and 1.2-1.4x in bf16 (bench/RESULTS.md). torch.fx traces
    every backbone here.
    """
    return fuse(model.eval())


def head_parameters(model: nn.Module, backbone: str) -> list[nn.Parameter]:
    """The parameters of the head `build_model` attached (the rest are the backbone's)."""
    return list(model.get_submodule(BACKBONES[backbone].head).parameters())


def imagenet_weights_cached(name: str) -> bool:
    """Whether torchvision would find the backbone's ImageNet weights without a network."""
    return (Path(get_dir()) / "checkpoints" / Path(BACKBONES[name].imagenet.url).name).is_file()

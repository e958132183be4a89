import copy
import shutil
import urllib.error

import pytest
import torch
from torch import nn

from realfake.config import TrainConfig
from realfake.data import IMAGENET_MEAN, IMAGENET_STD
from realfake.errors import WeightsUnavailable
from realfake.models import (
    BACKBONES,
    NoiseResidualFeatures,
    build_model,
    fold_batchnorm,
    srm_residual,
)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_builds_and_runs_a_forward_pass(backbone):
    model = build_model(TrainConfig(backbone=backbone, weights="none", resize=64, image_size=64))
    model.eval()
    with torch.inference_mode():
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()


def _as_if_trained(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine parameters away from their initial 0 and 1, so that
    folding them changes the convolutions' weights."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_folding_batchnorm_keeps_every_backbones_outputs(backbone):
    torch.manual_seed(0)
    model = _as_if_trained(build_model(TrainConfig(backbone=backbone, weights="none")))
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # none in ConvNeXt (LayerNorm)
    folded = fold_batchnorm(model)
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(folded(images), model.eval()(images), rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == batchnorms  # folded a copy


def test_scoring_models_come_folded_unless_asked_otherwise(tmp_path):
    from realfake.inference import ModelCache
    from realfake.train import save_atomic

    torch.manual_seed(0)
    config = TrainConfig(backbone="mobilenet_v2", weights="none", resize=64, image_size=64)
    model = _as_if_trained(build_model(config)).eval()
    save_atomic({"config": config.model_dump(), "model": model.state_dict()}, tmp_path / "best.pt")
    images = torch.randn(2, 3, 64, 64)
    outputs = {}
    for fold in (True, False):
        served, _, _ = ModelCache(precision="fp32", fold=fold).get(tmp_path / "best.pt")
        assert any(isinstance(m, nn.BatchNorm2d) for m in served.modules()) is not fold
        with torch.inference_mode():
            outputs[fold] = served(images)
    with torch.inference_mode():
        assert torch.allclose(outputs[True], model(images), rtol=1e-4, atol=1e-5)
    assert torch.allclose(outputs[True], outputs[False], rtol=1e-4, atol=1e-5)


def _head(model: nn.Module) -> nn.Sequential:
    heads = [m for m in model.modules() if isinstance(m, nn.Sequential) and len(m) == 4 and isinstance(m[2], nn.Dropout)]
    assert len(heads) == 1
    return heads[0]


def test_the_seed_head_replaces_the_imagenet_classifier():
    head = _head(build_model(TrainConfig(backbone="resnet50", weights="none")))
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[3].out_features) == (2048, 512, 2)
    assert head[2].p == 0.5
    custom = _head(build_model(TrainConfig(backbone="mobilenet_v2", weights="none", hidden=64, dropout=0.2)))
    assert (custom[0].in_features, custom[0].out_features, custom[2].p) == (1280, 64, 0.2)


def test_freeze_keeps_leading_stages_frozen():
    full = build_model(TrainConfig(backbone="resnet18", weights="none"))
    assert all(p.requires_grad for p in full.parameters())
    frozen = build_model(TrainConfig(backbone="resnet18", weights="none", freeze=2))
    assert not frozen.conv1.weight.requires_grad and not frozen.layer1[0].conv1.weight.requires_grad
    assert frozen.layer2[0].conv1.weight.requires_grad and frozen.fc[0].weight.requires_grad
    with pytest.raises(ValueError, match="stages"):
        build_model(TrainConfig(backbone="resnet18", weights="none", freeze=9))


def test_a_local_weights_file_loads(mobilenet_weights):
    model = build_model(TrainConfig(backbone="mobilenet_v2", weights=str(mobilenet_weights)))
    state = torch.load(mobilenet_weights, weights_only=True)
    assert torch.equal(model.features[0][0].weight, state["features.0.0.weight"])


def test_imagenet_weights_load_from_the_torch_cache_offline(mobilenet_weights, tmp_path, monkeypatch):
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    shutil.copy(mobilenet_weights, cache)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = build_model(TrainConfig(backbone="mobilenet_v2", weights="imagenet"))
    state = torch.load(mobilenet_weights, weights_only=True)
    assert torch.equal(model.features[1].conv[0][0].weight, state["features.1.conv.0.0.weight"])


def test_missing_weights_fail_with_a_message_saying_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        build_model(TrainConfig(backbone="resnet50", weights=str(tmp_path / "missing.pth")))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailable) as info:
        build_model(TrainConfig(backbone="resnet50", weights="imagenet"))
    message = str(info.value)
    assert "resnet50-0676ba61.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "weights:" in message


def test_a_weights_file_that_is_no_state_dict_is_named(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(WeightsUnavailable, match=r"junk.pth is not a state dict torch.load\(weights_only=True\) can read"):
        build_model(TrainConfig(backbone="mobilenet_v2", weights=str(tmp_path / "junk.pth")))
    torch.save({"head": nn.ReLU()}, tmp_path / "module.pth")  # a pickled object: refused, not unpickled
    with pytest.raises(WeightsUnavailable, match=r"holds objects other than tensors\): give a torchvision") as info:
        build_model(TrainConfig(backbone="mobilenet_v2", weights=str(tmp_path / "module.pth")))
    assert "weights_only=False" not in str(info.value) and "can still be loaded" not in str(info.value)
    torch.save([torch.zeros(1)], tmp_path / "list.pth")  # readable, but a list
    with pytest.raises(WeightsUnavailable, match="holds a list, not a state dict"):
        build_model(TrainConfig(backbone="mobilenet_v2", weights=str(tmp_path / "list.pth")))


def test_a_state_dict_of_the_wrong_backbone_is_refused(mobilenet_weights):
    with pytest.raises(WeightsUnavailable, match="is not a resnet18 state dict"):
        build_model(TrainConfig(backbone="resnet18", weights=str(mobilenet_weights)))


def test_gem_pooling_lies_between_average_and_max_and_learns_its_exponent():
    from realfake.models import GeMPool

    x = torch.rand(2, 8, 5, 5) + 0.01
    pool = GeMPool()
    out = pool(x)
    assert out.shape == (2, 8, 1, 1)
    average, maximum = x.mean(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    assert (out > average).all() and (out < maximum).all()
    with torch.no_grad():
        pool.p.fill_(1.0)
    assert torch.allclose(pool(x), average, atol=1e-6)
    with torch.no_grad():
        pool.p.fill_(3.0)
    pool(x).sum().backward()
    assert pool.p.grad is not None and pool.p.grad != 0


def test_the_noise_stream_starts_at_zero_learns_past_the_frozen_stages_and_survives_folding():
    config = TrainConfig(backbone="mobilenet_v2", weights="none", freeze=4, noise_residual=True)
    torch.manual_seed(0)
    model = build_model(config)
    torch.manual_seed(0)
    plain = build_model(config.model_copy(update={"noise_residual": False}))
    images = torch.randn(4, 3, 64, 64)
    for built in (model, plain):  # BatchNorm statistics of real activations: at their defaults, they fade to 0 by the head
        for module in built.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = None  # a plain average over the passes
        with torch.no_grad():
            built.train()(images)
    model.eval()
    plain.eval()
    with torch.inference_mode():
        out = plain(images)
        assert not torch.allclose(out[0], out[1], rtol=1e-3, atol=1e-4)
        assert torch.equal(model(images), out)  # the pretrained model, exactly, before training
    frozen = {n: q.clone() for n, q in model.named_parameters() if not q.requires_grad}
    assert {n.split(".")[2] for n in frozen} == {"0", "1", "2", "3"}  # features.features.N: the stages freeze counts
    optimizer = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):  # the first step moves the zero-started convolution, the second the ones before it
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 0, 1])).backward()
        optimizer.step()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for n, q in model.named_parameters() if "stream" in n)
    assert all(torch.equal(q, frozen[n]) for n, q in model.named_parameters() if n in frozen)
    model.eval()
    silenced = copy.deepcopy(model)
    silenced.features.stream[-1].weight.data.zero_()
    with torch.inference_mode():
        out = model(images)
        assert not torch.allclose(out, silenced(images), rtol=1e-3, atol=1e-4)  # the trained stream adds to the output
        assert torch.allclose(fold_batchnorm(model)(images), out, rtol=1e-4, atol=1e-5)
    again = build_model(config)
    again.load_state_dict(model.state_dict())  # a checkpoint loads into the model its config builds
    with pytest.raises(ValueError, match="noise_residual is built for mobilenet_v2"):
        TrainConfig(backbone="resnet18", noise_residual=True)


def _normalised(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


# Zhou et al. (CVPR 2018), section 3.2: the three SRM kernels of their noise stream, as published
_PUBLISHED_SRM = torch.stack([
    torch.nn.functional.pad(torch.tensor([[-1.0, 2, -1], [2, -4, 2], [-1, 2, -1]]) / 4, (1, 1, 1, 1)),
    torch.tensor([[-1.0, 2, -2, 2, -1], [2, -6, 8, -6, 2], [-2, 8, -12, 8, -2],
                  [2, -6, 8, -6, 2], [-1, 2, -2, 2, -1]]) / 12,
    torch.nn.functional.pad(torch.tensor([[1.0, -2, 1]]) / 2, (1, 1, 2, 2)),
])


def test_the_noise_residual_is_each_kernel_on_each_colour_in_grey_levels():
    stream = NoiseResidualFeatures(nn.Sequential(nn.Identity()), join=0, channels=8, stride=2)
    kernels = _PUBLISHED_SRM
    assert torch.allclose(kernels.sum(dim=(1, 2)), torch.zeros(3), atol=1e-6)  # high-pass: flat content cancels
    for colour in range(3):
        image = torch.full((1, 3, 15, 15), 0.5)
        image[0, colour, 7, 7] += 1 / 255  # one pixel one grey level brighter
        residual = stream.residual(_normalised(image))
        expected = torch.zeros(1, 9, 15, 15)
        expected[0, 3 * colour : 3 * colour + 3, 5:10, 5:10] = kernels / stream.truncate  # symmetric kernels
        assert torch.allclose(residual, expected, atol=1e-4), colour


def test_the_noise_residual_keeps_fp32_under_bf16_autocast_and_a_pasted_patch_shows():
    stream = NoiseResidualFeatures(nn.Sequential(nn.Identity()), join=0, channels=8, stride=2)
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32).contiguous()  # a smooth gradient
    assert stream.residual(_normalised(ramp))[..., 2:-2, 2:-2].abs().max() < 1e-3  # linear content cancels
    flat = torch.full((1, 3, 32, 32), 0.5)
    assert stream.residual(_normalised(flat)).abs().max() < 1e-5  # no false seam at the borders
    pasted = ramp.clone()
    pasted[..., 10:20, 10:20] += 2 / 255  # a patch two grey levels brighter: a seam
    exact = stream.residual(_normalised(pasted))
    assert exact.abs().max() > 0.3  # its edge shows (2 grey levels against a truncation at 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = stream.residual(_normalised(pasted))
    assert under_autocast.dtype == torch.float32 and torch.allclose(under_autocast, exact, atol=1e-5)
    folded = fold_batchnorm(stream)  # torch.fx traced it: the fp32 helper must stay one call, not be inlined
    assert [node.target for node in folded.graph.nodes if node.op == "call_function"].count(srm_residual) == 1


def test_the_whole_model_feeds_its_noise_stream_fp32_under_bf16_autocast_folded_or_not():
    config = TrainConfig(backbone="mobilenet_v2", weights="none", freeze=4, noise_residual=True)
    model = build_model(config).eval()
    images = torch.randn(2, 3, 64, 64)
    for built in (model, fold_batchnorm(model)):
        seen: list[torch.dtype] = []
        first = built.get_submodule("features.stream.0")
        hook = first.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            built(images)
        hook.remove()
        assert seen == [torch.float32], type(built).__name__


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "resnet18"])
def test_pool_gem_replaces_the_average_and_survives_folding_and_saving(backbone):
    torch.manual_seed(0)
    config = TrainConfig(backbone=backbone, weights="none", pool="gem", freeze=2)
    model = _as_if_trained(build_model(config)).eval()
    plain = build_model(config.model_copy(update={"pool": "avg"})).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(".p")})
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        out = model(images)
        assert not torch.allclose(out, plain(images))  # the pooling is really another one
        assert torch.allclose(fold_batchnorm(model)(images), out, rtol=1e-4, atol=1e-5)
    gem = [name for name, _ in model.named_parameters() if name.endswith(".p")]
    assert len(gem) == 1 and model.get_parameter(gem[0]).requires_grad
    again = build_model(config)
    again.load_state_dict(model.state_dict())  # a checkpoint loads into the model its config builds
    if backbone == "mobilenet_v2":  # the pooling joins `features` after the stages `freeze` counts
        deepest = TrainConfig(backbone=backbone, weights="none", pool="gem", freeze=19)
        frozen = {n for n, q in build_model(deepest).named_parameters() if not q.requires_grad}
        assert frozen == {n for n, q in build_model(deepest.model_copy(update={"pool": "avg"})).named_parameters()
                          if not q.requires_grad}
        assert build_model(deepest).get_parameter("features.19.p").requires_grad
    with pytest.raises(ValueError, match="pool gem needs features that end in a ReLU"):
        TrainConfig(backbone="convnext_tiny", pool="gem")


def test_output_stride_16_doubles_the_last_map_keeps_the_weights_and_survives_folding():
    torch.manual_seed(0)
    config = TrainConfig(backbone="mobilenet_v2", weights="none", output_stride=16, freeze=4)
    model = _as_if_trained(build_model(config)).eval()
    plain = build_model(config.model_copy(update={"output_stride": 32})).eval()
    plain.load_state_dict(model.state_dict())  # the same parameters: ImageNet weights load unchanged
    images = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        assert model.features(images).shape[-2:] == (6, 6)  # 96 / 16
        assert plain.features(images).shape[-2:] == (3, 3)
        out = model(images)
        assert not torch.allclose(out, plain(images))
        assert torch.allclose(fold_batchnorm(model)(images), out, rtol=1e-4, atol=1e-5)
    # the blocks after the unstrided one dilate, so their 3x3 kernels span what they did at stride 32
    assert [block.conv[1][0].dilation for block in model.features[15:18]] == [(2, 2)] * 3
    assert model.features[14].conv[1][0].stride == (1, 1)
    with pytest.raises(ValueError, match="output_stride 16 is built for mobilenet_v2"):
        TrainConfig(backbone="resnet18", output_stride=16)


def test_tap_stages_join_each_tapped_channels_mean_and_spread_to_the_last_maps_average():
    torch.manual_seed(0)
    config = TrainConfig(backbone="mobilenet_v2", weights="none", freeze=4, tap_stages=(6, 13))
    model = build_model(config)
    assert model.classifier[0].in_features == 1280 + 2 * (32 + 96)
    images = torch.randn(3, 3, 96, 96)
    for module in model.modules():  # BatchNorm statistics of real activations (at their defaults they fade to 0)
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            module.momentum = None
    with torch.no_grad():
        model.train()(images)
    model.eval()
    plain = build_model(config.model_copy(update={"tap_stages": ()})).eval()
    plain.features.load_state_dict(model.features.features.state_dict())  # ImageNet weights load as before
    seen = {}
    hooks = [model.features.features[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
             for i in (6, 13)]
    with torch.inference_mode():
        vector = model.features(images).flatten(1)
        expected_last = plain.eval().features(images).mean(dim=(-2, -1))
        norm = model.features.norm
        raw = torch.cat([torch.cat([seen[i].flatten(2).mean(2), seen[i].flatten(2).std(2, correction=0)], 1)
                         for i in (6, 13)], 1)
        expected_taps = (raw - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
        assert not torch.allclose(vector[0], vector[1], rtol=1e-3, atol=1e-4)  # each image its own vector
        assert torch.allclose(vector[:, :1280], expected_last, rtol=1e-4, atol=1e-5)
        assert torch.allclose(vector[:, 1280:1280 + 32], expected_taps[:, :32], rtol=1e-4, atol=1e-4)  # stage 6's means
        assert torch.allclose(vector[:, 1280:], expected_taps, rtol=1e-4, atol=1e-4)
        assert raw[:, 32:64].min() > 0  # stage 6's spreads: real standard deviations, not a copy of the means
        out = model(images)
        assert torch.allclose(fold_batchnorm(model)(images), out, rtol=1e-4, atol=1e-5)
    for hook in hooks:
        hook.remove()
    frozen = {n for n, q in model.named_parameters() if not q.requires_grad}
    assert {n.split(".")[2] for n in frozen} == {"0", "1", "2", "3"}  # features.features.N: the stages freeze counts
    model.train()
    nn.functional.cross_entropy(model(images[:1]), torch.tensor([1])).backward()  # an epoch's last batch of one
    assert model.features.norm.weight.grad.abs().sum() > 0
    again = build_model(config)
    again.load_state_dict(model.state_dict())  # a checkpoint loads into the model its config builds
    with pytest.raises(ValueError, match="tap_stages is built for mobilenet_v2"):
        TrainConfig(backbone="resnet18", tap_stages=(2,))
    for taps in [(13, 6), (6, 6), (18,)]:
        with pytest.raises(ValueError, match="distinct stages in increasing order"):
            TrainConfig(backbone="mobilenet_v2", tap_stages=taps)
    with pytest.raises(ValueError, match="tap_stages joins neither"):
        TrainConfig(backbone="mobilenet_v2", tap_stages=(6,), pool="gem")

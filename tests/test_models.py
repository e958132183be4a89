import shutil
import urllib.error

import pytest
import torch
from torch import nn

from realfake.config import TrainConfig
from realfake.errors import WeightsUnavailable
from realfake.models import BACKBONES, build_model, fold_batchnorm


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


def test_a_state_dict_of_the_wrong_backbone_is_refused(mobilenet_weights):
    with pytest.raises(WeightsUnavailable, match="is not a resnet18 state dict"):
        build_model(TrainConfig(backbone="resnet18", weights=str(mobilenet_weights)))

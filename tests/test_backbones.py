"""Backbones: real Lite0 weights, feature shapes, local-only torchvision weights, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.data import chelsea

from torch import nn

from defectflow.tasks.backbones import (
    LITE_INPUT_SIZES,
    Backbone,
    available_layers,
    fold_batchnorm,
    load_backbone,
    load_classifier,
    torchvision_weights_path,
)
from defectflow.tasks.errors import DefectflowError

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty torch hub cache: TORCH_HOME decides torch.hub.get_dir()."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert torch.hub.get_dir() == str(tmp_path / "hub")
    return tmp_path / "hub"


def _imagenet_batch(image: np.ndarray, size: int = 224) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - IMAGENET_MEAN) / IMAGENET_STD


@pytest.mark.parametrize("name", sorted(LITE_INPUT_SIZES))
def test_lite_weights_classify_a_cat(name):
    # Only a correct positional mapping of every tensor recognises the cat.
    classifier = load_classifier(name)
    with torch.no_grad():
        batch = _imagenet_batch(chelsea(), size=LITE_INPUT_SIZES[name])
        probabilities = classifier(batch).softmax(dim=1)[0]
    assert int(probabilities.argmax()) in IMAGENET_CATS
    assert float(probabilities[list(IMAGENET_CATS)].sum()) > 0.5


@pytest.mark.parametrize("name,channels", [
    ("efficientnet_lite1", {"blocks.2": 40, "blocks.4": 112, "blocks.6": 320}),
    ("efficientnet_lite2", {"blocks.2": 48, "blocks.4": 120, "blocks.6": 352}),
])
def test_lite1_and_lite2_layers(name, channels):
    backbone = load_backbone(name, list(channels))
    assert backbone.layer_channels == channels
    assert backbone.layer_strides == {"blocks.2": 8, "blocks.4": 16, "blocks.6": 32}
    assert available_layers(name) == [f"blocks.{i}" for i in range(7)]


def test_lite0_features_have_expected_channels_and_strides():
    layers = ["blocks.1", "blocks.2", "blocks.3", "blocks.4"]
    backbone = load_backbone("efficientnet_lite0", layers)

    assert backbone.layer_channels == {
        "blocks.1": 24, "blocks.2": 40, "blocks.3": 80, "blocks.4": 112
    }
    assert backbone.layer_strides == {"blocks.1": 4, "blocks.2": 8, "blocks.3": 16, "blocks.4": 16}
    features = backbone(torch.randn(2, 3, 64, 64))
    assert list(features) == layers
    for layer, feature_map in features.items():
        stride = backbone.layer_strides[layer]
        assert feature_map.shape == (2, backbone.layer_channels[layer], 64 // stride, 64 // stride)


def test_backbone_is_frozen_and_stops_at_the_deepest_layer():
    backbone = load_backbone("efficientnet_lite0", ["blocks.2", "blocks.0"])
    backbone.train()  # must not leave eval mode: batch-norm statistics are frozen

    assert not backbone.training
    assert not any(p.requires_grad for p in backbone.parameters())
    assert len(backbone.stages) == 4  # stem + blocks.0..2; deeper blocks are dropped
    assert list(backbone(torch.randn(1, 3, 64, 64))) == ["blocks.2", "blocks.0"]


def test_backbone_matches_the_full_network():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    classifier = load_classifier("efficientnet_lite0")
    with torch.no_grad():
        expected = classifier.blocks[:4](classifier.bn1(classifier.conv_stem(x)))
    features = load_backbone("efficientnet_lite0", "blocks.3")(x)
    torch.testing.assert_close(features["blocks.3"], expected)


def test_folded_batchnorm_gives_the_same_features_with_fewer_norms():
    backbone = load_backbone("efficientnet_lite0", ["blocks.2", "blocks.4"])
    folded = fold_batchnorm(backbone)

    def norms(model):
        return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())

    assert norms(backbone) > 30 and norms(folded) == 0  # every conv+norm pair of Lite0
    assert norms(load_backbone("efficientnet_lite0", "blocks.4")) == norms(backbone)  # a copy
    x = torch.randn(2, 3, 96, 96)
    expected, got = backbone(x), folded(x)
    for layer in expected:
        torch.testing.assert_close(got[layer], expected[layer], rtol=1e-4, atol=1e-4)


def _norm_stage(with_conv: bool, mean: float = 0.5):
    norm = nn.BatchNorm2d(4).eval()
    norm.running_mean.fill_(mean)
    norm.running_var.fill_(4.0)
    norm.weight.data.fill_(2.0)
    norm.bias.data.fill_(-1.0)
    layers = [nn.Conv2d(3, 4, 3, padding=1), norm, nn.ReLU()] if with_conv else [
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), norm]
    return Backbone("toy", [("stem", nn.Sequential(*layers))], ["stem"], (0, 0, 0), (1, 1, 1))


def test_folding_leaves_a_norm_that_does_not_follow_a_convolution():
    folded = fold_batchnorm(_norm_stage(with_conv=True))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    apart = _norm_stage(with_conv=False)  # conv, ReLU, norm: not one affine map
    kept = fold_batchnorm(apart)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in kept.modules()) == 1
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(kept(x)["stem"], apart(x)["stem"])


def test_missing_torchvision_weights_name_the_file(empty_hub):
    with pytest.raises(DefectflowError) as raised:
        load_backbone("resnet18", ["layer2", "layer3"])
    message = str(raised.value)
    expected = empty_hub / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message


def test_torchvision_weights_load_from_the_hub_cache(empty_hub):
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = torchvision_weights_path("resnet18")
    assert path == empty_hub / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)

    backbone = load_backbone("resnet18", ["layer2", "layer3"])

    assert backbone.layer_channels == {"layer2": 128, "layer3": 256}
    assert backbone.layer_strides == {"layer2": 8, "layer3": 16}
    torch.testing.assert_close(backbone.stages["0"][0].weight, state["conv1.weight"])
    features = backbone(torch.randn(1, 3, 64, 64))
    assert features["layer3"].shape == (1, 256, 4, 4)


def test_wrong_torchvision_weights_are_a_clear_error(empty_hub):
    path = torchvision_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(DefectflowError, match="not the ImageNet weights of 'resnet18'"):
        load_backbone("resnet18", ["layer1"])


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(DefectflowError) as raised:
        load_backbone("vgg16", ["features"])
    message = str(raised.value)
    assert "'vgg16'" in message
    for name in ("efficientnet_lite0", "resnet18", "resnet50", "wide_resnet50_2"):
        assert name in message


def test_unknown_layer_lists_the_choices():
    with pytest.raises(DefectflowError) as raised:
        load_backbone("efficientnet_lite0", ["blocks.1", "layer2"])
    message = str(raised.value)
    assert "'layer2'" in message
    for layer in available_layers("efficientnet_lite0"):
        assert layer in message
    assert available_layers("wide_resnet50_2") == ["layer1", "layer2", "layer3", "layer4"]


def test_positional_loading_rejects_a_different_order(tmp_path):
    from collections import OrderedDict

    from defectflow.tasks.backbones import load_state_dict_by_position

    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
    state = model.state_dict()
    # Other module names, same kinds (weight, running_mean, num_batches_tracked...).
    renamed = OrderedDict(
        (f"_m{i}.{key.rsplit('.', 1)[-1]}", value) for i, (key, value) in enumerate(state.items())
    )
    load_state_dict_by_position(model, renamed, tmp_path / "w.pth")  # same order: loads

    swapped = list(renamed.items())
    swapped[0], swapped[-2] = swapped[-2], swapped[0]  # first conv weight <-> last conv weight
    with pytest.raises(DefectflowError, match="tensor #0 .* parameter order differs"):
        load_state_dict_by_position(model, OrderedDict(swapped), tmp_path / "w.pth")


def test_folding_that_changes_the_features_is_not_used(monkeypatch):
    import torch.nn.utils.fusion as fusion

    original = _norm_stage(with_conv=True)
    # A wrong fold (the norm dropped, not folded) must be caught by the probe check.
    monkeypatch.setattr(fusion, "fuse_conv_bn_eval", lambda conv, norm: conv)
    assert fold_batchnorm(original) is original

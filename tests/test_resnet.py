"""Spectral-normalised ResNets (model/resnet.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from iecl.model.resnet import build_backbone

# torchvision's resnet18 / resnet50 parameter counts (11,689,512 and 25,557,032)
# minus their `fc` classifiers (512*1000+1000 and 2048*1000+1000).
TORCHVISION_WITHOUT_FC = {"resnet18": 11_689_512 - 513_000, "resnet50": 25_557_032 - 2_049_000}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("spectral_norm", [False, True])
def test_parameter_count_matches_torchvision_minus_classifier(name, spectral_norm):
    model = build_backbone(name, spectral_norm)
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_WITHOUT_FC[name]


def _convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_every_conv_is_spectrally_normalised():
    model = build_backbone("resnet50", spectral_norm=True)
    convs = _convs(model)
    assert len(convs) == 53  # stem + 16 bottlenecks x 3 + 4 downsample shortcuts
    assert all(parametrize.is_parametrized(c, "weight") for c in convs)
    assert not any(parametrize.is_parametrized(c) for c in _convs(build_backbone("resnet50", spectral_norm=False)))


@pytest.mark.slow
def test_largest_singular_value_is_close_to_one():
    torch.manual_seed(0)
    model = build_backbone("resnet18", spectral_norm=True)
    # Move the weights away from their initialisation, as training would.
    with torch.no_grad():
        for conv in _convs(model):
            conv.parametrizations.weight.original.mul_(3.0).add_(torch.randn_like(conv.weight) * 0.01)
    model.train()
    x = torch.randn(4, 3, 32, 32)
    for _ in range(30):  # one power iteration per training forward
        model(x)
    for conv in _convs(model):
        matrix = conv.weight.detach().reshape(conv.weight.shape[0], -1)
        sigma = torch.linalg.matrix_norm(matrix, ord=2).item()
        assert sigma == pytest.approx(1.0, abs=0.05), conv


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet50", 2048)])
def test_features_and_channels_last(name, dim):
    torch.manual_seed(0)
    model = build_backbone(name).eval()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, dim) and model.feature_dim == dim
    cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, out, rtol=1e-4, atol=1e-4)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="resnet18"):
        build_backbone("resnet34")

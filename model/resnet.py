"""Spectral-normalised ResNet-18 / ResNet-50 backbones (no classifier).

The architecture is torchvision's ResNet v1.5 (stride on the 3x3 conv of a
bottleneck), so with `spectral_norm=False` the parameter counts equal
torchvision's minus the `fc` layer. With `spectral_norm=True` every convolution
(stem, blocks, downsample shortcuts) is wrapped in
`torch.nn.utils.parametrizations.spectral_norm`: IE-CL's entropy-preservation
regulariser (paper Section 3.3, eta = 1, "architectural"). The parametrisation
keeps the same number of trainable parameters (`weight.original`); its power
iteration vectors are buffers and do one iteration per training forward.

`forward` returns pooled features `(B, feature_dim)`; the projector and the
evaluation heads sit on top of that (timm's forward_features / head split).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm


def make_conv(spectral_norm: bool) -> Callable[..., nn.Module]:
    """A Conv2d factory (bias-free: every conv here feeds a BatchNorm)."""

    def conv(c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Module:
        layer = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        return _spectral_norm(layer) if spectral_norm else layer

    return conv


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, conv, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = conv(c_in, width, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv(width, c_out, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(conv, c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, conv, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = conv(c_in, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv(width, width, 3, stride, 1)  # v1.5: stride on the 3x3
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv(width, c_out, 1)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(conv, c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


def _shortcut(conv, c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(conv(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))


class ResNet(nn.Module):
    def __init__(self, block: type, layers: list[int], spectral_norm: bool = True) -> None:
        super().__init__()
        conv = make_conv(spectral_norm)
        self.stem = nn.Sequential(
            conv(3, 64, 7, 2, 3),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages, c_in = [], 64
        for i, (width, depth) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(conv, c_in, width, stride))
                c_in = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.feature_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pooled features (B, feature_dim)."""
        return self.forward_from_stem_conv(self.stem[0](x))

    def forward_from_stem_conv(self, h: torch.Tensor) -> torch.Tensor:
        """`forward` after the stem's convolution: (B, 64, H/2, W/2) -> (B, feature_dim).
        The encoder runs that convolution apart (model/encoder.py)."""
        _, bn, relu, pool = self.stem
        x = self.stages(pool(relu(bn(h))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


BACKBONES: dict[str, Callable[[bool], ResNet]] = {
    "resnet18": lambda sn: ResNet(BasicBlock, [2, 2, 2, 2], sn),
    "resnet50": lambda sn: ResNet(Bottleneck, [3, 4, 6, 3], sn),
}


def build_backbone(name: str, spectral_norm: bool = True) -> ResNet:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](spectral_norm)


# ----------------------------------------------------------------------------- taking the backbone away


@torch.no_grad()
def plain_state_dict(backbone: ResNet) -> dict[str, torch.Tensor]:
    """The state_dict of `build_backbone(name, spectral_norm=False)` that
    computes what `backbone` computes in eval mode: each spectral-normalised
    convolution's weight is stored as W / sigma, with sigma from its saved
    power-iteration vectors (eval mode runs no further iteration)."""
    was_training = backbone.training
    backbone.eval()
    try:
        out = {f"{name}.weight": module.weight.detach().clone() for name, module in backbone.named_modules()
               if parametrize.is_parametrized(module, "weight")}
    finally:
        backbone.train(was_training)
    for key, value in backbone.state_dict().items():
        if ".parametrizations." not in key:
            out[key] = value.detach().clone()
    return out


#: our names -> torchvision's (and timm's, which are the same for resnet18 and resnet50)
_TO_TORCHVISION = (
    (r"^stem\.0\.", "conv1."),
    (r"^stem\.1\.", "bn1."),
    (r"^stages\.(\d+)\.", lambda m: f"layer{int(m.group(1)) + 1}."),
    (r"\.shortcut\.", ".downsample."),
)
_FROM_TORCHVISION = (
    (r"^conv1\.", "stem.0."),
    (r"^bn1\.", "stem.1."),
    (r"^layer(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}."),
    (r"\.downsample\.", ".shortcut."),
)


def _rename(state: dict, rules) -> dict:
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def to_torchvision_names(state: dict) -> dict:
    """A plain state_dict under torchvision's (= timm's) ResNet names, without `fc`."""
    return _rename(state, _TO_TORCHVISION)


def from_torchvision_names(state: dict) -> dict:
    """The inverse of `to_torchvision_names` (an `fc` is dropped: our ResNets have none)."""
    return _rename({k: v for k, v in state.items() if not k.startswith("fc.")}, _FROM_TORCHVISION)

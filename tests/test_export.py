"""Taking the result away: `iecl export` and the Python API (iecl.load_backbone,
iecl.load_method) give a plain ResNet whose features are the checkpoint's."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

import iecl
from iecl.cli import main
from iecl.model.methods import Method
from iecl.model.resnet import build_backbone, from_torchvision_names
from iecl.train.factory import load_pretrained


def _features(module: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return module.eval()(x)


def test_the_api_gives_the_checkpoints_backbone_without_spectral_norm(tiny_checkpoint):
    method = iecl.load_method(tiny_checkpoint)
    assert isinstance(method, Method) and not method.training
    trunk = method.backbone()
    assert any(parametrize.is_parametrized(m, "weight") for m in trunk.modules())  # IE-CL: spectral norm on
    plain = iecl.load_backbone(tiny_checkpoint)
    assert not any(parametrize.is_parametrized(m, "weight") for m in plain.modules())
    for seed in (0, 1):  # fresh inputs: the same function, not one lucky sample
        torch.testing.assert_close(_features(plain, seed), _features(trunk, seed), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["state_dict", "torchvision", "timm"])
def test_export_loads_strictly_and_reproduces_the_features(fmt, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "backbone.pt"
    assert main(["export", str(tiny_checkpoint), "--format", fmt, "--out", str(out), "--projector"]) == 0
    assert "spectral norm folded" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    if fmt == "state_dict":
        assert "stem.0.weight" in state
    else:  # torchvision's (= timm's) ResNet names, without the classifier
        assert {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer4.1.bn2.weight",
                "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean"} <= set(state)
        assert not any(k.startswith(("stem.", "stages.", "fc.")) or ".shortcut." in k for k in state)
        state = from_torchvision_names(state)
    assert not any("parametrizations" in k for k in state)
    plain = build_backbone("resnet18", spectral_norm=False)
    plain.load_state_dict(state, strict=True)
    method, _, _ = load_pretrained(tiny_checkpoint)
    torch.testing.assert_close(_features(plain), _features(method.backbone()), rtol=1e-5, atol=1e-6)
    projector = torch.load(tmp_path / "backbone.projector.pt", weights_only=True)
    method.encoders()["online"].projector.load_state_dict(projector, strict=True)


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "b.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("iecl export: error:") and len(err.strip().splitlines()) == 1

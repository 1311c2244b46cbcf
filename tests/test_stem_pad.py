"""model.stem_pad_channels: the stem convolution on zero-padded channels
computes what the 3-channel one computes (model/encoder.py, `Encoder._stem`)."""

from __future__ import annotations

import copy

import pytest
import torch

from iecl.model.spectral import once_per_step


def _encoder(channels_last: bool):
    from iecl.model.methods import build_method

    torch.manual_seed(0)
    encoder = build_method("iecl", backbone="resnet18", projector_hidden=32, projector_out=16, batch_size=4,
                           image_size=32).train().online
    return encoder.to(memory_format=torch.channels_last) if channels_last else encoder


def _run(encoder, x: torch.Tensor):
    """Embeddings, the input's gradient and the stem's trained weight's gradient."""
    x = x.clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(2)
    with once_per_step():
        out = encoder(x)
    (out * torch.randn(out.shape, generator=gen)).sum().backward()
    return out.detach(), x.grad, encoder.backbone.stem[0].parametrizations.weight.original.grad


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("pad", [4, 8])
def test_padded_stem_computes_the_same_numbers(pad, channels_last):
    """fp32 on the CPU: the same embeddings, input gradient (3 channels, in the
    input's layout) and weight gradient as the unpadded stem, within the
    rounding of a convolution whose algorithm may change with the channel count."""
    plain = _encoder(channels_last)
    padded = copy.deepcopy(plain)
    padded.stem_pad_channels = pad
    x = torch.randn(4, 3, 32, 32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected, actual = _run(plain, x), _run(padded, x)
    for what, a, e in zip(("embeddings", "input grad", "weight grad"), actual, expected):
        assert a.shape == e.shape, what
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=what)


def test_padded_stem_pads_what_the_convolution_sees(monkeypatch):
    """The convolution gets `pad` channels, zeros beyond the third, in both the
    input and the weight, channels-last kept."""
    import torch.nn.functional as F

    seen = []
    conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda x, w, *a: seen.append((x, w)) or conv2d(x, w, *a))
    encoder = _encoder(channels_last=True)
    encoder.stem_pad_channels = 8
    encoder(torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    x, w = seen[0]
    assert x.shape[1] == w.shape[1] == 8
    assert x.is_contiguous(memory_format=torch.channels_last) and w.is_contiguous(memory_format=torch.channels_last)
    assert not x[:, 3:].any() and not w[:, 3:].any() and w[:, :3].any()

"""SAIB (model/saib.py) against DESIGN.md "The method", point 3."""

from __future__ import annotations

import pytest
import torch
from conftest import on_prepared

from iecl.kernels.saib_reference import patchify, unpatchify
from iecl.model.methods import build_method
from iecl.model.saib import SAIB


@pytest.mark.parametrize("batch,channels_hw,patch", [(4, (32, 48), 8), (3, (16, 16), 4), (5, (64, 32), 16)])
def test_output_shape_equals_input_shape(batch, channels_hw, patch):
    h, w = channels_hw
    x = torch.randn(batch, 3, h, w)
    y = SAIB(batch, (h, w), patch)(x)
    assert y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("batch,h,w,patch", [(4, 32, 32, 8), (6, 16, 48, 4), (256, 224, 224, 16)])
def test_parameter_shapes_follow_from_batch_and_patch(batch, h, w, patch):
    saib = SAIB(batch, (h, w), patch)
    d, n = batch, 3 * (h // patch) * (w // patch)
    shapes = {name: tuple(p.shape) for name, p in saib.named_parameters()}
    assert shapes == {
        "pos_embed": (n, 1, patch, patch),
        "conv1.0.weight": (d, d, 1, 1), "conv1.1.weight": (d,), "conv1.1.bias": (d,),
        "conv2.0.weight": (2 * d, d, 3, 3), "conv2.1.weight": (2 * d,), "conv2.1.bias": (2 * d,),
        "conv3.0.weight": (2 * d, 2 * d, 1, 1), "conv3.1.weight": (2 * d,), "conv3.1.bias": (2 * d,),
        "conv4.0.weight": (d, 2 * d, 1, 1), "conv4.1.weight": (d,), "conv4.1.bias": (d,),
    }


def test_patchify_puts_the_batch_in_channels():
    x = torch.randn(3, 3, 16, 24)
    p = patchify(x, 8)  # (3 * 2 * 3, 3, 8, 8)
    assert p.shape == (18, 3, 8, 8)
    for b, c, i, j, u, v in [(0, 0, 0, 0, 0, 0), (2, 1, 1, 2, 7, 3), (1, 2, 0, 1, 4, 6)]:
        n = c * (2 * 3) + i * 3 + j
        assert p[n, b, u, v] == x[b, c, i * 8 + u, j * 8 + v]
    assert torch.equal(unpatchify(p, 3, 16, 24), x)


def test_samples_exchange_information():
    """Batch-as-channels: one sample's output depends on the other samples."""
    torch.manual_seed(0)
    saib = SAIB(4, (16, 16), 8)
    x = torch.randn(4, 3, 16, 16)
    y = saib(x)
    x2 = x.clone()
    x2[3] = torch.randn(3, 16, 16)  # (a constant offset would not do: BN removes it per channel)
    assert not torch.allclose(saib(x2)[0], y[0])


def test_3x3_conv_is_zero_padded_inside_each_patch():
    """With BN statistics frozen (eval), a pixel only influences its own patch."""
    torch.manual_seed(0)
    saib = SAIB(2, (16, 16), 8)
    saib(torch.randn(2, 3, 16, 16))  # populate running statistics
    saib.eval()
    x = torch.randn(2, 3, 16, 16)
    x2 = x.clone()
    x2[:, :, 3, 4] += 5.0  # inside patch (i=0, j=0)
    delta = (saib(x2) - saib(x)).abs()
    assert delta[:, :, :8, :8].amax() > 0.1
    assert delta[:, :, 8:, :].amax() == 0 and delta[:, :, :, 8:].amax() == 0


def test_wrong_batch_size_is_refused():
    saib = SAIB(4, (16, 16), 8)
    with pytest.raises(ValueError, match="per-device batch size"):
        saib(torch.randn(3, 3, 16, 16))


def test_patch_must_divide_image():
    with pytest.raises(ValueError, match="must divide"):
        SAIB(4, (20, 16), 8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jacobian_determinant_exceeds_one(seed):
    """Paper, Appendix C: SAIB is locally volume-expanding, log|det J| > 0.

    Computed exactly on the whole block X -> X' at a tiny size (384 inputs).
    (Measured while writing this: the inner residual P -> P + A(P) alone can have
    |det| < 1 at random initialisation, so the appendix's claim that every singular
    value of I + A is >= 1 does not hold in general; the block's expansion includes
    the outer skip, X' = 2X + pos + A.)
    """
    torch.manual_seed(seed)
    saib = SAIB(2, (8, 8), 4).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(saib, x).reshape(x.numel(), x.numel())
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0 and logabsdet > 0


def _tiny_iecl(**kwargs):
    return build_method("iecl", backbone="resnet18", projector_hidden=64, projector_out=32,
                        batch_size=4, image_size=32, saib=True, patch_size=16, **kwargs)


@pytest.mark.parametrize("term", ["loss_kl", "entropy"])
def test_gradients_reach_every_saib_parameter_through(term):
    torch.manual_seed(0)
    method = _tiny_iecl()
    anchor, query = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    on_prepared(method, anchor, query)[0][term].backward()
    for name, param in method.saib.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name

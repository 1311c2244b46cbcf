"""Losses (model/losses/) against hand computations and their known properties."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from iecl.model.losses import CodingRateEntropy, GaussianKL, InfoNCE, Renyi2Entropy


def test_infonce_hand_computed():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[2.0, 0.0], [0.6, 0.8]])  # row 0 is normalised to (1, 0)
    tau = 0.5
    # Row 0: similarities (1, 0.6) -> logits (2, 1.2), positive first.
    row0 = -2.0 + math.log(math.exp(2.0) + math.exp(1.2))
    # Row 1: similarities (0, 0.8) -> logits (0, 1.6), positive second.
    row1 = -1.6 + math.log(math.exp(0.0) + math.exp(1.6))
    assert InfoNCE(tau)(q, k).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_infonce_is_log_batch_when_nothing_is_distinguishable():
    z = torch.ones(8, 5)
    assert InfoNCE(0.2)(z, z).item() == pytest.approx(math.log(8), rel=1e-6)


def test_infonce_is_minimal_when_positives_coincide():
    """For a fixed batch q, moving any key away from its query raises the loss."""
    torch.manual_seed(0)
    loss = InfoNCE(0.2)
    q = F.normalize(torch.randn(16, 32), dim=1)
    best = loss(q, q)
    for scale in (0.05, 0.2, 1.0):
        for _ in range(5):
            assert loss(q, q + scale * torch.randn_like(q)) > best


def test_infonce_gradient_vanishes_only_with_aligned_positives():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(8, 16), dim=1)

    def key_grad_norm(k):
        k = k.clone().requires_grad_(True)
        InfoNCE(0.05)(q, k).backward()
        return k.grad.norm().item()

    # At k = q the loss is near its floor for well-separated random directions...
    aligned = key_grad_norm(q)
    assert aligned < 1e-2
    # ...and keys pointing elsewhere are pulled back hard.
    assert key_grad_norm(torch.randn(8, 16)) > 100 * aligned


@pytest.mark.parametrize("estimator", [CodingRateEntropy(0.5), Renyi2Entropy()])
def test_entropy_grows_as_embeddings_spread(estimator):
    torch.manual_seed(0)
    centre = torch.randn(1, 64)
    noise = torch.randn(128, 64)
    values = [estimator(centre + s * noise).item() for s in (0.01, 0.1, 0.3, 1.0, 3.0)]
    assert all(a < b for a, b in pairwise(values)), values


def test_renyi2_bounds():
    est = Renyi2Entropy()
    assert est(torch.ones(16, 8)).item() == pytest.approx(0.0, abs=1e-6)
    assert est(torch.eye(16)).item() == pytest.approx(math.log(16), rel=1e-6)


@pytest.mark.parametrize("n,d", [(32, 8), (8, 32)])
def test_coding_rate_matches_its_definition(n, d):
    """Both factorisation branches equal 1/2 logdet(I_d + d/(n eps^2) Z^T Z)."""
    torch.manual_seed(0)
    z = torch.randn(n, d, dtype=torch.float64)
    zn = F.normalize(z, dim=1)
    eps = 0.5
    expected = 0.5 * torch.logdet(torch.eye(d, dtype=torch.float64) + d / (n * eps**2) * zn.T @ zn)
    assert CodingRateEntropy(eps)(z).item() == pytest.approx(expected.item(), rel=1e-4)


def test_kl_is_zero_for_identical_batches():
    torch.manual_seed(0)
    z = torch.randn(32, 16)
    assert GaussianKL()(z, z).item() == pytest.approx(0.0, abs=1e-5)
    assert GaussianKL()(z, z + 0.3).item() > 0.01


def test_kl_hand_computed_and_asymmetric():
    # After L2 normalisation, (a, 1) rows: two batches differing in the first coordinate.
    p = torch.tensor([[0.0, 1.0], [0.2, 1.0], [-0.2, 1.0], [0.1, 1.0]])
    q = torch.tensor([[0.5, 1.0], [0.9, 1.0], [0.1, 1.0], [0.3, 1.0]])
    pn, qn = F.normalize(p, dim=1), F.normalize(q, dim=1)
    eps = 1e-6
    expected = 0.0
    for d in range(2):
        mp, vp = pn[:, d].mean().item(), pn[:, d].var(unbiased=False).item() + eps
        mq, vq = qn[:, d].mean().item(), qn[:, d].var(unbiased=False).item() + eps
        expected += 0.5 * (math.log(vq / vp) + (vp + (mp - mq) ** 2) / vq - 1)
    kl = GaussianKL(eps)
    assert kl(p, q).item() == pytest.approx(expected, rel=1e-4)
    assert kl(p, q).item() != pytest.approx(kl(q, p).item(), rel=1e-2)


def test_losses_accept_low_precision_inputs():
    torch.manual_seed(0)
    z = torch.randn(16, 8).bfloat16()
    for value in (InfoNCE()(z, z), GaussianKL()(z, z), CodingRateEntropy()(z), Renyi2Entropy()(z)):
        assert value.dtype == torch.float32 and torch.isfinite(value)


@pytest.mark.parametrize("loss,inputs", [
    (InfoNCE(0.2), 2), (GaussianKL(), 2), (CodingRateEntropy(0.5), 1), (Renyi2Entropy(), 1),
])
def test_losses_compute_in_float32_under_autocast(loss, inputs):
    """Under a bf16 autocast region (where the training step runs), the matmuls
    inside a loss must still be float32: the same value as outside autocast."""
    torch.manual_seed(0)
    zs = [torch.randn(64, 48) for _ in range(inputs)]
    expected = loss(*zs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(*zs)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)

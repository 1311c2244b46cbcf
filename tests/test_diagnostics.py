"""Representation diagnostics (model/diagnostics.py) against cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from iecl.model.diagnostics import (
    diagnostics,
    effective_rank,
    infonce_mi_bound,
    infonce_mi_ceiling,
    renyi2_entropy,
)
from iecl.model.losses import InfoNCE, Renyi2Entropy


def test_effective_rank_of_isotropic_gaussian_is_near_full():
    # Marchenko-Pastur: with D/N = 1/64 the singular values lie within about
    # (1 +- 1/8) sqrt(N), nearly equal, so exp(entropy) is just under D (~31.9).
    torch.manual_seed(0)
    z = torch.randn(2048, 32)
    erank = effective_rank(z).item()
    assert 0.9 * 32 < erank <= 32 + 1e-3


def test_effective_rank_of_rank_k_batch_is_near_k():
    # z = A B with B's k rows orthonormal: the centred batch has exactly k
    # non-zero singular values, those of the centred Gaussian A (N=2048, k=5),
    # which lie within (1 +- sqrt(k/N)) ~ (1 +- 0.05) of each other. Unequal
    # values give exp(H) < k (only float32 rounding pushes it above, by ~1e-4),
    # and a 5% spread costs well under 0.01, hence (k - 0.1, k + 0.01].
    torch.manual_seed(0)
    k, d = 5, 64
    basis = torch.linalg.qr(torch.randn(d, k)).Q.T  # (k, d), orthonormal rows
    z = torch.randn(2048, k) @ basis + 3.0  # the offset is removed by centring
    erank = effective_rank(z).item()
    assert k - 0.1 < erank <= k + 0.01


def test_effective_rank_of_collapsed_batch_is_one():
    assert effective_rank(torch.ones(16, 8)).item() == pytest.approx(1.0)


def test_renyi2_of_identical_embeddings_is_zero():
    z = torch.tensor([[0.3, -1.2, 2.0]]).repeat(10, 1)
    assert renyi2_entropy(z).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(("n", "d"), [(4, 4), (5, 16)])
def test_renyi2_of_orthonormal_embeddings_is_log_n(n, d):
    torch.manual_seed(0)
    z = torch.linalg.qr(torch.randn(d, n)).Q.T * 2.5  # orthogonal rows; scale is normalised away
    assert renyi2_entropy(z).item() == pytest.approx(math.log(n), rel=1e-5)


def test_renyi2_is_the_loss_module():
    torch.manual_seed(0)
    z = torch.randn(12, 7)
    assert renyi2_entropy(z).item() == pytest.approx(Renyi2Entropy()(z).item(), rel=1e-6)


def test_mi_bound_arithmetic():
    assert infonce_mi_bound(1.5, 255).item() == pytest.approx(math.log(256) - 1.5, rel=1e-6)
    assert infonce_mi_bound(torch.tensor(0.25), 0).item() == pytest.approx(-0.25)
    assert infonce_mi_ceiling(256) == pytest.approx(math.log(511))
    assert infonce_mi_ceiling(1) == 0.0


def test_mi_bound_is_zero_at_chance_for_the_project_infonce():
    """All similarities equal: InfoNCE = log(B), so the bound with B - 1 negatives is 0."""
    z = torch.ones(8, 5)
    loss = InfoNCE(0.2)(z, z)
    assert infonce_mi_bound(loss, 8 - 1).item() == pytest.approx(0.0, abs=1e-6)


def test_diagnostics_under_bf16_autocast():
    torch.manual_seed(0)
    z_query, z_anchor = torch.randn(64, 16), torch.randn(64, 16)
    loss_nce = torch.tensor(7.0)  # the sum of two directions
    reference = diagnostics(z_query, z_anchor, loss_nce, candidates=64, directions=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = diagnostics(z_query.bfloat16(), z_anchor.bfloat16(), loss_nce, candidates=64, directions=2)
    assert all(isinstance(value, float) for value in mixed.values())
    assert mixed["mi_bound"] == pytest.approx(math.log(64) - 3.5, rel=1e-6)
    assert mixed["mi_ceiling"] == pytest.approx(math.log(64))
    # Only the bf16 rounding of the inputs differs (~3 significant digits).
    for key, value in reference.items():
        assert mixed[key] == pytest.approx(value, rel=2e-2), key


def test_diagnostics_without_a_contrastive_loss_report_only_the_embeddings():
    """BYOL and SimSiam have no InfoNCE: no bound is invented for them."""
    torch.manual_seed(0)
    out = diagnostics(torch.randn(16, 8), torch.randn(16, 8))
    assert set(out) == {"effective_rank_query", "effective_rank_anchor", "renyi2_query", "renyi2_anchor"}


def test_nt_xent_candidates_give_the_papers_ceiling():
    out = diagnostics(torch.randn(16, 8), torch.randn(16, 8), torch.tensor(2.0), candidates=2 * 16 - 1)
    assert out["mi_ceiling"] == pytest.approx(infonce_mi_ceiling(16))
    assert out["mi_bound"] == pytest.approx(math.log(31) - 2.0, rel=1e-6)

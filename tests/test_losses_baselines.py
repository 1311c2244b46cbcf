"""The baselines' losses (NT-Xent, MoCo's queue InfoNCE, the cosine losses), MoCo's
key queue, and both across two real gloo processes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from iecl.model import distributed
from iecl.model.losses import (
    NegativeCosineSimilarity,
    NormalizedMSE,
    NTXent,
    QueueInfoNCE,
)
from iecl.model.methods.mocov2 import KeyQueue

# ------------------------------------------------------------------ NT-Xent


def test_ntxent_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.6, 0.8], [-1.2, 1.6]])  # b1 normalises to (-0.6, 0.8)
    tau = 0.5
    # Cosines: a0.a1 = 0, a0.b0 = 0.6, a0.b1 = -0.6, a1.b0 = 0.8, a1.b1 = 0.8, b0.b1 = 0.28.
    # Each row: -pos/tau + log sum over the three other views of exp(cos/tau).
    a0 = -1.2 + math.log(math.exp(0.0) + math.exp(1.2) + math.exp(-1.2))  # pos b0; a1, b1
    a1 = -1.6 + math.log(math.exp(0.0) + math.exp(1.6) + math.exp(1.6))  # pos b1; a0, b0
    b0 = -1.2 + math.log(math.exp(1.2) + math.exp(1.6) + math.exp(0.56))  # pos a0; a1, b1
    b1 = -1.6 + math.log(math.exp(-1.2) + math.exp(1.6) + math.exp(0.56))  # pos a1; a0, b0
    assert NTXent(tau)(a, b).item() == pytest.approx((a0 + a1 + b0 + b1) / 4, rel=1e-6)


def test_ntxent_is_symmetric_in_its_views():
    torch.manual_seed(0)
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    assert NTXent(0.1)(a, b).item() == pytest.approx(NTXent(0.1)(b, a).item(), rel=1e-6)


def test_ntxent_at_chance_is_log_of_candidates():
    z = torch.ones(4, 3)  # all 8 views identical: 7 equal candidates per softmax
    assert NTXent(0.3)(z, z).item() == pytest.approx(math.log(7), rel=1e-6)


def test_ntxent_gradient_is_finite_despite_the_masked_diagonal():
    torch.manual_seed(0)
    a = torch.randn(4, 3, requires_grad=True)
    NTXent(0.1)(a, torch.randn(4, 3)).backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


# ------------------------------------------------------------------ MoCo's InfoNCE


def test_queue_infonce_hand_computed():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # row 1 normalises to (0, 1)
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # already unit rows
    tau = 0.5
    # Row 0: positive 0.6, negatives (0, -1) -> logits (1.2, 0, -2), label 0.
    row0 = -1.2 + math.log(math.exp(1.2) + math.exp(0.0) + math.exp(-2.0))
    # Row 1: positive 1, negatives (1, 0) -> logits (2, 2, 0).
    row1 = -2.0 + math.log(2 * math.exp(2.0) + math.exp(0.0))
    assert QueueInfoNCE(tau)(q, k, queue).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_queue_infonce_at_chance_is_log_of_candidates():
    z = torch.ones(3, 4)
    queue = F.normalize(torch.ones(9, 4), dim=1)
    assert QueueInfoNCE(0.2)(z, z, queue).item() == pytest.approx(math.log(10), rel=1e-6)


# ------------------------------------------------------------------ cosine losses

P = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
Z = torch.tensor([[0.0, 1.0], [2.0, 2.0], [4.0, 3.0]])  # cosines with P: 0, 1, 24/25 = 0.96


def test_negative_cosine_hand_computed():
    assert NegativeCosineSimilarity()(P, Z).item() == pytest.approx(-(0.0 + 1.0 + 0.96) / 3, rel=1e-6)


def test_normalized_mse_hand_computed():
    # 2 - 2 cos per row: 2, 0, 0.08; also the squared distance of the unit vectors.
    expected = (2.0 + 0.0 + 0.08) / 3
    assert NormalizedMSE()(P, Z).item() == pytest.approx(expected, rel=1e-6)
    unit_distance = (F.normalize(P, dim=1) - F.normalize(Z, dim=1)).pow(2).sum(dim=1).mean()
    assert unit_distance.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("loss", [NegativeCosineSimilarity(), NormalizedMSE()])
def test_cosine_losses_are_scale_invariant(loss):
    torch.manual_seed(0)
    p, z = torch.randn(5, 7), torch.randn(5, 7)
    assert loss(3.0 * p, 0.01 * z).item() == pytest.approx(loss(p, z).item(), rel=1e-5)
    assert loss(p, z).item() != pytest.approx(loss(p, z.roll(1, dims=0)).item(), rel=1e-3)


@pytest.mark.parametrize("loss,inputs", [
    (NTXent(0.1), 2),
    (QueueInfoNCE(0.2), 3),
    (NegativeCosineSimilarity(), 2),
    (NormalizedMSE(), 2),
])
def test_losses_compute_in_float32_under_bf16_autocast(loss, inputs):
    torch.manual_seed(0)
    args = [torch.randn(6, 16).to(torch.bfloat16) for _ in range(inputs)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(*args)
    assert value.dtype == torch.float32
    # Bit-equal to the fp32 computation on the same (bf16-representable) inputs:
    # nothing inside ran in bf16.
    assert torch.equal(value, loss(*(a.float() for a in args)))


# ------------------------------------------------------------------ the key queue


def basis(*indices: int, dim: int = 8, scale: float = 3.0) -> torch.Tensor:
    """Keys scale * e_i: distinct, exactly unit after normalisation."""
    return scale * torch.eye(dim)[list(indices)]


def test_queue_starts_full_of_random_unit_keys_the_same_everywhere():
    queue = KeyQueue(16, 8)
    assert queue.keys.shape == (16, 8) and queue.ptr.item() == 0
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(16), atol=1e-6)
    assert torch.equal(queue.keys, KeyQueue(16, 8).keys)  # every rank builds the same queue
    assert torch.linalg.matrix_rank(queue.keys).item() == 8


def test_queue_is_fifo_and_wraps_around():
    queue = KeyQueue(5, 8)
    queue.enqueue(basis(0, 1, 2))
    assert queue.ptr.item() == 3
    assert torch.equal(queue.keys[:3], basis(0, 1, 2, scale=1.0))
    untouched = queue.keys[3:].clone()
    queue.enqueue(basis(3, 4, 5))  # slots 3, 4, then 0: the oldest key (e0) goes first
    assert queue.ptr.item() == 1
    assert torch.equal(queue.keys, basis(5, 1, 2, 3, 4, scale=1.0))
    assert not torch.equal(untouched, queue.keys[3:])
    assert queue.keys.shape == (5, 8)


def test_queue_keeps_the_newest_when_more_keys_than_it_holds_arrive():
    queue = KeyQueue(5, 8)
    queue.enqueue(basis(7))  # ptr 1
    queue.enqueue(basis(0, 1, 2, 3, 4, 5, 6))  # 7 keys into 5 slots from slot 1
    # Sequential writes to slots 1,2,3,4,0,1,2 would leave e5, e6 in slots 1, 2 and
    # e2, e3, e4 in slots 3, 4, 0; the pointer ends at (1 + 7) mod 5 = 3.
    assert queue.ptr.item() == 3
    assert torch.equal(queue.keys, basis(4, 5, 6, 2, 3, scale=1.0))
    # Read from the pointer, oldest first: the newest five, in order.
    oldest_first = queue.keys.roll(-queue.ptr.item(), dims=0)
    assert torch.equal(oldest_first, basis(2, 3, 4, 5, 6, scale=1.0))


def test_queue_normalises_and_detaches_keys():
    queue = KeyQueue(4, 2)
    keys = torch.tensor([[3.0, 4.0]], requires_grad=True)
    queue.enqueue(keys)
    assert torch.allclose(queue.keys[0], torch.tensor([0.6, 0.8]))
    assert not queue.keys.requires_grad


def test_queue_is_in_the_state_dict_and_restores_exactly():
    queue = KeyQueue(6, 8)
    queue.enqueue(basis(0, 1, 2, 3))
    state = queue.state_dict()
    assert set(state) == {"keys", "ptr"}
    fresh = KeyQueue(6, 8)
    fresh.keys.zero_()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.keys, queue.keys) and fresh.ptr.item() == 4


def test_distributed_helpers_are_identities_in_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.gather_with_grad(x) is x
    assert torch.equal(distributed.gather_no_grad(x), x)


# ------------------------------------------------------------------ two gloo processes

WORLD, PER_RANK = 2, 3


def _global_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(WORLD * PER_RANK, 5, generator=generator), torch.randn(WORLD * PER_RANK, 5, generator=generator)


def _distributed_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        queue = KeyQueue(5, 8)
        queue.enqueue(basis(2 * rank, 2 * rank + 1))  # gathered: e0 e1 (rank 0), e2 e3 (rank 1)
        queue.enqueue(basis(4 + 2 * rank, 5 + 2 * rank))  # gathered: e4 e5, e6 e7; wraps
        a, b = (z[rank * PER_RANK:(rank + 1) * PER_RANK].clone().requires_grad_(True) for z in _global_pairs())
        loss = NTXent(0.5)(a, b)
        loss.backward()
        torch.save({"world": distributed.world_size(), "rank": distributed.rank(),
                    "keys": queue.keys, "ptr": queue.ptr, "loss": loss.detach(),
                    "grad_a": a.grad, "grad_b": b.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_queue_and_ntxent_across_two_gloo_processes(tmp_path):
    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert [(r["world"], r["rank"]) for r in results] == [(2, 0), (2, 1)]

    # Every rank holds the same queue, with both ranks' keys in rank order:
    # 8 keys through 5 slots -> e5 e6 e7 in slots 0-2, e3 e4 left in slots 3-4.
    for r in results:
        assert torch.equal(r["keys"], basis(5, 6, 7, 3, 4, scale=1.0))
        assert r["ptr"].item() == 8 % 5

    # NT-Xent with gathered negatives is the single-process loss of the global batch,
    # on both ranks...
    a_all, b_all = (z.clone().requires_grad_(True) for z in _global_pairs())
    expected = NTXent(0.5)(a_all, b_all)
    expected.backward()
    for r in results:
        assert r["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    # ...and each rank's slice gets WORLD x the global gradient (every rank's loss
    # depends on it), which DDP's averaging over ranks turns into the global gradient.
    for rank, r in enumerate(results):
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        assert torch.allclose(r["grad_a"], WORLD * a_all.grad[rows], atol=1e-6)
        assert torch.allclose(r["grad_b"], WORLD * b_all.grad[rows], atol=1e-6)

"""torch.distributed helpers the methods need; each is the identity (world of
one, rank 0) when torch.distributed is not initialised, so single-process code
never branches on it.

- `gather_no_grad(x)`: every rank's `x` concatenated in rank order (MoCo's keys
  for the queue).
- `gather_with_grad(x)`: the same, differentiable (SimCLR's global negatives).
  Its backward sums, over ranks, the gradient each rank's loss sends to a rank's
  slice: when every rank computes the same loss L of the gathered batch, rank
  r's embeddings get `world * dL/dx_r`, and DistributedDataParallel's gradient
  averaging turns that into exactly the global-batch gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    return dist.get_rank() if initialized() else 0


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) on each rank -> (world * n, ...), rank 0's rows first, on every rank."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """`gather_no_grad`, with gradient flowing back to every rank's own slice."""
    if world_size() == 1:
        return x
    return torch.cat(_AllGather.apply(x))


class _AllGather(torch.autograd.Function):
    """all_gather forward; backward all-reduces (sums) the gradients of the gathered
    slices and keeps this rank's. Written here rather than using
    `torch.distributed.nn.functional.all_gather` (deprecated in torch 2.x, and its
    non-NCCL backward needs all_to_all); all_gather + all_reduce run on every backend."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)  # SUM: every rank's loss may depend on every slice
        return stacked[dist.get_rank()]

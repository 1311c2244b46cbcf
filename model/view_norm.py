"""BatchNorm with per-view statistics, for one encoder call on both views.

The methods normalise each view with its own batch statistics (two encoder
calls, as MoCo, BYOL and SimSiam do). `model.fused_views` runs both views as
one 2B batch instead: every convolution and linear layer sees 2B images (one
launch and one larger GEMM instead of two), and every BatchNorm splits its
input back into the views, normalises each with its own statistics and
updates its running buffers view by view, in the order the two calls would
have (anchor, then query). The numbers are those of the two calls; only the
convolutions' summation order may differ (another batch size, another
algorithm). Where batch statistics are not used (eval mode with running
buffers), the views need no split.

The cost is a concatenation of the views' outputs in every BatchNorm: eager,
one more read and write of each normalised activation. torch.compile folds it
into the normalisation's own kernel (checked with Inductor on a CPU: conv,
per-view BatchNorm, ReLU, conv, per-view BatchNorm compile to the two
convolutions and three fused loops, none of them a concatenation). So the
lever is for compiled encoders; `iecl report`'s levers part measures its eager
cost, and it stays off by default until a GPU shows it pays.

The conversion keeps each module's class (a subclass made once per class) and
its parameter and buffer names, so `torch.func.functional_call` and
state_dicts see the same module.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _PerView:
    """Mixed in before a BatchNorm class: `views` > 1 splits the batch."""

    views: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalise = super().forward
        batch_statistics = self.training or self.running_mean is None
        if self.views == 1 or not batch_statistics:
            return normalise(x)
        return torch.cat([normalise(part) for part in x.chunk(self.views)])


_SUBCLASSES: dict[type, type] = {}


def _per_view_class(cls: type) -> type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"PerView{cls.__name__}", (_PerView, cls), {"__module__": __name__})
    return _SUBCLASSES[cls]


def per_view_norms(module: nn.Module) -> nn.Module:
    """Give every BatchNorm in `module` (1d, 2d, SyncBatchNorm) per-view
    statistics, in place; `views` starts at 1 (the module computes as before)."""
    for norm in module.modules():
        if isinstance(norm, _BatchNorm) and not isinstance(norm, _PerView):
            norm.__class__ = _per_view_class(type(norm))
    return module


def set_views(module: nn.Module, views: int) -> None:
    """How many equal views each batch through `module`'s BatchNorms holds."""
    for norm in module.modules():
        if isinstance(norm, _PerView):
            norm.views = views

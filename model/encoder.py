"""Backbone + projector, and the momentum (EMA) copy of it.

An encoder's forward runs in three parts, so that a compiled encoder has one
graph per grad mode (torch.compile guards on the dtype and `requires_grad` of
its inputs, and the SAIB view needs an input gradient where the anchor does not):

    tensors   the backbone's spectral-normalised weights, once per step
              (model/spectral.py), beside every other parameter and buffer
    stem      the first convolution, eager: the only op whose input may
              need a gradient (the SAIB view's); its output needs one in
              grad mode whichever view came in
    trunk     the rest of the backbone and the projector: a plain copy of
              this network run on `tensors` (`torch.func.functional_call`);
              this part is what `compile()` compiles

The numbers are those of `projector(backbone(x))`: the same operations on the
same tensors (the parametrisation's own code computes W / sigma).

`encoder(anchor, query)` runs both views, each with its own BatchNorm
statistics: as two trunk calls, or with `fused_views` (model.fused_views) as
one trunk call on the 2B batch whose BatchNorms split it back into the views
(model/view_norm.py). The stems stay one per view, so the anchor's stem runs
no input gradient.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from iecl.model import spectral
from iecl.model.view_norm import per_view_norms, set_views


class _Trunk(nn.Module):
    """What runs after the stem convolution: the rest of the backbone, the
    projector; on one view, or on several as one batch (per-view BatchNorm
    statistics: the skeleton's norms are set to that many views)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, *views: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        h = views[0] if len(views) == 1 else torch.cat(views)
        out = self.projector(self.backbone.forward_from_stem_conv(h))
        return out if len(views) == 1 else out.chunk(len(views))


class Encoder(nn.Module):
    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        #: W / sigma for all convolutions in one batched power iteration, or each
        #: conv's own parametrisation in turn (model.spectral_batched; model/spectral.py)
        self.spectral_batched = True
        #: the stem's input and weight padded with zero channels to this many (0: off;
        #: model.stem_pad_channels): a tensor-core shaped 7x7 dgrad for the SAIB view
        self.stem_pad_channels = 0
        #: several views in one trunk call (model.fused_views; model/view_norm.py)
        self.fused_views = False
        # Kept out of the module tree (no state, not moved by .to(), not seen by DDP):
        # the plain meta copy the trunk runs as, built at the first forward from the
        # modules as they are then, and the trunk's runner (compiled by `compile`).
        self.__dict__["_skeleton"] = None
        self.__dict__["_run"] = self._run_trunk

    def forward(self, *views: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """(B, 3, H, W) -> embeddings (B, out_dim); several views -> a tuple of
        their embeddings, each view normalised with its own batch statistics
        (as that many calls would: running buffers updated view by view)."""
        tensors = self.step_tensors()
        stem_weight = tensors["backbone.stem.0.weight"]
        if len(views) > 1 and self.fused_views:
            stems = [self._stem(x, stem_weight) for x in views]
            self._prepare_skeleton(len(views))
            return tuple(self._run(tensors, *stems))
        self._prepare_skeleton(1)
        out = tuple(self._run(tensors, self._stem(x, stem_weight)) for x in views)
        return out[0] if len(views) == 1 else out

    def _stem(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The stem convolution, on zero-padded channels if `stem_pad_channels`:
        the zero channels add exact zeros, so the output is the same and the
        gradients to the real input channels and the real (normalised) weight
        are the same (F.pad's backward is a slice); the padding is built from
        the normalised weight, so nothing flows to the zeros."""
        stem = self.backbone.stem[0]
        extra = self.stem_pad_channels - x.shape[1]  # stem_pad_channels 0 (off): negative
        if extra > 0:
            channels_last = spectral.is_channels_last(x)
            x, weight = F.pad(x, (0, 0, 0, 0, 0, extra)), F.pad(weight, (0, 0, 0, 0, 0, extra))
            if channels_last:  # the convolution's layout as it was (F.pad may return contiguous)
                x = x.contiguous(memory_format=torch.channels_last)
                weight = weight.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, weight, None, stem.stride, stem.padding, stem.dilation, stem.groups)

    def step_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the plain network runs on, by its name there: W / sigma
        for each spectral-normalised convolution (once per `once_per_step`
        scope), the other parameters and buffers as they are."""
        cache = spectral.step_cache()
        if cache is not None and id(self) in cache:
            return cache[id(self)]
        tensors = {name: t for name, t in self.named_parameters() if ".parametrizations." not in name}
        tensors.update((name, t) for name, t in self.named_buffers() if ".parametrizations." not in name)
        tensors.update(spectral.normalised_weights(self.backbone, prefix="backbone.", batched=self.spectral_batched))
        if cache is not None:
            cache[id(self)] = tensors
        return tensors

    def _prepare_skeleton(self, views: int) -> None:
        # Outside the compiled function: it sees one skeleton in one mode, with
        # its norms set for one number of views (a change would be a recompile).
        skeleton = self._skeleton
        if skeleton is None:
            trunk = _Trunk(self.backbone, self.projector)
            skeleton = self.__dict__["_skeleton"] = per_view_norms(spectral.plain_skeleton(trunk))
        if skeleton.training != self.training:
            skeleton.train(self.training)
        if skeleton.__dict__.get("views") != views:  # a walk over every module only when it changes
            set_views(skeleton, views)
            skeleton.__dict__["views"] = views

    def _run_trunk(self, tensors: dict[str, torch.Tensor], *views: torch.Tensor):
        return functional_call(self._skeleton, tensors, views, strict=False)

    def compile(self, **options) -> None:
        """`torch.compile` the trunk (`options`: torch.compile's, e.g. backend);
        the encoder module itself stays eager, so hooks on it (profiling's
        marks) run outside the compiled graph. State_dict keys are unchanged."""
        self.__dict__["_run"] = torch.compile(self._run_trunk, **options)

    def __deepcopy__(self, memo):
        # A copy (the momentum target) gets its own skeleton and an uncompiled runner.
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            if key not in ("_skeleton", "_run"):
                clone.__dict__[key] = copy.deepcopy(value, memo)
        clone.__dict__["_skeleton"] = None
        clone.__dict__["_run"] = clone._run_trunk
        return clone


def use_compile_cache(directory: str | Path) -> Path:
    """Keep torch.compile's on-disk caches under `directory`, so that a restarted
    run on this machine finds its compiled graphs: Inductor's FX graph cache
    and AOTAutograd's cache (TORCHINDUCTOR_CACHE_DIR, which both read at each
    compile) and Triton's kernels (TRITON_CACHE_DIR, also for kernels compiled
    outside Inductor). Call it before the first compile. Both caches are on by
    default in torch 2.11 and 2.13; they are switched on here in case a
    setting turned them off (hasattr: names that a release may lack)."""
    root = Path(directory).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root)
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    if hasattr(inductor_config, "fx_graph_cache"):
        inductor_config.fx_graph_cache = True
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True
    return root


def momentum_copy(online: nn.Module) -> nn.Module:
    """A frozen copy to be updated only by `ema_update`."""
    target = copy.deepcopy(online)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float, finite: torch.Tensor | None = None) -> None:
    """target <- m * target + (1 - m) * online, as one multi-tensor op.

    Parameters only: the target's BatchNorm statistics and spectral-norm power
    iteration vectors come from its own forwards (MoCo's convention). With
    `finite` (a device bool: the step's loss was finite) the update is made
    only where it is true, decided on the device (a lerp by 0 leaves the
    target exactly as it was).
    """
    target_params = list(target.parameters())
    online_params = list(online.parameters())
    weight = 1.0 - momentum
    if finite is not None:
        weight = finite.to(target_params[0].dtype) * weight
    torch._foreach_lerp_(target_params, online_params, weight)

"""The batched power iteration (model/spectral.py, model.spectral_batched):
the numbers of PyTorch's own parametrisation, conv by conv, within fp32
rounding: W / sigma, the gradients to `weight.original` and the `_u`/`_v`
buffers over several steps, in training and eval mode, in both memory
formats; and fewer kernel launches."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from iecl.model.resnet import build_backbone
from iecl.model.spectral import normalised_weights, parametrized_convs

#: aten ops that launch no kernel: views, allocations, the test's own seed gradient
_NO_KERNEL = {torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.new_empty_strided,
              torch.ops.aten.detach, torch.ops.aten._unsafe_view, torch.ops.aten.ones_like}


class Launches(TorchDispatchMode):
    """Counts the aten ops that run (each one a kernel launch on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket not in _NO_KERNEL:
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def _backbone(channels_last: bool, name: str = "resnet18") -> torch.nn.Module:
    torch.manual_seed(0)
    backbone = build_backbone(name)
    return backbone.to(memory_format=torch.channels_last) if channels_last else backbone


def _loss(weights: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """A loss that weighs every conv differently (a plain sum would hide a swapped gradient)."""
    gen = torch.Generator().manual_seed(1)
    return sum((weights[n] * torch.randn(weights[n].shape, generator=gen)).sum() for n in names)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Within fp32 rounding of sums taken in another order: 1e-5 of the largest entry (seen: ~2e-6)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(), msg=what)


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_batched_equals_the_loop_over_training_steps(channels_last):
    """Three training steps (power iteration, W / sigma, backward), then eval:
    the same weights, gradients and u, v as each conv's own parametrisation,
    and each W / sigma in the memory format of its weight."""
    batched, loop = _backbone(channels_last), _backbone(channels_last)
    names = [f"{n}.weight" for n, _ in parametrized_convs(batched)]
    for step in range(3):
        ours, theirs = normalised_weights(batched, batched=True), normalised_weights(loop, batched=False)
        _loss(ours, names).backward()
        _loss(theirs, names).backward()
        for name in names:
            _close(ours[name], theirs[name], f"step {step}: {name}")
            assert ours[name].stride() == theirs[name].stride(), name
    for (name, a), b in zip(batched.named_parameters(), loop.parameters()):
        if b.grad is not None:
            _close(a.grad, b.grad, f"grad {name}")
    for (name, a), b in zip(batched.named_buffers(), loop.buffers()):
        if a.is_floating_point():
            _close(a, b, name)
    batched.eval(), loop.eval()
    before = {k: v.clone() for k, v in batched.state_dict().items()}
    ours, theirs = normalised_weights(batched, batched=True), normalised_weights(loop, batched=False)
    for name in names:
        _close(ours[name], theirs[name], f"eval: {name}")
    assert all(torch.equal(v, before[k]) for k, v in batched.state_dict().items())  # eval: no iteration


def test_batched_matches_pytorchs_property_and_updates_the_buffers_in_place():
    """Against `conv.weight` (PyTorch's parametrised property) from the same
    buffers, in training mode; `_u`, `_v` keep their storage (state_dict,
    DataParallel replicas), and the iteration moved them."""
    backbone = _backbone(channels_last=True)
    twin = copy.deepcopy(backbone)
    convs = dict(parametrized_convs(backbone))
    storage = {n: (c.parametrizations.weight[0]._u.data_ptr(), c.parametrizations.weight[0]._v.data_ptr())
               for n, c in convs.items()}
    u_before = {n: c.parametrizations.weight[0]._u.clone() for n, c in convs.items()}
    ours = normalised_weights(backbone, batched=True)
    for name, conv in parametrized_convs(twin):
        _close(ours[f"{name}.weight"], conv.weight, name)
        sn, own = conv.parametrizations.weight[0], convs[name].parametrizations.weight[0]
        _close(own._u, sn._u, f"{name}._u")
        _close(own._v, sn._v, f"{name}._v")
        assert (own._u.data_ptr(), own._v.data_ptr()) == storage[name]
        assert not torch.equal(own._u, u_before[name])


def test_autocast_does_not_reach_the_power_iteration():
    """Under bf16 autocast (where `bmm` would run in bf16) both ways compute in
    fp32: the numbers without autocast."""
    plain, cast = _backbone(True), _backbone(True)
    expected = normalised_weights(plain, batched=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for batched in (True, False):
            actual = normalised_weights(copy.deepcopy(cast), batched=batched)
            for name, value in expected.items():
                assert actual[name].dtype == torch.float32
                _close(actual[name], value, name)


def _launches(name: str, batched: bool) -> tuple[Launches, Launches, Launches]:
    """The launches of a channels-last `name`'s training forward, its backward, an eval forward."""
    backbone = _backbone(True, name)
    with Launches() as forward:
        weights = normalised_weights(backbone, batched=batched)
    loss = sum(w.sum() for w in weights.values())
    with Launches() as backward:
        loss.backward()
    backbone.eval()
    with Launches() as evaluation:
        normalised_weights(backbone, batched=batched)
    return forward, backward, evaluation


def launch_counts(name: str = "resnet50") -> dict[str, tuple[int, ...]]:
    """model/spectral.py's table: cd tests && python -c 'import test_spectral as t; print(t.launch_counts())'."""
    return {way: tuple(c.total for c in _launches(name, way == "batched")) for way in ("loop", "batched")}


def test_batched_launches_fewer_kernels():
    """ResNet-18 (11 shape groups for 20 convs): the training forward, its
    backward and an eval forward each launch well under the loop's kernels;
    no matrix-vector product is left, and one multi-tensor copy writes u, v."""
    loop = [c.total for c in _launches("resnet18", batched=False)]
    forward, *rest = _launches("resnet18", batched=True)
    ours = [forward.total] + [c.total for c in rest]
    assert all(b < 0.7 * a for a, b in zip(loop, ours)), (loop, ours)
    assert forward.ops["aten.mv"] == 0 and forward.ops["aten._foreach_copy_"] == 1

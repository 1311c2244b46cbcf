"""One encoder call on both views (model.fused_views, model/view_norm.py):
the numbers of two calls, each view normalised with its own statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY
from torch import nn

from iecl.model.spectral import once_per_step
from iecl.model.view_norm import per_view_norms, set_views
from iecl.train.config import Config, apply, validate
from iecl.train.factory import method_from_config

#: every method whose encoders see both views in separate BatchNorm batches
#: (SimCLR normalises both views as one batch: its own choice, unaffected)
TWO_VIEW_METHODS = [("iecl", {}), ("byol", {}), ("simsiam", {}), ("mocov2", {"symmetric": True})]


def _twins(name: str, method: dict, fused: bool = True):
    """The same method twice (same initial weights, fp64), the second with fused views."""
    torch.manual_seed(0)
    cfg = Config()
    apply(cfg, TINY)
    apply(cfg, {"method": {"name": name, "queue_size": 64, **method}, "model": {"predictor_hidden": 32}})
    validate(cfg)
    plain = method_from_config(cfg).double().train()
    twin = copy.deepcopy(plain)
    for encoder in twin.encoders().values():
        encoder.fused_views = fused
    return plain, twin


def _views(batch: int = 4, size: int = 32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(batch, 3, size, size, generator=gen, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    return make(), make()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # fp64: only the convolutions' summation order may differ (2B images in one call)
    return torch.allclose(a, b, rtol=1e-10, atol=1e-12) if a.is_floating_point() else torch.equal(a, b)


@pytest.mark.parametrize("name,method", TWO_VIEW_METHODS, ids=[n for n, _ in TWO_VIEW_METHODS])
def test_fused_views_compute_what_two_calls_compute(name, method):
    """Losses, every parameter's gradient, the query's input gradient (SAIB
    trains through it) and every buffer after two steps' forwards (BatchNorm
    running statistics updated view by view, power-iteration vectors, MoCo's
    queue) agree with two calls per encoder."""
    plain, fused = _twins(name, method)
    for seed in (1, 2):
        results = []
        for model in (plain, fused):
            anchor, query = _views(seed=seed)
            query.requires_grad_(True)
            losses, embeddings = model.loss_on_views(anchor, query)
            model.zero_grad()
            losses["loss"].backward()
            results.append((losses, embeddings, query.grad))
        (losses_p, emb_p, dq_p), (losses_f, emb_f, dq_f) = results
        for key in losses_p:
            assert _close(losses_f[key], losses_p[key]), key
        assert all(_close(f, p) for f, p in zip(emb_f, emb_p, strict=True))
        assert dq_p is not None and _close(dq_f, dq_p)
        for (key, p), f in zip(plain.named_parameters(), fused.parameters(), strict=True):
            assert (p.grad is None) == (f.grad is None) and (p.grad is None or _close(f.grad, p.grad)), key
    for (key, p), f in zip(plain.named_buffers(), fused.buffers(), strict=True):
        assert _close(f, p), key


def test_the_fused_output_keeps_each_view_apart_and_channels_last():
    """A view's embedding does not depend on the other view (per-view
    statistics), and the fused trunk's activations stay channels-last."""
    _, fused = _twins("iecl", {})
    encoder = fused.online
    anchor, query = _views()
    other = _views(seed=7)[1]
    with torch.no_grad(), once_per_step():  # the same W / sigma for both calls
        first, _ = encoder(anchor, query)
        again, _ = encoder(anchor, other)
    assert _close(first, again)

    layouts = []
    for module in encoder._skeleton.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.register_forward_hook(
                lambda _m, _i, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        encoder(anchor, query)
    assert layouts and all(layouts)


def test_in_eval_mode_the_views_share_the_running_statistics():
    plain, fused = _twins("byol", {})
    plain.eval(), fused.eval()
    anchor, query = _views()
    with torch.no_grad():
        expected, actual = plain.online(anchor, query), fused.online(anchor, query)
    assert all(_close(a, e) for a, e in zip(actual, expected, strict=True))


def test_per_view_norms_keep_names_classes_and_single_view_numbers():
    """The conversion changes no state_dict key and no isinstance answer; at
    one view it computes bit for bit what the BatchNorm computed; at two the
    running buffers move as two calls in order would move them."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3, affine=False))
    converted = per_view_norms(copy.deepcopy(net))
    assert list(converted.state_dict()) == list(net.state_dict())
    assert isinstance(converted[1], nn.BatchNorm1d) and type(converted[1]) is not nn.BatchNorm1d
    sync = per_view_norms(nn.Sequential(nn.SyncBatchNorm(4)))[0]  # as after train.sync_bn's conversion
    assert isinstance(sync, nn.SyncBatchNorm) and sync.views == 1
    x = torch.randn(8, 5)
    assert torch.equal(converted(x), net(x))

    a, b = torch.randn(8, 5), torch.randn(8, 5)
    reference = copy.deepcopy(net)
    expected = torch.cat([reference(a), reference(b)])
    set_views(converted, 2)
    assert torch.allclose(converted(torch.cat([a, b])), expected, atol=1e-6)
    for key, value in reference.state_dict().items():
        assert torch.allclose(converted.state_dict()[key].float(), value.float(), atol=1e-6), key

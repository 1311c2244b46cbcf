"""The four baselines (model/methods/): built through the config factory, trainable
with and without SAIB, with their stop-gradients, queues and schedules as their
papers have them. ResNet-18 at 32 px, batch 8, projector 64/32, predictor 32."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, on_prepared

from iecl.kernels.view_prep import ViewPrep
from iecl.model.losses import QueueInfoNCE
from iecl.model.methods import BYOL, METHODS, Method, MoCoV2, SimCLR, SimSiam
from iecl.model.methods.byol import byol_momentum
from iecl.pipeline import MEAN_255, STD_255
from iecl.train.config import Config, apply, validate
from iecl.train.factory import method_from_config

CPU = torch.device("cpu")
BATCH, SIZE, OUT = 8, 32, 32
BASELINES = ["mocov2", "simclr", "byol", "simsiam"]


def build(name: str, saib: bool = False, **method: object) -> Method:
    """A method as the training loop builds it (train.factory), from TINY."""
    torch.manual_seed(0)
    cfg = Config()
    apply(cfg, TINY)
    apply(cfg, {"method": {"name": name, "queue_size": 1024, **method}, "saib": {"enabled": saib},
                "model": {"predictor_hidden": 32}})
    validate(cfg)
    return method_from_config(cfg)


def views(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, 3, SIZE, SIZE, generator=generator),
            torch.randn(BATCH, 3, SIZE, SIZE, generator=generator))


def test_registry_and_factory_build_every_baseline_with_its_config():
    assert set(BASELINES) <= set(METHODS)
    moco = build("mocov2", tau=0.3, momentum=0.9, queue_size=96, symmetric=True)
    assert isinstance(moco, MoCoV2) and moco.saib is None
    assert (moco.infonce.tau, moco.momentum, moco.queue.size, moco.symmetric) == (0.3, 0.9, 96, True)
    assert moco.queue.keys.shape == (96, OUT)
    simclr = build("simclr", saib=True)
    assert isinstance(simclr, SimCLR) and simclr.ntxent.tau == 0.1  # SimCLR's default from the config
    assert simclr.saib is not None and simclr.saib.batch_size == BATCH
    byol = build("byol")
    assert isinstance(byol, BYOL) and byol.base_momentum == 0.99
    assert byol.predictor[0].out_features == 32 and byol.predictor[-1].out_features == OUT
    simsiam = build("simsiam")
    assert isinstance(simsiam, SimSiam) and simsiam.predictor[0].out_features == 32
    # SimSiam's projector: hidden widths from projector_hidden, output projector_out.
    linears = [m for m in simsiam.encoder.projector if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [64, 64, OUT]


# ------------------------------------------------------------------ training on a fixed batch


@pytest.mark.parametrize("saib", [False, True], ids=["plain", "saib"])
@pytest.mark.parametrize("name", BASELINES)
def test_trains_on_a_fixed_batch(name, saib):
    method = build(name, saib=saib)
    method.train()
    optimizer = torch.optim.AdamW(method.param_groups(1e-5), lr=1e-3)
    anchor, query = views()
    history = []
    for step in range(8):
        losses, _ = on_prepared(method, anchor, query)
        assert all(v.ndim == 0 for v in losses.values()), {k: v.shape for k, v in losses.items()}
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if step == 0 and saib:
            # Every SAIB parameter is trained, whichever branch the query feeds first.
            for pname, param in method.saib.named_parameters():
                assert param.grad is not None and param.grad.abs().sum() > 0, pname
        optimizer.step()
        method.momentum_update(step / 8)
        history.append(losses["loss"].item())
    # Each objective falls by a clear margin (SimSiam's lies in [-1, 1], BYOL's in [0, 8]).
    # Seen: MoCo 5.1 -> 3.9 (on one batch, the queue fills with keys of the same
    # images, near-positives that raise its floor), SimCLR 3.8 -> 0.01,
    # BYOL 4.2 -> 2.4, SimSiam 0.0 -> -0.3.
    drop = {"mocov2": 0.8, "simclr": 2.0, "byol": 1.0, "simsiam": 0.2}[name]
    assert history[-1] < history[0] - drop, history


# ------------------------------------------------------------------ the loop's entry point


@pytest.mark.parametrize("saib", [False, True], ids=["plain", "saib"])
@pytest.mark.parametrize("name", BASELINES)
def test_the_entry_point_equals_the_step_on_prepared_views(name, saib):
    """`method(anchor_u8, query_u8)` (the view preparation inside the method,
    the query's fused into SAIB) computes what the step on prepared views does."""
    method = build(name, saib=saib)
    generator = torch.Generator().manual_seed(1)
    anchor_u8, query_u8 = (torch.randint(0, 256, (BATCH, SIZE, SIZE, 3), dtype=torch.uint8, generator=generator)
                           for _ in range(2))
    prepare = ViewPrep("reference", torch.tensor(MEAN_255), torch.tensor(STD_255), torch.float32)
    twin = copy.deepcopy(method)  # a step changes state (BN buffers, power iterations, the queue)
    fused, fused_embeddings = method(anchor_u8, query_u8)
    plain, plain_embeddings = on_prepared(twin, prepare(anchor_u8), prepare(query_u8))
    assert fused.keys() == plain.keys() and "loss" in fused
    for key in fused:
        assert torch.equal(fused[key], plain[key]), key
    for mine, theirs in zip(fused_embeddings, plain_embeddings, strict=True):
        assert torch.equal(mine, theirs)
    for (key, mine), theirs in zip(method.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs), key


# ------------------------------------------------------------------ embeddings and MI bookkeeping


def _capture_outputs(module: torch.nn.Module) -> list[torch.Tensor]:
    """What `module` returns, call by call; an encoder called on two views returns both, in order."""
    outputs: list[torch.Tensor] = []
    module.register_forward_hook(lambda _m, _i, out: outputs.extend(out if isinstance(out, tuple) else (out,)))
    return outputs


@pytest.mark.parametrize("name", BASELINES)
def test_embeddings_are_the_online_projections_of_both_views(name):
    method = build(name, symmetric=True) if name == "mocov2" else build(name)
    online = method.encoder if isinstance(method, SimCLR | SimSiam) else method.online
    projected = _capture_outputs(online.projector)
    _, (z_anchor, z_query) = on_prepared(method, *views())
    assert z_anchor.shape == z_query.shape == (BATCH, OUT)
    assert not z_anchor.requires_grad and not z_query.requires_grad
    # Projector outputs, not predictor outputs; SimCLR runs both views in one forward.
    expected = projected[0].chunk(2) if name == "simclr" else projected
    assert torch.equal(z_anchor, expected[0]) and torch.equal(z_query, expected[1])
    assert not torch.equal(z_anchor, z_query)


def test_asymmetric_moco_reports_the_anchor_key_as_its_anchor_embedding():
    method = build("mocov2")
    online, keys = _capture_outputs(method.online), _capture_outputs(method.target)
    _, embeddings = on_prepared(method, *views())
    assert len(online) == 1 and len(keys) == 1  # as in the paper: one query and one key forward
    assert torch.equal(embeddings[0], keys[0]) and torch.equal(embeddings[1], online[0])


def test_nce_candidates_and_directions():
    assert (build("mocov2").nce_directions, build("mocov2").nce_candidates(BATCH)) == (1, 1 + 1024)
    symmetric = build("mocov2", symmetric=True, queue_size=300)
    assert (symmetric.nce_directions, symmetric.nce_candidates(BATCH)) == (2, 301)
    simclr = build("simclr")
    assert (simclr.nce_directions, simclr.nce_candidates(BATCH)) == (1, 2 * BATCH - 1)
    for name in ("byol", "simsiam"):
        method = build(name)
        assert method.nce_directions == 0
        with pytest.raises(NotImplementedError):
            method.nce_candidates(BATCH)
        assert "loss_nce" not in on_prepared(method, *views())[0]


# ------------------------------------------------------------------ MoCo v2


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_moco_loss_uses_the_queue_before_the_step_and_enqueues_each_key_once(symmetric):
    method = build("mocov2", symmetric=symmetric, queue_size=100)
    online, target = _capture_outputs(method.online), _capture_outputs(method.target)
    method.queue.ptr.fill_(95)  # so this step's keys wrap around the end
    before = method.queue.keys.clone()
    losses, _ = on_prepared(method, *views())

    infonce = QueueInfoNCE(0.2)
    if symmetric:  # forwards: online(anchor), online(query); target(anchor), target(query)
        q_anchor, q_query = online
        k_anchor, k_query = target
        expected = infonce(q_query, k_anchor, before) + infonce(q_anchor, k_query, before)
        new_keys = torch.cat([k_anchor, k_query])
    else:
        (q_query,), (k_anchor,) = online, target
        expected = infonce(q_query, k_anchor, before)
        new_keys = k_anchor
    assert torch.allclose(losses["loss_nce"], expected, rtol=1e-6)
    assert torch.equal(losses["loss"], losses["loss_nce"])

    step = 2 * BATCH if symmetric else BATCH
    assert method.queue.ptr.item() == (95 + step) % 100
    slots = (95 + torch.arange(step)) % 100
    assert torch.allclose(method.queue.keys[slots], F.normalize(new_keys, dim=1), atol=1e-7)
    untouched = torch.ones(100, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(method.queue.keys[untouched], before[untouched])
    assert method.queue.keys.shape == (100, OUT)


def test_moco_queue_is_state_and_only_training_enqueues():
    method = build("mocov2", queue_size=64)
    state = method.state_dict()
    assert state["queue.keys"].shape == (64, OUT) and state["queue.ptr"].item() == 0
    method.eval()
    with torch.no_grad():
        on_prepared(method, *views())
    assert method.queue.ptr.item() == 0
    method.train()
    on_prepared(method, *views())
    assert method.queue.ptr.item() == BATCH
    resumed = build("mocov2", queue_size=64)
    resumed.load_state_dict(method.state_dict())
    assert torch.equal(resumed.queue.keys, method.queue.keys) and resumed.queue.ptr.item() == BATCH


def test_moco_key_encoder_gets_no_gradient_and_follows_a_constant_ema():
    method = build("mocov2", momentum=0.9)
    on_prepared(method, *views())[0]["loss"].backward()
    assert all(p.grad is None for p in method.target.parameters())
    assert all(p.grad is not None for p in method.online.parameters())
    with torch.no_grad():
        for p in method.online.parameters():
            p.add_(1.0)
    old_target = [p.clone() for p in method.target.parameters()]
    for progress in (0.0, 0.7):  # constant momentum: progress does not matter
        method.momentum_update(progress)
        for old, t, o in zip(old_target, method.target.parameters(), method.online.parameters(), strict=True):
            assert torch.allclose(t, 0.9 * old + 0.1 * o, atol=1e-6)
            old.copy_(t)


# ------------------------------------------------------------------ BYOL


def test_byol_momentum_follows_the_cosine_schedule():
    assert byol_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert byol_momentum(0.99, 0.5) == pytest.approx(0.995)
    assert byol_momentum(0.99, 1.0) == pytest.approx(1.0)
    method = build("byol")
    with torch.no_grad():
        for p in method.online.parameters():
            p.add_(1.0)
    old = [p.clone() for p in method.target.parameters()]
    method.momentum_update(0.5)
    for before, t, o in zip(old, method.target.parameters(), method.online.parameters(), strict=True):
        assert torch.allclose(t, 0.995 * before + 0.005 * o, atol=1e-6)


def _record_loss_inputs(criterion: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_module, args):
        prediction, target = args
        if prediction.requires_grad:
            prediction.retain_grad()
        calls.append((prediction, target))

    criterion.register_forward_pre_hook(hook)
    return calls


def test_byol_gradient_stops_at_the_target_branch():
    method = build("byol", saib=True)
    targets = _capture_outputs(method.target)
    calls = _record_loss_inputs(method.criterion)
    on_prepared(method, *views())[0]["loss"].backward()
    assert len(targets) == 2 and not any(t.requires_grad for t in targets)
    # L = NMSE(p(anchor), sg(t(query))) + NMSE(p(query), sg(t(anchor))): the query is the first term's target.
    assert [torch.equal(target, t) for (_, target), t in zip(calls, reversed(targets), strict=True)] == [True, True]
    for prediction, target in calls:
        assert not target.requires_grad
        assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.target.parameters())
    assert all(p.grad is not None for p in method.online.parameters())
    assert all(p.grad is not None for p in method.predictor.parameters())
    groups = method.param_groups(1e-5)
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained.isdisjoint(id(p) for p in method.target.parameters())


# ------------------------------------------------------------------ SimSiam


def test_simsiam_gradient_stops_at_the_projection_targets():
    method = build("simsiam", saib=True)
    projected = _capture_outputs(method.encoder.projector)  # z_anchor, z_query
    method.encoder.projector.register_forward_hook(lambda _m, _i, out: out.retain_grad())
    calls = _record_loss_inputs(method.criterion)
    on_prepared(method, *views())[0]["loss"].backward()
    z_anchor, z_query = projected
    # D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2
    assert torch.equal(calls[0][1], z_query) and torch.equal(calls[1][1], z_anchor)
    for prediction, target in calls:
        assert not target.requires_grad and target.grad is None
        assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    assert all(p.grad is not None for p in method.predictor.parameters())
    # z_anchor's whole gradient is the one through its own prediction p1 = h(z_anchor)
    # in the first term: none arrives from the second term, where it is the target.
    leaf = z_anchor.detach().requires_grad_(True)
    (through_predictor,) = torch.autograd.grad(method.criterion(method.predictor(leaf), z_query.detach()) / 2, leaf)
    assert through_predictor.abs().sum() > 0
    assert torch.allclose(z_anchor.grad, through_predictor, rtol=1e-5, atol=1e-8)


def test_simsiam_predictor_keeps_a_fixed_learning_rate():
    method = build("simsiam", saib=True)
    groups = method.param_groups(1e-4)
    by_name = {g["group"]: g for g in groups}
    assert set(by_name) == {"decay", "no_decay", "saib", "predictor_decay", "predictor_no_decay"}
    assert by_name["predictor_decay"]["fixed_lr"] and by_name["predictor_no_decay"]["fixed_lr"]
    assert not any(by_name[n].get("fixed_lr") for n in ("decay", "no_decay", "saib"))
    assert by_name["predictor_decay"]["weight_decay"] == 1e-4 and by_name["predictor_no_decay"]["weight_decay"] == 0.0
    assert by_name["saib"]["weight_decay"] == 1e-4  # saib.weight_decay from the config
    # Every trainable parameter in exactly one group.
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in method.parameters() if p.requires_grad)
    assert {id(p) for p in method.predictor.parameters()} == {
        id(p) for g in groups if g["group"].startswith("predictor_") for p in g["params"]}

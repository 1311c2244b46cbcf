"""The encoder step's fast path (issue 15), checked on the CPU: the single-process
step makes no device->host sync; compile makes one graph per encoder and grad
mode; spectral norm runs once per step outside the compiled graphs; compiled
and eager losses agree."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import TINY, tiny_config
from torch.overrides import TorchFunctionMode

from iecl.train.config import Config, apply, resolve_runtime, validate
from iecl.train.loop import build_model, build_step

CPU = torch.device("cpu")

#: Tensor methods that hand a value to the host: on a GPU each one waits for the device.
_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
               torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy}


class HostReads(TorchFunctionMode):
    """Records every Tensor method call that reads a value on the host. On a
    CPU such a read costs nothing, but on a GPU it is a sync: this is the
    CPU-checkable proxy for `torch.cuda.set_sync_debug_mode("error")`."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _views(cfg, count: int, seed: int = 0, device: torch.device = CPU):
    gen = torch.Generator().manual_seed(seed)
    shape = (cfg.train.batch_size, cfg.data.image_size, cfg.data.image_size, 3)
    return [tuple(torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(device) for _ in range(2))
            for _ in range(count)]


def _step(tmp_path, updates: dict | None = None, device: torch.device = CPU):
    """A tiny IE-CL + SAIB training step as the loop builds it (ResNet-18, 32 px)."""
    if device.type == "cpu":
        cfg = tiny_config(tmp_path, tmp_path, {"saib": {"enabled": True}, **(updates or {})})
    else:
        cfg = Config()
        apply(cfg, TINY)
        apply(cfg, {"data": {"root": str(tmp_path)}, "saib": {"enabled": True}, "train": {"device": device.type}})
        apply(cfg, updates or {})
        validate(cfg)
        resolve_runtime(cfg, cuda_available=True, bf16_supported=torch.cuda.is_bf16_supported())
    method, optimizer, scaler, base_lr = build_model(cfg, device, world_size=1)
    method.train()
    return cfg, method, build_step(cfg, method, optimizer, scaler, base_lr, steps_per_epoch=8, device=device,
                                   report=False)


def test_the_host_read_detector_sees_a_read():
    """The proxy can fail: the reads the step used to make are caught."""
    with HostReads() as mode:
        bool(torch.isfinite(torch.tensor(1.0)))
        torch.tensor(2.0).item()
        torch.tensor([1, 2]).tolist()
    assert mode.reads == ["__bool__", "item", "tolist"]


@pytest.mark.slow
def test_a_single_process_step_reads_nothing_on_the_host(tmp_path):
    """Steps between the guard's reads make no host read, a NaN step included,
    and that NaN step is skipped on the device: no weight, optimizer state or
    target changes; the guard counts it when read. (Each optimizer's skip:
    tests/test_optim.py.)"""
    cfg, method, step = _step(tmp_path, {"optim": {"name": "lars"}, "train": {"max_nonfinite": 5, "batch_size": 4}})
    assert step.skips_on_device()
    views = _views(cfg, 2)
    before = {k: v.clone() for k, v in method.state_dict().items() if k.endswith(("weight", "bias", "original", "pos_embed"))}
    with HostReads() as mode:
        step(*views[0], 0)
    assert mode.reads == []
    changed = {k for k, v in before.items() if not torch.equal(method.state_dict()[k], v)}
    assert any(k.startswith("online.") for k in changed) and any(k.startswith("target.") for k in changed)

    before = {k: method.state_dict()[k].clone() for k in before}
    state_before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in step.optimizer.state.items()}
    loss_on_views = method.loss_on_views

    def nan_loss(anchor, query):
        losses, embeddings = loss_on_views(anchor, query)
        return {**losses, "loss": losses["loss"] * float("nan")}, embeddings

    method.loss_on_views = nan_loss
    with HostReads() as mode:
        outcome = step(*views[1], 1)
    assert mode.reads == []
    for key, value in before.items():
        assert torch.equal(method.state_dict()[key], value), key
    for param, state in step.optimizer.state.items():
        for key, value in state.items():
            assert torch.equal(value, state_before[id(param)][key]), key
    assert not outcome.updated and step.faults.total == 1


def test_the_guard_reads_when_a_stop_could_be_due():
    """With limit L the pending losses are read by the (L+1)-th unread step at
    the latest, so a run stops at the same step as with a per-step check."""
    from iecl.train.faults import NonFiniteGuard, NonFiniteLoss

    guard = NonFiniteGuard(limit=2, report=False)
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    with HostReads() as mode:
        guard.defer(one, 0)
        guard.defer(nan, 1)
    assert mode.reads == [] and guard.streak == 0
    guard.defer(nan, 2)  # three unread: a stop could be due; read: streak 2, not past the limit
    assert guard.streak == 2 and guard._total == 2
    with pytest.raises(NonFiniteLoss, match=r"3 step\(s\) in a row \(steps 2 to 4"):
        guard.defer(nan, 3)


# ----------------------------------------------------------------------------- spectral norm outside the graphs


def _iecl(batch: int = 4, saib: bool = False):
    from iecl.model.methods import build_method

    torch.manual_seed(0)
    return build_method("iecl", backbone="resnet18", projector_hidden=32, projector_out=16, batch_size=batch,
                        image_size=32, saib=saib).train()


@pytest.mark.parametrize("batched", [False, True], ids=["loop", "batched"])
def test_the_encoder_computes_what_the_parametrised_modules_compute(batched):
    """W / sigma outside the network, then the plain network on it: the same
    embeddings, gradients, power-iteration vectors and BatchNorm statistics as
    `projector(backbone(x))` through PyTorch's parametrisation: bit for bit
    conv by conv; batched, the same arithmetic with products summed in another
    order, so compared in fp64 (in fp32 the weights agree to ~1e-6,
    tests/test_spectral.py, but a 4-image batch's BatchNorms amplify that
    rounding to ~1e-4 in the stem's gradient)."""
    import copy

    from torch.nn.utils import parametrize

    from iecl.model.spectral import once_per_step

    dtype = torch.float64 if batched else torch.float32
    encoder = _iecl().online.to(dtype)
    encoder.spectral_batched = batched
    twin = copy.deepcopy(encoder)
    same = torch.equal if not batched else lambda a, b: torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    views = [torch.randn(4, 3, 32, 32, dtype=dtype) for _ in range(2)]
    with parametrize.cached():
        expected = sum(twin.projector(twin.backbone(v)).square().sum() for v in views)
    with once_per_step():
        actual = sum(encoder(v).square().sum() for v in views)
    expected.backward()
    actual.backward()
    assert same(actual, expected)
    for (name, a), b in zip(encoder.named_parameters(), twin.parameters()):
        assert same(a.grad, b.grad), name
    for (name, a), b in zip(encoder.named_buffers(), twin.buffers()):
        assert same(a, b), name


@pytest.mark.parametrize("batched", [False, True], ids=["loop", "batched"])
def test_the_power_iteration_runs_once_per_step(tmp_path, monkeypatch, batched):
    """One power iteration per spectral-normalised convolution and encoder
    (online, target) in a training step, although each encoder sees two views:
    each conv's own (`_SpectralNorm._power_method`) conv by conv, or its row of
    one stacked iteration (`spectral._batched_group`) batched, never both."""
    from torch.nn.utils.parametrizations import _SpectralNorm

    from iecl.model import spectral

    own, stacked = [], []
    power_method, batched_group = _SpectralNorm._power_method, spectral._batched_group

    def group(modules, weights, channels_last):
        stacked.extend(id(m) for m in modules if m.training)
        return batched_group(modules, weights, channels_last)

    monkeypatch.setattr(_SpectralNorm, "_power_method", lambda self, *a: own.append(id(self)) or power_method(self, *a))
    monkeypatch.setattr(spectral, "_batched_group", group)
    cfg, method, step = _step(tmp_path, {"train": {"batch_size": 4}, "model": {"spectral_batched": batched}})
    convs = {id(conv.parametrizations.weight[0]) for encoder in method.encoders().values()
             for _, conv in spectral.parametrized_convs(encoder)}
    assert len(convs) == 2 * 20  # ResNet-18: 20 convolutions, in the online and the target encoder
    own.clear()  # building ran each one's initial iterations
    step(*_views(cfg, 1)[0], 0)
    assert sorted(stacked if batched else own) == sorted(convs)
    assert (own if batched else stacked) == []


# ----------------------------------------------------------------------------- compile


#: what a power iteration and sigma are made of: none of it may be in a compiled graph
_SPECTRAL_OPS = {torch.mv, torch.vdot, torch.nn.functional.normalize, torch.Tensor.mv, torch.Tensor.vdot}


def _recording_backend(role: str, log: list, calls: Counter | None = None):
    """aot_eager (AOTAutograd without Inductor: seconds, not minutes, on a CPU),
    recording each graph it is given: which encoder, in which grad mode; and
    with `calls`, how often each encoder's graphs run."""
    from torch._dynamo.backends.debugging import aot_eager

    def backend(gm, example_inputs):
        targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        log.append({"role": role, "grad": torch.is_grad_enabled(), "spectral_ops": targets & _SPECTRAL_OPS})
        compiled = aot_eager(gm, example_inputs)
        if calls is None:
            return compiled

        def run(*args):
            calls[role] += 1
            return compiled(*args)

        run._boxed_call = getattr(compiled, "_boxed_call", False)  # the calling convention dynamo asks about
        return run

    return backend


@pytest.fixture(scope="module")
def compiled_and_eager(tmp_path_factory):
    """Two IE-CL + SAIB steps (bf16 autocast, LARS) compiled and eager from
    the same weights and views, with every compiled graph recorded."""
    from torch._dynamo.utils import counters

    tmp = tmp_path_factory.mktemp("compile")
    updates = {"optim": {"name": "lars"}, "train": {"batch_size": 4, "precision": "bf16"}}
    torch._dynamo.reset()
    counters.clear()
    runs, log = {}, []
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        cfg, method, step = _step(tmp, updates)
        if mode == "compiled":
            for role, encoder in method.encoders().items():
                encoder.compile(backend=_recording_backend(role, log))
        losses = []
        for i, (anchor, query) in enumerate(_views(cfg, 2, seed=1)):
            losses.append({k: v.item() for k, v in step(anchor, query, i).losses.items()})
        runs[mode] = {"losses": losses, "state": {k: v.float() for k, v in method.state_dict().items()
                                                  if v.is_floating_point()}}
    runs["graphs"], runs["unique_graphs"] = log, counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return runs


@pytest.mark.slow
def test_each_encoder_compiles_once_per_grad_mode(compiled_and_eager):
    """Over two steps (the second on new W / sigma tensors): the online encoder one graph (grad mode; the anchor
    without and the SAIB query with an input gradient), the target one (no
    grad), no recompiles, no graph breaks, no spectral-norm code inside."""
    graphs = compiled_and_eager["graphs"]
    assert sorted((g["role"], g["grad"]) for g in graphs) == [("online", True), ("target", False)], graphs
    assert compiled_and_eager["unique_graphs"] == len(graphs)  # no graph was made outside the encoders' trunks
    assert all(not g["spectral_ops"] for g in graphs)


@pytest.mark.slow
def test_fused_views_compile_once_per_grad_mode_and_run_each_graph_once_per_step(tmp_path, compiled_and_eager):
    """model.fused_views: both views in one trunk call, so over two steps each
    encoder's one graph runs twice (two calls per step without the fusion), and
    the losses are the eager two-call steps' within bf16 tolerance (the same
    weights, views and optimizer as `compiled_and_eager`)."""
    log, calls = [], Counter()
    torch._dynamo.reset()
    torch.manual_seed(0)
    updates = {"optim": {"name": "lars"}, "train": {"batch_size": 4, "precision": "bf16"}, "model": {"fused_views": True}}
    cfg, method, step = _step(tmp_path, updates)
    for role, encoder in method.encoders().items():
        encoder.compile(backend=_recording_backend(role, log, calls))
    losses = [{k: v.item() for k, v in step(anchor, query, i).losses.items()}
              for i, (anchor, query) in enumerate(_views(cfg, 2, seed=1))]
    torch._dynamo.reset()
    assert sorted((g["role"], g["grad"]) for g in log) == [("online", True), ("target", False)], log
    assert calls == {"online": 2, "target": 2}
    for fused, eager in zip(losses, compiled_and_eager["eager"]["losses"], strict=True):
        for key, value in eager.items():
            assert fused[key] == pytest.approx(value, rel=2e-2, abs=2e-2), key


@pytest.mark.slow
def test_compiled_and_eager_steps_agree(compiled_and_eager):
    """The same losses step by step, and the same weights after, within bf16
    tolerance (aot_eager runs the same kernels; Inductor's fusions on a GPU
    reorder bf16 arithmetic: see the gpu-marked variant's tolerance)."""
    eager, compiled = compiled_and_eager["eager"], compiled_and_eager["compiled"]
    for step_eager, step_compiled in zip(eager["losses"], compiled["losses"]):
        for key, value in step_eager.items():
            assert step_compiled[key] == pytest.approx(value, rel=2e-2, abs=2e-2), key
    for key, value in eager["state"].items():
        torch.testing.assert_close(compiled["state"][key], value, rtol=2e-2, atol=2e-2, msg=key)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor's GPU code needs a CUDA device")
@pytest.mark.parametrize("fused", [False, True], ids=["two-calls", "fused-views"])
def test_inductor_on_a_gpu_compiles_once_per_grad_mode_and_agrees_with_eager(tmp_path, fused):
    """The shipped backend (Inductor) on the GPU: one graph per encoder and
    grad mode over three steps, and losses within bf16 tolerance of eager
    (Inductor fuses BatchNorm, ReLU and residual passes, so bf16 roundings
    differ); with both views in one call (model.fused_views) too."""
    from torch._dynamo.utils import counters

    gpu = torch.device("cuda")
    updates = {"optim": {"name": "lars"}, "train": {"batch_size": 16, "precision": "bf16"},
               "model": {"fused_views": fused}}
    torch._dynamo.reset()
    counters.clear()
    losses = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        cfg, method, step = _step(tmp_path, updates, device=gpu)
        if mode == "compiled":
            method.compile_encoders()
        losses[mode] = [step(a, q, i).losses["loss"].item() for i, (a, q) in enumerate(_views(cfg, 3, 1, gpu))]
    assert counters["stats"]["unique_graphs"] == 2  # online (grad) and target (no grad)
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=5e-2, abs=5e-2)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- compile mode and caches


@pytest.mark.slow
def test_the_compile_mode_and_cache_dir_reach_torch_compile(tmp_path, sixteen_images, monkeypatch):
    """train.compile_mode is torch.compile's mode for every encoder, from the
    training loop and from the profiler's harness; train.compile_cache_dir
    becomes Inductor's and Triton's cache folders before that compile."""
    import os
    from types import SimpleNamespace

    from conftest import tiny_config

    from iecl.pipeline import open_images
    from iecl.profiling.harness import compile_if_configured
    from iecl.train.loop import pretrain
    from iecl.train.run_dir import create_run_dir, write_run_files

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    calls = []

    def compile(fn, **options):  # eager: what is checked is what the loop asks for
        calls.append({**options, "cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")})
        return fn

    monkeypatch.setattr(torch, "compile", compile)
    cache = tmp_path / "cache"
    cfg = tiny_config(sixteen_images, tmp_path / "runs", {"train": {
        "compile": True, "compile_mode": "max-autotune-no-cudagraphs", "compile_cache_dir": str(cache),
        "max_steps": 1}})
    run_dir = create_run_dir(cfg)
    write_run_files(run_dir, cfg, {"images": 16, "data_root": str(sixteen_images)}, resumed=False)
    pretrain(cfg, run_dir, open_images(sixteen_images), progress=False)
    assert calls == [{"mode": "max-autotune-no-cudagraphs", "cache": str(cache)}] * 2  # online, target
    assert os.environ["TRITON_CACHE_DIR"] == str(cache / "triton")

    calls.clear()
    cfg.train.compile_mode = "reduce-overhead"
    method = _iecl()
    compile_if_configured(SimpleNamespace(cfg=cfg, method=method))
    assert [c["mode"] for c in calls] == ["reduce-overhead"] * 2


_CACHED_COMPILE = """
import sys, torch
from torch._dynamo.utils import counters
from iecl.model.encoder import use_compile_cache
use_compile_cache(sys.argv[1])
f = torch.compile(lambda x: torch.relu(x) * 2 + 1)
f(torch.randn(16))
print(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
"""


@pytest.mark.slow
def test_a_second_process_hits_the_fx_graph_cache_in_compile_cache_dir(tmp_path):
    """Two processes compile the same function with Inductor and the same cache
    folder: the first misses and writes the cache there, the second hits it."""
    import os
    import subprocess
    import sys

    from conftest import _LAUNCHER, INSTALLED

    from iecl.train.config import _compiler_available

    # a plain checkout (no install) is made iecl by its launcher first, as module_command does
    code = _CACHED_COMPILE if INSTALLED else f"import runpy; runpy.run_path({str(_LAUNCHER)!r}, run_name='iecl_checkout')\n{_CACHED_COMPILE}"
    if not _compiler_available("cpu"):
        pytest.skip("Inductor on a CPU needs a C++ compiler")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], env=env,
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(tuple(int(n) for n in done.stdout.split()[-2:]))
    (first_hits, first_misses), (second_hits, _) = runs
    assert first_hits == 0 and first_misses > 0 and second_hits > 0, runs
    assert any((tmp_path / "cache").rglob("*")), "nothing written in the cache folder"

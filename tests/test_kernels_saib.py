"""SAIB's Triton kernels (kernels/saib_*.py) against the functional reference,
and the reference against model/saib.py's module.

On a CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set
before the kernel modules are imported), which is slow: shapes are tiny. Every
buffer the kernels' launchers allocate is filled with NaN first, so an element
no kernel writes fails the comparison. Errors are max-norm relative:
max|actual - expected| / max|expected|.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import warnings

import pytest
import torch
from conftest import module_command

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytest.importorskip("triton")

from iecl.kernels import _triton
from iecl.kernels.saib_function import saib_triton, saib_triton_uint8
from iecl.kernels.saib_reference import SAIBParams, saib_reference, saib_reference_uint8
from iecl.model.saib import SAIB
from iecl.pipeline import MEAN_255, STD_255

if not _triton.triton_available(DEVICE)[0]:
    pytest.skip(f"Triton cannot run here: {_triton.triton_available(DEVICE)[1]}", allow_module_level=True)

pytestmark = pytest.mark.triton  # TRITON_INTERPRET=1 on a CPU (tests/conftest.py)

FP32_TOL = 2e-5


@pytest.fixture(scope="module", autouse=True)
def _kernels_parsed():
    from conftest import rewrite_interpreted_kernels

    from iecl.kernels import saib_gemm, saib_passes

    rewrite_interpreted_kernels(saib_gemm, saib_passes)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(_triton, "POISON_OUTPUTS", True)
    if DEVICE == "cuda":  # compare against full-precision cuDNN, not TF32
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def random_params(batch: int, height: int, width: int, patch: int, seed: int) -> SAIBParams:
    """Parameters away from their initial values (BN affine included, so every
    term of the backward is exercised) and running buffers."""
    gen = torch.Generator().manual_seed(seed)
    d, n = batch, 3 * (height // patch) * (width // patch)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)

    channels = (d, 2 * d, 2 * d, d)
    return SAIBParams(
        pos_embed=randn(n, 1, patch, patch, scale=0.1),
        conv_weights=(randn(d, d, 1, 1, scale=d**-0.5), randn(2 * d, d, 3, 3, scale=(9 * d) ** -0.5),
                      randn(2 * d, 2 * d, 1, 1, scale=(2 * d) ** -0.5), randn(d, 2 * d, 1, 1, scale=(2 * d) ** -0.5)),
        bn_weights=tuple(1.0 + randn(c, scale=0.3) for c in channels),
        bn_biases=tuple(randn(c, scale=0.3) for c in channels),
        running_means=tuple(randn(c, scale=0.1) for c in channels),
        running_vars=tuple(1.0 + randn(c, scale=0.1).abs() for c in channels),
        num_batches_tracked=tuple(torch.zeros((), dtype=torch.long, device=DEVICE) for _ in channels),
    )


LEAVES = ("pos_embed", "conv_weights", "bn_weights", "bn_biases")


def forward_backward(fn, x, base: SAIBParams, grad_out, *args, **kwargs) -> dict[str, torch.Tensor]:
    """Run `fn(x, *args, params, ...)` on fresh copies of `base`; return the
    output, every gradient and the updated buffers by name."""
    leaves = {name: [t.detach().clone().requires_grad_() for t in
                     ((getattr(base, name),) if name == "pos_embed" else getattr(base, name))] for name in LEAVES}
    buffers = {name: tuple(t.clone() for t in getattr(base, name))
               for name in ("running_means", "running_vars", "num_batches_tracked")}
    params = SAIBParams(leaves["pos_embed"][0], *(tuple(leaves[name]) for name in LEAVES[1:]), **buffers)
    if x.is_floating_point():
        x = x.detach().clone().requires_grad_()
    out = fn(x, *args, params, **kwargs)
    out.backward(grad_out)
    result = {"out": out}
    if x.is_floating_point():
        result["x.grad"] = x.grad
    for name, tensors in leaves.items():
        result.update({f"{name}[{i}].grad": t.grad for i, t in enumerate(tensors)})
    for name, tensors in buffers.items():
        result.update({f"{name}[{i}]": t for i, t in enumerate(tensors)})
    return result


def assert_all_close(actual: dict, expected: dict, tol: float) -> None:
    assert actual.keys() == expected.keys()
    for name, exp in expected.items():
        act = actual[name]
        assert act.shape == exp.shape and act.dtype == exp.dtype or name == "out", name
        if not exp.is_floating_point():
            assert torch.equal(act, exp), name
            continue
        act, exp = act.double(), exp.double()
        assert torch.isfinite(act).all(), f"{name}: not finite (an unwritten element?)"
        err = ((act - exp).abs().max() / exp.abs().max().clamp_min(1e-30)).item()
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def inputs(batch, height, width, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, height, width, generator=gen).to(DEVICE)
    grad_out = torch.randn(batch, 3, height, width, generator=gen).to(DEVICE)
    return x, grad_out


# ---------------------------------------------------------------- reference vs module


@pytest.mark.parametrize("training", [True, False])
def test_reference_equals_module(training):
    torch.manual_seed(0)
    module = SAIB(6, (16, 24), 8).to(DEVICE)
    for bn in (module.conv1[1], module.conv2[1], module.conv3[1], module.conv4[1]):
        torch.nn.init.normal_(bn.weight, 1.0, 0.3)
        torch.nn.init.normal_(bn.bias, 0.0, 0.3)
    x, grad_out = inputs(6, 16, 24, seed=1)
    module(x)  # non-trivial running buffers
    module.train(training)
    twin = copy.deepcopy(module)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = module(x1)
    out.backward(grad_out)
    expected = saib_reference(x2, twin.functional_params(), 8, training)
    expected.backward(grad_out)
    assert torch.equal(out, expected) and out.stride() == expected.stride()
    assert torch.equal(x1.grad, x2.grad)
    for (name, p1), p2 in zip(module.named_parameters(), twin.parameters()):
        if DEVICE == "cuda":  # cuDNN may pick another weight-gradient algorithm per call (order of sums)
            torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(p1.grad, p2.grad), name
    for (name, b1), b2 in zip(module.named_buffers(), twin.buffers()):
        assert torch.equal(b1, b2), name


# ---------------------------------------------------------------- kernels vs reference


@pytest.mark.slow
@pytest.mark.parametrize("batch,height,width,patch", [(6, 16, 24, 8), (4, 16, 16, 4), (3, 8, 12, 4)])
def test_fp32_forward_and_gradients(batch, height, width, patch):
    params = random_params(batch, height, width, patch, seed=batch)
    x, grad_out = inputs(batch, height, width, seed=batch + 1)
    expected = forward_backward(saib_reference, x, params, grad_out, patch=patch)
    actual = forward_backward(saib_triton, x, params, grad_out, patch=patch)
    assert actual["out"].is_contiguous(memory_format=torch.channels_last)
    assert_all_close(actual, expected, FP32_TOL)


@pytest.mark.slow
def test_fp32_patch_16_row_tiles_within_a_patch():
    """Patch 16: a GEMM row tile (128 rows) is half a patch, so the taps' boxes
    start mid-patch in the framed layout (patches of 4 and 8 fill whole tiles)."""
    params = random_params(2, 16, 32, 16, seed=22)
    x, grad_out = inputs(2, 16, 32, seed=23)
    expected = forward_backward(saib_reference, x, params, grad_out, patch=16)
    actual = forward_backward(saib_triton, x, params, grad_out, patch=16)
    assert_all_close(actual, expected, FP32_TOL)


def test_fp32_eval_mode_uses_running_statistics():
    params = random_params(2, 8, 8, 4, seed=7)
    x, grad_out = inputs(2, 8, 8, seed=8)
    expected = forward_backward(saib_reference, x, params, grad_out, patch=4, training=False)
    actual = forward_backward(saib_triton, x, params, grad_out, patch=4, training=False)
    assert_all_close(actual, expected, FP32_TOL)


def test_channels_last_input():
    params = random_params(4, 8, 16, 8, seed=9)
    x, grad_out = inputs(4, 8, 16, seed=10)
    x = x.contiguous(memory_format=torch.channels_last)
    expected = forward_backward(saib_reference, x, params, grad_out, patch=8)
    actual = forward_backward(saib_triton, x, params, grad_out, patch=8)
    assert_all_close(actual, expected, FP32_TOL)


def test_uint8_query_with_fused_normalisation():
    params = random_params(4, 16, 16, 8, seed=11)
    gen = torch.Generator().manual_seed(12)
    images = torch.randint(0, 256, (4, 16, 16, 3), generator=gen, dtype=torch.uint8).to(DEVICE)
    grad_out = torch.randn(4, 3, 16, 16, generator=gen).to(DEVICE)
    mean, std = torch.tensor(MEAN_255, device=DEVICE), torch.tensor(STD_255, device=DEVICE)
    expected = forward_backward(saib_reference_uint8, images, params, grad_out, mean, std, torch.float32, patch=8)
    actual = forward_backward(saib_triton_uint8, images, params, grad_out, mean, std, torch.float32, patch=8)
    assert_all_close(actual, expected, FP32_TOL)


@pytest.mark.slow
def test_bf16_autocast_forward_and_gradients():
    """bf16 operands and activations, fp32 accumulation and statistics, against
    the fp32 reference. On CPU, Triton 3.9's interpreter truncates fp32 -> bf16
    (the GPU rounds to nearest) and has no bf16 tl.dot (operands rounded to bf16
    are multiplied in fp32 there), so this checks the kernels' bf16 data flow,
    not the GPU's exact rounding."""
    params = random_params(6, 16, 24, 8, seed=13)
    x, grad_out = inputs(6, 16, 24, seed=14)
    expected = forward_backward(saib_reference, x, params, grad_out, patch=8)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        actual = forward_backward(saib_triton, x, params, grad_out, patch=8)
    assert actual["out"].dtype == torch.bfloat16
    actual["out"] = actual["out"].float()
    assert_all_close(actual, expected, 6e-2)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_half_precision_forward_and_gradients(dtype, training):
    """16-bit operands and activations at a non-square size with an odd batch,
    training and eval, against the fp32 reference (tolerance as above)."""
    params = random_params(3, 8, 12, 4, seed=15)
    x, grad_out = inputs(3, 8, 12, seed=16)
    expected = forward_backward(saib_reference, x, params, grad_out, patch=4, training=training)
    with torch.autocast(DEVICE, dtype=dtype):
        actual = forward_backward(saib_triton, x, params, grad_out, patch=4, training=training)
    assert actual["out"].dtype == dtype
    actual["out"] = actual["out"].float()
    assert_all_close(actual, expected, 6e-2)


@pytest.mark.slow
def test_bf16_uint8_query_as_the_training_step_runs_it():
    """uint8 views normalised into bf16 inside the first pass, bf16 GEMMs (the
    step's path), against the fp32 reference on the same images."""
    params = random_params(3, 8, 8, 4, seed=24)
    gen = torch.Generator().manual_seed(25)
    images = torch.randint(0, 256, (3, 8, 8, 3), generator=gen, dtype=torch.uint8).to(DEVICE)
    grad_out = torch.randn(3, 3, 8, 8, generator=gen).to(DEVICE)
    mean, std = torch.tensor(MEAN_255, device=DEVICE), torch.tensor(STD_255, device=DEVICE)
    expected = forward_backward(saib_reference_uint8, images, params, grad_out, mean, std, torch.float32, patch=4)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        actual = forward_backward(saib_triton_uint8, images, params, grad_out, mean, std, torch.bfloat16, patch=4)
    assert actual["out"].dtype == torch.bfloat16
    actual["out"] = actual["out"].float()
    assert_all_close(actual, expected, 6e-2)


def test_eval_mode_without_running_buffers_uses_batch_statistics():
    """As nn.BatchNorm2d(track_running_stats=False): batch statistics in eval too."""
    base = random_params(2, 8, 8, 4, seed=17)
    x, grad_out = inputs(2, 8, 8, seed=18)
    results = []
    for fn in (saib_reference, saib_triton):
        weights = [w.clone().requires_grad_() for w in base.conv_weights]
        params = SAIBParams(base.pos_embed, tuple(weights), base.bn_weights, base.bn_biases)
        xx = x.clone().requires_grad_()
        out = fn(xx, params, 4, training=False)
        out.backward(grad_out)
        results.append({"out": out, "x.grad": xx.grad, **{f"w{i}.grad": w.grad for i, w in enumerate(weights)}})
    assert_all_close(results[1], results[0], FP32_TOL)


def test_patch_size_not_a_multiple_of_four_is_refused():
    params = random_params(2, 6, 6, 2, seed=19)
    x, _ = inputs(2, 6, 6, seed=20)
    with pytest.raises(ValueError, match="multiple of 4"):
        saib_triton(x, params, 2)


def framed_reference(h: torch.Tensor, patches: int, patch: int) -> torch.Tensor:
    """The framed layout in PyTorch: copy s holds pixel (u' - 1, v' + s - 1)."""
    channels = h.shape[1]
    padded_h = torch.nn.functional.pad(h.view(patches, patch, patch, channels), (0, 0, 1, 1, 1, 1))
    return torch.cat([padded_h[:, :, s:s + patch].reshape(-1, channels) for s in range(3)])


def test_framed_activation_layout():
    """The 3x3's input: silu(bn(z)) in three column-shifted copies, each patch
    framed by zero rows; the padded channels are zeros too."""
    from iecl.kernels.saib_passes import Geometry, activation

    geo = Geometry(batch=5, height=8, width=12, patch=4, uint8=False, view_round=0)
    gen = torch.Generator().manual_seed(21)
    z = torch.randn(geo.rows, 16, generator=gen).to(DEVICE)
    mean, rstd, gamma, beta = (torch.randn(5, generator=gen).to(DEVICE) for _ in range(4))
    framed = activation(z, (mean, rstd, gamma, beta), 5, geo, framed=True)
    h = torch.nn.functional.silu((z[:, :5] - mean) * rstd * gamma + beta)
    expected = framed_reference(torch.nn.functional.pad(h, (0, 11)), geo.patches, 4)
    assert framed.shape == expected.shape == (3 * geo.framed_rows, 16)
    torch.testing.assert_close(framed, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_gemms_compile_to_pipelined_wgmma_with_tma_for_sm90(tmp_path):
    """The structure an H100 relies on, from a compile for sm_90a that needs no
    GPU (`kernels/saib_sm90.py`, a fresh process without the interpreter): the
    full-size 3x3 forward GEMM, a gradient-epilogue GEMM and the 3x3 wgrad load
    with TMA, multiply with wgmma that the main loop does not wait for at once,
    fit in shared memory and do not spill."""
    from iecl.kernels.saib_sm90 import SMEM_LIMIT

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(module_command("iecl.kernels.saib_sm90"), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    gemms = [r for r in rows if r["kernel"] in ("saib_gemm_kernel", "saib_wgrad_kernel")]
    assert len(gemms) == 3, rows
    for row in gemms:
        assert row["wgmma"] and row["tma_loads"], row
        assert row["loop_wait_pendings"] and min(row["loop_wait_pendings"]) > 0, row
        assert row["shared"] <= SMEM_LIMIT, row
        assert row["spill_bytes"] in (0, None), row  # None: this Triton does not say where its ptxas is


# ---------------------------------------------------------------- the module's switch


def test_module_triton_impl_matches_reference_impl():
    """Channels-last modules, as the training loop makes them (the 3x3 weight's strides change)."""
    torch.manual_seed(3)
    reference = SAIB(2, (8, 8), 4).to(DEVICE, memory_format=torch.channels_last)
    fused = SAIB(2, (8, 8), 4, impl="triton").to(DEVICE, memory_format=torch.channels_last)
    fused.load_state_dict(reference.state_dict())
    assert not fused.conv2[0].weight.is_contiguous()
    x, grad_out = inputs(2, 8, 8, seed=4)
    results = []
    for module in (reference, fused):
        xx = x.clone().requires_grad_()
        out = module(xx)
        out.backward(grad_out)
        results.append({"out": out, "x.grad": xx.grad, **{n: p.grad for n, p in module.named_parameters()},
                        **dict(module.named_buffers())})
    assert_all_close(results[1], results[0], FP32_TOL)
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8, device=DEVICE)
    mean, std = torch.tensor(MEAN_255, device=DEVICE), torch.tensor(STD_255, device=DEVICE)
    reference.eval(), fused.eval()
    expected = reference.forward_uint8(images, mean, std, torch.float32)
    actual = fused.forward_uint8(images, mean, std, torch.float32)
    assert_all_close({"out": actual}, {"out": expected}, FP32_TOL)


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="impl"):
        SAIB(2, (8, 8), 4, impl="cuda")


def test_falls_back_to_reference_with_one_warning(monkeypatch):
    """CPU tensors without the interpreter: the reference runs, one warning says why."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_triton, "_warned", set())
    assert not _triton.triton_available("cpu")[0]
    torch.manual_seed(5)
    reference = SAIB(2, (8, 8), 4)
    fused = SAIB(2, (8, 8), 4, impl="triton")
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [fused(x) for _ in range(3)]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "TRITON_INTERPRET=1" in messages[0] and "\n" not in messages[0], messages
    for out in outs:
        assert torch.equal(out, reference(x))


@pytest.mark.slow
def test_module_compile_impl_matches_reference_impl():
    """impl="compile": torch.compile of the functional reference (slow to compile on CPU: tiny shape)."""
    torch.manual_seed(6)
    reference = SAIB(2, (8, 8), 4).to(DEVICE)
    compiled = SAIB(2, (8, 8), 4, impl="compile").to(DEVICE)
    compiled.load_state_dict(reference.state_dict())
    x, grad_out = inputs(2, 8, 8, seed=7)
    results = []
    for module in (reference, compiled):
        xx = x.clone().requires_grad_()
        out = module(xx)
        out.backward(grad_out)
        results.append({"out": out, "x.grad": xx.grad, **{n: p.grad for n, p in module.named_parameters()},
                        **dict(module.named_buffers())})
    assert_all_close(results[1], results[0], FP32_TOL)

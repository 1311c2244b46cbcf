"""Shared fixtures: tiny synthetic datasets and configs that train in seconds on a CPU."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

# Triton picks its interpreter when it is imported and when each kernel is
# decorated, so on a machine without a GPU the variable is set before anything
# imports triton; tests not marked `triton` then run without it (fixture below),
# as a user's machine would.
import pytest
import torch  # (does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_LAUNCHER = Path(__file__).resolve().parent.parent / "__main__.py"
try:
    import iecl  # noqa: F401  (installed: pip install -e .)

    INSTALLED = True
except ModuleNotFoundError:  # a plain checkout (a GPU machine with no package index): the launcher makes it iecl
    runpy.run_path(str(_LAUNCHER), run_name="iecl_checkout")
    INSTALLED = False


def module_command(module: str, *args: str) -> list[str]:
    """The argv of `python -m MODULE ARGS` in a fresh process, installed or
    from a plain checkout (there the launcher first makes the checkout iecl)."""
    if INSTALLED:
        return [sys.executable, "-m", module, *args]
    code = (f"import runpy; runpy.run_path({str(_LAUNCHER)!r}, run_name='iecl_checkout'); "
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", code, *args]

# Our folders are importable only as iecl.*: with the checkout itself on sys.path
# (`python -m pytest` puts the working directory there), a string target such as
# monkeypatch.setattr("pipeline.dali.X", ...) would import and patch a second copy.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _ROOT]

from iecl.pipeline.synthetic import SyntheticSpec, make_synthetic
from iecl.train.config import Config, apply, resolve_runtime, validate

# Deterministic, comparable CPU numbers however many cores the machine has.
THREADS = min(2, os.cpu_count() or 1)
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _interpreter_only_for_kernel_tests(request, monkeypatch):
    """TRITON_INTERPRET=1 (set above) for the tests marked `triton` alone."""
    if request.node.get_closest_marker("triton") is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Every test starts with THREADS: a library that changes torch's thread count
    (FFCV does, at import) must not change the numbers of the tests after it."""
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """48 ImageNet-like JPEGs in 4 classes."""
    root = tmp_path_factory.mktemp("data") / "tiny"
    make_synthetic(root, SyntheticSpec(48, 4, seed=3), workers=1, progress=False)
    return root


@pytest.fixture(scope="session")
def sixteen_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "sixteen"
    make_synthetic(root, SyntheticSpec(16, 4, seed=5), workers=1, progress=False)
    return root


#: ResNet-18 at 32 px, batch 8, small projector, CPU fp32, in-process loading.
TINY = {
    "run": {"seed": 0},
    "data": {"image_size": 32, "workers": 0},
    "model": {"projector_hidden": 64, "projector_out": 32},
    "optim": {"warmup_epochs": 0.5},
    "train": {"batch_size": 8, "epochs": 2, "log_every": 1, "device": "cpu", "precision": "fp32",
              "checkpoint_every": 0},
}


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data, tmp_path_factory):
    """A run folder (with last.pt) of a 4-step IE-CL run on `tiny_data`, for the
    evaluation commands. Its backbone is a ResNet-18 barely trained: what it
    shows is that evaluation works end to end, not that pretraining helped."""
    from iecl.train.loop import pretrain

    out = tmp_path_factory.mktemp("runs")
    cfg = tiny_config(tiny_data, out, {"train": {"max_steps": 4}})
    from iecl.train.run_dir import create_run_dir, write_run_files

    run_dir = create_run_dir(cfg)
    write_run_files(run_dir, cfg, {"images": 48, "data_root": str(tiny_data)}, resumed=False)
    from iecl.pipeline import open_images

    pretrain(cfg, run_dir, open_images(tiny_data), progress=False)
    return run_dir


def tiny_overrides() -> list[str]:
    """TINY as command-line overrides."""
    return [f"{section}.{key}={value}" for section, values in TINY.items() for key, value in values.items()]


def tiny_config(data_root, out_dir, updates: dict | None = None) -> Config:
    cfg = Config()
    apply(cfg, TINY)
    apply(cfg, {"run": {"out_dir": str(out_dir)}, "data": {"root": str(data_root)}})
    if updates:
        apply(cfg, updates)
    validate(cfg)
    return resolve_runtime(cfg, cuda_available=False, bf16_supported=False)


def rewrite_interpreted_kernels(*modules, attempts: int = 3) -> None:
    """Have Triton's interpreter parse every kernel of `modules` now, once.

    It rewrites each kernel's source through `ast.parse` on first use, and
    CPython before 3.11.8 / 3.12.1 can fail such a parse at random with
    "SystemError: AST constructor recursion depth mismatch" (its recursion
    counter was not thread-safe, CPython gh-106905): seen once in a full CI run
    (Python 3.11.7), never when rerun. The parse is retried for that error only,
    so no kernel test fails on it; the rewritten kernels are cached per process.
    """
    kernels = [obj for module in modules for obj in vars(module).values()
               if type(obj).__name__ == "InterpretedFunction" and hasattr(obj, "rewrite")]
    for kernel in kernels:
        for attempt in range(attempts):
            try:
                kernel.rewrite()
                break
            except SystemError as err:
                if "recursion depth mismatch" not in str(err) or attempt == attempts - 1:
                    raise


def inject_nan(method, steps: set[int]) -> None:
    """Make `method` return a NaN loss at the given 0-based calls of loss_on_views."""
    original, calls = method.loss_on_views, [0]

    def faulty(anchor, query):
        losses, embeddings = original(anchor, query)
        if calls[0] in steps:
            losses["loss"] = losses["loss"] * float("nan")
        calls[0] += 1
        return losses, embeddings

    method.loss_on_views = faulty


def on_prepared(method, anchor: torch.Tensor, query: torch.Tensor):
    """A method's step on already prepared float views (B, 3, H, W): SAIB (if
    any) on the query, then the loss -> (losses, embeddings). The loop's entry
    point, `method(anchor_u8, query_u8)`, does the view preparation first."""
    return method.loss_on_views(anchor, method.saib(query) if method.saib is not None else query)


def descendants(pid: int) -> set[int]:
    """Every process below `pid` now (from /proc: children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has died; only its exit status is left

"""Multi-process training: torchrun's environment, the process groups, the
DistributedDataParallel wrapper, and what the ranks must agree on.

A run is distributed when torchrun (or anything that sets its variables:
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) launched it; a world
of one process is then still a process group, so `torchrun --nproc_per_node=1`
exercises the same code as eight GPUs. Without those variables nothing here
initialises anything and every helper is the single-process identity.

Two process groups:
- the default one (NCCL on GPUs, gloo on CPUs, `train.dist_backend`) carries
  DDP's gradients, the methods' gathers and the per-step agreement;
- a gloo *control* group with a long timeout carries barriers and small Python
  objects while rank 0 works alone (making the synthetic data, the run
  directory, a kNN evaluation): NCCL's watchdog would abort a default-group
  barrier after 10 minutes, which a kNN pass over ImageNet can exceed.

The ranks must take the same branches at the same step or a collective hangs.
`StepAgreement` makes every decision that one rank cannot know alone (a
non-finite loss, a stop signal, a data error, the bad-image count) from one
all-reduce of a few integers per step.
"""

from __future__ import annotations

import inspect
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from iecl.model.distributed import initialized, rank, world_size  # ddp.rank() etc. too
from iecl.pipeline.errors import UserError
from iecl.train.config import Config, ConfigError
from iecl.train.step import LocalAgreement, Verdict

#: How long the other ranks wait in a control-group barrier while rank 0 works alone.
CONTROL_TIMEOUT = timedelta(hours=2)
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

_control_group = None  # set by `session`; None: barriers use the default group


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch."""

    rank: int
    local_rank: int
    world_size: int


def launch_from_env(env: dict | None = None) -> Launch | None:
    """torchrun's variables -> `Launch`, or None for a plain single-process run."""
    env = os.environ if env is None else env
    present = [name for name in _TORCHRUN_VARS if name in env]
    if not present:
        return None
    if len(present) != len(_TORCHRUN_VARS):
        missing = ", ".join(n for n in _TORCHRUN_VARS if n not in env)
        raise ConfigError(f"the environment sets {', '.join(present)} but not {missing}: launch with torchrun "
                          "(it sets them all) or unset them for a single-process run")
    try:
        rank, local, world = int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])
    except ValueError:
        raise ConfigError("RANK, LOCAL_RANK and WORLD_SIZE must be integers (as torchrun sets them)") from None
    if not (0 <= rank < world and 0 <= local <= rank):
        raise ConfigError(f"inconsistent torchrun environment: RANK={rank} LOCAL_RANK={local} WORLD_SIZE={world}")
    return Launch(rank, local, world)


def backend_for(cfg: Config) -> str:
    """The default group's backend: `train.dist_backend`, auto = NCCL for CUDA, gloo for CPUs."""
    choice = cfg.train.dist_backend
    backend = choice if choice != "auto" else ("nccl" if cfg.train.device == "cuda" else "gloo")
    if backend == "nccl" and not dist.is_nccl_available():
        raise ConfigError("train.dist_backend=nccl but this PyTorch build has no NCCL; use train.dist_backend=gloo")
    return backend


@contextmanager
def session(cfg: Config, launch: Launch | None):
    """Initialise the process groups for `launch` (nothing for None), and
    destroy them on the way out, also after an error. On GPUs each process
    takes `cuda:LOCAL_RANK` as its current device first, which is what NCCL and
    every later `torch.device("cuda")` then mean."""
    global _control_group
    if launch is None:
        yield
        return
    backend = backend_for(cfg)
    if cfg.train.device == "cuda":
        if launch.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {launch.local_rank} but this machine has {torch.cuda.device_count()} "
                              "GPU(s): start at most that many processes per node (torchrun --nproc_per_node)")
        torch.cuda.set_device(launch.local_rank)
    options = {"device_id": torch.device("cuda", launch.local_rank)} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size, **options)
    try:
        _control_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        yield
    finally:
        _control_group = None
        dist.destroy_process_group()


# ---------------------------------------------------------------- this process in the world


def is_main() -> bool:
    return rank() == 0


def training_device(cfg: Config) -> torch.device:
    """`train.device` as a device; under a process group on GPUs, the current
    (= LOCAL_RANK's) GPU with its index, as DDP's `device_ids` needs."""
    device = torch.device(cfg.train.device)
    if device.type == "cuda" and device.index is None and initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def barrier() -> None:
    """Every rank waits here for all the others (no-op in one process)."""
    if initialized():
        dist.barrier(group=_control_group)


def _broadcast_from_main(value):
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_control_group)
    return box[0]


def _shareable(err: BaseException) -> tuple[type, str]:
    # A user error is re-raised on the other ranks as itself (one line, exit 2).
    if isinstance(err, UserError):
        return type(err), str(err)
    return RuntimeError, f"rank 0 failed ({type(err).__name__}: {err})"


def from_main(fn):
    """`fn()` on rank 0 only; every rank returns its result (picklable), or
    raises the error it raised (a user error keeps its type and message), so no
    rank is left waiting for one that failed."""
    if not initialized():
        return fn()
    outcome = None
    if is_main():
        try:
            outcome = ("ok", fn())
        except BaseException as err:
            _broadcast_from_main(("error", *_shareable(err)))
            raise
    outcome = _broadcast_from_main(outcome)
    if outcome[0] == "error":
        raise outcome[1](outcome[2])
    return outcome[1]


def main_first(fn):
    """`fn()` on rank 0, then on every other rank if it succeeded there (for
    work that creates something once, such as a cached dataset, and finds it
    afterwards); rank 0's error is raised everywhere."""
    if not initialized():
        return fn()
    kept: list = []
    from_main(lambda: kept.append(fn()))
    return kept[0] if kept else fn()


# ---------------------------------------------------------------- the model


def convert_sync_batchnorm(method: nn.Module) -> nn.Module:
    """Every BatchNorm of the method's encoders (online, target, predictors)
    becomes a SyncBatchNorm, normalising over the global batch; SAIB's stay
    per rank: its BN channels are this rank's images (batch-as-channels).
    The parameters are the same objects, so optimizers built before still hold them."""
    for name, child in list(method.named_children()):
        if child is not getattr(method, "saib", None):
            setattr(method, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return method


def wrap(method: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `method` under a process group, else the
    method itself. Buffers are not broadcast before each forward: MoCo's key
    queue (32 MB) is kept identical by its own gather, BatchNorm statistics stay
    per rank (rank 0's are checkpointed) and every rank starts from the same
    seed or checkpoint. torch >= 2.13 names that `forward_sync_buffers=False`
    (`broadcast_buffers` is deprecated there); older versions `broadcast_buffers=False`."""
    if not initialized():
        return method
    from torch.nn.parallel import DistributedDataParallel

    _canonical_strides(method)
    params = inspect.signature(DistributedDataParallel).parameters
    options = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    if device.type == "cuda":
        options["device_ids"] = [device.index]
    return DistributedDataParallel(method, **options)


def _canonical_strides(module: nn.Module) -> None:
    """Give row-major strides back to the parameters other than convolution
    weights that `.to(memory_format=torch.channels_last)` restrided although
    they are contiguous either way (a size-1 dimension, such as SAIB's
    positional embedding (N, 1, p, p)). Autograd returns their gradients
    row-major (convolution weights get channels-last ones), and DDP would copy
    each into its bucket with a "grad strides do not match bucket view strides"
    warning."""
    conv_weights = set()
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            parametrized = getattr(m, "parametrizations", None)
            conv_weights.add(id(parametrized["weight"].original if parametrized is not None else m.weight))
    with torch.no_grad():
        for param in module.parameters():
            row_major = torch.empty(param.shape).stride()
            if id(param) not in conv_weights and param.is_contiguous() and param.stride() != row_major:
                param.data = param.data.clone(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------- agreement per step


class StepAgreement:
    """One all-reduce (sum) of five integers per step, after the forward and
    before the backward: [loss not finite, SIGINT seen, SIGTERM seen, data
    error, bad images so far]. Reading the result is the step's one host
    synchronisation, the same one the single-process non-finite check makes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, loss: torch.Tensor, signal: str | None, error: bool, bad_images: int) -> Verdict:
        # The same verdict as one process's train.step.LocalAgreement, agreed over the ranks.
        local = torch.tensor([0, signal == "SIGINT", signal == "SIGTERM", error, bad_images], dtype=torch.int64)
        flags = local.to(self.device)
        flags[0] = (~torch.isfinite(loss.detach())).to(torch.int64)
        dist.all_reduce(flags)
        nonfinite, sigint, sigterm, errors, bad = flags.tolist()
        stop = "SIGTERM" if sigterm else "SIGINT" if sigint else None
        return Verdict(nonfinite, stop, errors, bad)


def agreement(device: torch.device):
    """The step's agreement: over the ranks under torchrun, this process's alone otherwise."""
    return StepAgreement(device) if initialized() else LocalAgreement()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a small tensor (gloo has no AVG: sum, then divide)."""
    if not initialized():
        return values
    dist.all_reduce(values)
    return values.div_(world_size())


def union_over_ranks(items: list[str]) -> list[str]:
    """The sorted union of every rank's `items` (all ranks call it together)."""
    if not initialized():
        return sorted(set(items))
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, items)
    return sorted({item for part in gathered for item in part})


def log_prefix() -> str:
    """'iecl pretrain: ' on rank 0 and in one process, 'iecl pretrain: rank N: ' elsewhere."""
    return "iecl pretrain: " + (f"rank {rank()}: " if initialized() and not is_main() else "")


def warn(message: str) -> None:
    print(f"{log_prefix()}warning: {message}", file=sys.stderr, flush=True)

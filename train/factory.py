"""From a configuration (or a checkpoint) to a method object.

The one place that knows which config keys each method takes, so the training
loop, the evaluation commands and the profilers build methods the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from iecl.kernels.view_prep import ViewPrep
from iecl.model.encoder import Encoder
from iecl.model.methods import Method, build_method
from iecl.pipeline.augment import get_recipe
from iecl.pipeline.spec import BatchPlan, DaliOptions, LoaderSpec
from iecl.pipeline.views import MEAN_255, STD_255
from iecl.train import checkpoint as ckpt
from iecl.train.config import (
    Config,
    ConfigError,
    apply,
    hyper_keys,
    resolve_method_defaults,
)
from iecl.train.step import DTYPES


def method_kwargs(cfg: Config) -> dict:
    """`build_method`'s arguments for `cfg` (the method's defaults filled in):
    the shared parts' sizes, and each field of the method's `Hyper` from the
    config key of the same name (method.<field>, else model.<field>)."""
    resolve_method_defaults(cfg)
    m = cfg.model
    kwargs = {
        "backbone": m.backbone,
        "spectral_norm": m.spectral_norm,
        "projector_hidden": m.projector_hidden,
        "projector_out": m.projector_out,
        "batch_size": cfg.train.batch_size,
        "image_size": cfg.data.image_size,
        "saib": cfg.saib.enabled,
        "patch_size": cfg.saib.patch_size,
        "saib_weight_decay": cfg.saib.weight_decay,
        "saib_impl": cfg.kernels.saib_impl,
    }
    for key in hyper_keys(cfg.method.name):
        kwargs[key] = getattr(cfg.method, key) if hasattr(cfg.method, key) else getattr(cfg.model, key)
    return kwargs


def method_from_config(cfg: Config) -> Method:
    method = build_method(cfg.method.name, **method_kwargs(cfg))
    # The step's view preparation: the configured kernel, writing the autocast dtype
    # (a config whose precision is not yet resolved, as in evaluation, gets fp32).
    method.prepare = ViewPrep(cfg.kernels.view_prep, MEAN_255, STD_255, DTYPES.get(cfg.train.precision, torch.float32))
    configure_encoders(method, cfg)
    return method


def configure_encoders(method: Method, cfg: Config) -> None:
    """The model.* keys that change how each encoder computes, not what it holds
    (no state_dict key depends on them, so a checkpoint loads under any setting)."""
    for encoder in method.encoders().values():
        if isinstance(encoder, Encoder):
            encoder.spectral_batched = cfg.model.spectral_batched
            encoder.stem_pad_channels = cfg.model.stem_pad_channels
            encoder.fused_views = cfg.model.fused_views


def load_backbone(path: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A pretrained checkpoint's backbone as a plain ResNet (no spectral-norm
    parametrisations: W / sigma folded into the weights), in eval mode: the
    same features as the checkpoint's encoder trunk, with no iecl method around it."""
    from iecl.model.resnet import build_backbone, plain_state_dict

    method, cfg, _ = load_pretrained(path, "cpu")
    plain = build_backbone(cfg.model.backbone, spectral_norm=False)
    plain.load_state_dict(plain_state_dict(method.backbone()))
    return plain.to(device).eval()


def eval_runtime(choice: str) -> tuple[torch.device, torch.dtype | None]:
    """An evaluation command's --device (auto|cpu|cuda) -> (device, autocast
    dtype or None): bf16 autocast on GPUs that have it, fp32 elsewhere."""
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        raise ConfigError("--device cuda but no CUDA device is available; use --device cpu")
    device = torch.device("cuda" if choice == "cuda" or (choice == "auto" and cuda) else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return device, dtype


def load_pretrained(path: str | Path, device: torch.device | str = "cpu") -> tuple[Method, Config, dict]:
    """A checkpoint (a file, or a run folder holding last.pt) -> (method with its
    weights, on `device`, in eval mode; its config; the raw checkpoint dict).
    SAIB is built with the reference implementation: evaluation never runs it."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    state = ckpt.load(path)
    cfg = apply(Config(), state["config"], str(path))
    cfg.kernels.saib_impl = "reference"
    method = method_from_config(cfg)
    try:
        method.load_state_dict(state["method"])
    except RuntimeError as err:
        raise ckpt.CheckpointError(f"{path}: the weights do not fit the model its config describes: {err}") from None
    return method.to(device).eval(), cfg, state


def loader_spec(cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1) -> LoaderSpec:
    """The loader of `cfg`: data.* and dali.*, this rank's shard."""
    d = cfg.data
    plan = BatchPlan(get_recipe(d.recipe, d.crop_scale), cfg.train.batch_size, d.image_size, cfg.run.seed, d.workers,
                     device, rank, world_size)
    x = cfg.dali
    dali = DaliOptions(x.arithmetic_contrast, x.exact_hue, x.hw_decoder_load, x.device_memory_padding,
                       x.host_memory_padding, x.preallocate_width_hint, x.preallocate_height_hint, x.threads,
                       x.prefetch, x.exec_dynamic, x.index_cache or None)
    return LoaderSpec(d.backend, plan, d.decode, dali)

"""The one configuration object: typed sections, defaults = the `smoke` run.

Sources, later ones winning: the defaults below, a YAML file (`--config`, a
path or a shipped name such as `imagenet_r50`), then `section.key=value`
overrides from the command line. Every key is checked: an unknown key or a
value of the wrong type is a `ConfigError` naming the key, and `validate`
refuses combinations that cannot run, saying what to change. The resolved
config (devices and precisions decided) is written to each run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import shutil
import subprocess
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from iecl.pipeline.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(UserError, ValueError):
    """A key, value or combination the configuration refuses."""


@dataclass(frozen=True)
class OneOf:
    """A string key whose values are a registry's names, read from the registry
    itself (so no list is restated here): `Annotated[str, OneOf("module", "NAME")]`."""

    module: str
    attribute: str

    def names(self) -> list[str]:
        import importlib

        return list(getattr(importlib.import_module(self.module), self.attribute))


@dataclass(frozen=True)
class Range:
    """The values a numeric key takes: `Annotated[float, Range(0, 1, hi_open=True)]`.
    Every int and float key has one (a test checks), so a value outside what the
    code can run (a negative seed, an lr of 1e300, a NaN lambda) is refused when
    it is read, naming the key, instead of failing steps later."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    says: str = ""  # how the message words it ("positive", "in [0, 1)"); derived if empty

    def check(self, key: str, value: float) -> None:
        below = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        above = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if below or above:
            raise ConfigError(f"{key} must be {self.says or self._describe()}, got {value!r}")

    def _describe(self) -> str:
        if self.hi is None:
            return f"{'more than' if self.lo_open else 'at least'} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


#: Most counts could be any non-negative integer; the cap keeps them in the
#: int64 range every tensor and file offset they reach can hold.
_BIG = 2**62
COUNT = Range(0, _BIG, says="0 or more")
POSITIVE_INT = Range(1, _BIG, says="positive")
SEED = Range(0, 2**32 - 1, says="in [0, 4294967295] (the range NumPy's generators take)")
UNIT = Range(0, 1, hi_open=True, says="in [0, 1)")
STEM_PAD = "0 (off), 4 or 8"


BACKENDS = OneOf("iecl.pipeline", "BACKENDS")
RECIPES = OneOf("iecl.pipeline.augment", "RECIPES")
BACKBONES = OneOf("iecl.model.resnet", "BACKBONES")
METHODS = OneOf("iecl.model.methods", "METHODS")
ENTROPY_ESTIMATORS = OneOf("iecl.model.losses.entropy", "ENTROPY_ESTIMATORS")
SAIB_IMPLS = OneOf("iecl.model.saib", "IMPLS")
VIEW_PREP_IMPLS = OneOf("iecl.kernels.view_prep", "IMPLS")


@dataclass
class RunConfig:
    name: str = ""  # "" -> "<method>-<backbone>"; a timestamp is appended
    out_dir: str = "runs"
    seed: Annotated[int, SEED] = 42


@dataclass
class DataConfig:
    backend: Annotated[str, BACKENDS] = "pil"
    root: str = ""  # folder, file list, tar shard(s), or .beton (ffcv); "" -> synthetic, made once and reused
    synthetic_images: Annotated[int, POSITIVE_INT] = 512
    synthetic_classes: Annotated[int, Range(1, 1_000_000, says="in [1, 1000000]")] = 8
    synthetic_cache: str = "~/.cache/iecl"
    image_size: Annotated[int, Range(32, 8192, says="at least 32 (and at most 8192)")] = 64  # side of both square views
    recipe: Annotated[str, RECIPES] | None = None  # None -> the method's own (Method.recipe)
    crop_scale: tuple[Annotated[float, Range(0, 1, lo_open=True)], Annotated[float, Range(0, 1, lo_open=True)]] | None = None  # None -> the recipe's own
    workers: Annotated[int, Range(0, 4096, says="0 or more")] = 2
    decode: Literal["shared", "window"] = "shared"  # dali: one full decode per image, or a windowed decode per view
    max_bad_images: Annotated[int, COUNT] = 100  # unreadable images replaced (and reported) before a run gives up


@dataclass
class DaliConfig:
    """data.backend=dali: how its graph computes two colour adjustments
    (pipeline.spec.DaliOptions says what each costs and how close it is to PIL)."""

    arithmetic_contrast: bool | None = None  # contrast as device arithmetic; None -> on GPUs only
    exact_hue: bool = True  # PIL's HSV hue shift (True) or DALI's faster YIQ rotation (False)
    # nvJPEG (GPU decode only): DALI's hardware-decoder share, the reference RN50 pipeline's buffers
    hw_decoder_load: Annotated[float, Range(0, 1)] = 0.65
    device_memory_padding: Annotated[int, COUNT] = 211_025_920  # bytes per thread
    host_memory_padding: Annotated[int, COUNT] = 140_544_512  # bytes per thread
    preallocate_width_hint: Annotated[int, COUNT] = 5980
    preallocate_height_hint: Annotated[int, COUNT] = 6430
    threads: Annotated[int, Range(1, 4096, says="positive")] | None = None  # None -> this rank's share of the cores
    prefetch: Annotated[int, Range(1, 64, says="in [1, 64]")] = 2  # batches prepared ahead
    exec_dynamic: bool = False  # DALI's dynamic executor (unmeasured, so off)
    index_cache: str = "~/.cache/iecl/index"  # image sizes and readability, one full decode per file; "" -> not kept


@dataclass
class ModelConfig:
    backbone: Annotated[str, BACKBONES] = "resnet18"
    spectral_norm: bool | None = None  # None -> the method's own: true for iecl (entropy preservation), else false
    spectral_batched: bool = True  # one power iteration for all convs at once (model/spectral.py), or conv by conv
    stem_pad_channels: Annotated[int, Range(0, 8, says=STEM_PAD)] = 0  # 0, 4 or 8: the stem's 3 input channels zero-padded (model/encoder.py)
    fused_views: bool = False  # both views in one encoder call, BatchNorm statistics per view (model/view_norm.py)
    projector_hidden: Annotated[int, Range(1, 1 << 20, says="positive")] = 512
    projector_out: Annotated[int, Range(1, 1 << 20, says="positive")] = 128
    predictor_hidden: Annotated[int, Range(1, 1 << 20, says="positive")] | None = None  # byol, simsiam: predictor MLP width; None -> the method's own


@dataclass
class MethodConfig:
    """`name`, then every method's own hyperparameters; None -> the method's
    own value (its `Hyper`, filled in by `resolve_method_defaults`). A key the
    method does not take is ignored, with a warning."""

    name: Annotated[str, METHODS] = "iecl"
    momentum: Annotated[float, UNIT] | None = None  # EMA of the target encoder; byol: its start (cosine schedule to 1)
    tau: Annotated[float, Range(0, 1e3, lo_open=True, says="positive (and at most 1000)")] | None = None  # temperature of the contrastive loss
    queue_size: Annotated[int, Range(1, 1 << 40, says="positive")] | None = None  # mocov2: negatives kept from earlier batches
    symmetric: bool | None = None  # mocov2: both directions (each key enqueued once); its paper uses one
    lambda_entropy: Annotated[float, Range(0, 1e6, says="0 or more")] | None = None  # iecl: lambda
    beta_kl: Annotated[float, Range(0, 1e6, says="0 or more")] | None = None  # iecl: beta
    entropy: Annotated[str, ENTROPY_ESTIMATORS] | None = None  # iecl: the entropy estimator
    coding_rate_eps: Annotated[float, Range(0, 1e6, lo_open=True, says="positive")] | None = None  # iecl: eps of the coding-rate estimator


@dataclass
class SAIBConfig:
    enabled: bool = True
    patch_size: Annotated[int, Range(1, 8192, says="positive")] = 16
    weight_decay: Annotated[float, Range(0, 1e3, says="0 or more")] = 1e-4  # gamma


@dataclass
class KernelsConfig:
    # reference: PyTorch; triton: the fused kernels (falls back to the reference,
    # with one warning, where Triton cannot run); compile: torch.compile of the reference
    saib_impl: Annotated[str, SAIB_IMPLS] = "reference"
    view_prep: Annotated[str, VIEW_PREP_IMPLS] = "reference"


@dataclass
class OptimConfig:
    name: Literal["adamw", "lars", "sgd"] = "adamw"
    lr: Annotated[float, Range(0, 1e3, lo_open=True, says="positive (and at most 1000)")] = 4e-3  # per 256 images when lr_scaling is linear
    lr_scaling: Literal["linear", "none"] = "linear"
    weight_decay: Annotated[float, Range(0, 1e3, says="0 or more")] = 1e-5
    betas: tuple[Annotated[float, UNIT], Annotated[float, UNIT]] = (0.9, 0.999)  # LARS and SGD use betas[0] as their momentum
    warmup_epochs: Annotated[float, Range(0, 1e6, says="0 or more")] = 0.5
    min_lr_ratio: Annotated[float, Range(0, 1)] = 0.0  # cosine ends at lr * min_lr_ratio
    impl: Literal["auto", "torch", "apex"] = "auto"


@dataclass
class EvalConfig:
    diagnostics: bool = True  # effective rank, Renyi-2 entropy, InfoNCE MI bound of each logged step
    knn_every: Annotated[int, Range(0, _BIG, says="0 (off) or positive")] = 0  # epochs between kNN monitor evaluations (0: off); also run at the end when on
    knn_data: str = ""  # labelled data: a folder with train/ and val/, or one split by val_fraction; "" -> data.root
    knn_k: Annotated[int, POSITIVE_INT] = 200
    knn_tau: Annotated[float, Range(0, 1e3, lo_open=True, says="positive")] = 0.1
    knn_max_images: Annotated[int, Range(0, _BIG, says="0 (all) or positive")] = 20000  # cap on the monitor's train-set images (a fixed random subset); 0: all
    val_fraction: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.1  # held out for validation when the data has no train/ and val/ folders


@dataclass
class TrainConfig:
    batch_size: Annotated[int, Range(2, 1 << 20, says="at least 2 (in-batch negatives)")] = 32  # per device
    epochs: Annotated[int, Range(1, 1 << 30, says="at least 1")] = 3
    max_steps: Annotated[int, Range(0, _BIG, says="0 (no limit) or positive")] = 0  # 0: no limit; otherwise stop (and end the schedule) there
    device: Literal["auto", "cuda", "cpu"] = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"  # torch.compile's mode
    compile_cache_dir: str = ""  # where the FX graph, AOTAutograd and Triton caches live; "" -> torch's own place
    channels_last: bool = True
    log_every: Annotated[int, POSITIVE_INT] = 4  # steps
    checkpoint_every: Annotated[int, Range(0, _BIG, says="0 (only at the end) or positive")] = 100  # steps between last.pt writes; also written at the end and on a stop
    keep_checkpoints: Annotated[int, COUNT] = 0  # periodic snapshots step-<N>.pt kept besides last.pt (0: none)
    max_nonfinite: Annotated[int, COUNT] = 10  # consecutive steps with a non-finite loss skipped before the run stops
    sync_bn: bool = False  # under torchrun: the encoders' BatchNorms normalise over the global batch (GPUs)
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"  # under torchrun; auto: nccl on GPUs, gloo on CPUs

    def compile_options(self) -> dict:
        """`Method.compile_encoders`' arguments from compile_mode and compile_cache_dir."""
        return {"mode": self.compile_mode, "cache_dir": self.compile_cache_dir}


@dataclass
class LogConfig:
    """Where logged rows go besides metrics.jsonl and TensorBoard (always written)."""

    wandb: bool = False  # also Weights & Biases (pip install wandb)
    wandb_project: str = "iecl"
    wandb_name: str = ""  # "" -> the run folder's name
    wandb_mode: Literal["online", "offline"] = "online"  # offline: a local record under the run folder; `wandb sync` later


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dali: DaliConfig = field(default_factory=DaliConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    saib: SAIBConfig = field(default_factory=SAIBConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- type checking


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        return _coerce(key, value, next(a for a in args if a is not type(None)))
    if origin is Annotated:
        base, *metadata = args
        value = _coerce(key, value, base)
        for check in metadata:
            if isinstance(check, OneOf) and value not in check.names():
                raise ConfigError(f"{key}: {value!r} is not one of {', '.join(check.names())}")
            if isinstance(check, Range):
                check.check(key, value)
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            raise ConfigError(f"{key}: expected a finite number, got {value!r}") from None
        if not math.isfinite(value):  # .inf, .nan: no key means "unbounded" or "undefined"
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {annotation!r}")


def _fields(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _unknown(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _all_keys() -> list[str]:
    return [f"{s}.{k}" for s, cls in _fields(Config).items() for k in _fields(cls)]


def apply(cfg: Config, updates: dict, source: str = "") -> Config:
    """Apply a nested {section: {key: value}} mapping onto `cfg`, checking every key."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{source or 'config'}: expected a mapping of sections, got {type(updates).__name__}")
    sections = _fields(Config)
    for section, values in updates.items():
        if section not in sections:
            raise _unknown(str(section), list(sections))
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
        target, types = getattr(cfg, section), _fields(sections[section])
        for key, value in values.items():
            full = f"{section}.{key}"
            if key not in types:
                raise _unknown(full, _all_keys())
            setattr(target, key, _coerce(full, value, types[key]))
    return cfg


def parse_override(text: str) -> dict:
    """'train.batch_size=64' -> {'train': {'batch_size': 64}} (value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. train.batch_size=64")
    section, _, name = key.strip().partition(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return {section: {name: value}}


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a shipped config ({', '.join(names)})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain
    YAML keeps the last silently, so a setting would vanish without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
    return data or {}


def load_config(config: str | None = None, overrides: list[str] = ()) -> Config:
    cfg = Config()
    if config:
        path = resolve_config_path(config)
        apply(cfg, load_yaml(path), str(path))
    for text in overrides:
        apply(cfg, parse_override(text), text)
    return cfg


# ---------------------------------------------------------------- validation


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _method_class(name: str):
    from iecl.model.methods import method_class

    return method_class(name)


def hyper_keys(name: str) -> list[str]:
    """The config keys method `name` takes besides the shared ones: the fields
    of its `Hyper` (each is method.<field>, or model.<field>)."""
    return [f.name for f in dataclasses.fields(_method_class(name).Hyper)]


def _section_of(cfg: Config, key: str):
    return cfg.method if hasattr(cfg.method, key) else cfg.model


def resolve_method_defaults(cfg: Config) -> Config:
    """Fill every `None` that means "the method's own value": its `Hyper`'s
    fields, its spectral-norm choice and its augmentation recipe."""
    cls = _method_class(cfg.method.name)
    for f in dataclasses.fields(cls.Hyper):
        section = _section_of(cfg, f.name)
        if getattr(section, f.name) is None:
            setattr(section, f.name, f.default)
    if cfg.model.spectral_norm is None:
        cfg.model.spectral_norm = cls.spectral_norm
    if cfg.data.recipe is None:
        cfg.data.recipe = cls.recipe
    return cfg


def method_own_values() -> list[str]:
    """Overrides that hand every method-specific key back to the method (null),
    for commands that run several methods from one config (iecl compare)."""
    keys = [f"method.{k}" for k in _fields(MethodConfig) if k != "name"]
    return [f"{k}=null" for k in (*keys, "model.predictor_hidden", "model.spectral_norm", "data.recipe")]


def unused_method_keys(cfg: Config) -> list[str]:
    """Method keys set to a value although `method.name` does not take them."""
    taken = set(hyper_keys(cfg.method.name))
    candidates = [f"method.{k}" for k in _fields(MethodConfig) if k != "name"] + ["model.predictor_hidden"]
    return [key for key in candidates
            if key.split(".")[1] not in taken and getattr(_section_of(cfg, key.split(".")[1]), key.split(".")[1]) is not None]


def validate(cfg: Config, world_size: int = 1) -> Config:
    """Fill in the method's defaults, then refuse settings that cannot run,
    before anything is written. `world_size`: the ranks of a torchrun launch.

    `train.batch_size` is per rank (SAIB's channels are the rank's own batch)
    and there is no global-batch key, so no batch has to divide by the world
    size; the global batch is batch_size x world_size."""
    resolve_method_defaults(cfg)
    _check_values(cfg)
    d, t, s = cfg.data, cfg.train, cfg.saib
    name = cfg.run.name
    _require(name == "" or (name not in (".", "..") and Path(name).name == name and "\\" not in name and "\0" not in name),
             f"run.name must be one folder name (no path separators, not . or ..), got {name!r}; "
             "put the folder's location in run.out_dir")
    if d.root.endswith(".beton"):
        _require(d.backend == "ffcv", f"data.root {d.root} is an FFCV file: set data.backend=ffcv")
    elif d.root and d.backend == "ffcv":
        _require(
            False,
            f"data.backend=ffcv reads .beton files; convert {d.root} first (iecl convert {d.root} OUT.beton) "
            "and set data.root=OUT.beton",
        )
    _require(cfg.model.stem_pad_channels in (0, 4, 8),
             f"model.stem_pad_channels must be {STEM_PAD}, got {cfg.model.stem_pad_channels}")
    cache = Path(t.compile_cache_dir).expanduser()
    _require(not t.compile_cache_dir or cache.is_dir() or not cache.exists(),
             f"train.compile_cache_dir {t.compile_cache_dir} is a file; name a folder (made if missing) or \"\"")
    if d.crop_scale is not None:
        lo, hi = d.crop_scale
        _require(0 < lo <= hi <= 1, f"data.crop_scale must satisfy 0 < min <= max <= 1, got {list(d.crop_scale)}")
    if not d.root:
        per_ranks = f" x {world_size} ranks" if world_size > 1 else ""
        _require(
            d.synthetic_images >= t.batch_size * world_size,
            f"data.synthetic_images ({d.synthetic_images}) must be at least train.batch_size ({t.batch_size})"
            f"{per_ranks}",
        )
    if s.enabled:
        _require(
            cfg.kernels.saib_impl != "triton" or s.patch_size % 4 == 0,
            f"kernels.saib_impl=triton takes saib.patch_size in multiples of 4 (a row tile of its GEMMs stays inside "
            f"one patch), got {s.patch_size}; use another patch size or kernels.saib_impl=reference",
        )
        _require(
            d.image_size % s.patch_size == 0,
            f"saib.patch_size {s.patch_size} must divide data.image_size {d.image_size}; "
            f"try saib.patch_size={_largest_divisor(d.image_size, s.patch_size)}",
        )
    return cfg


def _check_values(cfg: Config) -> None:
    """Every value through its key's type and range again: values set in code
    (and the methods' own defaults) get the same checks as those read from YAML."""
    for section, cls in _fields(Config).items():
        for key, annotation in _fields(cls).items():
            _coerce(f"{section}.{key}", getattr(getattr(cfg, section), key), annotation)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(k for k in range(1, at_most + 1) if n % k == 0)


def resolve_runtime(cfg: Config, cuda_available: bool, bf16_supported: bool, world_size: int | None = None) -> Config:
    """Decide `auto` device and precision, and refuse what this machine cannot do.
    `world_size`: the ranks of a torchrun launch, None for a plain single-process run."""
    t = cfg.train
    if t.device == "auto":
        t.device = "cuda" if cuda_available else "cpu"
    _require(t.device != "cuda" or cuda_available, "train.device=cuda but no CUDA device is available; use train.device=cpu")
    if t.precision == "auto":
        t.precision = "bf16" if t.device == "cuda" and bf16_supported else "fp32"
    _require(
        not (t.precision == "fp16" and t.device == "cpu"),
        "train.precision=fp16 needs a GPU (CPU autocast has no fp16 path worth using); use bf16 or fp32",
    )
    _require(
        not (t.precision == "bf16" and t.device == "cuda" and not bf16_supported),
        "this GPU has no bf16 support; use train.precision=fp16",
    )
    if t.compile:
        _require(_compiler_available(t.device), _NO_COMPILER[t.device].format(cxx=inductor_cxx()))
    if cfg.log.wandb:
        import importlib.util

        _require(importlib.util.find_spec("wandb") is not None,
                 "log.wandb=true needs Weights & Biases: pip install wandb (or pip install -e '.[wandb]'); "
                 "or set log.wandb=false")
    if cfg.optim.impl == "apex":
        _require(t.device == "cuda", "optim.impl=apex needs a GPU; use optim.impl=torch")
    if world_size is not None:  # a torchrun launch
        _require(
            not (t.dist_backend == "nccl" and t.device != "cuda"),
            "train.dist_backend=nccl needs CUDA devices (train.device=cuda); use train.dist_backend=gloo or auto on CPUs",
        )
        _require(
            not (t.sync_bn and t.device != "cuda"),
            "train.sync_bn=true needs GPUs (PyTorch's SyncBatchNorm has no CPU implementation); "
            "set train.sync_bn=false",
        )
    return cfg


def runtime_warnings(cfg: Config, world_size: int | None) -> list[str]:
    """Settings that run but do not do what they say here."""
    found = []
    if cfg.train.sync_bn and world_size is None:
        found.append("train.sync_bn=true has no effect in a single process (SyncBatchNorm synchronises the ranks "
                     "of a torchrun launch); the encoders keep their ordinary BatchNorm")
    unused = unused_method_keys(cfg)
    if unused:
        found.append(f"{', '.join(unused)}: not used by method.name={cfg.method.name} "
                     f"(it takes {', '.join(hyper_keys(cfg.method.name))}); ignored")
    return found


_NO_COMPILER = {
    "cpu": "train.compile=true on a CPU needs the C++ compiler torch.compile calls: {cxx} was not found "
           "(install g++ or set CXX to a C++ compiler); or set train.compile=false",
    "cuda": "train.compile=true on a GPU needs Triton (pip install triton); or set train.compile=false",
}


def inductor_cxx() -> str:
    """The C++ compiler torch.compile's CPU backend (Inductor) runs: $CXX, else
    g++ (clang++ on macOS), as `torch._inductor.config.cpp.cxx` decides."""
    return os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")


def _compiler_available(device: str) -> bool:
    if device == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    cxx = shutil.which(inductor_cxx())
    if cxx is None:
        return False
    try:  # what Inductor itself runs to accept a compiler
        return subprocess.run([cxx, "--version"], capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

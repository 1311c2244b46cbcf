"""Configuration (train/config.py): typed, validated, one error line per mistake."""

from __future__ import annotations

import shutil

import pytest
import yaml

from iecl.train.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    apply,
    dump_yaml,
    hyper_keys,
    inductor_cxx,
    load_config,
    method_own_values,
    parse_override,
    resolve_runtime,
    runtime_warnings,
    unused_method_keys,
    validate,
)


def _keys(cfg: Config) -> set[str]:
    return {f"{s}.{k}" for s, section in cfg.to_dict().items() for k in section}


def test_smoke_config_is_the_default_and_lists_every_key():
    assert load_config("smoke") == Config()
    listed = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())
    assert {f"{s}.{k}" for s, section in listed.items() for k in section} == _keys(Config())


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_shipped_configs_load_and_validate(name):
    cfg = validate(load_config(name))
    assert cfg.method.name == {"mocov2_r50": "mocov2", "simclr_r50": "simclr", "byol_r50": "byol",
                               "simsiam_r50": "simsiam"}.get(name, "iecl")
    assert cfg.method.name == "iecl" or not cfg.saib.enabled  # baselines ship as published; SAIB is opt-in


@pytest.mark.parametrize("name,expected", [
    # each baseline's own paper (README lists the sources)
    ("mocov2_r50", {"method.momentum": 0.999, "method.tau": 0.2, "method.queue_size": 65536, "optim.name": "sgd",
                    "optim.lr": 0.03, "optim.weight_decay": 1e-4, "model.projector_out": 128,
                    "data.recipe": "mocov2"}),
    ("simclr_r50", {"method.tau": 0.1, "optim.name": "lars", "optim.lr": 0.3, "optim.weight_decay": 1e-6,
                    "model.projector_hidden": 2048, "model.projector_out": 128, "data.recipe": "simclr"}),
    ("byol_r50", {"method.momentum": 0.99, "optim.name": "lars", "optim.lr": 0.2, "optim.weight_decay": 1.5e-6,
                  "model.projector_hidden": 4096, "model.projector_out": 256, "model.predictor_hidden": 4096,
                  "data.recipe": "byol"}),
    ("simsiam_r50", {"optim.name": "sgd", "optim.lr": 0.05, "optim.weight_decay": 1e-4,
                     "model.projector_out": 2048, "model.predictor_hidden": 512, "data.recipe": "mocov2"}),
])
def test_baseline_configs_carry_their_papers_hyperparameters(name, expected):
    cfg = validate(load_config(name))
    for key, value in expected.items():
        section, field = key.split(".")
        assert getattr(getattr(cfg, section), field) == value, key
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.model.spectral_norm) == (256, 200, False)


@pytest.mark.parametrize("method,expected", [
    ("iecl", (0.9, 0.2, None, "mocov2")),
    ("mocov2", (0.999, 0.2, None, "mocov2")),
    ("simclr", (None, 0.1, None, "simclr")),
    ("byol", (0.99, None, 4096, "byol")),
    ("simsiam", (None, None, 512, "mocov2")),
])
def test_null_means_the_methods_own_default(method, expected):
    cfg = validate(load_config(None, [f"method.name={method}"]))
    assert (cfg.method.momentum, cfg.method.tau, cfg.model.predictor_hidden, cfg.data.recipe) == expected
    assert cfg.model.spectral_norm is (method == "iecl")


def test_an_explicit_value_beats_the_methods_default():
    cfg = validate(load_config(None, ["method.name=byol", "method.momentum=0.996", "data.recipe=simclr"]))
    assert (cfg.method.momentum, cfg.data.recipe) == (0.996, "simclr")


def test_imagenet_configs_carry_the_paper_hyperparameters():
    for name, backbone in [("imagenet_r50", "resnet50"), ("imagenet_r18", "resnet18")]:
        cfg = load_config(name)
        assert cfg.model.backbone == backbone
        assert (cfg.train.batch_size, cfg.optim.lr, cfg.optim.weight_decay) == (256, 0.3, 1e-5)
        assert (cfg.method.lambda_entropy, cfg.method.beta_kl, cfg.saib.weight_decay) == (0.2, 0.09, 1e-4)
        assert (cfg.model.projector_hidden, cfg.model.projector_out, cfg.run.seed) == (4096, 512, 42)
        assert cfg.method.momentum == 0.9 and cfg.data.image_size == 224 and cfg.saib.patch_size == 16


def test_overrides_are_typed():
    cfg = load_config(None, ["train.batch_size=64", "optim.lr=1e-4", "data.crop_scale=[0.3, 1]", "train.compile=true"])
    assert cfg.train.batch_size == 64 and isinstance(cfg.train.batch_size, int)
    assert cfg.optim.lr == 1e-4  # YAML 1.1 reads "1e-4" as a string; the float field converts it
    assert cfg.data.crop_scale == (0.3, 1.0)
    assert cfg.train.compile is True


@pytest.mark.parametrize("override,message", [
    ("train.batchsize=64", "unknown config key 'train.batchsize' (did you mean 'train.batch_size'?)"),
    ("trian.epochs=3", "unknown config key 'trian'"),
    ("train.batch_size=abc", "train.batch_size: expected an integer, got 'abc'"),
    ("train.batch_size=3.5", "train.batch_size: expected an integer"),
    ("train.compile=maybe", "train.compile: expected true or false"),
    ("model.backbone=vit", "model.backbone: 'vit' is not one of resnet18, resnet50"),
    ("data.crop_scale=[0.2]", "data.crop_scale: expected a list of 2 values"),
    ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
    ("batch_size=3", "must look like section.key=value"),
])
def test_bad_keys_and_types_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_unknown_key_in_a_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 2\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.lerning_rate'"):
        load_config(str(path))


def test_missing_config_file_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="imagenet_r50"):
        load_config("no_such_config")


@pytest.mark.parametrize("override,message", [
    ("saib.patch_size=12", "saib.patch_size 12 must divide data.image_size 64; try saib.patch_size=8"),
    ("train.batch_size=1", "train.batch_size must be at least 2"),
    ("data.crop_scale=[0.9, 0.5]", "data.crop_scale must satisfy"),
    ("method.momentum=1.0", "method.momentum must be in [0, 1), got 1.0"),
    ("method.queue_size=0", "method.queue_size must be positive"),
    ("eval.val_fraction=1.0", "eval.val_fraction must be in (0, 1), got 1.0"),
    ("eval.knn_every=-1", "eval.knn_every must be 0 (off) or positive"),
    ("data.synthetic_images=16", "data.synthetic_images (16) must be at least train.batch_size (32)"),
    ("model.stem_pad_channels=5", "model.stem_pad_channels must be 0 (off), 4 or 8, got 5"),
    ("model.stem_pad_channels=16", "model.stem_pad_channels must be 0 (off), 4 or 8, got 16"),
    ("model.stem_pad_channels=-4", "model.stem_pad_channels must be 0 (off), 4 or 8, got -4"),
    ("train.compile_mode=fast", ("train.compile_mode: 'fast' is not one of default, reduce-overhead, max-autotune, "
                                 "max-autotune-no-cudagraphs")),
    ("train.compile_cache_dir=3", "train.compile_cache_dir: expected a string, got 3"),
])
def test_invalid_combinations_are_refused(override, message):
    with pytest.raises(ConfigError) as err:
        validate(load_config(None, [override]))
    assert message in str(err.value)


def test_runtime_resolution_and_refusals():
    cfg = resolve_runtime(validate(Config()), cuda_available=False, bf16_supported=False)
    assert (cfg.train.device, cfg.train.precision) == ("cpu", "fp32")
    cfg = resolve_runtime(validate(Config()), cuda_available=True, bf16_supported=True)
    assert (cfg.train.device, cfg.train.precision) == ("cuda", "bf16")
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_runtime(load_config(None, ["train.precision=fp16"]), False, False)
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_runtime(load_config(None, ["train.device=cuda"]), False, False)


@pytest.mark.parametrize("overrides,world,message", [
    (["train.dist_backend=nccl"], 2, ("train.dist_backend=nccl needs CUDA devices (train.device=cuda); use "
                                     "train.dist_backend=gloo or auto on CPUs")),
    (["train.sync_bn=true"], 2, ("train.sync_bn=true needs GPUs (PyTorch's SyncBatchNorm has no CPU implementation); "
                                "set train.sync_bn=false")),
    (["train.sync_bn=true"], 1, "train.sync_bn=true needs GPUs"),  # torchrun with one process is still a launch
])
def test_launch_refusals_on_a_cpu(overrides, world, message):
    cfg = validate(load_config(None, overrides), world)
    with pytest.raises(ConfigError) as err:
        resolve_runtime(cfg, cuda_available=False, bf16_supported=False, world_size=world)
    assert message in str(err.value)


def test_launch_settings_on_gpus_and_without_a_launch():
    for overrides in (["train.dist_backend=nccl", "train.sync_bn=true"], ["train.dist_backend=gloo"]):
        cfg = resolve_runtime(validate(load_config(None, overrides), 8), True, True, world_size=8)
        assert cfg.train.device == "cuda" and runtime_warnings(cfg, 8) == []
    # Without torchrun the launch keys do nothing: nccl is not refused on a CPU, sync_bn only warned about.
    cfg = resolve_runtime(validate(load_config(None, ["train.dist_backend=nccl", "train.sync_bn=true"])), False, False)
    (warning,) = runtime_warnings(cfg, None)
    assert "train.sync_bn=true has no effect in a single process" in warning


def test_the_dataset_must_fill_a_global_batch():
    validate(load_config(None, ["data.synthetic_images=64"]), world_size=2)  # 32 per rank x 2
    with pytest.raises(ConfigError, match=r"data.synthetic_images \(64\) must be at least train.batch_size \(32\) x 4 ranks"):
        validate(load_config(None, ["data.synthetic_images=64"]), world_size=4)


def test_compile_without_a_compiler_is_refused(monkeypatch, tmp_path):
    missing = str(tmp_path / "no-such-c++")
    monkeypatch.setenv("CXX", missing)
    with pytest.raises(ConfigError) as err:
        resolve_runtime(load_config(None, ["train.compile=true"]), False, False)
    assert f"train.compile=true on a CPU needs the C++ compiler torch.compile calls: {missing} was not found" in str(err.value)
    broken = tmp_path / "broken-c++"  # found, but not a working compiler
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    with pytest.raises(ConfigError, match="train.compile=true on a CPU needs"):
        resolve_runtime(load_config(None, ["train.compile=true"]), False, False)
    monkeypatch.delenv("CXX")
    if shutil.which(inductor_cxx()) is None:
        pytest.skip(f"{inductor_cxx()} is not installed: the accepting case cannot run here")
    assert resolve_runtime(load_config(None, ["train.compile=true"]), False, False).train.compile


def test_resolved_config_round_trips_through_yaml():
    """What a run directory's config.yaml holds loads back to the same config
    (and every field's type is one the checker understands)."""
    cfg = load_config("imagenet_r50", ["data.crop_scale=[0.3, 0.9]"])
    assert apply(Config(), yaml.safe_load(dump_yaml(cfg))) == cfg


def test_parse_override_reads_yaml_values():
    assert parse_override("data.root=/a/b") == {"data": {"root": "/a/b"}}
    assert parse_override("data.crop_scale=null") == {"data": {"crop_scale": None}}


def test_names_are_checked_against_the_registries_themselves():
    from iecl.model.methods import METHODS
    from iecl.model.resnet import BACKBONES
    from iecl.pipeline import BACKENDS

    for key, registry in (("method.name", METHODS), ("model.backbone", BACKBONES), ("data.backend", BACKENDS)):
        with pytest.raises(ConfigError, match=f"{key}: 'nope' is not one of {', '.join(registry)}"):
            load_config(None, [f"{key}=nope"])
    with pytest.raises(ConfigError, match="method.entropy: 'shannon' is not one of coding_rate, renyi2"):
        load_config(None, ["method.entropy=shannon"])
    with pytest.raises(ConfigError, match="kernels.saib_impl"):
        load_config(None, ["kernels.saib_impl=cuda"])


def test_each_method_fills_its_own_keys_and_unused_ones_are_named():
    from iecl.model.methods import METHODS

    for name, cls in METHODS.items():
        cfg = validate(load_config(None, [f"method.name={name}"]))
        for key in hyper_keys(name):
            section = cfg.method if hasattr(cfg.method, key) else cfg.model
            assert getattr(section, key) == getattr(cls.Hyper(), key), (name, key)
        assert cfg.model.spectral_norm is cls.spectral_norm and cfg.data.recipe == cls.recipe
        assert unused_method_keys(cfg) == []  # what the method does not take stays null
    cfg = validate(load_config("imagenet_r50", ["method.name=mocov2"]))  # IE-CL's lambda, beta, entropy set
    assert unused_method_keys(cfg) == ["method.lambda_entropy", "method.beta_kl", "method.entropy"]
    assert "not used by method.name=mocov2" in runtime_warnings(cfg, None)[0]
    assert cfg.method.momentum == 0.9  # a value the config sets explicitly is kept ...
    reset = validate(load_config("imagenet_r50", [*method_own_values(), "method.name=mocov2"]))
    assert reset.method.momentum == 0.999 and unused_method_keys(reset) == []  # ... unless handed back (compare)


@pytest.mark.parametrize("override,message", [
    ("optim.lr=.inf", "optim.lr: expected a finite number, got inf"),
    ("optim.weight_decay=.inf", "optim.weight_decay: expected a finite number, got inf"),
    ("method.lambda_entropy=.nan", "method.lambda_entropy: expected a finite number, got nan"),
    ("method.beta_kl=-0.5", "method.beta_kl must be 0 or more, got -0.5"),
    ("method.coding_rate_eps=.inf", "method.coding_rate_eps: expected a finite number"),
    ("optim.warmup_epochs=.inf", "optim.warmup_epochs: expected a finite number"),
    ("optim.lr=1e300", "optim.lr must be positive (and at most 1000), got 1e+300"),
    ("optim.lr=1" + "0" * 400, "optim.lr: expected a finite number"),  # an integer beyond any float
    ("run.seed=-1", "run.seed must be in [0, 4294967295]"),
    ("run.seed=18446744073709551616", "run.seed must be in [0, 4294967295]"),
    ("optim.betas=[0.9, 1.0]", "optim.betas[1] must be in [0, 1), got 1.0"),
    ("data.crop_scale=[0.0, 1.0]", "data.crop_scale[0] must be in (0, 1]"),
    ("train.epochs=0", "train.epochs must be at least 1"),
    ("data.image_size=100000", "data.image_size must be at least 32 (and at most 8192)"),
    ("run.name=../..", "run.name must be one folder name"),
    ("run.name=a/b", "run.name must be one folder name"),
    ("run.name=..", "run.name must be one folder name"),
])
def test_values_at_the_config_edge_are_refused(override, message):
    with pytest.raises(ConfigError) as err:
        validate(load_config(None, [override]))
    assert message in str(err.value)


def test_values_set_in_code_get_the_same_checks():
    cfg = Config()
    cfg.method.lambda_entropy = float("nan")
    with pytest.raises(ConfigError, match="method.lambda_entropy: expected a finite number"):
        validate(cfg)


def test_every_numeric_key_has_a_range():
    """A new int or float key without a `Range` would take any value unchecked."""
    import typing

    from iecl.train.config import Range, _fields

    def numeric_leaves(annotation):
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is typing.Annotated:
            base, *meta = args
            if base in (int, float):
                yield base, any(isinstance(m, Range) for m in meta)
                return
            yield from numeric_leaves(base)
        elif args:
            for a in args:
                yield from numeric_leaves(a)
        elif annotation in (int, float):
            yield annotation, False

    missing = [f"{section}.{key}" for section, cls in _fields(Config).items() for key, ann in _fields(cls).items()
               if any(not ranged for _, ranged in numeric_leaves(ann))]
    assert missing == []


def test_a_compile_cache_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(ConfigError, match=r"train.compile_cache_dir .*taken is a file; name a folder"):
        validate(load_config(None, [f"train.compile_cache_dir={tmp_path / 'taken'}"]))
    assert validate(load_config(None, [f"train.compile_cache_dir={tmp_path / 'new'}"]))  # made at the first compile


def test_config_files_with_duplicate_keys_or_not_utf8_are_refused(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  epochs: 2\n  batch_size: 16\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"key 'epochs' appears twice in one mapping \(line 4\)"):
        load_config(str(twice))
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(str(latin))


def test_the_triton_saib_takes_patch_sizes_in_multiples_of_four():
    with pytest.raises(ConfigError, match="kernels.saib_impl=triton takes saib.patch_size in multiples of 4"):
        validate(load_config(None, ["kernels.saib_impl=triton", "saib.patch_size=2"]))
    validate(load_config(None, ["kernels.saib_impl=triton", "saib.patch_size=8"]))

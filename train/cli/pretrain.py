"""`iecl pretrain` (and `python -m iecl.train`, which torchrun starts)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iecl.train.config import ConfigError

EXIT_ON_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}

PRETRAIN_HELP = """\
Pretrain an encoder with IE-CL (the default) or a baseline: method.name=mocov2,
simclr, byol or simsiam, each with saib.enabled=true or false (SAIB on the
query side of the contrastive methods, the target side of BYOL and SimSiam).

With no arguments this is the smoke run: a ResNet-18 on a small synthetic
ImageNet-style folder of JPEGs (made on first use under data.synthetic_cache,
then reused), about a minute on two CPU cores. For real runs, start from a
shipped config and override what differs:

  iecl pretrain --config imagenet_r50 data.root=/data/imagenet/train
  iecl pretrain --config configs/imagenet_r18.yaml train.batch_size=128 train.compile=true
  iecl pretrain --config byol_r50 data.root=/data/imagenet/train saib.enabled=true
  iecl pretrain method.name=simclr saib.enabled=false        # a baseline's smoke run
  iecl pretrain --resume runs/iecl-resnet50-20261125-101500
  torchrun --nproc_per_node=8 -m iecl.train --config imagenet_r50 data.root=/data/imagenet/train

Under torchrun each process is one rank (one GPU): train.batch_size is per rank
and the learning rate scales with the global batch (README: Multi-GPU).

Overrides are section.key=value (the value is read as YAML). Every key, with
its meaning, is listed in configs/smoke.yaml; the shipped configs are smoke,
imagenet_r18 and imagenet_r50 (IE-CL), mocov2_r50, simclr_r50, byol_r50 and
simsiam_r50 (each baseline's own paper). Method-specific keys left null take
the method's own value. Each run writes a folder under
run.out_dir with config.yaml (resolved), run.json, metrics.jsonl, tb/
(TensorBoard) and last.pt. Ctrl-C (or SIGTERM) stops at the next step boundary
after saving last.pt; --resume continues from it exactly.
"""

def add_commands(commands) -> None:
    p = commands.add_parser(
        "pretrain", help="pretrain IE-CL or a baseline (no arguments: a one-minute CPU smoke run)",
        description=PRETRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, applied last")
    p.add_argument("--config", metavar="NAME|PATH", help="a shipped config (smoke, imagenet_r18, imagenet_r50, mocov2_r50, simclr_r50, "
                   "byol_r50, simsiam_r50) or a YAML file")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    p.set_defaults(run=run_pretrain)


def run_pretrain(args) -> int:
    import torch

    from iecl.train import checkpoint as ckpt
    from iecl.train import ddp
    from iecl.train.config import (
        load_config,
        resolve_runtime,
        runtime_warnings,
        validate,
    )
    from iecl.train.run_dir import config_of_run

    launch = ddp.launch_from_env()  # torchrun's variables, or None: one process
    world = launch.world_size if launch is not None else None
    if args.resume and args.config:
        raise ConfigError("--resume takes the run's own config.yaml; drop --config (overrides are still allowed)")
    state = None
    run_dir = None
    if args.resume:
        run_dir = Path(args.resume)
        cfg = load_config(str(config_of_run(run_dir)), args.overrides)
        state = ckpt.load(run_dir / "last.pt")  # every rank loads the same checkpoint
    else:
        cfg = load_config(args.config, args.overrides)
    validate(cfg, world or 1)
    cuda = torch.cuda.is_available()
    resolve_runtime(cfg, cuda, cuda and torch.cuda.is_bf16_supported(), world)
    main_rank = launch is None or launch.rank == 0
    for line in runtime_warnings(cfg, world) if main_rank else ():
        print(f"iecl pretrain: warning: {line}", file=sys.stderr)
    with ddp.session(cfg, launch):
        ddp.barrier()  # every rank has read config.yaml and last.pt: rank 0 may now rewrite them
        return _pretrain_session(args, cfg, state, run_dir, world)


def _pretrain_session(args, cfg, state: dict | None, run_dir: Path | None, world: int | None) -> int:
    """The run, once the process group (if any) is up; rank 0 alone creates and
    writes the run directory and prints, and shares its failures with the others."""
    from iecl.train import ddp
    from iecl.train.data import resolve_images
    from iecl.train.eval.monitor import knn_splits
    from iecl.train.loop import planned_steps, pretrain
    from iecl.train.run_dir import create_run_dir, write_run_files

    main_rank = ddp.is_main()
    progress = not args.no_progress and main_rank
    # Data errors before anything is written; a synthetic dataset is made once, by rank 0.
    images = ddp.main_first(lambda: resolve_images(cfg.data, progress=progress))
    knn = knn_splits(cfg, images)
    steps = planned_steps(cfg, len(images), world or 1)
    if main_rank and state is not None and state["dataset"]["images"] != len(images):
        print(
            f"iecl pretrain: warning: {images.root} now has {len(images)} images, the checkpoint was made "
            f"with {state['dataset']['images']}; the data order from here on differs from the original run",
            file=sys.stderr,
        )
    if run_dir is None:
        run_dir = ddp.from_main(lambda: create_run_dir(cfg))
    if state is not None and state["step"] >= steps:
        if main_rank:
            print(f"iecl pretrain: {run_dir} is already complete ({state['step']} of {steps} steps); "
                  "raise train.epochs or train.max_steps to continue it")
        return 0
    info = {"images": len(images), "data_root": images.root, **({"world_size": world} if world else {})}
    ddp.from_main(lambda: write_run_files(run_dir, cfg, info, resumed=state is not None))
    if main_rank:
        _print_header(cfg, images, steps, run_dir, state, world)
    summary = pretrain(cfg, run_dir, images, state, progress=progress, knn=knn)
    if main_rank:
        _print_summary(summary)
    return EXIT_ON_SIGNAL.get(summary.stopped_by, 0)


def _print_header(cfg, images, steps: int, run_dir: Path, state: dict | None, world: int | None = None) -> None:
    t, m = cfg.train, cfg.model
    where = f"resuming at step {state['step']}" if state else "new run"
    batch = f"batch {t.batch_size}"
    if world is not None:  # under torchrun: the global batch and the learning rate it scales
        from iecl.train.ddp import backend_for
        from iecl.train.optim import scaled_lr

        linear = cfg.optim.lr_scaling == "linear"
        scaling = f"optim.lr {cfg.optim.lr:g} x {t.batch_size * world}/256" if linear else "optim.lr, not scaled"
        batch = (f"{world} rank(s) ({backend_for(cfg)}{', SyncBatchNorm' if t.sync_bn and world > 1 else ''}), "
                 f"batch {t.batch_size} per rank = {t.batch_size * world} global, "
                 f"lr {scaled_lr(cfg.optim, t.batch_size * world):.3g} ({scaling})")
    print(
        f"iecl pretrain: {cfg.method.name} {m.backbone}{' +SAIB' if cfg.saib.enabled else ''} on {len(images)} images "
        f"({images.root}), {t.device} {t.precision}, {batch}, {cfg.data.image_size}px, "
        f"{steps} steps; {where} in {run_dir}",
        flush=True,
    )


def _print_summary(s) -> None:
    f = s.final
    state = "done" if s.stopped_by == "done" else f"stopped by {s.stopped_by} (resume with --resume {s.run_dir})"
    print(f"iecl pretrain: {state}: {s.steps} steps ({s.epochs:.2f} epochs), {s.steps_this_session} this session in {s.seconds:.1f} s")
    print(f"  throughput  {s.img_per_s:.1f} images/s (each image gives two views; first steps excluded)")
    if s.skipped_steps:
        print(f"  skipped     {s.skipped_steps} step(s) with a non-finite loss (no update made)")
    if s.bad_images:
        print(f"  bad images  {s.bad_images} unreadable image(s) replaced (named above); list them: iecl validate DATA")
    if s.losses:
        parts = ", ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in s.losses.items() if k != "loss")
        print(f"  final loss  {s.losses['loss']:.4f}" + (f" ({parts})" if parts else ""))
    if f and "effective_rank_query" in f:
        bound = f", InfoNCE MI bound {f['mi_bound']:.3f} of {f['mi_ceiling']:.3f} nats" if "mi_bound" in f else ""
        print(f"  embeddings  effective rank {f['effective_rank_query']:.1f} (query), "
              f"Renyi-2 entropy {f['renyi2_query']:.3f}{bound}")
    if s.knn:
        top5 = f", top-5 {100 * s.knn['knn_top5']:.2f}%" if "knn_top5" in s.knn else ""
        print(f"  kNN         top-1 {100 * s.knn['knn_top1']:.2f}%{top5}")
    print(f"  run dir     {s.run_dir}: config.yaml run.json metrics.jsonl tb/ last.pt")

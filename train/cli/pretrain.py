"""`iecl pretrain` (and `python -m iecl.train`, which torchrun starts)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iecl.train.config import ConfigError
from iecl.train.signals import EXIT_ON_SIGNAL

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
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration (device and precision decided) and what would run, then exit")
    p.set_defaults(run=run_pretrain)


def run_pretrain(args) -> int:
    from iecl.train.signals import startup_signals

    with startup_signals():  # from here on SIGINT/SIGTERM end start-up quietly (130/143), not with a traceback
        return _run_pretrain(args)


def _run_pretrain(args) -> int:
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
        if (run_dir / "last.pt").exists():
            state = ckpt.load(run_dir / "last.pt")  # every rank loads the same checkpoint
    else:
        cfg = load_config(args.config, args.overrides)
    validate(cfg, world or 1)
    cuda = torch.cuda.is_available()
    resolve_runtime(cfg, cuda, cuda and torch.cuda.is_bf16_supported(), world)
    if args.print_config:
        _print_config(cfg, run_dir, state, world)
        return 0
    main_rank = launch is None or launch.rank == 0
    for line in runtime_warnings(cfg, world) if main_rank else ():
        print(f"iecl pretrain: warning: {line}", file=sys.stderr)
    with ddp.session(cfg, launch):
        return _pretrain_session(args, cfg, state, run_dir, world)


def _pretrain_session(args, cfg, state: dict | None, run_dir: Path | None, world: int | None) -> int:
    """The run, once the process group (if any) is up; rank 0 alone creates,
    locks and writes the run directory and prints, and shares its failures
    with the others. Nothing is written until the run is built and the
    checkpoint restored into it: a refused start or resume changes nothing."""
    from iecl.train import ddp
    from iecl.train.checkpoint import remove_stale_temporaries
    from iecl.train.data import resolve_images
    from iecl.train.eval.monitor import knn_splits
    from iecl.train.loop import planned_steps, prepare, pretrain
    from iecl.train.run_dir import create_run_dir, discard_if_unstarted, write_run_files
    from iecl.train.run_lock import RunLock

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
    if state is not None and state["step"] >= steps:
        if main_rank:
            print(f"iecl pretrain: {run_dir} is already complete ({state['step']} of {steps} steps); "
                  "raise train.epochs or train.max_steps to continue it")
        return 0
    new = run_dir is None
    lock = None
    prepared = None
    try:
        if not new:  # before the checkpoint is trusted: no other process trains here now
            lock = RunLock(run_dir)
            ddp.from_main(lock.acquire)
            if main_rank and state is None:
                print(f"iecl pretrain: {run_dir} has no checkpoint yet (it stopped before its first one): "
                      "starting the run afresh in it", file=sys.stderr)
        ddp.barrier()  # every rank has read config.yaml and last.pt: rank 0 may now rewrite them
        prepared = prepare(cfg, images, state)
        if new:
            run_dir = ddp.from_main(lambda: create_run_dir(cfg))
            lock = RunLock(run_dir)
            ddp.from_main(lock.acquire)
        ddp.from_main(lambda: remove_stale_temporaries(run_dir))  # of killed writers: we hold the lock
        info = {"images": len(images), "data_root": images.root, **({"world_size": world} if world else {})}
        ddp.from_main(lambda: write_run_files(run_dir, cfg, info, resumed=state is not None))
        if main_rank:
            _print_header(cfg, images, steps, run_dir, state, world)
        summary = pretrain(cfg, run_dir, images, state, progress=progress, knn=knn, prepared=prepared)
    except BaseException:
        if prepared is not None:
            prepared.loader.close()  # pretrain closes it too; a second close does nothing
        if lock is not None and main_rank:
            lock.release()
            lock = None
        if new and run_dir is not None and main_rank:
            discard_if_unstarted(run_dir)  # a start that failed leaves no half-made run behind
        raise
    finally:
        if lock is not None and main_rank:
            lock.release()
    if main_rank:
        _print_summary(summary)
    return EXIT_ON_SIGNAL.get(summary.stopped_by, 0)


def _print_config(cfg, run_dir: Path | None, state: dict | None, world: int | None) -> None:
    """--print-config: the resolved configuration, as config.yaml would hold it, and what would run."""
    from iecl.train.config import dump_yaml

    where = (f"resume {run_dir} at step {state['step']}" if state else f"start {run_dir} afresh") if run_dir else "a new run"
    ranks = f", {world} rank(s)" if world else ""
    print(f"# iecl pretrain would {where}: {cfg.method.name} {cfg.model.backbone}"
          f"{' +SAIB' if cfg.saib.enabled else ''}, data.backend={cfg.data.backend}, "
          f"{cfg.train.device} {cfg.train.precision}{ranks}")
    print(dump_yaml(cfg), end="")


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
        f"({images.root}, {_loader_text(cfg)}), {t.device} {t.precision}, {batch}, {cfg.data.image_size}px, "
        f"{steps} steps; {where} in {run_dir}",
        flush=True,
    )


def _loader_text(cfg) -> str:
    """Which loader feeds the run, as the header names it."""
    d = cfg.data
    if d.backend == "pil":
        return f"loader pil, {d.workers} worker process(es)" if d.workers else "loader pil, in the training process"
    if d.backend == "dali":
        return f"loader dali, {d.decode} decode on the {'GPU' if cfg.train.device == 'cuda' else 'CPU'}"
    return f"loader {d.backend}"


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
        if "mi_bound" in f and f["mi_bound"] < 0:  # MI is never negative: the bound is not yet informative
            bound += " (negative, so vacuous: it says nothing about the MI yet)"
        print(f"  embeddings  effective rank {f['effective_rank_query']:.1f} (query), "
              f"Renyi-2 entropy {f['renyi2_query']:.3f}{bound}")
    if s.knn:
        top5 = f", top-5 {100 * s.knn['knn_top5']:.2f}%" if "knn_top5" in s.knn else ""
        print(f"  kNN         top-1 {100 * s.knn['knn_top1']:.2f}%{top5}")
    print(f"  run dir     {s.run_dir}: config.yaml run.json metrics.jsonl tb/ last.pt")

"""`iecl knn` and `iecl lineval`: evaluate a pretrained checkpoint on labelled images."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from iecl.pipeline.errors import DataError
from iecl.train.config import ConfigError

if TYPE_CHECKING:  # torch and the model load only when a command runs: `iecl --help` stays quick
    import torch
    from torch import nn

    from iecl.train.config import Config
    from iecl.train.eval.splits import LabelledSplits

_DATA_HELP = """\
CHECKPOINT is a checkpoint file (last.pt) or a run folder holding last.pt.
DIR holds labelled images: either DIR/train/ and DIR/val/ (ImageNet's layout,
DIR/<split>/<class>/<image>), or one labelled source (an ImageNet-style folder,
a file list with labels, tar shards with .cls members) of which a fixed
--val-fraction of each class is held out for validation (seeded by --seed,
default the checkpoint's run.seed: the split the training loop's kNN monitor
used).

Images are centre crops: the shorter side resized (bilinear) to
image-size * 256/224, then the central image-size square; normalised with the
ImageNet mean and std. Unreadable images are skipped and named. On a GPU the
backbone runs under bf16 autocast where supported (features kept in float32).
"""

KNN_HELP = f"""\
Weighted kNN accuracy of a pretrained backbone (no training).

The train images' L2-normalised features vote for the class of each val image:
the k most similar (cosine) vote with weight exp(similarity / tau) (Wu et al.
2018, as in MoCo's kNN monitor). Reports top-1 and top-5 (top-5 only with 5 or
more classes) on the val images.

{_DATA_HELP}
  iecl knn runs/iecl-resnet50-20261125-101500 --data /data/imagenet
  iecl knn runs/iecl-resnet18-20261125-093000/last.pt --data /data/synthetic-10k --val-fraction 0.2 --json knn.json
"""

LINEVAL_HELP = f"""\
Linear evaluation: train a linear classifier on the frozen backbone's features.

The IE-CL paper's protocol: one linear layer (weights N(0, 0.01), bias 0) on the
backbone's pooled features, SGD with momentum 0.9, weight decay 1e-5, batch 512,
learning rate 0.03 used as given (NOT scaled with the batch size), cosine decay
to 0 over 200 epochs. Training views are RandomResizedCrop (scale 0.08-1) plus
horizontal flip, so the frozen backbone runs over the train set every epoch.
Reported: top-1 and top-5 on the val images after the FINAL epoch.

--cached trains on centre-crop features extracted once instead (much faster,
usually a little lower than the augmented protocol); --feature-cache PATH keeps
them in a file, reused when the checkpoint's weights, the images and the image
size match (otherwise extracted again and the file replaced).

{_DATA_HELP}
  iecl lineval runs/iecl-resnet50-20261125-101500 --data /data/imagenet --workers 16
  iecl lineval runs/iecl-resnet18-20261125-093000 --data /data/synthetic-10k --cached --feature-cache smoke-feats.pt --epochs 100
"""


def add_commands(commands) -> None:
    p = commands.add_parser(
        "knn", help="kNN accuracy of a pretrained checkpoint on labelled images",
        description=KNN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_arguments(p, batch_size=256, seeds="the held-out split")
    p.add_argument("--k", type=int, default=200, metavar="K", help="neighbours that vote (default 200)")
    p.add_argument("--tau", type=float, default=0.1, metavar="T", help="temperature of the vote weights (default 0.1)")
    p.set_defaults(run=run_knn)

    p = commands.add_parser(
        "lineval", help="linear-probe accuracy of a pretrained checkpoint on labelled images",
        description=LINEVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_arguments(p, batch_size=512, seeds="the held-out split and the probe (init, order, crops)")
    p.add_argument("--epochs", type=int, default=200, metavar="N", help="training epochs of the probe (default 200)")
    p.add_argument("--lr", type=float, default=0.03, metavar="LR", help="base learning rate, not scaled with the batch (default 0.03)")
    p.add_argument("--momentum", type=float, default=0.9, metavar="M", help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=1e-5, metavar="WD", help="SGD weight decay (default 1e-5)")
    p.add_argument("--cached", action="store_true", help="train on centre-crop features extracted once (fast)")
    p.add_argument("--feature-cache", metavar="PATH", help="with --cached: keep the features in PATH (.pt) and reuse them")
    p.set_defaults(run=run_lineval)


def _common_arguments(p: argparse.ArgumentParser, batch_size: int, seeds: str) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint .pt file or a run folder holding last.pt")
    p.add_argument("--data", required=True, metavar="DIR", help="labelled images (see above)")
    p.add_argument("--batch-size", type=int, default=batch_size, metavar="N", help=f"images per batch (default {batch_size})")
    p.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="crop size (default: the checkpoint's data.image_size)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="decoding processes (default: the cores, at most 8; 0 decodes in this process)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto: cuda if available")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="share of each class held out when DIR has no train/ and val/ (default 0.1)")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help=f"seeds {seeds} (default: the checkpoint's run.seed)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")


# ----------------------------------------------------------------- the commands


def run_knn(args) -> int:
    from iecl.train.eval.knn import knn_evaluate

    _check_positive(args, "k", "tau", "batch_size")
    ev = _prepare(args)
    result = knn_evaluate(
        ev.backbone, ev.splits.train, ev.splits.val,
        num_classes=ev.splits.num_classes, image_size=ev.image_size, batch_size=args.batch_size,
        workers=ev.workers, device=ev.device, k=args.k, tau=args.tau, autocast_dtype=ev.autocast_dtype,
        seed=ev.seed, progress=not args.no_progress,
    )
    _report("knn", ev, result, f"k={args.k}, tau={args.tau}")
    return 0


def run_lineval(args) -> int:
    from iecl.train.eval.lineval import linear_eval

    _check_positive(args, "epochs", "batch_size", "lr")
    if args.momentum < 0 or args.weight_decay < 0:
        raise ConfigError("--momentum and --weight-decay must not be negative")
    if args.feature_cache and not args.cached:
        raise ConfigError("--feature-cache keeps the features of --cached; add --cached (the augmented mode has none)")
    ev = _prepare(args)
    result = linear_eval(
        ev.backbone, ev.splits.train, ev.splits.val,
        num_classes=ev.splits.num_classes, image_size=ev.image_size, workers=ev.workers, device=ev.device,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, cached=args.cached, feature_cache=args.feature_cache,
        autocast_dtype=ev.autocast_dtype, seed=ev.seed, progress=not args.no_progress,
    )
    mode = "cached centre-crop features" if args.cached else "augmented crops"
    if args.cached and args.feature_cache:
        mode += f" ({'loaded from' if result['cache_hit'] else 'saved to'} {args.feature_cache})"
    settings = (f"{mode}, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr} (not scaled), cosine, "
                f"momentum {args.momentum}, weight decay {args.weight_decay}; final loss {result['train_loss'][-1]:.4f}")
    _report("lineval", ev, result, settings)
    return 0


# ----------------------------------------------------------------- shared steps


@dataclass
class _Evaluation:
    """What both commands load before evaluating."""

    checkpoint: str
    cfg: Config
    backbone: nn.Module
    step: int
    epoch: int | None
    splits: LabelledSplits
    image_size: int
    workers: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    seed: int
    data: str
    val_fraction: float
    json_path: str | None


def _prepare(args) -> _Evaluation:
    """Resolve the device, load the checkpoint, find the labelled data (user errors before any work)."""
    from iecl.train.eval.splits import labelled_splits
    from iecl.train.factory import load_pretrained

    if not 0 < args.val_fraction < 1:
        raise DataError(f"--val-fraction must lie strictly between 0 and 1, got {args.val_fraction}")
    if args.image_size is not None and args.image_size < 1:
        raise ConfigError(f"--image-size must be positive, got {args.image_size}")
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {args.workers}")
    if "{" not in args.data and not Path(args.data).expanduser().exists():  # braces: a tar shard pattern
        raise DataError(f"--data {args.data} does not exist")
    from iecl.train.factory import eval_runtime

    device, autocast_dtype = eval_runtime(args.device)
    path = Path(args.checkpoint)
    path = path / "last.pt" if path.is_dir() else path
    method, cfg, state = load_pretrained(path, device)
    seed = cfg.run.seed if args.seed is None else args.seed
    splits = labelled_splits(args.data, args.val_fraction, seed)
    return _Evaluation(
        checkpoint=str(path), backbone=method.backbone(), cfg=cfg, step=int(state["step"]),
        epoch=state.get("epoch"), splits=splits, image_size=args.image_size or cfg.data.image_size,
        workers=min(8, os.cpu_count() or 1) if args.workers is None else args.workers,
        device=device, autocast_dtype=autocast_dtype, seed=seed, data=args.data,
        val_fraction=args.val_fraction, json_path=args.json,
    )


def _check_positive(args, *names: str) -> None:
    for name in names:
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")


def _report(command: str, ev: _Evaluation, result: dict, settings: str) -> None:
    """Print the summary (bad images to stderr first) and write --json."""
    for name in result["bad_files"]:
        print(f"iecl {command}: warning: unreadable image skipped: {name}", file=sys.stderr)
    cfg, s = ev.cfg, ev.splits
    saib = " +SAIB" if cfg.saib.enabled else ""
    if s.held_out:
        val_from = f"held out of {ev.data} ({100 * ev.val_fraction:g}% of each class, seed {ev.seed})"
    else:
        val_from = f"{ev.data}/val (train: {ev.data}/train)"
    top5 = result.get("top5")
    print(f"iecl {command}: {cfg.method.name} {cfg.model.backbone}{saib} at step {ev.step} ({ev.checkpoint})")
    print(f"  data        {result['train_images']} train / {result['val_images']} val images, "
          f"{s.num_classes} classes; val {val_from}")
    print(f"  settings    {settings}; {ev.image_size} px, {ev.device.type}"
          f"{' bf16' if ev.autocast_dtype is not None else ''}")
    if result["bad_files"]:
        print(f"  skipped     {len(result['bad_files'])} unreadable image(s) (named above)")
    print(f"  top-1       {100 * result['top1']:.2f} %")
    print(f"  top-5       {'n/a (fewer than 5 classes)' if top5 is None else f'{100 * top5:.2f} %'}")
    print(f"  time        {result['seconds']:.1f} s")
    if ev.json_path:
        _write_json(ev, result, command)


def _write_json(ev: _Evaluation, result: dict, command: str) -> None:
    cfg, s = ev.cfg, ev.splits
    record = {
        "command": command,
        "checkpoint": {"path": ev.checkpoint, "method": cfg.method.name, "backbone": cfg.model.backbone,
                       "saib": cfg.saib.enabled, "step": ev.step, "epoch": ev.epoch},
        "data": {"root": str(ev.data), "num_classes": s.num_classes, "val_held_out": s.held_out,
                 "val_fraction": ev.val_fraction if s.held_out else None, "split_seed": ev.seed,
                 "train_images_listed": len(s.train), "val_images_listed": len(s.val)},
        "image_size": ev.image_size,
        "device": ev.device.type,
        **result,
        "top5": result.get("top5"),
    }
    with open(ev.json_path, "w") as f:
        json.dump(record, f, indent=1)

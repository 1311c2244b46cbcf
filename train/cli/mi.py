"""`iecl mi`: the post-training mutual-information estimate of a checkpoint's
views (the method: train/eval/mi.py)."""

from __future__ import annotations

import argparse

MI_HELP = """\
Estimate the mutual information between two views that a pretrained encoder keeps.

The number is a lower bound, in nats (and bits), on I(v1; v2) between the
frozen encoder's features of the two members of a positive pair, measured on
held-out images: a fresh critic learns to pick each view's partner among 2K
views, and log(2K - 1) minus its loss is the bound (Lee et al. 2023, the
post-training estimate of *Towards a Rigorous Analysis of Mutual Information in Contrastive Learning* (Lee et al. 2023, arXiv:2308.15704)). No
estimate at batch K can exceed its ceiling log(2K - 1), so one close to the
ceiling means "at least this much": a larger --batch-size (more images) shows
more, which is why K defaults to well above the pretraining batch, whose own
in-batch estimate was capped at log(2B - 1).

Pairs: --pairs views (default) takes two augmented views of the same image,
with the checkpoint's own augmentation recipe (the MI the method's views
share; works on unlabelled images). --pairs class takes two different images
of the same class, each augmented; their true MI is at most the class entropy
H(C), printed beside the estimate (needs labels).

How: the backbone runs once, over --views-per-image V augmented views of every
image; the critic (Linear-BN-ReLU-Linear to 128-d, learned temperature) then
trains on these cached features for --steps steps, each drawing K images and
two of their V views. V trades extraction time (V backbone passes per image)
against variety: the critic only ever sees about (V/2)^2 view pairs per image,
so with few views and few images it memorises them. The estimate on the
training images is printed too: a train estimate well above the held-out one
means the critic overfit (lower --steps, raise V or use more images).

DIR is what data.root accepts: an ImageNet-style folder (or DIR/train and
DIR/val, used as they are), a file list or tar shards. Without a val/ folder,
--val-fraction of the images (of each class, when labelled) is held out.

  iecl mi runs/iecl-resnet50-20261125-101500 --data /data/imagenet --views-per-image 8
  iecl mi runs/iecl-resnet18-20261125-093000/last.pt --data /data/synthetic-10k --pairs class --json mi.json
"""

#: `train.eval.pairs.PAIRS`, restated so that parsing needs no torch (a test keeps them equal)
PAIR_CHOICES = ("views", "class")

#: default cap on images per split: features take images x V x feature width x 4 bytes
MAX_IMAGES = 50_000


def add_commands(commands) -> None:
    p = commands.add_parser(
        "mi", help="post-training mutual-information estimate of a checkpoint's views",
        description=MI_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file, or a run folder holding last.pt")
    p.add_argument("--data", required=True, metavar="DIR", help="images to estimate on (see above)")
    p.add_argument("--pairs", choices=PAIR_CHOICES, default="views",
                   help="positive pairs: two views of one image (default), or two images of one class")
    p.add_argument("--batch-size", type=int, default=None, metavar="K",
                   help="pairs per critic batch; the ceiling is log(2K-1) (default: max(1024, 4 x the "
                        "pretraining batch), lowered with a warning to what the data allows)")
    p.add_argument("--steps", type=int, default=2000, help="critic training steps (default 2000)")
    p.add_argument("--lr", type=float, default=1e-3, help="critic learning rate, Adam with cosine decay (default 1e-3)")
    p.add_argument("--views-per-image", type=int, default=4, metavar="V",
                   help="augmented views per image, each one backbone pass (default 4)")
    p.add_argument("--image-size", type=int, default=None, metavar="PX", help="view size (default: the checkpoint's)")
    p.add_argument("--max-images", type=int, default=MAX_IMAGES, metavar="N",
                   help=f"use at most N images of each split, a seeded random subset (default {MAX_IMAGES})")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: cores, at most 8)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction held out when DIR has no val/ folder (default 0.1)")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="seeds the split, augmentations and critic (default: the checkpoint's run.seed, as knn and lineval)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    p.set_defaults(run=run_mi)


def run_mi(args: argparse.Namespace) -> int:
    from iecl.train.cli.mi_run import (
        run_mi as run,  # torch and the estimator: only when the command runs
    )

    return run(args)

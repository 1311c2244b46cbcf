"""`iecl mi`: post-training mutual-information estimation (Lee et al. 2023).

papers/mi-analysis-contrastive-summary.txt: an InfoNCE estimate measured
*during* pretraining can never exceed log(2K - 1) for the training batch K, so
a small-batch run looks as if it kept little information even when it kept a
lot. Post-training estimation separates the two: the pretrained encoder is
frozen, a fresh critic (a small projection head on its features) is trained
with the symmetric NT-Xent loss at a batch K of our choosing, and

    I(v1; v2) >= log(2K - 1) - L_NT-Xent

is evaluated on held-out images. Positive pairs are either two augmented views
of one image (`views`: the MI the method's own views share) or two different
images of the same class (`class`: the true MI is then at most the class
entropy H(C), reported beside the estimate).

Cost: the frozen backbone is the expensive part, so it runs once per view.
`extract_view_features` computes the features of V independently augmented
views of every image; the critic then trains on these cached features (each
step draws K images and two of their V views), which makes a step a few small
matrix products. Everything that works on features (`PairSampler`, `Critic`,
`nt_xent`, `train_critic`, `estimate_mi`) is testable without images.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from iecl.kernels.view_prep import prepare_view_reference
from iecl.model.diagnostics import infonce_mi_bound, infonce_mi_ceiling
from iecl.model.losses.ntxent import nt_xent
from iecl.pipeline import DataError, ImageList, open_images
from iecl.pipeline.augment import (
    ViewRecipe,
    apply_view,
    get_recipe,
    sample_view_params,
    view_rngs,
)
from iecl.pipeline.decode import DECODE_ERRORS, decode_rgb, describe
from iecl.pipeline.folder import UNLABELED
from iecl.pipeline.views import MEAN_255, STD_255
from iecl.train.config import ConfigError
from iecl.train.eval_data import labelled_splits, subset
from iecl.train.knn import extract_features

PAIRS = ("views", "class")
LOG2 = math.log(2)

# ----------------------------------------------------------------------------- pairs


class PairSampler:
    """Which cached feature rows form the K positive pairs of a batch.

    Features are laid out `(N images, V views, F)` and addressed by the flat
    row `image * V + view`. Views alternate between the checkpoint's two
    augmentation recipes (even slots: anchor recipe, odd slots: query recipe),
    so a pair always takes its first member from an anchor slot and its second
    from a query slot: for asymmetric recipes (BYOL) the pairs are the ones the
    method was trained on.

    `views`: both members come from the same image (K distinct images per
    batch). `class`: the second member is a *different* image of the anchor's
    class, drawn uniformly; images whose class has no other image in the set
    cannot be anchors (`available` counts those that can). With class pairs
    the negatives come in same-class twos (an anchor and its partner), not
    independently as the InfoNCE bound assumes, so even a perfect critic
    lands a few thousandths of a nat above H(C) at K=64 (tests/test_mi.py);
    the excess shrinks like 1/K.
    """

    def __init__(self, num_images: int, num_views: int, pairs: str = "views", labels: torch.Tensor | None = None):
        if pairs not in PAIRS:
            raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}")
        if num_views < 1 or (pairs == "views" and num_views < 2):
            raise ValueError(f"pairs={pairs!r} needs at least {2 if pairs == 'views' else 1} views per image, got {num_views}")
        self.num_images, self.num_views, self.pairs = num_images, num_views, pairs
        self.anchor_slots = torch.arange(0, num_views, 2)
        # One view per image (class pairs only): both members use slot 0.
        self.query_slots = torch.arange(1, num_views, 2) if num_views > 1 else self.anchor_slots
        self.labels = None
        if pairs == "views":
            self.anchors = torch.arange(num_images)
            return
        if labels is None or len(labels) != num_images:
            raise ValueError("pairs='class' needs one label per image")
        self.labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        # Images grouped by class (stable sort): a class's members are
        # order[start[c] : start[c] + count[c]], and rank[i] is i's place there.
        self.order = torch.argsort(self.labels, stable=True)
        classes, counts = torch.unique_consecutive(self.labels[self.order], return_counts=True)
        self.class_of = torch.searchsorted(classes, self.labels)  # dense class index per image
        self.count = counts
        self.start = torch.cumsum(counts, 0) - counts
        self.rank = torch.empty(num_images, dtype=torch.long)
        self.rank[self.order] = torch.arange(num_images) - self.start[self.class_of[self.order]]
        self.anchors = torch.nonzero(self.count[self.class_of] >= 2).flatten()

    @property
    def available(self) -> int:
        """The most pairs one batch can hold (distinct anchors)."""
        return len(self.anchors)

    def class_entropy(self) -> float:
        """H(C) in nats of the anchors' labels: the class distribution of the
        pairs, so the bound on the true MI of class pairs."""
        if self.labels is None:
            raise ValueError("class_entropy needs pairs='class'")
        p = torch.bincount(self.class_of[self.anchors]).double()
        p = p[p > 0] / p.sum()
        return float(-(p * p.log()).sum())

    def rows(self, anchors: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature rows (a, b) of the pairs anchored at image indices `anchors`."""
        partners = anchors if self.pairs == "views" else self._other_member(anchors, generator)
        a_slot = self.anchor_slots[torch.randint(len(self.anchor_slots), anchors.shape, generator=generator)]
        b_slot = self.query_slots[torch.randint(len(self.query_slots), anchors.shape, generator=generator)]
        return anchors * self.num_views + a_slot, partners * self.num_views + b_slot

    def _other_member(self, anchors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        c = self.class_of[anchors]
        # Uniform over the class's other n - 1 members: draw a rank in [0, n - 1)
        # and step over the anchor's own rank.
        r = (torch.rand(anchors.shape, generator=generator) * (self.count[c] - 1)).long()
        r = r + (r >= self.rank[anchors]).long()
        return self.order[self.start[c] + r]

    def random_batch(self, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """K pairs with distinct anchors, drawn uniformly (a training step)."""
        self._check(k)
        anchors = self.anchors[torch.randperm(self.available, generator=generator)[:k]]
        return self.rows(anchors, generator)

    def sweep(self, k: int, rounds: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`rounds` passes over every anchor in batches of K (each pass a fresh
        permutation and fresh views; the last partial batch is dropped, since
        a smaller batch would have a smaller ceiling)."""
        self._check(k)
        for _ in range(rounds):
            perm = self.anchors[torch.randperm(self.available, generator=generator)]
            for start in range(0, self.available - k + 1, k):
                yield self.rows(perm[start : start + k], generator)

    def _check(self, k: int) -> None:
        if not 2 <= k <= self.available:
            raise ValueError(f"batch size {k} must lie in [2, {self.available}] (the usable anchors)")


# ----------------------------------------------------------------------------- critic


class Critic(nn.Module):
    """The critic's projection head, Linear-BN-ReLU-Linear (SimCLR's), and a
    learned temperature: score(x, y) = cos(g(x), g(y)) / tau.

    The temperature is learned (log-parametrised, kept in [0.01, 1]) because
    the tightest bound needs it: near-identical pairs want a small tau (a wide
    gap between positive and negative scores), uninformative ones a large one.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128, tau: float = 0.1) -> None:
        super().__init__()
        self.head = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / tau)))

    @property
    def scale(self) -> torch.Tensor:
        """1 / tau."""
        return self.log_scale.clamp(0.0, math.log(100.0)).exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(x), dim=1)


def _pair_loss(critic: Critic, flat: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    a, b = (r.to(flat.device) for r in rows)
    # One forward over both sides, so BatchNorm sees all 2K views as one batch.
    z = critic(torch.cat([flat[a], flat[b]]).float())
    return nt_xent(z[: len(a)], z[len(a) :], critic.scale)  # the training loss's own NT-Xent


def train_critic(
    features: torch.Tensor,
    sampler: PairSampler,
    *,
    batch_size: int,
    steps: int = 2000,
    lr: float = 1e-3,
    hidden_dim: int = 512,
    out_dim: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> Critic:
    """A fresh critic trained on cached features `(N, V, F)` with NT-Xent over
    batches of `batch_size` pairs from `sampler`. Adam with a cosine decay to
    0, so the last steps do not jitter the estimate. Returns it in eval mode
    (BatchNorm then uses running statistics: the estimate of one batch does
    not depend on the others' features)."""
    n, v, dim = features.shape
    if (n, v) != (sampler.num_images, sampler.num_views):
        raise ValueError(f"features {tuple(features.shape)} do not match the sampler's ({sampler.num_images}, {sampler.num_views}, F)")
    with torch.random.fork_rng(devices=[]):  # a seeded initialisation, the global generator untouched
        torch.manual_seed(seed)
        critic = Critic(dim, hidden_dim, out_dim).to(features.device)
    optimizer = torch.optim.Adam(critic.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    generator = torch.Generator().manual_seed(seed)
    flat = features.reshape(n * v, dim)
    critic.train()
    bar = tqdm(range(steps), desc="critic", unit="step", disable=not progress, dynamic_ncols=True, mininterval=0.5)
    for step in bar:
        loss = _pair_loss(critic, flat, sampler.random_batch(batch_size, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress and step % 50 == 0:
            bar.set_postfix(mi=f"{math.log(2 * batch_size - 1) - loss.item():.3f}")
    return critic.eval()


@dataclass
class MIEstimate:
    """log(2K - 1) - mean NT-Xent over `batches` batches of K pairs from `images` images."""

    nats: float
    loss: float
    batch_size: int
    batches: int
    images: int

    @property
    def bits(self) -> float:
        return self.nats / LOG2

    @property
    def ceiling(self) -> float:
        return infonce_mi_ceiling(self.batch_size)

    def as_dict(self) -> dict:
        return {**asdict(self), "bits": self.bits, "ceiling_nats": self.ceiling}


@torch.no_grad()
def estimate_mi(
    critic: Critic,
    features: torch.Tensor,
    sampler: PairSampler,
    *,
    batch_size: int,
    min_batches: int = 16,
    seed: int = 0,
) -> MIEstimate:
    """The MI lower bound of `critic` on features `(N, V, F)`: the NT-Xent loss
    averaged over full batches of K pairs (every anchor once per round, as many
    rounds as give at least `min_batches` batches), then log(2K - 1) - L.

    The average is taken over losses, not over per-batch bounds, which is the
    same thing: the bound is linear in the loss. It is not clipped at 0: a
    negative held-out estimate says the critic learnt nothing that transfers.
    """
    was_training = critic.training
    critic.eval()
    sampler._check(batch_size)
    rounds = max(1, math.ceil(min_batches / (sampler.available // batch_size)))
    generator = torch.Generator().manual_seed(seed)
    flat = features.reshape(-1, features.shape[-1])
    losses = [_pair_loss(critic, flat, rows) for rows in sampler.sweep(batch_size, rounds, generator)]
    critic.train(was_training)
    loss = torch.stack(losses).mean()
    nats = float(infonce_mi_bound(loss, negatives=2 * batch_size - 2))
    return MIEstimate(nats, float(loss), batch_size, len(losses), sampler.available)


# ----------------------------------------------------------------------------- features


class _ManyViews(torch.utils.data.Dataset):
    """Image i -> (i, uint8 (V, H, W, 3) or None, why it could not be read).

    View v uses recipe v % 2 and the generator `view_rngs(seed, v // 2, i)[v % 2]`:
    views (2e, 2e + 1) are exactly the pair the pretraining loader would make
    for image i in epoch e. An unreadable image is reported, not replaced by
    its neighbour as in training: a duplicated image would be a false
    "different image" in the pairs.
    """

    def __init__(self, images: ImageList, recipes: tuple[ViewRecipe, ViewRecipe], image_size: int, views: int,
                 seed: int) -> None:
        self.images, self.recipes = images, recipes
        self.image_size, self.views, self.seed = image_size, views, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            img = decode_rgb(self.images.read(i))
        except DECODE_ERRORS as err:
            return i, None, f"{self.images.name(i)} ({describe(err)})"
        width, height = img.size
        out = []
        for v in range(self.views):
            rng = view_rngs(self.seed, v // 2, i)[v % 2]
            params = sample_view_params(rng, self.recipes[v % 2], width, height, self.image_size)
            out.append(apply_view(img, params, self.image_size))
        return i, np.stack(out), None


def _collate(items):
    return items  # ragged (unreadable images have no views): stacked in the consumer


@torch.no_grad()
def extract_view_features(
    backbone: nn.Module,
    images: ImageList,
    *,
    recipes: tuple[ViewRecipe, ViewRecipe],
    image_size: int,
    views: int,
    seed: int,
    workers: int,
    device: torch.device,
    batch_images: int = 64,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    desc: str = "features",
) -> tuple[torch.Tensor, list[int], list[str]]:
    """Frozen-backbone features of `views` augmented views of every image of
    `images` (an `ImageList`): `(n, V, F)` float32 on `device` (L2-normalised
    rows, as `train.knn.extract_features` gives them), the indices of the n
    readable images, and "name (reason)" of each unreadable one."""
    mean = torch.tensor(MEAN_255, device=device)
    std = torch.tensor(STD_255, device=device)
    loader = torch.utils.data.DataLoader(
        _ManyViews(images, recipes, image_size, views, seed),
        batch_size=batch_images, num_workers=workers, collate_fn=_collate,
    )
    kept: list[int] = []
    bad: list[str] = []
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress, dynamic_ncols=True, mininterval=0.5)

    def batches():
        for items in loader:
            bar.update(len(items))
            bad.extend(reason for _, arr, reason in items if arr is None)
            ok = [(i, arr) for i, arr, _ in items if arr is not None]
            if not ok:
                continue
            kept.extend(i for i, _ in ok)
            u8 = torch.from_numpy(np.concatenate([a for _, a in ok])).to(device)  # (b * V, H, W, 3)
            x = prepare_view_reference(u8, mean, std, torch.float32)
            yield x, torch.zeros(len(x), dtype=torch.long)

    try:
        feats, _ = extract_features(backbone, batches(), device, autocast_dtype)
    except ValueError:
        if kept:
            raise
        raise DataError(f"none of the {len(images)} images of {images.root} can be read, e.g. {bad[0]}") from None
    finally:
        bar.close()
    return feats.reshape(len(kept), views, -1), kept, bad


# ----------------------------------------------------------------------------- command line

MI_HELP = """\
Estimate the mutual information between two views that a pretrained encoder keeps.

The number is a lower bound, in nats (and bits), on I(v1; v2) between the
frozen encoder's features of the two members of a positive pair, measured on
held-out images: a fresh critic learns to pick each view's partner among 2K
views, and log(2K - 1) minus its loss is the bound (Lee et al. 2023, the
post-training estimate of papers/mi-analysis-contrastive-summary.txt). No
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
  iecl mi runs/smoke/last.pt --data /data/synthetic-10k --pairs class --json mi.json
"""

#: default cap on images per split: features take images x V x feature width x 4 bytes
MAX_IMAGES = 50_000


def add_commands(commands) -> None:
    p = commands.add_parser(
        "mi", help="post-training mutual-information estimate of a checkpoint's views",
        description=MI_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file, or a run folder holding last.pt")
    p.add_argument("--data", required=True, metavar="DIR", help="images to estimate on (see above)")
    p.add_argument("--pairs", choices=PAIRS, default="views",
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
    p.add_argument("--seed", type=int, default=0, help="split, augmentations, critic (default 0)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    p.set_defaults(run=run_mi)


def run_mi(args: argparse.Namespace) -> int:
    from iecl.train.factory import eval_runtime, load_pretrained

    _check_args(args)
    device, autocast_dtype = eval_runtime(args.device)
    progress = not args.no_progress
    start = time.perf_counter()
    method, cfg, state = load_pretrained(args.checkpoint, device)
    image_size = args.image_size or cfg.data.image_size
    train_images, val_images = mi_splits(args.data, args.val_fraction, args.seed, need_labels=args.pairs == "class")
    train_images, val_images = (_cap(images, args.max_images, args.seed) for images in (train_images, val_images))
    k = _batch_size(args.batch_size, cfg.train.batch_size,
                    [_sampler(val_images, None, args), _sampler(train_images, None, args)])
    print(
        f"iecl mi: {cfg.method.name} {cfg.model.backbone} at step {state.get('step')} ({args.checkpoint}); "
        f"{args.pairs} pairs, {cfg.data.recipe} views at {image_size} px, K={k}, {args.steps} critic steps, "
        f"V={args.views_per_image}, {len(train_images)} train / {len(val_images)} held-out images, {device}",
        flush=True,
    )
    common = {
        "recipes": get_recipe(cfg.data.recipe, cfg.data.crop_scale), "image_size": image_size,
        "views": args.views_per_image, "seed": args.seed, "device": device, "progress": progress,
        "workers": args.workers if args.workers is not None else min(8, os.cpu_count() or 1),
        "autocast_dtype": autocast_dtype,
    }
    in_training = _in_training_ceiling(method, cfg.train.batch_size)
    backbone = method.backbone()
    train_feats, train_kept, train_bad = extract_view_features(backbone, train_images, desc="train features", **common)
    val_feats, val_kept, val_bad = extract_view_features(backbone, val_images, desc="held-out features", **common)
    del method, backbone  # the critic never needs the encoder again
    for name in train_bad + val_bad:
        print(f"iecl mi: warning: unreadable image {name} left out", file=sys.stderr)
    train_sampler = _sampler(train_images, train_kept, args)
    val_sampler = _sampler(val_images, val_kept, args)
    k = _fit_after_unreadable(k, train_sampler, val_sampler)
    extracted = time.perf_counter()
    critic = train_critic(train_feats, train_sampler, batch_size=k, steps=args.steps, lr=args.lr,
                          seed=args.seed, progress=progress)
    trained = time.perf_counter()
    held_out = estimate_mi(critic, val_feats, val_sampler, batch_size=k, seed=args.seed + 1)
    on_train = estimate_mi(critic, train_feats, train_sampler, batch_size=k, seed=args.seed + 1)
    report = _report(args, cfg, state, image_size, k, held_out, on_train, train_sampler, val_sampler,
                     train_bad + val_bad, device)
    report["pretrain_method_ceiling_nats"] = in_training
    report["seconds"] = {"features": extracted - start, "critic": trained - extracted,
                         "total": time.perf_counter() - start}
    _print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def _in_training_ceiling(method, batch_size: int) -> float | None:
    """log(candidates) of the method's own contrastive loss at its pretraining
    batch (IE-CL's in-batch InfoNCE: log(B), below NT-Xent's log(2B - 1));
    None for methods without one (BYOL, SimSiam)."""
    if not getattr(method, "nce_directions", 0):
        return None
    return math.log(method.nce_candidates(batch_size))


def _check_args(args: argparse.Namespace) -> None:
    checks = [
        (args.batch_size is None or args.batch_size >= 2, f"--batch-size must be at least 2, got {args.batch_size}"),
        (args.steps >= 1, f"--steps must be at least 1, got {args.steps}"),
        (args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (args.views_per_image >= (2 if args.pairs == "views" else 1),
         f"--views-per-image must be at least 2 for --pairs views (two views of each image), got {args.views_per_image}"),
        (args.image_size is None or args.image_size >= 16, f"--image-size must be at least 16, got {args.image_size}"),
        (args.max_images >= 2, f"--max-images must be at least 2, got {args.max_images}"),
        (args.workers is None or args.workers >= 0, f"--workers must be 0 or more, got {args.workers}"),
        (0 < args.val_fraction < 1, f"--val-fraction must lie in (0, 1), got {args.val_fraction}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def mi_splits(root: str | Path, val_fraction: float, seed: int, need_labels: bool) -> tuple[ImageList, ImageList]:
    """(train, held-out) `ImageList`s of DIR.

    Labelled data is split by `train.eval_data.labelled_splits` (the same split
    as every evaluation command). Unlabelled data is fine for view pairs, which
    never look at labels: a seeded random `val_fraction` is held out instead.
    Class pairs need labels, and say so.
    """
    root = Path(str(root)).expanduser()
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, val = open_images(root / "train"), open_images(root / "val")
    else:
        images = open_images(root)
        if not hasattr(images, "samples"):
            raise DataError(f"{root} is an FFCV file; iecl mi reads images: a folder, a file list or tar shards")
        if all(label != UNLABELED for _, label in images.samples):
            splits = labelled_splits(root, val_fraction, seed)
            train, val = splits.train, splits.val
        else:
            if len(images) < 2:
                raise DataError(f"{root} has {len(images)} image; holding out images needs at least 2")
            perm = np.random.default_rng(seed).permutation(len(images))
            n_val = min(len(images) - 1, max(1, round(len(images) * val_fraction)))
            train, val = subset(images, sorted(perm[n_val:])), subset(images, sorted(perm[:n_val]))
    unlabelled = any(label == UNLABELED for images in (train, val) for _, label in images.samples)
    if need_labels and unlabelled:
        raise DataError(
            f"{root} has unlabelled images, and --pairs class pairs different images of the same class, so it "
            "needs labels (an ImageNet-style folder DIR/<class>/<image>, a file list with labels, or tar shards "
            "with .cls files); --pairs views works without labels"
        )
    return train, val


def _cap(images: ImageList, max_images: int, seed: int) -> ImageList:
    """At most `max_images` of `images`, a seeded random subset (features of
    every image are held in memory; a few tens of thousands estimate well)."""
    if len(images) <= max_images:
        return images
    keep = np.random.default_rng([seed, 1]).choice(len(images), max_images, replace=False)
    return subset(images, sorted(keep))


def _sampler(images: ImageList, kept: list[int] | None, args: argparse.Namespace) -> PairSampler:
    """The pair sampler of the images at `kept` (all when None)."""
    kept = list(range(len(images))) if kept is None else kept
    labels = torch.tensor([images.samples[i][1] for i in kept], dtype=torch.long) if args.pairs == "class" else None
    return PairSampler(len(kept), args.views_per_image, args.pairs, labels)


def _batch_size(requested: int | None, pretrain_batch: int, samplers: list[PairSampler]) -> int:
    """K: as requested, or the default max(1024, 4 B); never more than each split
    can fill with distinct anchors. A requested K that does not fit is an error
    (its ceiling is part of what the user asked for); the default is lowered."""
    allowed = min(s.available for s in samplers)
    what = "images" if samplers[0].pairs == "views" else "images whose class has another image in the split"
    advice = ("hold out more images (--val-fraction), use more data" if allowed >= 2
              else "use more data or a larger --val-fraction")
    if allowed < 2:
        raise DataError(f"a split has fewer than 2 {what}, too few for any batch; {advice}")
    if requested is not None:
        if requested > allowed:
            raise DataError(
                f"--batch-size {requested} needs {requested} {what} in both the held-out and the train split, "
                f"which have {samplers[0].available} and {samplers[1].available}: lower --batch-size to at most "
                f"{allowed}, or {advice}"
            )
        return requested
    k = max(1024, 4 * pretrain_batch)
    if k > allowed:
        print(
            f"iecl mi: warning: K lowered from {k} to {allowed}: the held-out split has {samplers[0].available} "
            f"{what}, the train split {samplers[1].available}; the ceiling is now log(2K-1) = "
            f"{infonce_mi_ceiling(allowed):.3f} nats ({advice} for a larger K)",
            file=sys.stderr,
        )
        if allowed <= pretrain_batch:
            print(f"iecl mi: warning: K={allowed} is not above the pretraining batch ({pretrain_batch}): "
                  "this estimate is capped as low as the in-training one", file=sys.stderr)
        k = allowed
    return k


def _fit_after_unreadable(k: int, train: PairSampler, val: PairSampler) -> int:
    """Unreadable images leave fewer anchors than counted before extraction."""
    allowed = min(train.available, val.available)
    if allowed < 2:
        raise DataError("too few readable images are left for a batch of 2 pairs; list them: iecl validate DIR")
    if k > allowed:
        print(f"iecl mi: warning: K lowered from {k} to {allowed}: unreadable images were left out", file=sys.stderr)
    return min(k, allowed)


def _report(args, cfg, state, image_size, k, held_out, on_train, train_sampler, val_sampler, bad, device) -> dict:
    b = cfg.train.batch_size
    report = {
        "checkpoint": str(args.checkpoint),
        "method": cfg.method.name,
        "backbone": cfg.model.backbone,
        "step": state.get("step"),
        "data": str(args.data),
        "pairs": args.pairs,
        "recipe": cfg.data.recipe,
        "image_size": image_size,
        "views_per_image": args.views_per_image,
        "batch_size": k,
        "steps": args.steps,
        "lr": args.lr,
        "seed": args.seed,
        "device": str(device),
        "ceiling_nats": infonce_mi_ceiling(k),
        "ceiling_bits": infonce_mi_ceiling(k) / LOG2,
        "pretrain_batch_size": b,
        "pretrain_ceiling_nats": infonce_mi_ceiling(b),
        "pretrain_ceiling_bits": infonce_mi_ceiling(b) / LOG2,
        "held_out": held_out.as_dict(),
        "train": on_train.as_dict(),
        "unreadable": bad,
    }
    if args.pairs == "class":
        for name, sampler in (("held_out", val_sampler), ("train", train_sampler)):
            report[name]["class_entropy_nats"] = sampler.class_entropy()
            report[name]["class_entropy_bits"] = sampler.class_entropy() / LOG2
    return report


def _print_report(r: dict) -> None:
    def line(label: str, nats: float, note: str) -> None:
        print(f"  {label:<10} {nats:7.3f} nats  {nats / LOG2:7.3f} bits  {note}")

    held, train = r["held_out"], r["train"]
    line("held-out", held["nats"], f"the estimate: {held['images']} images, {held['batches']} batches of K={r['batch_size']}")
    line("train", train["nats"], f"the critic's own images ({train['images']}); well above held-out = overfit")
    line("ceiling", r["ceiling_nats"], f"log(2K-1), K={r['batch_size']}: no estimate at this K can exceed it")
    own = r["pretrain_method_ceiling_nats"]
    own = "" if own is None or math.isclose(own, r["pretrain_ceiling_nats"]) else f" ({r['method']}'s own loss: {own:.3f})"
    line("pretrain", r["pretrain_ceiling_nats"], f"log(2B-1), B={r['pretrain_batch_size']}: the pretraining batch's ceiling{own}")
    if "class_entropy_nats" in held:
        line("H(C)", held["class_entropy_nats"], "class entropy of the held-out pairs: the true MI of class pairs is at most this")
    if held["nats"] > 0.9 * r["ceiling_nats"]:
        print("  the estimate is near its ceiling: the true MI may be higher; a larger --batch-size would show more")
    if train["nats"] - held["nats"] > max(0.5, 0.1 * r["ceiling_nats"]):
        print("  the train estimate is well above the held-out one: the critic overfit; "
              "lower --steps, raise --views-per-image or use more images")
    print(f"iecl mi: done in {r['seconds']['total']:.1f} s "
          f"(features {r['seconds']['features']:.1f} s, critic {r['seconds']['critic']:.1f} s)")

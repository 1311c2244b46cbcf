"""`iecl mi`: post-training mutual-information estimation, after *Towards a
Rigorous Analysis of Mutual Information in Contrastive Learning* (Lee et al.
2023, arXiv:2308.15704). An InfoNCE estimate measured *during* pretraining can never exceed log(2K - 1) for the training batch K, so
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
matrix products. Everything that works on features (train/eval/pairs.py `PairSampler`,
model/heads.py `Critic`, `nt_xent`, `train_critic`, `estimate_mi`) is
testable without images. The features come from train/eval/view_features.py;
the command is train/cli/mi.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from iecl.model.diagnostics import infonce_mi_bound, infonce_mi_ceiling
from iecl.model.heads import Critic
from iecl.model.losses.ntxent import nt_xent
from iecl.pipeline import DataError, ImageList, open_images
from iecl.pipeline.folder import UNLABELED
from iecl.train.eval.pairs import PairSampler
from iecl.train.eval.splits import labelled_splits, subset

LOG2 = math.log(2)


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


def mi_splits(root: str | Path, val_fraction: float, seed: int, need_labels: bool) -> tuple[ImageList, ImageList]:
    """(train, held-out) `ImageList`s of DIR.

    Labelled data is split by `train.eval.splits.labelled_splits` (the same split
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


def heldout_cap(images: ImageList, max_images: int, seed: int) -> ImageList:
    """At most `max_images` of `images`, a seeded random subset (features of
    every image are held in memory; a few tens of thousands estimate well)."""
    if len(images) <= max_images:
        return images
    keep = np.random.default_rng([seed, 1]).choice(len(images), max_images, replace=False)
    return subset(images, sorted(keep))

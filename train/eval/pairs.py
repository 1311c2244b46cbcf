"""Which cached feature rows form the positive pairs of the MI critic's
batches (`iecl mi`, train/eval/mi.py): two views of one image, or two
different images of one class."""

from __future__ import annotations

from collections.abc import Iterator

import torch

PAIRS = ("views", "class")


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

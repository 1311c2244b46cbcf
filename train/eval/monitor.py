"""What the training loop measures besides its losses.

- `step_diagnostics`: effective rank and Renyi-2 entropy of the last step's
  online embeddings, and for contrastive methods the InfoNCE lower bound on the
  views' mutual information with its ceiling (model/diagnostics.py). Computed
  only on logged steps, from one batch: a few small SVD/matmul calls.
- `KnnMonitor`: weighted kNN top-1/top-5 of the frozen backbone (k=200,
  tau=0.1 by default) every `eval.knn_every` epochs and at the end, on
  labelled data (`eval.knn_data`, or the training data split per class).
"""

from __future__ import annotations

import time

import torch

from iecl.model.diagnostics import diagnostics
from iecl.model.methods import Method
from iecl.pipeline import BetonFile, DataError, ImageList
from iecl.train.config import Config, ConfigError
from iecl.train.eval.splits import LabelledSplits, labelled_splits


def step_diagnostics(method: Method, losses: dict[str, torch.Tensor], embeddings: tuple[torch.Tensor, torch.Tensor],
                     batch_size: int) -> dict[str, float]:
    z_anchor, z_query = embeddings
    if method.nce_directions and "loss_nce" in losses:
        return diagnostics(
            z_query, z_anchor, losses["loss_nce"],
            candidates=method.nce_candidates(batch_size), directions=method.nce_directions,
        )
    return diagnostics(z_query, z_anchor)


def knn_splits(cfg: Config, images: ImageList | BetonFile) -> LabelledSplits | None:
    """The monitor's labelled data, or None when it is off; a `ConfigError`
    saying what to set when the data cannot serve (checked before training)."""
    e = cfg.eval
    if not e.knn_every:
        return None
    root = e.knn_data
    if not root:
        if isinstance(images, BetonFile):
            raise ConfigError(
                "eval.knn_every needs labelled images and an FFCV .beton cannot be read by the monitor; "
                "set eval.knn_data to an ImageNet-style folder (with train/ and val/, or one to split) "
                "or eval.knn_every=0"
            )
        root = images.root
    try:
        return labelled_splits(root, e.val_fraction, cfg.run.seed)
    except DataError as err:
        raise ConfigError(f"the kNN monitor (eval.knn_every={e.knn_every}) cannot use {root}: {err}; "
                          "set eval.knn_data to labelled data or eval.knn_every=0") from None


class KnnMonitor:
    def __init__(self, cfg: Config, splits: LabelledSplits | None, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> None:
        self.cfg, self.splits, self.device, self.autocast_dtype = cfg, splits, device, autocast_dtype
        self.last: dict | None = None

    def due(self, epoch: int, batch_in_epoch: int, step: int, total: int) -> bool:
        """At the end of every `knn_every`-th epoch, and at the end of the run."""
        if self.splits is None:
            return False
        epoch_end = batch_in_epoch == 0 and epoch > 0 and epoch % self.cfg.eval.knn_every == 0
        return epoch_end or step == total

    def run(self, method: Method) -> dict:
        from iecl.train.eval.knn import knn_evaluate

        e, s = self.cfg.eval, self.splits
        start = time.perf_counter()
        result = knn_evaluate(
            method.backbone(), s.train, s.val,
            num_classes=s.num_classes, image_size=self.cfg.data.image_size,
            batch_size=self.cfg.train.batch_size, workers=self.cfg.data.workers, device=self.device,
            k=e.knn_k, tau=e.knn_tau, autocast_dtype=self.autocast_dtype,
            max_train_images=e.knn_max_images, seed=self.cfg.run.seed,
        )
        self.last = {f"knn_{key}": value for key, value in result.items() if key in ("top1", "top5")}
        self.last["knn_seconds"] = time.perf_counter() - start
        return self.last

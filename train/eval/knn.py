"""Weighted kNN classification on frozen features (the kNN monitor).

The classifier of InstDisc (Wu et al. 2018, eq. 6) as used by MoCo's kNN
monitor: features are L2-normalised, a test point's k nearest training points
by cosine similarity vote for their labels with weight exp(sim / tau), and the
class with the largest total weight wins. No training, so it tracks
representation quality during pretraining at the cost of one pass over the
train and test sets.

`extract_features` takes any iterable of `(images, labels)` batches; the caller
builds it (plain test-time transforms, no augmentation, no dropped batches).
`knn_evaluate` does the whole evaluation from two labelled image lists (the
centre-crop `EvalLoader` of pipeline/eval_views.py): what the training loop's
monitor and `iecl knn` call.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from iecl.pipeline.eval_views import EvalLoader
from iecl.pipeline.folder import ImageList
from iecl.train.eval.splits import subset


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str,
    autocast_dtype: torch.dtype | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of every batch: `(N, F)` float32 L2-normalised rows, labels `(N,)` int64.

    `normalize=False` keeps the raw features (what a linear probe trains on).

    The backbone runs in eval mode (BatchNorm uses its running statistics; the
    spectral-norm power iteration does not step) and is put back in the mode it
    was in. `autocast_dtype` (e.g. torch.bfloat16) runs the forward under
    autocast; the features are normalised in float32 either way. Both outputs
    stay on `device`.
    """
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    try:
        for images, batch_labels in loader:
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = backbone(images)
            out = out.float().flatten(1)
            features.append(F.normalize(out, dim=1) if normalize else out)
            labels.append(torch.as_tensor(batch_labels).to(device, torch.long, non_blocking=True))
    finally:
        backbone.train(was_training)
    if not features:
        raise ValueError("extract_features: the loader yielded no batches")
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    tau: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores `(M, C)`: score[i, c] = sum over the k nearest training points j of class c of exp(sim_ij / tau).

    Features are expected L2-normalised (`extract_features` does it), so
    sim = dot product = cosine similarity. The test rows are processed `chunk`
    at a time, so the similarity matrix held at once is `(chunk, N)`. k is
    clipped to the number of training points. Runs in float32 outside
    autocast, on the features' device.
    """
    assert train_features.shape[0] == train_labels.shape[0], "one label per training feature"
    assert train_features.shape[1] == test_features.shape[1], "train and test feature widths differ"
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    k = min(k, train_features.shape[0])
    train_labels = train_labels.to(train_features.device, torch.long)
    scores = torch.empty(test_features.shape[0], num_classes, device=test_features.device)
    with torch.autocast(train_features.device.type, enabled=False):
        train_features = train_features.float()
        for start in range(0, test_features.shape[0], chunk):
            rows = test_features[start : start + chunk].float()
            sim = rows @ train_features.T  # (chunk, N)
            sim_k, idx = sim.topk(k, dim=1)  # (chunk, k)
            weights = (sim_k / tau).exp()
            neighbour_labels = train_labels[idx]  # (chunk, k)
            chunk_scores = torch.zeros(rows.shape[0], num_classes, device=rows.device)
            chunk_scores.scatter_add_(1, neighbour_labels, weights)
            scores[start : start + rows.shape[0]] = chunk_scores
    return scores


@torch.no_grad()
def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    tau: float = 0.1,
    chunk: int = 1024,
) -> dict[str, float]:
    """Top-1 (and top-5 when num_classes >= 5) accuracy of `knn_predict`, as fractions in [0, 1]."""
    if test_features.shape[0] == 0:
        raise ValueError("knn_accuracy: the test set is empty")
    scores = knn_predict(train_features, train_labels, test_features, num_classes, k, tau, chunk)
    test_labels = test_labels.to(scores.device, torch.long)
    ranked = scores.topk(min(5, num_classes), dim=1).indices  # (M, 5), best first
    hits = ranked == test_labels[:, None]
    result = {"top1": hits[:, 0].float().mean().item()}
    if num_classes >= 5:
        result["top5"] = hits.any(dim=1).float().mean().item()
    return result


def knn_evaluate(
    backbone: nn.Module,
    train_images: ImageList,
    val_images: ImageList,
    *,
    num_classes: int,
    image_size: int,
    batch_size: int,
    workers: int,
    device: torch.device | str,
    k: int = 200,
    tau: float = 0.1,
    autocast_dtype: torch.dtype | None = None,
    max_train_images: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """kNN accuracy of `backbone` on centre-cropped images: train images vote, val images are classified.

    `max_train_images` > 0 uses a random subset of that many train images,
    the same one for a given `seed` every time (the training loop's monitor
    bounds its cost this way, and its numbers stay comparable across epochs).
    The backbone is left in the train/eval mode it was in.

    Returns top1 (and top5 when num_classes >= 5) as fractions, k, tau, the
    images used (train_images, val_images: unreadable ones are skipped),
    train_images_total, bad_files ("name (reason)") and seconds.
    """
    start = time.perf_counter()
    total_train = len(train_images)
    train_images = _train_subset(train_images, max_train_images, seed)
    common = {"image_size": image_size, "batch_size": batch_size, "workers": workers, "device": device,
              "autocast_dtype": autocast_dtype, "progress": progress}
    train_features, train_labels, bad = image_features(backbone, train_images, desc="kNN train features", **common)
    val_features, val_labels, bad_val = image_features(backbone, val_images, desc="kNN val features", **common)
    result = knn_accuracy(train_features, train_labels, val_features, val_labels, num_classes, k, tau)
    return {
        **result,
        "k": k,
        "tau": tau,
        "train_images": len(train_labels),
        "val_images": len(val_labels),
        "train_images_total": total_train,
        "bad_files": bad + bad_val,
        "seconds": time.perf_counter() - start,
    }


def _train_subset(images: ImageList, max_images: int, seed: int) -> ImageList:
    """A seeded random subset of `max_images` images (kept in index order: sequential reads)."""
    if max_images <= 0 or max_images >= len(images):
        return images
    chosen = np.sort(np.random.default_rng(seed).choice(len(images), max_images, replace=False))
    return subset(images, chosen)


def image_features(
    backbone: nn.Module,
    images: ImageList,
    *,
    image_size: int,
    batch_size: int,
    workers: int,
    device: torch.device | str,
    autocast_dtype: torch.dtype | None = None,
    normalize: bool = True,
    progress: bool = False,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """`extract_features` of the centre crops of `images` -> (features, labels, unreadable images skipped)."""
    from tqdm import tqdm

    loader = EvalLoader(images, batch_size=batch_size, image_size=image_size, workers=workers, device=device)
    try:
        batches = tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False, dynamic_ncols=True)
        features, labels = extract_features(backbone, batches, device, autocast_dtype, normalize=normalize)
    finally:
        loader.close()
    return features, labels, loader.bad_files

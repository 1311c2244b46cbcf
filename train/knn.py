"""Weighted kNN classification on frozen features (the kNN monitor).

The classifier of InstDisc (Wu et al. 2018, eq. 6) as used by MoCo's kNN
monitor: features are L2-normalised, a test point's k nearest training points
by cosine similarity vote for their labels with weight exp(sim / tau), and the
class with the largest total weight wins. No training, so it tracks
representation quality during pretraining at the cost of one pass over the
train and test sets.

`extract_features` takes any iterable of `(images, labels)` batches; the caller
builds it (plain test-time transforms, no augmentation, no dropped batches).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of every batch: `(N, F)` float32 L2-normalised rows, labels `(N,)` int64.

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
            features.append(F.normalize(out.float().flatten(1), dim=1))
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

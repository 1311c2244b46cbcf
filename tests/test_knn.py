"""Weighted kNN classifier (train/eval/knn.py): hand-computed scores and behaviour on synthetic clusters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iecl.train.eval.knn import extract_features, knn_accuracy, knn_predict


def _unit(*angles_deg: float) -> torch.Tensor:
    rad = torch.tensor(angles_deg, dtype=torch.float64).deg2rad()
    return torch.stack([rad.cos(), rad.sin()], dim=1).float()


def test_knn_scores_hand_computed():
    # Train points on the unit circle at 0, 40, 100, 180 degrees, classes 0, 1, 0, 1;
    # the test point at 10 degrees has similarities cos(10), cos(30), cos(90), cos(170),
    # so its k=3 neighbours are the first three.
    train = _unit(0, 40, 100, 180)
    labels = torch.tensor([0, 1, 0, 1])
    test = _unit(10)
    tau = 0.5
    w = [math.exp(math.cos(math.radians(a)) / tau) for a in (10, 30, 90)]
    scores = knn_predict(train, labels, test, num_classes=2, k=3, tau=tau)
    expected = torch.tensor([[w[0] + w[2], w[1]]])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0)


def _clusters(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, 16, generator=torch.Generator().manual_seed(0)) * 2.0
    labels = torch.arange(5).repeat_interleave(n_per_class)
    points = centres[labels] + 0.5 * torch.randn(len(labels), 16, generator=generator)
    return F.normalize(points, dim=1), labels


def test_knn_separates_clusters_and_not_shuffled_labels():
    train, train_labels = _clusters(100, seed=1)
    test, test_labels = _clusters(40, seed=2)
    accuracy = knn_accuracy(train, train_labels, test, test_labels, num_classes=5, k=20)
    assert accuracy["top1"] > 0.9
    assert accuracy["top5"] == 1.0  # 5 classes: every class is in the top 5
    shuffled = train_labels[torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(3))]
    assert knn_accuracy(train, shuffled, test, test_labels, num_classes=5, k=20)["top1"] < 0.4


def test_chunking_does_not_change_scores():
    train, train_labels = _clusters(20, seed=1)
    test, _ = _clusters(7, seed=2)  # 35 rows: chunks of 8 leave a partial last one
    whole = knn_predict(train, train_labels, test, 5, k=10, chunk=1024)
    for chunk in (1, 8):
        torch.testing.assert_close(knn_predict(train, train_labels, test, 5, k=10, chunk=chunk), whole)


def test_k_larger_than_train_set_uses_every_point():
    train = _unit(0, 40, 100, 180)
    labels = torch.tensor([0, 1, 0, 1])
    test = _unit(10, 200)
    scores = knn_predict(train, labels, test, num_classes=3, k=200, tau=0.1)
    sims = test @ train.T
    expected = torch.stack([(sims / 0.1).exp()[:, labels == c].sum(dim=1) for c in range(3)], dim=1)
    torch.testing.assert_close(scores, expected)
    assert set(knn_accuracy(train, labels, test, torch.tensor([0, 1]), 3, k=200)) == {"top1"}


def test_extract_features_normalises_and_restores_mode():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    backbone.train()
    running_mean = backbone[1].running_mean.clone()
    loader = [(torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])), (torch.randn(2, 3, 8, 8), torch.tensor([1, 1]))]
    features, labels = extract_features(backbone, loader, "cpu")
    assert features.shape == (5, 4) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=1), torch.ones(5))
    assert labels.tolist() == [0, 1, 2, 1, 1]
    assert backbone.training
    torch.testing.assert_close(backbone[1].running_mean, running_mean)  # eval mode: stats untouched
    bf16, _ = extract_features(backbone, loader, "cpu", autocast_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, features, atol=3e-2, rtol=0)


def test_knn_accuracy_rejects_empty_test_set():
    with pytest.raises(ValueError, match="empty"):
        knn_accuracy(torch.ones(2, 2), torch.zeros(2), torch.ones(0, 2), torch.zeros(0), 2)

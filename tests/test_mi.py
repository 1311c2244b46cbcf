"""Post-training MI estimation (train/eval/mi.py): the estimator on synthetic features
with known answers, the pair samplers, and `iecl mi` end to end."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from iecl.model.losses.ntxent import nt_xent
from iecl.train.cli import main
from iecl.train.eval.mi import estimate_mi, train_critic
from iecl.train.eval.pairs import PairSampler

LOG2 = math.log(2)


@pytest.fixture(autouse=True)
def _one_thread():
    """The critic's matrices are tiny: a second thread only adds synchronisation,
    and on a loaded machine OpenMP's spin-waits made these tests 50x slower
    with 2 threads than with 1 (measured: 47 s against 0.5 s for one critic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _estimates(train, held_out, pairs="views", train_labels=None, held_out_labels=None, *, k, steps, seed=0):
    """(held-out estimate, train estimate) of a critic trained on `train` (N, V, F)."""
    train_sampler = PairSampler(train.shape[0], train.shape[1], pairs, train_labels)
    held_out_sampler = PairSampler(held_out.shape[0], held_out.shape[1], pairs, held_out_labels)
    critic = train_critic(train, train_sampler, batch_size=k, steps=steps, seed=seed)
    return (estimate_mi(critic, held_out, held_out_sampler, batch_size=k, seed=1),
            estimate_mi(critic, train, train_sampler, batch_size=k, seed=1))


def _noisy_copies(n: int, views: int, dim: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """V views per image that are one random vector plus independent noise."""
    return torch.randn(n, 1, dim, generator=generator) + noise * torch.randn(n, views, dim, generator=generator)


# ----------------------------------------------------------------------------- the loss


def test_nt_xent_at_chance_is_the_ceiling_and_perfect_pairs_give_zero():
    k = 8
    same = torch.nn.functional.normalize(torch.ones(k, 4), dim=1)  # every score equal: chance
    assert nt_xent(same, same, 1.0).item() == pytest.approx(math.log(2 * k - 1), abs=1e-6)
    basis = torch.eye(k)  # orthogonal pairs, each identical to its partner: loss -> 0 as the scale grows
    assert nt_xent(basis, basis, 50.0).item() < 1e-6


# ----------------------------------------------------------------------------- synthetic features


def test_identical_pairs_approach_the_ceiling_and_never_exceed_it():
    g = torch.Generator().manual_seed(0)
    held_out, train = _estimates(_noisy_copies(512, 4, 32, 0.05, g), _noisy_copies(256, 4, 32, 0.05, g), k=32, steps=200)
    ceiling = math.log(63)
    assert held_out.ceiling == pytest.approx(ceiling)
    # Measured: 4.135 of 4.143 nats (99.8%).
    assert 0.9 * ceiling < held_out.nats <= ceiling
    assert train.nats <= ceiling
    assert held_out.bits == pytest.approx(held_out.nats / LOG2)


def test_independent_views_give_about_zero_and_the_critic_is_judged_on_held_out_images():
    g = torch.Generator().manual_seed(1)
    held_out, train = _estimates(torch.randn(2048, 4, 32, generator=g), torch.randn(256, 4, 32, generator=g),
                                 k=32, steps=100)
    assert (held_out.images, train.images) == (256, 2048)  # each estimate on its own images
    assert abs(held_out.nats) < 0.2  # measured: -0.018 (train +0.008)
    # Few images and many steps: the critic memorises the training pairs, which
    # only the held-out estimate exposes (measured: train +3.22, held-out -1.39).
    g = torch.Generator().manual_seed(2)
    held_out, train = _estimates(torch.randn(256, 4, 32, generator=g), torch.randn(256, 4, 32, generator=g),
                                 k=32, steps=400)
    assert train.nats > 0.5
    assert held_out.nats < 0.2
    assert train.nats - held_out.nats > 0.5


def test_class_pairs_reach_the_class_entropy_and_not_beyond():
    g = torch.Generator().manual_seed(3)
    classes, k = 4, 64
    centres = 2 * torch.randn(classes, 32, generator=g)

    def only_the_class(n):  # views of an image share nothing but the class
        labels = torch.arange(n) % classes
        return centres[labels][:, None] + torch.randn(n, 4, 32, generator=g), labels

    (train, train_labels), (held, held_labels) = only_the_class(1024), only_the_class(512)
    held_out, _ = _estimates(train, held, "class", train_labels, held_labels, k=k, steps=200)
    h_c = PairSampler(512, 4, "class", held_labels).class_entropy()
    assert h_c == pytest.approx(math.log(classes))
    # A perfect class critic scores log(2K-1) - E log(1 + 2X), X the batch's other
    # anchors of the class (each brings two same-class negatives): 1.389 nats here
    # (K=64 of 512 images, by simulation), a hair *above* log 4 = 1.386, because
    # negatives that come in same-class pairs are not the independent ones the
    # bound assumes; the excess shrinks like 1/K. Measured: 1.3875.
    assert 0.9 * h_c < held_out.nats < h_c + 0.05
    assert held_out.nats < held_out.ceiling


# ----------------------------------------------------------------------------- pairs


def test_view_pairs_take_an_anchor_and_a_query_view_of_the_same_image():
    sampler = PairSampler(10, 4, "views")
    a, b = sampler.random_batch(10, torch.Generator().manual_seed(0))
    assert torch.equal(a // 4, b // 4)
    assert set((a % 4).tolist()) <= {0, 2} and set((b % 4).tolist()) <= {1, 3}
    assert sorted((a // 4).tolist()) == list(range(10))  # distinct anchors


def test_class_pairs_take_another_image_of_the_class_and_skip_lone_images():
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 1, 3])  # classes 2 and 3 have one image each
    sampler = PairSampler(8, 2, "class", labels)
    assert sampler.available == 6
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        a, b = sampler.random_batch(6, g)
        anchors, partners = a // 2, b // 2
        assert torch.all(anchors != partners)
        assert torch.equal(labels[anchors], labels[partners])
        assert not ({3, 7} & set(anchors.tolist()))
    # H(C) is that of the pairs' anchors: classes 0 and 1, three images each.
    assert sampler.class_entropy() == pytest.approx(math.log(2))


def test_a_sweep_covers_every_anchor_in_full_batches():
    sampler = PairSampler(10, 2, "views")
    batches = list(sampler.sweep(4, 3, torch.Generator().manual_seed(0)))
    assert len(batches) == 3 * 2 and all(len(a) == 4 for a, _ in batches)
    with pytest.raises(ValueError):
        sampler.random_batch(11, torch.Generator())


# ----------------------------------------------------------------------------- iecl mi

TINY = ["--image-size", "32", "--batch-size", "8", "--steps", "20", "--views-per-image", "2",
        "--val-fraction", "0.25", "--workers", "0", "--no-progress"]


def _finite_below_ceiling(report: dict) -> None:
    ceiling = math.log(2 * 8 - 1)
    assert report["batch_size"] == 8 and report["ceiling_nats"] == pytest.approx(ceiling)
    assert report["ceiling_bits"] == pytest.approx(ceiling / LOG2)
    assert report["pretrain_ceiling_nats"] == pytest.approx(math.log(2 * report["pretrain_batch_size"] - 1))
    for split in ("held_out", "train"):
        assert math.isfinite(report[split]["nats"]) and report[split]["nats"] < ceiling
        assert report[split]["bits"] == pytest.approx(report[split]["nats"] / LOG2)


def test_iecl_mi_view_pairs_end_to_end(tiny_checkpoint, tiny_data, tmp_path, capsys):
    out = tmp_path / "mi.json"
    assert main(["mi", str(tiny_checkpoint), "--data", str(tiny_data), *TINY, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    _finite_below_ceiling(report)
    assert (report["method"], report["backbone"], report["step"]) == ("iecl", "resnet18", 4)
    assert (report["held_out"]["images"], report["train"]["images"]) == (12, 36)  # 3 of each class's 12 held out
    assert "class_entropy_nats" not in report["held_out"]
    printed = capsys.readouterr().out
    assert "held-out" in printed and "log(2K-1)" in printed and "bits" in printed


def test_iecl_mi_class_pairs_end_to_end(tiny_checkpoint, tiny_data, tmp_path):
    out = tmp_path / "mi.json"
    assert main(["mi", str(tiny_checkpoint), "--data", str(tiny_data), "--pairs", "class", *TINY,
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    _finite_below_ceiling(report)
    assert report["held_out"]["class_entropy_nats"] == pytest.approx(math.log(4))  # 4 balanced classes
    assert report["held_out"]["class_entropy_bits"] == pytest.approx(2.0)


def test_iecl_mi_help():
    with pytest.raises(SystemExit) as exit_:
        main(["mi", "--help"])
    assert exit_.value.code == 0


@pytest.fixture
def unlabelled(tiny_data, tmp_path):
    """16 of tiny_data's images in one flat folder: no classes."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted(tiny_data.rglob("*.JPEG"))[::3]:
        shutil.copy(path, flat / path.name)
    return flat


def test_unlabelled_data_class_pairs_refused_view_pairs_work(tiny_checkpoint, unlabelled, tmp_path, capsys):
    assert main(["mi", str(tiny_checkpoint), "--data", str(unlabelled), "--pairs", "class", *TINY]) == 2
    err = capsys.readouterr().err
    assert "iecl mi: error:" in err and "needs labels" in err and "--pairs views" in err
    out = tmp_path / "mi.json"
    # Unlabelled view pairs: a seeded random half held out (8 and 8 images fit K=8).
    args = [*TINY, "--val-fraction", "0.5", "--steps", "5", "--json", str(out)]
    assert main(["mi", str(tiny_checkpoint), "--data", str(unlabelled), *args]) == 0
    report = json.loads(out.read_text())
    assert (report["held_out"]["images"], report["train"]["images"]) == (8, 8)


def test_a_batch_the_held_out_split_cannot_fill_names_what_to_lower(tiny_checkpoint, tiny_data, capsys):
    args = [a if a != "8" else "16" for a in TINY]  # K=16 > the 12 held-out images
    assert main(["mi", str(tiny_checkpoint), "--data", str(tiny_data), *args]) == 2
    err = capsys.readouterr().err
    assert "lower --batch-size to at most 12" in err and "--val-fraction" in err


def test_the_mi_views_are_the_pretraining_loaders_pairs(tiny_data):
    """Views (2e, 2e+1) of image i are what the training loader gives i in epoch e."""
    import numpy as np

    from iecl.pipeline import scan_image_folder
    from iecl.pipeline.augment import get_recipe
    from iecl.pipeline.reference import TwoViewDataset
    from iecl.train.eval.view_features import _ManyViews

    images, recipes = scan_image_folder(tiny_data), get_recipe("byol")  # asymmetric: the views keep their order
    many = _ManyViews(images, recipes, 32, views=4, seed=7)
    training = TwoViewDataset(images, recipes, 32, seed=7)
    for i in (0, 5, 17):
        _, views, _ = many[i]
        for epoch in (0, 1):
            anchor, query, _, _ = training[(epoch, i)]
            assert np.array_equal(views[2 * epoch], anchor) and np.array_equal(views[2 * epoch + 1], query)

"""Linear evaluation: a linear classifier trained on the frozen backbone's features.

The protocol of the IE-CL paper (MoCo's, with its hyper-parameters): one
`nn.Linear(feature_dim, num_classes)` (weights N(0, 0.01), bias 0) on the
backbone's raw pooled features, SGD with momentum 0.9, weight decay 1e-5,
batch 512, learning rate 0.03 (used as given, not scaled with the batch),
cosine-annealed to zero per step over 200 epochs. The accuracy reported is
the FINAL epoch's top-1/top-5 on the validation images (centre crops), not the
best epoch's (choosing the best on the evaluation set would overstate it).

Two ways to get the training features:

- augmented (the paper's): every epoch sees new RandomResizedCrop + flip
  views, so the frozen backbone (eval mode, no grad) runs over the train set
  every epoch;
- cached: the centre-cropped train set goes through the backbone ONCE and the
  probe trains on those features; much faster, usually a little lower. The
  features can be kept in a file (`feature_cache`), keyed by the backbone's
  weights, the images and the crop size, so a second run skips extraction.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from iecl.pipeline.errors import DataError
from iecl.pipeline.eval_views import EvalLoader
from iecl.pipeline.folder import ImageList
from iecl.train.checkpoint import save_atomic
from iecl.train.eval.knn import image_features

#: Bump when the cached features would change for the same key (transform, normalisation).
CACHE_VERSION = 1
_CACHE_MARK = "iecl-lineval-feature-cache"


# ----------------------------------------------------------------- the probe


def make_probe(feature_dim: int, num_classes: int, seed: int = 0, device: torch.device | str = "cpu") -> nn.Linear:
    """nn.Linear with weights N(0, 0.01) and zero bias (MoCo's initialisation), seeded."""
    probe = nn.Linear(feature_dim, num_classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(probe.weight.shape, generator=generator) * 0.01)
        probe.bias.zero_()
    return probe.to(device)


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Half-cosine from base_lr at step 0 to 0 at total_steps."""
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


class ProbeTrainer:
    """SGD on the probe with a per-step cosine schedule; `epoch(batches)` -> mean loss."""

    def __init__(self, probe: nn.Linear, *, lr: float, momentum: float, weight_decay: float, total_steps: int) -> None:
        self.probe, self.lr, self.total_steps, self.step = probe, lr, total_steps, 0
        self.optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def epoch(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
        self.probe.train()
        loss_sum, seen = 0.0, 0
        for features, labels in batches:
            for group in self.optimizer.param_groups:
                group["lr"] = cosine_lr(self.lr, self.step, self.total_steps)
            loss = F.cross_entropy(self.probe(features.float()), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            loss_sum += loss.item() * len(labels)
            seen += len(labels)
        return loss_sum / max(seen, 1)


def train_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 200,
    batch_size: int = 512,
    lr: float = 0.03,
    momentum: float = 0.9,
    weight_decay: float = 1e-5,
    seed: int = 0,
    progress: bool = False,
) -> tuple[nn.Linear, list[float]]:
    """Train a probe on fixed features `(N, F)` (the cached mode) -> (probe, mean train loss of each epoch).

    Runs on the features' device; batches come in a seeded random order each
    epoch, the last one partial."""
    from tqdm import tqdm

    device = features.device
    labels = labels.to(device, torch.long)
    probe = make_probe(features.shape[1], num_classes, seed, device)
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    trainer = ProbeTrainer(probe, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           total_steps=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    with tqdm(range(epochs), desc="linear probe", unit="epoch", disable=not progress, dynamic_ncols=True) as bar:
        for _ in bar:
            order = torch.randperm(len(labels), generator=generator).to(device)
            batches = ((features[idx], labels[idx]) for idx in order.split(batch_size))
            losses.append(trainer.epoch(batches))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    return probe, losses


@torch.no_grad()
def probe_accuracy(probe: nn.Linear, features: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    """Top-1 (and top-5 when there are >= 5 classes) of the probe, as fractions in [0, 1]."""
    if len(labels) == 0:
        raise ValueError("probe_accuracy: the evaluation set is empty")
    num_classes = probe.out_features
    probe.eval()
    hits1 = hits5 = 0
    for start in range(0, len(labels), chunk):
        logits = probe(features[start : start + chunk].float())
        target = labels[start : start + chunk].to(logits.device, torch.long)
        ranked = logits.topk(min(5, num_classes), dim=1).indices
        hits = ranked == target[:, None]
        hits1 += hits[:, 0].sum().item()
        hits5 += hits.any(dim=1).sum().item()
    result = {"top1": hits1 / len(labels)}
    if num_classes >= 5:
        result["top5"] = hits5 / len(labels)
    return result


# ----------------------------------------------------------------- the evaluation


def linear_eval(
    backbone: nn.Module,
    train_images: ImageList,
    val_images: ImageList,
    *,
    num_classes: int,
    image_size: int,
    workers: int,
    device: torch.device | str,
    epochs: int = 200,
    batch_size: int = 512,
    lr: float = 0.03,
    momentum: float = 0.9,
    weight_decay: float = 1e-5,
    cached: bool = False,
    feature_cache: str | os.PathLike | None = None,
    autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Train a linear probe on `backbone` (frozen) with `train_images`, report on `val_images`.

    Returns top1 (top5 with >= 5 classes) of the final epoch, epochs,
    train_loss (per epoch), the image counts used (unreadable images are
    skipped and listed in bad_files), mode, cache_hit, settings and seconds.
    The backbone is left in the train/eval mode it was in.
    """
    if feature_cache is not None and not cached:
        raise ValueError("feature_cache needs cached=True (the augmented mode has no fixed features)")
    start = time.perf_counter()
    device = torch.device(device)
    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "lr_scaled": False, "momentum": momentum,
                "weight_decay": weight_decay, "schedule": "cosine", "image_size": image_size, "seed": seed}
    common = {"image_size": image_size, "workers": workers, "device": device, "autocast_dtype": autocast_dtype,
              "progress": progress}
    was_training = backbone.training
    backbone.eval()
    try:
        if cached:
            feats, cache_hit = _cached_features(backbone, train_images, val_images, feature_cache, batch_size, common)
            probe, losses = train_probe(
                feats["train_features"].to(device), feats["train_labels"].to(device), num_classes,
                epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                seed=seed, progress=progress,
            )
            val_features, val_labels, bad = feats["val_features"].to(device), feats["val_labels"], feats["bad_files"]
            train_used = len(feats["train_labels"])
        else:
            cache_hit = False
            probe, losses, train_used, bad = _train_augmented(
                backbone, train_images, num_classes, epochs=epochs, batch_size=batch_size, lr=lr,
                momentum=momentum, weight_decay=weight_decay, seed=seed, **common,
            )
            val_features, val_labels, bad_val = image_features(backbone, val_images, batch_size=batch_size,
                                                               normalize=False, desc="val features", **common)
            bad = bad + bad_val
    finally:
        backbone.train(was_training)
    return {
        **probe_accuracy(probe, val_features, val_labels),
        "epochs": epochs,
        "train_loss": losses,
        "mode": "cached" if cached else "augmented",
        "cache_hit": cache_hit,
        "train_images": train_used,
        "val_images": len(val_labels),
        "bad_files": bad,
        "settings": settings,
        "seconds": time.perf_counter() - start,
    }


def _train_augmented(
    backbone: nn.Module, train_images: ImageList, num_classes: int, *, epochs: int, batch_size: int, lr: float,
    momentum: float, weight_decay: float, seed: int, image_size: int, workers: int, device: torch.device,
    autocast_dtype: torch.dtype | None, progress: bool,
) -> tuple[nn.Linear, list[float], int, list[str]]:
    """The paper's mode: fresh crops every epoch through the frozen backbone."""
    from tqdm import tqdm

    loader = EvalLoader(train_images, batch_size=batch_size, image_size=image_size, workers=workers, device=device,
                        train_augment=True, seed=seed)
    try:
        probe = make_probe(_feature_dim(backbone, image_size, device), num_classes, seed, device)
        trainer = ProbeTrainer(probe, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               total_steps=epochs * len(loader))
        losses, seen = [], 0
        with tqdm(range(epochs), desc="linear probe", unit="epoch", disable=not progress, dynamic_ncols=True) as bar:
            for epoch in bar:
                loader.set_epoch(epoch)
                batches = tqdm(loader, desc=f"epoch {epoch + 1}", unit="batch", leave=False,
                               disable=not progress, dynamic_ncols=True)
                counter = _Counter(_frozen_features(backbone, batches, device, autocast_dtype))
                losses.append(trainer.epoch(counter))
                seen = counter.images
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    finally:
        loader.close()
    return probe, losses, seen, loader.bad_files


class _Counter:
    """Pass batches through, counting images (the last epoch's count is what was used)."""

    def __init__(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches, self.images = batches, 0

    def __iter__(self):
        for features, labels in self.batches:
            self.images += len(labels)
            yield features, labels


def _frozen_features(backbone: nn.Module, loader: Iterable, device: torch.device,
                     autocast_dtype: torch.dtype | None):
    """(raw features float32, labels) of each batch; no graph is kept (the backbone is frozen)."""
    for images, labels in loader:
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            features = backbone(images)
        yield features.float().flatten(1), labels


@torch.no_grad()
def _feature_dim(backbone: nn.Module, image_size: int, device: torch.device) -> int:
    """The backbone's feature width: its `feature_dim`, else from one forward of zeros."""
    dim = getattr(backbone, "feature_dim", None)
    if isinstance(dim, int):
        return dim
    return backbone(torch.zeros(2, 3, image_size, image_size, device=device)).flatten(1).shape[1]


# ----------------------------------------------------------------- the feature cache


def _cached_features(backbone: nn.Module, train_images: ImageList, val_images: ImageList,
                     path: str | os.PathLike | None, batch_size: int, common: dict) -> tuple[dict, bool]:
    """Train and val features (on the CPU), from `path` when it holds this key, else extracted
    (and written to `path` when given) -> (features dict, whether they came from the file)."""
    key = cache_key(backbone, train_images, val_images, common["image_size"]) if path is not None else None
    if path is not None:
        stored = _read_cache(Path(path), key)
        if stored is not None:
            return stored, True
    train_f, train_l, bad = image_features(backbone, train_images, batch_size=batch_size, normalize=False,
                                           desc="train features", **common)
    val_f, val_l, bad_val = image_features(backbone, val_images, batch_size=batch_size, normalize=False,
                                           desc="val features", **common)
    feats = {"train_features": train_f.cpu(), "train_labels": train_l.cpu(),
             "val_features": val_f.cpu(), "val_labels": val_l.cpu(), "bad_files": bad + bad_val}
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_atomic({"mark": _CACHE_MARK, "key": key, **feats}, Path(path))
    return feats, False


def cache_key(backbone: nn.Module, train_images: ImageList, val_images: ImageList, image_size: int) -> dict:
    """What the cached features depend on: the backbone's weights (a hash of its
    state_dict, so the same checkpoint anywhere matches and a continued run does
    not), the train and val image lists with labels, the crop size, the version."""
    return {
        "version": CACHE_VERSION,
        "backbone": _state_digest(backbone),
        "train": _images_digest(train_images),
        "val": _images_digest(val_images),
        "image_size": image_size,
    }


def _state_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _images_digest(images: ImageList) -> str:
    h = hashlib.sha256()
    for i, (_, label) in enumerate(images.samples):
        h.update(f"{images.name(i)}\t{label}\n".encode())
    return f"{len(images)}:{h.hexdigest()}"


def _read_cache(path: Path, key: dict) -> dict | None:
    """The stored features if `path` holds them for `key`; None to (re)extract.

    A file that is not a feature cache is never overwritten (the path may be a
    typo for something precious, like the checkpoint itself)."""
    if not path.exists():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unpickling a foreign or damaged file fails in many ways
        stored = None
    if not isinstance(stored, dict) or stored.get("mark") != _CACHE_MARK:
        raise DataError(f"--feature-cache {path} exists and is not a feature cache of iecl lineval; "
                        "choose another path or delete it")
    if stored.get("key") != key:
        print(f"iecl lineval: {path} holds features of another checkpoint, dataset or image size; "
              "extracting again and replacing it", file=sys.stderr)
        return None
    return stored

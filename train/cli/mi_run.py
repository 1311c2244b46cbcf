"""`iecl mi`'s work (train/cli/mi.py holds its parser, which must import no torch)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from iecl.model.diagnostics import infonce_mi_ceiling
from iecl.pipeline import DataError, ImageList
from iecl.pipeline.augment import get_recipe
from iecl.train.config import ConfigError
from iecl.train.eval.mi import LOG2, estimate_mi, heldout_cap, mi_splits, train_critic
from iecl.train.eval.pairs import PairSampler
from iecl.train.eval.view_features import extract_view_features


def run_mi(args: argparse.Namespace) -> int:
    from iecl.train.factory import eval_runtime, load_pretrained

    _check_args(args)
    device, autocast_dtype = eval_runtime(args.device)
    progress = not args.no_progress
    start = time.perf_counter()
    method, cfg, state = load_pretrained(args.checkpoint, device)
    image_size = args.image_size or cfg.data.image_size
    if args.seed is None:
        args.seed = cfg.run.seed  # the run's own seed, as knn and lineval use
    train_images, val_images = mi_splits(args.data, args.val_fraction, args.seed, need_labels=args.pairs == "class")
    train_images, val_images = (heldout_cap(images, args.max_images, args.seed) for images in (train_images, val_images))
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

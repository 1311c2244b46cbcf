"""`iecl bench draws`: the Python work per sample of the loaders' hot path.

Times, on one core and with no pixel touched, what runs in Python for every
batch: the view-parameter draws of both views (`pipeline.draws.draw_two_views`,
the vectorised path, and its per-sample reference for comparison) and, given
`--data`, the DALI backend's whole per-batch source callback (order, readable
replacements, draws, parameter vectors, paths), called directly as DALI would,
and then fed through a DALI pipeline that does nothing else.
Prints microseconds per sample; the issue's bar for the DALI callback is 30.
"""

from __future__ import annotations

import argparse
import json
import time

HELP = """\
Microseconds of Python per sample in the loaders' hot path: the batch draws
(fast and reference) and, with --data, the DALI source callback per batch.

  iecl bench draws --batch-size 256 --image-size 224
  iecl bench draws --data /data/synthetic-10k --json draws.json
"""


def register(which) -> None:
    """Add `draws` to `iecl bench`'s subcommands."""
    p = which.add_parser("draws", help="Python us/sample of the view draws and the DALI source",
                         description=HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch-size", type=int, default=256, help="samples per batch")
    p.add_argument("--image-size", type=int, default=224, help="crop size in pixels")
    p.add_argument("--recipe", choices=("mocov2", "simclr", "byol"), default="mocov2", help="augmentation recipe")
    p.add_argument("--batches", type=int, default=50, help="timed batches of the fast paths")
    p.add_argument("--data", metavar="DATA", help="also time the DALI source callback on this data.root")
    p.add_argument("--json", metavar="PATH", help="write the result as one JSON object")
    p.set_defaults(run=main)


def _per_sample_us(fn, batches: int, batch_size: int) -> float:
    fn()  # first call: imports and caches out of the timing
    start = time.perf_counter()
    for _ in range(batches):
        fn()
    return (time.perf_counter() - start) / (batches * batch_size) * 1e6


def main(args) -> int:
    import numpy as np

    from iecl.pipeline.augment import get_recipe
    from iecl.pipeline.draws import draw_two_views

    recipes, size, batch = get_recipe(args.recipe), args.image_size, args.batch_size
    rng = np.random.default_rng(0)
    indices = rng.permutation(1_281_167)[:batch]
    widths, heights = rng.integers(200, 800, batch), rng.integers(200, 800, batch)  # ImageNet-like sizes
    epoch = iter(range(10**9))  # a new epoch per call: nothing is cached between calls
    result = {
        "batch_size": batch, "image_size": size, "recipe": args.recipe,
        "draws_us_per_sample": _per_sample_us(
            lambda: draw_two_views(recipes, 42, next(epoch), indices, widths, heights, size), args.batches, batch),
        "draws_reference_us_per_sample": _per_sample_us(
            lambda: draw_two_views(recipes, 42, next(epoch), indices, widths, heights, size, reference=True),
            max(1, args.batches // 20), batch),
    }
    print(f"view draws, both views, batch {batch}: {result['draws_us_per_sample']:.1f} us/sample "
          f"(per-sample reference: {result['draws_reference_us_per_sample']:.1f})")
    if args.data:
        result.update(_time_dali_source(args, recipes))
        print(f"DALI source callback, batch {batch} on {result['images']} images: "
              f"{result['dali_source_us_per_sample']:.1f} us/sample of Python; fed through DALI "
              f"(no read, no decode): {result['dali_feed_us_per_sample']:.1f} us/sample")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _time_dali_source(args, recipes) -> dict:
    import torch

    from iecl.pipeline import BatchPlan, open_images
    from iecl.pipeline.dali_source import BatchSource
    from iecl.pipeline.index import image_index

    images = open_images(args.data)
    plan = BatchPlan(recipes, args.batch_size, args.image_size, 0, 0, torch.device("cpu"))
    sampler = plan.sampler(len(images))
    source = BatchSource(images, image_index(images, progress=True), plan, sampler, first_epoch=0, start_batch=0)
    batches = min(args.batches, sampler.batches)

    class Info:  # what DALI hands a batch-mode source: the iteration's number
        iteration = 0
        epoch_idx = 0

    info = Info()

    def one_batch():
        info.iteration = (info.iteration + 1) % batches
        source(info)

    result = {"images": len(images), "dali_source_us_per_sample": _per_sample_us(one_batch, batches, args.batch_size)}
    result["dali_feed_us_per_sample"] = _time_dali_feed(source, args.batch_size, batches)
    return result


def _time_dali_feed(source, batch_size: int, batches: int) -> float:
    """A DALI CPU pipeline of the source alone (its outputs copied out, no file
    read, no decode): the callback plus DALI's own Python and C++ glue per batch,
    an upper bound of the Python per sample that the real graph adds."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline(batch_size=batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1)
    with pipe:
        outputs = fn.external_source(source=source, num_outputs=5, batch=True, batch_info=True,
                                     dtype=[types.UINT8, types.INT64, types.INT32, types.FLOAT, types.FLOAT],
                                     ndim=[1, 0, 0, 1, 1])
        pipe.set_outputs(*outputs)
    pipe.build()

    def one_batch():
        try:
            pipe.run()
        except StopIteration:  # the end of an epoch of the source: the next one starts
            pipe.reset()
            pipe.run()

    return _per_sample_us(one_batch, batches, batch_size)

"""`iecl make-synthetic`, `iecl validate` and `iecl convert`: the dataset tools of the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SYNTHETIC_HELP = """\
Write a synthetic ImageNet-style folder of JPEGs: DIR/<class>/<class>_<index>.JPEG.

Images have ImageNet-like sizes (mostly 500 px on the long side) and content
(smooth shapes in class colours plus texture), about 100 KB each. The same
arguments always give the same files; if DIR already holds exactly this
dataset, nothing is written.

  iecl make-synthetic /data/synthetic-10k --images 10000 --classes 100
"""


VALIDATE_HELP = """\
Check that every image of a dataset decodes, before a run meets it.

DATA is what data.root accepts: an ImageNet-style folder, a flat folder of
images, a file list (.txt: "path [label]" per line) or tar shards (a .tar, a
folder of .tar files, or shards-{0000..0099}.tar). Every image is decoded in
full (a truncated JPEG passes a header check), in parallel, with a progress
bar. Unreadable images are listed with the reason, then counted; files that are
not images (by extension) are listed too, since training ignores them.

Exit status: 0 if every image decodes, 1 if some do not, 2 on a usage error.

  iecl validate /data/imagenet/train --workers 16 --json imagenet-check.json
"""

CONVERT_HELP = """\
Convert a dataset to an FFCV .beton file for data.backend=ffcv.

DATA is what data.root accepts (folder, file list or tar shards). Images are
stored as JPEG (--quality) or raw pixels (--raw: faster to decode, several
times larger), their longer side capped at --max-resolution; labels are kept
(-1 for unlabeled images). Unreadable images are left out and reported. The
file is written beside OUT under a temporary name and renamed into place when
complete, so an interrupted conversion never leaves a half-written OUT.

  iecl convert /data/imagenet/train /fast/imagenet-train-512.beton --max-resolution 512 --workers 16
  iecl pretrain --config imagenet_r50 data.backend=ffcv data.root=/fast/imagenet-train-512.beton
"""


def add_commands(commands) -> None:
    _add_make_synthetic(commands)
    p = commands.add_parser(
        "validate", help="list unreadable images and non-image files of a dataset",
        description=VALIDATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", metavar="DATA")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_validate)

    p = commands.add_parser(
        "convert", help="convert a dataset to an FFCV .beton file",
        description=CONVERT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", metavar="DATA")
    p.add_argument("out", metavar="OUT.beton")
    p.add_argument("--max-resolution", type=int, default=512, metavar="PX", help="cap on the longer side (default 512)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
    p.add_argument("--raw", action="store_true", help="store raw pixels instead of JPEG")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_convert)


def run_validate(args) -> int:
    from iecl.pipeline import open_images
    from iecl.pipeline.validate import validate_images

    report = validate_images(open_images(args.data), workers=args.workers, progress=not args.no_progress)
    for name, reason in report.unreadable:
        print(f"unreadable  {name}  ({reason})")
    for name in report.non_images:
        print(f"not-image   {name}")
    readable = report.checked - len(report.unreadable)
    print(
        f"iecl validate: {report.source}: {report.checked} images checked, {readable} readable, "
        f"{len(report.unreadable)} unreadable, {len(report.non_images)} non-image files"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.as_dict(), f, indent=1)
    return 0 if report.ok else 1


def run_convert(args) -> int:
    from iecl.pipeline.errors import DataError
    from iecl.pipeline.sources import open_images

    if not 1 <= args.quality <= 100:
        raise DataError(f"--quality must lie in 1-100, got {args.quality}")
    if args.max_resolution < 16:
        raise DataError(f"--max-resolution must be at least 16, got {args.max_resolution}")
    if not args.out.endswith(".beton"):
        raise DataError(f"OUT should end in .beton, got {args.out}")
    try:
        from iecl.pipeline.ffcv import convert
    except ImportError as err:  # the module itself imports without ffcv; this is a broken install
        raise DataError(f"cannot load the FFCV converter: {err}") from None
    images = open_images(args.data)
    info = convert(
        images, args.out, max_resolution=args.max_resolution, jpeg_quality=args.quality, raw=args.raw,
        workers=args.workers or os.cpu_count() or 1, progress=not args.no_progress, overwrite=args.overwrite,
    )
    for name, reason in info["skipped"]:
        print(f"skipped  {name}  ({reason})", file=sys.stderr)
    print(
        f"iecl convert: wrote {info['written']} images to {info['path']} ({info['bytes'] / 1e6:.1f} MB) "
        f"in {info['seconds']:.1f} s; {len(info['skipped'])} unreadable image(s) left out"
    )
    return 0


def _add_make_synthetic(commands) -> None:
    p = commands.add_parser(
        "make-synthetic", help="write a synthetic ImageNet-style JPEG folder",
        description=SYNTHETIC_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", metavar="DIR", help="the folder to write (DIR/<class>/<image>.JPEG)")
    p.add_argument("--images", type=int, required=True, metavar="N", help="how many images in all")
    p.add_argument("--classes", type=int, required=True, metavar="K",
                   help="how many classes (folders); the images are dealt evenly among them")
    p.add_argument("--seed", type=int, default=0, help="seeds the images' content (default 0)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it holds something else")
    p.set_defaults(run=run_make_synthetic)


def run_make_synthetic(args) -> int:
    from iecl.pipeline.synthetic import SyntheticSpec, make_synthetic

    spec = SyntheticSpec(args.images, args.classes, seed=args.seed, quality=args.quality)
    start = time.perf_counter()
    info = make_synthetic(args.dir, spec, workers=args.workers, overwrite=args.overwrite)
    if info["reused"]:
        print(f"{info['root']} already holds this dataset ({spec.images} images, {spec.classes} classes); nothing written")
    else:
        mb = info["bytes"] / 1e6
        print(
            f"wrote {spec.images} images in {spec.classes} classes to {info['root']} "
            f"({mb:.1f} MB, {info['bytes'] / spec.images / 1024:.0f} KB per image) in {time.perf_counter() - start:.1f} s"
        )
    return 0

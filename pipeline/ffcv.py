"""Backend `ffcv`: `.beton` files (made by `iecl convert`) and their two-view loader.

Conversion (`convert`) decodes every image once in a pool of processes to find
the unreadable ones, then has FFCV's `DatasetWriter` store the readable ones in
the `ImageList`'s order: field `image` (JPEG, or raw pixels, resized so the long
side is at most `max_resolution`), `label` (-1 for unlabeled data), and
`source_width`/`source_height`, the size before that resize. The file is
written under a temporary name beside the target and renamed at the end.

Loading (`FfcvLoader`) gives the same batches as the reference loader: the
order is `EpochBatchSampler`'s, and every random choice of a view comes from
the batch draws (`pipeline.draws.draw_two_views`, keyed by seed, epoch and
index), drawn for the *source* size so that they are the numbers the PIL
reference draws. FFCV's JIT-compiled decoder crops each sample at its own box (scaled to
the stored resolution) and resizes it to `image_size`; colour jitter,
grayscale, blur, solarize and flip then run batched on the device
(`pipeline.device_augment`). What still differs from the reference: the
stored image is JPEG re-encoded (and downscaled by `max_resolution`), and
FFCV resizes with OpenCV's INTER_AREA where the reference uses PIL's
antialiased bilinear filter.

How the per-sample crops reach the JIT code: FFCV passes each decoder its
field's metadata table (one record per sample) as a run-time argument, so the
loader gives the `image` field a copy of that table with two extra crop boxes
per record (anchor, query). A batch's boxes are drawn, and written into the
table, by FFCV's own loading thread just before it decodes that batch; the
drawn parameters travel with the decoded batch to the main thread, where the
photometric half runs. This leans on FFCV 1.0.2's internals (`EpochIterator`,
`DatasetWriter._write_common`), pinned by the package's requirements.

This module imports without FFCV; using it without FFCV raises a `DataError`
that says how to install it.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np
import torch

from iecl.pipeline.device_augment import augment_batch, stack_params
from iecl.pipeline.draws import ViewDraws, draw_two_views
from iecl.pipeline.errors import DataError
from iecl.pipeline.folder import ImageList
from iecl.pipeline.lifetime import parent_death_signal
from iecl.pipeline.spec import BatchPlan
from iecl.pipeline.views import ViewBatch

INSTALL_HINT = "apt-get install libturbojpeg0-dev libopencv-dev pkg-config; pip install ffcv"

#: Per-sample crop boxes added to the image field's metadata, (top, left, height, width) in stored pixels.
_BOX = ("top", "left", "height", "width")
_CROP_FIELDS = tuple((f"v{view}_{name}", "<i4") for view in range(2) for name in _BOX)


def _ffcv():
    """The ffcv package, or a `DataError` naming what to install.

    Importing FFCV sets torch's thread count to 1 for the whole process
    (ffcv/pipeline/compiler.py runs `Compiler.set_num_threads(1)` at import):
    a CPU run would train on one core. The count is put back."""
    threads = torch.get_num_threads()
    try:
        import ffcv
        import ffcv.fields
        import ffcv.loader
        import ffcv.pipeline.compiler
    except ImportError as err:
        raise DataError(f"data.backend=ffcv needs FFCV ({err}): {INSTALL_HINT}") from None
    finally:
        torch.set_num_threads(threads)
    return ffcv


# ----------------------------------------------------------------------------------------------
# Conversion


class _ReadableImages:
    """The writer's dataset: item i -> (RGB uint8 HWC, label, source width, source height)."""

    def __init__(self, images: ImageList) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from iecl.pipeline.decode import decode_rgb

        img = decode_rgb(self.images.read(i))
        return np.asarray(img), self.images.samples[i][1], img.width, img.height


@cache
def _writer_class():
    """FFCV's DatasetWriter with a loop that notices a dead worker (FFCV's waits
    forever for its count), an optional progress bar, and cleanup on Ctrl-C."""
    _ffcv()
    import ctypes
    from multiprocessing import Process, Queue, Value

    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    class Writer(DatasetWriter):
        progress = True

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            self.num_samples = num_samples
            self.prepare()
            work: Queue = Queue()
            for todo in queue_content:
                work.put(todo)
            for _ in range(self.num_workers):
                work.put(None)
            allocations: Queue = Queue()
            done = Value(ctypes.c_uint64, 0)
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator, done, allocations,
                    *extra_worker_args)
            processes = [Process(target=work_fn, args=args, daemon=True) for _ in range(self.num_workers)]
            try:
                with parent_death_signal():  # a killed convert leaves no writer behind
                    for p in processes:
                        p.start()
                with tqdm(total=num_samples, desc="writing", unit="img", disable=not self.progress) as bar:
                    written = 0  # (a disabled bar does not count)
                    while written < num_samples:
                        failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                        if failed:
                            raise DataError(f"an FFCV writer process failed (exit code {failed[0]}); see its error above")
                        now = int(done.value)
                        bar.update(now - written)
                        written = now
                        time.sleep(0.05)
                table = []
                for _ in processes:
                    table.extend(allocations.get())
                for p in processes:
                    p.join()
                self.finalize(table)
            finally:
                for p in processes:
                    if p.is_alive():
                        p.terminate()
                        p.join()
                self.metadata_sm.close()
                self.metadata_sm.unlink()

    return Writer


def convert(
    images: ImageList,
    out_path: str | os.PathLike,
    *,
    max_resolution: int = 512,
    jpeg_quality: int = 90,
    raw: bool = False,
    workers: int = 2,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Write `images` to an FFCV `.beton` at `out_path`, leaving out unreadable ones.

    Returns {"path", "written", "skipped": [(name, reason)], "bytes", "seconds"}.
    Images are stored as JPEG at `jpeg_quality` (FFCV's write_mode "jpg"; `raw`
    stores uint8 pixels, ~10x larger and faster to load), long side at most
    `max_resolution`. Nothing appears at `out_path` unless the whole file was
    written.
    """
    _ffcv()
    from ffcv.fields import IntField, RGBImageField

    from iecl.pipeline.validate import validate_images

    start = time.perf_counter()
    out = Path(out_path).expanduser()
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; delete it, choose another name, or pass --overwrite")
    if not out.parent.is_dir():
        raise DataError(f"cannot write {out}: folder {out.parent} does not exist")
    workers = max(1, int(workers))

    # Pass 1: decode everything (a header check misses truncated files). The writer
    # must know its sample count before it starts, so this cannot share its pass.
    report = validate_images(images, workers=workers, progress=progress)
    bad_names = {name for name, _ in report.unreadable}
    keep = [i for i in range(len(images)) if images.name(i) not in bad_names] if bad_names else list(range(len(images)))
    if not keep:
        raise DataError(f"none of the {len(images)} images of {images.root} can be read, e.g. {report.unreadable[0]}")

    fields = {
        "image": RGBImageField(write_mode="raw" if raw else "jpg", max_resolution=max_resolution,
                               jpeg_quality=jpeg_quality),
        "label": IntField(),
        "source_width": IntField(),
        "source_height": IntField(),
    }
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        writer = _writer_class()(str(tmp), fields, num_workers=workers)
        writer.progress = progress
        writer.from_indexed_dataset(_ReadableImages(images), indices=keep, chunksize=16)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "path": str(out),
        "written": len(keep),
        "skipped": list(report.unreadable),
        "bytes": out.stat().st_size,
        "seconds": time.perf_counter() - start,
    }


def _reader(path: str | os.PathLike):
    _ffcv()
    from ffcv.reader import Reader

    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise DataError(f"FFCV file {path} does not exist; make it with: iecl convert DATA_DIR {path}")
    try:
        return Reader(path)
    except (AssertionError, ValueError, OSError, IndexError) as err:
        raise DataError(f"{path} is not a readable FFCV file ({type(err).__name__}: {err}); convert again") from None


def _field(reader, name: str) -> np.ndarray | None:
    """The metadata column of field `name` (scalar fields keep their values there)."""
    if name not in reader.field_names:
        return None
    return reader.metadata[f"f{reader.field_names.index(name)}"]


def beton_info(path: str | os.PathLike) -> dict:
    """What a .beton holds: {"path", "samples", "fields": {name: type}, "labeled",
    "classes", "max_side"} (max_side: the longest stored image side)."""
    reader = _reader(path)
    labels = _field(reader, "label")
    image = _field(reader, "image")
    labeled = labels is not None and bool((labels >= 0).any())
    return {
        "path": reader.file_name,
        "samples": int(reader.num_samples),
        "fields": {name: type(handler).__name__ for name, handler in reader.handlers.items()},
        "labeled": labeled,
        "classes": int(np.unique(labels[labels >= 0]).size) if labeled else 0,
        "max_side": int(max(image["width"].max(), image["height"].max())) if image is not None and len(image) else 0,
    }


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """int64 (samples,): every sample's label in file order (-1: unlabeled)."""
    reader = _reader(path)
    labels = _field(reader, "label")
    if labels is None:
        return np.full(int(reader.num_samples), -1, np.int64)
    return labels.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Loading


@cache
def _loader_classes():
    """The FFCV subclasses the loader needs (defined on first use: FFCV is optional)."""
    _ffcv()
    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline.compiler import Compiler

    class TableCropDecoder(ResizedCropRGBImageDecoder):
        """Decode, crop at the box stored for the sample (and view) in the image
        field's metadata, resize to `output_size` (FFCV's INTER_AREA resize)."""

        def __init__(self, output_size: tuple[int, int], view: int) -> None:
            super().__init__(output_size)
            self.view = view

        @property
        def get_crop_generator(self):  # abstract in FFCV; the crop comes from the table instead
            return None

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            anchor = self.view == 0

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                for dst_ix in my_range(len(batch_indices)):
                    field = metadata[batch_indices[dst_ix]]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height, width = np.uint32(field["height"]), np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                        temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    if anchor:
                        top, left, h, w = field["v0_top"], field["v0_left"], field["v0_height"], field["v0_width"]
                    else:
                        top, left, h, w = field["v1_top"], field["v1_left"], field["v1_height"], field["v1_width"]
                    resize_crop_c(temp_buffer, top, top + h, left, left + w, destination[dst_ix])
                return destination[: len(batch_indices)]

            decode.is_parallel = True
            return decode

    class _Failed:
        def __init__(self, error: BaseException) -> None:
            self.error = error

    class PlannedEpochIterator(EpochIterator):
        """FFCV's loading thread, drawing each batch's view parameters (and
        writing its crop boxes) just before decoding it. An error in the thread
        reaches the consumer instead of leaving it waiting forever."""

        def __init__(self, loader, order, plan) -> None:
            self.plan = plan  # set before the thread starts (EpochIterator.__init__ starts it)
            super().__init__(loader, order)

        def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
            if self.terminate_event.is_set():
                raise StopIteration  # ends FFCV's loop: the consumer has gone
            try:
                params = self.plan(batch_indices)
                return (*super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event), params)
            except Exception as err:  # noqa: BLE001  (re-raised in the consumer's thread)
                return _Failed(err)

    return TableCropDecoder, PlannedEpochIterator, _Failed


class FfcvLoader:
    """Backend `ffcv`: iterate -> `ViewBatch` on `device`; `len()` batches per epoch.

    Batch b of epoch e on this rank holds `EpochBatchSampler(...).indices(e)[b*B:(b+1)*B]`,
    with the reference's view parameters (see the module docstring).
    """

    def __init__(self, beton_path: str, plan: BatchPlan, *, batches_ahead: int = 2) -> None:
        _ffcv()
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import ToDevice, ToTensor

        reader = _reader(beton_path)
        missing = {"image", "label"} - set(reader.field_names)
        if missing:
            raise DataError(f"{beton_path} has no {' or '.join(sorted(missing))} field; make it with iecl convert")
        self.path = reader.file_name
        self.device = torch.device(plan.device)
        self.recipes, self.image_size, self.seed = plan.recipes, plan.image_size, plan.seed
        self.batch_size = batch_size = plan.batch_size
        self.bad_files: list[str] = []  # convert left the unreadable images out
        self.sampler = plan.sampler(int(reader.num_samples))
        image_size, workers = plan.image_size, plan.workers

        TableCropDecoder, self._iterator_class, self._failed = _loader_classes()
        size = (image_size, image_size)
        to_device = [ToTensor(), ToDevice(self.device, non_blocking=True)]
        pipelines = {
            "image": [TableCropDecoder(size, view=0), *to_device],
            "label": [IntDecoder()],
            "query": PipelineSpec("image", decoder=TableCropDecoder(size, view=1),
                                  transforms=[ToTensor(), ToDevice(self.device, non_blocking=True)]),
        }
        for name in reader.field_names:
            if name not in pipelines:
                pipelines[name] = None  # not decoded
        torch_threads = torch.get_num_threads()  # FFCV sets torch's thread count to its worker count
        self._ffcv = Loader(
            self.path, batch_size=batch_size, num_workers=workers or 1, os_cache=True,
            order=OrderOption.SEQUENTIAL, pipelines=pipelines, drop_last=True, batches_ahead=batches_ahead,
        )
        torch.set_num_threads(torch_threads)
        self._outputs = list(self._ffcv.pipeline_specs)  # the order of each batch's outputs

        # The image field's metadata, widened by the per-sample crop boxes that the decoders read.
        metadata = self._ffcv.reader.metadata
        image_key = f"f{reader.field_names.index('image')}"
        image_type = metadata.dtype[image_key]
        wide_image = np.dtype([(n, image_type[n]) for n in image_type.names] + list(_CROP_FIELDS))
        wide = np.zeros(len(metadata), np.dtype([
            (key, wide_image if key == image_key else metadata.dtype[key]) for key in metadata.dtype.names
        ]))
        for key in metadata.dtype.names:
            if key == image_key:
                for name in image_type.names:
                    wide[key][name] = metadata[key][name]
            else:
                wide[key] = metadata[key]
        self._ffcv.reader.metadata = wide  # what each epoch's iterator hands the compiled code
        self._ffcv.graph.metadata = wide
        self._table = wide[image_key]
        self._stored = np.stack([self._table["width"], self._table["height"]], 1).astype(np.int64)  # (N, 2)
        widths, heights = _field(reader, "source_width"), _field(reader, "source_height")
        # Files made elsewhere lack the source size: the boxes are then drawn for the stored size.
        self._source = self._stored if widths is None or heights is None else np.stack([widths, heights], 1)
        self._epoch_iterator = None

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def close(self) -> None:
        self._stop()
        self._ffcv = None

    def _stop(self) -> None:
        """End the current epoch's loading thread (a consumer that left early)."""
        it, self._epoch_iterator = self._epoch_iterator, None
        if it is None:
            return
        it.terminate_event.set()  # its next batch raises StopIteration; it then posts None and exits
        while it.is_alive():
            try:
                it.output_queue.get_nowait()  # room for that None (the draining costs at most one batch)
            except queue.Empty:
                pass
            it.join(timeout=0.05)
        it.close()

    def _plan(self, epoch: int):
        """The function FFCV's thread calls with each batch's sample indices."""
        recipes, size, source, stored, table = self.recipes, self.image_size, self._source, self._stored, self._table

        def plan(batch_indices: np.ndarray) -> tuple[ViewDraws, ViewDraws]:
            idx = np.asarray(batch_indices, np.int64)
            views = draw_two_views(recipes, self.seed, epoch, idx, source[idx, 0], source[idx, 1], size)
            scale = stored[idx] / source[idx]  # (B, 2): stored pixels per source pixel, x and y
            for view, draws in enumerate(views):
                box = draws.box.astype(np.float64)  # (B, 4) left, top, w, h in source pixels
                left = np.round(box[:, 0] * scale[:, 0])
                top = np.round(box[:, 1] * scale[:, 1])
                w = np.clip(np.round(box[:, 2] * scale[:, 0]), 1, stored[idx, 0] - left)
                h = np.clip(np.round(box[:, 3] * scale[:, 1]), 1, stored[idx, 1] - top)
                for name, values in zip(_BOX, (top, left, h, w)):
                    table[f"v{view}_{name}"][idx] = values.astype(np.int32)
            return views

        return plan

    def __iter__(self) -> Iterator[ViewBatch]:
        if self._ffcv is None:
            raise RuntimeError("the loader is closed")
        self._stop()
        epoch, start = self.sampler.epoch, self.sampler.start_batch
        order = self.sampler.indices(epoch)[start * self.batch_size :]
        if not len(order):
            return
        it = self._iterator_class(self._ffcv, order, self._plan(epoch))
        self._epoch_iterator = it
        try:
            for result in it:
                if isinstance(result, self._failed):
                    raise result.error
                *outputs, (anchor_params, query_params) = result
                out = dict(zip(self._outputs, outputs))
                label = torch.from_numpy(out["label"].reshape(-1).astype(np.int64)).to(self.device)
                anchor = augment_batch(out["image"], stack_params(anchor_params, self.device))
                query = augment_batch(out["query"], stack_params(query_params, self.device))
                yield ViewBatch(anchor, query, label)
        finally:
            if self._epoch_iterator is it:
                self._stop()

"""Backend `dali`: NVIDIA DALI reads, decodes and augments, on the GPU (or a CPU pipeline).

Python decides *what* to load and *which* augmentation to apply, once per
batch; DALI does every byte and pixel operation. A batch-mode
`fn.external_source` callback (`pipeline/dali_source.py`) maps DALI's
(epoch_idx, iteration) onto our own `EpochBatchSampler` order, so the DALI, PIL
and FFCV backends yield the same images in the same batches, and hands the
graph the batch's file paths (`fn.io.file.read` reads them in DALI's threads),
labels and both views' parameter vectors, drawn for the whole batch at once
(`draws.draw_two_views`) on the upright image sizes of the `ImageIndex`, which
is built once per file and cached: no header is parsed and no image byte
crosses Python in the hot path. The params reach DALI as per-sample argument
inputs; the graph applies them with identity values where a step is off
(factor 1, hue 0, blur window 1, ...), so there is no per-sample branching and
no batch splitting. Tar-shard members have no path: their bytes come from the
callback (in DALI's Python workers when `workers` > 0).

Per view, the graph is the reference's `apply_view`:

    crop + resize (bilinear, antialiased)    fn.resize over the crop's ROI (decode="shared")
      + horizontal flip                      or over the decoded window (decode="window"); a
                                             flip is the ROI read right to left: no extra pass
    brightness, contrast                     fn.brightness_contrast around the crop's mean grey
                                             level (PIL's ImageEnhance.Contrast), one pass
    saturation (+ grayscale: saturation 0)   fn.hsv (PIL's Color: a blend towards the luma)
    hue                                      PIL's HSV hue shift, exactly, as arithmetic
    Gaussian blur, window 2*ceil(3 sigma)+1  fn.gaussian_blur (sigma 0: a one-tap window)
    solarise (threshold 128)                 arithmetic: x ^ 255 where x >= 128

What differs from PIL (measured on the synthetic set at 64 px, mean absolute
difference in grey levels; `tests/test_dali.py` bounds them):
- the jitter's random order (`ViewParams.order`) is not followed: the four
  adjustments run in the fixed order above. Brightness, contrast and
  saturation commute except where an intermediate result clips (1.5 at MoCo-v2's
  strengths, 2.5 at SimCLR's); hue last adds the rest (4.2 with all four on);
- decoding: libjpeg-turbo (CPU) / nvJPEG (GPU, fancy upsampling on) vs PIL's
  libjpeg, and rounding after each step: about 1;
- blur: an exact Gaussian kernel here, PIL's three-pass box approximation;
  borders reflect here, PIL repeats the edge pixel: 0.3;
- decode="window" decodes only the crop window, so the resampling filter near
  the crop's edge sees clamped pixels instead of the pixels beyond it.

Unreadable samples never reach DALI: readable is what `iecl validate` and the
PIL loader decide (`decode.inspect_image`: a full decode, a format every
backend reads), recorded in the index, so a JPEG with a corrupt body is not
trained on here either. The callback replaces each by the next readable
sample, `(index + 1) % n`, ..., and returns how many files it skipped, which
the loader names in `bad_files` with the index's reasons. EXIF orientation is
applied by DALI's decoder as by PIL's `exif_transpose`, and the index's sizes
are upright, so crop boxes are drawn on the pixels actually decoded.

nvJPEG and executor settings (`DaliOptions`: memory padding and preallocation
hints, `hw_decoder_load`, threads, prefetch depth) default to the values of
NVIDIA's DeepLearningExamples RN50 pipeline and DALI's own; their effect shows
on a GPU only, and is not measured on the CPU machine that made this version
(`iecl bench loader --hw-decoder-load ...` and `iecl report` time it there).
`DaliDecodeOnly` is the same loader stopped after the decode: decoding's own
images/s, the loader's decode ceiling (`iecl bench loader --decode-only`).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from iecl.pipeline.bad_files import BadFileLog
from iecl.pipeline.dali_source import (
    P_BRIGHTNESS,
    P_CONTRAST,
    P_HUE,
    P_REL_END,
    P_REL_START,
    P_ROI_END,
    P_ROI_START,
    P_SATURATION,
    P_SIGMA,
    P_SOLARIZE,
    P_WINDOW,
    BatchSource,
)
from iecl.pipeline.errors import DataError
from iecl.pipeline.folder import ImageList
from iecl.pipeline.index import image_index
from iecl.pipeline.lifetime import parent_death_signal
from iecl.pipeline.spec import BatchPlan, DaliOptions
from iecl.pipeline.views import ViewBatch

DECODE_MODES = ("shared", "window")
INSTALL_HINT = (
    "data.backend=dali needs NVIDIA DALI: pip install -e \".[dali]\" in the iecl checkout (the README's way; "
    "or pip install nvidia-dali-cuda120), or choose data.backend=pil"
)


def _require_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise DataError(INSTALL_HINT) from None


def _cores() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    # Ranks launched on one machine (torchrun sets LOCAL_WORLD_SIZE) share its cores.
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _decoder_options(options: DaliOptions, gpu: bool) -> dict:
    """The decoders' settings: EXIF orientation applied (as PIL's exif_transpose),
    libjpeg's fancy upsampling (as PIL), and nvJPEG's (the `mixed` decoder only)."""
    common = {"jpeg_fancy_upsampling": True, "adjust_orientation": True}
    if not gpu:
        return common
    return {
        **common,
        "hw_decoder_load": options.hw_decoder_load,
        "device_memory_padding": options.device_memory_padding,
        "host_memory_padding": options.host_memory_padding,
        "preallocate_width_hint": options.preallocate_width_hint,
        "preallocate_height_hint": options.preallocate_height_hint,
    }


def _read(source: BatchSource, *, parallel: bool, options: DaliOptions):
    """The graph's input: the batch source's outputs, each file's bytes read by DALI
    (`fn.io.file.read`) or handed over by the source (tar members)."""
    from nvidia.dali import fn, types

    data, label, skipped, *vectors = fn.external_source(
        source=source,
        num_outputs=5,
        batch=True,
        batch_info=True,
        parallel=parallel,
        **({"prefetch_queue_depth": options.prefetch} if parallel else {}),
        dtype=[types.UINT8, types.INT64, types.INT32, types.FLOAT, types.FLOAT],
        ndim=[1, 0, 0, 1, 1],
    )
    encoded = fn.io.file.read(data) if source.by_path else data
    return encoded, label, skipped, vectors


def _decoders(encoded, vectors, *, gpu: bool, decode: str, options: DaliOptions) -> list:
    """The decoded pixels each view is cut from: decode="shared", one full decode
    per image (the same node for both views); "window", each view's crop window
    only (two partial decodes). `mixed` (nvJPEG) on a GPU, `cpu` (libjpeg-turbo)
    otherwise, with `_decoder_options`. The real graph and the decode-only one
    (`_build_decode_only_graph`) both decode here, so they decode alike."""
    from nvidia.dali import fn, types

    decoder = {**_decoder_options(options, gpu), "output_type": types.RGB}
    device = "mixed" if gpu else "cpu"
    if decode == "shared":
        return [fn.decoders.image(encoded, device=device, **decoder)] * len(vectors)
    return [fn.decoders.image_slice(encoded, vec[0:2], vec[2:4], device=device, normalized_anchor=False,
                                    normalized_shape=False, **decoder) for vec in vectors]


def _build_graph(source: BatchSource, *, image_size: int, gpu: bool, parallel: bool, decode: str,
                 options: DaliOptions):
    """The DALI graph of `pipeline/augment.py`'s `apply_view`, twice; returns its outputs."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    encoded, label, skipped, vectors = _read(source, parallel=parallel, options=options)
    on_device = (lambda node: node.gpu()) if gpu else (lambda node: node)
    arithmetic_contrast = gpu if options.arithmetic_contrast is None else options.arithmetic_contrast
    resize = {"size": (image_size, image_size), "interp_type": types.INTERP_LINEAR, "antialias": True}
    decoded = _decoders(encoded, vectors, gpu=gpu, decode=decode, options=options)

    views = []
    for vec, pixels in zip(vectors, decoded):
        if decode == "shared":  # crop, resize and flip in one resampling pass
            view = fn.resize(pixels, roi_start=vec[P_ROI_START], roi_end=vec[P_ROI_END], roi_relative=False, **resize)
        else:  # the decoded window is the crop: resize and flip it
            view = fn.resize(pixels, roi_start=vec[P_REL_START], roi_end=vec[P_REL_END], roi_relative=True, **resize)

        # Colour jitter in a fixed order (see the module docstring): brightness and
        # contrast commute exactly (the centre scales with the image), so they are one
        # pass; following the sampled order would take four per-sample slots of all
        # four adjustments, 3.4x slower on a CPU (measured: 20 vs 69 img/s, 224 px).
        means = fn.reductions.mean(view, axes=[0, 1], dtype=types.FLOAT)  # (3,) per sample
        centre = dmath.floor(means[0] * 0.299 + means[1] * 0.587 + means[2] * 0.114 + 0.5)  # PIL: int(mean L + .5)
        if arithmetic_contrast:
            brightness, contrast = on_device(vec[P_BRIGHTNESS]), on_device(vec[P_CONTRAST])
            view = fn.cast(brightness * (centre + contrast * (view - centre)), dtype=types.UINT8)
        else:
            view = fn.brightness_contrast(
                view, brightness=vec[P_BRIGHTNESS], contrast=vec[P_CONTRAST], contrast_center=centre, dtype=types.UINT8
            )
        if options.exact_hue:
            view = fn.hsv(view, saturation=vec[P_SATURATION], dtype=types.UINT8)  # and grayscale
            view = _shift_hue(view, on_device(vec[P_HUE]))
        else:
            view = fn.hsv(view, saturation=vec[P_SATURATION], hue=vec[P_HUE] * 60.0, dtype=types.UINT8)
        view = fn.gaussian_blur(view, sigma=vec[P_SIGMA], window_size=fn.cast(vec[P_WINDOW], dtype=types.INT32))
        # Solarise (PIL's threshold 128): 255 - x == x ^ 255 for the pixels >= 128.
        mask = on_device(fn.cast(vec[P_SOLARIZE], dtype=types.UINT8))
        view = view ^ ((view >= 128) * mask)
        views.append(view)
    return (*views, on_device(label), skipped)


def _build_decode_only_graph(source: BatchSource, *, gpu: bool, parallel: bool, decode: str,
                             options: DaliOptions):
    """Decoding alone, to time it (`DaliDecodeOnly`): the real graph's source, file
    reading and decoder(s) with the same options, then no pixel work but a
    one-pixel crop of each decoded image. The crop is what makes the batch an
    output: DALI prunes a node whose output nothing uses, and a kernel that
    reads the decoded pixels, in stream order after the decoder, is what a
    clock reading after the output's copy waits for (an output of shapes
    only might be ready before nvJPEG's kernels finish). Returns (pixels..., label, skipped), one
    (B, 1, 1, 3) uint8 output per decode (one for "shared", two for "window")."""
    from nvidia.dali import fn

    encoded, label, skipped, vectors = _read(source, parallel=parallel, options=options)
    decoded = _decoders(encoded, vectors, gpu=gpu, decode=decode, options=options)
    distinct = decoded[:1] if decode == "shared" else decoded
    pixels = [fn.crop(node, crop=(1, 1)) for node in distinct]
    return (*pixels, label.gpu() if gpu else label, skipped)


def _shift_hue(view, sextants):
    """PIL's hue shift (torchvision's adjust_hue): rotate H in HSV space, keep S and V.

    DALI's own `fn.hsv` rotates hue linearly about the grey axis in YIQ space,
    which is 15 grey levels (mean absolute difference) away from PIL's result
    at MoCo-v2's strength; this is the exact piecewise-linear map, as arithmetic
    on (H, W, 1) planes (~30 small elementwise ops, in float):
    h = hue in sextants [0, 6), out_n = V - C * clamp(min(k, 4 - k), 0, 1)
    with k = (h + shift + n) mod 6 and n = 5, 3, 1 for R, G, B.
    """
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    x = fn.cast(view, dtype=types.FLOAT)
    red, green, blue = x[:, :, 0:1], x[:, :, 1:2], x[:, :, 2:3]
    value = dmath.max(dmath.max(red, green), blue)
    chroma = value - dmath.min(dmath.min(red, green), blue)
    red_max = red == value  # PIL's precedence: red, then green, then blue
    green_max = (green == value) & (red < value)
    blue_max = (red_max | green_max) == 0
    scaled_hue = red_max * (green - blue) + green_max * (2 * chroma + blue - red) + blue_max * (4 * chroma + red - green)
    hue = scaled_hue / dmath.max(chroma, 1e-6) + sextants  # grey pixels: chroma 0, any hue
    k = hue + types.Constant(np.array([5.0, 3.0, 1.0], np.float32))  # (H, W, 3)
    k = k - 6 * dmath.floor(k / 6)
    ramp = dmath.clamp(dmath.min(k, 4 - k), 0.0, 1.0)
    return fn.cast(value - chroma * ramp, dtype=types.UINT8)


class DaliLoader:
    """Backend `dali`: iterate -> `ViewBatch` on `device`; `len()` batches per epoch.

    `decode="shared"` decodes each image once and cuts both views from it;
    `decode="window"` decodes each view's crop window only (two partial
    decodes: cheaper when crops are small relative to the image).
    `bad_files` lists, cumulatively, the files that were skipped as unreadable.
    """

    def __init__(self, images: ImageList, plan: BatchPlan, *, decode: str = "shared",
                 options: DaliOptions | None = None, progress: bool = True) -> None:
        self._pipe = None  # first, so close() works whatever fails below
        _require_dali()
        if decode not in DECODE_MODES:
            raise ValueError(f"unknown DALI decode mode {decode!r}; choose one of {DECODE_MODES}")
        self.images, self.plan, self.decode = images, plan, decode
        self.batch_size, self.workers = plan.batch_size, plan.workers
        self.options = options or DaliOptions()
        self.device = torch.device(plan.device)
        self.sampler = plan.sampler(len(images))
        self._bad = BadFileLog(images)
        self.index = image_index(images, workers=max(1, plan.workers or _cores()), progress=progress,
                                 cache_dir=self.options.index_cache)
        if len(self.index.reasons) == len(images):
            first = min(self.index.reasons)
            raise DataError(f"none of the {len(images)} images of {images.root} can be read, e.g. "
                            f"{images.relative_name(first)} ({self.index.reasons[first]}); run `iecl validate DATA_DIR`")
        self._cursor: tuple[int, int] | None = None  # (epoch, batch) the pipeline delivers next
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def bad_files(self) -> list[str]:
        """"name (reason)" of each unreadable image met and replaced, once each."""
        return self._bad.names

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    # ---- the pipeline ------------------------------------------------------

    def _build(self, epoch: int, start_batch: int) -> None:
        from nvidia.dali.pipeline import Pipeline

        self.close()
        gpu = self.device.type == "cuda"
        device_id = None
        if gpu:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        source = BatchSource(self.images, self.index, self.plan, self.sampler, epoch, start_batch)
        # Files are read by DALI's threads; only tar members' bytes need Python workers.
        parallel = self.workers > 0 and not source.by_path
        # Forking after CUDA is initialised is unsafe; spawned workers re-import this module instead.
        start_method = "spawn" if gpu and torch.cuda.is_initialized() else "fork"
        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=self.options.threads or _cores(),
            device_id=device_id,
            seed=self.sampler.seed,
            prefetch_queue_depth=self.options.prefetch,
            exec_dynamic=self.options.exec_dynamic,
            py_num_workers=max(1, self.workers),
            py_start_method=start_method,
        )
        with pipe:
            pipe.set_outputs(*self._graph(source, gpu=gpu, parallel=parallel))
        self._pipe = pipe
        with parent_death_signal():  # DALI's Python workers (tar shards) die with this process
            pipe.build()
        self._cursor = (epoch, start_batch)

    def _graph(self, source: BatchSource, *, gpu: bool, parallel: bool) -> tuple:
        """The graph's outputs: (anchor, query, label, skipped)."""
        return _build_graph(source, image_size=self.plan.image_size, gpu=gpu, parallel=parallel,
                            decode=self.decode, options=self.options)

    def _deliver(self, pixels: list, label):
        """One batch from the graph's pixel outputs and labels."""
        return ViewBatch(
            self._to_torch(pixels[0], torch.uint8),
            self._to_torch(pixels[1], torch.uint8),
            self._to_torch(label, torch.int64).to(self.device, non_blocking=True),
        )

    def _indices(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.sampler.indices(epoch))
        return self._order[1]

    def _run(self, epoch: int, batch: int):
        try:
            return self._pipe.run()
        except StopIteration:
            raise
        except DataError:  # from the source callback, also out of DALI's workers
            self.close()
            raise
        except Exception as err:
            self.close()
            start = batch * self.batch_size
            names = [self.images.name(int(i)) for i in self._indices(epoch)[start : start + self.batch_size]]
            message = str(err)
            culprit = re.search(r"sample #(\d+)", message)
            detail = [line.strip() for line in message.splitlines() if line.strip().startswith(("Error in", "Failed"))]
            which = (
                f"probably {names[int(culprit.group(1))]}"
                if culprit and int(culprit.group(1)) < len(names)
                else f"one of {', '.join(names)}"
            )
            raise DataError(
                f"DALI cannot decode an image of batch {batch} of epoch {epoch}, {which} "
                f"({' '.join(detail) or type(err).__name__}); run `iecl validate DATA_DIR` to find broken images"
            ) from err

    def _to_torch(self, tensor_list, dtype: torch.dtype) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = tensor_list.as_tensor()
        on_gpu = type(dense).__name__ == "TensorGPU"
        out = torch.empty(dense.shape(), dtype=dtype, device=self.device if on_gpu else "cpu")
        stream = torch.cuda.current_stream(self.device) if on_gpu else None
        feed_ndarray(dense, out, cuda_stream=stream)  # a device-to-device copy on the GPU
        return out

    def _note_skipped(self, epoch: int, batch: int, skipped: np.ndarray) -> None:
        n = len(self.images)
        start = batch * self.batch_size
        for slot in np.flatnonzero(skipped):
            index = int(self._indices(epoch)[start + slot])
            for k in range(int(skipped[slot])):
                i = (index + k) % n
                name = self.images.relative_name(i)
                if self._bad.add(name, self.index.reasons[i]):
                    warnings.warn(f"cannot read {name}; replaced by the next readable image", stacklevel=3)

    def __iter__(self) -> Iterator[ViewBatch]:
        epoch, start_batch = self.sampler.epoch, self.sampler.start_batch
        batches = self.sampler.batches
        if self._pipe is not None and self._cursor is not None and self._cursor[1] == batches:
            # The previous epoch was read to its end: let DALI see that, then it
            # continues with the next epoch without restarting its workers.
            try:
                self._pipe.run()
                raise AssertionError("the DALI source ran past the end of an epoch")
            except StopIteration:
                self._pipe.reset()
                self._cursor = (self._cursor[0] + 1, 0)
        if self._pipe is None or self._cursor != (epoch, start_batch):
            self._build(epoch, start_batch)  # a jump (resume, repeat): restart the source there
        for batch in range(start_batch, batches):
            self._cursor = None  # unknown until this batch is delivered
            *pixels, label, skipped = self._run(epoch, batch)
            self._cursor = (epoch, batch + 1)
            skipped = np.array(skipped.as_tensor()).reshape(-1)
            if skipped.any():
                self._note_skipped(epoch, batch, skipped)
            yield self._deliver(pixels, label)

    def close(self) -> None:
        """Stop the DALI pipeline and its worker processes (safe to call again)."""
        pipe, self._pipe = getattr(self, "_pipe", None), None
        self._cursor = None
        if pipe is not None:
            pool = getattr(pipe, "_py_pool", None)
            pipe._shutdown()
            if pool is not None:
                pool.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: DALI may already be gone
            pass


class DaliDecodeOnly(DaliLoader):
    """Decoding alone, for timing (`iecl bench loader --decode-only`): a `DaliLoader`
    (same sampler order, file reading, threads, prefetch and decoder with the
    same options) whose graph stops after the decode (`_build_decode_only_graph`).
    Its images/s is the loader's decode ceiling on this machine; beside the
    full loader's, the share of the loader's time per image that decoding
    alone takes. Not a training loader: each batch is `(pixels, label)`, with
    `pixels` one (B, 1, 1, 3) uint8 tensor per decode, a pixel of each image."""

    def _build(self, epoch: int, start_batch: int) -> None:
        # The source still draws the views' parameters, as for the real loader (its
        # Python work is the same); with decode="shared" the graph leaves them unused.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The external source node", category=Warning)
            super()._build(epoch, start_batch)

    def _graph(self, source: BatchSource, *, gpu: bool, parallel: bool) -> tuple:
        return _build_decode_only_graph(source, gpu=gpu, parallel=parallel, decode=self.decode, options=self.options)

    def _deliver(self, pixels: list, label) -> tuple:
        return tuple(self._to_torch(p, torch.uint8) for p in pixels), self._to_torch(label, torch.int64)

"""What a loader backend is built from, and what it gives: one spec object
(`LoaderSpec`, made by train.loop from data.* and dali.*, so every option
lands in the run's config.yaml) and one typed interface (`Loader`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from iecl.pipeline.augment import ViewRecipe
from iecl.pipeline.sampler import EpochBatchSampler
from iecl.pipeline.views import ViewBatch

#: The image index's cache (pipeline/index.py), next to the synthetic data's default place.
DEFAULT_INDEX_CACHE = "~/.cache/iecl/index"


@dataclass(frozen=True)
class DaliOptions:
    """How the DALI graph computes two colour adjustments, nvJPEG's settings,
    DALI's threads and prefetch depth, and where the image index is kept
    (config section `dali`)."""

    #: the jitter's contrast as arithmetic on the device (True), or
    #: `fn.brightness_contrast` with the centre as a CPU argument (False); None:
    #: arithmetic on GPUs only, where moving the centre to the CPU would stall the pipeline
    arithmetic_contrast: bool | None = None
    #: PIL's HSV hue shift as ~30 elementwise ops (True), or DALI's `fn.hsv`
    #: rotation in YIQ folded into the saturation pass (False): 15 grey levels
    #: away from PIL at MoCo-v2's strength, but half the CPU pipeline's time
    #: (measured on 2 cores, 224 px: 163 vs 87 img/s); on a GPU about a millisecond a batch
    exact_hue: bool = True
    # nvJPEG (the GPU's `mixed` decoder; ignored on a CPU). Defaults: DALI's own
    # hw_decoder_load, and the padding and preallocation of NVIDIA's DeepLearningExamples
    # RN50 pipeline (sized for full ImageNet's largest image, so nvJPEG never reallocates).
    # Not measured on the CPU machine this version was made on.
    #: share of each batch sent to the A100/H100 hardware JPEG decoder (the rest: CUDA + host Huffman)
    hw_decoder_load: float = 0.65
    device_memory_padding: int = 211_025_920  #: bytes of nvJPEG device buffers preallocated per thread
    host_memory_padding: int = 140_544_512  #: bytes of pinned host buffers per thread (two: double-buffered)
    preallocate_width_hint: int = 5980  #: the hardware decoder's buffers, sized for images this wide
    preallocate_height_hint: int = 6430
    #: DALI's CPU threads; None: this rank's share of the cores (LOCAL_WORLD_SIZE ranks per machine)
    threads: int | None = None
    prefetch: int = 2  #: batches DALI prepares ahead (and the Python workers' queue, for tar shards)
    #: DALI's dynamic executor (may overlap the CPU and GPU stages better; unmeasured, so off)
    exec_dynamic: bool = False
    #: where the image index (sizes and readability, one full decode per file) is cached; None: not kept
    index_cache: str | None = DEFAULT_INDEX_CACHE


@dataclass(frozen=True)
class BatchPlan:
    """What every backend is built from: which two views (recipes, size), in
    which batches (this rank's shard of each epoch's seeded order), delivered
    to which device by how many workers."""

    recipes: tuple[ViewRecipe, ViewRecipe]  # anchor's, query's
    batch_size: int  # per rank
    image_size: int
    seed: int
    workers: int
    device: torch.device
    rank: int = 0
    world_size: int = 1

    def sampler(self, num_images: int) -> EpochBatchSampler:
        return EpochBatchSampler(num_images, self.batch_size, self.seed, self.rank, self.world_size)


@dataclass(frozen=True)
class LoaderSpec:
    backend: str  # "pil", "dali" or "ffcv" (pipeline.BACKENDS)
    plan: BatchPlan
    decode: str = "shared"  # dali: one full decode per image, or a windowed decode per view
    dali: DaliOptions = field(default_factory=DaliOptions)


class Loader(Protocol):
    """Every backend: full batches of two uint8 NHWC views on the training
    device, the same number every epoch; resumable at any batch."""

    bad_files: list[str]  # "relative name (reason)" of each unreadable image met and replaced, once

    def __iter__(self) -> Iterator[ViewBatch]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    def close(self) -> None: ...

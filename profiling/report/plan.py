"""What `iecl report` runs, at which size, and how its time budget is shared.

The parts run in the order of PARTS: what a short lease must not miss comes
first, the torch.compile runs (whose warm-up may not fit) last. Before each
part starts it gets a share of the time left,

    share = time left x estimate / (sum of the estimates of the parts still to run),

so time a part does not use passes on to the later ones, and a part that
overruns its share is stopped and reported as such while the rest still run.
At full size the last parts (torch.compile) may use all that is left; the
dry run caps the shares of its optional parts at `max_share` times the
estimate, so that its compile parts, which cannot finish on a CPU, are
stopped in seconds; the other parts keep their proportional share, so a busy
machine slows them without stopping them.
The estimates are each part's expected seconds at that scale: for the dry run
they are what the parts took on the 2-core CPU machine (the table in
profiling/results/cpu-2core/report-dry-run/report.md); for the full size they
are expected GPU seconds, from the H100 runs in
profiling/results/NVIDIA-H100-80GB-HBM3/ (step times, compile warm-up > 5 min
for ResNet-50) plus the child process's start (Python, torch and CUDA: a few
seconds). Every report lists each part's share beside the time it used, so
the estimates can follow the measurements of each new machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    needs_data: bool = False  # needs the JPEG folder made (or named) by the "data" part
    optional: str = ""  # why this part may well not fit the budget (reported, not a failure)


PARTS = (
    Part("machine", "machine record and ceilings: bf16 matmul, device copy, CPU cores, optional packages"),
    Part("saib", "SAIB implementations alone: reference, torch.compile, Triton (bench saib)"),
    Part("data", "ImageNet-like JPEGs for the loaders (make-synthetic on every core, or --data)"),
    Part("loader", "loaders alone: pil on every core, DALI shared and window, FFCV; DALI decoding alone, its "
                   "hw_decoder_load and its dynamic executor (bench loader)", needs_data=True),
    Part("profile-r50", "IE-CL + SAIB ResNet-50 step: real loader and data on the device (profile)", needs_data=True),
    Part("profile-r18", "IE-CL + SAIB ResNet-18 step: real loader and data on the device (profile)", needs_data=True),
    Part("anchor", "plain supervised ResNet-50 training step: ours without spectral norm, torchvision's"),
    Part("export", "the exported backbone loaded strictly into torchvision's and timm's ResNet-50, features compared"),
    Part("compare", "every method with and without SAIB, ResNet-50: real loader and data on the device (compare)",
         needs_data=True),
    Part("saib-in-step", "IE-CL + SAIB ResNet-50 step with the Triton and the compiled SAIB (profile, data on the device)"),
    Part("levers", "the ResNet-50 step's eager levers against its defaults, data on the device: spectral norm per "
                   "convolution instead of batched, the stem padded to 4 and 8 channels, both views in one "
                   "encoder call (profile)"),
    Part("profile-r18-compile", "the ResNet-18 step with train.compile=true (profile)", needs_data=True,
         optional="torch.compile's warm-up may exceed its share"),
    Part("profile-r50-compile", "the ResNet-50 step with train.compile=true (profile)", needs_data=True,
         optional="torch.compile's warm-up may exceed its share (it did not finish in 5 minutes on an H100)"),
    Part("profile-r18-compile-fused", "the ResNet-18 step with train.compile=true and both views in one encoder "
                                      "call (model.fused_views=true; profile)", needs_data=True,
         optional="torch.compile's warm-up may exceed its share"),
)
PART_NAMES = tuple(p.name for p in PARTS)
BY_NAME = {p.name: p for p in PARTS}


@dataclass(frozen=True)
class Scale:
    """The sizes of every part. `overrides` go to every training part's config."""

    name: str
    batch_size: int
    image_size: int
    patch: int
    saib_dtype: str
    images: int  # synthetic JPEGs made by the data part
    classes: int
    budget_minutes: float  # the default --budget-minutes
    overrides: tuple[str, ...] = ()
    r50: str = "resnet50"  # the backbone the "ResNet-50" parts build
    saib_iters: int = 20
    saib_warmup: int = 5
    # The timed steps come in windows (steps per window x repeats): each figure
    # is the median window, with the windows' spread (profiling/stats.py).
    loader_steps: int = 5
    loader_repeats: int = 4
    loader_warmup: int = 5
    profile_steps: int = 4
    profile_repeats: int = 3
    profile_warmup: int = 5
    isolate_iters: int = 3
    in_step_isolate_iters: int = 3  # saib-in-step's profiles (0: in place only)
    in_step_repeats: int = 3  # saib-in-step's windows (the dry run's Triton interpreter makes each step seconds)
    lever_repeats: int = 3  # the levers part's windows per setting (in place only)
    compare_steps: int = 3
    compare_repeats: int = 3
    compare_warmup: int = 3
    anchor_steps: int = 5
    anchor_repeats: int = 3
    anchor_warmup: int = 5
    ceiling_iters: int = 10
    estimates: dict = field(default_factory=dict)  # part -> expected seconds
    max_share: float | None = None  # cap on an optional part's share, in estimates (None: no cap)

    def to_dict(self) -> dict:
        return asdict(self)


FULL = Scale(
    name="full", batch_size=256, image_size=224, patch=16, saib_dtype="bf16", images=10_000, classes=100,
    # The default budget covers the estimates (755 s) with a little to spare, so
    # that no part is cut short by the arithmetic alone; a shorter --budget-minutes
    # shares the time in proportion.
    budget_minutes=13.0,
    # Expected GPU seconds (H100-class; see the module docstring).
    estimates={"machine": 10, "saib": 60, "data": 30, "loader": 90, "profile-r50": 35, "profile-r18": 25,
               "anchor": 25, "export": 10, "compare": 120, "saib-in-step": 50, "levers": 90, "profile-r18-compile": 60,
               "profile-r50-compile": 90, "profile-r18-compile-fused": 60},
)

DRY_RUN = Scale(
    name="dry-run", batch_size=4, image_size=32, patch=8, saib_dtype="fp32", images=32, classes=4,
    budget_minutes=5.0,
    # Toy heads and a ResNet-18 in place of the ResNet-50: the same code at a size
    # a 2-core CPU runs in seconds (Triton runs in its interpreter there).
    overrides=("model.projector_hidden=64", "model.projector_out=32", "model.predictor_hidden=64",
               "method.queue_size=64"),
    r50="resnet18",
    # Two windows (three for the loaders) wherever a spread is reported: the
    # dry run takes every code path of the statistics and the checks.
    saib_iters=1, saib_warmup=0, loader_steps=1, loader_repeats=3, loader_warmup=1, profile_steps=1,
    profile_repeats=2, profile_warmup=1, isolate_iters=1, in_step_isolate_iters=0, in_step_repeats=1, compare_steps=1,
    compare_repeats=2, compare_warmup=1, lever_repeats=2, anchor_steps=1, anchor_repeats=2, anchor_warmup=1, ceiling_iters=2,
    # Seconds each part took on the 2-core CPU machine: the larger of two runs
    # on 2026-12-02 (the levers, executor and fused-compile parts included),
    # one with OMP_NUM_THREADS=1 (report-dry-run/report.md) and one without, as
    # the test suite runs it (saib 24 s, saib-in-step 40 s there); compare from
    # an earlier run. The Triton interpreter is most of saib and saib-in-step,
    # which therefore time in place only, one window. The compile parts get 3 s:
    # on a CPU their warm-up takes minutes, so the dry run checks that an
    # overrun is stopped and reported. The budget (300 s for 175 s of
    # estimates) leaves room for a machine half as fast again.
    estimates={"machine": 8, "saib": 24, "data": 3, "loader": 16, "profile-r50": 9, "profile-r18": 9,
               "anchor": 5, "export": 3, "compare": 29, "saib-in-step": 40, "levers": 20, "profile-r18-compile": 3,
               "profile-r50-compile": 3, "profile-r18-compile-fused": 3},
    max_share=2.5,
)


def share(seconds_left: float, todo: list[str], estimates: dict, max_share: float | None = None) -> float:
    """The seconds the first part of `todo` may use (see the module docstring)."""
    total = sum(estimates[name] for name in todo)
    seconds = max(0.0, seconds_left) * estimates[todo[0]] / total if total else 0.0
    return min(seconds, max_share * estimates[todo[0]]) if max_share else seconds

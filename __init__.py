"""iecl: high-throughput self-supervised pretraining of image encoders with
IE-CL and its baselines.

The repository's folders are this package's parts, installed under one name
so that none of them collides with a user's own `model.py` or `train/`:
`iecl.pipeline` (data), `iecl.kernels` (Triton kernels and their references),
`iecl.model` (SAIB, ResNets, heads, losses, methods), `iecl.train` (config,
loop, checkpoints, evaluation) and `iecl.profiling` (benchmarks, step
breakdowns, the GPU report). `iecl.cli` assembles the `iecl` command.
"""

__version__ = "0.1.0"

"""Profiling: step breakdowns (`iecl profile`), epoch-time comparisons of every
method with and without SAIB (`iecl compare`), loader and kernel benchmarks
(`iecl bench loader|saib`). It observes `train`, `pipeline` and `kernels` from
outside and is never imported by them; its commands join the `iecl` command
in iecl.cli (the repository root's cli.py). Results measured on real machines,
with the commands that made them, are under `profiling/results/<machine>/`."""

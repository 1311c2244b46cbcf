"""Profiling: step breakdowns, loader and kernel benchmarks, epoch-time
comparisons. It observes `train`, `pipeline` and `kernels` from outside and is
never imported by them. (Its commands arrive with the profiling issue.)"""

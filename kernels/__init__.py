"""Kernels: fused operations on the hot path, each beside a pure-PyTorch
reference with the same signature (the reference is what tests compare with
and what runs where Triton cannot)."""

from kernels.view_prep import prepare_view_reference

__all__ = ["prepare_view_reference"]

"""Kernels: fused operations on the hot path, each beside a pure-PyTorch
reference with the same signature (the reference is what tests compare with
and what runs where Triton cannot).

Importing this package does not import triton: on a CPU the interpreter is
chosen when a kernel is decorated, so `TRITON_INTERPRET=1` must be set before
`kernels.view_prep_triton`, `kernels.saib_fwd`, `kernels.saib_bwd` or
`kernels.saib_function` is imported. `triton_available` says whether they can run.
"""

from iecl.kernels._triton import triton_available
from iecl.kernels.saib_reference import SAIBParams, saib_reference, saib_reference_uint8
from iecl.kernels.view_prep import prepare_view_reference

__all__ = ["SAIBParams", "prepare_view_reference", "saib_reference", "saib_reference_uint8", "triton_available"]

"""View preparation reference (kernels/view_prep.py)."""

from __future__ import annotations

import pytest
import torch

from iecl.kernels.view_prep import prepare_view_reference
from iecl.pipeline import MEAN_255, STD_255


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_normalises_and_lays_out_channels_last(dtype):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (3, 5, 7, 3), dtype=torch.uint8)
    mean, std = torch.tensor(MEAN_255), torch.tensor(STD_255)
    out = prepare_view_reference(images, mean, std, dtype)
    assert out.shape == (3, 3, 5, 7) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    b, c, y, x = 2, 1, 4, 6
    expected = (images[b, y, x, c].item() - MEAN_255[c]) / STD_255[c]
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert out[b, c, y, x].float().item() == pytest.approx(expected, rel=tol, abs=tol)


def test_rejects_other_inputs():
    with pytest.raises(ValueError, match="uint8"):
        prepare_view_reference(torch.zeros(2, 4, 4, 3), torch.zeros(3), torch.ones(3), torch.float32)

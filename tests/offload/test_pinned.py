"""The expert store's host pieces for cudaHostRegister: page-aligned, marked not to be copied into a forked child
(moetrain.offload.pinned). The registration itself is tested on the GPU (tests/gpu/test_pinned_register_cuda.py)."""

from __future__ import annotations

import pytest
import torch

from moetrain.offload.pinned import RegisteredSlab, dontfork_flag


def test_a_piece_is_a_page_aligned_mapping_kept_out_of_forked_children():
    piece = RegisteredSlab(8 << 20, register=False)
    flag = dontfork_flag(piece.tensor.data_ptr())
    if flag is None:
        pytest.skip("no /proc/self/smaps")
    assert flag, "the piece's mapping must carry MADV_DONTFORK (VmFlags dc)"
    assert piece.tensor.data_ptr() % 4096 == 0 and piece.tensor.numel() == (8 << 20) // 4
    assert piece.tensor.dtype == torch.float32 and not piece.registered
    piece.tensor[:4] = torch.arange(4.0)  # writable, zero-filled elsewhere
    assert piece.tensor[:5].tolist() == [0.0, 1.0, 2.0, 3.0, 0.0]


def test_ordinary_tensors_are_not_marked():
    t = torch.empty(8 << 20, dtype=torch.uint8)
    assert dontfork_flag(t.data_ptr()) in (False, None)

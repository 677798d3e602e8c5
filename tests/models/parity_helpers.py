"""Inputs and comparisons shared by the parity tests against transformers."""

from __future__ import annotations

import torch

ATOL = 1e-4
"""fp32 logits of moetrain and transformers agree to this (absolute)."""
VOCAB = 128
"""The vocabulary of the tiny transformers models in tests/conftest.py (TINY_HF_VOCAB)."""


def padded_batch(seq: int = 12) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Token ids (3, seq) and three masks: none, left-padded rows and right-padded rows."""
    ids = torch.randint(0, VOCAB, (3, seq))
    left = torch.ones(3, seq, dtype=torch.long)
    left[1, :3] = 0
    left[2, :7] = 0
    right = torch.ones(3, seq, dtype=torch.long)
    right[0, -4:] = 0
    right[2, -1:] = 0
    return ids, {"none": None, "left": left, "right": right}


def assert_close_at_real(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None, what: str) -> None:
    """``a`` equals ``b`` to :data:`ATOL` at real (unpadded) positions."""
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


def assert_logits_match(hf, path, case: str):
    """Load the sharded transformers checkpoint at ``path`` with moetrain and compare fp32 logits with
    ``hf`` for an unpadded, a left-padded and a right-padded batch. Returns the moetrain model."""
    import moetrain

    assert len(list(path.glob("*.safetensors"))) > 1, "the checkpoint should be sharded"
    model = moetrain.from_pretrained(path)
    ids, masks = padded_batch()
    for kind, mask in masks.items():
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask).logits.float()
            out = model(ids, attention_mask=mask).logits
        assert_close_at_real(out, ref, mask, f"{case}, padding {kind}")
    return model


def assert_export_round_trip(hf, save_hf, out_dir):
    """Load ``hf``'s sharded checkpoint with moetrain, export it to ``out_dir`` in several shards, and check
    that the export keeps transformers' exact on-disk names and that both transformers and moetrain load
    it with ``hf``'s logits. Returns (moetrain model, reloaded moetrain model)."""
    import moetrain
    from moetrain.models.hf import export_hf
    from moetrain.shards import read_weight_map

    model = moetrain.from_pretrained(save_hf(hf))
    weight_map = export_hf(model, out_dir, max_shard_bytes=64 * 1024)
    assert len(set(weight_map.values())) > 1
    assert sorted(weight_map) == sorted(read_weight_map(save_hf(hf, "names")))
    reloaded_hf = type(hf).from_pretrained(out_dir).eval()
    reloaded = moetrain.from_pretrained(out_dir)
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(reloaded_hf(ids).logits, ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(reloaded(ids).logits, ref, atol=ATOL, rtol=0)
    assert reloaded.config == model.config
    return model, reloaded

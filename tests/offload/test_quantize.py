"""The number formats of compressed expert state against float64 references."""

from __future__ import annotations

import pytest
import torch

from moetrain.offload.quantize import (
    dequantize_blockwise,
    dynamic_code_values,
    quantize_blockwise,
    round_bf16_kahan,
    round_bf16_stochastic,
)
from moetrain.offload.state_format import StateCodec, StateLayout, state_bytes_per_param


def wide_range(n: int, signed: bool, seed: int = 0) -> torch.Tensor:
    """Values spread over seven decades, as Adam's second moment is within one block."""
    g = torch.Generator().manual_seed(seed)
    decades = -6 * torch.rand(n, generator=g, dtype=torch.float64)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 10.0**decades
    return (x if signed else x.abs()).float()


def reference_quantize(x: torch.Tensor, block: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float64: per block absmax, then the codebook entry nearest to x / absmax (brute force)."""
    code = torch.tensor(dynamic_code_values(signed), dtype=torch.float64)
    x64 = x.double()
    out = torch.empty_like(x64)
    dist = torch.empty_like(x64)
    for start in range(0, x.numel(), block):
        b = x64[start:start + block]
        s = b.abs().max()
        normed = b / s if s > 0 else b
        d = (normed[:, None] - code[None, :]).abs()
        best = d.argmin(dim=1)
        out[start:start + block] = code[best] * s
        dist[start:start + block] = d.min(dim=1).values
    return out, dist


def test_codebooks_hold_one_and_zero_and_fit_a_byte():
    for signed in (True, False):
        values = dynamic_code_values(signed)
        assert len(values) <= 256 and len(set(values)) == len(values)
        assert 0.0 in values and max(values) == 1.0
        smallest = 1e-7 if not signed else 1e-6  # 8 (unsigned) or 7 (signed) decades of the block maximum
        assert min(abs(v) for v in values if v) == pytest.approx(smallest)
    assert min(dynamic_code_values(True)) == -1.0


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n,block", [(4096, 256), (1000, 64)])  # 1000: a partial last block
def test_blockwise_quantizer_picks_the_nearest_code(signed, n, block):
    x = wide_range(n, signed)
    q = torch.empty(n, dtype=torch.uint8)
    scale = torch.empty(-(-n // block), dtype=torch.float32)
    quantize_blockwise(x, q, scale, block=block, signed=signed)
    got = dequantize_blockwise(q, scale, block=block, signed=signed, out=torch.empty(n)).double()
    ref, ref_dist = reference_quantize(x, block, signed)
    scales = torch.repeat_interleave(scale.double(), block)[:n]
    # the chosen code is the nearest one (ties decided by fp32 rounding of x / absmax)
    our_dist = (x.double() / scales - got / scales).abs()
    assert torch.all(our_dist <= ref_dist + 1e-6)
    same = (got - ref).abs() <= 1e-6 * ref.abs()  # the same code (up to the fp32 product code * absmax)
    assert same.double().mean() > 0.999
    # in the top decade the code is linear with 64 (signed) or 128 steps: at most half a step of error
    top = x.double().abs() > 0.1 * scales
    assert ((got - x.double()).abs()[top] / scales[top]).max() <= 0.9 / (64 if signed else 128) / 2 + 1e-7


@pytest.mark.parametrize("signed", [True, False])
def test_quantizing_a_dequantized_block_is_exact(signed):
    n, block = 2048, 256
    x = wide_range(n, signed, seed=3)
    q, scale = torch.empty(n, dtype=torch.uint8), torch.empty(n // block)
    quantize_blockwise(x, q, scale, block=block, signed=signed)
    y = dequantize_blockwise(q, scale, block=block, signed=signed, out=torch.empty(n))
    q2, scale2 = torch.empty_like(q), torch.empty_like(scale)
    quantize_blockwise(y, q2, scale2, block=block, signed=signed)
    assert torch.equal(q, q2) and torch.equal(scale, scale2)


def test_zero_block_stays_zero():
    x = torch.zeros(512)
    q, scale = torch.empty(512, dtype=torch.uint8), torch.empty(2)
    quantize_blockwise(x, q, scale, block=256, signed=False)
    assert torch.equal(dequantize_blockwise(q, scale, block=256, signed=False, out=torch.empty(512)), x)


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([1.0 + 2**-10, -3.14159, 1e-3 + 1e-7, 0.5], dtype=torch.float32)  # 0.5 is a bf16 value
    draws = 20000
    total = torch.zeros(4, dtype=torch.float64)
    out = torch.empty(4, dtype=torch.bfloat16)
    lo, hi = x.to(torch.bfloat16).double(), x.to(torch.bfloat16).double()
    for _ in range(draws):
        round_bf16_stochastic(x, out, g)
        v = out.double()
        total += v
        lo, hi = torch.minimum(lo, v), torch.maximum(hi, v)
    mean = total / draws
    spacing = (hi - lo).clamp_min(1e-30)
    # mean within 4 standard errors of x (each draw's spread is at most one bf16 spacing)
    assert torch.all((mean - x.double()).abs() <= 4 * spacing / draws**0.5 + 1e-12)
    assert torch.all(lo <= x.double()) and torch.all(x.double() <= hi)
    assert lo[3] == hi[3] == 0.5  # exactly representable: never moved
    assert torch.all(spacing[:3] < x.double().abs()[:3] * 2**-6)  # neighbours, not farther


def test_kahan_pair_keeps_sixteen_bits():
    x = wide_range(10000, signed=True, seed=5)
    master, comp = torch.empty(10000, dtype=torch.bfloat16), torch.empty(10000, dtype=torch.bfloat16)
    round_bf16_kahan(x, master, comp)
    approx = master.double() + comp.double()
    rel = ((approx - x.double()).abs() / x.double().abs().clamp_min(1e-30)).max()
    assert rel < 2**-15
    assert ((master.double() - x.double()).abs() / x.double().abs().clamp_min(1e-30)).max() > 2**-12  # bf16 alone


@pytest.mark.parametrize("master,moments", [("fp32", "fp32"), ("bf16_sr", "bf16"), ("bf16_kahan", "int8"),
                                            ("fp32", "int8"), ("fp32_split", "int8")])
def test_record_codec_round_trip_and_size(master, moments):
    sizes = (96, 96, 100)  # the last parameter ends in a partial block
    layout = StateLayout(sizes, master, moments, block=32)
    assert layout.nbytes <= sum(sizes) * state_bytes_per_param(master, moments, 32) + 64 * 6
    codec = StateCodec(layout)
    flat = torch.zeros(-(-layout.nbytes // 4), dtype=torch.float32)
    n = sum(sizes)
    w, m, v = wide_range(n, True, 1), wide_range(n, True, 2) * 1e-3, wide_range(n, False, 3) * 1e-6
    codec.encode(flat, master=w, exp_avg=m, exp_avg_sq=v, generator=torch.Generator().manual_seed(0))
    w2, m2, v2 = codec.decode(flat)
    tol = {"fp32": 0.0, "bf16": 2**-8, "int8": 0.9 / 64}[moments]  # relative to the value / the block maximum
    scale = 1.0 if moments != "int8" else 0.0
    assert ((v2 - v).abs() <= tol * (scale * v.abs() + (1 - scale) * v.abs().max())).all()
    assert ((m2 - m).abs() <= tol * (scale * m.abs() + (1 - scale) * m.abs().max())).all()
    wtol = {"fp32": 0.0, "fp32_split": 0.0, "bf16_sr": 2**-7, "bf16_kahan": 2**-15}[master]
    assert ((w2 - w).abs() <= wtol * w.abs()).all()
    # encoding what was decoded changes nothing (checkpoints resume exactly)
    again = flat.clone()
    codec.encode(again, master=w2, exp_avg=m2, exp_avg_sq=v2, generator=None)
    assert torch.equal(codec.decode(again)[1], m2) and torch.equal(codec.decode(again)[2], v2)
    assert torch.equal(codec.decode(again)[0], w2)


@pytest.mark.parametrize("signed", [True, False])
def test_cpu_nearest_code_lookup_equals_bucketize(signed):
    """The CPU's two-table lookup against torch.bucketize on the midpoints, at every midpoint, the floats
    just either side of it, the ends, zeros of both signs and random values over seven decades."""
    from moetrain.offload.quantize import _code, nearest_code

    _, mids = _code(signed, torch.device("cpu"))
    up, down = torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))
    ends = torch.tensor([0.0, -0.0, 1.0, 1e-30] + ([-1.0, -1e-30] if signed else []))
    values = torch.cat([mids, up, down, ends, wide_range(20000, signed, seed=11).clamp(-1, 1)])
    values = values[values >= 0] if not signed else values
    assert torch.equal(nearest_code(values, signed), torch.bucketize(values, mids, out_int32=True))

"""Triton kernels of the fused compressed AdamW step; only :mod:`moetrain.offload.fused_step` imports this module,
lazily (it imports triton at the top). The kernels' names are private: Triton passes their many parameters by
position, and nothing outside that module (and the tests) calls them.

A program owns ``ROWS`` consecutive quantization blocks (``BLOCK`` elements each) of one parameter, a
``(ROWS, BLOCK_P2)`` tile: it reads each element's gradient, master and moments once, steps them in registers and
writes them back in the record's format, the new per-block absmax with them. Under bf16 or fp32 moments a "block"
is just a tile row. Parameters are the grid's second axis (at most three a launch: an expert's gate, up and down
projections) and records of one layout its third, found by their byte offsets from the first (a row of int64
metadata each), so that a chunk of records is one launch.

Only long-standing Triton features are used (``tl.fma``, ``tl.sqrt_rn``, ``tl.div_rn``, ``tl.randint``,
``tl.static_range``, bitcasts, the ``enable_fp_fusion`` launch option of Triton 2.2 and later), so that the Triton a
CUDA build of torch brings along compiles it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _nearest_code(x, mids_ptr, STEPS: tl.constexpr, PW0: tl.constexpr, ZERO: tl.constexpr, LAST: tl.constexpr):
    """Index of the codebook entry nearest to ``x`` (any shape, fp32 in [-1, 1]) as int32: the count of midpoints
    strictly below ``x``, exactly ``torch.bucketize(x, mids)``.

    The codebook's shape gives the position directly: its nonnegative entries are 0 and, for the decade ``e``,
    ``2^k`` entries ``10^-e * (0.1 + 0.9 * (i + 1) / 2^k)`` (``k = bits - 1 - e``) starting at index ``2^k``, so
    ``pos = 2^k * (y * 10^e + 0.8) / 0.9 - 1`` maps every entry to its index and runs linearly between them,
    continuous across decades. ``r = floor(pos)`` is then the interval that holds ``x``, or a neighbour when
    ``x`` sits next to an entry (rounding): either way midpoint ``r`` is one of the two around ``x``, and one
    comparison with it (a single table read) gives the exact count. ``STEPS``: decades below the top one;
    ``PW0``: ``2^(bits - 1)``; ``ZERO``: index of the entry 0; ``LAST``: index of the last midpoint.
    """
    ye = tl.abs(x)
    pw = tl.full(x.shape, PW0, tl.float32)
    for _ in tl.static_range(STEPS):  # bring y into (0.1, 1] a decade at a time; 2^k halves each time
        below = ye <= 0.1
        ye = tl.where(below, ye * 10.0, ye)
        pw = tl.where(below, pw * 0.5, pw)
    p = pw * (ye + 0.8) * (1.0 / 0.9) - 1.0
    pos = tl.where(x < 0, ZERO - p, ZERO + p)
    pos = tl.where(pos == pos, pos, 0.0)  # NaN (a broken state): an index inside the table all the same
    r = tl.minimum(tl.maximum(pos, 0.0), LAST).to(tl.int32)  # truncation is floor here: pos >= 0
    return r + (tl.load(mids_ptr + r) < x).to(tl.int32)


@triton.jit
def _nearest_code_kernel(x_ptr, out_ptr, mids_ptr, n, STEPS: tl.constexpr, PW0: tl.constexpr, ZERO: tl.constexpr,
                        LAST: tl.constexpr, BLOCK: tl.constexpr):
    """:func:`_nearest_code` of ``x`` (n,) fp32 into ``out`` (n,) int32 (the tests compare it with bucketize)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, _nearest_code(x, mids_ptr, STEPS, PW0, ZERO, LAST), mask=mask)


@triton.jit
def _bf16_nearest(x):
    """fp32 ``x`` rounded to the nearest bf16, ties to even (``copy_``'s rounding), in integer ops: the interpreter's
    own fp32 -> bf16 cast truncates, and the cast of a value whose low 16 bits are zero is exact everywhere."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return tl.where(x == x, bits.to(tl.float32, bitcast=True), x).to(tl.bfloat16)  # NaN stays NaN


@triton.jit
def _this_param(param, n0, n1, n2, e0, e1, e2, b0, b1, b2):
    """(size, first element in the record, first block) of the launch's parameter ``param`` (0, 1 or 2), in one
    call: the interpreter pays for each."""
    first, second = param == 0, param == 1
    return (tl.where(first, n0, tl.where(second, n1, n2)), tl.where(first, e0, tl.where(second, e1, e2)),
            tl.where(first, b0, tl.where(second, b1, b2)))


@triton.jit
def _quantize(x, mask, ok_row, q_ptr, scale_ptr, e, blocks, mids_ptr, STEPS: tl.constexpr, PW0: tl.constexpr,
              ZERO: tl.constexpr, LAST: tl.constexpr):
    """Store ``x`` (ROWS, BLOCK_P2) fp32 as codes at ``q_ptr + e`` and each row's absmax at ``scale_ptr + blocks``,
    as ``quantize_blockwise`` does: a zero block keeps scale 0 and is divided by 1."""
    absmax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1)
    tl.store(scale_ptr + blocks, absmax, mask=ok_row)
    divisor = tl.where(absmax > 0, absmax, 1.0)[:, None] + tl.zeros(x.shape, tl.float32)  # one shape, for old Tritons
    normed = tl.div_rn(x, divisor)  # IEEE division: the normed values quantize_blockwise forms
    q = _nearest_code(normed, mids_ptr, STEPS, PW0, ZERO, LAST)
    tl.store(q_ptr + e, q.to(tl.uint8), mask=mask)


@triton.jit
def _adamw_record_kernel(master_ptr, rest_ptr, m_ptr, v_ptr, m_scale_ptr, v_scale_ptr, grad_ptr, grad_scale_ptr,
                        table_ptr, meta_ptr,
                        n0, n1, n2, e0, e1, e2, b0, b1, b2,
                        lr_wd, c1, beta2, c2, step_size, bc2_sqrt, eps,
                        BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr, ROWS: tl.constexpr, HAS_SCALE: tl.constexpr,
                        MASTER_SR: tl.constexpr, MASTER_SPLIT: tl.constexpr, INT8: tl.constexpr,
                        BF16_MOMENTS: tl.constexpr, LERP_FROM_M: tl.constexpr, META: tl.constexpr,
                        MASTER_ITEM: tl.constexpr, MOMENT_ITEM: tl.constexpr, WEIGHT_MASTER: tl.constexpr):
    """One AdamW step of up to three parameters of each of several records of one layout, in place in their bytes.

    The grid's third axis is the record. Pointers: the first record's segments (``master`` fp32 | bf16, ``rest``
    int16 under ``MASTER_SPLIT``, else any, ``exp_avg``/``exp_avg_sq`` fp32 | bf16 | uint8 codes, their (blocks,)
    fp32 scales under int8, else any), a gradient (bf16 | fp32) the others are counted from, the fp32
    ``grad_scale`` scalar (read if ``HAS_SCALE``), the (1024,) codebook table (signed code | its midpoints |
    unsigned code | its midpoints, 256 apart) and ``meta``, (records, META) int64: per record the byte offset of
    its bytes from the first record's, its three parameters' gradients as element offsets from ``grad_ptr``, its
    has-gradient bits (bit i set when parameter i has a gradient, else it reads as zero), its stochastic
    rounding's Philox key and, under ``WEIGHT_MASTER``, its three parameters' compute weights as element offsets from
    ``master_ptr``: the bf16 master (``bf16_sr``, or ``fp32_split``'s bf16 half) is then read from and written to
    the compute weights themselves, and the record's own master segment is never touched.
    ``n*``: parameter sizes (0: no such parameter); ``e*``: first elements in the record;
    ``b*``: first blocks in the scale segments. Scalars (the same step of every record): ``lr_wd = lr *
    weight_decay``, ``c1 = 1 - beta1``, ``c2 = 1 - beta2``, ``step_size = lr / (1 - beta1^t)``, ``bc2_sqrt =
    sqrt(1 - beta2^t)``. ``LERP_FROM_M``: ``c1 < 0.5`` (torch's lerp switches formula there). ``MASTER_ITEM`` /
    ``MOMENT_ITEM``: bytes of a master / moment element.
    """
    param = tl.program_id(1)
    n, first, first_block = _this_param(param, n0, n1, n2, e0, e1, e2, b0, b1, b2)
    if tl.program_id(0) * (ROWS * BLOCK) >= n:
        return  # a shorter parameter than the launch's longest
    row = meta_ptr + tl.program_id(2) * META
    at = tl.load(row)  # this record's bytes, from the first record's: every segment moves by as many bytes
    goff = tl.load(row + 1 + param)
    has_grad = tl.load(row + 4)
    seed = tl.load(row + 5)
    rest_ptr += at // 2
    m_ptr += at // MOMENT_ITEM
    v_ptr += at // MOMENT_ITEM
    m_scale_ptr += at // 4
    v_scale_ptr += at // 4
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # the parameter's blocks
    cols = tl.arange(0, BLOCK_P2)
    idx = rows[:, None] * BLOCK + cols[None, :]  # element in the parameter
    mask = (cols[None, :] < BLOCK) & (idx < n)
    e = first + idx  # element in the record: offset of the segments and of the random bits
    if WEIGHT_MASTER:  # the parameter's compute weights, elements from master_ptr
        w_at = master_ptr + tl.load(row + 6 + param) + idx
    else:
        w_at = master_ptr + at // MASTER_ITEM + e
    n_grad = n * ((has_grad >> param) & 1)  # 0 when the parameter has no gradient: read as zeros
    g = tl.load(grad_ptr + goff + idx, mask=mask & (idx < n_grad), other=0.0).to(tl.float32)
    if HAS_SCALE:
        scale = tl.zeros((ROWS, BLOCK_P2), tl.float32) + tl.load(grad_scale_ptr)  # 1 / the clip coefficient
        g = tl.div_rn(g, scale)
    if MASTER_SPLIT:  # the exact fp32: bits(bf16 half) * 2^16 + rest (split_fp32's layout)
        hi = tl.load(w_at, mask=mask, other=0.0).to(tl.int16, bitcast=True).to(tl.int32)
        lo = tl.load(rest_ptr + e, mask=mask, other=0).to(tl.int32)
        w = ((hi << 16) + lo).to(tl.float32, bitcast=True)
    else:
        w = tl.load(w_at, mask=mask, other=0.0).to(tl.float32)
    if INT8:
        blocks = first_block + rows
        ok_row = (rows * BLOCK) < n
        q_m = tl.load(m_ptr + e, mask=mask, other=0).to(tl.int32)
        q_v = tl.load(v_ptr + e, mask=mask, other=0).to(tl.int32)
        s_m = tl.load(m_scale_ptr + blocks, mask=ok_row, other=0.0)
        s_v = tl.load(v_scale_ptr + blocks, mask=ok_row, other=0.0)
        m = tl.load(table_ptr + q_m) * s_m[:, None]  # code * absmax, the product dequantize_blockwise forms
        v = tl.load(table_ptr + 512 + q_v) * s_v[:, None]
    else:
        m = tl.load(m_ptr + e, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + e, mask=mask, other=0.0).to(tl.float32)
    # AdamW in torch.optim.AdamW's order (decoupled decay first). Every multiply-add is an explicit fma, division
    # and square root are IEEE, and the launch turns implicit contraction off (enable_fp_fusion=False): the
    # interpreter on a CPU and the GPU compute the same bits, and m = code * absmax above is rounded as torch rounds
    # it. The moments are formed as torch's CPU lerp_ and addcmul_ form them (bit for bit); the decay is p - lr*wd*p
    # rounded once, as the fused CUDA AdamW (in fp64) nearly has it, not p * fp32(1 - lr*wd), which rounds lr*wd.
    zero = tl.zeros((ROWS, BLOCK_P2), tl.float32)  # scalars broadcast by hand: older Tritons' fma and div_rn don't
    w = tl.fma(zero - lr_wd, w, w)
    if LERP_FROM_M:  # m.lerp_(g, c1): m + c1 * (g - m) for c1 < 0.5, else g + (c1 - 1) * (g - m)
        m = tl.fma(zero + c1, g - m, m)
    else:
        m = tl.fma(zero + (c1 - 1.0), g - m, g)
    v = tl.fma(c2 * g, g, v * beta2)  # v.mul_(beta2).addcmul_(g, g, value=c2)
    denom = tl.div_rn(tl.sqrt_rn(v), zero + bc2_sqrt) + eps
    w = w - tl.div_rn(step_size * m, denom)
    if MASTER_SR:
        # 16 random bits below bf16's mantissa, then truncation: round_bf16_stochastic's rule, with Philox bits
        # keyed by the record and step and counted by the element
        noise = (tl.randint(seed, e) & 0xFFFF).to(tl.int32)
        bits = (w.to(tl.int32, bitcast=True) + noise) & -65536
        tl.store(w_at, bits.to(tl.float32, bitcast=True).to(tl.bfloat16), mask=mask)
    elif MASTER_SPLIT:  # split_fp32: the magnitude's bits rounded up from half way, the rest in [-2^15, 2^15)
        bits = w.to(tl.int32, bitcast=True)
        mag = bits & 0x7FFFFFFF
        rest = mag - ((mag + 0x8000) & 0x7FFF0000)
        hi = (bits - rest) >> 16  # arithmetic: the sign bit stays
        nan = w != w
        hi = tl.where(nan, 0x7FC0, hi)
        rest = tl.where(nan, 0, rest)
        tl.store(w_at, hi.to(tl.int16).to(tl.bfloat16, bitcast=True), mask=mask)
        tl.store(rest_ptr + e, rest.to(tl.int16), mask=mask)
    else:
        tl.store(w_at, w, mask=mask)
    if INT8:
        _quantize(m, mask, ok_row, m_ptr, m_scale_ptr, e, blocks, table_ptr + 256, 6, 64.0, 127, 253)
        _quantize(v, mask, ok_row, v_ptr, v_scale_ptr, e, blocks, table_ptr + 768, 7, 128.0, 0, 254)
    elif BF16_MOMENTS:
        tl.store(m_ptr + e, _bf16_nearest(m), mask=mask)
        tl.store(v_ptr + e, _bf16_nearest(v), mask=mask)
    else:
        tl.store(m_ptr + e, m, mask=mask)
        tl.store(v_ptr + e, v, mask=mask)

"""The fused compressed AdamW kernel compiled for CUDA: one record of the DeepSeek-MoE-16B expert shape (3 x 2048 x
1408, bf16 gradients, int8 blocks of 256) against the unfused path on the GPU (decode, torch's fused AdamW, encode),
the compiled kernel against Triton's CPU interpreter, and the engine with the kernel on and off.

Neither comparison is bit for bit. Torch's fused CUDA AdamW rounds its moments its own way, and run r5 (Triton 3.6
on an H200 against the 3.9 interpreter) found the compiled kernel's moments an ulp or two from the interpreter's.
An ulp of a moment is measured against the terms that form it (``beta1 * m`` and ``(1 - beta1) * g``), not against
the result, because the two can cancel. So int8 codes may differ by one step where the value sits that close to a
codebook midpoint, bf16 values by one bf16 step where they sit at a rounding boundary, and scales by as much as
their block's largest moment moved.

Run on the GPU machine: ``python -m pytest -q tests/gpu/test_fused_step_cuda.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "offload"))
from offload_harness import OPTIM, batches, tiny_model  # noqa: E402
from test_fused_step import assert_bf16_neighbours, bf16_neighbours  # noqa: E402

from moetrain.offload import build_optimizer, fused_step, gpu_step  # noqa: E402
from moetrain.offload.adam import adamw  # noqa: E402
from moetrain.offload.config import OffloadConfig  # noqa: E402
from moetrain.offload.quantize import _code  # noqa: E402
from moetrain.offload.state_format import StateCodec, StateLayout, rounding_seed  # noqa: E402
from moetrain.optim import OptimizerConfig, lr_at  # noqa: E402

DEEPSEEK = (2048 * 1408,) * 3
CFG = OptimizerConfig(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
REPO = Path(__file__).resolve().parents[2]
DEVICE = torch.device("cuda")


def deepseek_record(master: str, moments: str, sizes=DEEPSEEK, block: int = 256, seed: int = 0):
    """(record, its bytes on the GPU): weights ~ N(0, 0.02), moments of an earlier step's gradients, bf16
    gradients; the record of expert 5 of layer 3."""
    dev = DEVICE
    g = torch.Generator(device=dev).manual_seed(seed)
    layout = StateLayout(sizes, master, moments, block)
    codec = StateCodec(layout)
    n = layout.numel
    flat = torch.zeros(-(-layout.nbytes // 4), device=dev)
    earlier = torch.randn(n, device=dev, generator=g) * 1e-3
    codec.encode(flat, master=torch.randn(n, device=dev, generator=g) * 0.02, exp_avg=0.1 * earlier,
                 exp_avg_sq=0.05 * earlier * earlier, generator=torch.Generator(device=dev).manual_seed(seed))
    params = []
    for size in sizes:
        p = torch.nn.Parameter(torch.zeros(size, dtype=torch.bfloat16, device=dev))
        p.grad = (torch.randn(size, device=dev, generator=g) * 1e-3).bfloat16()
        params.append(p)
    return SimpleNamespace(layout=layout, codec=codec, params=params, layer=3, expert=5), flat


def unfused_step(rec, flat: torch.Tensor, *, step: int, grad_scale: torch.Tensor):
    """The unfused GPU step on a copy: (new bytes, fp32 master, exp_avg, exp_avg_sq before encoding)."""
    out = flat.clone()
    master, exp_avg, exp_avg_sq = rec.codec.decode(out)
    grads = [p.grad.reshape(-1) for p in rec.params]
    adamw([master], [torch.cat(grads)], [exp_avg], [exp_avg_sq], steps=[step], lr=CFG.lr,
          weight_decay=CFG.weight_decay, cfg=CFG, grad_scale=grad_scale)
    exact = (master.clone(), exp_avg.clone(), exp_avg_sq.clone())
    generator = rec.codec.record_generator(out.device, rounding_seed(rec.layer, rec.expert, step))
    rec.codec.encode(out, master=master, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, generator=generator)
    return out, exact


def moment_bounds(rec, flat: torch.Tensor, grad_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) bounds on how far two correct fp32 computations of the new (exp_avg, exp_avg_sq) may differ: 4 ulps of
    the terms each sum adds (different rounding orders and fused multiply-adds)."""
    _, m, v = rec.codec.decode(flat.clone())
    g = torch.cat([p.grad.reshape(-1).float() for p in rec.params]) / grad_scale
    b1, b2 = CFG.betas
    ulp = 4 * 2.0**-24
    return ulp * (b1 * m.abs() + (1 - b1) * g.abs()), ulp * (b2 * v + (1 - b2) * g * g)


def master_tolerance(codec, flat_before: torch.Tensor, grads: list[torch.Tensor], *, step: int,
                     grad_scale: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(n,) bound on how far two correct fp32 computations of the stepped master may differ: 1e-6 of the larger of
    weight and update (their own rounding), plus the moments' rounding (``moment_bounds``' 4 ulps of their terms)
    carried through the update ``lr / bc1 * m / (sqrt(v) / bc2_sqrt + eps)``. Run r6 found the compiled kernel's
    masters further apart than ulps of the weight where the weight is near zero or where m's two terms cancel."""
    w, m, v = (t.double() for t in codec.decode(flat_before.clone()))
    g = torch.cat([x.reshape(-1).double() for x in grads]) / grad_scale.double()
    b1, b2 = CFG.betas
    ulp = 4 * 2.0**-24
    m_new, v_new = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    m_err, v_err = ulp * (b1 * m.abs() + (1 - b1) * g.abs()), ulp * (b2 * v + (1 - b2) * g * g)
    bc2_sqrt = (1 - b2**step) ** 0.5
    denom = v_new.sqrt() / bc2_sqrt + CFG.eps
    sqrt_err = torch.minimum(v_err / (2 * v_new.sqrt()).clamp_min(1e-300), v_err.sqrt()) / bc2_sqrt
    step_size = CFG.lr / (1 - b1**step)
    update_err = step_size * (m_err / denom + m_new.abs() * sqrt_err / denom**2)
    own = 1e-6 * torch.maximum(w.abs(), (after.double() - w).abs())
    return (own + 2 * update_err).float()


def assert_scales_agree(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, *, block: int) -> None:
    """Per-block absmax within the largest bound of the block's moments (plus an ulp of the scale)."""
    n_blocks = want.numel()
    padded = torch.zeros(n_blocks * block, device=bound.device)
    padded[:bound.numel()] = bound
    slack = padded.view(n_blocks, block).amax(dim=1) + 2.0**-23 * want.abs()
    assert ((got - want).abs() <= slack).all()


def assert_bf16_agree(got: torch.Tensor, value: torch.Tensor, bound: torch.Tensor, name: str) -> None:
    """bf16 ``got`` is a bf16 neighbour of the fp32 ``value`` it rounds: the nearest one, or the other one where
    ``value`` lies within ``bound`` of the midpoint between them (the other computation may have crossed it), or a
    neighbour of a value within ``bound`` where ``value`` sits that close to a bf16 value (run r6: the other side)."""
    toward, away = bf16_neighbours(value)
    below, above = bf16_neighbours(value - 2 * bound), bf16_neighbours(value + 2 * bound)
    got = got.float()
    assert ((torch.minimum(*below) <= got) & (got <= torch.maximum(*above))).all(), name
    nearest = torch.where((value - toward).abs() <= (away - value).abs(), toward, away)
    at_midpoint = (value - (toward + away) / 2).abs() <= 2 * bound
    near_grid = torch.minimum((value - toward).abs(), (away - value).abs()) <= 2 * bound  # the other side of it
    assert ((got == nearest) | at_midpoint | near_grid).all(), name


def assert_codes_agree(got: torch.Tensor, want: torch.Tensor, value: torch.Tensor, scale: torch.Tensor, *,
                       bound: torch.Tensor, block: int, signed: bool) -> None:
    """int8 codes equal but one step apart where the reference's normed value lies within ``bound`` (relative to
    the block's scale, plus 1e-5) of the midpoint between the two codes, and rarely."""
    diff = got.int() != want.int()
    if not diff.any():
        return
    assert ((got.int() - want.int()).abs()[diff] == 1).all()
    _, mids = _code(signed, got.device)
    s = torch.repeat_interleave(scale, block)[:value.numel()]
    s = torch.where(s > 0, s, torch.ones_like(s))
    normed = (value / s)[diff]
    mid = mids[torch.minimum(got.long(), want.long())[diff]]
    assert ((normed - mid).abs() <= (bound / s)[diff] * 4 + 1e-5 * mid.abs().clamp_min(1e-6)).all()
    assert diff.double().mean() < 1e-3


@pytest.mark.parametrize("master,moments", [("fp32", "int8"), ("bf16_sr", "int8"), ("bf16_sr", "bf16")])
def test_deepseek_record_against_unfused(master, moments):
    rec, flat = deepseek_record(master, moments)
    before = rec.codec.decode_master(flat).clone()
    flat_before = flat.clone()
    scale = torch.tensor(1.3, device=DEVICE)
    step = 7
    ref, (exact, m_exact, v_exact) = unfused_step(rec, flat, step=step, grad_scale=scale)
    m_bound, v_bound = moment_bounds(rec, flat, scale)
    fused_step.fused_step_(rec, flat, lr=CFG.lr, weight_decay=CFG.weight_decay, cfg=CFG, step=step, grad_scale=scale)
    got, want = rec.layout.views(flat), rec.layout.views(ref)
    if moments == "int8":
        for name, scale_name, value, bound, signed in (("exp_avg", "m_scale", m_exact, m_bound, True),
                                                       ("exp_avg_sq", "v_scale", v_exact, v_bound, False)):
            assert_scales_agree(got[scale_name], want[scale_name], bound, block=256)
            assert_codes_agree(got[name], want[name], value, want[scale_name], bound=bound, block=256, signed=signed)
    else:
        for name, value, bound in (("exp_avg", m_exact, m_bound), ("exp_avg_sq", v_exact, v_bound)):
            assert_bf16_agree(got[name], value, bound, name)
    if master == "fp32":
        tol = master_tolerance(rec.codec, flat_before, [p.grad for p in rec.params], step=step, grad_scale=scale,
                               after=exact)
        assert ((got["master"] - exact).abs() <= tol).all()
    else:
        assert_bf16_neighbours(got["master"], exact, before)
        toward, away = bf16_neighbours(exact)
        spacing = (away - toward).abs().double()
        ok = spacing > 0
        error = ((got["master"].double() - exact.double()) / spacing)[ok]
        assert abs(float(error.mean())) < 4 * 0.5 / error.numel() ** 0.5 + 1e-4  # unbiased over 8.65 M elements
        rec2, flat2 = deepseek_record(master, moments)  # the same inputs, stepped again
        fused_step.fused_step_(rec2, flat2, lr=CFG.lr, weight_decay=CFG.weight_decay, cfg=CFG, step=step,
                               grad_scale=scale)
        assert torch.equal(rec2.layout.views(flat2)["master"], got["master"])  # the same seed draws the same bits


@pytest.mark.parametrize("master,moments", [("bf16_sr", "int8"), ("fp32_split", "int8")])
def test_records_of_one_launch_equal_one_launch_each(master, moments):
    """Five DeepSeek-MoE-16B records in slots of one pool (as the swapper lays them out), one launch for all, get
    the bytes each gets from a launch of its own: offsets, gradients, seeds."""
    alone = [deepseek_record(master, moments, seed=s) for s in range(5)]
    for e, (rec, _) in enumerate(alone):
        rec.expert = e
    slot = alone[0][1].numel() + 1024  # floats a slot: the record and some padding
    pool = torch.zeros(len(alone) * slot, device=DEVICE)
    together = []
    for i, (rec, flat) in enumerate(alone):
        dst = pool[i * slot:i * slot + flat.numel()]
        dst.copy_(flat)
        together.append((rec, dst))
    scale = torch.tensor(1.3, device=DEVICE)
    for rec, flat in alone:
        fused_step.fused_step_(rec, flat, lr=CFG.lr, weight_decay=CFG.weight_decay, cfg=CFG, step=5, grad_scale=scale)
    fused_step.fused_step_many_(together, steps=[5] * len(together), lr=CFG.lr, weight_decay=CFG.weight_decay,
                                cfg=CFG, grad_scale=scale)
    for (_, a), (_, b) in zip(alone, together, strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("master,moments", [("bf16_sr", "int8"), ("fp32_split", "int8"), ("bf16_sr", "bf16")])
def test_tile_and_warps_leave_the_bits_alone(monkeypatch, master, moments):
    """The tile and warp count are speed knobs (run r33 chose 256 and 2): the kernel as it was tuned before (2048
    elements, 8 warps a program) writes the same bytes."""
    rec, start = deepseek_record(master, moments)
    scale = torch.tensor(1.3, device=DEVICE)
    out = []
    for tile, warps in ((fused_step.TILE, fused_step.NUM_WARPS), (2048, 8)):
        monkeypatch.setattr(fused_step, "TILE", tile)
        monkeypatch.setattr(fused_step, "NUM_WARPS", warps)
        flat = start.clone()
        fused_step.fused_step_(rec, flat, lr=CFG.lr, weight_decay=CFG.weight_decay, cfg=CFG, step=3, grad_scale=scale)
        out.append(flat.view(torch.int32))
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("moments", ["int8", "bf16"])
def test_split_master_steps_as_fp32(moments):
    """``fp32_split`` is the fp32 master in two halves: the compiled kernel's step of a DeepSeek-MoE-16B record in
    it is bit for bit its step of the same record in the fp32 layout (joined master, moments, codes, scales), and
    the halves are the split of the new master (its bf16 half the nearest bf16, what the weights compute with)."""
    out = {}
    for master in ("fp32", "fp32_split"):
        rec, flat = deepseek_record(master, moments)
        fused_step.fused_step_(rec, flat, lr=CFG.lr, weight_decay=CFG.weight_decay, cfg=CFG, step=7,
                               grad_scale=torch.tensor(1.3, device=DEVICE))
        views = rec.layout.views(flat)
        out[master] = (rec, flat, [rec.codec.decode_master(flat)] +
                       [views[k] for k in ("exp_avg", "exp_avg_sq", "m_scale", "v_scale") if k in views])
    for a, b in zip(out["fp32"][2], out["fp32_split"][2], strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    rec, flat, (master, *_) = out["fp32_split"]
    again = flat.clone()
    rec.codec.encode_master(again, master)  # the torch split of the joined master: the kernel's bytes
    assert torch.equal(again.view(torch.int32), flat.view(torch.int32))
    hi = rec.layout.views(flat)["master"].float()
    assert ((hi - master).abs() <= (master.bfloat16().float() - master).abs()).all()  # nearest


def test_compiled_kernel_agrees_with_the_interpreter(tmp_path):
    """A small record (four parameters, partial blocks) stepped on the GPU and by the interpreter in a child process
    on the CPU: the same Philox bits and the same arithmetic, up to the compiler's rounding of the moments (run r5:
    a scale an ulp apart). fp32 segments within 4 ulps, codes and bf16 values at most one step apart, rarely."""
    sizes = (64 * 40, 64 * 24, 64 * 20 + 37, 300)
    results, befores = {}, {}
    for master, moments in (("bf16_sr", "int8"), ("fp32", "int8"), ("bf16_sr", "bf16")):
        rec, flat = deepseek_record(master, moments, sizes=sizes, block=64, seed=1)
        inputs = {"flat": flat.cpu(), "grads": [p.grad.cpu() for p in rec.params], "master": master,
                  "moments": moments}
        befores[(master, moments)] = (rec.codec, flat.clone(), [p.grad.clone() for p in rec.params])
        torch.save(inputs, tmp_path / f"{master}-{moments}.pt")
        fused_step.fused_step_(rec, flat, lr=CFG.lr, weight_decay=CFG.weight_decay, cfg=CFG, step=3,
                               grad_scale=torch.tensor(1.3, device=DEVICE))
        results[(master, moments)] = flat.cpu()
    script = f"""
import glob, torch
from types import SimpleNamespace
from moetrain.offload import fused_step
from moetrain.offload.state_format import StateCodec, StateLayout
from moetrain.optim import OptimizerConfig
cfg = OptimizerConfig(lr={CFG.lr}, betas={CFG.betas}, eps={CFG.eps}, weight_decay={CFG.weight_decay})
for path in glob.glob({str(tmp_path)!r} + "/*.pt"):
    x = torch.load(path)
    layout = StateLayout({sizes}, x["master"], x["moments"], 64)
    params = []
    for g in x["grads"]:
        p = torch.nn.Parameter(torch.zeros(g.numel(), dtype=g.dtype))
        p.grad = g
        params.append(p)
    rec = SimpleNamespace(layout=layout, codec=StateCodec(layout), params=params, layer=3, expert=5)
    fused_step.fused_step_(rec, x["flat"], lr=cfg.lr, weight_decay=cfg.weight_decay, cfg=cfg, step=3,
                           grad_scale=torch.tensor(1.3))
    torch.save(x["flat"], path + ".out")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    child = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-5000:]
    for (master, moments), gpu in results.items():
        cpu = torch.load(tmp_path / f"{master}-{moments}.pt.out")
        layout = StateLayout(sizes, master, moments, 64)
        for name, view in layout.views(gpu).items():
            want = layout.views(cpu)[name]
            if name == "master" and master == "fp32":
                codec, flat_before, grads = befores[(master, moments)]
                tol = master_tolerance(codec, flat_before, grads, step=3, grad_scale=torch.tensor(1.3, device=DEVICE),
                                       after=want.to(DEVICE)).cpu()
                assert ((view - want).abs() <= tol).all(), (master, moments, name)
            else:
                assert_segments_agree(view, want, (master, moments, name))


def assert_segments_agree(got: torch.Tensor, want: torch.Tensor, what) -> None:
    """One record segment computed twice: fp32 within 4 ulps, bf16 values and uint8 codes one step apart at most,
    at under 2% of the elements (the small record has a few thousand)."""
    if want.dtype == torch.float32:
        assert ((got - want).abs() <= 4 * 2.0**-23 * want.abs() + 1e-38).all(), what
        return
    as_int = (lambda t: t.view(torch.int16).int()) if want.dtype == torch.bfloat16 else (lambda t: t.int())
    diff = (as_int(got) - as_int(want)).abs()  # bf16 of one sign: adjacent values are adjacent integers
    assert (diff <= 1).all() and (diff > 0).double().mean() < 0.02, what


def _train(model, opt, data, accum: int = 2) -> None:
    for i in range(len(data) // accum):
        for ids in data[i * accum:(i + 1) * accum]:
            ids = ids.cuda()
            out = model(ids, labels=ids)
            (out.loss / accum).backward()
        opt.clip_grad_norm_(OPTIM.max_grad_norm)
        opt.step(lr_at(OPTIM, i, 12))
        opt.zero_grad()
    opt.finalize()
    torch.cuda.synchronize()


@pytest.mark.parametrize("master,steps", [("fp32", 4), ("bf16_sr", 1)])
def test_engine_fused_on_and_off(monkeypatch, master, steps):
    """The engine on CUDA (int8 moments, blocks of 64, compute weights fp32) with the fused kernel and with
    ``MOETRAIN_FUSED_STEP=0``: fp32 masters agree to a code step of a moment now and then (lr 1e-2 times ~1%),
    bf16_sr masters after one step are the same values or bf16 neighbours (different rounding bits)."""
    calls = []
    real = gpu_step.fused_step_many_

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gpu_step, "fused_step_many_", counting)
    masters = {}
    data = batches(steps=steps, tokens=16)
    for fused in (True, False):
        monkeypatch.setenv(fused_step.ENV, "1" if fused else "0")
        model = tiny_model(num_experts=16).cuda()
        model.set_expert_impl("loop")
        opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", master=master, moments="int8", quant_block=64,
                                                          gpu_slots=4, compute_dtype="fp32"))
        stepped = len(calls)
        _train(model, opt, data)
        assert (len(calls) > stepped) == fused
        masters[fused] = {rec.key: torch.cat([w.reshape(-1) for w in opt.store.master_weights(rec)])
                          for rec in opt.store}
        opt.close()
    for key, on in masters[True].items():
        off = masters[False][key]
        if master == "fp32":
            assert (on - off).abs().max() <= 5e-4, key
        else:
            assert ((on - off).abs() <= 2.0**-7 * torch.maximum(on.abs(), off.abs())).all(), key

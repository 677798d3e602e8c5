"""The fused compressed AdamW kernel (moetrain.offload.fused_step) against the unfused path, on the CPU through
Triton's interpreter (``TRITON_INTERPRET=1``; skipped without triton).

The reference is the path the kernel replaces: decode the record to fp32, torch.optim's AdamW ops
(:func:`~moetrain.offload.adam.reference_adamw`), encode. The kernel forms the moments with the same fp32 operations,
so int8 codes and scales, bf16 and fp32 moments are compared exactly; the master differs by an ulp or so (the
kernel decays by ``p - lr*wd*p`` rounded once, torch by ``p * fp32(1 - lr*wd)``, and torch's CPU sqrt is not
always correctly rounded); under ``bf16_sr`` every element must be one of the two bf16 neighbours of the exact
fp32 update, the bits must be a function of (layer, expert, step, element) only, and their mean unbiased.

The interpreter must be on before triton is first imported (triton's own library functions are built then), and
other tests import triton first (deepspeed does), so a normal session runs the kernel tests of this module in a
child pytest with ``TRITON_INTERPRET=1`` (:func:`test_kernels_under_the_interpreter`), where they run in-process.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from offload_harness import OPTIM, batches, tiny_model, train
from test_quantize import wide_range

from moetrain.models import kernel_switch
from moetrain.offload import fused_step
from moetrain.offload.adam import reference_adamw
from moetrain.offload.state_format import StateCodec, StateLayout, rounding_seed
from moetrain.optim import OptimizerConfig

CFG = OptimizerConfig(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
FORMATS = [("fp32", "int8"), ("bf16_sr", "int8"), ("fp32", "bf16"), ("bf16_sr", "bf16"), ("bf16_sr", "fp32"),
           ("fp32_split", "int8"), ("fp32_split", "bf16")]


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(scope="module")
def kernels():
    """The kernels' module, interpreted (in the child session only: see the module's docstring)."""
    if not INTERPRETING:
        pytest.skip("runs in the child session under TRITON_INTERPRET=1 (test_kernels_under_the_interpreter)")
    pytest.importorskip("triton")
    return importlib.import_module(fused_step.KERNELS)


def test_kernels_under_the_interpreter(run_interpreted):
    """This module's kernel tests, in a child pytest that turns the interpreter on before importing triton."""
    run_interpreted(__file__)


def make_record(sizes: tuple[int, ...], master: str, moments: str, block: int, *, grad_dtype=torch.bfloat16,
                missing: tuple[int, ...] = (), seed: int = 0, layer: int = 3, expert: int = 5):
    """(record, its bytes): random master, moments over several decades (encoded: the state of a record that has
    been stepped before), random gradients of ``grad_dtype`` but None for the parameters in ``missing``."""
    layout = StateLayout(sizes, master, moments, block)
    codec = StateCodec(layout)
    n = layout.numel
    flat = torch.zeros(-(-layout.nbytes // 4))
    w, m, v = wide_range(n, True, seed) * 0.2 + 0.05, wide_range(n, True, seed + 1) * 1e-3, \
        wide_range(n, False, seed + 2) * 1e-6
    codec.encode(flat, master=w, exp_avg=m, exp_avg_sq=v, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 3)
    params = []
    for i, size in enumerate(sizes):
        p = torch.nn.Parameter(torch.zeros(size, dtype=grad_dtype))
        if i not in missing:
            p.grad = (torch.randn(size, generator=g) * 1e-2).to(grad_dtype)
        params.append(p)
    return SimpleNamespace(layout=layout, codec=codec, params=params, layer=layer, expert=expert), flat


def reference_step(rec, flat: torch.Tensor, *, lr: float, cfg: OptimizerConfig, step: int,
                   grad_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused step on a copy of ``flat``: (the new bytes, the exact fp32 master before it was encoded)."""
    out = flat.clone()
    master, exp_avg, exp_avg_sq = rec.codec.decode(out)
    grad = torch.cat([p.grad.float() if p.grad is not None else torch.zeros(p.numel()) for p in rec.params])
    if grad_scale is not None:
        grad = grad / grad_scale  # the division torch's fused AdamW applies, as the kernel does
    reference_adamw([master], [grad], [exp_avg], [exp_avg_sq], steps=[step], lr=lr, weight_decay=cfg.weight_decay,
                    cfg=cfg)
    exact = master.clone()
    generator = rec.codec.record_generator(out.device, rounding_seed(rec.layer, rec.expert, step))
    rec.codec.encode(out, master=master, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, generator=generator)
    return out, exact


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values either side of fp32 ``x`` (toward zero, away from it; equal when x is one)."""
    bits = x.view(torch.int32)
    toward = bits & -65536
    away = torch.where(toward == bits, toward, toward + 65536)
    return toward.view(torch.float32), away.view(torch.float32)


def update_scale(before: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """What an element's fp32 rounding is relative to: the larger of the weight and its update (an update far larger
    than the weight, which random moments give, leaves the weight with the update's rounding)."""
    return torch.maximum(before.abs(), (exact - before).abs())


def assert_master_close(stored: torch.Tensor, exact: torch.Tensor, before: torch.Tensor) -> None:
    assert ((stored - exact).abs() <= 1e-6 * update_scale(before, exact)).all()


def assert_bf16_neighbours(stored: torch.Tensor, exact: torch.Tensor, before: torch.Tensor) -> None:
    """Each of ``stored`` (bf16) is a bf16 neighbour of ``exact`` (fp32), or of a value within the kernel's own fp32
    rounding of it (an ulp or so of the larger of weight and update)."""
    tol = 1e-6 * update_scale(before, exact)
    below, above = bf16_neighbours(exact - tol), bf16_neighbours(exact + tol)
    low, high = torch.minimum(*below), torch.maximum(*above)
    value = stored.float()
    ok = (low <= value) & (value <= high)
    assert ok.all(), f"{int((~ok).sum())} values are not bf16 neighbours of the update"


def test_module_imports_without_triton(monkeypatch, request):
    """A fresh copy of the module loads with triton unimportable, and reports the fused step unavailable."""
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    kernel_switch.triton_importable.cache_clear()  # asked again: the answer is cached per process
    request.addfinalizer(kernel_switch.triton_importable.cache_clear)
    spec = importlib.util.spec_from_file_location("fused_step_copy", fused_step.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "fused_step_copy", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert not module.triton_importable()
    assert not module.fused_step_available(StateLayout((64,), "bf16_sr", "int8", 16), torch.device("cuda"))


def test_availability(monkeypatch):
    int8 = StateLayout((64,), "bf16_sr", "int8", 16)
    assert not fused_step.fused_step_available(int8, torch.device("cpu"))
    assert fused_step.supports(int8) and fused_step.supports(StateLayout((64,), "fp32", "bf16"))
    assert not fused_step.supports(StateLayout((64,), "fp32", "fp32"))  # torch's fused AdamW, in place
    assert not fused_step.supports(StateLayout((64,), "bf16_kahan", "int8", 16))
    assert not fused_step.supports(StateLayout((64,), "fp32", "int8", 2 * fused_step.MAX_BLOCK))
    monkeypatch.setenv(fused_step.ENV, "0")
    assert not fused_step.enabled()
    monkeypatch.setenv(fused_step.ENV, "1")
    assert fused_step.enabled()


def test_benchmark_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the benchmark")
    from moetrain.bench import fused_step as bench

    with pytest.raises(SystemExit, match="needs a CUDA device"):
        bench.main(["--records", "1"])


@pytest.mark.parametrize("signed", [True, False])
def test_kernel_nearest_code_equals_bucketize(kernels, signed):
    """At every midpoint and codebook entry, the floats either side of each, zeros, the ends, and random values
    over seven decades: the kernel's count of midpoints below equals torch.bucketize's."""
    from moetrain.offload.quantize import _code

    code, mids = _code(signed, torch.device("cpu"))
    points = torch.cat([mids, code])
    up, down = torch.nextafter(points, torch.tensor(2.0)), torch.nextafter(points, torch.tensor(-2.0))
    ends = torch.tensor([0.0, -0.0, 1.0, 1e-30, 1e-9, 1e-8, 1e-7] + ([-1.0, -1e-30, -1e-8] if signed else []))
    values = torch.cat([points, up, down, ends, wide_range(50000, signed, seed=11).clamp(-1, 1)])
    values = values[(values >= (-1 if signed else 0)) & (values <= 1)]
    out = torch.empty(values.numel(), dtype=torch.int32)
    table = fused_step.code_table(torch.device("cpu"))
    geometry = (6, 64.0, 127, 253) if signed else (7, 128.0, 0, 254)
    kernels._nearest_code_kernel[(-(-values.numel() // 8192),)](
        values, out, table[256:] if signed else table[768:], values.numel(), *geometry, BLOCK=8192)
    assert torch.equal(out, torch.bucketize(values, mids, out_int32=True))


CASES = [  # sizes (the last ends in a partial block), block, gradient dtype, grad_scale, parameters without a gradient
    ((64 * 40, 64 * 40, 64 * 20 + 37), 64, torch.bfloat16, 1.7, (1,)),
    ((96, 64, 100, 50), 32, torch.float32, None, ()),  # four parameters: two launches
]


@pytest.mark.parametrize("master,moments", FORMATS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fused_step_equals_unfused(kernels, master, moments, case):
    sizes, block, grad_dtype, scale, missing = CASES[case]
    rec, flat = make_record(sizes, master, moments, block, grad_dtype=grad_dtype, missing=missing, seed=case)
    grad_scale = None if scale is None else torch.tensor(scale)
    step = 4
    before = rec.codec.decode_master(flat).clone()
    ref, exact = reference_step(rec, flat, lr=CFG.lr, cfg=CFG, step=step, grad_scale=grad_scale)
    fused_step.fused_step_(rec, flat, lr=CFG.lr, weight_decay=CFG.weight_decay, cfg=CFG, step=step,
                           grad_scale=grad_scale)
    got, want = rec.layout.views(flat), rec.layout.views(ref)
    for name in ("exp_avg", "exp_avg_sq", "m_scale", "v_scale"):  # codes and scales, bf16 or fp32 moments
        if name in got:
            assert torch.equal(got[name], want[name]), name
    if master == "fp32":
        assert_master_close(got["master"], exact, before)
    elif master == "fp32_split":  # the exact fp32 in two halves, encoded as split_fp32 encodes it
        assert_master_close(rec.codec.decode_master(flat), exact, before)
        again = flat.clone()
        rec.codec.encode_master(again, rec.codec.decode_master(flat))
        assert torch.equal(again.view(torch.int32), flat.view(torch.int32))  # bytes (a float view may hold NaNs)
    else:
        assert_bf16_neighbours(got["master"], exact, before)
        assert not torch.equal(got["master"], want["master"])  # Philox bits, not the torch.Generator's


@pytest.mark.parametrize("master,moments", [("bf16_sr", "int8"), ("fp32_split", "bf16"), ("fp32", "int8")])
def test_many_records_in_one_launch_equal_one_launch_each(kernels, master, moments, monkeypatch):
    """Records stepped together (launches of up to RECORDS_PER_LAUNCH, grouped by step number) get the bytes each
    gets alone: their own offsets, gradients (one missing), seeds and bias corrections."""
    def records():
        out = [make_record((256, 200, 96), master, moments, 64, seed=s, expert=s,
                           missing=(1,) if s == 2 else ()) for s in range(5)]
        return out, [3, 3, 4, 3, 3]  # record 2 is a step ahead: a launch of its own

    alone, steps = records()
    for (rec, flat), step in zip(alone, steps, strict=True):
        fused_step.fused_step_(rec, flat, lr=CFG.lr, weight_decay=CFG.weight_decay, cfg=CFG, step=step,
                               grad_scale=torch.tensor(1.7))
    monkeypatch.setattr(fused_step, "RECORDS_PER_LAUNCH", 3)  # the four records at step 3: launches of 3 and 1
    launched = []
    kernel = kernels._adamw_record_kernel
    monkeypatch.setattr(kernels, "_adamw_record_kernel", _Counting(kernel, launched))
    together, _ = records()
    masters = fused_step.fused_step_many_(together, steps=steps, lr=CFG.lr, weight_decay=CFG.weight_decay, cfg=CFG,
                                          grad_scale=torch.tensor(1.7))
    assert [grid[2] for grid in launched] == [3, 1, 1]
    for (rec, a), (_, b), master in zip(alone, together, masters, strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
        assert master.data_ptr() == b.data_ptr() and master.numel() == rec.layout.numel


@pytest.mark.parametrize("master,moments", [("bf16_sr", "int8"), ("fp32_split", "int8"), ("fp32_split", "bf16")])
def test_weight_masters_step_the_compute_weights_as_the_bytes_master(kernels, master, moments):
    """``weight_masters``: the kernel reads and writes the bf16 master in the parameters themselves (tensors of
    their own, anywhere in memory) and gives them the bits the record's master segment gets without it, the other
    segments the same bytes; the record's master segment is neither read (NaN there changes nothing) nor written."""
    steps = [3, 3, 4]
    plain = [make_record((256, 200, 96), master, moments, 64, seed=s, expert=s) for s in range(3)]
    held = [make_record((256, 200, 96), master, moments, 64, seed=s, expert=s) for s in range(3)]
    for rec, flat in held:
        at = 0
        for p, size in zip(rec.params, rec.layout.sizes, strict=True):
            p.data = rec.layout.view(flat, "master")[at:at + size].clone()  # bf16: the weights hold the master
            at += size
        rec.layout.view(flat, "master").view(torch.int16).fill_(-1)  # NaN: must be neither read nor written
    fused_step.fused_step_many_(plain, steps=steps, lr=CFG.lr, weight_decay=CFG.weight_decay, cfg=CFG)
    out = fused_step.fused_step_many_(held, steps=steps, lr=CFG.lr, weight_decay=CFG.weight_decay, cfg=CFG,
                                      weight_masters=True)
    assert out == []
    for (rec, a), (held_rec, b) in zip(plain, held, strict=True):
        weights = torch.cat([p.data for p in held_rec.params])
        assert torch.equal(weights.view(torch.int16), rec.layout.view(a, "master").view(torch.int16))
        assert bool((rec.layout.view(b, "master").view(torch.int16) == -1).all())
        for name in rec.layout.views(a):
            if name != "master":
                assert torch.equal(rec.layout.view(a, name), rec.layout.view(b, name)), name


class _Counting:
    """A kernel whose launches' grids are recorded."""

    def __init__(self, kernel, grids: list) -> None:
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("moments", ["int8", "bf16"])
def test_split_master_steps_as_fp32(kernels, moments):
    """``fp32_split`` is the fp32 master stored in two halves: the kernel's step of it is bit for bit its step of
    the fp32 layout (master joined, moments, codes and scales), with and without a clip scale."""
    for scale in (None, 2.5):
        grad_scale = None if scale is None else torch.tensor(scale)
        results = {}
        for master in ("fp32", "fp32_split"):
            rec, flat = make_record((256, 200, 96), master, moments, 64, seed=11)
            fused_step.fused_step_(rec, flat, lr=CFG.lr, weight_decay=CFG.weight_decay, cfg=CFG, step=3,
                                   grad_scale=grad_scale)
            views = rec.layout.views(flat)
            moments_and_scales = [views[k] for k in views if k.startswith(("exp", "m_", "v_"))]
            results[master] = [rec.codec.decode_master(flat)] + moments_and_scales
        for a, b in zip(results["fp32"], results["fp32_split"], strict=True):
            assert torch.equal(a, b)


def test_lerp_of_large_weight(kernels):
    """beta1 < 0.5: torch's lerp takes its other formula, and so does the kernel (moments still exact)."""
    cfg = OptimizerConfig(lr=1e-3, betas=(0.3, 0.95), eps=1e-8, weight_decay=0.0)
    rec, flat = make_record((256, 200), "fp32", "bf16", 64)
    before = flat[:456].clone()  # the fp32 master segment comes first
    ref, exact = reference_step(rec, flat, lr=cfg.lr, cfg=cfg, step=2, grad_scale=None)
    fused_step.fused_step_(rec, flat, lr=cfg.lr, weight_decay=0.0, cfg=cfg, step=2, grad_scale=None)
    got, want = rec.layout.views(flat), rec.layout.views(ref)
    assert torch.equal(got["exp_avg"], want["exp_avg"]) and torch.equal(got["exp_avg_sq"], want["exp_avg_sq"])
    assert_master_close(got["master"], exact, before)


def test_stochastic_rounding_bits_depend_on_record_step_and_element_only(kernels, monkeypatch):
    sizes = (64 * 24, 64 * 24, 64 * 10 + 5)
    rec, start = make_record(sizes, "bf16_sr", "int8", 64)
    runs = {}
    for name, step, tile in (("a", 3, 2048), ("again", 3, 2048), ("small tiles", 3, 256), ("next step", 4, 2048)):
        monkeypatch.setattr(fused_step, "INTERPRETER_TILE", tile)
        flat = start.clone()
        fused_step.fused_step_(rec, flat, lr=CFG.lr, weight_decay=CFG.weight_decay, cfg=CFG, step=step,
                               grad_scale=None)
        runs[name] = flat.view(torch.int32)  # the bytes (bf16 pairs read as fp32 may be NaN)
    assert torch.equal(runs["a"], runs["again"])  # a resumed run draws the same bits
    assert torch.equal(runs["a"], runs["small tiles"])  # counted by the element, not by the program
    assert not torch.equal(runs["a"], runs["next step"])


def test_stochastic_rounding_is_unbiased(kernels):
    """Zero gradients and moments leave only the decay: w' = w - w * 2^-10 exactly (w is bf16), 1/8 to 1/4 of a
    bf16 spacing below w. The stored values are the neighbours of w' (w itself or the bf16 below it), and their mean
    error is zero."""
    sizes = (4096, 4096, 4096)
    layout = StateLayout(sizes, "bf16_sr", "int8", 256)
    codec = StateCodec(layout)
    flat = torch.zeros(-(-layout.nbytes // 4))
    w = (torch.rand(sum(sizes), generator=torch.Generator().manual_seed(7)) + 0.5).bfloat16().float()
    codec.encode_initial(flat, [w[:4096], w[4096:8192], w[8192:]])
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16)) for s in sizes]  # grads None: zero
    rec = SimpleNamespace(layout=layout, codec=codec, params=params, layer=0, expert=0)
    lr, wd = 2.0**-10, 1.0
    fused_step.fused_step_(rec, flat, lr=lr, weight_decay=wd, cfg=CFG, step=1, grad_scale=None)
    exact = w - w * 2.0**-10
    stored = layout.views(flat)["master"].float()
    toward, away = bf16_neighbours(exact)
    assert ((stored == toward) | (stored == away)).all()
    spacing = (away - toward).double()
    error = (stored.double() - exact.double()) / spacing
    assert abs(float(error.mean())) < 4 * 0.5 / len(error) ** 0.5  # 4 standard errors of a fair coin's mean
    assert 0.7 < float((stored == away).double().mean()) < 0.9  # back up to w with probability 3/4 .. 7/8


@pytest.mark.parametrize("master,steps", [("fp32", 2), ("bf16_sr", 1)])
def test_gpu_step_fused_against_unfused(kernels, monkeypatch, master, steps):
    """The engine's GPU step path on the CPU with the fused kernel (availability forced: the interpreter stands in
    for CUDA) against the unfused path, int8 moments with partial blocks.

    fp32 master: the kernel divides the gradients by 1 / coef where torch's CPU loop multiplies by coef, an ulp that
    can move an int8 code by one step now and then, and the next step's update by lr (1e-2) times that relative step
    (measured up to 7e-5; one step: 6e-8; a skipped or doubled step would be ~1e-2). bf16_sr: the two paths draw
    different rounding bits, so after one step each expert weight is one of the same two bf16 neighbours (the dense
    parameters, stepped from the same gradients, are equal); later steps would feed the different weights forward.
    """
    from moetrain.offload import build_optimizer, gpu_step
    from moetrain.offload.config import OffloadConfig

    def run(fused: bool) -> tuple[torch.nn.Module, int]:
        calls = []

        def available(layout, device):
            calls.append(layout)
            return fused and fused_step.supports(layout)

        monkeypatch.setattr(gpu_step, "fused_step_available", available)
        model = tiny_model(num_experts=4, layers=1)
        opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", master=master, moments="int8", quant_block=24,
                                                          gpu_slots=4))
        train(model, opt, batches(steps=steps), total=3)
        opt.close()
        return model, len(calls)

    unfused, _ = run(False)
    fused, calls = run(True)
    assert calls > 0
    experts = set(fused.expert_parameter_names())
    ref = dict(unfused.named_parameters())
    for name, p in fused.named_parameters():
        a, b = p.detach(), ref[name].detach()
        if name not in experts:
            assert (a - b).abs().max() <= (1e-6 if master == "fp32" else 0.0), name
        elif master == "fp32":
            assert (a - b).abs().max() <= 2e-4, name
        else:
            assert ((a - b).abs() <= 2.0**-7 * torch.maximum(a.abs(), b.abs())).all(), name  # one bf16 spacing


@pytest.mark.parametrize("master", ["bf16_sr", "fp32_split"])
def test_master_in_step_trains_the_same_bits(kernels, monkeypatch, master):
    """From the second step on, the fused kernel reads and writes the master in the compute weights, and the hot
    cache sized after step 1 holds no master (compact slots over each other's unused master segments): the
    weights, the exported masters and moments equal, bit for bit, those of the same run with
    ``MOETRAIN_MASTER_IN_STEP=0`` (the engine's GPU path on the CPU, the interpreter standing in for CUDA)."""
    from moetrain.offload import build_optimizer, gpu_step
    from moetrain.offload.config import OffloadConfig

    monkeypatch.setattr(gpu_step, "fused_step_available", lambda layout, device: fused_step.supports(layout))

    def run(in_step: str):
        monkeypatch.setenv("MOETRAIN_MASTER_IN_STEP", in_step)
        model = tiny_model(num_experts=8, layers=1)
        opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", master=master, moments="int8", quant_block=24,
                                                          gpu_slots=3, hot_cache_gb=None, compute_dtype="bf16"))
        train(model, opt, batches(steps=6), total=3, autocast=torch.bfloat16)  # 3 steps; bf16 expert weights
        swapper = opt.engine.swapper
        state = dict(opt.engine.state_io.named_master_tensors()) | dict(opt.engine.state_io.named_optimizer_tensors())
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        shape = (swapper.weight_masters, swapper.hot_capacity, swapper.hot_slot_bytes())
        opt.close()
        return weights, state, shape

    slots_weights, slots_state, (on, hot, slot_bytes) = run("0")
    assert not on and hot > 0
    weights, state, (on, compact_hot, compact_bytes) = run("1")
    assert on and compact_hot == hot and compact_bytes < slot_bytes  # every record fits either way here
    for name, w in weights.items():
        assert torch.equal(w, slots_weights[name]), name
    for name, t in state.items():
        assert torch.equal(t, slots_state[name]), name


def test_a_kernel_that_cannot_compile_falls_back_to_the_unfused_path(monkeypatch):
    """A Triton too old for the kernel fails at its first call, before anything is written: the step warns once and
    takes the unfused path for those records and every later one, with the unfused path's result bit for bit."""
    from moetrain.offload import build_optimizer, gpu_step
    from moetrain.offload.config import OffloadConfig

    def run(broken: bool) -> tuple[torch.nn.Module, list[int]]:
        calls: list[int] = []

        def failing(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("triton: cannot compile")

        monkeypatch.setattr(gpu_step, "fused_step_available", lambda layout, device: broken)
        monkeypatch.setattr(gpu_step, "fused_step_many_", failing)
        torch.manual_seed(0)
        model = tiny_model(num_experts=4, layers=1)
        opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", master="fp32", moments="int8", quant_block=24,
                                                          gpu_slots=4))
        train(model, opt, batches(steps=2), total=3)
        opt.close()
        return model, calls

    reference, _ = run(False)
    with pytest.warns(RuntimeWarning, match="fused expert step failed"):
        fallback, calls = run(True)
    assert calls == [1]  # tried once, then off for the run
    ref = dict(reference.named_parameters())
    for name, p in fallback.named_parameters():
        assert torch.equal(p.detach(), ref[name].detach()), name

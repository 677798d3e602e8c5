"""The cost model behind ``step_on: auto``: the store's own state format decides both sides of the split.

Compressed state moves fewer bytes on the GPU path and costs a codec pass on the host for the CPU path, so
the same measured rates must send more experts to the GPU under bf16_sr + int8 than under fp32 state."""

from __future__ import annotations

import math

import torch
from offload_harness import OPTIM, tiny_model

from moetrain.offload import build_optimizer
from moetrain.offload.adam import CpuAdam
from moetrain.offload.config import OffloadConfig
from moetrain.offload.rates import GPU_PATH_BYTES, Rates, measure_cpu_adam, split
from moetrain.offload.state_format import StateCodec, StateLayout, state_bytes_per_param
from moetrain.offload.weight_masters import paged_from


def _shares(rates: Rates) -> tuple[int, int]:
    gpu, cpu = split([1_000_000] * 64, rates, grad_bytes=2, weight_bytes=2)
    return len(gpu), len(cpu)


def test_compressed_state_sends_more_experts_to_the_gpu_path():
    fp32 = Rates(cpu_adam_gparams=4.0, state_bytes=GPU_PATH_BYTES)
    compressed = Rates(cpu_adam_gparams=4.0, state_bytes=state_bytes_per_param("bf16_sr", "int8", 256))
    gpu_fp32, cpu_fp32 = _shares(fp32)
    gpu_small, cpu_small = _shares(compressed)
    assert cpu_fp32 > 0 and gpu_fp32 > 0  # fp32 state at these rates: both paths get work
    assert gpu_small > gpu_fp32 and cpu_small < cpu_fp32
    # the GPU path's time is its bytes: the split's finishing time never beats the link time of its share
    assert fp32.gpu_path_s(1_000_000) == fp32.link_s(12e6, 12e6)
    assert compressed.gpu_path_s(1_000_000) < fp32.gpu_path_s(1_000_000) / 2.5


def test_a_slow_cpu_codec_leaves_the_cpu_path_idle():
    """With the host's codec far slower than the link (int8 moments on a small CPU), auto picks the GPU."""
    rates = Rates(cpu_adam_gparams=0.01, state_bytes=state_bytes_per_param("bf16_sr", "int8", 256))
    assert _shares(rates) == (64, 0)


def test_cpu_path_rate_is_timed_through_the_store_format():
    """measure_cpu_adam with a record's codec runs decode -> CPU Adam -> encode on valid records of that format."""
    layout = StateLayout(sizes=(4096, 4096, 8192), master="bf16_sr", moments="int8", block=256)
    codec = StateCodec(layout)
    rate = measure_cpu_adam(CpuAdam(OPTIM), numel=1 << 16, codec=codec)
    assert math.isfinite(rate) and rate > 0


def test_the_engine_weighs_its_own_state_format():
    torch.manual_seed(0)
    opt = build_optimizer(tiny_model(), OPTIM, OffloadConfig(tier="cpu", step_on="auto", master="bf16_sr",
                                                              moments="int8", quant_block=16))
    record = next(iter(opt.store))
    assert opt.rates.measured
    # not fp32's 12, and not the bf16 master either: the compute weights hold it (moetrain.offload.weight_masters)
    assert opt.rates.state_bytes == (record.layout.nbytes - 4 * paged_from(record)) / record.numel < 3
    opt.close()
    plain = build_optimizer(tiny_model(), OPTIM, OffloadConfig(tier="cpu", step_on="auto"))
    assert plain.rates.state_bytes == 12
    plain.close()

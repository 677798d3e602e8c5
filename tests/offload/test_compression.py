"""Compressed expert state through the whole engine.

The reference is ``torch.optim.AdamW`` whose expert state is passed through the same number format
after every step (the formats themselves are checked against float64 in test_quantize.py): the engine
must equal it, so paging, chunking, the CPU path and NVMe add nothing to the rounding. A checkpoint
round trip of compressed state is exact.
"""

from __future__ import annotations

import pytest
import torch
from offload_harness import OPTIM, batches, clone, max_diff, tiny_model, train

from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadConfig
from moetrain.offload.state_format import StateCodec, StateLayout, rounding_seed
from moetrain.optim import DenseAdamW


class RoundedAdamW(DenseAdamW):
    """torch AdamW whose routed experts' (master, exp_avg, exp_avg_sq) are stored in ``master``/``moments``
    format after each step, the per-expert records laid out as the store lays them out. The experts compute with
    what the format's compute weights are (under ``fp32_split`` the master's bf16 half: the exact master is kept
    aside and AdamW steps it)."""

    def __init__(self, model, cfg, master: str, moments: str, block: int) -> None:
        super().__init__(model, cfg)
        self.experts = [(b.layer_idx, e, [x.gate_proj.weight, x.up_proj.weight, x.down_proj.weight])
                        for b in model.moe_blocks() for e, x in enumerate(b.experts)]
        self.fmt = (master, moments, block)
        self.masters: dict[int, torch.Tensor] = {}  # fp32_split: parameter id -> its exact master
        self.compute: dict[int, torch.Tensor] = {}  # and its compute weights
        with torch.no_grad():  # the store keeps the initial master in its format too
            for _, _, ps in self.experts:
                codec = StateCodec(StateLayout(tuple(p.numel() for p in ps), *self.fmt))
                flat = torch.zeros(-(-codec.layout.nbytes // 4), device=ps[0].device)
                codec.encode_master(flat, torch.cat([p.reshape(-1) for p in ps]))
                self._set(ps, codec, flat, codec.decode_master(flat))

    def _set(self, ps, codec: StateCodec, flat: torch.Tensor, w: torch.Tensor) -> None:
        """The parameters take the compute weights of master ``w`` (decoded from ``flat``), the master kept aside."""
        compute, at = codec.compute_weights(flat, w).float(), 0
        for p in ps:
            if self.fmt[0] == "fp32_split":
                self.masters[id(p)] = w[at:at + p.numel()].view_as(p).clone()
                self.compute[id(p)] = compute[at:at + p.numel()].view_as(p).clone()
            p.copy_(compute[at:at + p.numel()].view_as(p))
            at += p.numel()

    @torch.no_grad()
    def step(self, lr: float) -> None:
        before = {id(p): int(self.opt.state[p]["step"]) if p in self.opt.state else 0
                  for _, _, ps in self.experts for p in ps}
        for _, _, ps in self.experts:  # AdamW steps the exact master, not the compute weights
            for p in ps:
                if id(p) in self.masters:
                    p.copy_(self.masters[id(p)])
        super().step(lr)
        for layer, expert, ps in self.experts:
            states = [self.opt.state.get(p) for p in ps]
            if any(s is None for s in states) or int(states[0]["step"]) == before[id(ps[0])]:
                for p in ps:  # not stepped this time: untouched, as in the engine (compute weights back)
                    if id(p) in self.masters:
                        p.copy_(self.compute[id(p)])
                continue
            codec = StateCodec(StateLayout(tuple(p.numel() for p in ps), *self.fmt))
            flat = torch.zeros(-(-codec.layout.nbytes // 4), device=ps[0].device)  # as the engine's slots
            w = torch.cat([p.reshape(-1) for p in ps])
            m = torch.cat([s["exp_avg"].reshape(-1) for s in states])
            v = torch.cat([s["exp_avg_sq"].reshape(-1) for s in states])
            step = int(states[0]["step"])
            generator = codec.record_generator(w.device, rounding_seed(layer, expert, step))
            codec.encode(flat, master=w, exp_avg=m, exp_avg_sq=v, generator=generator)
            w2, m2, v2 = codec.decode(flat)
            self._set(ps, codec, flat, w2)
            at = 0
            for p, s in zip(ps, states, strict=True):
                n = p.numel()
                s["exp_avg"].copy_(m2[at:at + n].view_as(p))
                s["exp_avg_sq"].copy_(v2[at:at + n].view_as(p))
                at += n


FORMATS = [("fp32", "bf16"), ("fp32", "int8"), ("bf16_sr", "fp32"), ("bf16_kahan", "int8"), ("fp32_split", "int8")]


@pytest.fixture(scope="module")
def base():
    return tiny_model(), batches(steps=12)


@pytest.mark.parametrize("master,moments", FORMATS)
def test_engine_equals_adamw_with_rounded_state(base, master, moments):
    model0, data = base
    ref = clone(model0)
    train(ref, RoundedAdamW(ref, OPTIM, master, moments, 16), data, total=12)
    plain = clone(model0)
    train(plain, DenseAdamW(plain, OPTIM), data, total=12)
    model = clone(model0)
    opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", master=master, moments=moments, quant_block=16,
                                                      gpu_slots=3))
    train(model, opt, data, total=12)
    opt.finalize()
    opt.close()
    assert max_diff(model, ref) <= 1e-6
    assert max_diff(model, plain) > 1e-7, "the format must change something for the comparison to mean anything"


def test_nvme_and_cpu_step_paths_match_the_same_reference(base, tmp_path):
    model0, data = base
    ref = clone(model0)
    train(ref, RoundedAdamW(ref, OPTIM, "bf16_sr", "int8", 16), data, total=12)
    nvme = clone(model0)
    opt = build_optimizer(nvme, OPTIM, OffloadConfig(tier="nvme", nvme_path=str(tmp_path), master="bf16_sr",
                                                     moments="int8", quant_block=16, gpu_slots=3))
    train(nvme, opt, data, total=12)
    opt.finalize()
    opt.close()
    assert max_diff(nvme, ref) <= 1e-6


def test_compressed_state_round_trips_through_named_tensors(base):
    model0, data = base
    cfg = OffloadConfig(tier="cpu", master="bf16_kahan", moments="int8", quant_block=16)
    a = clone(model0)
    opt_a = build_optimizer(a, OPTIM, cfg)
    train(a, opt_a, data[:8], total=12)
    masters = dict(opt_a.named_master_tensors())
    moments = dict(opt_a.named_optimizer_tensors())
    assert any(k.endswith(".absmax") for k in moments) and any(t.dtype == torch.uint8 for t in moments.values())
    b = clone(model0)
    opt_b = build_optimizer(b, OPTIM, cfg)
    opt_b.load_state_dict(opt_a.state_dict(include_expert_tensors=False) | {"expert_tensors": masters | moments})
    for k, t in opt_b.named_optimizer_tensors():
        assert torch.equal(t, moments[k]), k
    for k, t in opt_b.named_master_tensors():
        assert torch.equal(t, masters[k]), k
    opt_a.close()
    opt_b.close()


def test_int8_checkpoint_refuses_fp32_moments_config(base):
    model0, data = base
    a = clone(model0)
    opt_a = build_optimizer(a, OPTIM, OffloadConfig(tier="cpu", moments="int8", quant_block=16))
    train(a, opt_a, data[:4], total=12)
    named = list(opt_a.named_optimizer_tensors())
    opt_b = build_optimizer(clone(model0), OPTIM, OffloadConfig(tier="cpu"))
    with pytest.raises(ValueError, match="moments=int8"):
        opt_b.load_expert_tensors(named)
    opt_a.close()
    opt_b.close()

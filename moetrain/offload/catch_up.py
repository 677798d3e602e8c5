"""``idle_experts: dense``: replay, exactly, the zero-gradient AdamW steps an idle expert missed.

A dense AdamW steps every expert every step; an expert without tokens then still sees its moments decay and
its weights decay. Each record keeps ``synced_to`` (the optimizer step its state is current at); when it is
next routed (the engine's routing sink sees that before the experts run), stepped, or exported, the missed
steps are replayed here with the same kernel and each step's own learning rate.
"""

from __future__ import annotations

import torch

from moetrain.offload.adam import adamw
from moetrain.offload.gpu_step import GpuStep
from moetrain.offload.store import ExpertRecord


class CatchUp:
    """Replays missed zero-gradient steps through the GPU step path's slots and encoder.

    Args:
        gpu: the GPU step path (its chunks, slots and ``store_stepped``).
        enabled: ``idle_experts == "dense"``; otherwise :meth:`run` does nothing (torch AdamW's ``grad=None``).
    """

    def __init__(self, gpu: GpuStep, *, enabled: bool) -> None:
        self.gpu, self.enabled = gpu, enabled

    @torch.no_grad()
    def run(self, recs: list[ExpertRecord], step_index: int, lr_history: list[float]) -> None:
        """Bring ``recs`` to optimizer step ``step_index`` (``lr_history[s]``: step s's learning rate)."""
        if not self.enabled:
            return
        late = [r for r in recs if r.synced_to < step_index]
        swapper, cfg = self.gpu.swapper, self.gpu.cfg
        for chunk in self.gpu.chunks(late):
            flats = swapper.acquire(chunk)
            for s in range(min(r.synced_to for r in chunk), step_index):
                ps, ms, vs, steps = [], [], [], []
                decoded = []
                for rec, flat in zip(chunk, flats, strict=True):
                    if rec.synced_to > s:
                        continue
                    master, exp_avg, exp_avg_sq = rec.parts(flat)
                    decoded.append((rec, flat, master, exp_avg, exp_avg_sq))
                    ps += rec.split(master)
                    ms += rec.split(exp_avg)
                    vs += rec.split(exp_avg_sq)
                    steps += [rec.step + 1] * len(rec.params)
                    rec.step += 1
                    rec.synced_to = s + 1
                gs = [torch.zeros_like(p) for p in ps]
                adamw(ps, gs, ms, vs, steps=steps, lr=lr_history[s], weight_decay=cfg.weight_decay, cfg=cfg)
                for rec, flat, master, exp_avg, exp_avg_sq in decoded:
                    self.gpu.store_stepped(rec, flat, master=master, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                                           step=rec.step)
            swapper.release(chunk)

"""The Lightning strategy of a multi-rank moetrain run: DDP's processes, launcher and process group
(``trainer.devices``, ``trainer.num_nodes``, torchrun and SLURM environments as Lightning detects them),
without wrapping the module in ``DistributedDataParallel``: the gradient reductions are the optimizer's
(:class:`~moetrain.parallel.optimizer.ParallelOptimizer`), which sums dense gradients, reduces expert
gradients to their state's owner and exchanges tokens between expert-parallel ranks. DDP's wrapper would
all-reduce every expert gradient to every rank and does not know expert-parallel parameters.
"""

from __future__ import annotations

from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DataLoader

from moetrain.parallel.sampler import RankShardSampler

STRATEGY_NAME = "moetrain_parallel"


class MoEParallelStrategy(DDPStrategy):
    """``DDPStrategy`` minus the DDP wrapper (gloo on the CPU, NCCL on GPUs, as DDP chooses)."""

    strategy_name = STRATEGY_NAME

    def configure_ddp(self) -> None:
        """Keep the LightningModule unwrapped: ``ParallelOptimizer`` reduces the gradients itself."""

    def process_dataloader(self, dataloader: object) -> object:
        """Rank r trains on rows r, r + world, ... of the data module's own row order, resumably.

        Lightning wraps a custom sampler in ``DistributedSamplerWrapper`` with ``shuffle=True`` for training,
        which permutes the rows again and cannot resume mid-epoch; moetrain's sampler already orders the
        rows (seeded, resumable), so :class:`~moetrain.parallel.sampler.RankShardSampler` only deals them out.
        """
        sampler = getattr(dataloader, "sampler", None)
        if isinstance(dataloader, DataLoader) and isinstance(sampler, DistributedSamplerWrapper):
            inner = sampler.dataset._sampler
            if hasattr(inner, "resume_at"):
                shard = RankShardSampler(inner, self.global_rank, self.world_size)
                return _update_dataloader(dataloader, shard, mode=RunningStage.TRAINING)
            sampler.shuffle = False  # another custom sampler: at least keep its order
        return dataloader


def register() -> str:
    """Make ``trainer.strategy: moetrain_parallel`` known to Lightning (idempotent); returns the name."""
    if STRATEGY_NAME not in StrategyRegistry:
        StrategyRegistry.register(STRATEGY_NAME, MoEParallelStrategy,
                                  description="DDP processes without the DDP wrapper; moetrain.parallel reduces")
    return STRATEGY_NAME

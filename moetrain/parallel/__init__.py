"""Several ranks: data parallelism with partitioned expert optimizer state, and expert parallelism.

Modules, one job each:

* ``config``: the ``parallel:`` recipe section (:class:`ParallelConfig`).
* ``layout``: which rank holds which experts' compute weights and which owns their optimizer state;
  the process groups.
* ``all_to_all``: the differentiable, fixed-sequence token all-to-all.
* ``expert_parallel``: routed experts split over an expert-parallel group.
* ``loss``: each rank's share of the global batch's loss.
* ``optimizer``: :class:`ParallelOptimizer`, reductions, the global norm, owner steps and weight broadcasts.
* ``checkpoint``: every rank writes its share; a resharded load is a name-filtered read.
* ``runtime``: :class:`ParallelRuntime`, what the training module calls.
* ``strategy``: the Lightning strategy (processes and process group, no DDP wrapper).

Collective backends: NCCL on GPUs, gloo on the CPU (``all_to_all_single`` with uneven and empty splits,
``reduce``, ``broadcast`` and ``all_reduce`` all run on gloo in torch 2.13).
"""

from moetrain.parallel.config import ParallelConfig

__all__ = ["ParallelConfig"]

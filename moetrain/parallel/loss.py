"""Each rank's share of the global batch's loss, so that gradients summed over ranks are the global ones."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from moetrain.models.decoder import IGNORE_INDEX


def target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that carry a target after the shift inside the model: labels[:, 1:] != -100, counted."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def loss_for_backward(out: Any, labels: torch.Tensor, group: Optional[Any] = None) -> torch.Tensor:
    """``ce * n_local / n_global + aux / world``: summed over the ranks of ``group``, the loss of the global batch
    (the sum of :func:`loss_shares`)."""
    ce_share, aux_share = loss_shares(out, labels, group)
    return ce_share + aux_share


def loss_shares(out: Any, labels: torch.Tensor, group: Optional[Any] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ce * n_local / n_global, aux / world)``: this rank's shares of the global batch's cross-entropy and
    auxiliary loss; each summed over the ranks of ``group`` is the global batch's.

    The cross-entropy is the mean over the global batch's target tokens (a rank with more targets weighs
    more). The auxiliary loss is averaged over ranks: exact for per-sequence losses (``aux_loss: seq``)
    when the ranks hold equally many sequences; for batch-level losses (``switch``, ``token``) it is the
    mean of the ranks' losses, as other data-parallel MoE trainers compute it.

    Args:
        out: the model's output (``ce_loss`` and ``aux_loss`` scalars of this rank's micro-batch).
        labels: (B, L) this rank's labels.
    """
    world = dist.get_world_size(group)
    n_local = target_tokens(labels).to(out.ce_loss.device)
    n_global = n_local.clone()
    dist.all_reduce(n_global, group=group)
    return out.ce_loss * n_local / n_global.clamp_min(1), out.aux_loss / world

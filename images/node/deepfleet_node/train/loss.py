"""Summed token losses and their weighting: every optimizer step's gradient is the token
mean over the whole global batch, however many samples each rank took."""

from __future__ import annotations


def valid_targets(labels) -> int:
    """How many tokens a causal-LM loss counts in a batch: the labels after HF's one-token
    shift (position t predicts label t+1) that are not IGNORE_INDEX."""
    from ..data import IGNORE_INDEX

    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(logits, labels):
    """Summed next-token cross-entropy over the valid targets.

    Exactly HF's ForCausalLMLoss with reduction "sum" (float logits, labels padded by one
    and shifted), i.e. the model's own `.loss` times valid_targets(labels), except that
    a batch with no valid target gives 0 rather than HF's 0/0 = nan.
    """
    import torch.nn.functional as F

    from ..data import IGNORE_INDEX

    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].contiguous()
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        shifted.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def weighted_loss(loss_sum, world: int, ga: int, step_targets: int):
    """What one micro-step hands to engine.backward.

    DeepSpeed divides the loss by ga and averages gradients over the ranks, so the
    gradient of the optimizer step is sum over ranks and micro-steps of loss_sum divided by
    step_targets, the valid targets of the whole global step: the token mean over the
    global batch, however many samples each rank took.
    """
    return loss_sum * (world * ga / max(step_targets, 1))


def all_reduce_sum(value: int, device) -> int:
    """value summed over every rank (the global step's valid targets)."""
    import torch
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())

"""Cross entropy over vocabulary-sharded logits (Megatron-LM, Shoeybi et al. 2019, section 3):
three all-reduces of [s, b] scalars (max, target logit, sum of exps) instead of gathering [s, b, V].
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_lite.comm import Group, all_reduce, group_rank, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group):
        # logits [..., V/tp] (this rank's vocabulary slice), target [...] global token ids
        tp = group_size(group)
        logits = logits.float() if logits.dtype != torch.float32 else logits
        logits_max = logits.amax(dim=-1)
        if tp > 1:
            all_reduce(logits_max, group, op=dist.ReduceOp.MAX)
        # in place: the logits are a fresh matmul output that nothing else saved
        logits = logits.sub_(logits_max.unsqueeze(-1))

        per_rank = logits.shape[-1]
        start = group_rank(group) * per_rank
        outside = (target < start) | (target >= start + per_rank)
        local = (target - start).masked_fill_(outside, 0)
        predicted = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1)
        predicted = predicted.masked_fill_(outside, 0.0)

        exp = logits.exp_()
        sum_exp = exp.sum(dim=-1)
        if tp > 1:
            both = torch.stack([predicted, sum_exp])
            all_reduce(both, group)
            predicted, sum_exp = both[0], both[1]
        loss = torch.log(sum_exp) - predicted

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, outside = ctx.saved_tensors
        # d loss / d logits = softmax - one_hot(target), reusing the saved buffer in place
        grad = softmax
        hit = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local.unsqueeze(-1), -hit)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group: Group
) -> torch.Tensor:
    """Per-token loss (same shape as `target`, fp32, not reduced) from tp-sharded logits.

    Modifies `logits` in place (when fp32) to save memory, as Megatron does: don't reuse them.
    """
    return _VocabParallelCrossEntropy.apply(logits, target, group)


def token_log_probs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group: Group = None,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """log p(target) per token (fp32, the shape of `targets`), differentiable: the one token
    log-probability of training (its loss is the negation), the DPO reference and evaluation.

    `logits` [..., V], or this rank's vocabulary slice [..., V/tp] with `tp_group`: then the
    softmax reduces over the group (three all-reduces of per-token scalars), and so it does with
    `inplace`, which reuses fp32 logits' memory (training's fresh matmul output, which nothing
    else reads). Whole logits not lent: PyTorch's fused cross entropy, the logits left as they
    were (the same values within 1e-6; bit for bit what evaluation and the DPO reference gave).
    """
    if inplace or group_size(tp_group) > 1:
        if not inplace and logits.dtype == torch.float32:
            logits = logits.clone()
        return -_VocabParallelCrossEntropy.apply(logits, targets, tp_group)
    return -F.cross_entropy(logits.float().movedim(-1, 1), targets, reduction="none")

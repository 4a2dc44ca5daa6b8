"""Direct preference optimization (Rafailov et al. 2023, eq. 7) as a forward step.

A microbatch of b pairs runs as 2b rows (chosen and rejected interleaved) through the unchanged
model; the last stage turns the per-token losses into sequence log-probabilities of the responses
(log pi(y|x) = -sum of the masked per-token cross entropy) and, against the stored reference
log-probabilities, the loss

    -log sigmoid(beta * ((log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))))

averaged over the pairs. Reported alongside (and logged like the loss): the reward margin
beta * (that difference), the chosen and rejected rewards, and the accuracy (margin > 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_METRICS = ("dpo reward margin", "dpo accuracy", "dpo chosen reward", "dpo rejected reward")


def sequence_logps(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Log-probability [r] of each row's masked tokens from the per-token cross entropy [r, s]."""
    return -(per_token_loss.double() * loss_mask.double()).sum(-1)


def dpo_loss(
    logps: torch.Tensor, reference_logps: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean DPO loss over pairs, and its metrics; logps and reference_logps are [b, 2]."""
    rewards = beta * (logps - reference_logps)  # [b, 2]: implicit rewards of chosen, rejected
    margin = rewards[:, 0] - rewards[:, 1]
    loss = -F.logsigmoid(margin).mean()
    metrics = {
        "dpo reward margin": margin.mean(),
        "dpo accuracy": (margin > 0).double().mean(),
        "dpo chosen reward": rewards[:, 0].mean(),
        "dpo rejected reward": rewards[:, 1].mean(),
    }
    return loss.float(), {k: v.detach().float() for k, v in metrics.items()}


def flatten_pairs(batch: dict) -> dict:
    """[b, 2, ...] pair tensors -> [2b, ...] rows (chosen, rejected, chosen, ...)."""
    return {k: v.flatten(0, 1) if k != "reference_logps" else v for k, v in batch.items()}


def dpo_loss_func(batch: dict, beta: float, poison_loss: bool = False):
    """The loss function of one DPO microbatch (what forward_step returns beside the output)."""

    def loss_func(per_token_loss: torch.Tensor):
        logps = sequence_logps(per_token_loss, batch["loss_mask"]).view(-1, 2)
        loss, metrics = dpo_loss(logps, batch["reference_logps"].to(logps.device), beta)
        if poison_loss:
            loss = loss * float("nan")
        return loss, {"lm loss": loss.detach(), **metrics}

    return loss_func

"""The optimizer: fp32 master weights, loss scaling, global-norm clipping, optional ZeRO-1 sharding.

One class serves both layouts. It steps a list of *pieces*: flat slices of model parameters, each with
an fp32 master copy (the parameter itself when the model is fp32) and the matching slice of its
`main_grad`. Replicated, a piece is a whole parameter. With the distributed optimizer (ZeRO-1,
Rajbhandari et al. 2020, stage P_os) a piece is the part of a parameter inside this dp rank's shard of a
DDP bucket, so master weights and Adam moments exist for 1/dp of the model on each rank, and the
updated parameters are all-gathered after the step.

A step, as Megatron's (`step() -> (success, grad_norm)`; `num_zeros_in_grad` after it when logged):
  copy main grads to the masters -> unscale, agree on found-inf across all ranks, update the scaler and
  skip on inf/nan -> global norm and clip -> inner step (AdamW or SGD) -> masters to the model ->
  all-gather (ZeRO-1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from megatron_lite import comm
from megatron_lite.distributed.ddp import DistributedDataParallel
from megatron_lite.optim import clip_grads
from megatron_lite.optim.grad_scaler import ConstantGradScaler, build_grad_scaler
from megatron_lite.optim.param_state import PerParamState
from megatron_lite.tensor_parallel.utils import tag_of

if TYPE_CHECKING:
    from megatron_lite.config import Config, OptimConfig
    from megatron_lite.parallel_state import ParallelState


@dataclass(eq=False)
class Piece:
    """A flat slice [start, end) of one parameter that this rank updates."""

    name: str
    param: torch.nn.Parameter
    start: int
    end: int
    model: torch.Tensor  # view of the parameter's data, flat
    grad: torch.Tensor  # view of the parameter's main_grad, flat
    master: torch.Tensor  # fp32; `model` itself when the model is fp32
    counted: bool  # counts toward the global gradient norm on this rank
    expert: bool = False  # an MoE expert's: its norm sums over ep (and edp) instead of dp
    bucket: object | None = None  # the DDP bucket holding it (distributed optimizer)
    buffer: object | None = None


def _named_params(chunks: list[DistributedDataParallel]) -> dict[int, str]:
    names: dict[int, str] = {}
    seen: set[str] = set()
    for c in chunks:
        for name, p in c.module.named_parameters():
            if name in seen:
                raise ValueError(f"parameter name {name!r} appears in two model chunks")
            seen.add(name)
            names[id(p)] = name
    return names


def _inner_optimizer(optim_cfg: OptimConfig, groups: list[dict]) -> torch.optim.Optimizer:
    o = optim_cfg
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.sgd_momentum)
    on_cuda = any(t.is_cuda for g in groups for t in g["params"])
    if on_cuda:
        try:  # NVIDIA apex, when the image ships it (never required)
            from apex.optimizers import FusedAdam

            return FusedAdam(
                groups,
                lr=o.lr,
                betas=(o.adam_beta1, o.adam_beta2),
                eps=o.adam_eps,
                adam_w_mode=True,
            )
        except ImportError:
            pass
    # CUDA without apex: torch's fused kernel (one launch for all tensors); CPU: the foreach default
    fused = {"fused": True} if on_cuda else {}
    return torch.optim.AdamW(
        groups, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, **fused
    )


class MegatronOptimizer(PerParamState):
    """Build with `build_optimizer(cfg, model_chunks, ps)`; chunks are DDP-wrapped."""

    def __init__(
        self,
        optim_cfg: OptimConfig,
        chunks: list[DistributedDataParallel],
        ps: ParallelState,
        *,
        distributed: bool = False,
        log_num_zeros_in_grad: bool = False,
        experts: bool = False,
    ) -> None:
        """`experts`: the model has MoE layers (on any stage): every rank then sums expert norms
        over ep as well."""
        for c in chunks:
            if not isinstance(c, DistributedDataParallel):
                raise TypeError(
                    f"build_optimizer needs DDP-wrapped model chunks, got {type(c).__name__}: "
                    "wrap them with megatron_lite.distributed.wrap_model_chunks(cfg, chunks, ps)"
                )
            if c.use_distributed_optimizer != distributed:
                raise ValueError(
                    f"use_distributed_optimizer is {distributed} for the optimizer but "
                    f"{c.use_distributed_optimizer} for DDP: build both from the same config"
                )
        self.cfg, self.chunks, self.ps = optim_cfg, chunks, ps
        self.distributed, self.log_num_zeros = distributed, log_num_zeros_in_grad
        self.names = _named_params(chunks)  # id(param) -> global name
        self.pieces = self._build_pieces()
        # a rank whose ZeRO-1 shard holds no parameter still joins every collective, on this device
        self.device = next(p for c in chunks for p in c.parameters()).device
        self.mixed_precision = any(pc.master is not pc.model for pc in self.pieces)
        decay = [pc.master for pc in self.pieces if not _no_weight_decay(pc)]
        no_decay = [pc.master for pc in self.pieces if _no_weight_decay(pc)]
        # wd_mult (Megatron's key) marks the group that takes weight decay; the LR scheduler's
        # weight-decay schedule and checkpoint loading go by it, not by the groups' order (a ZeRO-1
        # shard may hold only one kind of parameter)
        groups = [
            {"params": decay, "weight_decay": optim_cfg.weight_decay, "wd_mult": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0},  # biases and norm weights
        ]
        groups = [g for g in groups if g["params"]]
        if not groups:  # a ZeRO-1 shard of pure padding: keep a param group for the LR schedule
            empty = [torch.zeros(0, device=self.device)]
            groups = [{"params": empty, "weight_decay": 0.0, "wd_mult": 0.0}]
        self.inner = _inner_optimizer(optim_cfg, groups)
        self.grad_scaler: ConstantGradScaler | None = build_grad_scaler(optim_cfg)
        self.num_steps = 0  # successful (not skipped) steps
        self.num_skipped = 0
        self.num_zeros_in_grad: int | None = None  # set by step() under --log-num-zeros-in-grad
        # norm sums: over one model replica; plus over dp when gradients are split over dp.
        # Experts: a replica holds 1/ep of them, so their squares also sum over ep (edp if split).
        self._norm_groups = [ps.mp_group] + ([ps.dp_group] if distributed else [])
        self._expert_norm_groups = [ps.mp_group, ps.ep_group] + (
            [ps.edp_group] if distributed else []
        )
        self._experts = experts

    def _build_pieces(self) -> list[Piece]:
        pieces = []
        for chunk in self.chunks:
            for buf in chunk.buffers:
                if self.distributed:
                    spans = buf.param_shard_ranges(buf.rank)
                else:
                    spans = [(p, 0, p.numel(), None) for p in buf.params]
                for p, start, end, bucket in spans:
                    model = p.data.view(-1)[start:end]
                    fp32 = p.dtype == torch.float32
                    pieces.append(
                        Piece(
                            name=self.names[id(p)],
                            param=p,
                            start=start,
                            end=end,
                            model=model,
                            grad=p.main_grad.view(-1)[start:end],
                            master=model if fp32 else model.detach().float().clone(),
                            counted=clip_grads.counts_toward_norm(p, self.ps),
                            expert=tag_of(p, "expert_parallel"),
                            bucket=bucket,
                            buffer=buf,
                        )
                    )
        return pieces

    # --- what the training loop calls ----------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def get_loss_scale(self) -> float:
        return 1.0 if self.grad_scaler is None else self.grad_scaler.scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Multiply the loss by the current loss scale before backward (fp16)."""
        return loss if self.grad_scaler is None else loss * self.grad_scaler.scale

    @torch.no_grad()
    def step(self) -> tuple[bool, float | None]:
        """-> (stepped, grad norm); a step with inf/nan grads is skipped (norm None).

        Reads the reduced `main_grad`s and writes this rank's parameters (its shard under ZeRO-1);
        the DDP side of the step (zeroing, reduction, parameter all-gather) is `train_step`'s.
        """
        self.num_zeros_in_grad = None
        grads = self._masters_take_grads()
        if self.grad_scaler is not None:
            found_inf = self._unscale_and_check(grads)
            self.grad_scaler.update(found_inf)
            if found_inf:
                self.num_skipped += 1
                self._drop_master_grads()
                return False, None
        grad_norm = self._global_norm(grads)
        if self.cfg.clip_grad > 0:
            clip_grads.clip_grads(grads, grad_norm, self.cfg.clip_grad)
        if self.log_num_zeros:
            self.num_zeros_in_grad = sum(
                clip_grads.count_zeros(ts, groups, self.device)
                for ts, groups in self._counted_parts(grads)
            )
        self.inner.step()
        self.num_steps += 1
        self._drop_master_grads()
        if self.mixed_precision:
            for pc in self.pieces:
                if pc.master is not pc.model:
                    pc.model.copy_(pc.master)
        return True, grad_norm

    def params_norm(self) -> float:
        """L2 norm of every parameter, each counted once like the gradient norm (fp32 masters;
        collective over the model-parallel, and under ZeRO-1 the dp, group)."""
        return self._global_norm([pc.master for pc in self.pieces])

    def _counted_parts(self, tensors: list[torch.Tensor]) -> list[tuple[list, list]]:
        """(dense tensors this rank counts, their groups), (expert ones, theirs): one per piece."""
        pairs = [(pc, t) for pc, t in zip(self.pieces, tensors) if pc.counted]
        dense = [([t for pc, t in pairs if not pc.expert], self._norm_groups)]
        if not self._experts:
            return dense
        return dense + [([t for pc, t in pairs if pc.expert], self._expert_norm_groups)]

    def _global_norm(self, tensors: list[torch.Tensor]) -> float:
        """L2 norm over every rank, each parameter (dense or expert) counted once."""
        return clip_grads.global_norm_of_parts(self._counted_parts(tensors), self.device)

    # --- step internals --------------------------------------------------------------------
    def _masters_take_grads(self) -> list[torch.Tensor]:
        grads = []
        for pc in self.pieces:
            g = pc.grad if pc.grad.dtype == torch.float32 else pc.grad.float()
            pc.master.grad = g  # fp32 main grads are used in place, no copy
            grads.append(g)
        return grads

    def _drop_master_grads(self) -> None:
        for pc in self.pieces:
            pc.master.grad = None

    def _unscale_and_check(self, grads: list[torch.Tensor]) -> bool:
        """Divide by the loss scale; True if any rank anywhere saw inf/nan."""
        device = self.device
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        if grads:
            inv = torch.full((1,), self.grad_scaler.inv_scale, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv)
        # every rank must skip together: dp shards differ, and so do tp/pp ranks' grads
        comm.all_reduce_max_over(found_inf, self.ps.mp_group, self.ps.dp_group)
        return bool(found_inf.item() > 0)

    def reload_model_params(self) -> None:
        """Refresh fp32 masters from the model (after loading model weights without optimizer)."""
        for pc in self.pieces:
            if pc.master is not pc.model:
                pc.master.copy_(pc.model)

    # --- scalar state (per-parameter tensors: see PerParamState) ---------------------------------
    def state_dict(self) -> dict:
        """Step counts, loss scaler and hyper-parameters: plain Python types only."""
        groups = [
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
            for g in self.inner.param_groups
        ]
        return {
            "optimizer": self.cfg.optimizer,
            "num_steps": self.num_steps,
            "num_skipped": self.num_skipped,
            "param_groups": [{k: v for k, v in g.items() if _plain(v)} for g in groups],
            "grad_scaler": None if self.grad_scaler is None else self.grad_scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.num_steps = int(state["num_steps"])
        self.num_skipped = int(state.get("num_skipped", 0))
        restore_param_groups(self.inner.param_groups, state["param_groups"])
        if self.grad_scaler is not None and state.get("grad_scaler") is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self._set_step_counts()


def restore_param_groups(groups: list[dict], saved: list[dict]) -> None:
    """Saved hyper-parameters into `groups`, matched by `wd_mult`: the saving layout may have had
    other groups (a ZeRO-1 shard with only biases and norms has just the no-decay one)."""
    by_kind = {g.get("wd_mult"): g for g in saved}
    for g in groups:
        for k, v in by_kind.get(g["wd_mult"], {}).items():
            g[k] = tuple(v) if isinstance(g.get(k), tuple) else v


def _no_weight_decay(pc: Piece) -> bool:
    return pc.param.dim() < 2 or pc.name.endswith(".bias")


def _plain(v) -> bool:
    if isinstance(v, list):
        return all(_plain(x) for x in v)
    return v is None or isinstance(v, (bool, int, float, str))


def build_optimizer(
    cfg: Config, model_chunks: list[DistributedDataParallel], ps: ParallelState
) -> MegatronOptimizer:
    """The optimizer of `cfg.optim` over the DDP-wrapped `model_chunks`."""
    return MegatronOptimizer(
        cfg.optim,
        model_chunks,
        ps,
        distributed=cfg.parallel.use_distributed_optimizer,
        log_num_zeros_in_grad=cfg.optim.log_num_zeros_in_grad,
        experts=cfg.moe.enabled,
    )

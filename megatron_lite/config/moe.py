"""Mixture of experts (--num-experts, --moe-*, --expert-model-parallel-size), as Megatron-LM spells
and means them. The router always runs in fp32."""

from __future__ import annotations

import ast
from dataclasses import dataclass

from megatron_lite.config.flags import ConfigError, flag, positive, require


def _list_expr(node: ast.AST) -> list[int] | int:
    """A python-list expression of 0/1 literals with + and * (Megatron's '([1]*3+[0])*2')."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.List):
        return [_int(_list_expr(e)) for e in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _list_expr(node.left), _list_expr(node.right)
        return left + right if isinstance(node.op, ast.Add) else left * right
    raise ValueError(ast.dump(node))


def _int(v) -> int:
    if not isinstance(v, int):
        raise ValueError(v)
    return v


def parse_layer_freq(value: int | str | list[int]) -> int | list[int]:
    """--moe-layer-freq: an int N (every N-th layer is MoE) or a list of 0/1 per layer."""
    if isinstance(value, (int, list)):
        return value
    try:
        out = _list_expr(ast.parse(value.strip(), mode="eval").body)
    except (SyntaxError, ValueError, TypeError):
        out = None
    if not isinstance(out, (int, list)):
        raise ConfigError(
            f"--moe-layer-freq must be an integer or a python list such as '[1,0,1,0]' or "
            f"'([1]*3+[0])*2', got {value!r}"
        )
    return out


def moe_layer_pattern(freq: int | list[int], num_layers: int) -> list[bool]:
    """Which of the `num_layers` layers have an MoE MLP (True) instead of the dense one."""
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(num_layers)]
    if len(freq) != num_layers or any(v not in (0, 1) for v in freq):
        raise ConfigError(
            f"--moe-layer-freq as a list needs {num_layers} entries (--num-layers) of 0 or 1, "
            f"got {freq}"
        )
    return [bool(v) for v in freq]


def moe_layer_numbers(moe: MoEConfig, num_layers: int) -> list[int]:
    """The layers with an MoE MLP (none without --num-experts)."""
    if not moe.enabled:
        return []
    return [i for i, on in enumerate(moe_layer_pattern(moe.moe_layer_freq, num_layers)) if on]


@dataclass
class MoEConfig:
    num_experts: int | None = flag(
        None, "Number of experts in each MoE layer (None: dense).", type=int
    )
    moe_router_topk: int = flag(2, "Experts each token is routed to.", type=int)
    moe_ffn_hidden_size: int | None = flag(
        None, "Hidden size of each expert's MLP (default --ffn-hidden-size).", type=int
    )
    moe_layer_freq: int | str = flag(
        1,
        "Every N-th layer is MoE (int), or a python list of 0/1 per layer, e.g. '([1]*3+[0])*2'.",
    )
    moe_router_load_balancing_type: str = flag(
        "aux_loss",
        "Load-balancing loss: the batch's (aux_loss), per sequence (seq_aux_loss), or none.",
        choices=["aux_loss", "seq_aux_loss", "none"],
    )
    moe_aux_loss_coeff: float = flag(0.0, "Scale of the load-balancing loss.", type=float)
    moe_z_loss_coeff: float | None = flag(
        None, "Scale of the router z-loss (ST-MoE); None turns it off.", type=float
    )
    moe_router_pre_softmax: bool = flag(
        False, "Softmax over all experts before top-k (else over the top-k).", action="store_true"
    )
    moe_expert_capacity_factor: float | None = flag(
        None,
        "Expert capacity = factor x tokens x topk / experts; tokens over it are dropped.",
        type=float,
    )
    moe_token_drop_policy: str = flag(
        "probs",
        "Which tokens an over-full expert drops: lowest probability, or latest position.",
        choices=["probs", "position"],
    )
    moe_pad_expert_input_to_capacity: bool = flag(
        False, "Pad every expert's input to its capacity (static shapes).", action="store_true"
    )
    moe_shared_expert_intermediate_size: int | None = flag(
        None, "Hidden size of a shared expert every token passes through (None: none).", type=int
    )
    moe_token_dispatcher_type: str = flag(
        "allgather",
        "How tokens reach their experts across the expert-parallel group.",
        choices=["alltoall", "allgather"],
    )
    moe_grouped_gemm: bool = flag(
        False,
        "One grouped matmul for all local experts (torch's, where it exists; else a loop).",
        action="store_true",
    )
    expert_model_parallel_size: int = flag(1, "Expert-parallel degree.", type=int)
    expert_tensor_parallel_size: int | None = flag(
        None,
        "Tensor-parallel degree inside each expert (default --tensor-model-parallel-size).",
        type=int,
    )

    def __post_init__(self) -> None:
        positive(
            self,
            "num_experts",
            "moe_router_topk",
            "moe_ffn_hidden_size",
            "moe_expert_capacity_factor",
            "moe_shared_expert_intermediate_size",
            "expert_model_parallel_size",
            "expert_tensor_parallel_size",
        )
        self.moe_layer_freq = parse_layer_freq(self.moe_layer_freq)
        if isinstance(self.moe_layer_freq, int):
            positive(self, "moe_layer_freq")
        if self.num_experts is None:
            require(
                self.expert_model_parallel_size == 1,
                f"--expert-model-parallel-size ({self.expert_model_parallel_size}) needs "
                "--num-experts",
            )
            return
        e, k, ep = self.num_experts, self.moe_router_topk, self.expert_model_parallel_size
        require(k <= e, f"--moe-router-topk ({k}) must be at most --num-experts ({e})")
        require(
            e % ep == 0,
            f"--num-experts ({e}) must be divisible by --expert-model-parallel-size ({ep})",
        )
        require(
            not self.moe_pad_expert_input_to_capacity
            or self.moe_expert_capacity_factor is not None,
            "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor",
        )

    @property
    def enabled(self) -> bool:
        return self.num_experts is not None

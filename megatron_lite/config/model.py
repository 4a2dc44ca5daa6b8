"""The model's shape and numerics (--num-layers, --hidden-size, --swiglu ...) and vocabulary padding."""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_lite.config.flags import flag, flag_name, positive, require


@dataclass
class ModelConfig:
    num_layers: int = flag(2, "Number of transformer layers.", type=int)
    hidden_size: int = flag(64, "Transformer hidden size.", type=int)
    num_attention_heads: int = flag(4, "Number of attention heads.", type=int)
    ffn_hidden_size: int | None = flag(
        None, "MLP hidden size (default 4 x hidden, or 2/3 of that rounded for --swiglu).", type=int
    )
    kv_channels: int | None = flag(None, "Per-head size (default hidden / heads).", type=int)
    seq_length: int = flag(128, "Sequence length of a training sample.", type=int)
    max_position_embeddings: int | None = flag(
        None, "Positions the model supports (default --seq-length).", type=int
    )
    make_vocab_size_divisible_by: int = flag(
        128, "Pad the vocabulary to a multiple of this times the tensor-parallel size.", type=int
    )
    position_embedding_type: str = flag(
        "learned_absolute", "Position embedding.", choices=["learned_absolute", "rope"]
    )
    rotary_base: int = flag(10000, "Base of the rotary embedding frequencies.", type=int)
    normalization: str = flag("LayerNorm", "Normalization layer.", choices=["LayerNorm", "RMSNorm"])
    layernorm_epsilon: float = flag(
        1e-5, "Epsilon of the normalization layers.", type=float, aliases=("--norm-epsilon",)
    )
    swiglu: bool = flag(False, "SwiGLU MLP instead of GeLU.", action="store_true")
    openai_gelu: bool = flag(
        False,
        "GeLU's tanh approximation (GPT-2's gelu_new), as HF GPT-2 models use.",
        action="store_true",
    )
    untie_embeddings_and_output_weights: bool = flag(
        False, "Separate output-layer weight instead of the input embedding.", action="store_true"
    )
    add_bias_linear: bool = flag(
        True, "Disable biases in linear layers.", name="--disable-bias-linear", action="store_false"
    )
    group_query_attention: bool = flag(False, "Grouped-query attention.", action="store_true")
    num_query_groups: int = flag(
        1, "Key/value head groups under --group-query-attention.", type=int
    )
    hidden_dropout: float = flag(0.1, "Dropout after attention and MLP.", type=float)
    attention_dropout: float = flag(0.1, "Dropout on attention probabilities.", type=float)
    init_method_std: float = flag(0.02, "Std of the normal weight initialization.", type=float)
    masked_softmax_fusion: bool = flag(
        True,
        "Disable the fused scaled-masked-softmax kernel.",
        name="--no-masked-softmax-fusion",
        action="store_false",
    )
    attention_backend: str = flag(
        "auto",
        "Attention core: fused softmax kernel, torch SDPA "
        "(flash on GPU) or plain torch ops; auto picks the fastest.",
        choices=["auto", "fused", "sdpa", "unfused"],
    )
    recompute_granularity: str | None = flag(
        None, "Activation recomputation.", choices=["full", "selective"]
    )
    recompute_method: str | None = flag(
        None, "Which layers --recompute-granularity full recomputes.", choices=["uniform", "block"]
    )
    recompute_num_layers: int = flag(
        1, "Layers per recompute chunk (uniform) or recomputed layers per stage (block).", type=int
    )

    def __post_init__(self) -> None:
        positive(
            self,
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "seq_length",
            "ffn_hidden_size",
            "kv_channels",
            "make_vocab_size_divisible_by",
            "num_query_groups",
            "recompute_num_layers",
        )
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.kv_channels is None:
            require(
                self.hidden_size % self.num_attention_heads == 0,
                f"--hidden-size ({self.hidden_size}) must be divisible by "
                f"--num-attention-heads ({self.num_attention_heads})",
            )
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.ffn_hidden_size is None:
            if self.swiglu:  # keeps the parameter count of a 4h GeLU MLP, rounded up to 64
                self.ffn_hidden_size = 64 * math.ceil(int(8 * self.hidden_size / 3) / 64)
            else:
                self.ffn_hidden_size = 4 * self.hidden_size
        if self.position_embedding_type == "learned_absolute":
            require(
                self.max_position_embeddings >= self.seq_length,
                f"--max-position-embeddings ({self.max_position_embeddings}) must be at least "
                f"--seq-length ({self.seq_length})",
            )
        if not self.group_query_attention:
            self.num_query_groups = self.num_attention_heads
        require(
            self.num_attention_heads % self.num_query_groups == 0,
            f"--num-attention-heads ({self.num_attention_heads}) must be divisible by "
            f"--num-query-groups ({self.num_query_groups})",
        )
        for name in ("hidden_dropout", "attention_dropout"):
            v = getattr(self, name)
            require(0.0 <= v < 1.0, f"{flag_name(ModelConfig, name)} must be in [0, 1), got {v}")
        if self.recompute_method is not None:
            require(
                self.recompute_granularity == "full",
                f"--recompute-method {self.recompute_method} needs --recompute-granularity full",
            )
        if self.recompute_granularity == "full" and self.recompute_method is None:
            self.recompute_method = "uniform"

    @property
    def tie_embeddings(self) -> bool:
        return not self.untie_embeddings_and_output_weights


def pad_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron's padding: round the vocabulary up to a multiple of divisible_by x tp."""
    multiple = divisible_by * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)

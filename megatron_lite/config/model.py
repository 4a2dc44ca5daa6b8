"""The model's shape and numerics (--num-layers, --hidden-size, --swiglu ...) and vocabulary padding."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from megatron_lite.config.flags import ConfigError, flag, flag_name, positive, require


def parse_window(text: str) -> list[int]:
    """--window-size "4096,0" -> [4096, 0] (Megatron's tuple_type spelling)."""
    try:
        left, right = (int(v) for v in str(text).split(","))
    except ValueError:
        raise ConfigError(
            f"--window-size takes 'left,right' (two integers, e.g. 4096,0), got {text!r}"
        ) from None
    return [left, right]


def _window_flag(text: str) -> list[int]:
    try:
        return parse_window(text)
    except ConfigError as e:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(e)) from None


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
    rotary_percent: float = flag(
        1.0, "Fraction of each head's channels the rotary embedding rotates.", type=float
    )
    # RoPE scaling (model/rope.py): at most one of linear, Llama 3 and YaRN
    rotary_seq_len_interpolation_factor: float | None = flag(
        None,
        "Linear position interpolation: positions divided by this (HF rope_type linear).",
        type=float,
    )
    use_rope_scaling: bool = flag(
        False, "Llama 3.x RoPE frequency scaling (HF rope_type llama3).", action="store_true"
    )
    rope_scaling_factor: float = flag(8.0, "Factor of --use-rope-scaling.", type=float)
    low_freq_factor: float = flag(1.0, "--use-rope-scaling: low-frequency factor.", type=float)
    high_freq_factor: float = flag(4.0, "--use-rope-scaling: high-frequency factor.", type=float)
    rope_type: str | None = flag(
        None, "rope (plain) or yarn (YaRN, HF rope_type yarn).", choices=["rope", "yarn"]
    )
    rotary_scaling_factor: float = flag(
        1.0, "YaRN's scaling factor (--rope-type yarn).", type=float
    )
    original_max_position_embeddings: int | None = flag(
        None,
        "Context length the scaled RoPE was trained at (default 8192 for --use-rope-scaling, "
        "4096 for --rope-type yarn).",
        type=int,
    )
    beta_fast: float = flag(32.0, "YaRN: rotations where extrapolation ends.", type=float)
    beta_slow: float = flag(1.0, "YaRN: rotations where interpolation starts.", type=float)
    mscale: float = flag(1.0, "YaRN attention-factor numerator's mscale.", type=float)
    mscale_all_dim: float = flag(0.0, "YaRN attention-factor denominator's mscale.", type=float)
    window_size: list[int] | None = flag(
        None,
        "Sliding-window attention 'left,right': each query sees itself and `left` keys before it "
        "(right must be 0: the model is causal; -1 = unlimited).",
        type=_window_flag,
        join=",",
    )
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
    add_qkv_bias: bool = flag(
        False,
        "Bias on the QKV projection even under --disable-bias-linear (Qwen2/2.5).",
        action="store_true",
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
        self._check_long_context()

    def _check_long_context(self) -> None:
        """RoPE scaling and the sliding window: one scaling scheme at a time, sane values."""
        positive(self, "rotary_seq_len_interpolation_factor", "original_max_position_embeddings")
        require(
            0.0 < self.rotary_percent <= 1.0
            and int(self.kv_channels * self.rotary_percent) % 2 == 0
            and int(self.kv_channels * self.rotary_percent) > 0,
            f"--rotary-percent ({self.rotary_percent}) must be in (0, 1] and rotate an even, "
            f"non-zero number of the {self.kv_channels} channels per head",
        )
        schemes = [
            flag
            for flag, on in (
                ("--rotary-seq-len-interpolation-factor", self.rotary_seq_len_interpolation_factor),
                ("--use-rope-scaling", self.use_rope_scaling),
                ("--rope-type yarn", self.rope_type == "yarn"),
            )
            if on
        ]
        require(len(schemes) <= 1, f"choose one RoPE scaling scheme, got {' and '.join(schemes)}")
        require(
            not schemes or self.position_embedding_type == "rope",
            f"{schemes[0] if schemes else ''} needs --position-embedding-type rope",
        )
        require(
            self.rotary_scaling_factor == 1.0 or self.rope_type == "yarn",
            f"--rotary-scaling-factor ({self.rotary_scaling_factor}) is YaRN's factor: it needs "
            "--rope-type yarn (Llama 3 scaling takes --use-rope-scaling --rope-scaling-factor)",
        )
        if self.use_rope_scaling:
            require(
                self.rope_scaling_factor >= 1.0
                and 0 < self.low_freq_factor < self.high_freq_factor,
                f"--use-rope-scaling needs --rope-scaling-factor >= 1 (got "
                f"{self.rope_scaling_factor}) and 0 < --low-freq-factor ({self.low_freq_factor}) "
                f"< --high-freq-factor ({self.high_freq_factor})",
            )
        if self.rope_type == "yarn":
            require(
                self.rotary_scaling_factor >= 1.0 and self.beta_fast > self.beta_slow > 0,
                f"--rope-type yarn needs --rotary-scaling-factor >= 1 (got "
                f"{self.rotary_scaling_factor}) and --beta-fast ({self.beta_fast}) > --beta-slow "
                f"({self.beta_slow}) > 0",
            )
        if self.window_size is not None:
            self.window_size = parse_window(",".join(map(str, self.window_size)))
            left, right = self.window_size
            require(
                left >= -1 and right in (0, -1),
                f"--window-size {left},{right}: left must be >= 0 (or -1, unlimited) and right 0 "
                "(or -1): the model is causal, no query sees keys after it",
            )

    @property
    def window_left(self) -> int | None:
        """Keys before each query that it may see under --window-size (None: all of them)."""
        if self.window_size is None or self.window_size[0] < 0:
            return None
        return self.window_size[0]

    @property
    def tie_embeddings(self) -> bool:
        return not self.untie_embeddings_and_output_weights


# RoPE scaling and the sliding window: settings of the model's numerics a checkpoint carries
# (Megatron's names where Megatron has the setting)
LONG_CONTEXT_FIELDS = (
    "rotary_percent",
    "rotary_seq_len_interpolation_factor",
    "use_rope_scaling",
    "rope_scaling_factor",
    "low_freq_factor",
    "high_freq_factor",
    "rope_type",
    "rotary_scaling_factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "window_size",
)


def pad_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron's padding: round the vocabulary up to a multiple of divisible_by x tp."""
    multiple = divisible_by * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)


# Model settings that change a parameter's shape (or existence): a checkpoint must agree on all of them.
SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "ffn_hidden_size",
    "swiglu",
    "normalization",
    "position_embedding_type",
    "max_position_embeddings",
    "untie_embeddings_and_output_weights",
    "add_bias_linear",
)
# --use-checkpoint-args takes these from a checkpoint (as Megatron's load_args_from_checkpoint):
# the shape-defining settings and those that decide the model's numerics
CHECKPOINT_MODEL_ARGS = (
    *SHAPE_FIELDS,
    "group_query_attention",
    "add_qkv_bias",
    "openai_gelu",
    "layernorm_epsilon",
    "rotary_base",
    "make_vocab_size_divisible_by",
    *LONG_CONTEXT_FIELDS,
)

"""Configuration dataclasses, one per concern, validated on construction.

Each field carries its Megatron-LM flag name in its metadata, so `arguments.py` builds the command
line from these classes and there is exactly one place that names a setting, its default and its help.
Checks that need two sections (batch sizes vs. parallel sizes, say) live in `Config.__post_init__`;
values derived from several settings (data-parallel size, number of microbatches, padded vocabulary)
are computed once, in `Config.finalize`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from megatron_lite.errors import UserError


class ConfigError(UserError, ValueError):
    """An inconsistent or invalid setting; the message names the flag(s) and value(s)."""


# --tokenizer-type values (the tools that tokenize accept the same ones)
TOKENIZER_TYPES = (
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "NullTokenizer",
)


def flag(default: Any, help: str, *, name: str | None = None, **argparse_kwargs: Any) -> Any:
    """A dataclass field that is also a command-line flag (`name` defaults to --field-name)."""
    if isinstance(default, list):
        return field(
            default_factory=lambda: list(default),
            metadata={"help": help, "flag": name, **argparse_kwargs},
        )
    return field(default=default, metadata={"help": help, "flag": name, **argparse_kwargs})


def _flag_name(cls: type, field_name: str) -> str:
    for f in dataclasses.fields(cls):
        if f.name == field_name:
            return f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    return field_name


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if v is not None:
            _require(v > 0, f"{_flag_name(type(obj), n)} must be positive, got {v}")


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
        _positive(
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
            _require(
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
            _require(
                self.max_position_embeddings >= self.seq_length,
                f"--max-position-embeddings ({self.max_position_embeddings}) must be at least "
                f"--seq-length ({self.seq_length})",
            )
        if not self.group_query_attention:
            self.num_query_groups = self.num_attention_heads
        _require(
            self.num_attention_heads % self.num_query_groups == 0,
            f"--num-attention-heads ({self.num_attention_heads}) must be divisible by "
            f"--num-query-groups ({self.num_query_groups})",
        )
        for name in ("hidden_dropout", "attention_dropout"):
            v = getattr(self, name)
            _require(0.0 <= v < 1.0, f"{_flag_name(ModelConfig, name)} must be in [0, 1), got {v}")
        if self.recompute_method is not None:
            _require(
                self.recompute_granularity == "full",
                f"--recompute-method {self.recompute_method} needs --recompute-granularity full",
            )
        if self.recompute_granularity == "full" and self.recompute_method is None:
            self.recompute_method = "uniform"

    @property
    def tie_embeddings(self) -> bool:
        return not self.untie_embeddings_and_output_weights


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = flag(1, "Tensor-parallel degree.", type=int)
    pipeline_model_parallel_size: int = flag(1, "Pipeline-parallel degree.", type=int)
    num_layers_per_virtual_pipeline_stage: int | None = flag(
        None, "Layers per virtual stage (interleaved 1F1B).", type=int
    )
    pipeline_schedule: str = flag(
        "1f1b",
        "Pipeline schedule (1F1B becomes interleaved when virtual stages are set).",
        choices=["1f1b", "zero-bubble"],
    )
    sequence_parallel: bool = flag(
        False,
        "Shard LayerNorm/dropout activations along the sequence over tensor-parallel ranks.",
        action="store_true",
    )
    distributed_backend: str | None = flag(
        None,
        "Process-group backend (default: nccl with CUDA, else gloo).",
        choices=["gloo", "nccl"],
    )
    distributed_timeout_minutes: float = flag(
        10.0,
        "Timeout of collectives; a dead rank ends the job after at most this long.",
        type=float,
    )
    use_distributed_optimizer: bool = flag(
        False, "Shard optimizer state over data-parallel ranks (ZeRO-1).", action="store_true"
    )
    overlap_grad_reduce: bool = flag(
        False, "Start each bucket's gradient reduction during backward.", action="store_true"
    )
    overlap_param_gather: bool = flag(
        False,
        "Distributed optimizer: all-gather the updated parameters during the next forward.",
        action="store_true",
    )
    ddp_bucket_size: int | None = flag(
        None, "Elements per gradient bucket (default: max(40M, 1M x dp)).", type=int
    )
    accumulate_allreduce_grads_in_fp32: bool = flag(
        False, "Accumulate and reduce gradients in fp32.", action="store_true"
    )

    def __post_init__(self) -> None:
        _positive(
            self,
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "num_layers_per_virtual_pipeline_stage",
            "distributed_timeout_minutes",
            "ddp_bucket_size",
        )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            self.sequence_parallel = False  # nothing to shard over, as Megatron does
        _require(
            not self.overlap_param_gather or self.use_distributed_optimizer,
            "--overlap-param-gather needs --use-distributed-optimizer (only its parameters are "
            "all-gathered)",
        )


@dataclass
class DataConfig:
    data_path: list[str] = flag(
        [], "Dataset prefix(es), optionally weighted: '0.7 prefixA 0.3 prefixB'.", nargs="*"
    )
    split: str = flag("969,30,1", "Train,valid,test proportions over documents.")
    train_data_path: list[str] = flag(
        [],
        "Training data only (instead of --data-path and --split), optionally weighted.",
        nargs="*",
    )
    valid_data_path: list[str] = flag([], "Validation data only, optionally weighted.", nargs="*")
    test_data_path: list[str] = flag([], "Test data only, optionally weighted.", nargs="*")
    data_cache_path: str | None = flag(None, "Where index caches go (default next to the data).")
    mock_data: bool = flag(False, "Synthetic tokens instead of --data-path.", action="store_true")
    tokenizer_type: str | None = flag(None, "Tokenizer.", choices=list(TOKENIZER_TYPES))
    vocab_file: str | None = flag(None, "GPT-2 vocab.json.")
    merge_file: str | None = flag(None, "GPT-2 merges.txt.")
    tokenizer_model: str | None = flag(
        None, "SentencePiece model file, or a HuggingFace tokenizer directory (or hub name)."
    )
    vocab_size: int | None = flag(None, "Vocabulary size of the NullTokenizer.", type=int)
    eod_mask_loss: bool = flag(
        False, "Do not train on end-of-document tokens.", action="store_true"
    )
    reset_position_ids: bool = flag(
        False, "Restart position ids after each end-of-document.", action="store_true"
    )
    reset_attention_mask: bool = flag(
        False, "Do not attend across end-of-document tokens.", action="store_true"
    )
    num_workers: int = flag(0, "DataLoader worker processes.", type=int)

    def __post_init__(self) -> None:
        parts = self.split.replace("/", ",").split(",")
        try:
            weights = [float(p) for p in parts if p.strip()]
        except ValueError:
            raise ConfigError(
                f"--split must be comma-separated numbers like 969,30,1, got {self.split!r}"
            ) from None
        _require(
            0 < len(weights) <= 3 and all(w >= 0 for w in weights) and sum(weights) > 0,
            f"--split needs 1 to 3 non-negative numbers with a positive sum, got {self.split!r}",
        )
        per_split = self.train_data_path or self.valid_data_path or self.test_data_path
        _require(
            not (per_split and self.data_path),
            "give either --data-path (split by --split) or --train-data-path / --valid-data-path "
            "/ --test-data-path, not both",
        )
        _require(
            not per_split or self.train_data_path or self.mock_data,
            "--valid-data-path / --test-data-path need --train-data-path",
        )
        if self.tokenizer_type == "GPT2BPETokenizer" and not self.mock_data:
            _require(
                self.vocab_file is not None and self.merge_file is not None,
                "--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file",
            )
        if self.tokenizer_type in ("SentencePieceTokenizer", "HuggingFaceTokenizer"):
            _require(
                self.tokenizer_model is not None,
                f"--tokenizer-type {self.tokenizer_type} needs --tokenizer-model",
            )
        if self.tokenizer_type == "NullTokenizer":
            _require(
                self.vocab_size is not None and self.vocab_size > 0,
                "--tokenizer-type NullTokenizer needs a positive --vocab-size",
            )


def precision_of(bf16: bool, fp16: bool) -> str:
    """'bf16', 'fp16' or 'fp32' from --bf16/--fp16 (the one rule for the model weights' dtype)."""
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


@dataclass
class OptimConfig:
    optimizer: str = flag("adam", "Optimizer (adam is AdamW).", choices=["adam", "sgd"])
    lr: float = flag(1e-4, "Peak learning rate.", type=float)
    min_lr: float = flag(0.0, "Learning rate at the end of decay.", type=float)
    lr_decay_style: str = flag(
        "linear",
        "Decay after warm-up.",
        choices=["constant", "linear", "cosine", "inverse-square-root"],
    )
    lr_warmup_iters: int = flag(0, "Linear warm-up iterations (with --train-iters).", type=int)
    lr_warmup_samples: int = flag(0, "Linear warm-up samples (with --train-samples).", type=int)
    lr_warmup_fraction: float | None = flag(
        None, "Warm-up as a fraction of the decay length.", type=float
    )
    lr_decay_iters: int | None = flag(
        None, "Iterations of decay (default --train-iters).", type=int
    )
    lr_decay_samples: int | None = flag(
        None, "Samples of decay (default --train-samples).", type=int
    )
    lr_warmup_init: float = flag(0.0, "Learning rate at the start of warm-up.", type=float)
    weight_decay: float = flag(0.01, "Weight decay (not on biases and norm weights).", type=float)
    start_weight_decay: float | None = flag(
        None, "Weight decay at the start of the run (default --weight-decay).", type=float
    )
    end_weight_decay: float | None = flag(
        None, "Weight decay at the end of the run (default --weight-decay).", type=float
    )
    weight_decay_incr_style: str = flag(
        "constant",
        "How weight decay goes from start to end over the run.",
        choices=["constant", "linear", "cosine"],
    )
    adam_beta1: float = flag(0.9, "Adam beta1.", type=float)
    adam_beta2: float = flag(0.999, "Adam beta2.", type=float)
    adam_eps: float = flag(1e-8, "Adam epsilon.", type=float)
    sgd_momentum: float = flag(0.9, "SGD momentum.", type=float)
    clip_grad: float = flag(1.0, "Clip gradients to this global L2 norm (0 disables).", type=float)
    bf16: bool = flag(False, "bf16 model weights, fp32 master weights.", action="store_true")
    fp16: bool = flag(
        False, "fp16 model weights, fp32 master weights, loss scaling.", action="store_true"
    )
    loss_scale: float | None = flag(
        None, "Constant fp16 loss scale (default: dynamic).", type=float
    )
    initial_loss_scale: float = flag(2.0**32, "Initial dynamic loss scale.", type=float)
    min_loss_scale: float = flag(1.0, "Smallest dynamic loss scale.", type=float)
    loss_scale_window: int = flag(1000, "Steps without overflow before the scale grows.", type=int)
    hysteresis: int = flag(2, "Overflows tolerated before the scale backs off.", type=int)
    log_num_zeros_in_grad: bool = flag(
        False, "Count zero gradient entries each step (for logging).", action="store_true"
    )
    override_opt_param_scheduler: bool = flag(
        False,
        "On resume, keep this run's LR schedule settings over the checkpoint's.",
        name="--override-opt_param-scheduler",
        action="store_true",
    )
    use_checkpoint_opt_param_scheduler: bool = flag(
        False,
        "On resume, take the LR schedule settings from the checkpoint.",
        name="--use-checkpoint-opt_param-scheduler",
        action="store_true",
    )

    @property
    def precision(self) -> str:
        """The model weights' precision, 'bf16', 'fp16' or 'fp32' (fp32 masters either way)."""
        return precision_of(self.bf16, self.fp16)

    def __post_init__(self) -> None:
        _require(not (self.bf16 and self.fp16), "--bf16 and --fp16 are mutually exclusive")
        _require(self.lr >= 0, f"--lr must be non-negative, got {self.lr}")
        _require(
            0 <= self.min_lr <= self.lr,
            f"--min-lr ({self.min_lr}) must be between 0 and --lr ({self.lr})",
        )
        for name in ("lr_warmup_iters", "lr_warmup_samples"):
            value = getattr(self, name)
            _require(
                value >= 0, f"{_flag_name(OptimConfig, name)} must be non-negative, got {value}"
            )
        _positive(self, "lr_decay_iters", "lr_decay_samples")
        if self.lr_warmup_fraction is not None:
            _require(
                0 <= self.lr_warmup_fraction <= 1,
                f"--lr-warmup-fraction must be in [0, 1], got {self.lr_warmup_fraction}",
            )
            _require(
                self.lr_warmup_iters == 0 and self.lr_warmup_samples == 0,
                "use only one of --lr-warmup-fraction and --lr-warmup-iters/--lr-warmup-samples",
            )
        _require(self.clip_grad >= 0, f"--clip-grad must be non-negative, got {self.clip_grad}")
        if self.weight_decay_incr_style == "constant":
            _require(
                self.start_weight_decay == self.end_weight_decay,
                f"--start-weight-decay ({self.start_weight_decay}) and --end-weight-decay "
                f"({self.end_weight_decay}) differ: give --weight-decay-incr-style linear or cosine",
            )
        else:
            _require(
                self.start_weight_decay is not None and self.end_weight_decay is not None,
                f"--weight-decay-incr-style {self.weight_decay_incr_style} needs "
                "--start-weight-decay and --end-weight-decay",
            )
        _positive(self, "loss_scale", "initial_loss_scale", "loss_scale_window", "hysteresis")


@dataclass
class CheckpointConfig:
    save: str | None = flag(None, "Directory to save checkpoints in.")
    load: str | None = flag(None, "Directory to load a checkpoint from.")
    save_interval: int | None = flag(None, "Iterations between checkpoints.", type=int)
    no_load_optim: bool = flag(False, "Do not load optimizer state.", action="store_true")
    no_load_rng: bool = flag(False, "Do not load RNG states.", action="store_true")
    no_save_optim: bool = flag(False, "Do not save optimizer state.", action="store_true")
    no_save_rng: bool = flag(False, "Do not save RNG states.", action="store_true")
    finetune: bool = flag(
        False, "Load weights only; restart iteration count and optimizer.", action="store_true"
    )
    use_checkpoint_args: bool = flag(
        False,
        "Take the model's shape and the tokenizer (unless given) from the --load checkpoint.",
        action="store_true",
    )
    exit_on_missing_checkpoint: bool = flag(
        False, "With --load: stop with an error when it holds no checkpoint.", action="store_true"
    )
    save_retain: int | None = flag(
        None,
        "Keep only the N most recent checkpoints in --save, deleting older ones after each save "
        "(never the one latest_checkpointed_iteration.txt names); -1: keep all.",
        type=int,
        aliases=("--most-recent-k",),
    )

    def __post_init__(self) -> None:
        _positive(self, "save_interval")
        _require(
            self.save_retain in (None, -1) or self.save_retain >= 1,
            f"--save-retain must be at least 1 (or -1: keep all), got {self.save_retain}",
        )


@dataclass
class LoggingConfig:
    log_interval: int = flag(100, "Iterations between log lines.", type=int)
    tensorboard_dir: str | None = flag(None, "Where TensorBoard event files go.")
    peak_tflops: float | None = flag(None, "Peak TFLOP/s per device, for MFU.", type=float)
    log_memory: bool = flag(
        True, "Do not report memory use.", name="--no-log-memory", action="store_false"
    )
    log_params_norm: bool = flag(
        False, "Log the L2 norm of all parameters (each counted once).", action="store_true"
    )

    def __post_init__(self) -> None:
        _positive(self, "log_interval", "peak_tflops")


@dataclass
class TrainConfig:
    micro_batch_size: int = flag(1, "Samples per microbatch per data-parallel rank.", type=int)
    global_batch_size: int | None = flag(
        None, "Samples per iteration over all data-parallel ranks (default micro x dp).", type=int
    )
    rampup_batch_size: list[int] | None = flag(
        None, "start increment samples: grow the global batch linearly.", nargs=3, type=int
    )
    train_iters: int | None = flag(None, "Iterations to train.", type=int)
    train_samples: int | None = flag(None, "Samples to train (instead of --train-iters).", type=int)
    eval_interval: int = flag(1000, "Iterations between validation runs.", type=int)
    eval_iters: int = flag(100, "Validation batches per evaluation.", type=int)
    seed: int = flag(1234, "Random seed.", type=int)
    exit_interval: int | None = flag(
        None, "Save and exit at an iteration divisible by this.", type=int
    )
    exit_duration_in_mins: float | None = flag(
        None, "Save and exit after this many minutes.", type=float
    )
    exit_signal_handler: bool = flag(False, "Save and exit on SIGTERM.", action="store_true")
    check_for_nan_in_loss: bool = flag(
        False, "Stop with an error on a nan/inf loss.", action="store_true"
    )

    def __post_init__(self) -> None:
        _positive(
            self,
            "micro_batch_size",
            "global_batch_size",
            "train_iters",
            "train_samples",
            "eval_interval",
            "exit_interval",
            "exit_duration_in_mins",
        )
        _require(self.eval_iters >= 0, f"--eval-iters must be non-negative, got {self.eval_iters}")
        _require(
            not (self.train_iters and self.train_samples),
            "use only one of --train-iters and --train-samples",
        )


SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "train": TrainConfig,
}


def global_batch_size_at(consumed_samples: int, global_batch_size: int, rampup: list | None) -> int:
    """Megatron's --rampup-batch-size START INCREMENT SAMPLES: the global batch starts at START and
    grows by INCREMENT every SAMPLES / ((global - START) / INCREMENT) consumed samples; after SAMPLES
    it is the global batch size. A function of consumed samples only, so resume is exact."""
    if rampup is None or consumed_samples > rampup[2]:
        return global_batch_size
    start, increment, samples = rampup
    steps = (global_batch_size - start) // increment
    if steps == 0 or samples == 0:
        return start
    return start + int(consumed_samples / (samples / steps)) * increment


def train_iters_for_samples(train_samples: int, global_batch_size: int, rampup: list | None) -> int:
    """Iterations of a --train-samples run: those whose batches all fit in train_samples."""
    iters = consumed = 0
    while rampup is not None and consumed <= rampup[2]:
        batch = global_batch_size_at(consumed, global_batch_size, rampup)
        if consumed + batch > train_samples:
            return iters
        consumed, iters = consumed + batch, iters + 1
    return iters + (train_samples - consumed) // global_batch_size


def pad_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron's padding: round the vocabulary up to a multiple of divisible_by x tp."""
    multiple = divisible_by * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)


@dataclass
class Config:
    """Every setting of a run. Cross-section checks run here; `finalize` adds the derived values."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # derived by finalize(); None until then
    world_size: int | None = None
    data_parallel_size: int | None = None
    num_microbatches: int | None = None
    total_train_iters: int | None = None  # --train-iters, or from --train-samples and the ramp-up

    def __post_init__(self) -> None:
        m, p = self.model, self.parallel
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        _require(
            m.num_attention_heads % tp == 0,
            f"--num-attention-heads ({m.num_attention_heads}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})",
        )
        _require(
            m.num_query_groups % tp == 0,
            f"--num-query-groups ({m.num_query_groups}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})",
        )
        _require(
            m.ffn_hidden_size % tp == 0,
            f"--ffn-hidden-size ({m.ffn_hidden_size}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})",
        )
        _require(
            m.num_layers % pp == 0,
            f"--num-layers ({m.num_layers}) must be divisible by "
            f"--pipeline-model-parallel-size ({pp})",
        )
        if p.sequence_parallel:
            _require(
                m.seq_length % tp == 0,
                f"--seq-length ({m.seq_length}) must be divisible by "
                f"--tensor-model-parallel-size ({tp}) under --sequence-parallel",
            )
        vl = p.num_layers_per_virtual_pipeline_stage
        if vl is not None:
            _require(
                pp > 1,
                "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1",
            )
            _require(
                (m.num_layers // pp) % vl == 0,
                f"layers per pipeline stage (--num-layers {m.num_layers} / "
                f"--pipeline-model-parallel-size {pp} = {m.num_layers // pp}) must be "
                f"divisible by --num-layers-per-virtual-pipeline-stage ({vl})",
            )
        if p.pipeline_schedule == "zero-bubble":
            _require(
                vl is None,
                "--pipeline-schedule zero-bubble does not support "
                "--num-layers-per-virtual-pipeline-stage",
            )

    @property
    def virtual_pipeline_size(self) -> int | None:
        vl = self.parallel.num_layers_per_virtual_pipeline_stage
        if vl is None:
            return None
        return self.model.num_layers // self.parallel.pipeline_model_parallel_size // vl

    def finalize(self, world_size: int) -> Config:
        """Derive data-parallel size and number of microbatches for `world_size` ranks."""
        p, t = self.parallel, self.train
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        _require(
            world_size % (tp * pp) == 0,
            f"world size ({world_size}) must be divisible by --tensor-model-parallel-size "
            f"({tp}) x --pipeline-model-parallel-size ({pp}) = {tp * pp}",
        )
        dp = world_size // (tp * pp)
        if t.global_batch_size is None:
            t.global_batch_size = t.micro_batch_size * dp
        per_step = t.micro_batch_size * dp
        _require(
            t.global_batch_size % per_step == 0,
            f"--global-batch-size ({t.global_batch_size}) must be divisible by "
            f"--micro-batch-size ({t.micro_batch_size}) x data-parallel size ({dp}) "
            f"= {per_step}",
        )
        if t.rampup_batch_size is not None:
            start, incr, _ = t.rampup_batch_size
            for name, v in (("start", start), ("increment", incr)):
                _require(
                    v > 0 and v % per_step == 0,
                    f"--rampup-batch-size {name} ({v}) must be a positive multiple of "
                    f"--micro-batch-size x data-parallel size ({per_step})",
                )
        num_micro = t.global_batch_size // per_step
        vpp = self.virtual_pipeline_size
        if vpp is not None and vpp > 1:
            _require(
                num_micro % pp == 0,
                f"the interleaved schedule needs the number of microbatches ({num_micro} = "
                f"--global-batch-size / (--micro-batch-size x dp)) to be divisible by "
                f"--pipeline-model-parallel-size ({pp})",
            )
        self.world_size, self.data_parallel_size, self.num_microbatches = world_size, dp, num_micro
        self.total_train_iters = t.train_iters
        o = self.optim
        if t.train_samples is not None:  # Megatron's sample-based run: the LR schedule in samples
            _require(
                o.lr_decay_iters is None and o.lr_warmup_iters == 0,
                "--train-samples counts the LR schedule in samples: use --lr-decay-samples and "
                "--lr-warmup-samples (or --lr-warmup-fraction), not --lr-decay-iters or "
                "--lr-warmup-iters",
            )
            self.total_train_iters = train_iters_for_samples(
                t.train_samples, t.global_batch_size, t.rampup_batch_size
            )
        else:
            _require(
                o.lr_decay_samples is None and o.lr_warmup_samples == 0,
                "--lr-decay-samples and --lr-warmup-samples go with --train-samples; with "
                "--train-iters use --lr-decay-iters and --lr-warmup-iters",
            )
        return self

    def padded_vocab_size(self, vocab_size: int) -> int:
        return pad_vocab_size(
            vocab_size,
            self.model.make_vocab_size_divisible_by,
            self.parallel.tensor_model_parallel_size,
        )

    def to_dict(self) -> dict:
        """Plain JSON-able data (stored in checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        sections = {name: SECTIONS[name](**d[name]) for name in SECTIONS if name in d}
        cfg = cls(**sections)
        for k in ("world_size", "data_parallel_size", "num_microbatches", "total_train_iters"):
            setattr(cfg, k, d.get(k))
        return cfg

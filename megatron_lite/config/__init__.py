"""Configuration dataclasses, one per concern, validated on construction (stdlib only, no torch).

Each field carries its Megatron-LM flag name in its metadata (`flags.flag`), so `arguments.py`
builds the command line from these classes and there is exactly one place that names a setting,
its default and its help. Checks that need two sections (batch sizes vs. parallel sizes, say) live
in `Config.__post_init__`; values derived from several settings (data-parallel size, number of
microbatches, padded vocabulary) are computed once, in `Config.finalize`.

`flags.py`: `flag()`, flag spellings, `ConfigError`; `model.py`, `parallel.py`, `data.py`,
`optim.py`, `training.py`: the sections; `rampup.py`: --rampup-batch-size arithmetic; `run.py`:
`Config` and `SECTIONS`.
"""

from megatron_lite.config.data import TOKENIZER_TYPES, DataConfig
from megatron_lite.config.flags import (
    ConfigError,
    command_line,
    field_default,
    field_flag,
    flag,
    flag_name,
)
from megatron_lite.config.model import ModelConfig, pad_vocab_size
from megatron_lite.config.moe import MoEConfig, moe_layer_numbers, moe_layer_pattern
from megatron_lite.config.optim import OptimConfig, precision_of
from megatron_lite.config.parallel import ParallelConfig
from megatron_lite.config.rampup import (
    check_rampup,
    global_batch_size_at,
    train_iters_for_samples,
)
from megatron_lite.config.run import SECTIONS, Config
from megatron_lite.config.training import CheckpointConfig, LoggingConfig, TrainConfig

__all__ = [
    "SECTIONS",
    "TOKENIZER_TYPES",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "MoEConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "TrainConfig",
    "check_rampup",
    "command_line",
    "field_default",
    "field_flag",
    "flag",
    "flag_name",
    "global_batch_size_at",
    "moe_layer_numbers",
    "moe_layer_pattern",
    "pad_vocab_size",
    "precision_of",
    "train_iters_for_samples",
]

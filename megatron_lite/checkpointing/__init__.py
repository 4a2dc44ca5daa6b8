"""Checkpoints in Megatron's layout (atomic saves, safe loads, any layout into any other), and beside
the reader they share: offline reshard (`reshard.py`), HF import (`hf_reader.py`) and export (`hf_export.py`).

    <save>/iter_0000100/mp_rank_TT[_PPP]/model_optim_rng.pt   (_PPP only when pp > 1)
    <save>/latest_checkpointed_iteration.txt                  (written last)

Each file is written by dp rank 0 of its (tp, pp) place in Megatron-LM's layout (`torch_format.py`:
`model` with megatron-core's stage-local names, `args`, `checkpoint_version`, so Megatron-LM's
`load_checkpoint` reads it), with our `shard_info` entry per tensor, by global parameter name, saying
where the shard sits in the full tensor.
Loading reassembles each full tensor from the source shards and slices out this rank's shard, so a
checkpoint saved with any tp x pp x dp (distributed optimizer or not) loads into any other layout of
the same model. Files hold only tensors, plain Python types and the `args` Namespace of plain values,
and are read with `torch.load(weights_only=True)` allowing that one class: any other pickled object is
refused.

A save goes to `iter_XXXXXXX.tmp`, every file and directory is fsynced, the directory is renamed into
place, and only then is the latest-iteration file replaced (atomically): a job killed at any point
leaves the previous checkpoint whole and named by the latest file.
"""

from megatron_lite.checkpointing.async_save import finalize_async_save
from megatron_lite.checkpointing.files import (
    FORMAT_VERSION,
    LATEST_FILE,
    MODEL_FILE,
    PAUSE_ENV,
    CheckpointError,
    chunk_params,
    fsync_dir,
    iteration_dir,
    mp_rank_name,
    plain,
    read_latest_iteration,
    safe_load,
    shard_info_of,
    write_durably,
    write_latest,
)
from megatron_lite.checkpointing.load import (
    CheckpointReader,
    assemble_full_tensor,
    check_same_model,
    iter_full_state,
    load_checkpoint,
    load_full_state,
    load_weights,
    shard_from_reader,
    slice_shard,
    source_name,
    weight_key,
)
from megatron_lite.checkpointing.rng import get_rng_state, set_rng_state
from megatron_lite.checkpointing.save import save_checkpoint
from megatron_lite.config.model import CHECKPOINT_MODEL_ARGS, SHAPE_FIELDS

__all__ = [
    "CHECKPOINT_MODEL_ARGS", "FORMAT_VERSION", "LATEST_FILE", "MODEL_FILE", "PAUSE_ENV",
    "SHAPE_FIELDS", "CheckpointError", "CheckpointReader", "finalize_async_save", "assemble_full_tensor",
    "check_same_model", "chunk_params", "fsync_dir", "get_rng_state", "iter_full_state",
    "iteration_dir", "load_checkpoint", "load_full_state", "load_weights", "mp_rank_name", "plain",
    "read_latest_iteration", "safe_load", "save_checkpoint", "set_rng_state", "shard_from_reader",
    "shard_info_of", "slice_shard", "source_name", "weight_key", "write_durably", "write_latest",
]  # fmt: skip

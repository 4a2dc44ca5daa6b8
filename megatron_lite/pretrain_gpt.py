"""Pretrain a GPT with Megatron-LM's flags.

    torchrun --nproc_per_node=4 -m megatron_lite.pretrain_gpt \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \\
        --num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 256 \\
        --micro-batch-size 4 --global-batch-size 32 --train-iters 200 --lr 6e-4 \\
        --data-path corpus_text_document --tokenizer-type GPT2BPETokenizer \\
        --vocab-file vocab.json --merge-file merges.txt --save ckpt --save-interval 100

Started by torchrun (RANK/WORLD_SIZE/...), by `srun` without torchrun (SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID, master address from the node list), or as one plain process. Bad input (flags, files,
checkpoints, data) ends the run with one `error: ...` line from one rank and exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from megatron_lite.arguments import parse_args
from megatron_lite.cli import run_main
from megatron_lite.config import Config, ConfigError

TOKENIZER_ARGS = ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size")


def with_checkpoint_args(cfg: Config) -> Config:
    """--use-checkpoint-args: the model settings of the --load checkpoint, and its tokenizer when
    the command line names none."""
    # lazy (as in main): bad flags fail fast, before torch and the model code are imported
    from megatron_lite.checkpointing import CHECKPOINT_MODEL_ARGS
    from megatron_lite.checkpointing.hf_reader import open_checkpoint

    if cfg.checkpoint.load is None:
        raise ConfigError("--use-checkpoint-args needs --load")
    saved = open_checkpoint(cfg.checkpoint.load).config
    d = cfg.to_dict()
    copied = ("seq_length", *CHECKPOINT_MODEL_ARGS)  # as Megatron's load_args_from_checkpoint
    d["model"].update({k: saved["model"][k] for k in copied if k in saved["model"]})
    if cfg.data.tokenizer_type is None:
        d["data"].update({k: saved["data"].get(k) for k in TOKENIZER_ARGS})
    new = Config.from_dict(d)
    changed = [
        f"{f.name}={getattr(new.model, f.name)}"
        for f in dataclasses.fields(new.model)
        if getattr(new.model, f.name) != getattr(cfg.model, f.name)
    ]
    if os.environ.get("RANK", "0") == "0":
        print(
            f"> --use-checkpoint-args: from {cfg.checkpoint.load}: {', '.join(changed) or 'no change'}"
        )
    return new


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv, prog="python -m megatron_lite.pretrain_gpt")
    if cfg.checkpoint.use_checkpoint_args:
        cfg = with_checkpoint_args(cfg)
    if cfg.train.train_iters is None and cfg.train.train_samples is None:
        raise ConfigError("give --train-iters or --train-samples")
    if not (cfg.data.mock_data or cfg.data.data_path or cfg.data.train_data_path):
        raise ConfigError(
            "give --data-path PREFIX (from tools/preprocess_data.py), --train-data-path "
            "PREFIX, or --mock-data"
        )
    # lazy: bad flags (above) fail fast, before torch and the model code are imported
    from megatron_lite import training
    from megatron_lite.evaluation.pretraining import check_eval_tasks, report_tasks

    check_eval_tasks(cfg)  # a bad --eval-tasks (name, file) fails before training starts
    # downstream eval during training: a hook the loop calls (training never imports evaluation)
    training.pretrain(cfg, eval_hooks=[report_tasks] if cfg.train.eval_tasks else [])
    training.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

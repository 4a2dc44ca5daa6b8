"""Pretrain a GPT with Megatron-LM's flags.

    torchrun --nproc_per_node=4 -m megatron_lite.pretrain_gpt \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \\
        --num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 256 \\
        --micro-batch-size 4 --global-batch-size 32 --train-iters 200 --lr 6e-4 \\
        --data-path corpus_text_document --tokenizer-type GPT2BPETokenizer \\
        --vocab-file vocab.json --merge-file merges.txt --save ckpt --save-interval 100

Started by torchrun (RANK/WORLD_SIZE/...), by `srun` without torchrun (SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID, master address from the node list), or as one plain process.
"""

from __future__ import annotations

import sys

from megatron_lite.arguments import parse_args


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv, prog="python -m megatron_lite.pretrain_gpt")
    if cfg.train.train_iters is None and cfg.train.train_samples is None:
        print("error: give --train-iters or --train-samples", file=sys.stderr)
        return 2
    if not (cfg.data.mock_data or cfg.data.data_path or cfg.data.train_data_path):
        print(
            "error: give --data-path PREFIX (from tools/preprocess_data.py), --train-data-path "
            "PREFIX, or --mock-data",
            file=sys.stderr,
        )
        return 2
    from megatron_lite import training

    training.pretrain(cfg)
    training.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

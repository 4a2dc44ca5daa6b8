"""Estimate per-GPU memory, FLOPs, pipeline bubble and the best layouts of a megatron_lite run.

    python tools/estimate.py --num-layers 24 --hidden-size 1024 --num-attention-heads 16 \\
        --seq-length 1024 --max-position-embeddings 1024 --micro-batch-size 4 \\
        --global-batch-size 512 --bf16 --vocab-size 50257 --world-size 64 --search

Takes the flags of `python -m megatron_lite.pretrain_gpt` (same meaning, same validation) plus
the cluster (--world-size, --gpu-memory-gb, --gpus-per-node, bandwidths); see README,
"Estimating memory and throughput".
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.estimate.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

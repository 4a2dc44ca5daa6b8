#!/usr/bin/env bash
# One node, 8 GPUs: tp=2 x pp=2 x dp=2, bf16, distributed optimizer, GPT-2 345M-like shape.
#   bash examples/pretrain_gpt_single_node.sh DATA_PREFIX VOCAB_JSON MERGES_TXT CHECKPOINT_DIR
set -euo pipefail
DATA=${1:?data prefix (from tools/preprocess_data.py)}; VOCAB=${2:?vocab.json}; MERGES=${3:?merges.txt}
CKPT=${4:-checkpoints/gpt345m}
GPUS=${GPUS:-8}

torchrun --nproc_per_node="$GPUS" -m megatron_lite.pretrain_gpt \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
  --num-layers 24 --hidden-size 1024 --num-attention-heads 16 --seq-length 1024 \
  --max-position-embeddings 1024 --micro-batch-size 4 --global-batch-size 256 \
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000 --train-iters 500000 \
  --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --bf16 \
  --use-distributed-optimizer --overlap-grad-reduce --sequence-parallel \
  --data-path "$DATA" --split 969,30,1 --tokenizer-type GPT2BPETokenizer \
  --vocab-file "$VOCAB" --merge-file "$MERGES" \
  --save "$CKPT" --load "$CKPT" --save-interval 1000 --exit-signal-handler \
  --log-interval 10 --eval-interval 1000 --eval-iters 10 --tensorboard-dir "$CKPT/tensorboard"

#!/usr/bin/env bash
# GPT-2 345M pretraining on one node with torchrun: GPUS_PER_NODE ranks as tp x pp x dp, bf16,
# distributed optimizer, sequence parallelism.
#
#   DATA_PATH=data/my-corpus_text_document VOCAB_FILE=gpt2/vocab.json MERGE_FILE=gpt2/merges.txt \
#   CHECKPOINT_PATH=runs/gpt-345m bash examples/pretrain_gpt_single_node.sh
#
# Required (checked before anything starts): DATA_PATH (prefix of PREFIX.bin/.idx from
#   tools/preprocess_data.py), VOCAB_FILE, MERGE_FILE, CHECKPOINT_PATH (saved to and resumed from).
# Optional, defaults below: GPUS_PER_NODE, TP, PP (dp = GPUS_PER_NODE / (TP x PP)), the model shape,
#   batch sizes, TRAIN_ITERS, LR/MIN_LR/LR_WARMUP_ITERS, PRECISION (bf16 | fp16 | fp32), intervals,
#   EXTRA_ARGS (more pretrain_gpt flags, last so they win).
# Running it again resumes from the latest checkpoint in CHECKPOINT_PATH; TensorBoard logs go to
# $CHECKPOINT_PATH/tensorboard. Several nodes: pretrain_gpt_multinode.sbatch.
set -euo pipefail
EXAMPLE=pretrain_gpt_single_node.sh

: "${GPUS_PER_NODE:=8}" "${TP:=2}" "${PP:=2}"
: "${NUM_LAYERS:=24}" "${HIDDEN_SIZE:=1024}" "${NUM_ATTENTION_HEADS:=16}" "${SEQ_LENGTH:=1024}"
: "${MICRO_BATCH_SIZE:=4}" "${GLOBAL_BATCH_SIZE:=256}" "${TRAIN_ITERS:=500000}"
: "${LR:=3e-4}" "${MIN_LR:=3e-5}" "${LR_WARMUP_ITERS:=2000}" "${PRECISION:=bf16}"
: "${SAVE_INTERVAL:=1000}" "${LOG_INTERVAL:=10}" "${EVAL_INTERVAL:=1000}" "${EVAL_ITERS:=10}"

# shellcheck source=examples/_launch_common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/_launch_common.sh"
require_paths gpt
check_layout 1
build_args gpt

echo "$EXAMPLE: $GPUS_PER_NODE ranks = tp $TP x pp $PP x dp $DP, checkpoints $CHECKPOINT_PATH"
torchrun --standalone --nproc_per_node="$GPUS_PER_NODE" -m megatron_lite.pretrain_gpt "${ARGS[@]}"

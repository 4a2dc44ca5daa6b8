# shellcheck shell=bash
# Shared by the launch examples (sourced, never run): checks of the variables a user sets, the
# pretrain_gpt flags they map to, and the SLURM launch (srun + one torchrun agent per node).
# An example sets EXAMPLE (its name, for messages) and its model's defaults, then calls, in order:
#   require_paths gpt|llama; check_layout NODES; build_args gpt|llama; then
#   torchrun ... -m megatron_lite.pretrain_gpt "${ARGS[@]}"   or   slurm_launch.
# Every check runs before anything is launched, so a wrong variable fails in a second, not after
# a torch import on every node. `bash SCRIPT.sbatch` with the job's variables runs the checks
# before queueing: with every variable right it stops at "not inside a SLURM job".

die() {
  echo "$EXAMPLE: $*" >&2
  exit 2
}

# Run the checkout these scripts belong to, installed or not.
MEGATRON_LITE_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$MEGATRON_LITE_DIR${PYTHONPATH:+:$PYTHONPATH}"

# --- paths ---------------------------------------------------------------------------------------

require_file() { # VAR WHAT: $VAR names an existing file
  local var=$1 what=$2
  [ -n "${!var:-}" ] || die "$var is not set: it must name $what"
  [ -f "${!var}" ] || die "$var=${!var}: no such file (expected $what)"
}

require_data_prefix() { # DATA_PATH: one prefix, or Megatron's blend "W1 PREFIX1 W2 PREFIX2 ..."
  local words word ext
  [ -n "${DATA_PATH:-}" ] || die "DATA_PATH is not set: it must name the prefix that" \
    "tools/preprocess_data.py wrote (PREFIX.bin + PREFIX.idx, e.g. data/my-corpus_text_document)"
  read -ra words <<<"$DATA_PATH"
  for word in "${words[@]}"; do
    [[ $word =~ ^[0-9]*\.?[0-9]+$ ]] && continue # a blend weight
    for ext in bin idx; do
      [ -f "$word.$ext" ] || die "DATA_PATH=$DATA_PATH: $word.$ext not found (DATA_PATH is the" \
        "prefix tools/preprocess_data.py wrote, without .bin/.idx)"
    done
  done
}

require_checkpoint_dir() { # CHECKPOINT_PATH: saved to and loaded from; created, but not its parent
  [ -n "${CHECKPOINT_PATH:-}" ] || die "CHECKPOINT_PATH is not set: it must name the directory" \
    "checkpoints are saved to and resumed from (created if missing; its parent must exist)"
  local parent
  parent=$(dirname -- "$CHECKPOINT_PATH")
  [ -d "$parent" ] || die "CHECKPOINT_PATH=$CHECKPOINT_PATH: parent directory $parent does not exist"
  mkdir -p -- "$CHECKPOINT_PATH"
}

require_paths() { # gpt | llama: the data, the tokenizer files of that flavour, the checkpoint dir
  require_data_prefix
  if [ "$1" = llama ]; then
    [ -n "${TOKENIZER_MODEL:-}" ] || die "TOKENIZER_MODEL is not set: it must name a SentencePiece" \
      "model (tools/train_tokenizer.py writes tokenizer.model) or a HuggingFace tokenizer directory"
    if [ -d "$TOKENIZER_MODEL" ]; then
      [ -f "$TOKENIZER_MODEL/tokenizer.json" ] || [ -f "$TOKENIZER_MODEL/tokenizer_config.json" ] ||
        die "TOKENIZER_MODEL=$TOKENIZER_MODEL: a directory without tokenizer.json or" \
          "tokenizer_config.json (expected a HuggingFace tokenizer directory)"
    else
      require_file TOKENIZER_MODEL "a SentencePiece model or a HuggingFace tokenizer directory"
    fi
  else
    require_file VOCAB_FILE "a GPT-2 BPE vocab.json"
    require_file MERGE_FILE "a GPT-2 BPE merges.txt"
  fi
  require_checkpoint_dir
}

# --- layout --------------------------------------------------------------------------------------

require_int() { # VAR: a positive integer
  [[ ${!1:-} =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, not '${!1:-}'"
}

check_layout() { # NODES: sets DP = NODES x GPUS_PER_NODE / (TP x PP), refusing a remainder
  local var world
  for var in GPUS_PER_NODE TP PP MICRO_BATCH_SIZE GLOBAL_BATCH_SIZE TRAIN_ITERS; do
    require_int "$var"
  done
  world=$(($1 * GPUS_PER_NODE))
  if ((world % (TP * PP) != 0)); then
    die "the world size ($world GPUs) must be divisible by TP x PP ($TP x $PP = $((TP * PP)));" \
      "change GPUS_PER_NODE, TP or PP"
  fi
  DP=$((world / (TP * PP)))
  if ((GLOBAL_BATCH_SIZE % (MICRO_BATCH_SIZE * DP) != 0)); then
    die "GLOBAL_BATCH_SIZE ($GLOBAL_BATCH_SIZE) must be divisible by MICRO_BATCH_SIZE x DP" \
      "($MICRO_BATCH_SIZE x $DP)"
  fi
}

# --- pretrain_gpt flags --------------------------------------------------------------------------

build_args() { # gpt | llama: ARGS, every flag of the run (EXTRA_ARGS last, so they win)
  local data extra
  read -ra data <<<"$DATA_PATH"
  read -ra extra <<<"${EXTRA_ARGS:-}"
  ARGS=(
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN_SIZE"
    --num-attention-heads "$NUM_ATTENTION_HEADS" --seq-length "$SEQ_LENGTH"
    --max-position-embeddings "$SEQ_LENGTH"
    --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
    --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine
    --lr-warmup-iters "$LR_WARMUP_ITERS" --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0
    --use-distributed-optimizer --overlap-grad-reduce --sequence-parallel
    --data-path "${data[@]}" --split "969,30,1"
    --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --save-interval "$SAVE_INTERVAL"
    --exit-signal-handler --tensorboard-dir "$CHECKPOINT_PATH/tensorboard"
    --log-interval "$LOG_INTERVAL" --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS"
  )
  case "${PRECISION:-}" in
  bf16 | fp16) ARGS+=("--$PRECISION") ;;
  fp32) ;;
  *) die "PRECISION must be bf16, fp16 or fp32, not '${PRECISION:-}'" ;;
  esac
  if [ "$1" = llama ]; then # Llama: rope, RMSNorm, SwiGLU, no biases, untied output, GQA
    ARGS+=(
      --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear
      --untie-embeddings-and-output-weights --group-query-attention
      --num-query-groups "$NUM_QUERY_GROUPS" --ffn-hidden-size "$FFN_HIDDEN_SIZE"
      --hidden-dropout 0 --attention-dropout 0
    )
    if [ -d "$TOKENIZER_MODEL" ]; then # e.g. Llama 3's tokenizer.json
      ARGS+=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
    else
      ARGS+=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
    fi
  else # GPT-2: learned positions, LayerNorm, GeLU, biases, tied output
    ARGS+=(--tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE")
  fi
  ARGS+=("${extra[@]}")
}

# --- SLURM ---------------------------------------------------------------------------------------

slurm_launch() { # one torchrun agent per node, c10d rendezvous on the first node; then maybe requeue
  local master port log rc latest
  [ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job: submit this script with sbatch"
  master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  mkdir -p "$CHECKPOINT_PATH/logs"
  log=$CHECKPOINT_PATH/logs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}-restart${SLURM_RESTART_COUNT:-0}.log
  echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES nodes" \
    "($SLURM_JOB_NODELIST) x $GPUS_PER_NODE = tp $TP x pp $PP x dp $DP, master $master:$port," \
    "checkpoints $CHECKPOINT_PATH, log $log" | tee -a "$log"
  # The agent ignores SIGTERM (trap + no SIGTERM in --signals-to-handle): SLURM signals every process
  # of the step before the time limit, so the ranks get it directly, save at the next iteration and
  # exit 0 (--exit-signal-handler); a forwarding agent would exit 1 at once and srun
  # --kill-on-bad-exit would kill the other nodes' ranks before they saved. Ranks inherit the ignore;
  # the handler replaces it. See README "Multi-node and SLURM".
  set +e
  srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" \
    bash -c 'trap "" TERM; exec "$@"' agent \
    torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$master:$port" \
    --signals-to-handle=SIGINT,SIGHUP,SIGQUIT \
    -m megatron_lite.pretrain_gpt "${ARGS[@]}" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  set -e
  latest=$(cat "$CHECKPOINT_PATH/latest_checkpointed_iteration.txt" 2>/dev/null || echo 0)
  echo "training exited $rc; latest checkpoint: iteration $latest of $TRAIN_ITERS" | tee -a "$log"
  # Opt-in: a run that stopped cleanly before the end (SIGTERM before the time limit) goes back into
  # the queue under the same job id and resumes from --load. A failing run is never requeued.
  if [ "$rc" = 0 ] && [ "${AUTO_REQUEUE:-0}" = 1 ] && ((latest < TRAIN_ITERS)); then
    echo "AUTO_REQUEUE: requeueing job $SLURM_JOB_ID" | tee -a "$log"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$rc"
}

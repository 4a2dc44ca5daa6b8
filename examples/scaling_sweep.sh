#!/usr/bin/env bash
# A small scaling-law sweep on CPU, end to end and offline: corpus -> tokenizer -> .bin/.idx -> one
# short pretraining run per model size, each evaluated on the validation split every EVAL_INTERVAL
# iterations (each evaluation is one (N, D, loss) point), then tools/scaling_laws.py fits
# L(N, D) = E + A/N^alpha + B/D^beta to them.
#
#   bash examples/scaling_sweep.sh                  # OUT=sweep_out SIZES="16 32 48 64 96": ~2 min
#   SIZES="32 64 128 256" ITERS=1000 bash examples/scaling_sweep.sh
#
# Each run's directory, $OUT/runs/h<SIZE>, holds args.txt (the pretrain_gpt flags, one per line) and
# train.log; tools/scaling_laws.py --runs reads them (and TensorBoard files under tensorboard/).
# The learning rate is constant after warm-up, so the loss at an intermediate evaluation stands for
# a shorter run (cheap: one run per size instead of one per (size, length)).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-sweep_out}
SIZES=${SIZES:-16 32 48 64 96} # hidden sizes; heads = hidden / 16
LAYERS=${LAYERS:-2}
ITERS=${ITERS:-600}
EVAL_INTERVAL=${EVAL_INTERVAL:-50}
EVAL_ITERS=${EVAL_ITERS:-16}
SEQ=${SEQ:-64}
BATCH=${BATCH:-16}
LR=${LR:-2e-3}
MIN_ITERATION=${MIN_ITERATION:-200} # fit the later evaluations only (past the first transients)
HOLD_OUT=${HOLD_OUT:-h48}           # a size left out of the fit, to see the law predict it
CORPUS_MB=${CORPUS_MB:-2}
VOCAB=${VOCAB:-512}
PY=${PYTHON:-python}
FIT=${FIT:-1} # 0: only train (a caller fits, e.g. with --hold-out)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
mkdir -p "$OUT/data" "$OUT/tokenizer" "$OUT/runs"

if [ ! -s "$OUT/data/corpus.jsonl" ]; then
  $PY tools/make_demo_corpus.py --output "$OUT/data/corpus.jsonl" --max-mb "$CORPUS_MB"
fi
if [ ! -s "$OUT/tokenizer/tokenizer.model" ]; then
  $PY tools/train_tokenizer.py --input "$OUT/data/corpus.jsonl" \
    --tokenizer-type SentencePieceTokenizer --vocab-size "$VOCAB" --output-dir "$OUT/tokenizer"
fi
if [ ! -s "$OUT/data/sweep_text_document.idx" ]; then
  $PY tools/preprocess_data.py --input "$OUT/data/corpus.jsonl" --output-prefix "$OUT/data/sweep" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer/tokenizer.model" \
    --append-eod --workers 1
fi

for H in $SIZES; do
  RUN=$OUT/runs/h$H
  if [ -e "$RUN/done" ]; then
    echo "h$H: done before ($RUN/train.log)"
    continue
  fi
  mkdir -p "$RUN"
  ARGS=(
    --num-layers "$LAYERS" --hidden-size "$H" --num-attention-heads $((H / 16 > 0 ? H / 16 : 1))
    --seq-length "$SEQ" --max-position-embeddings "$SEQ"
    --micro-batch-size "$BATCH" --global-batch-size "$BATCH"
    --lr "$LR" --lr-decay-style constant --lr-warmup-iters 10 --clip-grad 1.0
    --hidden-dropout 0 --attention-dropout 0 --seed 1234 --train-iters "$ITERS" --split "95,5,0"
    --data-path "$OUT/data/sweep_text_document" --tokenizer-type SentencePieceTokenizer
    --tokenizer-model "$OUT/tokenizer/tokenizer.model"
    --log-interval "$EVAL_INTERVAL" --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS"
    --tensorboard-dir "$RUN/tensorboard"
  )
  printf '%s\n' "${ARGS[@]}" >"$RUN/args.txt"
  echo "h$H: training ($ITERS iterations)"
  if ! $PY -m megatron_lite.pretrain_gpt "${ARGS[@]}" >"$RUN/train.log" 2>&1; then
    tail -n 20 "$RUN/train.log" >&2
    echo "scaling_sweep.sh: the h$H run failed; see $RUN/train.log" >&2
    exit 1
  fi
  touch "$RUN/done"
done

if [ "$FIT" = 1 ]; then
  $PY tools/scaling_laws.py --runs "$OUT"/runs/h* --min-iteration "$MIN_ITERATION" \
    ${HOLD_OUT:+--hold-out "$HOLD_OUT"} --budget-flops 1e15 --json "$OUT/law.json"
fi

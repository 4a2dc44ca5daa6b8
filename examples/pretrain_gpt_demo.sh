#!/usr/bin/env bash
# The CPU demo, end to end and offline: corpus -> tokenizer -> .bin/.idx -> 4-rank tp=2 x pp=2
# pretraining with checkpoints, TensorBoard and evaluation. `make demo` runs it inside .venv.
#
#   bash examples/pretrain_gpt_demo.sh            # OUT=demo_out ITERS=500 by default
#
# Every step is a command you can also run by hand; the output directory holds everything.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo_out}
ITERS=${ITERS:-500}
NPROC=${NPROC:-4}            # tp 2 x pp 2 x dp (NPROC / 4)
CORPUS_MB=${CORPUS_MB:-4}
VOCAB=${VOCAB:-4096}
PY=${PYTHON:-python}
mkdir -p "$OUT/data" "$OUT/tokenizer"

step() { printf '\n== %s\n' "$*"; }

if [ ! -s "$OUT/data/corpus.jsonl" ]; then
  step "1/5 demo corpus from the Python standard library (no download)"
  $PY tools/make_demo_corpus.py --output "$OUT/data/corpus.jsonl" --max-mb "$CORPUS_MB"
fi
if [ ! -s "$OUT/tokenizer/merges.txt" ]; then
  step "2/5 training a byte-level BPE tokenizer ($VOCAB tokens)"
  $PY tools/train_tokenizer.py --input "$OUT/data/corpus.jsonl" --tokenizer-type GPT2BPETokenizer \
    --vocab-size "$VOCAB" --output-dir "$OUT/tokenizer"
fi
if [ ! -s "$OUT/data/demo_text_document.idx" ]; then
  step "3/5 preprocess_data.py -> Megatron .bin/.idx"
  $PY tools/preprocess_data.py --input "$OUT/data/corpus.jsonl" --json-keys text \
    --output-prefix "$OUT/data/demo" --tokenizer-type GPT2BPETokenizer \
    --vocab-file "$OUT/tokenizer/vocab.json" --merge-file "$OUT/tokenizer/merges.txt" \
    --append-eod --workers 2 --log-interval 2000
fi

step "4/5 unigram baseline (what a model that ignores context scores)"
$PY tools/unigram_baseline.py --data-path "$OUT/data/demo_text_document" | tee "$OUT/baseline.txt"

step "5/5 pretraining: torchrun, $NPROC ranks, tp=2 pp=2, gloo on CPU, $ITERS iterations"
OMP_NUM_THREADS=1 torchrun --nproc_per_node="$NPROC" --master_addr=127.0.0.1 \
  --master_port="${MASTER_PORT:-29517}" -m megatron_lite.pretrain_gpt \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \
  --max-position-embeddings 128 --micro-batch-size 4 --global-batch-size 16 \
  --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 20 --weight-decay 0.1 \
  --adam-beta2 0.95 --clip-grad 1.0 --hidden-dropout 0 --attention-dropout 0 \
  --train-iters "$ITERS" --split 90,8,2 \
  --data-path "$OUT/data/demo_text_document" --tokenizer-type GPT2BPETokenizer \
  --vocab-file "$OUT/tokenizer/vocab.json" --merge-file "$OUT/tokenizer/merges.txt" \
  --save "$OUT/checkpoints" --save-interval 100 --tensorboard-dir "$OUT/tensorboard" \
  --log-interval 10 --eval-interval 100 --eval-iters 10 --distributed-timeout-minutes 5 \
  2>&1 | tee "$OUT/train.log"

step "downstream tasks from held-out text (the last documents, which --split 90,8,2 leaves out)"
$PY tools/make_eval_tasks.py --input "$OUT/data/corpus.jsonl" --output-dir "$OUT/eval"
$PY tools/evaluate.py --load "$OUT/checkpoints" --tasks-dir "$OUT/eval" --tasks lambada,choice \
  --context-free-baseline --batch-size 16 --output "$OUT/eval/results.json" | tee "$OUT/eval.txt"

step "done"
echo "corpus:        $OUT/data/corpus.jsonl"
echo "tokenizer:     $OUT/tokenizer/{vocab.json,merges.txt}"
echo "dataset:       $OUT/data/demo_text_document.{bin,idx}"
echo "checkpoints:   $OUT/checkpoints (latest: $(cat "$OUT/checkpoints/latest_checkpointed_iteration.txt"))"
echo "tensorboard:   tensorboard --logdir $OUT/tensorboard"
echo "training log:  $OUT/train.log"
echo "downstream:    $OUT/eval.txt (tools/evaluate.py; TASK:context-free = the choices without context)"
cat "$OUT/baseline.txt"
grep -E "(validation|test) loss at iteration" "$OUT/train.log" | tail -2

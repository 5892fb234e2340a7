#!/usr/bin/env bash
# The runs behind docs/adaptation.md: fine-tune on ../shared/data/sentiment/movies, evaluate through the
# pagellm engine on movies/test and, as transfer, on 1000 seeded tweets. One run at a time (2 cores).
# Finished steps are kept, so a stopped run resumes.  Usage: benchmarks/adaptation.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/sentiment}
OUT=${1:-benchmarks/results/adaptation}
PAGELLM=${PAGELLM:-.venv/bin/pagellm}
mkdir -p "$OUT"
TRAIN="$DATA/movies/train.jsonl"; DEV="$DATA/movies/dev.jsonl"; TEST="$DATA/movies/test.jsonl"
TWEETS="$DATA/tweets/all.jsonl"
COMMON=(--warmup 0.1 --weight-decay 0.01 --dropout 0.1 --seed 0 --no-progress --overwrite)

evaluate() {  # NAME MODEL_ARGS...: movies/test and tweets, each compared with zero-shot
  local name=$1; shift
  local compare=()
  for split in movies tweets; do
    local data=$TEST extra=()
    [ $split = tweets ] && data=$TWEETS && extra=(--max-samples 1000)
    [ "$name" != zeroshot ] && compare=(--compare-to "$OUT/zeroshot.$split.json")
    [ -f "$OUT/$name.$split.json" ] || $PAGELLM evaluate "$@" --data "$data" "${extra[@]}" --dtype float32 \
        --no-progress --out-json "$OUT/$name.$split.json" "${compare[@]}" > "$OUT/$name.$split.txt"
  done
}

finetune() {  # NAME FLAGS...
  local name=$1; shift
  [ -f "$OUT/$name/train_report.json" ] || $PAGELLM finetune "$@" --data "$TRAIN" --eval-data "$DEV" \
      "${COMMON[@]}" --out "$OUT/$name" > "$OUT/$name.train.log" 2>&1
}

run_zeroshot() { evaluate zeroshot --model smollm2; }
run_minilm_head() {  # the defaults: mean pooling, features once, lr 1e-3, 10 epochs, batch 32
  finetune minilm_head --model minilm --strategy head
  evaluate minilm_head --model "$OUT/minilm_head"
}
run_minilm_full() {
  finetune minilm_full --model minilm --strategy full --epochs 3 --lr 5e-5 --batch-size 32 --max-length 128 \
      --early-stopping 1
  evaluate minilm_full --model "$OUT/minilm_full"
}
run_smollm2_lora() {
  finetune smollm2_lora --model smollm2 --strategy lora --lora-r 8 --lora-alpha 16 --lr 3e-4 \
      --max-train-samples 2000 --max-eval-samples 200 --epochs 1 --eval-steps 125 --early-stopping 2 \
      --batch-size 8 --max-length 128
  evaluate smollm2_lora --adapter "$OUT/smollm2_lora"
}
run_smollm2_prefix() {
  finetune smollm2_prefix --model smollm2 --strategy prefix --prefix-tokens 20 --lr 1e-2 \
      --max-train-samples 1000 --max-eval-samples 200 --epochs 1 --eval-steps 60 --early-stopping 2 \
      --batch-size 8 --max-length 128
  evaluate smollm2_prefix --adapter "$OUT/smollm2_prefix"
}

for name in ${RUNS:-zeroshot minilm_head minilm_full smollm2_lora smollm2_prefix}; do
  echo "== $name $(date +%T)"
  "run_$name"
done
echo "== done $(date +%T)"

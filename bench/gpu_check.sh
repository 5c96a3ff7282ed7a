#!/usr/bin/env bash
# One short GPU lease for issues 6 and 8 (see bench/gpu_check.py), run from the repo root on the
# GPU machine. Needs the shared data files it reads copied under $SBERT_FLAX_DATA (stsb-zh,
# contrastive/nli-zh-pairs.tsv, vocab) and, where the machine lacks them, grain & co as wheels in
# .whl/. Every log lands in $OUT (default /tmp/gpu_check).
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export SBERT_FLAX_DATA=${SBERT_FLAX_DATA:-$PWD/.devdata} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
if [ -z "${NO_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv | tee "$OUT/smi.txt"
python3 -c 'import jax, flax, torch, sentence_transformers as s; print("jax", jax.__version__, "flax", flax.__version__, "torch", torch.__version__, "st", s.__version__, jax.devices())' | tee -a "$OUT/smi.txt"
M=${MODEL:-$(python3 -c 'import sys; sys.path.insert(0, "bench"); from common import bert_base_dir; print(bert_base_dir())' 2>>"$OUT/smi.txt")}
# 8 copies of the 6,719 pairs: one epoch holds every step of the run (no epoch-end checkpoint in the window).
P=/tmp/pairs-x8.tsv
head -1 "$SBERT_FLAX_DATA/contrastive/nli-zh-pairs.tsv" > $P
for _ in 1 2 3 4 5 6 7 8; do tail -n +2 "$SBERT_FLAX_DATA/contrastive/nli-zh-pairs.tsv" >> $P; done

if [ -z "${SKIP_ENCODE:-}" ]; then
  timeout ${ENCODE_TIMEOUT:-200} python3 bench/gpu_check.py encode --model "$M" --repeat 8 --passes 2 ${ENCODE_ARGS:-} > "$OUT/encode.log" 2>&1
  tail -14 "$OUT/encode.log"
fi
for B in ${TRAIN_BATCHES:-64 512}; do
  timeout ${TRAIN_TIMEOUT:-110} python3 -m sbert_flax.cli train --loss mnrl --pretrained_model_path "$M" --train_path $P \
    --batch_size $B --learning_rate 2e-5 --epochs_num 1 --seq_length 64 --warmup 0.1 --seed 7 --bf16 \
    --max_steps 50 --log_every_steps 10 --no_export --no_progress_bar --output_dir /tmp/run$B > "$OUT/flax-train-$B.log" 2>&1
  cp /tmp/run$B/metrics.jsonl "$OUT/metrics-$B.jsonl" 2>/dev/null
  echo "sbert-flax mnrl bf16 batch $B:"; grep '"train"' /tmp/run$B/metrics.jsonl 2>/dev/null | cut -c1-400 || tail -5 "$OUT/flax-train-$B.log"
  timeout ${ST_TIMEOUT:-60} python3 bench/gpu_check.py train-st --model "$M" --batch-size $B --steps 50 --autocast bfloat16 ${ST_ARGS:-} > "$OUT/st-train-$B.log" 2>&1
  tail -1 "$OUT/st-train-$B.log"
done

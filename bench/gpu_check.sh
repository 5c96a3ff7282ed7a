#!/usr/bin/env bash
# One GPU lease for issue 16, item 4 (see bench/gpu_check.py): bf16 encode at three token budgets
# and the MNRL train step (batch 256 / 1024, seq 128, attention xla vs cudnn), each profiled,
# into $OUT/gpu-<date>.json, rewritten after every measurement. Whole run: about 6 minutes.
#
#   OUT=/tmp/out bash bench/gpu_check.sh            # on the GPU machine, from the repo root
#   OUT=/tmp/out bash bench/gpu_check.sh --dry-run  # tiny sizes on a CPU (CI runs it; no time limits)
#
# Data comes from $SBERT_FLAX_DATA (default ./.devdata: stsb-zh/test.tsv,
# contrastive/nli-zh-pairs.tsv, vocab/google_zh_vocab.txt). Wheels, when carried in .whl/, are
# installed by the caller into /tmp/site and put first on PYTHONPATH; if the preflight fails with
# them, the run falls back to the machine's own packages. Per-part limits: PREFLIGHT_TIMEOUT,
# ENCODE_TIMEOUT, TRAIN_TIMEOUT, ST_TIMEOUT (seconds); SKIP_ST=1 drops the sentence-transformers
# part, which also drops itself once the run is ST_LATEST (330) seconds old. GIT_COMMIT names the
# commit where the copy has no .git.
set -u
DRY=""
[ "${1:-}" = "--dry-run" ] && DRY=--dry-run
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export SBERT_FLAX_DATA=${SBERT_FLAX_DATA:-$PWD/.devdata} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
case ":${PYTHONPATH:-}:" in *":$PWD:"*) ;; *) export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD ;; esac
if [ -n "$DRY" ]; then
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  MODEL=${MODEL:-/tmp/gpu_check_model_dry}
  # The dry run proves the script, not a lease's timing: every part runs whole however slow the
  # machine (CI on a loaded 2-core host), so the limits are only ceilings against a hang, and
  # nothing is skipped for time.
  : "${PREFLIGHT_TIMEOUT:=900}" "${ENCODE_TIMEOUT:=900}" "${TRAIN_TIMEOUT:=900}" "${ST_TIMEOUT:=900}"
  : "${ST_LATEST:=1000000}"
else
  MODEL=${MODEL:-/tmp/gpu_check_model}
  # A rerun on the same (still warm) machine loads the compiled programs instead of recompiling.
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/gpu_check_jax_cache}
  : "${PREFLIGHT_TIMEOUT:=50}" "${ENCODE_TIMEOUT:=160}" "${TRAIN_TIMEOUT:=220}" "${ST_TIMEOUT:=40}"
fi
J="$OUT/gpu-$(date -u +%F).json"
rm -f "$J"
PY="python3 bench/gpu_check.py"

# part NAME TIMEOUT ARGS...: runs one part under `timeout` (its python gets a budget 10 s shorter,
# so it skips what no longer fits and exits cleanly), prints and records its wall time.
part() {
  local name=$1 limit=$2
  shift 2
  local t0 rc wall
  t0=$(date +%s.%N)
  echo "=== $name (limit ${limit}s; ${SECONDS}s into the run) ==="
  timeout -k 5 "$limit" $PY "$name" --json "$J" --model "$MODEL" --budget-s $((limit - 10)) $DRY "$@"
  rc=$?
  wall=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t0" "$(date +%s.%N)")
  echo "=== $name: ${wall}s, rc $rc ==="
  $PY record-step --json "$J" --part "$name" --wall-s "$wall" --rc "$rc"
  return $rc
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
if ! part preflight "$PREFLIGHT_TIMEOUT"; then
  case ":${PYTHONPATH}:" in
    *":/tmp/site:"*)
      echo "preflight failed with the carried wheels (/tmp/site); again with the machine's own packages"
      export PYTHONPATH=$PWD
      part preflight "$PREFLIGHT_TIMEOUT" || exit 1 ;;
    *) exit 1 ;;
  esac
fi
part encode "$ENCODE_TIMEOUT"
part train "$TRAIN_TIMEOUT"
# The sentence-transformers side is optional: only while the run is still under ST_LATEST seconds.
if [ -n "${SKIP_ST:-}" ]; then
  echo "=== st-encode: skipped (SKIP_ST) ==="
elif [ "$SECONDS" -gt "${ST_LATEST:-330}" ]; then
  echo "=== st-encode: skipped, ${SECONDS}s gone (ST_LATEST=${ST_LATEST:-330}) ==="
else
  part st-encode "$ST_TIMEOUT"
fi
echo "=== summary ($SECONDS s in all) ==="
$PY summary --json "$J"
echo "results: $J"

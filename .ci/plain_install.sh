#!/usr/bin/env bash
# The plain install as a new user gets it: a fresh virtualenv, `pip install .` with no extras and
# not editable, then the commands README promises (--help, similarity, encode, convert both ways,
# train) work without torch or the server on a tiny local model, and `serve` exits 2 with one line
# naming the serve extra. Any "Traceback" in any command's output fails the check.
#
#   .ci/plain_install.sh            # the repository this script lives in
#   .ci/plain_install.sh PATH       # another checkout
#
# Uses pip's cache and index settings as they are; needs no network when the cache (or a local
# wheel directory) holds the dependencies. On 2 cores: 45 s idle (about 30 s of it pip), 80-85 s
# beside a test run.
set -euo pipefail

repo=$(cd "${1:-$(dirname "$0")/..}" && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/sbert-flax-plain.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
fail() { echo "plain install: FAIL: $*" >&2; exit 1; }

# Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
mkdir "$tmp/src"
tar -C "$repo" --exclude=__pycache__ --exclude='*.egg-info' -cf - pyproject.toml README.md sbert_flax \
  | tar -C "$tmp/src" -xf -

python -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
# pip prints one warning per absent local index directory; only its errors matter here.
# --no-compile: byte-compiling jax and transformers is half the install time, and the commands
# below run each module once.
# -c constraints.txt: the same releases as the test environment, so the check's verdict does not
# depend on what the index serves today (the dependency ranges in pyproject are what users get).
"$py" -m pip install -q --no-compile -c "$repo/constraints.txt" "$tmp/src" 2>&1 | { grep -v '^WARNING: Location .* is ignored' || true; }
[ -x "$tmp/venv/bin/sbert-flax" ] || fail "pip install did not install the sbert-flax script"

# The point of the check: none of the optional packages came with the plain install
# (prometheus_client does: orbax-checkpoint requires it).
for mod in torch fastapi uvicorn sentence_transformers; do
  if "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)"; then
    fail "$mod is installed in the plain virtualenv; the check would prove nothing"
  fi
done

# Hermetic: no hub, no compilation cache in ~/.cache, quiet about transformers' missing torch
# (a warning transformers prints on import, not ours).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SBERT_FLAX_COMPILATION_CACHE=0 \
  TRANSFORMERS_VERBOSITY=error JAX_PLATFORMS=cpu
"$py" "$repo/tests/make_tiny_model.py" "$tmp/model" >/dev/null
model="$tmp/model"
printf '那个人很开心\n那只猫很开心\n\n今天天气很好。\n' >"$tmp/lines.txt"
printf 'anchor\tpositive\n那个人很开心\t那个人非常开心\n那只猫很开心\t今天天气很好。\n' >"$tmp/pairs.tsv"
echo "plain install: installed in ${SECONDS} s"

n=0
# run EXPECTED_RC CMD...: runs `sbert-flax CMD...`, keeps its output in $tmp/out.N, fails on a
# different exit code or on a traceback.
run() {
  local want=$1; shift
  n=$((n + 1))
  local out="$tmp/out.$n" rc=0
  "$tmp/venv/bin/sbert-flax" "$@" >"$out" 2>&1 || rc=$?
  if grep -q Traceback "$out"; then
    cat "$out" >&2; fail "sbert-flax $1 printed a traceback"
  fi
  if [ "$rc" != "$want" ]; then
    cat "$out" >&2; fail "sbert-flax $1 exited $rc, expected $want"
  fi
  echo "plain install: ok: sbert-flax $1 (exit $rc, at ${SECONDS} s)"
  last="$out"
}

run 0 --help
grep -q serve "$last" || fail "--help does not list serve"
run 0 similarity --model "$model" "那个人很开心" "那个人非常开心" "那只猫很开心"
[ "$(grep -c "$(printf '\t')" "$last")" = 2 ] || { cat "$last" >&2; fail "similarity: expected 2 scores"; }
run 0 encode --model "$model" --input "$tmp/lines.txt" --output "$tmp/emb.npy" --no-progress
"$py" -c "import numpy as np, sys; a = np.load(sys.argv[1]); assert a.shape == (4, 32), a.shape" \
  "$tmp/emb.npy" || fail "encode wrote the wrong shape"
run 0 convert "$model" "$tmp/flax"
run 0 convert "$tmp/flax" "$tmp/st" --to pytorch
[ -f "$tmp/st/model.safetensors" ] || fail "convert --to pytorch wrote no model.safetensors"
# README: the plain install also trains (one step of the smallest run, and its export).
run 0 train --loss mnrl --pretrained_model_path "$model" --train_path "$tmp/pairs.tsv" \
  --batch_size 2 --max_steps 1 --seq_length 16 --output_dir "$tmp/run" --no_progress_bar
[ -f "$tmp/run/best_model_pytorch/model.safetensors" ] || fail "train exported no model"
run 2 serve --model "$model"
# Exactly one line, naming the extra to install.
[ "$(wc -l <"$last")" = 1 ] || { cat "$last" >&2; fail "serve: expected one line of output"; }
grep -qF 'pip install "sbert-flax[serve]"' "$last" || { cat "$last" >&2; fail "serve: the line does not name the serve extra"; }
echo "plain install: all commands passed (${SECONDS} s)"

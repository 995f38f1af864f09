#!/usr/bin/env bash
# Numerical faults (issue 18 item 4): a NaN or an Inf in a loaded weight, in a
# gradient, in an activation or in a weight after an update is detected at the
# step where it appears, named, and ends the job with exit 2; no checkpoint
# holding a non-finite value is ever written. Every checkpoint left behind is
# read back whole with h5py (every dataset finite) and verified by dpoc export.
# Faults come from a patched model file and from the DPOC_TEST_INJECT hook.
# usage: test_nonfinite.sh REPO_ROOT DPOC_BINARY
set -euo pipefail
root=${1:?usage: test_nonfinite.sh REPO_ROOT DPOC_BINARY}
dpoc=${2:?usage: test_nonfinite.sh REPO_ROOT DPOC_BINARY}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OPENBLAS_NUM_THREADS=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "test_nonfinite: FAIL: $*" >&2; exit 1; }
cd "$root"
py=/usr/bin/python3

# every checkpoint in DIR: all datasets finite (h5py) and the content hash verifies (dpoc export)
check_checkpoints() {
  local dir=$1 f
  ls -A "$dir" 2>/dev/null | grep -q '\.tmp$' && fail "$dir: temporary files left behind"
  for f in "$dir"/checkpoint-*.h5; do
    [ -e "$f" ] || continue
    $py - "$f" <<'PY' || fail "$f holds a non-finite value"
import sys, h5py, numpy as np
bad = []
def visit(name, obj):
    if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f" and not np.isfinite(obj[()]).all():
        bad.append(name)
with h5py.File(sys.argv[1], "r") as f:
    f.visititems(visit)
if bad:
    print("non-finite datasets:", bad, file=sys.stderr)
    sys.exit(1)
PY
    "$dpoc" export --checkpoint "$f" --out "$tmp/export" --model-dir tests/fixtures/tiny-llama > /dev/null 2>&1 \
      || fail "$f does not verify"
    rm -rf "$tmp/export"
  done
}

# newest checkpoint step in DIR (0: none)
last_step() {
  local s
  s=$( (ls "$1" 2>/dev/null || true) | sed -n 's/^checkpoint-\([0-9]*\)\.h5$/\1/p' | sort -n | tail -1)
  echo "${s:-0}"
}

# case NAME EXPECTED_MESSAGE_REGEX MAX_CHECKPOINT_STEP [NP] [--set ...]: trains 6 steps saving every
# step with DPOC_TEST_INJECT as exported by the caller; must exit 2 naming the fault
case_run() {
  local name=$1 want=$2 max_step=$3 np=$4; shift 4
  local out="$tmp/$name" rc=0
  mpirun -np "$np" "$dpoc" train --config configs/tiny-llama.json --set per_device_train_batch_size=1 \
    --set max_steps=6 --set save_steps=1 --set output_dir="$out" "$@" > "$tmp/$name.log" 2>&1 || rc=$?
  [ "$rc" = 2 ] || { cat "$tmp/$name.log" >&2; fail "$name: exit code $rc, expected 2"; }
  grep -Eq "$want" "$tmp/$name.log" || { cat "$tmp/$name.log" >&2; fail "$name: no error matching /$want/"; }
  local last; last=$(last_step "$out")
  [ "${last:-0}" -le "$max_step" ] || fail "$name: checkpoint of step $last written (at most $max_step expected)"
  check_checkpoints "$out"
  echo "test_nonfinite: $name: ok ($(grep -Eo "$want" "$tmp/$name.log" | head -1))"
}

# 1. a NaN in the model file: refused at load, naming the file and the tensor
cp -r tests/fixtures/tiny-llama "$tmp/bad-model"
$py - "$tmp/bad-model/model.safetensors" model.layers.1.mlp.up_proj.weight 7 <<'PY'
import json, struct, sys
path, name, elem = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(path, "r+b") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    info = json.loads(f.read(n))[name]
    assert info["dtype"] == "F32", info
    f.seek(8 + n + info["data_offsets"][0] + 4 * elem)
    f.write(struct.pack("<I", 0x7FC00000))  # a quiet NaN
PY
unset DPOC_TEST_INJECT
case_run load-file "bad-model: weight model.layers.1.mlp.up_proj.weight is not finite \(nan at element 7 of" 0 2 \
  --set model_name_or_path="$tmp/bad-model"
[ -e "$tmp/load-file/checkpoint-1.h5" ] && fail "load-file: trained on a bad model"

# 2. a weight at load (every rank's copy): the first step names it
export DPOC_TEST_INJECT=weight:0:0:model.layers.1.mlp.up_proj.weight
case_run load-hook "training step 1 on rank [01]: the loss is not finite: the policy: weight model.layers.1.mlp.up_proj.weight is not finite \(nan" 0 2

# 3. a gradient (the averaged one every rank holds), stage 0, and Inf at ZeRO stage 2 (the owner's slice)
export DPOC_TEST_INJECT=grad:0:3:model.layers.0.mlp.down_proj.weight
case_run grad "step 3 on rank [01]: the gradient of model.layers.0.mlp.down_proj.weight is not finite \(nan at element 0 of" 2 2
export DPOC_TEST_INJECT=grad:1:3:model.layers.1.self_attn.q_proj.weight:inf
case_run grad-zero2 "step 3 on rank 1: the gradient of model.layers.1.self_attn.q_proj.weight is not finite \(inf at element 0 of" 2 2 \
  --set zero_stage=2

# 4. an activation on one rank: the loss goes NaN, the forward is run again watched and names it
export DPOC_TEST_INJECT=act:1:3:model.layers.0.self_attn.o_proj:inf
case_run act "training step 3 on rank 1: the loss is not finite: the policy's forward output model.layers.0.self_attn.o_proj is \(inf at element 0\)" 2 2
# one that reaches no label (row 0 of the last layer) poisons only the gradients: named from there
export DPOC_TEST_INJECT=act:0:2:model.layers.1.mlp.up_proj:nan
case_run act-1rank "step 2 on rank 0: the gradient of [a-z_.0-9]+ is not finite .*; it comes from the policy's forward output model.layers.1.mlp.up_proj \(nan at element 0\)" 1 1

# 5. a weight going bad after an update, on rank 0 (the writer): that step's checkpoint is refused
export DPOC_TEST_INJECT=weight:0:3:model.norm.weight
case_run after-update "checkpoint-3.h5 not written: the weight model.norm.weight is not finite \(nan at element 0 of" 2 2
# and with ZeRO stage 1 (each rank checks its own slice of the moments, then all agree)
export DPOC_TEST_INJECT=weight:0:4:model.norm.weight:-inf
case_run after-update-zero1 "checkpoint-4.h5 not written: the weight model.norm.weight is not finite \(-inf" 3 2 \
  --set zero_stage=1
echo "test_nonfinite: OK"

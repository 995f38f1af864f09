#!/usr/bin/env bash
# precompute_ref_log_probs: training with reference log-probs computed once (2 ranks,
# each a share of the pairs) logs exactly what training with the reference model in
# memory logs — with a separate reference model and with the starting policy as the
# reference; output_dir/ref_logps.h5 is reused when its fingerprint matches, and
# recomputed when the settings change or the file is damaged.
# usage: test_precompute_ref.sh REPO_ROOT DPOC_BINARY
set -euo pipefail
root=${1:?usage: test_precompute_ref.sh REPO_ROOT DPOC_BINARY}
dpoc=${2:?usage: test_precompute_ref.sh REPO_ROOT DPOC_BINARY}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OPENBLAS_NUM_THREADS=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "test_precompute_ref: FAIL: $*" >&2; exit 1; }
cd "$root"

# run NAME [--set k=v ...]: trains 4 steps into $tmp/NAME, log in $tmp/NAME.log
run() {
  local name=$1; shift
  mpirun -np 2 "$dpoc" train --config configs/tiny-llama.json --set per_device_train_batch_size=1 \
    --set max_steps=4 --set output_dir="$tmp/$name" "$@" > "$tmp/$name.log" 2>&1 \
    || { cat "$tmp/$name.log" >&2; fail "$name: training exited non-zero"; }
}
# the logged metrics without the timing fields
metrics() { python3 -c '
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    for k in ("tokens_per_second", "step_time_s", "comm_time_s", "compute_time_s", "train_runtime", "train_samples_per_second", "train_steps_per_second"):
        r.pop(k, None)
    print(json.dumps(r, sort_keys=True))' "$1/metrics.jsonl"; }

for ref in separate policy; do
  extra=()
  [ "$ref" = policy ] && extra=(--set ref_model_name_or_path=)
  run "$ref-live" "${extra[@]}"
  run "$ref-pre" "${extra[@]}" --set precompute_ref_log_probs=true
  grep -q "reference log-probs of 8 pairs computed" "$tmp/$ref-pre.log" || fail "$ref: no precompute pass logged"
  [ -f "$tmp/$ref-pre/ref_logps.h5" ] || fail "$ref: ref_logps.h5 not written"
  diff <(metrics "$tmp/$ref-live") <(metrics "$tmp/$ref-pre") > "$tmp/diff" || { cat "$tmp/diff" >&2; fail "$ref: metrics differ"; }
done

# reused when it matches (same output_dir, same everything)
run policy-pre --set ref_model_name_or_path= --set precompute_ref_log_probs=true
grep -q "reused from" "$tmp/policy-pre.log" || { cat "$tmp/policy-pre.log" >&2; fail "matching ref_logps.h5 not reused"; }
diff <(metrics "$tmp/policy-live") <(metrics "$tmp/policy-pre") > /dev/null || fail "metrics differ after reuse"
# recomputed when a setting that changes the values differs
run policy-pre --set ref_model_name_or_path= --set precompute_ref_log_probs=true --set max_length=12
grep -q "computed .*made with another" "$tmp/policy-pre.log" || { cat "$tmp/policy-pre.log" >&2; fail "stale file reused"; }
# a damaged file is recomputed and replaced, not an error
head -c 100 "$tmp/policy-pre/ref_logps.h5" > "$tmp/cut" && mv "$tmp/cut" "$tmp/policy-pre/ref_logps.h5"
run policy-pre --set ref_model_name_or_path= --set precompute_ref_log_probs=true --set max_length=12
grep -q "computed .*not a readable HDF5 file" "$tmp/policy-pre.log" || { cat "$tmp/policy-pre.log" >&2; fail "damaged file not recomputed"; }
n=$(sed -n 's/^dpoc: \([0-9]*\) pairs.*/\1/p' "$tmp/policy-pre.log")
/usr/bin/python3 -c 'import h5py, sys; f = h5py.File(sys.argv[1]); assert f["ref_logps"].shape == (int(sys.argv[2]), 2), f["ref_logps"].shape' \
  "$tmp/policy-pre/ref_logps.h5" "$n" || fail "ref_logps.h5 is not an ($n, 2) dataset"
ls -A "$tmp/policy-pre" | grep -q '\.tmp' && fail "temporary files left behind"
echo "test_precompute_ref: OK"

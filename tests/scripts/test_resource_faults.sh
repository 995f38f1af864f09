#!/usr/bin/env bash
# Resource faults (issue 18 item 5), on real file systems (small tmpfs mounts; needs
# root and mount, else skipped with 77):
#  - the output directory fills up mid-run: a clear error (exit 3), the previous
#    checkpoint intact and named by `latest`, no partial file left; with room again,
#    --resume auto ends bitwise equal to an uninterrupted run;
#  - a checkpoint's rename fails (its name taken by a directory): the same;
#  - the output directory becomes read-only in the middle of a checkpoint write
#    (run as an unprivileged user, for whom permissions hold): the same;
#  - the shared-memory window's directory too small: a clear error with
#    grad_allreduce shared (exit 2), MPI averaging with auto; filled up mid-run:
#    nothing happens (the window's pages are reserved at start), the run ends equal.
# usage: test_resource_faults.sh REPO_ROOT DPOC_BINARY
set -euo pipefail
root=${1:?usage: test_resource_faults.sh REPO_ROOT DPOC_BINARY}
dpoc=${2:?usage: test_resource_faults.sh REPO_ROOT DPOC_BINARY}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OPENBLAS_NUM_THREADS=1
tmp=$(mktemp -d)
mounts=()
cleanup() {
  local m
  for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  chmod -R u+w "$tmp" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "test_resource_faults: FAIL: $*" >&2; exit 1; }
cd "$root"
py=/usr/bin/python3
# tmpfs DIR SIZE: a small file system of its own
tmpfs() {
  mkdir -p "$1"
  mount -t tmpfs -o "size=$2,mode=1777" tmpfs "$1" 2>/dev/null || return 1
  mounts+=("$1")
}
if [ "$(id -u)" != 0 ] || ! tmpfs "$tmp/probe" 1m; then
  echo "test_resource_faults: skipped: needs root and tmpfs mounts"
  exit 77
fi

train() { # OUT LOG [args...]: 6 steps of the tiny model on 2 ranks, a checkpoint every step
  local out=$1 log=$2; shift 2
  mpirun -np 2 "$dpoc" train --config configs/tiny-llama.json --set per_device_train_batch_size=1 \
    --set max_steps=6 --set save_steps=1 --set output_dir="$out" "$@" > "$log" 2>&1
}
# the weights of a checkpoint's /model group, compared bitwise
same_model() {
  $py - "$1" "$2" <<'PY' || fail "$2's weights differ from $1's"
import sys, h5py, numpy as np
a, b = (h5py.File(p, "r")["model"] for p in sys.argv[1:3])
assert sorted(a) == sorted(b), (sorted(a), sorted(b))
for k in a:
    assert a[k][()].tobytes() == b[k][()].tobytes(), k
PY
}
verifies() { "$dpoc" export --checkpoint "$1" --out "$tmp/export" --model-dir tests/fixtures/tiny-llama > /dev/null 2>&1 \
  || fail "$1 does not verify"; rm -rf "$tmp/export"; }
# after a failed save of step N: N-1 is intact and latest names it, nothing partial left
intact_before() {
  local out=$1 n=$2
  [ -e "$out/checkpoint-$n.h5" ] && [ ! -d "$out/checkpoint-$n.h5" ] && fail "$out: checkpoint-$n.h5 exists after its failure"
  verifies "$out/checkpoint-$((n - 1)).h5"
  [ "$(cat "$out/latest")" = "checkpoint-$((n - 1)).h5" ] || fail "$out/latest is '$(cat "$out/latest")'"
}
expect_rc() { # CODE LOG REGEX NAME
  [ "$rc" = "$1" ] || { cat "$2" >&2; fail "$4: exit code $rc, expected $1"; }
  grep -Eq "$3" "$2" || { cat "$2" >&2; fail "$4: no error matching /$3/"; }
  echo "test_resource_faults: $4: ok ($(grep -Eo "$3" "$2" | head -1))"
}

# the uninterrupted run everything is compared with
train "$tmp/ref" "$tmp/ref.log" || { cat "$tmp/ref.log" >&2; fail "reference run failed"; }
ckpt_bytes=$(stat -c %s "$tmp/ref/checkpoint-6.h5")

# 1. disk full: room for about two checkpoints and the metrics
tmpfs "$tmp/full" "$((ckpt_bytes * 5 / 2))"
rc=0; train "$tmp/full/out" "$tmp/full.log" || rc=$?
expect_rc 3 "$tmp/full.log" "checkpoint-[0-9]+\.h5: writing the checkpoint failed \(disk full\?\); the previous checkpoints are intact" "disk full"
n=$(grep -Eo 'checkpoint-[0-9]+\.h5: writing the checkpoint failed' "$tmp/full.log" | head -1 | sed 's/checkpoint-\([0-9]*\).*/\1/')
intact_before "$tmp/full/out" "$n"
ls -A "$tmp/full/out" | grep -q '\.tmp$' && fail "disk full: a partial file is left"
mount -o remount,size=64m "$tmp/full"
rc=0; train "$tmp/full/out" "$tmp/full-resume.log" --resume auto || rc=$?
[ "$rc" = 0 ] || { cat "$tmp/full-resume.log" >&2; fail "disk full: resume failed"; }
same_model "$tmp/ref/checkpoint-6.h5" "$tmp/full/out/checkpoint-6.h5"
echo "test_resource_faults: disk full: resumed from checkpoint-$((n - 1)), final weights bitwise equal"

# 2. a rename that fails: checkpoint-3.h5 is taken by a directory
mkdir -p "$tmp/ren/checkpoint-3.h5" && touch "$tmp/ren/checkpoint-3.h5/x"
rc=0; train "$tmp/ren" "$tmp/ren.log" || rc=$?
expect_rc 3 "$tmp/ren.log" "checkpoint-3\.h5: rename failed: [A-Za-z ]+" "rename fails"
intact_before "$tmp/ren" 3
ls -A "$tmp/ren" | grep -q '\.tmp$' && fail "rename fails: a partial file is left"

# 3. read-only mid-write, as an unprivileged user (root ignores permissions): the
# directory loses its write permission while rank 0 is inside checkpoint-3's write
ro=$tmp/ro
mkdir -p "$ro/out" "$ro/home" && chown -R 65534:65534 "$ro" && chmod 755 "$tmp"
rc=0
( cd "$root" && DPOC_TEST_PAUSE_IN_CHECKPOINT=3:3 HOME="$ro/home" TMPDIR="$ro/home" \
  setpriv --reuid=65534 --regid=65534 --clear-groups \
  mpirun -np 2 "$dpoc" train --config configs/tiny-llama.json --set per_device_train_batch_size=1 \
  --set max_steps=6 --set save_steps=1 --set output_dir="$ro/out" > "$ro/log" 2>&1 ) &
pid=$!
for _ in $(seq 300); do grep -q "pausing inside the checkpoint write" "$ro/log" 2>/dev/null && break; sleep 0.1; done
grep -q "pausing inside the checkpoint write" "$ro/log" || { cat "$ro/log" >&2; fail "read-only: the write never paused"; }
chmod 555 "$ro/out"
wait "$pid" || rc=$?
expect_rc 3 "$ro/log" "checkpoint-3\.h5: rename failed: Permission denied" "read-only"
intact_before "$ro/out" 3
grep -q "could not be removed" "$ro/log" || { cat "$ro/log" >&2; fail "read-only: the partial file left is not named"; }
chmod 755 "$ro/out"

# 4. the shared-memory window's directory: too small at start, filled up mid-run
tmpfs "$tmp/shm-small" 64k
rc=0; OMPI_MCA_osc_sm_backing_directory="$tmp/shm-small" train "$tmp/shm1" "$tmp/shm1.log" --set grad_allreduce=shared || rc=$?
expect_rc 2 "$tmp/shm1.log" "'grad_allreduce' is shared, but [^ ]+ has [0-9.]+ MB free and the node's window needs [0-9.]+ MB" "shm too small (shared)"
rc=0; OMPI_MCA_osc_sm_backing_directory="$tmp/shm-small" train "$tmp/shm2" "$tmp/shm2.log" || rc=$?
expect_rc 0 "$tmp/shm2.log" "too small for a shared-memory window .* averaging gradients with MPI instead" "shm too small (auto)"
same_model "$tmp/ref/checkpoint-6.h5" "$tmp/shm2/checkpoint-6.h5"
tmpfs "$tmp/shm-fill" 4m
rc=0
( OMPI_MCA_osc_sm_backing_directory="$tmp/shm-fill" DPOC_TEST_PAUSE_IN_CHECKPOINT=2:2 \
  train "$tmp/shm3" "$tmp/shm3.log" --set grad_allreduce=shared ) &
pid=$!
for _ in $(seq 300); do grep -q "pausing inside the checkpoint write" "$tmp/shm3.log" 2>/dev/null && break; sleep 0.1; done
grep -q "pausing inside the checkpoint write" "$tmp/shm3.log" || { cat "$tmp/shm3.log" >&2; fail "shm fill: the write never paused"; }
# the window (2 x its share of the tiny model's 90432 floats) is there: Open MPI may have unlinked its file
[ "$(df --output=used -B1 "$tmp/shm-fill" | tail -1)" -ge $((2 * 90432 * 4)) ] \
  || fail "shm fill: the window is not in its backing directory"
dd if=/dev/zero of="$tmp/shm-fill/filler" bs=64k 2>/dev/null || true
[ "$(df --output=avail -B1 "$tmp/shm-fill" | tail -1)" -lt 65536 ] || fail "shm fill: the tmpfs is not full"
wait "$pid" || rc=$?
expect_rc 0 "$tmp/shm3.log" "averaged in a shared-memory window" "shm filled mid-run"
same_model "$tmp/ref/checkpoint-6.h5" "$tmp/shm3/checkpoint-6.h5"
echo "test_resource_faults: OK"

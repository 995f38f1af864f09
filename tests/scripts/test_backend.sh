#!/usr/bin/env bash
# The compute backend at start: dpoc re-executes itself with OPENBLAS_CORETYPE when
# OpenBLAS runs kernels below the CPU (made to happen here with the test hook
# DPOC_TEST_BLAS_KERNEL, which makes dpoc see a generic "Prescott" kernel), keeping argv,
# the environment and the exit code, at most once, also under mpirun; a user's
# OPENBLAS_CORETYPE is respected; a wrong GEMM (DPOC_TEST_BLAS_FAULT) stops every
# computing command with exit code 2 and a message naming the BLAS, its kernel and the
# override to try, unless --skip-blas-check.
# usage: test_backend.sh REPO_ROOT DPOC_BINARY
set -euo pipefail
root=${1:?usage: test_backend.sh REPO_ROOT DPOC_BINARY}
dpoc=${2:?usage: test_backend.sh REPO_ROOT DPOC_BINARY}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OPENBLAS_NUM_THREADS=1
unset OPENBLAS_CORETYPE DPOC_BLAS_REEXEC_FROM DPOC_TEST_BLAS_FAULT DPOC_SIMD
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "test_backend: FAIL: $*" >&2; exit 1; }
cd "$root"
# field NAME FILE: a top-level field of a JSON object (the last JSON line of FILE)
field() { python3 -c 'import json,sys
lines=[l for l in open(sys.argv[2]) if l.strip().startswith("{")]
txt=open(sys.argv[2]).read()
try: o=json.loads(txt)
except ValueError: o=json.loads(lines[-1])
v=o
for k in sys.argv[1].split("."): v=v[k]
print(v)' "$1" "$2"; }

"$dpoc" doctor --json > "$tmp/plain.json" || fail "doctor exited $?"
isa=$(field cpu_isa "$tmp/plain.json")
want=$(python3 -c 'import sys; print({"avx512":"SKYLAKEX","avx2":"ZEN" if sys.argv[2]=="AuthenticAMD" else "HASWELL","avx":"BULLDOZER" if sys.argv[2]=="AuthenticAMD" else "SANDYBRIDGE"}.get(sys.argv[1],""))' "$isa" "$(field cpu_vendor "$tmp/plain.json")")
[ "$(field blas_self_check "$tmp/plain.json")" = passed ] || fail "self-check not passed on the real BLAS"
echo "test_backend: CPU level $isa; OpenBLAS runs $(field blas_kernel "$tmp/plain.json") ($(field blas_decision "$tmp/plain.json"))"

if [ -z "$want" ]; then
  echo "test_backend: SKIPPED the re-exec checks: a CPU without AVX has no better OpenBLAS kernel to choose"
else
  # re-exec: argv (--json, --skip-blas-check) and environment (DPOC_SIMD) survive, at most once
  DPOC_TEST_BLAS_KERNEL=Prescott DPOC_SIMD=scalar "$dpoc" doctor --json --skip-blas-check > "$tmp/re.json" 2> "$tmp/re.err" \
    || { cat "$tmp/re.err" >&2; fail "re-executed doctor exited $?"; }
  [ "$(field blas_chosen_alone "$tmp/re.json")" = Prescott ] || fail "no re-exec recorded"
  [ "$(field blas_coretype "$tmp/re.json")" = "$want" ] || fail "OPENBLAS_CORETYPE is not $want"
  [ "$(field blas_coretype_set_by "$tmp/re.json")" = dpoc ] || fail "the override is not attributed to dpoc"
  [ "$(field simd "$tmp/re.json")" = scalar ] || fail "the environment (DPOC_SIMD) was lost in the re-exec"
  [ "$(field blas_self_check "$tmp/re.json")" = skipped ] || fail "--skip-blas-check was lost in the re-exec"
  # the hook keeps reporting Prescott after the re-exec: dpoc must say so, not exec again
  grep -q "still runs Prescott kernels" "$tmp/re.err" || { cat "$tmp/re.err" >&2; fail "no 'still runs' warning"; }
  # the exit code of the re-executed process is the command's own (2: bad input, naming the file)
  set +e
  DPOC_TEST_BLAS_KERNEL=Prescott "$dpoc" train --config "$tmp/missing.json" > "$tmp/train.log" 2>&1
  rc=$?
  set -e
  [ "$rc" -eq 2 ] || { cat "$tmp/train.log" >&2; fail "train after re-exec exited $rc, not 2"; }
  grep -q "missing.json" "$tmp/train.log" || fail "the error does not name the config file"
  # under mpirun: every rank re-executes before MPI_Init and the job runs
  DPOC_TEST_BLAS_KERNEL=Prescott mpirun -np 2 "$dpoc" bench --peak --json > "$tmp/mpi.json" 2> "$tmp/mpi.err" \
    || { cat "$tmp/mpi.err" >&2; fail "bench --peak under mpirun after re-exec exited $?"; }
  [ "$(field machine.blas_chosen_alone "$tmp/mpi.json")" = Prescott ] || fail "mpirun: no re-exec recorded"
  [ "$(field world_size "$tmp/mpi.json")" = 2 ] || fail "mpirun: not 2 ranks"
  # a real kernel change (no hook): the re-executed process runs the chosen kernel
  if [ "$(field blas_chosen_alone "$tmp/plain.json")" != "" ]; then
    [ "$(field blas_kernel_isa "$tmp/plain.json")" = "$isa" ] || fail "after dpoc's re-exec the kernel is below the CPU"
  fi
fi

# the user's OPENBLAS_CORETYPE is respected and named
OPENBLAS_CORETYPE=PRESCOTT "$dpoc" doctor --json > "$tmp/user.json" 2> "$tmp/user.err" || fail "doctor with a user override exited $?"
[ "$(field blas_coretype_set_by "$tmp/user.json")" = user ] || fail "user override not attributed to the user"
[ "$(field blas_kernel "$tmp/user.json")" = Prescott ] || fail "user override not respected"
[ "$(field blas_chosen_alone "$tmp/user.json")" = "" ] || fail "dpoc re-executed over the user's override"
if [ "$isa" != sse ]; then grep -q "below this" "$tmp/user.err" || fail "no warning for a slow user override"; fi
# an empty OPENBLAS_CORETYPE is no override (OpenBLAS detects the CPU then, as when it is unset)
OPENBLAS_CORETYPE= "$dpoc" doctor --json > "$tmp/empty.json" 2> "$tmp/empty.err" || fail "doctor with an empty override exited $?"
[ "$(field blas_coretype_set_by "$tmp/empty.json")" = "$(field blas_coretype_set_by "$tmp/plain.json")" ] \
  || fail "an empty OPENBLAS_CORETYPE is not treated as unset"

# a wrong GEMM stops the computing commands with exit code 2 and a message that helps
for cmd in "doctor" "train --config configs/tiny-llama.json --set max_steps=1 --set output_dir=$tmp/fault" \
           "bench --peak" "generate --model tests/fixtures/tiny-llama --prompt hi"; do
  set +e
  # shellcheck disable=SC2086
  DPOC_TEST_BLAS_FAULT=1 "$dpoc" $cmd > "$tmp/fault.log" 2>&1
  rc=$?
  set -e
  [ "$rc" -eq 2 ] || { cat "$tmp/fault.log" >&2; fail "$cmd with a wrong GEMM exited $rc, not 2"; }
  for needle in "GEMM self-check failed" "OpenBLAS" "Try OPENBLAS_CORETYPE=" "--skip-blas-check"; do
    grep -q -- "$needle" "$tmp/fault.log" || { cat "$tmp/fault.log" >&2; fail "$cmd: message lacks '$needle'"; }
  done
  [ ! -e "$tmp/fault/metrics.jsonl" ] || fail "$cmd: training started despite the wrong GEMM"
done
DPOC_TEST_BLAS_FAULT=1 "$dpoc" bench --peak --skip-blas-check > "$tmp/skip.log" 2>&1 || fail "--skip-blas-check did not skip"
grep -q "self-check SKIPPED" "$tmp/skip.log" || fail "a skipped check is not shown in the banner"

# the banner, metrics.h5 and checkpoints name the machine
"$dpoc" train --config configs/tiny-llama.json --set max_steps=2 --set save_steps=2 --set output_dir="$tmp/run" \
  > "$tmp/run.log" 2>&1 || { cat "$tmp/run.log" >&2; fail "training exited $?"; }
grep -q "dpoc: CPU .* BLAS OpenBLAS .* kernels .* thread(s), self-check passed" "$tmp/run.log" || fail "no machine banner"
/usr/bin/python3 - "$tmp/run" <<'PY' || fail "metrics.h5 / checkpoint lack the machine attribute"
import h5py, json, sys, glob
d = sys.argv[1]
for path in [d + "/metrics.h5"] + glob.glob(d + "/checkpoint-*.h5"):
    with h5py.File(path, "r") as f:
        m = json.loads(f.attrs["machine"])
        assert m["blas"] == "OpenBLAS" and m["blas_kernel"] and m["cpu"] and m["simd"], (path, m)
        assert m["blas_self_check"] == "passed", (path, m)
PY
echo "test_backend: ok"

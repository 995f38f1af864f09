#!/usr/bin/env bash
# A real Slurm on this host: munged, slurmctld and slurmd on loopback with a
# slurm.conf in a temporary directory. slurm/preemptible.sbatch trains the tiny
# Qwen2 model; mid-run `scancel --signal=USR1 --batch` must make dpoc write a
# checkpoint and exit 85, the job requeue itself (SLURM_RESTART_COUNT=1), resume
# from that checkpoint and end COMPLETED, with model.safetensors byte-identical to
# an uninterrupted run of the same config without Slurm.
#
# usage: test_slurm.sh REPO_ROOT DPOC_BINARY
# Exit 0: pass, 1: fail, 77: skipped (not root, or slurm-wlm/munge cannot be installed).
# Needs root: installs the Debian packages slurm-wlm and munge when missing, creates
# /etc/munge/munge.key when missing and starts munged when it is not running (and
# stops it again at the end). Stops the Slurm daemons it started, by their PIDs.
#
# Environment:
#   TEST_SLURM_LAUNCHER  srun or none (default: srun when `srun --mpi=list` offers pmix)
#   TEST_SLURM_STEPS     max_steps of the run (default 1000, about 4 ms each here: the
#                        signal must land while the job is still training)
#   TEST_SLURM_KEEP=1    keep the temporary directory (logs, slurm.conf, outputs)
set -euo pipefail
root=${1:?usage: test_slurm.sh REPO_ROOT DPOC_BINARY}
dpoc=${2:?usage: test_slurm.sh REPO_ROOT DPOC_BINARY}
steps=${TEST_SLURM_STEPS:-1000}
name=test_slurm
t_start=$SECONDS
export PATH=$PATH:/usr/sbin:/sbin # slurmctld, slurmd, munged

say() { echo "$name: $*"; }
skip() {
  echo "$name: skipped: $*"
  exit 77
}

case $dpoc in /*) ;; *) dpoc=$PWD/$dpoc ;; esac
case $root in /*) ;; *) root=$PWD/$root ;; esac
[ -x "$dpoc" ] || { echo "$name: FAIL: $dpoc is not an executable"; exit 1; }
[ -f "$root/slurm/preemptible.sbatch" ] || { echo "$name: FAIL: no $root/slurm/preemptible.sbatch"; exit 1; }

# ---------------------------------------------------------------- state and cleanup
# shellcheck source=tests/scripts/slurm-cluster.sh
. "$root/tests/scripts/slurm-cluster.sh"
SLURM_CLUSTER_NAME=$name
tmp=$(mktemp -d "${TMPDIR:-/tmp}/dpoc-test-slurm.XXXXXX")
chmod 755 "$tmp"
cluster_up=0 direct_pid="" jobid=""
failures=0

# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
  local rc=$?
  set +e
  if [ -n "$jobid" ] && [ "$cluster_up" -eq 1 ]; then
    scancel "$jobid" 2>/dev/null
    for ((i = 0; i < 50; i++)); do # let slurmd end the job's processes
      pgrep -f "^slurmstepd: \[$jobid\." >/dev/null 2>&1 || break
      sleep 0.1
    done
  fi
  slurm_stop_pid "$direct_pid" "the direct dpoc run"
  slurm_cluster_down "$tmp" # the daemons slurm_cluster_up started, by their PIDs
  if [ "${TEST_SLURM_KEEP:-0}" = 1 ]; then
    echo "$name: kept $tmp"
  else
    rm -rf "$tmp"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP

show_logs() {
  echo "---- job log (step lines left out) ----"
  grep -v '^step ' "$tmp/job.out" 2>/dev/null | tail -40
  echo "---- slurmctld.log (tail) ----"
  tail -15 "$tmp/log/slurmctld.log" 2>/dev/null
  echo "---- slurmd.log (tail) ----"
  tail -15 "$tmp/log/slurmd.log" 2>/dev/null
  echo "----"
}
die() {
  echo "$name: FAIL: $*"
  show_logs
  exit 1
}
check() { # DESCRIPTION COMMAND...
  local what=$1
  shift
  if "$@"; then
    echo "$name: PASS: $what"
  else
    echo "$name: FAIL: $what"
    failures=$((failures + 1))
  fi
}

# ---------------------------------------------------------------- the cluster
cluster_rc=0
slurm_cluster_up "$name" "$tmp" || cluster_rc=$?
case $cluster_rc in
  0) cluster_up=1 ;;
  77) skip "$SLURM_CLUSTER_WHY" ;;
  *) die "$SLURM_CLUSTER_WHY" ;;
esac

launcher=${TEST_SLURM_LAUNCHER:-}
if [ -z "$launcher" ]; then
  if srun --mpi=list 2>&1 | grep -qw pmix; then launcher=srun; else launcher=none; fi
fi
say "launcher: $launcher (srun --mpi=list: $(srun --mpi=list 2>&1 | grep -v '^MPI plugin' | tr -s ' \t\n' ' '))"

# ---------------------------------------------------------------- the job
out=$tmp/out-slurm
direct=$tmp/out-direct
config=configs/tiny-qwen2.json
sets=(--set "max_steps=$steps" --set save_steps=1000)
unset_env=(-u DPOC_TEST_SIGNAL_AT_STEP -u DPOC_TEST_HANG_AT -u DPOC_TEST_FAIL_AT -u DPOC_TEST_PERTURB
           -u DPOC_TEST_PAUSE_IN_CHECKPOINT -u OMP_NUM_THREADS -u OPENBLAS_NUM_THREADS)
cd "$root"
jobid=$(env "${unset_env[@]}" DPOC="$dpoc" LAUNCHER="$launcher" MAX_RESTARTS=3 \
  sbatch --parsable --chdir="$root" --output="$tmp/job.out" --job-name=dpoc-test-slurm \
  --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=1 --time=10 \
  slurm/preemptible.sbatch "$config" "${sets[@]}" --set "output_dir=$out") || die "sbatch failed"
jobid=${jobid%%;*}
say "submitted job $jobid"

# the same run without Slurm, on the other core meanwhile (same thread count: 1)
env "${unset_env[@]}" OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 HDF5_USE_FILE_LOCKING=FALSE \
  "$dpoc" train --config "$config" "${sets[@]}" --set "output_dir=$direct" >"$tmp/direct.log" 2>&1 &
direct_pid=$!

job_field() { slurm_job_field "$jobid" "$1"; }

# wait until the job has logged 5 steps, then signal its batch shell through Slurm
n=0
deadline=$((SECONDS + 60))
while [ "$SECONDS" -lt "$deadline" ]; do
  if [ -f "$out/metrics.jsonl" ]; then n=$(wc -l <"$out/metrics.jsonl"); fi
  [ "$n" -ge 5 ] && break
  case $(job_field JobState) in COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY)
    die "job $jobid ended ($(job_field JobState)) before logging 5 steps" ;;
  esac
  sleep 0.1
done
[ "$n" -ge 5 ] || die "job $jobid logged $n steps in 60 s"
scancel --signal=USR1 --batch "$jobid" || die "scancel --signal=USR1 --batch $jobid failed"
say "$n steps logged: sent SIGUSR1 to the batch shell (scancel --signal=USR1 --batch $jobid) at $((SECONDS - t_start)) s"

# the job checkpoints and requeues itself; slurm_release_requeued starts it again
# as soon as Slurm can (see slurm-cluster.sh for why not at once), then it must end
deadline=$((SECONDS + 150))
slurm_release_requeued "$jobid" 1 150 || true
st=""
while [ "$SECONDS" -lt "$deadline" ]; do
  st=$(job_field JobState)
  case $st in COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE) break ;; esac
  sleep 0.1
done
[ "$SECONDS" -lt "$deadline" ] || say "job $jobid did not end within 150 s of the signal"
say "job $jobid: JobState=$st Restarts=$(job_field Restarts) ExitCode=$(job_field ExitCode) at $((SECONDS - t_start)) s"

# ---------------------------------------------------------------- checks
log=$tmp/job.out
sig_step=$(sed -n 's/^dpoc: stopped by signal 10 at step \([0-9]*\);.*/\1/p' "$log" | head -1)
check "dpoc stopped on SIGUSR1 forwarded from the batch shell (at step ${sig_step:-?} of $steps)" \
  test -n "$sig_step"
check "the first run ended with exit 85 (checkpointed, not finished)" grep -q "job step (dpoc) exited with status 85 " "$log"
check "checkpoint-${sig_step:-?}.h5 was written" test -n "$sig_step" -a -f "$out/checkpoint-${sig_step:-x}.h5"
check "the job requeued itself and the second run saw SLURM_RESTART_COUNT=1" grep -q "SLURM_RESTART_COUNT=1 " "$log"
check "the second run resumed from checkpoint-${sig_step:-?}.h5" \
  grep -q "^dpoc: resumed from .*/checkpoint-${sig_step:-x}\.h5 at step ${sig_step:-x}\$" "$log"
check "the second run finished (exit 0)" grep -q "preemptible .*: training finished" "$log"
final_state=$st
if acct=$(sacct -n -X -P -j "$jobid" -o State 2>/dev/null) && [ -n "$acct" ]; then
  final_state=$(echo "$acct" | tail -1)
fi
check "job state COMPLETED (is $final_state), Restarts=1 (is $(job_field Restarts)), ExitCode 0:0 (is $(job_field ExitCode))" \
  test "$final_state" = COMPLETED -a "$(job_field Restarts)" = 1 -a "$(job_field ExitCode)" = 0:0

direct_rc=0
wait "$direct_pid" || direct_rc=$?
direct_pid=""
check "the uninterrupted run without Slurm finished (exit $direct_rc)" test "$direct_rc" -eq 0
check "model.safetensors is byte-identical to the uninterrupted run's" \
  cmp "$out/model.safetensors" "$direct/model.safetensors"

say "runtime $((SECONDS - t_start)) s"
if [ "$failures" -ne 0 ]; then
  show_logs
  echo "$name: FAIL ($failures check(s))"
  exit 1
fi
echo "$name: ok"

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

# ---------------------------------------------------------------- packages
[ "$(id -u)" -eq 0 ] || skip "needs root (to install slurm-wlm and munge and run slurmctld/slurmd)"
need_install=0
for c in sbatch srun scontrol scancel sinfo slurmctld slurmd munged munge; do
  command -v "$c" >/dev/null 2>&1 || need_install=1
done
if [ "$need_install" -eq 1 ]; then
  command -v apt-get >/dev/null 2>&1 || skip "slurm-wlm/munge are missing and there is no apt-get to install them"
  say "installing slurm-wlm munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } >/tmp/$name-apt.log 2>&1; then
    tail -5 /tmp/$name-apt.log
    skip "apt-get install slurm-wlm munge failed (log: /tmp/$name-apt.log)"
  fi
  rm -f /tmp/$name-apt.log
  for c in sbatch srun scontrol scancel sinfo slurmctld slurmd munged munge; do
    command -v "$c" >/dev/null 2>&1 || skip "$c still missing after installing slurm-wlm and munge"
  done
fi

# ---------------------------------------------------------------- state and cleanup
tmp=$(mktemp -d "${TMPDIR:-/tmp}/dpoc-test-slurm.XXXXXX")
chmod 755 "$tmp"
munged_pid="" ctld_pid="" slurmd_pid="" direct_pid="" jobid=""
failures=0

stop_pid() { # PID WHAT: TERM, up to 10 s, then KILL; only PIDs this script started
  local pid=$1 i
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$name: $2 (pid $pid) did not stop on SIGTERM; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
  local rc=$?
  set +e
  if [ -n "$jobid" ] && [ -n "$ctld_pid" ]; then
    scancel "$jobid" 2>/dev/null
    for ((i = 0; i < 50; i++)); do # let slurmd end the job's processes
      pgrep -f "^slurmstepd: \[$jobid\." >/dev/null 2>&1 || break
      sleep 0.1
    done
  fi
  stop_pid "$direct_pid" "the direct dpoc run"
  stop_pid "$slurmd_pid" slurmd
  stop_pid "$ctld_pid" slurmctld
  stop_pid "$munged_pid" munged
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

# ---------------------------------------------------------------- munge
if ! munge -n </dev/null >/dev/null 2>&1; then
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    install -d -o munge -g munge -m 700 /etc/munge
    (umask 077 && dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none)
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  [ -d /run/munge ] || install -d -o munge -g munge -m 755 /run/munge # a tmpfs: gone after a reboot
  for d in /var/log/munge /var/lib/munge; do [ -d "$d" ] || install -d -o munge -g munge -m 700 "$d"; done
  # in the foreground (-F) in the background: $! is munged itself; as the munge user
  setpriv --reuid=munge --regid=munge --init-groups -- munged -F >"$tmp/munged.out" 2>&1 &
  munged_pid=$!
  for ((i = 0; i < 50; i++)); do
    munge -n </dev/null >/dev/null 2>&1 && break
    kill -0 "$munged_pid" 2>/dev/null || break
    sleep 0.1
  done
  if ! munge -n </dev/null >/dev/null 2>&1; then
    stop_pid "$munged_pid" munged
    munged_pid=""
    say "munged as the munge user did not start ($(tail -1 "$tmp/munged.out")); trying munged --force as root"
    munged -F --force >"$tmp/munged.out" 2>&1 &
    munged_pid=$!
    for ((i = 0; i < 50; i++)); do
      munge -n </dev/null >/dev/null 2>&1 && break
      sleep 0.1
    done
  fi
  munge -n </dev/null >/dev/null 2>&1 || die "munged does not start: $(tail -2 "$tmp/munged.out")"
  say "started munged (pid $munged_pid)"
else
  say "munged is already running"
fi

# ---------------------------------------------------------------- slurm.conf, daemons
host=$(hostname -s)
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port=$((20000 + ($$ % 20000)))
while ! port_free "$port" || ! port_free $((port + 1)); do port=$((port + 2)); done
mem_mb=$(awk '/^MemTotal:/ { print int($2 / 1024 / 2) }' /proc/meminfo) # half of it: below what slurmd finds
mkdir -p "$tmp/state" "$tmp/spool" "$tmp/log"
cat >"$tmp/slurm.conf" <<EOF
# one-host test cluster written by tests/scripts/test_slurm.sh
ClusterName=dpoctest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=10
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$tmp/state
SlurmdSpoolDir=$tmp/spool
SlurmctldPidFile=$tmp/slurmctld.pid
SlurmdPidFile=$tmp/slurmd.pid
SlurmctldLogFile=$tmp/log/slurmctld.log
SlurmdLogFile=$tmp/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$tmp/slurm.conf
slurmctld -D -f "$SLURM_CONF" >"$tmp/log/slurmctld.out" 2>&1 &
ctld_pid=$!
slurmd -D -N "$host" -f "$SLURM_CONF" >"$tmp/log/slurmd.out" 2>&1 &
slurmd_pid=$!
state=""
for ((i = 0; i < 300; i++)); do
  state=$(sinfo -h -N -n "$host" -o %t 2>/dev/null || true)
  [ "$state" = idle ] && break
  kill -0 "$ctld_pid" 2>/dev/null || die "slurmctld exited: $(tail -3 "$tmp/log/slurmctld.out")"
  kill -0 "$slurmd_pid" 2>/dev/null || die "slurmd exited: $(tail -3 "$tmp/log/slurmd.out")"
  sleep 0.1
done
[ "$state" = idle ] || die "node $host is not idle after 30 s (state '$state')"
say "slurmctld (pid $ctld_pid) and slurmd (pid $slurmd_pid) up on ports $port-$((port + 1)), node $host idle after $((SECONDS - t_start)) s"

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

job_field() { scontrol show job "$jobid" 2>/dev/null | grep -o "$1=[^ ]*" | head -1 | cut -d= -f2; }

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

# the job checkpoints and requeues itself; a requeued job waits for its begin time
# (hpc.md: `scontrol update JobId=N StartTime=now` starts it at once). It is released
# only once the slurmstepd processes of its first run are gone: a new step N.0 started
# while the old one is still finishing fails to bind its PMIx socket (seen here). Nor
# within the second of the requeue: slurmd revokes the first run's credential with
# one-second resolution and kills a relaunch whose credential is not newer ("Killing
# non-startable batch JobId=N: Job credential revoked", seen here), so the release
# waits REQUEUE_SETTLE_S after the requeue is seen. The update is repeated every
# second while the job stays pending.
REQUEUE_SETTLE_S=2
released=0 next_update=0 st="" requeued_at=""
deadline=$((SECONDS + 150))
while [ "$SECONDS" -lt "$deadline" ]; do
  st=$(job_field JobState)
  case $st in
    COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE) break ;;
    PENDING)
      [ -z "$requeued_at" ] && [ "$(job_field Restarts)" = 1 ] && requeued_at=$SECONDS
      if [ -n "$requeued_at" ] && [ "$SECONDS" -ge "$next_update" ] \
        && [ "$((SECONDS - requeued_at))" -ge "$REQUEUE_SETTLE_S" ] \
        && ! pgrep -f "^slurmstepd: \[$jobid\." >/dev/null; then
        [ "$released" -eq 0 ] && say "job requeued: pending (Reason=$(job_field Reason)," \
          "StartTime=$(job_field StartTime)) at $((SECONDS - t_start)) s: scontrol update JobId=$jobid StartTime=now"
        scontrol update JobId="$jobid" StartTime=now || true
        released=1 next_update=$((SECONDS + 1))
      fi
      ;;
  esac
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

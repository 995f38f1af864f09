# shellcheck shell=bash
# shellcheck disable=SC2034  # SLURM_CLUSTER_WHY and SLURM_CLUSTER_HOST are read by the callers
# A real one-host Slurm for tests and tools, to be sourced (not run): munged,
# slurmctld and slurmd on loopback with a slurm.conf in a directory of the caller's.
# Used by tests/scripts/test_slurm.sh, tests/scripts/test_soak.sh and tools/soak.
#
#   . tests/scripts/slurm-cluster.sh
#   slurm_cluster_up NAME DIR    installs slurm-wlm + munge when missing, starts munged when
#                                it is not running, writes DIR/slurm.conf, starts slurmctld and
#                                slurmd and waits until the node is idle; exports SLURM_CONF.
#                                Returns 0 (up), 77 (cannot run here: not root, no packages)
#                                or 1 (failed); the reason is in $SLURM_CLUSTER_WHY. The PIDs
#                                of what it started are in DIR/cluster.pids.
#   slurm_cluster_down DIR       stops what slurm_cluster_up started, by those PIDs.
#   slurm_stop_pid PID WHAT      SIGTERM, up to 10 s, then SIGKILL (for PIDs the caller started).
#   slurm_job_field JOBID FIELD  one field of `scontrol show job` (JobState, Restarts, ...).
#   slurm_release_requeued JOBID RESTARTS TIMEOUT_S
#                                waits until the job, requeued for the RESTARTS-th time, can be
#                                started again and starts it (scontrol update StartTime=now);
#                                returns 0 when it left PENDING, 1 when it ended or timed out.
# Messages go to stdout prefixed with "NAME: ". Needs root. Every wait has a deadline.

SLURM_CLUSTER_WHY=""
SLURM_CLUSTER_NAME=slurm-cluster
SLURM_CLUSTER_HOST=""
_slurm_cluster_cmds=(sbatch srun scontrol scancel sinfo slurmctld slurmd munged munge)

_slurm_say() { echo "$SLURM_CLUSTER_NAME: $*"; }

slurm_stop_pid() { # PID WHAT: TERM, up to 10 s, then KILL; only PIDs slurm_cluster_up started
  local pid=$1 i
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    _slurm_say "$2 (pid $pid) did not stop on SIGTERM; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

_slurm_have_cmds() {
  local c
  for c in "${_slurm_cluster_cmds[@]}"; do command -v "$c" >/dev/null 2>&1 || return 1; done
}

_slurm_packages() { # 0: the commands are there; 77: cannot install them
  _slurm_have_cmds && return 0
  command -v apt-get >/dev/null 2>&1 || { SLURM_CLUSTER_WHY="slurm-wlm/munge are missing and there is no apt-get to install them"; return 77; }
  _slurm_say "installing slurm-wlm munge (apt-get)"
  local log=/tmp/$SLURM_CLUSTER_NAME-apt.log
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge; } >"$log" 2>&1; then
    tail -5 "$log"
    SLURM_CLUSTER_WHY="apt-get install slurm-wlm munge failed (log: $log)"
    return 77
  fi
  rm -f "$log"
  _slurm_have_cmds || { SLURM_CLUSTER_WHY="commands still missing after installing slurm-wlm and munge"; return 77; }
}

_slurm_munge_ok() { munge -n </dev/null >/dev/null 2>&1; }

_slurm_munged() { # DIR: munged running (started by us: its PID in DIR/cluster.pids)
  local dir=$1 pid i
  if _slurm_munge_ok; then
    _slurm_say "munged is already running"
    return 0
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    _slurm_say "creating /etc/munge/munge.key"
    install -d -o munge -g munge -m 700 /etc/munge
    (umask 077 && dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none)
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  [ -d /run/munge ] || install -d -o munge -g munge -m 755 /run/munge # a tmpfs: gone after a reboot
  for d in /var/log/munge /var/lib/munge; do [ -d "$d" ] || install -d -o munge -g munge -m 700 "$d"; done
  # in the foreground (-F) in the background: $! is munged itself; as the munge user
  setpriv --reuid=munge --regid=munge --init-groups -- munged -F >"$dir/munged.out" 2>&1 &
  pid=$!
  for ((i = 0; i < 50; i++)); do
    _slurm_munge_ok && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if ! _slurm_munge_ok; then
    slurm_stop_pid "$pid" munged
    _slurm_say "munged as the munge user did not start ($(tail -1 "$dir/munged.out")); trying munged --force as root"
    munged -F --force >"$dir/munged.out" 2>&1 &
    pid=$!
    for ((i = 0; i < 50; i++)); do
      _slurm_munge_ok && break
      sleep 0.1
    done
  fi
  echo "munged $pid" >>"$dir/cluster.pids"
  _slurm_munge_ok || { SLURM_CLUSTER_WHY="munged does not start: $(tail -2 "$dir/munged.out")"; return 1; }
  _slurm_say "started munged (pid $pid)"
}

slurm_cluster_up() { # NAME DIR
  SLURM_CLUSTER_NAME=$1
  local dir=$2 t0=$SECONDS rc=0 port mem_mb ctld slurmd state="" i
  export PATH=$PATH:/usr/sbin:/sbin # slurmctld, slurmd, munged
  [ "$(id -u)" -eq 0 ] || { SLURM_CLUSTER_WHY="needs root (to install slurm-wlm and munge and run slurmctld/slurmd)"; return 77; }
  _slurm_packages || return $?
  : >"$dir/cluster.pids"
  _slurm_munged "$dir" || return $?
  SLURM_CLUSTER_HOST=$(hostname -s)
  port=$((20000 + ($$ % 20000)))
  while ! _slurm_port_free "$port" || ! _slurm_port_free $((port + 1)); do port=$((port + 2)); done
  mem_mb=$(awk '/^MemTotal:/ { print int($2 / 1024 / 2) }' /proc/meminfo) # half of it: below what slurmd finds
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  cat >"$dir/slurm.conf" <<EOF
# one-host test cluster written by tests/scripts/slurm-cluster.sh for $SLURM_CLUSTER_NAME
ClusterName=dpoctest
SlurmctldHost=$SLURM_CLUSTER_HOST(127.0.0.1)
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
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$SLURM_CLUSTER_HOST NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=test Nodes=$SLURM_CLUSTER_HOST Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF=$dir/slurm.conf
  slurmctld -D -f "$SLURM_CONF" >"$dir/log/slurmctld.out" 2>&1 &
  ctld=$!
  echo "slurmctld $ctld" >>"$dir/cluster.pids"
  slurmd -D -N "$SLURM_CLUSTER_HOST" -f "$SLURM_CONF" >"$dir/log/slurmd.out" 2>&1 &
  slurmd=$!
  echo "slurmd $slurmd" >>"$dir/cluster.pids"
  for ((i = 0; i < 300; i++)); do
    state=$(sinfo -h -N -n "$SLURM_CLUSTER_HOST" -o %t 2>/dev/null || true)
    [ "$state" = idle ] && break
    kill -0 "$ctld" 2>/dev/null || { SLURM_CLUSTER_WHY="slurmctld exited: $(tail -3 "$dir/log/slurmctld.out")"; rc=1; break; }
    kill -0 "$slurmd" 2>/dev/null || { SLURM_CLUSTER_WHY="slurmd exited: $(tail -3 "$dir/log/slurmd.out")"; rc=1; break; }
    sleep 0.1
  done
  [ "$rc" -eq 0 ] || return "$rc"
  [ "$state" = idle ] || { SLURM_CLUSTER_WHY="node $SLURM_CLUSTER_HOST is not idle after 30 s (state '$state')"; return 1; }
  _slurm_say "slurmctld (pid $ctld) and slurmd (pid $slurmd) up on ports $port-$((port + 1))," \
    "node $SLURM_CLUSTER_HOST idle after $((SECONDS - t0)) s"
}

_slurm_port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

slurm_cluster_down() { # DIR: slurmd, slurmctld, then munged (if we started it)
  local dir=$1 what pid
  [ -f "$dir/cluster.pids" ] || return 0
  for what in slurmd slurmctld munged; do
    pid=$(awk -v w="$what" '$1 == w { print $2 }' "$dir/cluster.pids" | tail -1)
    slurm_stop_pid "$pid" "$what"
  done
  rm -f "$dir/cluster.pids"
}

slurm_job_field() { scontrol show job "$1" 2>/dev/null | grep -o "$2=[^ ]*" | head -1 | cut -d= -f2; }

# A requeued job waits for its begin time (hpc.md: `scontrol update JobId=N StartTime=now`
# starts it at once). It is released only once the slurmstepd processes of its previous run
# are gone: a new step N.0 started while the old one is still finishing fails to bind its
# PMIx socket (seen here). Nor within the second of the requeue: slurmd revokes the previous
# run's credential with one-second resolution and kills a relaunch whose credential is not
# newer ("Killing non-startable batch JobId=N: Job credential revoked", seen here), so the
# release waits SLURM_REQUEUE_SETTLE_S (default 2) after the requeue is seen. The update is
# repeated every second while the job stays pending.
slurm_release_requeued() { # JOBID RESTARTS TIMEOUT_S
  local jobid=$1 restarts=$2 deadline=$((SECONDS + $3)) st requeued_at="" next_update=0 released=0
  local settle=${SLURM_REQUEUE_SETTLE_S:-2}
  while [ "$SECONDS" -lt "$deadline" ]; do
    st=$(slurm_job_field "$jobid" JobState)
    case $st in
      COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE) return 1 ;;
      PENDING)
        [ -z "$requeued_at" ] && [ "$(slurm_job_field "$jobid" Restarts)" = "$restarts" ] && requeued_at=$SECONDS
        if [ -n "$requeued_at" ] && [ "$SECONDS" -ge "$next_update" ] &&
          [ "$((SECONDS - requeued_at))" -ge "$settle" ] && ! pgrep -f "^slurmstepd: \[$jobid\." >/dev/null; then
          [ "$released" -eq 0 ] && _slurm_say "job $jobid requeued: pending (Reason=$(slurm_job_field "$jobid" Reason)," \
            "StartTime=$(slurm_job_field "$jobid" StartTime)): scontrol update JobId=$jobid StartTime=now"
          scontrol update JobId="$jobid" StartTime=now || true
          released=1 next_update=$((SECONDS + 1))
        fi
        ;;
      *) [ "$released" -eq 1 ] && return 0 ;; # RUNNING, CONFIGURING, COMPLETING (of the previous run: not yet)
    esac
    sleep 0.1
  done
  return 1
}

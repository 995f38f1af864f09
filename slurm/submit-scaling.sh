#!/usr/bin/env bash
# Submits slurm/scaling-array.sbatch once per node count: the same config, the same
# ranks per node and threads per rank, only --nodes changes. Each job writes
# SCALING_DIR/nodes-N; the largest also measures the allreduce across its nodes
# (SCALING_DIR/bench_comm.json). Afterwards:
#
#   tools/scaling collect --runs runs/scaling/nodes-*
#
# usage: slurm/submit-scaling.sh [--dry-run] CONFIG.json [--set key=value ...]
# Environment:
#   NODES="1 2 4 8"     node counts (spaces or commas)
#   SCALING_DIR         output directory (default runs/scaling)
#   SCALING_STEPS       optimizer steps per run (default 20)
#   SEQUENTIAL=1        one job at a time (--dependency=singleton): no two points of the
#                       study share the network or the file system; default 0 (all queued
#                       at once, each starts when its nodes are free)
#   SBATCH_ARGS         more sbatch options for every job, e.g. "--partition=compute
#                       --account=myproject --ntasks-per-node=4 --cpus-per-task=8"
#   DPOC, LAUNCHER, SRUN_MPI   passed on to the jobs (see scaling-array.sbatch)
set -euo pipefail

dry=0
if [ "${1:-}" = --dry-run ]; then
  dry=1
  shift
fi
if [ $# -lt 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
script=$here/scaling-array.sbatch
scaling_dir=${SCALING_DIR:-runs/scaling}
nodes=${NODES:-1 2 4 8}
read -r -a counts <<<"${nodes//,/ }"
read -r -a extra <<<"${SBATCH_ARGS:-}"
largest=0
for n in "${counts[@]}"; do
  case $n in '' | *[!0-9]* | 0) echo "submit-scaling: bad node count '$n' in NODES" >&2; exit 2 ;; esac
  [ "$n" -gt "$largest" ] && largest=$n
done

export SCALING_DIR=$scaling_dir
for n in "${counts[@]}"; do
  args=(--parsable --nodes="$n" --job-name=dpoc-scaling --output="$scaling_dir/nodes-$n/slurm-%j.out")
  [ "${SEQUENTIAL:-0}" = 1 ] && args+=(--dependency=singleton)
  bench=0
  [ "$n" -eq "$largest" ] && bench=1
  cmd=(sbatch "${args[@]}" "${extra[@]}" "$script" "$@")
  if [ "$dry" -eq 1 ]; then
    echo "BENCH_COMM=$bench SCALING_DIR=$scaling_dir ${cmd[*]}"
    continue
  fi
  mkdir -p "$scaling_dir/nodes-$n" # Slurm does not create the log's directory
  id=$(BENCH_COMM=$bench "${cmd[@]}")
  echo "submit-scaling: $n node(s): job ${id%%;*} -> $scaling_dir/nodes-$n"
done
echo "submit-scaling: when they have finished (squeue -n dpoc-scaling):"
echo "  tools/scaling collect --runs $scaling_dir/nodes-*"

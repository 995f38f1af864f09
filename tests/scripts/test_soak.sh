#!/usr/bin/env bash
# The interrupt and kill storms of tools/soak, shortened: 5 SIGKILLs of one rank of a
# direct 2-rank run (rank 0 and rank 1 in turn; aimed at the pre-pass, checkpoint writes
# and steps), then 3 `scancel --signal=USR1 --batch` of slurm/preemptible.sbatch under a
# real one-host Slurm (tests/scripts/slurm-cluster.sh; aimed at the pre-pass, a checkpoint
# write and steps). After every kill each checkpoint must verify and the next run resume
# from the right one; at the end the weights, AdamW moments, model.safetensors and metrics
# must be bitwise equal to an uninterrupted run's. The full storms (20 signals, 50 kills):
# `tools/soak all` (figures in the README, "Hardening").
#
# usage: test_soak.sh REPO_ROOT DPOC_BINARY
# Exit 0: pass, 1: fail, 77: skipped — the kills ran and passed but Slurm cannot run here
# (not root, slurm-wlm/munge cannot be installed), so the signals did not.
# Environment: TEST_SOAK_SEED (default 1), TEST_SOAK_KEEP=1 keeps the work directory.
set -euo pipefail
root=${1:?usage: test_soak.sh REPO_ROOT DPOC_BINARY}
dpoc=${2:?usage: test_soak.sh REPO_ROOT DPOC_BINARY}
case $dpoc in /*) ;; *) dpoc=$PWD/$dpoc ;; esac
work=$(mktemp -d "${TMPDIR:-/tmp}/dpoc-test-soak.XXXXXX")
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
  if [ "${TEST_SOAK_KEEP:-0}" = 1 ]; then echo "test_soak: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
t0=$SECONDS
rc=0
# tools/soak bounds every wait (--event-timeout); timeout(1) bounds the whole
timeout -k 10 280 "$root/tools/soak" all --kills 5 --signals 3 --seed "${TEST_SOAK_SEED:-1}" --dpoc "$dpoc" \
  --workdir "$work" --event-timeout 60 || rc=$?
echo "test_soak: runtime $((SECONDS - t0)) s"
case $rc in
  0) echo "test_soak: ok" ;;
  77) echo "test_soak: skipped: the kills passed, but Slurm cannot run here (see above): no signals" ;;
  124 | 137) echo "test_soak: FAIL: tools/soak did not end within 280 s" ; rc=1 ;;
  *) echo "test_soak: FAIL (tools/soak exit $rc)" ; rc=1 ;;
esac
exit "$rc"

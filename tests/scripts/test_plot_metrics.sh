#!/usr/bin/env bash
# tools/plot-metrics on a 6-step run of the tiny model: metrics.png (from metrics.h5),
# --out FILE (from metrics.jsonl once metrics.h5 is gone) are PNGs; a directory
# without metrics exits 2.
# usage: test_plot_metrics.sh REPO_ROOT DPOC_BINARY
set -euo pipefail
root=${1:?usage: test_plot_metrics.sh REPO_ROOT DPOC_BINARY}
dpoc=${2:?usage: test_plot_metrics.sh REPO_ROOT DPOC_BINARY}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OPENBLAS_NUM_THREADS=1 MPLCONFIGDIR=${MPLCONFIGDIR:-$(mktemp -d)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "test_plot_metrics: FAIL: $*" >&2; exit 1; }

# PNG signature and a nonzero size
is_png() {
  [ -s "$1" ] || fail "$1 is missing or empty"
  local magic
  magic=$(head -c 8 "$1" | od -An -tx1 | tr -d ' \n')
  [ "$magic" = "89504e470d0a1a0a" ] || fail "$1 is not a PNG (magic $magic)"
}

cd "$root"
run="$tmp/run"
"$dpoc" train --config configs/tiny-llama.json --set output_dir="$run" --set max_steps=6 --set logging_steps=1 \
  > "$tmp/train.log" 2>&1 || { cat "$tmp/train.log" >&2; fail "training exited $?"; }
[ -f "$run/metrics.h5" ] || fail "the run wrote no metrics.h5"

tools/plot-metrics "$run" > "$tmp/plot.log" 2>&1 || { cat "$tmp/plot.log" >&2; fail "plot-metrics exited $?"; }
is_png "$run/metrics.png"
grep -q "6 steps from .*metrics.h5" "$tmp/plot.log" || { cat "$tmp/plot.log" >&2; fail "not read from metrics.h5"; }

# the JSONL fallback, and --out
rm "$run/metrics.h5"
tools/plot-metrics "$run" --out "$tmp/from-jsonl.png" > "$tmp/plot.log" 2>&1 \
  || { cat "$tmp/plot.log" >&2; fail "plot-metrics (jsonl) exited $?"; }
is_png "$tmp/from-jsonl.png"
grep -q "6 steps from .*metrics.jsonl" "$tmp/plot.log" || { cat "$tmp/plot.log" >&2; fail "not read from metrics.jsonl"; }
ls -A "$run" "$tmp" | grep -q '\.tmp' && fail "temporary files left behind"

# no metrics: exit 2 with a message naming the directory
mkdir "$tmp/empty"
set +e
tools/plot-metrics "$tmp/empty" > "$tmp/plot.log" 2>&1
rc=$?
set -e
[ "$rc" -eq 2 ] || fail "a directory without metrics exited $rc, expected 2"
grep -q "$tmp/empty" "$tmp/plot.log" || fail "the message does not name the directory"
echo "test_plot_metrics: ok"

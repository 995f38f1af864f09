#!/usr/bin/env bash
# tools/scaling run on the tiny model at 1 and 2 ranks: scaling.csv has a row per
# rank count with a numeric tokens_per_second, and scaling.png is a PNG.
# usage: test_scaling.sh REPO_ROOT DPOC_BINARY
set -euo pipefail
root=${1:?usage: test_scaling.sh REPO_ROOT DPOC_BINARY}
dpoc=${2:?usage: test_scaling.sh REPO_ROOT DPOC_BINARY}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
fail() { echo "test_scaling: FAIL: $*" >&2; exit 1; }

cd "$root"
tools/scaling run --config configs/tiny-llama.json --ranks 1,2 --steps 4 --out "$out" --dpoc "$dpoc" \
  || fail "tools/scaling run exited $?"

[ -f "$out/scaling.csv" ] || fail "no scaling.csv"
/usr/bin/python3 - "$out/scaling.csv" <<'PY' || fail "scaling.csv is not as expected"
import csv, math, sys
rows = list(csv.DictReader(open(sys.argv[1])))
assert len(rows) == 2, f"{len(rows)} data rows, want 2"
assert [int(r["world_size"]) for r in rows] == [1, 2], [r["world_size"] for r in rows]
for r in rows:
    v = float(r["tokens_per_second"])
    assert math.isfinite(v) and v > 0, r
    for k in ("step_time_s", "comm_share", "speedup", "efficiency", "predicted_efficiency"):
        assert math.isfinite(float(r[k])), (k, r)
PY
[ -f "$out/scaling.png" ] || fail "no scaling.png"
magic=$(head -c 8 "$out/scaling.png" | od -An -tx1 | tr -d ' \n')
[ "$magic" = "89504e470d0a1a0a" ] || fail "scaling.png is not a PNG (magic $magic)"
echo "test_scaling: ok"

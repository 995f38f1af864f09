#!/usr/bin/env bash
# dpoc bench-comm at 2 ranks: the JSON has its keys, alpha >= 0, beta > 0, times
# grow with the message size; --shared times the shared-memory averaging; a bad
# option exits 2.
# usage: test_bench_comm.sh REPO_ROOT DPOC_BINARY
set -euo pipefail
root=${1:?usage: test_bench_comm.sh REPO_ROOT DPOC_BINARY}
dpoc=${2:?usage: test_bench_comm.sh REPO_ROOT DPOC_BINARY}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
fail() { echo "test_bench_comm: FAIL: $*" >&2; exit 1; }
cd "$root"

json=$(mpirun -np 2 "$dpoc" bench-comm --json --max-bytes 4194304) || fail "bench-comm exited $?"
/usr/bin/python3 -c '
import json, sys
b = json.loads(sys.argv[1])
for k in ("world_size", "sizes", "alpha_s", "beta_s_per_byte", "r2"):
    assert k in b, "missing key " + k
assert b["world_size"] == 2, b["world_size"]
assert b["alpha_s"] >= 0, b["alpha_s"]
assert b["beta_s_per_byte"] > 0, b["beta_s_per_byte"]
s = b["sizes"]
n = [x["bytes"] for x in s]
t = [x["time_s"] for x in s]
assert n[0] == 1024 and n[-1] == 4194304 and n == sorted(n), n
assert all(x > 0 for x in t), t
# overall growth: the largest message is much slower than the smallest, and the
# slower half of the sizes is mostly the larger half (timing noise aside)
assert t[-1] > 10 * t[0], (t[0], t[-1])
pairs = [(i, j) for i in range(len(t)) for j in range(i + 1, len(t))]
up = sum(t[j] > t[i] for i, j in pairs) / len(pairs)
assert up > 0.75, "times do not grow with size: %.2f of pairs increase" % up
' "$json" || fail "bad bench-comm JSON: $json"

json=$(mpirun -np 2 "$dpoc" bench-comm --shared --json --max-bytes 65536) || fail "bench-comm --shared exited $?"
/usr/bin/python3 -c '
import json, sys
b = json.loads(sys.argv[1])
assert b["method"] == "shared" and b["world_size"] == 2, b
n = [x["bytes"] for x in b["sizes"]]
assert n[0] == 1024 and n[-1] == 65536, n
assert all(x["time_s"] > 0 for x in b["sizes"]), b["sizes"]
' "$json" || fail "bad bench-comm --shared JSON: $json"

set +e
"$dpoc" bench-comm --bogus 2>/dev/null
rc=$?
set -e
[ "$rc" -eq 2 ] || fail "bench-comm --bogus exited $rc, want 2"
echo "test_bench_comm: ok"

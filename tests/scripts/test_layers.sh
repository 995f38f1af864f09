#!/usr/bin/env bash
# Data flows one way: core -> io -> text -> model -> dist -> train -> store -> run -> cli.
# A file of module M may include headers of M and of modules before it, never of a
# module after it. Every header is mapped to its module: include/dpoc/X.h to the
# directory under src/ holding X.c (or the table below, for a header without a
# .c), src/<module>/Y.h to <module>. A quoted include that maps to no module fails
# too, so nothing escapes the check. Violations are listed as file:line.
#
# Known debt is allowlisted below, each entry commented: the test passes with it
# and says so, so the debt stays visible; remove an entry once it is fixed (an
# entry that no longer matches is reported).
#
# First a self-test on a tiny synthetic tree (the checker must catch an upward
# include and pass a downward one), then the source tree.
# usage: test_layers.sh REPO_ROOT [DPOC_BINARY (unused)]
set -euo pipefail
root=${1:?usage: test_layers.sh REPO_ROOT}

ORDER=(core io text model dist train store run cli)

# Headers in include/dpoc/ with no .c of the same name: header -> module.
declare -A HEADER_TABLE=(
)

# Known upward includes, "includer-path|included-header" -> why it is debt.
declare -A ALLOW=(
  # core's dpoc_config embeds train's loss settings (dpoc_loss_cfg): the settings
  # struct belongs below train (core), or the run config above it.
  ["include/dpoc/config.h|dpoc/loss.h"]="dpoc_config embeds train's dpoc_loss_cfg"
  # core's config parser checks a chat template name with text's
  # dpoc_chat_kind_from_name: the name table belongs to core, or the check to text.
  ["src/core/config.c|dpoc/chat.h"]="the config parser calls text's dpoc_chat_kind_from_name"
)

rank_of() { # module -> its position in ORDER, or nothing
  local i
  for i in "${!ORDER[@]}"; do [ "${ORDER[$i]}" = "$1" ] && { echo "$i"; return; }; done
}

# module_of_header TREE INCLUDER-DIR HEADER -> the module, or "?" and the reason
module_of_header() {
  local tree=$1 dir=$2 h=$3 m base found=()
  if [[ $h == dpoc/* ]]; then
    base=$(basename "$h" .h)
    if [ -n "${HEADER_TABLE[$h]+x}" ]; then echo "${HEADER_TABLE[$h]}"; return; fi
    for m in "${ORDER[@]}"; do
      [ "$m" = cli ] && continue # the CLI has no public headers; cli/export.c is not export.h's
      [ -f "$tree/src/$m/$base.c" ] && found+=("$m")
    done
    if [ ${#found[@]} -eq 1 ]; then echo "${found[0]}"; return; fi
    if [ ${#found[@]} -eq 0 ]; then echo "? no src/<module>/$base.c: add $h to HEADER_TABLE"
    else echo "? $base.c is in ${found[*]}: add $h to HEADER_TABLE"; fi
    return
  fi
  m=${h%%/*}
  if [[ $h == */* ]] && [ -n "$(rank_of "$m")" ] && [ -f "$tree/src/$h" ]; then echo "$m"; return; fi
  # a bare name: a header next to the including file
  if [[ $h != */* ]] && [[ $dir == src/* ]] && [ -f "$tree/$dir/$h" ]; then echo "${dir#src/}"; return; fi
  # protoc-c's X.pb-c.h, generated in the build tree from X.proto next to the including file
  if [[ $h == *.pb-c.h ]] && [[ $h != */* ]] && [[ $dir == src/* ]] && [ -f "$tree/$dir/${h%.pb-c.h}.proto" ]; then
    echo "${dir#src/}"; return
  fi
  echo "? no such header under src/ or include/"
}

# check_tree TREE USE_ALLOWLIST: prints violations, returns 1 when there is one
check_tree() {
  local tree=$1 use_allow=$2 bad=0 file dir mod line h target why
  declare -A seen=()
  local files=()
  mapfile -t files < <(cd "$tree" && { ls include/dpoc/*.h 2>/dev/null; for m in "${ORDER[@]}"; do
    ls src/"$m"/*.c src/"$m"/*.h 2>/dev/null; done; } | sort)
  for file in "${files[@]}"; do
    dir=$(dirname "$file")
    if [[ $file == include/dpoc/* ]]; then
      mod=$(module_of_header "$tree" "$dir" "dpoc/$(basename "$file")")
      if [[ $mod == \?* ]]; then
        echo "$file: cannot tell its module:${mod#\?}"; bad=1; continue
      fi
    else
      mod=${dir#src/}
    fi
    while IFS=: read -r line h; do
      target=$(module_of_header "$tree" "$dir" "$h")
      if [[ $target == \?* ]]; then
        echo "$file:$line: #include \"$h\":${target#\?}"; bad=1; continue
      fi
      if [ "$(rank_of "$target")" -gt "$(rank_of "$mod")" ]; then
        if [ "$use_allow" = 1 ] && [ -n "${ALLOW[$file|$h]+x}" ]; then
          seen["$file|$h"]=1
          echo "known debt (allowlisted): $file:$line: $mod includes $h of $target (${ALLOW[$file|$h]})"
        else
          echo "$file:$line: $mod includes \"$h\" of $target, a later module (order: ${ORDER[*]})"; bad=1
        fi
      fi
    done < <(grep -n -E '^[[:space:]]*#[[:space:]]*include[[:space:]]*"' "$tree/$file" |
             sed -E 's/^([0-9]+):[[:space:]]*#[[:space:]]*include[[:space:]]*"([^"]+)".*/\1:\2/')
  done
  if [ "$use_allow" = 1 ]; then
    local k
    for k in "${!ALLOW[@]}"; do
      [ -n "${seen[$k]+x}" ] || echo "note: allowlist entry '$k' no longer matches anything: remove it"
    done
  fi
  return $bad
}

# ---- self-test: an upward include must fail (with file:line), a downward one pass ----
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/include/dpoc" "$tmp/src/core" "$tmp/src/train" "$tmp/src/model"
printf '#include "dpoc/err.h"\n' > "$tmp/include/dpoc/loss.h"
printf '/* core */\n' > "$tmp/include/dpoc/err.h"
printf '/* core */\n#include "dpoc/err.h"\n' > "$tmp/src/core/err.c"
printf '#include "dpoc/loss.h"\n' > "$tmp/src/train/loss.c"
printf '#include "dpoc/err.h"\n#include "model/kernels.h"\n#include "kernels.h"\n' > "$tmp/src/model/kernels.c"
printf '/* model */\n' > "$tmp/src/model/kernels.h"
check_tree "$tmp" 0 > "$tmp/ok.log" || { cat "$tmp/ok.log"; echo "test_layers: FAIL: self-test flagged a downward include" >&2; exit 1; }
printf '/* core */\n#include "dpoc/err.h"\n#include "dpoc/loss.h"\n' > "$tmp/src/core/err.c"
if check_tree "$tmp" 0 > "$tmp/bad.log"; then
  echo "test_layers: FAIL: self-test missed core including train's loss.h" >&2; exit 1
fi
grep -q '^src/core/err.c:3: ' "$tmp/bad.log" || { cat "$tmp/bad.log"; echo "test_layers: FAIL: self-test: no file:line" >&2; exit 1; }
# a generated protobuf-c header maps to the module of its .proto, and only there
printf '/* core */\n#include "dpoc/err.h"\n' > "$tmp/src/core/err.c"
printf 'syntax = "proto3";\n' > "$tmp/src/model/m.proto"
printf '#include "m.pb-c.h"\n' > "$tmp/src/model/kernels.c"
check_tree "$tmp" 0 > "$tmp/ok.log" || { cat "$tmp/ok.log"; echo "test_layers: FAIL: self-test flagged a generated header" >&2; exit 1; }
printf '#include "m.pb-c.h"\n' > "$tmp/src/core/err.c"
if check_tree "$tmp" 0 > "$tmp/bad.log"; then
  echo "test_layers: FAIL: self-test passed another module's generated header" >&2; exit 1
fi
printf '#include "dpoc/nowhere.h"\n' > "$tmp/src/core/err.c"
if check_tree "$tmp" 0 > "$tmp/bad.log"; then
  echo "test_layers: FAIL: self-test passed a header of no module" >&2; exit 1
fi

# ---- the source tree ----
if check_tree "$root" 1; then
  echo "test_layers: ok: no include runs upward (${ORDER[*]})"
else
  echo "test_layers: FAIL: includes run upward (above); move the code, or allowlist known debt with a reason" >&2
  exit 1
fi

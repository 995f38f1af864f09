#!/usr/bin/env bash
# The identity demo (README command 1) shortened: 8 training questions, 4 held-out, 2
# general, 4 DPO steps on 2 ranks with the real SmolLM2-135M-Instruct GGUF. Checks that
# it runs end to end (pairs built, model trained and saved, answers before and after,
# perplexities, the report and the plot) and that the training loss decreases.
# Skipped (exit 77) when the model cannot be fetched.
# usage: test_identity_demo.sh REPO_ROOT DPOC_BINARY
set -euo pipefail
root=${1:?usage: test_identity_demo.sh REPO_ROOT DPOC_BINARY}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "test_identity_demo: FAIL: $*" >&2; exit 1; }
cd "$root"
if ! tools/fetch-model > /dev/null 2>&1; then
  echo "test_identity_demo: SKIPPED: the SmolLM2 GGUF cannot be fetched (tools/fetch-model)"; exit 77
fi
export MPLCONFIGDIR=$tmp/mpl
out=$tmp/demo
tools/identity-demo --quick --out "$out" > "$tmp/demo.log" 2>&1 || { cat "$tmp/demo.log" >&2; fail "identity-demo exited $?"; }
for f in pairs.jsonl model/model.safetensors model/config.json model/metrics.jsonl model/metrics.png \
         before-identity.jsonl after-identity.jsonl before-general.jsonl after-general.jsonl \
         perplexity-base.json perplexity-trained.json model/ref_logps.h5; do
  [ -s "$out/$f" ] || { cat "$tmp/demo.log" >&2; fail "$f is missing"; }
done
grep -q "build-pairs: 8 prompts: kept [1-8]" "$tmp/demo.log" || { cat "$tmp/demo.log" >&2; fail "no pairs kept"; }
[ "$(wc -l < "$out/after-identity.jsonl")" -eq 4 ] || fail "expected 4 held-out answers after training"
grep -q "perplexity of the base model's own answers" "$tmp/demo.log" || fail "no report"
/usr/bin/python3 - "$out/model/metrics.jsonl" <<'PY' || fail "the loss did not decrease"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l and '"step"' in l]
losses = [r["loss"] for r in rows if "loss" in r]
print("losses:", losses)
assert len(losses) == 4, losses
assert losses[-1] < losses[0], losses
PY
echo "test_identity_demo: OK ($(grep -c . "$out/pairs.jsonl") pairs)"

# the same with --lora: QLoRA on the kept Q4_1 base; the adapter is the output and answers come through --adapter
lout=$tmp/demo-lora
tools/identity-demo --quick --lora --out "$lout" > "$tmp/lora.log" 2>&1 || { cat "$tmp/lora.log" >&2; fail "identity-demo --lora exited $?"; }
for f in model/adapter_config.json model/adapter_model.safetensors after-identity.jsonl perplexity-trained.json rss.txt; do
  [ -s "$lout/$f" ] || { cat "$tmp/lora.log" >&2; fail "--lora: $f is missing"; }
done
[ ! -e "$lout/model/model.safetensors" ] || fail "--lora wrote a full model"
grep -q "134515008 parameters" "$tmp/lora.log" && fail "--lora trained every weight"
/usr/bin/python3 - "$lout/model/metrics.jsonl" <<'PY' || fail "--lora: the loss did not decrease"
import json, sys
losses = [json.loads(l)["loss"] for l in open(sys.argv[1]) if '"loss"' in l and '"step"' in l]
print("lora losses:", losses)
assert len(losses) == 4 and losses[-1] < losses[0], losses
PY
echo "test_identity_demo: --lora OK ($(cat "$lout/rss.txt" | tr '\n' ' '))"

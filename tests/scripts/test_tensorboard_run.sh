#!/usr/bin/env bash
# report_to "tensorboard" read back with TensorBoard's own reader (the pinned PyPI
# tensorboard of tools/tensorboard): a 6-step run of the tiny model writes one event
# file whose every tag and value is metrics.jsonl's (float32), with the config as the
# "args" text; a resume from the step-3 checkpoint leaves exactly one value per step
# and tag in what TensorBoard reads (the events past step 3 cut from the old file,
# the resumed ones in a new file of the same run directory); a resume after a killed
# writer (event file truncated mid-record, plus garbage) runs and reads the same.
# Also: TensorBoard's own restart marker (SessionLog START) on an uncut copy, report_to
# errors (exit 2 naming the key), logging_dir, and report_to none writing nothing.
# Exit 77 (skipped) when tensorboard cannot be installed (PyPI unreachable).
# usage: test_tensorboard_run.sh REPO_ROOT DPOC_BINARY
set -euo pipefail
root=${1:?usage: test_tensorboard_run.sh REPO_ROOT DPOC_BINARY}
dpoc=${2:?usage: test_tensorboard_run.sh REPO_ROOT DPOC_BINARY}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OPENBLAS_NUM_THREADS=1
unset TENSORBOARD_LOGGING_DIR
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "test_tensorboard_run: FAIL: $*" >&2; exit 1; }
cd "$root"

if ! py=$(tools/tensorboard --python 2> "$tmp/venv.log"); then
  cat "$tmp/venv.log" >&2
  echo "test_tensorboard_run: SKIPPED: tensorboard cannot be installed (tools/tensorboard; PyPI unreachable?)"
  exit 77
fi

out="$tmp/run"
# train NAME [--set k=v ...]: 6 steps, a checkpoint at step 3, events on; log in $tmp/NAME.log
train() {
  local name=$1; shift
  "$dpoc" train --config configs/tiny-llama.json --set output_dir="$out" --set max_steps=6 --set save_steps=3 \
    --set logging_steps=1 --set report_to=tensorboard "$@" > "$tmp/$name.log" 2>&1 \
    || { cat "$tmp/$name.log" >&2; fail "$name: training exited non-zero"; }
}

# check DIR: what TensorBoard's EventAccumulator reads from the run directory DIR is
# metrics.jsonl, one value per step and tag (also without its purge of orphaned data),
# and no event file holds a (tag, step) twice; prints "steps=... args=..."
check() {
  "$py" - "$1" "$out/metrics.jsonl" <<'PY'
import glob, json, os, sys
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

run, jsonl = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(jsonl)]
steps = [int(r["step"]) for r in rows]
assert steps == sorted(set(steps)), f"metrics.jsonl steps {steps}"

def tag(k):  # transformers' rewrite_logs
    return "eval/" + k[5:] if k.startswith("eval_") else "test/" + k[5:] if k.startswith("test_") else "train/" + k

want = {}
for r in rows:
    for k, v in r.items():
        if k != "step":
            want.setdefault(tag(k), []).append((int(r["step"]), np.float32(v)))

for purge in (True, False):
    ea = EventAccumulator(run, size_guidance={"scalars": 0, "tensors": 0}, purge_orphaned_data=purge)
    ea.Reload()
    tags = ea.Tags()
    assert sorted(tags["scalars"]) == sorted(want), f"tags {sorted(tags['scalars'])} != {sorted(want)}"
    for t, series in want.items():
        got = [(e.step, np.float32(e.value)) for e in ea.Scalars(t)]
        assert [s for s, _ in got] == [s for s, _ in series], f"{t}: steps {[s for s, _ in got]} (purge={purge})"
        for (s, g), (_, w) in zip(got, series):
            assert g == w or (np.isnan(g) and np.isnan(w)), f"{t} step {s}: {g} != {w}"
    assert tags["tensors"] == ["args/text_summary"], tags["tensors"]
    md = ea.SummaryMetadata("args/text_summary")
    assert md.plugin_data.plugin_name == "text", md
    args = ea.Tensors("args/text_summary")
    for a in args:
        cfg = json.loads(a.tensor_proto.string_val[0])
        assert cfg["report_to"] == ["tensorboard"] and cfg["max_steps"] == 6, cfg

# the raw files, as any reader sees them: each (tag, step) once, steps increasing per file
files = sorted(glob.glob(os.path.join(run, "*tfevents*")))
seen = set()
for f in files:
    assert os.path.basename(f).startswith("events.out.tfevents."), f
    for ev in EventFileLoader(f).Load():
        for v in ev.summary.value:
            assert (v.tag, ev.step) not in seen, f"{v.tag} at step {ev.step} twice ({f})"
            seen.add((v.tag, ev.step))
print(f"steps={steps[0]}..{steps[-1]} files={len(files)} args={[a.step for a in args]}")
PY
}

# ---- a fresh run ----
train fresh
dirs=("$out"/runs/*)
[ ${#dirs[@]} -eq 1 ] || fail "expected one run directory under $out/runs, got ${dirs[*]}"
run=${dirs[0]}
# transformers' default_logdir: runs/<%b%d_%H-%M-%S>_<hostname>
[[ $(basename "$run") =~ ^[A-Z][a-z]{2}[0-9]{2}_[0-9]{2}-[0-9]{2}-[0-9]{2}_$(hostname)$ ]] \
  || fail "run directory $(basename "$run") is not <%b%d_%H-%M-%S>_$(hostname)"
files=("$run"/events.out.tfevents.*)
[ ${#files[@]} -eq 1 ] || fail "expected one event file, got ${files[*]}"
[[ $(basename "${files[0]}") =~ ^events\.out\.tfevents\.[0-9]{10}\.$(hostname)\.[0-9]+\.0$ ]] \
  || fail "event file name $(basename "${files[0]}")"
r=$(check "$run") || fail "fresh run: TensorBoard does not read metrics.jsonl back (above)"
[ "$r" = "steps=1..6 files=1 args=[0]" ] || fail "fresh run: $r"
mkdir "$tmp/uncut" && cp "${files[0]}" "$tmp/uncut/"

# ---- resume from step 3: steps 4..6 of the first run must not survive ----
sleep 1 # the resumed file's name must sort after the first (the writer also ensures it)
train resume --resume "$out/checkpoint-3.h5"
grep -q "resumed from .*checkpoint-3.h5 at step 3" "$tmp/resume.log" || fail "did not resume at step 3"
grep -q "cut: 3 event(s) past step 3 dropped" "$tmp/resume.log" || { cat "$tmp/resume.log" >&2; fail "old file not cut"; }
[ "$(ls "$out/runs")" = "$(basename "$run")" ] || fail "the resume did not continue $run: $(ls "$out/runs")"
r=$(check "$run") || fail "resume: TensorBoard does not read one line per tag (above)"
[ "$r" = "steps=1..6 files=2 args=[0, 3]" ] || fail "resume: $r"

# TensorBoard's own restart marker: the first run's uncut file next to the resumed one
# reads as one line only through SessionLog START (the purge), a zig-zag without it
cp "$(ls "$run"/events.out.tfevents.* | tail -n 1)" "$tmp/uncut/"
"$py" - "$tmp/uncut" 2> "$tmp/purge.log" <<'PY' || { cat "$tmp/purge.log" >&2; fail "SessionLog START does not purge the orphaned steps in TensorBoard's reader"; }
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
for purge, want in ((True, [1, 2, 3, 4, 5, 6]), (False, [1, 2, 3, 4, 5, 6, 4, 5, 6])):
    ea = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0}, purge_orphaned_data=purge)
    ea.Reload()
    got = [e.step for e in ea.Scalars("train/loss")]
    assert got == want, (purge, got)
PY

# ---- a killed writer: the newest file cut mid-record, then garbage; the next run goes on ----
last=$(ls "$run"/events.out.tfevents.* | tail -n 1)
size=$(stat -c %s "$last")
head -c $((size - 9)) "$last" > "$tmp/cut" && cat "$tmp/cut" > "$last"
printf 'garbage after a killed writer' >> "$last"
printf 'not an event file' > "$run/events.out.tfevents.0000000001.broken"
sleep 1
train after-kill --resume "$out/checkpoint-3.h5"
grep -q "removed (no summary left): 3 event(s) past step 3 dropped, [1-9][0-9]* damaged byte(s)" "$tmp/after-kill.log" || { cat "$tmp/after-kill.log" >&2; fail "damaged tail not reported"; }
[ ! -e "$run/events.out.tfevents.0000000001.broken" ] || fail "an unreadable event file was left for TensorBoard"
r=$(check "$run") || fail "after a truncated file: TensorBoard does not read one line per tag (above)"
[ "$r" = "steps=1..6 files=2 args=[0, 3]" ] || fail "after a truncated file: $r"
ls -A "$run" | grep -q '\.tmp' && fail "temporary files left behind"

# ---- logging_dir, report_to all / none, errors ----
rm -rf "$out"
train logdir --set logging_dir="$tmp/tb" --set report_to=all
[ -d "$out/runs" ] && fail "logging_dir given, yet output_dir/runs written"
r=$(check "$tmp/tb") || fail "logging_dir: TensorBoard does not read metrics.jsonl back"
rm -rf "$out"
train none --set report_to='["none"]'
[ -e "$out/runs" ] && fail "report_to none wrote event files"
for bad in wandb '["tensorboard","mlflow"]' '["all","tensorboard"]' 3; do
  set +e
  "$dpoc" train --config configs/tiny-llama.json --set output_dir="$tmp/bad" --set report_to="$bad" > "$tmp/bad.log" 2>&1
  rc=$?
  set -e
  [ "$rc" -eq 2 ] || { cat "$tmp/bad.log" >&2; fail "report_to=$bad exited $rc, expected 2"; }
  grep -q "report_to" "$tmp/bad.log" || { cat "$tmp/bad.log" >&2; fail "report_to=$bad: the message does not name the key"; }
done
echo "test_tensorboard_run: ok"

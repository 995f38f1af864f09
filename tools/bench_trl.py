#!/usr/bin/env python3
"""dpoc vs Hugging Face TRL DPOTrainer: throughput, peak memory and loss on the same DPO training.

Driven by tools/bench-vs-trl (which provides the pinned venv, the model and the dpoc build). Subcommands:

  data   write the deterministic preference-pair sets (TRL standard format, text) and their HF token counts
  trl    one TRL DPOTrainer run (one variant) in this process; writes its measurements as JSON
  run    everything: data, machine description, every dpoc and TRL run (each in its own process), table
  table  print the table again from a results.json (and rewrite table.md)

What is compared: the same GGUF weights (transformers dequantizes SmolLM2's Q4_1 GGUF to fp32, as dpoc does), the
same text pairs tokenized by each side's own tokenizer (checked to give the same token totals), the same global
batch, max_length, optimizer, learning rate and sigmoid DPO loss, sequential data order, W warm-up + N timed
optimizer steps. tokens/s is TRL's `num_tokens` (prompt+completion tokens of chosen and rejected, no padding)
over the wall time of the timed steps.
"""

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LN2 = math.log(2.0)

# TRL variants tried per data set and precompute setting; the fastest is the one compared with dpoc. The loss
# comparison always uses fp32 without checkpointing (the numerics dpoc implements).
TRL_VARIANTS = [  # (name, bf16 autocast, gradient checkpointing)
    ("fp32", False, False),
    ("bf16", True, False),
    ("fp32+gc", False, True),
    ("bf16+gc", True, True),
]
LOSS_REFERENCE_VARIANT = "fp32"

# Two data sets of 64 pairs: completions ~40 tokens each; prompts ~50 tokens ("balanced") or 4x the completion
# length ("prompt-heavy", where a prompt shared by chosen and rejected dominates the work).
DATA_SETS = {
    "balanced": {"prompt": (40, 60), "completion": (36, 44)},
    "prompt-heavy": {"prompt": (150, 170), "completion": (36, 44)},
}


def log(msg):
    print(f"[bench-vs-trl {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def quiet_hf_env(threads):
    """Environment for a process that imports torch / transformers: offline, quiet, `threads` intra-op threads."""
    env = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "WANDB_DISABLED": "true",
        "TQDM_DISABLE": "1",
    }
    os.environ.update(env)
    return env


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------

# A fixed vocabulary and a few sentence templates: English-looking text whose tokenization behaves like real prose
# (common words are single tokens, punctuation, capitals), reproducible from the seed alone.
WORDS = {
    "adj": "quiet bright early late small large old young warm cold careful simple busy gentle strong clear quick "
    "slow heavy light open narrow wide local public private modern ancient useful rare common fresh steady "
    "honest sharp calm broad deep shallow rough smooth".split(),
    "noun": "river garden window teacher student market village engine report letter kitchen forest mountain "
    "bridge library doctor farmer painter island harbor station museum school office question answer picture "
    "story journey morning evening winter summer machine bottle basket candle ladder mirror pencil ticket "
    "wallet blanket meadow valley castle tower road field storm cloud".split(),
    "verb_past": "found opened carried painted repaired visited noticed described measured followed cleaned "
    "moved built watched checked answered explained crossed collected delivered".split(),
    "verb": "find open carry paint repair visit notice describe measure follow clean move build watch check "
    "answer explain cross collect deliver".split(),
    "intr_past": "arrived stopped returned changed began ended waited started".split(),
    "name": "Anna Peter Maria John Laura David Sofia Martin Clara Thomas Elena Paul".split(),
    "prep": "near behind under beside across along inside above".split(),
    "det": "the a every one".split(),
}
TEMPLATES = [
    "The {adj} {noun} {verb_past} {det} {noun} {prep} the {adj} {noun}.",
    "{name} {verb_past} that the {noun} was {adj} and {adj}.",
    "After the {noun} {intr_past}, we {verb_past} {det} {adj} {noun} {prep} the {noun}.",
    "It is {adj} to {verb} the {noun} before the {noun} {intr_past}.",
    "{name} and {name} {verb_past} the {adj} {noun} in the {noun}.",
    "Nobody {verb_past} the {noun}, so the {noun} {intr_past} {adj} and {adj}.",
    "Why did the {adj} {noun} {verb} {det} {noun} {prep} the {noun}?",
]
PROMPT_HEAD = "Read the notes below and answer in a few sentences.\n\nNotes:"
PROMPT_TAIL = "\n\nAnswer:"  # completions start with a space: the prompt/completion boundary is a token boundary


def sentence(rng):
    t = rng.choice(TEMPLATES)
    return re.sub(r"\{(\w+)\}", lambda m: rng.choice(WORDS[m.group(1)]), t)


def text_of_tokens(rng, tok, target, head="", tail=""):
    """head + " " + words of random sentences + tail, with `target` tokens (fewer only if one word overshoots)."""
    def count(ws):
        return len(tok(head + " " + " ".join(ws) + tail, add_special_tokens=False)["input_ids"])

    words = []
    while not words or count(words) < target:
        words.extend(sentence(rng).split())
    while len(words) > 1 and count(words) > target:
        words.pop()  # may end mid-sentence, as truncated answers do
    return head + " " + " ".join(words) + tail


def tokenizer_parity(dpoc, model, tok, rows, scratch):
    """Texts whose ids differ between dpoc's tokenizer (built from the GGUF) and transformers' conversion of it:
    the prompt alone and prompt+completion+EOS, the strings TRL's standard-format preparation tokenizes."""
    texts = []
    for r in rows:
        texts += [r["prompt"], r["prompt"] + r["chosen"] + tok.eos_token, r["prompt"] + r["rejected"] + tok.eos_token]
    scratch.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = subprocess.run([dpoc, "tokenize", "--tokenizer", model, "--jsonl", str(scratch), "--add-special-tokens"],
                         check=True, text=True, capture_output=True).stdout
    scratch.unlink()
    theirs = [json.loads(line)["ids"] for line in out.splitlines() if line.strip()]
    ours = [tok(t)["input_ids"] for t in texts]
    return sum(a != b for a, b in zip(ours, theirs)) + abs(len(ours) - len(theirs))


def cmd_data(a):
    quiet_hf_env(1)
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    model = Path(a.model)
    tok = AutoTokenizer.from_pretrained(str(model.parent), gguf_file=model.name)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for k, (name, spec) in enumerate(DATA_SETS.items()):
        rng = random.Random(a.seed * 1000 + k)
        rows, counts = [], {"prompt": [], "chosen": [], "rejected": []}
        for _ in range(a.pairs):
            p = text_of_tokens(rng, tok, rng.randint(*spec["prompt"]), head=PROMPT_HEAD, tail=PROMPT_TAIL)
            c = text_of_tokens(rng, tok, rng.randint(*spec["completion"]))  # " The ...": starts a new token
            r = text_of_tokens(rng, tok, rng.randint(*spec["completion"]))
            rows.append({"prompt": p, "chosen": c, "rejected": r})
        path = out / f"{name}.jsonl"
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        # Token totals the way TRL tokenizes standard rows (EOS appended to completions, prompt ids a prefix of
        # prompt+completion ids); with the per-text parity check above, both sides train on identical sequences.
        eos = tok.eos_token
        total = completion = 0
        for r in rows:
            pid = tok(r["prompt"])["input_ids"]
            for side in ("chosen", "rejected"):
                full = tok(r["prompt"] + r[side] + eos)["input_ids"]
                assert full[: len(pid)] == pid, "prompt is not a token prefix of prompt+completion"
                seq = min(len(full), a.max_length) if a.max_length else len(full)
                total += seq
                completion += seq - min(len(pid), seq)
                counts[side].append(len(full) - len(pid))
            counts["prompt"].append(len(pid))
        if getattr(a, "dpoc", None):
            mismatches = tokenizer_parity(a.dpoc, a.model, tok, rows, out / f"{name}.texts.jsonl")
        else:
            mismatches = None
        stats[name] = {
            "file": str(path),
            "dpoc_tokenizer_mismatches": mismatches,
            "pairs": len(rows),
            "tokens_per_epoch_hf": total,
            "completion_tokens_per_epoch_hf": completion,
            "mean_prompt_tokens": sum(counts["prompt"]) / len(rows),
            "mean_chosen_tokens_with_eos": sum(counts["chosen"]) / len(rows),
            "mean_rejected_tokens_with_eos": sum(counts["rejected"]) / len(rows),
            "max_sequence_tokens": max(p + max(c, r) for p, c, r in zip(counts["prompt"], counts["chosen"], counts["rejected"])),
        }
        log(f"data {name}: {len(rows)} pairs, prompt {stats[name]['mean_prompt_tokens']:.1f} tokens, "
            f"completions {stats[name]['mean_chosen_tokens_with_eos']:.1f}/{stats[name]['mean_rejected_tokens_with_eos']:.1f}, "
            f"texts tokenized differently by dpoc: {mismatches}")
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


# --------------------------------------------------------------------------------------------------------------------
# One TRL run
# --------------------------------------------------------------------------------------------------------------------


def vm_hwm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def cmd_trl(a):
    quiet_hf_env(a.threads)
    import contextlib
    import io
    import logging
    import resource
    import warnings

    import torch

    torch.set_num_threads(a.threads)
    import datasets
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    steps_total = a.warmup + a.steps
    model_path = Path(a.model)
    t_start = time.perf_counter()

    def load():
        # transformers dequantizes the GGUF tensors to fp32: the same weights dpoc computes with
        m = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32)
        # transformers 5.x loads GGUF through its GGUF "quantizer". Without GGUF matmul kernels (the `kernels`
        # package, not installed) it dequantizes every tensor into ordinary fp32 Linear/Embedding parameters, yet
        # still marks the model quantized, and Trainer refuses to fine-tune "purely quantized models". The weights
        # are plain fp32 here -- check that -- so drop the marker with the quantizer's own API.
        odd = {type(mod).__name__ for mod in m.modules() if re.search("gguf|ggml", type(mod).__name__, re.I)}
        bad = [n for n, p in m.named_parameters() if p.dtype != torch.float32 or type(p) is not torch.nn.Parameter]
        assert not bad and not odd, f"GGUF model not fully dequantized: {bad[:3]} {sorted(odd)}"
        if getattr(m, "hf_quantizer", None) is not None:
            m.hf_quantizer.remove_quantization_config(m)
        return m

    tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    policy = load()
    # Without precompute TRL would build the reference from the policy's model id, which cannot name a GGUF file:
    # load it the same way. With precompute, TRL computes the reference log-probs with the (untrained) policy and
    # holds no reference model, exactly as when it is given none -- pass none so its memory use is the real one.
    ref = None if a.precompute else load()
    t_loaded = time.perf_counter()
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    rows = [json.loads(line) for line in open(a.pairs)]
    ds = Dataset.from_list(rows)  # in memory: no datasets cache shared between runs

    class Trainer(DPOTrainer):
        # Records each training micro-batch's loss at full precision and its token count (TRL's definition)
        micro = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.model.training:
                self.micro.append((self.state.global_step, float(loss.detach()), int(inputs["attention_mask"].sum())))
            return loss

    class StepTimer(TrainerCallback):
        # Timestamp at the end of every optimizer step (and at train begin = "end of step 0"); the timed window
        # runs from the end of the last warm-up step to the end of the last step, like dpoc bench's.
        t = {}

        def on_train_begin(self, args, state, control, **kw):
            self.t[0] = time.perf_counter()
            # Reset the high-water mark so the training phase's own peak can be reported too (loading the GGUF
            # and dequantizing it may set the process peak)
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

        def on_step_end(self, args, state, control, **kw):
            self.t[state.global_step] = time.perf_counter()

    timer = StepTimer()
    cfg = DPOConfig(
        output_dir=a.tmp,
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=a.grad_accum,
        max_steps=steps_total,
        learning_rate=a.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=a.max_length,
        truncation_mode="keep_start",
        train_sampling_strategy="sequential",  # file order, no shuffling: the same batches as dpoc
        dataloader_drop_last=False,
        precompute_ref_log_probs=a.precompute,
        bf16=a.bf16,  # on CPU: torch.autocast(bfloat16), fp32 master weights
        fp16=False,
        gradient_checkpointing=a.gc,
        disable_dropout=True,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=42,
    )
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        trainer = Trainer(model=policy, ref_model=ref, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[timer])
        t_init = time.perf_counter()  # includes the reference pass with precompute_ref_log_probs
        trainer.train()
    t_end = time.perf_counter()

    hist = [h for h in trainer.state.log_history if "loss" in h and "step" in h and "train_runtime" not in h]
    by_step = {h["step"]: h for h in hist}
    assert sorted(by_step) == list(range(1, steps_total + 1)), sorted(by_step)
    num_tokens = {s: by_step[s]["num_tokens"] for s in by_step}
    timed_tokens = num_tokens[steps_total] - (num_tokens[a.warmup] if a.warmup else 0)
    wall = timer.t[steps_total] - timer.t[a.warmup]
    # Step losses from the micro-batch losses (mean over the accumulated micro-batches, as the Trainer logs them)
    step_losses = []
    for s in range(steps_total):
        ls = [l for g, l, _ in trainer.micro if g == s]
        step_losses.append(sum(ls) / len(ls))
    my_tokens = sum(n for g, _, n in trainer.micro if g >= a.warmup)
    assert my_tokens == timed_tokens, (my_tokens, timed_tokens)
    result = {
        "side": "trl",
        "variant": a.variant,
        "bf16": a.bf16,
        "gradient_checkpointing": a.gc,
        "threads": a.threads,
        "tokens_per_second": timed_tokens / wall,
        "step_time_s": wall / a.steps,
        "timed_tokens": timed_tokens,
        "step_times_s": [timer.t[s] - timer.t[s - 1] for s in range(1, steps_total + 1)],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_after_load_bytes": rss_after_load,
        "peak_rss_training_bytes": vm_hwm_bytes(),
        "loss": step_losses[-1],
        "logged_loss": by_step[steps_total]["loss"],
        "step_losses": step_losses,
        "num_tokens": [num_tokens[s] for s in range(1, steps_total + 1)],
        "load_s": t_loaded - t_start,
        "trainer_init_s": t_init - t_loaded,
        "train_s": t_end - t_init,
        "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        "attn_implementation": policy.config._attn_implementation,
    }
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------------------------


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def mpi_env():
    # dpoc gets its thread count from num_threads alone (the orchestrator's OMP_* settings are torch's)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    return env


def dpoc_cmd(dpoc, ranks, args):
    return (["mpirun", "-np", str(ranks)] if ranks > 1 else []) + [dpoc] + args


def machine_info(a):
    info = {}
    try:
        lscpu = sh(["lscpu"])
        for key in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)", "L3 cache"):
            m = re.search(rf"^{re.escape(key)}:\s*(.+)$", lscpu, re.M)
            if m:
                info[key] = m.group(1).strip()
        flags = re.search(r"^Flags:\s*(.+)$", lscpu, re.M)
        if flags:
            info["simd"] = sorted(f for f in flags.group(1).split() if f.startswith(("avx", "amx", "fma")))
    except (OSError, subprocess.CalledProcessError):
        pass
    info["nproc"] = os.cpu_count()
    # sgemm peak as dpoc measures it, for both layouts (the MFU denominators)
    for ranks, threads in ((1, 2), (2, 1)):
        out = sh(dpoc_cmd(a.dpoc, ranks, ["bench", "--peak", "--json", "--set", f"num_threads={threads}"]), env=mpi_env())
        info[f"dpoc_peak_{ranks}x{threads}"] = json.loads(out.strip().splitlines()[-1])
    return info


def versions(a):
    v = json.loads(sh([sys.executable, "-c",
                       "import json, importlib.metadata as md, platform; print(json.dumps({'python': platform.python_version(), "
                       "**{p: md.version(p) for p in ('torch', 'transformers', 'trl', 'gguf', 'datasets', 'accelerate')}}))"]))
    try:
        v["dpoc_git"] = sh(["git", "-C", str(REPO), "rev-parse", "HEAD"]).strip()
        v["dpoc_git_dirty"] = bool(sh(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"]).strip())
    except (OSError, subprocess.CalledProcessError):
        v["dpoc_git"] = "unknown"
    v["dpoc_version"] = sh([a.dpoc, "--version"]).strip()
    v["dpoc_binary_sha256"] = hashlib.sha256(Path(a.dpoc).read_bytes()).hexdigest()
    v["openmpi"] = sh(["mpirun", "--version"]).splitlines()[0].strip()
    return v


def torch_peak(threads):
    """fp32 and bf16 matmul GFLOP/s of this torch build with `threads` threads (context for TRL's numbers)."""
    code = (
        "import torch, time, json\n"
        f"torch.set_num_threads({threads})\n"
        "r = {}\n"
        "for dt in (torch.float32, torch.bfloat16):\n"
        "    a = torch.randn(2048, 2048).to(dt); b = torch.randn(2048, 2048).to(dt)\n"
        "    a @ b\n"
        "    t = time.perf_counter(); n = 0\n"
        "    while time.perf_counter() - t < 2.0: a @ b; n += 1\n"
        "    r[str(dt).split('.')[1]] = 2 * 2048**3 * n / (time.perf_counter() - t) / 1e9\n"
        "print(json.dumps(r))\n"
    )
    env = {**os.environ, **quiet_hf_env(threads)}
    return json.loads(sh([sys.executable, "-c", code], env=env).strip().splitlines()[-1])


class Results:
    """results.json, rewritten after every run so an interrupted benchmark keeps what it measured."""

    def __init__(self, path, header):
        self.path = path
        self.data = {**header, "runs": []}
        if path.exists():
            old = json.loads(path.read_text())
            # Runs of the same settings are kept (--resume): a rerun only does what is missing
            if old.get("settings") == header["settings"]:
                self.data["runs"] = old.get("runs", [])
                for k, v in old.items():  # e.g. the machine description of a --no-machine rerun
                    self.data.setdefault(k, v)
        self.save()

    def find(self, key):
        return next((r for r in self.data["runs"] if r["key"] == key and "error" not in r), None)

    def add(self, run):
        self.data["runs"] = [r for r in self.data["runs"] if r["key"] != run["key"]] + [run]
        self.save()

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)


def dpoc_config(a, data_file, work):
    return {
        "model_name_or_path": a.model,
        "train_file": str(data_file),
        "output_dir": str(work / "dpoc-out"),
        "loss_type": ["sigmoid"],
        "beta": 0.1,
        "learning_rate": a.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "per_device_train_batch_size": a.batch,
        "gradient_accumulation_steps": a.grad_accum,
        "max_length": a.max_length,
        "truncation_mode": "keep_start",
        "train_sampling_strategy": "sequential",
        "logging_steps": 1,
        "save_steps": 0,
        "seed": 42,
        "precompute_ref_log_probs": False,
    }


# dpoc layouts: "RxT" = R ranks x T threads; "+gc" adds gradient_checkpointing (memory for compute), "+bf16"
# bf16 products (dpoc's bf16: true: bf16 operands, fp32 accumulation), beside fp32
DPOC_LAYOUTS = ["1x2", "2x1", "1x2+gc", "2x1+bf16"]


def parse_layout(layout):
    shape, *opts = layout.split("+")
    ranks, threads = map(int, shape.split("x"))
    return ranks, threads, "gc" in opts, "bf16" in opts


def run_dpoc(a, cfg_path, precompute, ranks, threads, log_path, gc=False, bf16=False):
    # The global batch stays a.batch * a.grad_accum pairs per step: two ranks take half of each micro-batch
    assert a.batch % ranks == 0, "--batch must be divisible by the number of ranks"
    args = ["bench", "--config", str(cfg_path), "--steps", str(a.steps), "--warmup", str(a.warmup), "--json",
            "--set", f"precompute_ref_log_probs={'true' if precompute else 'false'}",
            "--set", f"num_threads={threads}", "--set", f"per_device_train_batch_size={a.batch // ranks}",
            "--set", f"gradient_checkpointing={'true' if gc else 'false'}",
            "--set", f"bf16={'true' if bf16 else 'false'}"]
    shutil.rmtree(json.loads(cfg_path.read_text())["output_dir"], ignore_errors=True)  # no cached ref log-probs
    t0 = time.perf_counter()
    p = subprocess.run(dpoc_cmd(a.dpoc, ranks, args), text=True, capture_output=True, env=mpi_env())
    log_path.write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"dpoc bench failed (exit {p.returncode}), see {log_path}")
    r = json.loads([l for l in p.stdout.splitlines() if l.startswith("{")][-1])
    r.update(side="dpoc", ranks=ranks, threads=threads, gc=gc, bf16=bf16, process_wall_s=time.perf_counter() - t0,
             timed_tokens=round(r["tokens_per_second"] * r["step_time_s"] * a.steps))
    r["peak_rss_bytes_rank0"] = r["peak_rss_bytes"]
    r["peak_rss_bytes"] = r["peak_rss_bytes_total"]  # per machine, like TRL's single process
    return r


def run_trl(a, data_file, precompute, variant, bf16, gc, log_path, work):
    out = work / "trl-result.json"
    out.unlink(missing_ok=True)
    tmp = tempfile.mkdtemp(prefix="trl-", dir=work)
    cmd = [sys.executable, __file__, "trl", "--model", a.model, "--pairs", str(data_file), "--out", str(out),
           "--tmp", tmp, "--threads", str(a.trl_threads), "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--batch", str(a.batch), "--grad-accum", str(a.grad_accum), "--max-length", str(a.max_length),
           "--learning-rate", str(a.learning_rate), "--variant", variant]
    cmd += ["--precompute"] if precompute else []
    cmd += ["--bf16"] if bf16 else []
    cmd += ["--gc"] if gc else []
    t0 = time.perf_counter()
    p = subprocess.run(cmd, text=True, capture_output=True, env={**os.environ, **quiet_hf_env(a.trl_threads)})
    shutil.rmtree(tmp, ignore_errors=True)
    log_path.write_text(p.stdout + p.stderr)
    if p.returncode != 0 or not out.exists():
        raise RuntimeError(f"TRL run failed (exit {p.returncode}), see {log_path}")
    r = json.loads(out.read_text())
    r["process_wall_s"] = time.perf_counter() - t0
    return r


def cmd_run(a):
    out_dir = Path(a.out)
    work = out_dir / "work"
    logs = out_dir / "logs"
    for d in (work, logs):
        d.mkdir(parents=True, exist_ok=True)
    # One binary for every run, even if build/ is rebuilt meanwhile (the tree is shared)
    shutil.copy2(a.dpoc, work / "dpoc")
    a.dpoc = str(work / "dpoc")
    if a.deadline:
        h, m = map(int, a.deadline.split(":"))
        now = time.gmtime()
        deadline = time.time() + ((h * 60 + m) - (now.tm_hour * 60 + now.tm_min)) * 60 - now.tm_sec
    else:
        deadline = None

    settings = {k: getattr(a, k) for k in ("steps", "warmup", "batch", "grad_accum", "max_length", "learning_rate",
                                           "pairs", "seed", "trl_threads", "model")}
    settings.update(loss_type="sigmoid", beta=0.1, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                    max_grad_norm=1.0, truncation_mode="keep_start", train_sampling_strategy="sequential",
                    optimizer="AdamW (0.9, 0.999, 1e-8)")
    log("data sets")
    stats = cmd_data(argparse.Namespace(model=a.model, out=str(out_dir / "data"), seed=a.seed, pairs=a.pairs,
                                        max_length=a.max_length, dpoc=a.dpoc))
    sets = [s for s in DATA_SETS if not a.sets or s in a.sets.split(",")]
    header = {"settings": settings, "data": stats, "versions": versions(a),
              # CPU, dpoc's SIMD level, BLAS + the kernel it runs (and who chose it), threads, MPI, HDF5
              "dpoc_doctor": json.loads(sh([a.dpoc, "doctor", "--json"]))}
    if not a.no_machine:
        log("machine description (sgemm peaks)")
        header["machine"] = machine_info(a)
        header["machine"][f"torch_matmul_gflops_{a.trl_threads}_threads"] = torch_peak(a.trl_threads)
    res = Results(out_dir / "results.json", header)
    if not a.resume:
        res.data["runs"] = []
        res.save()
    elif a.redo_dpoc:  # a new dpoc build against the TRL runs already measured
        res.data["runs"] = [r for r in res.data["runs"] if r.get("side") != "dpoc"]
        res.save()

    cfgs = {}
    for s in sets:
        cfgs[s] = work / f"dpoc-{s}.json"
        cfgs[s].write_text(json.dumps(dpoc_config(a, Path(stats[s]["file"]), work), indent=1) + "\n")

    # Most important first, so that a run stopped early still has a dpoc/TRL row with the loss check for every
    # setting: fp32 TRL and both dpoc layouts everywhere, then the other TRL variants (checkpointing last: on CPU it
    # only adds recomputation, so it is the least likely to be TRL's fastest)
    grid = [(s, pre) for s in sets for pre in (False, True)]
    jobs = [(s, pre, side, lay) for s, pre in grid
            for side, lay in [("trl", LOSS_REFERENCE_VARIANT)] + [("dpoc", d) for d in DPOC_LAYOUTS]]
    for v in TRL_VARIANTS:
        if v[0] != LOSS_REFERENCE_VARIANT:
            jobs += [(s, pre, "trl", v[0]) for s, pre in grid]
    if a.trl_variants:
        keep = set(a.trl_variants.split(",")) | {LOSS_REFERENCE_VARIANT}
        jobs = [j for j in jobs if j[2] != "trl" or j[3] in keep]
    for s, pre, side, variant in jobs:
        key = f"{s}/{'precompute' if pre else 'ref-model'}/{side}/{variant}"
        if res.find(key):
            log(f"{key}: already measured (--resume)")
            continue
        if deadline and time.time() > deadline:
            log(f"{key}: skipped, past the deadline {a.deadline} UTC")
            res.add({"key": key, "side": side, "set": s, "precompute": pre, "layout": variant,
                     "error": f"not run: past the deadline {a.deadline} UTC"})
            continue
        log(f"{key} ...")
        logp = logs / (key.replace("/", "_") + ".log")
        try:
            if side == "dpoc":
                ranks, threads, gc, bf16 = parse_layout(variant)
                r = run_dpoc(a, cfgs[s], pre, ranks, threads, logp, gc, bf16)
            else:
                bf16, gc = next((v[1], v[2]) for v in TRL_VARIANTS if v[0] == variant)
                r = run_trl(a, Path(stats[s]["file"]), pre, variant, bf16, gc, logp, work)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            log(f"{key}: FAILED: {e}")
            r = {"side": side, "error": str(e)}
        r.update(key=key, set=s, precompute=pre, layout=variant)
        res.add(r)
        if "error" not in r:
            log(f"{key}: {r['tokens_per_second']:.1f} tokens/s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB, "
                f"loss {r['loss']:.6f}")
    table(res.data, out_dir / "table.md")


# --------------------------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------------------------


def mib(b):
    return f"{b / 2**20:,.0f} MiB"


def table(data, md_path):
    runs = [r for r in data["runs"] if "error" not in r]
    st = data["settings"]
    total_steps = st["warmup"] + st["steps"]
    head = ["data", "ref log-probs", "run", "tokens/s", "peak RSS", f"loss @ step {total_steps}",
            "tok/s dpoc/TRL", "tok/s dpoc/TRL fp32", "RSS dpoc/TRL", "loss dpoc-TRL(fp32)"]
    rows, notes, checks = [], [], []
    for s in DATA_SETS:
        for pre in (False, True):
            sel = [r for r in runs if r["set"] == s and r["precompute"] == pre]
            trl = [r for r in sel if r["side"] == "trl"]
            if not sel:
                continue
            best = max(trl, key=lambda r: r["tokens_per_second"]) if trl else None
            # the fastest TRL run in fp32 arithmetic, as dpoc computes (with or without checkpointing)
            fp32 = [r for r in trl if not r["layout"].startswith("bf16")]
            best32 = max(fp32, key=lambda r: r["tokens_per_second"]) if fp32 else None
            ref = next((r for r in trl if r["layout"] == LOSS_REFERENCE_VARIANT), None)
            pre_s = "precomputed" if pre else "ref model"
            if best:
                rows.append([s, pre_s, f"TRL {best['layout']} ({best['threads']} thr)", f"{best['tokens_per_second']:.1f}",
                             mib(best["peak_rss_bytes"]), f"{ref['loss']:.6f} (fp32)" if ref else "-", "", "", "", ""])
            if best32 and best32 is not best:
                rows.append([s, pre_s, f"TRL {best32['layout']} ({best32['threads']} thr)",
                             f"{best32['tokens_per_second']:.1f}", mib(best32["peak_rss_bytes"]), "", "", "", "", ""])
            for r in sorted((r for r in sel if r["side"] == "dpoc"), key=lambda r: r["layout"]):
                lay = (f"dpoc {r['ranks']} rank{'s' if r['ranks'] > 1 else ''} x {r['threads']} thr"
                       + (" +gc" if r.get("gc") else "") + (" bf16" if r.get("bf16") else ""))
                rows.append([s, pre_s, lay, f"{r['tokens_per_second']:.1f}", mib(r["peak_rss_bytes"]), f"{r['loss']:.6f}",
                             f"{r['tokens_per_second'] / best['tokens_per_second']:.2f}x" if best else "-",
                             f"{r['tokens_per_second'] / best32['tokens_per_second']:.2f}x" if best32 else "-",
                             f"{r['peak_rss_bytes'] / best['peak_rss_bytes']:.2f}" if best else "-",
                             f"{r['loss'] - ref['loss']:+.2e}" if ref else "-"])
                if ref and not r.get("bf16"):
                    checks.append(f"{s}, {pre_s}, {lay}: dpoc {r['loss']:.7f} vs TRL fp32 {ref['loss']:.7f}: "
                                  f"difference {r['loss'] - ref['loss']:+.2e}; training moved the loss by "
                                  f"{ref['loss'] - LN2:+.2e} from ln 2 (step 1)")
                if ref and abs(r["timed_tokens"] - ref["timed_tokens"]) > 1:
                    notes.append(f"{s}/{pre_s}/{lay}: timed tokens {r['timed_tokens']} != TRL's {ref['timed_tokens']}")
    variants = ["data", "ref log-probs"] + [v[0] for v in TRL_VARIANTS]
    vrows = []
    for s in DATA_SETS:
        for pre in (False, True):
            sel = {r["layout"]: r for r in runs if r["side"] == "trl" and r["set"] == s and r["precompute"] == pre}
            if sel:
                vrows.append([s, "precomputed" if pre else "ref model"] + [
                    f"{sel[v[0]]['tokens_per_second']:.1f} / {mib(sel[v[0]]['peak_rss_bytes'])}" if v[0] in sel else "-"
                    for v in TRL_VARIANTS])
    missing = [r["key"] + ": " + r["error"] for r in data["runs"] if "error" in r]

    def fmt_text(h, rs):
        w = [max(len(str(x)) for x in col) for col in zip(h, *rs)]
        line = lambda r: "  ".join(str(x).ljust(n) for x, n in zip(r, w))
        return "\n".join([line(h), "  ".join("-" * n for n in w)] + [line(r) for r in rs])

    def fmt_md(h, rs):
        return "\n".join(["| " + " | ".join(h) + " |", "|" + "|".join("---" for _ in h) + "|"] +
                         ["| " + " | ".join(str(x) for x in r) + " |" for r in rs])

    v = data.get("versions", {})
    m = data.get("machine", {})
    doc = data.get("dpoc_doctor", {})
    cpu = f"{m.get('Model name', doc.get('cpu', '?'))}, {m.get('nproc', doc.get('cpu_cores', '?'))} cores"
    if doc:
        cpu += (f" (family {doc.get('cpu_family')} model {doc.get('cpu_model')}, {doc.get('cpu_isa')}); dpoc: "
                f"{doc.get('blas')} {doc.get('blas_version')} {doc.get('blas_kernel')} kernels"
                f"{' (OPENBLAS_CORETYPE=' + doc['blas_coretype'] + ' set by ' + doc['blas_coretype_set_by'] + ')' if doc.get('blas_coretype') else ''}"
                f", its own kernels {doc.get('simd')}")
    caption = (f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32), sigmoid DPO, beta 0.1, lr {st['learning_rate']:g} "
               f"constant, {st['batch'] * st['grad_accum']} pairs per step, max_length {st['max_length']}, "
               f"{st['warmup']} warm-up + {st['steps']} timed steps, sequential order; {cpu}; "
               f"torch {v.get('torch', '?')}, transformers {v.get('transformers', '?')}, trl {v.get('trl', '?')}, "
               f"dpoc {str(v.get('dpoc_git', '?'))[:10]}{' (dirty)' if v.get('dpoc_git_dirty') else ''}. "
               "tokens/s: TRL's num_tokens (prompt+completion of chosen and rejected, no padding) per second; "
               "peak RSS: whole process (dpoc: summed over ranks); TRL rows: its fastest variant (the ratios' base, with "
               "its RSS) and its fastest fp32 variant (the base of the fp32 ratio), loss from its fp32 run; "
               "+gc: dpoc with gradient_checkpointing.")
    print()
    print(fmt_text(head, rows))
    print()
    print("TRL variants (tokens/s / peak RSS):")
    print(fmt_text(variants, vrows))
    print(f"\nLoss after {total_steps} steps (same pairs and global batch; both start at ln 2 = {LN2:.7f}):")
    for c in checks:
        print("  " + c)
    for n in notes + [f"missing: {x}" for x in missing]:
        print("note:", n)
    md = [caption, "", fmt_md(head, rows), "", "TRL variants, tokens/s / peak RSS:", "", fmt_md(variants, vrows)]
    if checks:
        md += ["", f"Loss after {total_steps} steps:", ""] + [f"- {c}" for c in checks]
    if notes or missing:
        md += [""] + [f"- note: {n}" for n in notes] + [f"- missing: {x}" for x in missing]
    md_path.write_text("\n".join(md) + "\n")
    print(f"\nwrote {md_path}")


def cmd_table(a):
    path = Path(a.results)
    table(json.loads(path.read_text()), path.parent / "table.md")


# --------------------------------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q):
        q.add_argument("--model", required=True, help="the SmolLM2 GGUF (tools/fetch-model)")
        q.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
        q.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps before them")
        q.add_argument("--batch", type=int, default=4, help="pairs per micro-batch (TRL, dpoc 1 rank; 2 ranks: half each)")
        q.add_argument("--grad-accum", type=int, default=1)
        q.add_argument("--max-length", type=int, default=256)
        q.add_argument("--learning-rate", type=float, default=1e-6)

    q = sub.add_parser("data")
    q.add_argument("--model", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--seed", type=int, default=1)
    q.add_argument("--pairs", type=int, default=64)
    q.add_argument("--max-length", type=int, default=256)
    q.add_argument("--dpoc", default="", help="also check that dpoc tokenizes every text the same way")

    q = sub.add_parser("trl")
    common(q)
    q.add_argument("--pairs", required=True, help="JSONL pairs file")
    q.add_argument("--out", required=True)
    q.add_argument("--tmp", required=True, help="TRL output_dir (nothing is saved)")
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--precompute", action="store_true")
    q.add_argument("--bf16", action="store_true")
    q.add_argument("--gc", action="store_true")
    q.add_argument("--variant", default="")

    q = sub.add_parser("run")
    common(q)
    q.add_argument("--dpoc", required=True, help="the dpoc binary")
    q.add_argument("--out", default=str(REPO / "runs" / "bench-vs-trl"))
    q.add_argument("--seed", type=int, default=1, help="data generation seed")
    q.add_argument("--pairs", type=int, default=64)
    q.add_argument("--trl-threads", type=int, default=os.cpu_count() or 1,
                   help="TRL's torch threads: the whole machine, as dpoc uses it")
    q.add_argument("--sets", default="", help="comma-separated subset of: " + ",".join(DATA_SETS))
    q.add_argument("--trl-variants", default="", help="comma-separated subset of: " + ",".join(v[0] for v in TRL_VARIANTS))
    q.add_argument("--resume", action="store_true", help="keep runs of results.json measured with the same settings")
    q.add_argument("--redo-dpoc", action="store_true", help="with --resume: measure every dpoc layout again")
    q.add_argument("--deadline", default="", help="HH:MM (UTC): start no new run after it")
    q.add_argument("--no-machine", action="store_true", help="skip the sgemm peak measurements")

    q = sub.add_parser("table")
    q.add_argument("--results", default=str(REPO / "runs" / "bench-vs-trl" / "results.json"))

    a = p.parse_args()
    {"data": cmd_data, "trl": cmd_trl, "run": cmd_run, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    main()

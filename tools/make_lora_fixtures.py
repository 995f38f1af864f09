#!/usr/bin/env python3
"""LoRA (PEFT) DPO reference fixtures for dpoc (tests/fixtures/lora/).

TRL 1.16's DPOTrainer with a peft `LoraConfig` (`peft_config=`, `ref_model=None`: TRL wraps the fp32 policy with
`get_peft_model` and computes the reference log-probs with the adapter disabled, i.e. from the base model) on the
committed fixture models tiny-llama and tiny-qwen2, pairs.jsonl and the DPOConfig of tests/fixtures/<model>/expected/
(only the peft part differs). Cases (CASES below):

  llama-all               tiny-llama, r 8, alpha 16, all-linear, init_lora_weights=False
  llama-qv-rslora         tiny-llama, r 4, alpha 8, q_proj+v_proj, use_rslora, init_lora_weights=False
  qwen2-all               tiny-qwen2, r 8, alpha 16, all-linear, init_lora_weights=False
  qwen2-qv-default-init   tiny-qwen2, r 8, alpha 32, q_proj+v_proj, init_lora_weights=True (B = 0)

For each case, written under OUT/<case>/:

  adapter-init/               the initial adapter as peft saves it (adapter_config.json, adapter_model.safetensors)
  batch.json                  pairs 0-3 through DPOTrainer.compute_loss, sigmoid, beta 0.1: per-sequence and
                              per-token policy / reference log-probs, loss, d loss / d token log-prob, metrics
  grads-step1.safetensors     d loss / d every adapter tensor for that batch, keyed as adapter_model.safetensors
  train3.json                 DPOTrainer.train(), 3 optimizer steps (config of expected/train3.json + peft)
  adapter-step3/              the adapter after step 3 (save_pretrained)

and OUT/MANIFEST.json (versions incl. peft, sha256 of every file). Every value comes from TRL / transformers / peft /
torch (never from dpoc). Reuses tools/make_fixtures.py (imported; it writes nothing on import). Run by
tools/make-fixtures (without arguments), or alone with the fixtures venv:

    ~/.cache/dpoc/fixenv/bin/python tools/make_lora_fixtures.py [OUTDIR]    (default tests/fixtures/lora)

Deterministic: two runs give byte-identical files.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else REPO / "tests" / "fixtures" / "lora"

# make_fixtures reads its output directory from sys.argv[1] at import time and sets the environment (1 torch
# thread, offline HF libraries, deterministic algorithms) before importing torch: import it with a bare argv.
sys.path.insert(0, str(HERE))
_argv, sys.argv = sys.argv, sys.argv[:1]
import make_fixtures as mf  # noqa: E402

sys.argv = _argv

import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

# The models and pairs are the committed ones; make_fixtures' helpers load from mf.OUT. Nothing is written there.
FIXTURES = REPO / "tests" / "fixtures"
mf.OUT = FIXTURES
assert torch.get_num_threads() == 1

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
T0 = time.monotonic()

# name -> (model, LoraConfig keyword arguments besides the common ones of lora_config())
CASES = {
    "llama-all": ("tiny-llama", dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=False,
                                     init_lora_weights=False)),
    "llama-qv-rslora": ("tiny-llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                                           init_lora_weights=False)),
    "qwen2-all": ("tiny-qwen2", dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=False,
                                     init_lora_weights=False)),
    "qwen2-qv-default-init": ("tiny-qwen2", dict(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                 use_rslora=False, init_lora_weights=True)),
}
COMMON_LORA = dict(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def log(msg):
    print(f"[make_lora_fixtures {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def lora_config(case):
    return LoraConfig(**COMMON_LORA, **CASES[case][1])


# --------------------------------------------------------------------------------------------------------------------
# Trainer with a peft config
# --------------------------------------------------------------------------------------------------------------------


def build_trainer(case, ds, tok, outdir, **cfg):
    model_name = CASES[case][0]
    policy = mf.load_model(FIXTURES / model_name)
    # peft records the base model's `name_or_path` as adapter_config.json's base_model_name_or_path; from_pretrained
    # set it to the absolute path of this checkout. Use the repository-relative path so the file is machine-independent.
    policy.name_or_path = f"tests/fixtures/{model_name}"
    with mf.quiet():
        trainer = mf.FixtureDPOTrainer(
            model=policy,
            ref_model=None,
            args=mf.base_args(outdir, **cfg),
            train_dataset=ds,
            processing_class=tok,
            peft_config=lora_config(case),
        )
    # TRL wrapped the policy itself and keeps no reference model: the reference is the adapter-disabled policy
    assert isinstance(trainer.model, PeftModel) and trainer.ref_model is None
    assert list(trainer.model.peft_config) == ["default"]  # no "ref" adapter (that is only for a passed PeftModel)
    assert trainer.model.dtype == torch.float32
    for n, p in trainer.model.named_parameters():
        assert p.requires_grad == (".lora_A.default." in n or ".lora_B.default." in n), n
        assert p.dtype == torch.float32
    return trainer


def saved_name(name):
    """In-memory PeftModel parameter name -> key in adapter_model.safetensors (peft drops the adapter name)."""
    assert ".default." in name
    return name.replace(".default.", ".")


def adapter_state(trainer):
    return {saved_name(n): p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def save_adapter(trainer, path):
    """PeftModel.save_pretrained, keeping only adapter_config.json and adapter_model.safetensors.

    peft writes set-valued config fields (target_modules) with `list(set)`, whose order depends on Python's string
    hash seed; they are handed to save_pretrained as sorted lists instead (same meaning, reproducible bytes).
    """
    if path.exists():
        shutil.rmtree(path)
    cfg = trainer.model.peft_config["default"]
    saved = {k: v for k, v in vars(cfg).items() if isinstance(v, set)}
    for k, v in saved.items():
        setattr(cfg, k, sorted(v))
    try:
        with mf.quiet():
            trainer.model.save_pretrained(str(path))
    finally:
        for k, v in saved.items():
            setattr(cfg, k, v)
    for f in path.iterdir():
        if f.name in ADAPTER_FILES:
            f.chmod(0o644)
        else:  # README.md model card
            f.unlink()
    assert sorted(f.name for f in path.iterdir()) == sorted(ADAPTER_FILES)


def adapter_summary(case, trainer):
    """What peft did with the config: targeted modules, scaling, shapes."""
    _, kw = CASES[case]
    layers = lora_layers(trainer.model.get_base_model())
    scalings = {m.scaling["default"] for m in layers.values()}
    assert len(scalings) == 1
    scaling = scalings.pop()
    want = kw["lora_alpha"] / (math.sqrt(kw["r"]) if kw["use_rslora"] else kw["r"])
    assert scaling == want, (scaling, want)
    for name, m in layers.items():
        assert m.r["default"] == kw["r"] and isinstance(m.lora_dropout["default"], torch.nn.Identity), name
        assert m.lora_B["default"].bias is None and m.lora_A["default"].bias is None
        assert m.lora_A["default"].weight.shape == (kw["r"], m.in_features)
        assert m.lora_B["default"].weight.shape == (m.out_features, kw["r"])
    state = adapter_state(trainer)
    return {
        "model": f"{CASES[case][0]}/",
        "peft_config": {**COMMON_LORA, **kw},
        "scaling": scaling,
        "scaling_rule": "lora_alpha / sqrt(r)" if kw["use_rslora"] else "lora_alpha / r",
        "target_modules_resolved": sorted(layers),
        "num_adapted_modules": len(layers),
        "trainable_parameters": sum(t.numel() for t in state.values()),
        "adapter_tensors": {k: list(t.shape) for k, t in state.items()},  # in named_parameters (optimizer) order
    }


def check_initial_adapter(case, state):
    """Initial A / B as peft initialises them (after TRL's set_seed(args.seed))."""
    init = CASES[case][1]["init_lora_weights"]
    for k, t in state.items():
        fan_in = t.shape[1]
        bound = 1.0 / math.sqrt(fan_in)  # nn.Linear default: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
        if ".lora_B." in k and init is True:
            assert torch.count_nonzero(t) == 0, k  # init_lora_weights=True: B = 0
        else:
            assert 0 < float(t.abs().max()) <= bound, (k, float(t.abs().max()), bound)


# --------------------------------------------------------------------------------------------------------------------
# batch.json + grads-step1.safetensors
# --------------------------------------------------------------------------------------------------------------------


def capture_forwards(trainer, calls):
    """Wrap the (fused-LM-head-patched) base model's forward; tag each call policy / ref by the adapter state."""
    base = trainer.model.get_base_model()
    layers = list(lora_layers(base).values())
    inner = base.forward

    def forward(*args, **kwargs):
        disabled = {m.disable_adapters for m in layers}
        assert len(disabled) == 1
        out = inner(*args, **kwargs)
        if kwargs.get("fused_lm_head"):
            if out.log_probs.requires_grad:
                out.log_probs.retain_grad()
            calls.append(("ref" if disabled.pop() else "policy", torch.is_grad_enabled(), out))
        return out

    base.forward = forward


@torch.no_grad()
def plain_token_logps(model, inputs, rows, shift_mask):
    """Unpadded plain forward + log_softmax (float64) of each row, at the completion label positions."""
    out = []
    for r in rows:
        length = int(inputs["attention_mask"][r].sum())
        ids = inputs["input_ids"][r : r + 1, :length]
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
        lp = torch.log_softmax(logits.double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        out.append(lp[shift_mask[r, : length - 1].bool()])
    return out


def merged_base(model_name, state, scaling):
    """A fresh base model with W := W + scaling * B @ A for every adapted Linear (an independent LoRA forward)."""
    model = mf.load_model(FIXTURES / model_name)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, a in state.items():
            if ".lora_A." not in k:
                continue
            b = state[k.replace(".lora_A.", ".lora_B.")]
            target = k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            params[target].add_((scaling * (b.double() @ a.double())).float())
    return model.eval()


def make_batch(case, ds, tok, tmp):
    model_name = CASES[case][0]
    n = len(mf.BATCH_PAIRS)
    chosen_rows, rejected_rows = list(range(n)), list(range(n, 2 * n))
    cfg = dict(mf.DEFAULT_LOSS_CFG)
    trainer = build_trainer(case, ds, tok, tmp, max_length=None, **cfg)
    assert trainer.loss_types == cfg["loss_type"] and trainer.beta == cfg["beta"]
    init_state = adapter_state(trainer)
    check_initial_adapter(case, init_state)
    save_adapter(trainer, OUT / case / "adapter-init")
    saved = load_file(str(OUT / case / "adapter-init" / "adapter_model.safetensors"))
    assert saved.keys() == init_state.keys() and all(torch.equal(saved[k], init_state[k]) for k in saved)
    summary = adapter_summary(case, trainer)

    calls = []
    capture_forwards(trainer, calls)
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in mf.BATCH_PAIRS])
    inputs = trainer._prepare_inputs(inputs)
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    metrics = {k: sum(v) / len(v) for k, v in trainer._metrics["train"].items()}  # as DPOTrainer.log averages
    # compute_loss: one policy forward with the adapter (with grad), then one with the adapter disabled (no grad)
    assert [(c[0], c[1]) for c in calls] == [("policy", True), ("ref", False)], [(c[0], c[1]) for c in calls]
    pol, ref = calls[0][2], calls[1][2]
    assert not any(m.disable_adapters for m in lora_layers(trainer.model).values())  # re-enabled afterwards

    shift_mask = inputs["completion_mask"][:, 1:]
    pol_lp, ref_lp = pol.log_probs.detach(), ref.log_probs.detach()
    result = {
        "case": case,
        "lora": summary,
        "pair_indices": mf.BATCH_PAIRS,
        "input_ids": inputs["input_ids"].tolist(),
        "attention_mask": inputs["attention_mask"].tolist(),
        "completion_mask": inputs["completion_mask"].tolist(),
        "config": cfg,
        "loss": loss.item(),
        "policy_chosen_logps": pol_lp.sum(1)[:n].tolist(),
        "policy_rejected_logps": pol_lp.sum(1)[n:].tolist(),
        "ref_chosen_logps": ref_lp.sum(1)[:n].tolist(),
        "ref_rejected_logps": ref_lp.sum(1)[n:].tolist(),
        "policy_token_logps": {
            "chosen": mf.per_token(pol_lp, shift_mask, chosen_rows),
            "rejected": mf.per_token(pol_lp, shift_mask, rejected_rows),
        },
        "ref_token_logps": {
            "chosen": mf.per_token(ref_lp, shift_mask, chosen_rows),
            "rejected": mf.per_token(ref_lp, shift_mask, rejected_rows),
        },
        "policy_token_stats": {
            stat: {
                "chosen": mf.per_token(getattr(pol, stat).detach(), shift_mask, chosen_rows),
                "rejected": mf.per_token(getattr(pol, stat).detach(), shift_mask, rejected_rows),
            }
            for stat in ("entropy", "mean_logits", "is_top1")
        },
        "dloss_dtoken_logps": {
            "chosen": mf.per_token(pol.log_probs.grad, shift_mask, chosen_rows),
            "rejected": mf.per_token(pol.log_probs.grad, shift_mask, rejected_rows),
        },
        "metrics": metrics,
    }

    # Gradients: only the adapter tensors have any
    grads = {}
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            grads[saved_name(name)] = p.grad
        else:
            assert p.grad is None, name
    assert grads.keys() == saved.keys()
    if CASES[case][1]["init_lora_weights"] is True:
        # B = 0: the adapter is the identity at step 1, so policy == reference bit for bit and the loss is ln 2;
        # d loss / d A = scaling * B^T (...) = 0 exactly, d loss / d B != 0
        assert torch.equal(pol_lp, ref_lp) and abs(result["loss"] - math.log(2)) < 1e-7
        for k, g in grads.items():
            assert (torch.count_nonzero(g) == 0) == (".lora_A." in k), k
    else:
        assert all(torch.count_nonzero(g) > 0 for g in grads.values())
    mf.save_tensors(OUT / case / "grads-step1.safetensors", grads)

    # Cross-checks (not stored): the reference is the plain base model; the policy is the base model with every
    # adapted weight merged as W + scaling * B @ A (computed here, not by peft); and the policy equals a plain
    # (unfused) forward of the PeftModel. All against unpadded forwards + log_softmax.
    base = mf.load_model(FIXTURES / model_name).eval()
    merged = merged_base(model_name, init_state, summary["scaling"])
    trainer.model.eval()
    checks = [(base, result["ref_token_logps"]), (merged, result["policy_token_logps"]),
              (trainer.model, result["policy_token_logps"])]
    for model, tok_lp in checks:
        for side, rows_ in (("chosen", chosen_rows), ("rejected", rejected_rows)):
            for j, lp in enumerate(plain_token_logps(model, inputs, rows_, shift_mask)):
                assert torch.allclose(lp, torch.tensor(tok_lp[side][j], dtype=torch.float64), atol=2e-5), (side, j)
    # The reference (adapter disabled) is the base policy of tests/fixtures/<model>/expected/batch.json
    committed = json.loads((FIXTURES / model_name / "expected" / "batch.json").read_text())
    assert committed["input_ids"] == result["input_ids"]
    ref_vs_committed = max(
        abs(a - b)
        for side in ("chosen", "rejected")
        for ra, rb in zip(result["ref_token_logps"][side], committed["policy_token_logps"][side])
        for a, b in zip(ra, rb)
    )
    assert ref_vs_committed < 1e-5, ref_vs_committed
    # The gradients through an independent LoRA forward (functional W + scaling * B @ A) and the DPO loss written out
    ind_loss, ind_grads = independent_loss_and_grads(model_name, init_state, summary["scaling"], rows_of(inputs),
                                                     cfg["beta"])
    assert abs(ind_loss.item() - result["loss"]) < 1e-6, (ind_loss.item(), result["loss"])
    grad_diff = max(float((ind_grads[k] - grads[k]).abs().max()) for k in grads)
    assert grad_diff < 1e-5, grad_diff
    mf.write_json(OUT / case / "batch.json", result)
    return result, init_state, {"ref_vs_committed_base_policy": ref_vs_committed, "grads_vs_independent": grad_diff}


def rows_of(inputs):
    """(prompt+chosen, prompt+rejected, chosen completion start, rejected completion start) per pair of a batch."""
    n = inputs["input_ids"].size(0) // 2
    out = []
    for i in range(n):
        seqs = []
        for r in (i, i + n):
            length = int(inputs["attention_mask"][r].sum())
            ids = inputs["input_ids"][r, :length].tolist()
            mask = inputs["completion_mask"][r, :length].tolist()
            seqs.append((ids, mask))
        out.append(seqs)
    return out


def independent_logps(base, weights, ids, mask):
    """Sum of log p(token) over the completion tokens, plain unpadded forward with the given weights."""
    x = torch.tensor([ids])
    logits = torch.func.functional_call(base, weights, args=(), kwargs={"input_ids": x, "use_cache": False}).logits
    lp = torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, x[0, 1:, None])[:, 0]
    return (lp * torch.tensor(mask[1:], dtype=lp.dtype)).sum()


def independent_loss_and_grads(model_name, state, scaling, pairs, beta, base=None):
    """Sigmoid DPO loss (mean over pairs) of the LoRA policy W + scaling * B @ A against the plain base model, and its
    gradient w.r.t. A and B: written out here (torch.func.functional_call on the base model), not peft's or TRL's."""
    base = base or mf.load_model(FIXTURES / model_name).eval()
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in state.items()}
    params = dict(base.named_parameters())
    weights = {}
    for k, a in leaves.items():
        if ".lora_A." in k:
            target = k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            b = leaves[k.replace(".lora_A.", ".lora_B.")]
            weights[target] = params[target].detach() + (b @ a) * scaling
    losses = []
    for (c_ids, c_mask), (r_ids, r_mask) in pairs:
        with torch.no_grad():
            ref_c = independent_logps(base, {}, c_ids, c_mask)
            ref_r = independent_logps(base, {}, r_ids, r_mask)
        pol_c = independent_logps(base, weights, c_ids, c_mask)
        pol_r = independent_logps(base, weights, r_ids, r_mask)
        losses.append(-torch.nn.functional.logsigmoid(beta * ((pol_c - ref_c) - (pol_r - ref_r))))
    loss = torch.stack(losses).mean()
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    return loss.detach(), grads


def independent_train3(model_name, init_state, scaling, rows, result):
    """Replay train3: the logged micro-batches through independent_loss_and_grads, gradient accumulation (mean of the
    micro-batch losses), global-norm clipping over the adapter tensors, AdamW with decoupled weight decay on every A
    and B, at the logged learning rates. Returns the adapter after step 3 and the pre-clip norms."""
    cfg = mf.TRAIN_CFG
    base = mf.load_model(FIXTURES / model_name).eval()
    max_len = cfg["max_length"]
    b1, b2, eps, wd = cfg["adam_beta1"], cfg["adam_beta2"], cfg["adam_epsilon"], cfg["weight_decay"]
    p = {k: v.detach().clone() for k, v in init_state.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p.items()}
    norms = []
    for step, micro in enumerate(result["per_step_micro_batches"]):
        g = {k: torch.zeros_like(t) for k, t in p.items()}
        for pair_ids in micro:
            pairs = []
            for i in pair_ids:
                r = rows[i]
                lp = len(r["prompt_input_ids"])
                pair = []
                for side in ("chosen_input_ids", "rejected_input_ids"):
                    ids = (r["prompt_input_ids"] + r[side])[:max_len]
                    pair.append((ids, [0] * lp + [1] * (len(ids) - lp)))
                pairs.append(pair)
            _, gm = independent_loss_and_grads(model_name, p, scaling, pairs, cfg["beta"], base=base)
            for k in g:
                g[k] += gm[k] / len(micro)
        norm = torch.sqrt(sum((t.double() ** 2).sum() for t in g.values())).item()
        norms.append(norm)
        coef = min(1.0, cfg["max_grad_norm"] / (norm + 1e-6))
        lr = result["log_history"][step]["learning_rate"]
        k_ = step + 1
        for k in p:
            gk = g[k] * coef
            p[k] = p[k] * (1 - lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * gk
            v2[k] = b2 * v2[k] + (1 - b2) * gk * gk
            p[k] = p[k] - (lr / (1 - b1**k_)) * m[k] / (v2[k].sqrt() / math.sqrt(1 - b2**k_) + eps)
    return p, norms


# --------------------------------------------------------------------------------------------------------------------
# train3.json + adapter-step3/
# --------------------------------------------------------------------------------------------------------------------


def make_train3(case, ds, tok, rows, tmp, init_state):
    model_name = CASES[case][0]
    cfg = mf.TRAIN_CFG
    trainer = build_trainer(case, ds, tok, tmp, **cfg)
    # Same seed, same get_peft_model call: the same initial adapter as batch.json / adapter-init
    state0 = adapter_state(trainer)
    assert state0.keys() == init_state.keys() and all(torch.equal(state0[k], init_state[k]) for k in state0)
    base0 = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    max_len = cfg["max_length"]
    trainer.pair_lookup = {
        tuple((r["prompt_input_ids"] + r["chosen_input_ids"])[:max_len]): i for i, r in enumerate(rows)
    }
    trainer.micro_batches = []
    with mf.quiet():
        trainer.train()
    history = trainer.state.log_history
    step_logs = [h for h in history if "train_runtime" not in h]
    summary = [h for h in history if "train_runtime" in h]
    assert len(step_logs) == cfg["max_steps"], history
    summary = {k: v for k, v in summary[0].items() if k not in mf.TIMING_KEYS} if summary else None

    per_step = [[] for _ in range(cfg["max_steps"])]
    per_step_losses = [[] for _ in range(cfg["max_steps"])]
    for mb in trainer.micro_batches:
        per_step[mb["global_step"]].append(mb["pair_indices"])
        per_step_losses[mb["global_step"]].append(mb["loss"])

    # Sanity: clipping active in every step, truncation active, sequential order, logged loss = mean micro-batch loss
    for h in step_logs:
        assert h["grad_norm"] > cfg["max_grad_norm"], (case, h["grad_norm"], cfg["max_grad_norm"])
    assert per_step == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[0, 1], [2, 3]]], per_step
    truncated = [
        i for i, r in enumerate(rows)
        if len(r["prompt_input_ids"]) + max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) > max_len
    ]
    assert truncated and all(max(mb["seq_lengths"]) <= max_len for mb in trainer.micro_batches)
    assert any(max(mb["seq_lengths"]) == max_len for mb in trainer.micro_batches)
    for s, h in enumerate(step_logs):
        mean_mb = sum(per_step_losses[s]) / len(per_step_losses[s])
        assert abs(h["loss"] - mean_mb) <= 1e-6 * max(1.0, abs(mean_mb)), (h["loss"], per_step_losses[s])

    # The base weights are frozen: bit-identical after training
    for n, p in trainer.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base0[n]), n

    # Optimizer: parameter groups in order, names as in adapter_model.safetensors
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    groups, decay, no_decay = [], [], []
    for group in trainer.optimizer.param_groups:
        group_names = [saved_name(names[id(p)]) for p in group["params"]]
        groups.append({"weight_decay": group["weight_decay"], "params": group_names})
        (decay if group["weight_decay"] > 0 else no_decay).extend(group_names)
    trainable = [saved_name(n) for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert decay + no_decay == trainable or sorted(decay + no_decay) == sorted(trainable)
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap accelerate's AcceleratedOptimizer
    optimizer = {
        "class": f"{type(opt).__module__}.{type(opt).__qualname__}",
        **{k: opt.defaults.get(k) for k in ("betas", "eps", "amsgrad", "maximize", "foreach", "fused", "capturable")},
        "lr_scheduler": f"{type(trainer.lr_scheduler).__module__}.{type(trainer.lr_scheduler).__qualname__}",
        "param_groups": groups,
    }
    optimizer["betas"] = list(optimizer["betas"])

    config = dict(cfg)
    config.update(
        {
            "bf16": False,
            "fp16": False,
            "gradient_checkpointing": False,
            "use_cpu": True,
            "save_strategy": "no",
            "dataloader_num_workers": 0,
            "disable_dropout": trainer.args.disable_dropout,
            "precompute_ref_log_probs": trainer.args.precompute_ref_log_probs,
            "pad_to_multiple_of": trainer.args.pad_to_multiple_of,
            "include_num_input_tokens_seen": trainer.args.include_num_input_tokens_seen,
            "logging_nan_inf_filter": trainer.args.logging_nan_inf_filter,
            "policy": f"{model_name}/ + LoRA adapter ({case}/adapter-init/)",
            "ref_model": f"none: {model_name}/ with the adapter disabled (peft disable_adapter)",
            "peft_config": {**COMMON_LORA, **CASES[case][1]},
        }
    )
    result = {
        "case": case,
        "config": config,
        "sampling": "sequential",
        "sampling_note": "TrainingArguments.train_sampling_strategy='sequential' -> torch SequentialSampler "
        "(transformers 5.23 Trainer._get_train_sampler); no custom sampler",
        "log_history": step_logs,
        "final_summary": summary,
        "final_summary_removed_timing_keys": list(mf.TIMING_KEYS),
        "per_step_micro_batches": per_step,
        "per_step_micro_batch_losses": per_step_losses,
        "micro_batches": trainer.micro_batches,
        "truncated_pairs_at_max_length": truncated,
        "optimizer": optimizer,
        "weight_decay_parameters": decay,
        "no_weight_decay_parameters": no_decay,
    }
    mf.write_json(OUT / case / "train3.json", result)
    save_adapter(trainer, OUT / case / "adapter-step3")
    saved = load_file(str(OUT / case / "adapter-step3" / "adapter_model.safetensors"))
    final = adapter_state(trainer)
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in saved)
    # Step 1 has lr 0 (warmup): steps 2 and 3 moved every tensor
    assert all(not torch.equal(final[k], init_state[k]) for k in final)
    # Independent replay (see independent_train3)
    scaling = trainer.model.get_base_model().model.layers[0].self_attn.q_proj.scaling["default"]
    replay, norms = independent_train3(model_name, init_state, scaling, rows, result)
    for h, nrm in zip(step_logs, norms):
        assert abs(h["grad_norm"] - nrm) <= 1e-5 * nrm, (h["grad_norm"], nrm)
    weight_diff = max(float((replay[k] - final[k]).abs().max()) for k in final)
    update_rel = max(float((replay[k] - final[k]).norm() / (final[k] - init_state[k]).norm()) for k in final)
    assert weight_diff < 1e-5, weight_diff
    return result, {"adapter_step3_vs_independent_replay": weight_diff,
                    "adapter_step3_vs_replay_rel_update": update_rel,
                    "grad_norm_vs_replay": max(abs(h["grad_norm"] - n) for h, n in zip(step_logs, norms))}


# --------------------------------------------------------------------------------------------------------------------


def clean_output():
    OUT.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        if (OUT / case).exists():
            shutil.rmtree(OUT / case)
    if (OUT / "MANIFEST.json").exists():
        (OUT / "MANIFEST.json").unlink()


def write_manifest():
    files = sorted(
        p.relative_to(OUT).as_posix() for p in OUT.rglob("*") if p.is_file() and p.name != "MANIFEST.json"
    )
    manifest = {
        "generator": "tools/make_lora_fixtures.py",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": mf.transformers.__version__,
            "trl": mf.trl.__version__,
            "peft": peft.__version__,
            "safetensors": mf.safetensors.__version__,
            "numpy": np.__version__,
            "datasets": mf.datasets.__version__,
        },
        "base_models": "tests/fixtures/tiny-llama/, tests/fixtures/tiny-qwen2/ (sha256 in tests/fixtures/MANIFEST.json)",
        "files": {rel: hashlib.sha256((OUT / rel).read_bytes()).hexdigest() for rel in files},
    }
    mf.write_json(OUT / "MANIFEST.json", manifest)
    return files


def main():
    log(f"writing LoRA fixtures to {OUT}")
    clean_output()
    rows = [json.loads(line) for line in (FIXTURES / "pairs.jsonl").read_text().splitlines()]
    ds = mf.pairs_dataset(rows)
    tok = mf.build_tokenizer()
    with tempfile.TemporaryDirectory(prefix="dpoc-lora-fixtures-") as tmp:
        for case in CASES:
            batch, init_state, checks = make_batch(case, ds, tok, tmp)
            log(f"{case}: batch.json (loss {batch['loss']:.6f}, {batch['lora']['num_adapted_modules']} adapted "
                f"modules, scaling {batch['lora']['scaling']}), grads-step1.safetensors, adapter-init/; checks {checks}")
            res, checks = make_train3(case, ds, tok, rows, tmp, init_state)
            gn = [h["grad_norm"] for h in res["log_history"]]
            log(f"{case}: train3.json, adapter-step3/ (grad_norm per step {gn}); checks {checks}")
    files = write_manifest()
    total = sum((OUT / f).stat().st_size for f in files)
    log(f"done: {len(files)} files, {total} bytes")


if __name__ == "__main__":
    main()

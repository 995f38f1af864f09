#!/usr/bin/env python3
"""bf16 mixed-precision reference fixtures for dpoc (tests/fixtures/bf16/).

For tiny-llama and tiny-qwen2 (the committed models, pairs, reference models and DPOConfig of
tests/fixtures/<model>/expected/), TRL 1.16's DPOTrainer is run in two bf16 variants:

  trl-bf16   DPOConfig(bf16=True) exactly as a user sets it: accelerate wraps the policy's and the reference
             model's forward in torch.autocast("cpu", dtype=torch.bfloat16) (see tests/fixtures/README.md).
  emulated   DPOConfig(bf16=False) (fp32), but with dpoc's `bf16: true` semantics: the two operands of every
             linear-layer product (q/k/v/o, gate/up/down and the LM head; forward, dX = dY·W and dW = dY^T·X)
             are rounded to bfloat16 (round to nearest even), the product is accumulated and written in fp32;
             everything else stays fp32. Every nn.Linear of the policy and the reference model gets the forward
             of `EmulatedBf16Linear`; the LM head, which TRL's fused kernel (trl/kernels/chunked_logprob.py)
             reads as `lm_head.weight` instead of calling the module, gets its operands rounded on the way in
             and the logits gradient rounded inside the kernel's backward (`_backward_tile`).

and, for each, written as the fp32 fixtures are:

  <model>/<variant>/batch.json                 the batch of expected/batch.json (pairs 0-3), case "sigmoid":
                                               loss, per-pair and per-token log-probs, metrics, d loss/d logp
  <model>/<variant>/grads-sigmoid.safetensors  d loss / d parameter of that loss (fp32 master gradients)
  <model>/<variant>/train3.json                DPOTrainer.train(), 3 optimizer steps, config of expected/train3.json
  <model>/<variant>/weights-step3.safetensors  every parameter after step 3

The fp32 values they are compared with are the committed tests/fixtures/<model>/expected/ files (same config);
the generator reruns them here and records how far the rerun is from the committed bytes. summary.json holds,
per quantity, |emulated - fp32|, |trl-bf16 - fp32|, |trl-bf16 - emulated|, |fp32 rerun - fp32 committed| and
|emulated-f64acc - emulated| (the emulation with float64-accumulated linear products: the spread between two
correct implementations of the emulated semantics).
MANIFEST.json holds the versions and the sha256 of every file.

Every value comes from TRL / transformers / torch (never from dpoc). Reuses tools/make_fixtures.py (imported;
it writes nothing on import). Run by tools/make-fixtures (without arguments), or alone with the fixtures venv:

    ~/.cache/dpoc/fixenv/bin/python tools/make_bf16_fixtures.py [OUTDIR]    (default tests/fixtures/bf16)
    ~/.cache/dpoc/fixenv/bin/python tools/make_bf16_fixtures.py --markdown [OUTDIR]   (README tables of summary.json)

Deterministic: two runs give byte-identical files.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MARKDOWN = "--markdown" in sys.argv[1:]  # print the README tables of an existing OUT/summary.json instead
_args = [a for a in sys.argv[1:] if a != "--markdown"]
OUT = Path(_args[0]).resolve() if _args else REPO / "tests" / "fixtures" / "bf16"

# make_fixtures reads its output directory from sys.argv[1] at import time and sets the environment (1 torch
# thread, offline HF libraries, deterministic algorithms) before importing torch: import it with a bare argv.
sys.path.insert(0, str(HERE))
_argv, sys.argv = sys.argv, sys.argv[:1]
import make_fixtures as mf  # noqa: E402

sys.argv = _argv

import contextlib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

import trl.kernels.chunked_logprob as trl_chunked  # noqa: E402
import trl.trainer.utils as trl_utils  # noqa: E402

# The models and pairs are the committed ones; make_fixtures' helpers load from mf.OUT. Nothing is written there
# (make_train3's writes are captured, see capture_writes).
FIXTURES = REPO / "tests" / "fixtures"
mf.OUT = FIXTURES
assert torch.get_num_threads() == 1

VARIANTS = ("trl-bf16", "emulated")  # written to OUT/<model>/<variant>/
FP32 = "fp32"
# Not written, only compared: `emulated` with every EmulatedBf16Linear product accumulated in float64 and rounded to
# fp32 once, i.e. a second, equally valid implementation of the same semantics. Its distance from `emulated` is the
# spread to expect between two correct implementations (fp32 accumulation-order noise flips bf16 roundings).
F64ACC = "emulated-f64acc"
# (a, b) pairs of summary.json: |a - b|; relative values are relative to b
COMPARISONS = {
    "emulated-fp32": ("emulated", FP32),
    "trl_bf16-fp32": ("trl-bf16", FP32),
    "trl_bf16-emulated": ("trl-bf16", "emulated"),
    "fp32_rerun-fp32": ("fp32-rerun", FP32),
    "emulated_f64acc-emulated": (F64ACC, "emulated"),
}
T0 = time.monotonic()


def log(msg):
    print(f"[make_bf16_fixtures {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------------------------
# bf16 rounding
# --------------------------------------------------------------------------------------------------------------------


def bf16r(t):
    """Round an fp32 tensor to the nearest bfloat16 (ties to even), returned as fp32."""
    return t.to(torch.bfloat16).to(torch.float32)


def check_bf16_rounding():
    """torch's fp32 -> bf16 conversion against a bit-level round-to-nearest-even reference (numpy)."""
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    # lower halves: exact, just above 0, just below the tie, the tie, just above the tie, just below the next value
    lows = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    rng = np.random.default_rng(20240611)
    bits = np.concatenate([(hi[:, None] | lows[None, :]).ravel(), rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint32)])
    f = bits.view(np.float32)
    got = torch.from_numpy(f.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
    nan = np.isnan(f)
    rne = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32)
    got_nan = ((got & 0x7F80) == 0x7F80) & ((got & 0x7F) != 0)
    mismatches = int(np.sum(~nan & (got != rne))) + int(np.sum(nan & ~got_nan))
    ties = int(np.sum(~nan & ((bits & 0xFFFF) == 0x8000)))
    assert mismatches == 0, f"torch fp32->bf16 is not round-to-nearest-even: {mismatches} mismatches"
    # spot checks: 1 + 2^-8 is the tie between 1 and 1 + 2^-7 (-> 1, even); 1 + 3*2^-8 -> 1 + 2^-6 (even)
    x = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20], dtype=torch.float32)
    assert bf16r(x).tolist() == [1.0, 1 + 2**-6, -1.0, 1 + 2**-7]
    assert bf16r(torch.tensor([3.4e38]))[0].item() == math.inf  # above the largest bf16 + half ulp: inf, as IEEE
    return {
        "method": "torch.Tensor.to(torch.bfloat16) vs bits -> (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 (NaN -> any NaN)",
        "inputs": int(bits.size),
        "ties": ties,
        "nan_inputs": int(nan.sum()),
        "mismatches": mismatches,
        "round_to_nearest_even": True,
    }


# --------------------------------------------------------------------------------------------------------------------
# Emulated dpoc bf16 semantics
# --------------------------------------------------------------------------------------------------------------------

EMU_CALLS = {"linear_forward": 0, "linear_backward": 0, "lm_head_forward": 0, "lm_head_backward_tiles": 0}


class EmulatedBf16Linear(torch.autograd.Function):
    """y = bf16r(x) @ bf16r(W)^T + b in fp32; dx = bf16r(dy) @ bf16r(W), dW = bf16r(dy)^T @ bf16r(x), db = sum dy."""

    f64acc = False  # F64ACC: the same products accumulated in float64, rounded to fp32 once

    @staticmethod
    def forward(ctx, x, weight, bias):
        xr, wr = bf16r(x), bf16r(weight)
        ctx.save_for_backward(xr, wr)
        ctx.has_bias = bias is not None
        EMU_CALLS["linear_forward"] += 1
        if EmulatedBf16Linear.f64acc:
            return F.linear(xr.double(), wr.double(), None if bias is None else bias.double()).float()
        return F.linear(xr, wr, bias)

    @staticmethod
    def backward(ctx, dy):
        xr, wr = ctx.saved_tensors
        EMU_CALLS["linear_backward"] += 1
        dy2 = dy.reshape(-1, dy.shape[-1])
        dyr = bf16r(dy2)
        x2 = xr.reshape(-1, xr.shape[-1])
        if EmulatedBf16Linear.f64acc:
            dyr, wr, x2 = dyr.double(), wr.double(), x2.double()
        dx = (dyr @ wr).float().reshape(*dy.shape[:-1], wr.shape[1]) if ctx.needs_input_grad[0] else None
        dw = (dyr.t() @ x2).float() if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def _emulated_linear_forward(self, x):
    return EmulatedBf16Linear.apply(x, self.weight, self.bias)


def emulate_linears(model):
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.forward = types.MethodType(_emulated_linear_forward, m)
            n += 1
    return n


class _RoundToBf16(torch.autograd.Function):
    """bf16r(x) forward, identity backward: the LM-head operands as the fused kernel's GEMMs see them."""

    @staticmethod
    def forward(ctx, x):
        return bf16r(x)

    @staticmethod
    def backward(ctx, g):
        return g


_ORIG_CHUNKED = trl_utils._ChunkedLogProbFunction
_ORIG_BACKWARD_TILE = trl_chunked._backward_tile


class _EmulatedChunkedLogProb:
    """TRL's fused LM head (ChunkedLogProbFunction) fed with bf16-rounded hidden states and LM-head weight.

    Its forward then computes fp32 logits = bf16r(h) @ bf16r(W)^T, and its backward (with the logits gradient
    rounded by `_emulated_backward_tile`) dh = bf16r(dz) @ bf16r(W), dW = bf16r(dz)^T @ bf16r(h), accumulated in
    fp32; _RoundToBf16 passes dh and dW on unchanged (the tied Llama weight also gets its embedding gradient)."""

    @staticmethod
    def apply(hidden, weight, bias, *args):
        assert bias is None  # no LM-head bias in these models
        EMU_CALLS["lm_head_forward"] += 1
        return _ORIG_CHUNKED.apply(_RoundToBf16.apply(hidden), _RoundToBf16.apply(weight), bias, *args)


def _emulated_backward_tile(tile, *args, **kwargs):
    _ORIG_BACKWARD_TILE(tile, *args, **kwargs)  # overwrites the logits tile with d loss / d logits (fp32)
    EMU_CALLS["lm_head_backward_tiles"] += 1
    tile.copy_(bf16r(tile))


def check_emulated_linear():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    w = torch.randn(8, 16, generator=g, requires_grad=True)
    b = torch.randn(8, generator=g, requires_grad=True)
    dy = bf16r(torch.randn(3, 5, 8, generator=g))  # bf16-representable: the rounding of dy is then a no-op
    EmulatedBf16Linear.apply(x, w, b).backward(dy)
    xr, wr = bf16r(x.detach()).requires_grad_(), bf16r(w.detach()).requires_grad_()
    br = b.detach().clone().requires_grad_()
    F.linear(xr, wr, br).backward(dy)
    for got, want in ((x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    for k in EMU_CALLS:
        EMU_CALLS[k] = 0


# --------------------------------------------------------------------------------------------------------------------
# Running make_fixtures' cases in one precision mode
# --------------------------------------------------------------------------------------------------------------------

STATE = {"mode": FP32, "prepare_policy": False, "last_trainer": None}
_ORIG_BUILD_TRAINER = mf.build_trainer


def _build_trainer(model_name, ds, tok, outdir, ref_dir=None, **cfg):
    mode = STATE["mode"]
    if mode == "trl-bf16":
        cfg["bf16"] = True
    trainer = _ORIG_BUILD_TRAINER(model_name, ds, tok, outdir, ref_dir=ref_dir, **cfg)
    bf16 = mode == "trl-bf16"
    assert trainer.args.bf16 is bf16 and trainer.args.fp16 is False
    assert trainer.args.mixed_precision == ("bf16" if bf16 else "no")
    assert trainer.accelerator.native_amp is bf16 and trainer.accelerator.mixed_precision == ("bf16" if bf16 else "no")
    # bf16=True keeps fp32 parameters (master weights); the reference model stays fp32 too
    assert trainer.model.dtype == torch.float32 and trainer.ref_model.dtype == torch.float32
    # The reference model is prepared (autocast-wrapped under bf16) in DPOTrainer.__init__, the policy in train()
    assert hasattr(trainer.ref_model, "_original_forward") is bf16
    assert not hasattr(trainer.model, "_original_forward")
    if mode.startswith("emulated"):
        n = emulate_linears(trainer.model)
        assert n == emulate_linears(trainer.ref_model) == (15 if model_name == "tiny-llama" else 22), n
    if STATE["prepare_policy"] and bf16:
        # What Trainer.train() does to the policy before the first step (accelerator.prepare -> prepare_model):
        # wrap its forward in autocast + convert_outputs_to_fp32. Needed for a compute_loss call outside train().
        trainer.accelerator.prepare_model(trainer.model)
        assert hasattr(trainer.model, "_original_forward")
    STATE["last_trainer"] = trainer
    return trainer


mf.build_trainer = _build_trainer


@contextlib.contextmanager
def precision(mode, prepare_policy=False):
    assert mode in (FP32, *VARIANTS, F64ACC)
    STATE.update(mode=mode, prepare_policy=prepare_policy, last_trainer=None)
    if mode.startswith("emulated"):
        trl_utils._ChunkedLogProbFunction = _EmulatedChunkedLogProb
        trl_chunked._backward_tile = _emulated_backward_tile
        EmulatedBf16Linear.f64acc = mode == F64ACC
    try:
        yield
    finally:
        EmulatedBf16Linear.f64acc = False
        trl_utils._ChunkedLogProbFunction = _ORIG_CHUNKED
        trl_chunked._backward_tile = _ORIG_BACKWARD_TILE
        STATE.update(mode=FP32, prepare_policy=False, last_trainer=None)


@contextlib.contextmanager
def capture_writes():
    """make_train3 writes train3.json / weights-step3.safetensors under mf.OUT: capture them instead."""
    files = {}
    orig_json, orig_tensors = mf.write_json, mf.save_tensors
    mf.write_json = lambda path, obj: files.__setitem__(Path(path).name, obj)
    mf.save_tensors = lambda path, tensors: files.__setitem__(
        Path(path).name, {k: v.detach().to(torch.float32).clone() for k, v in tensors.items()}
    )
    try:
        yield files
    finally:
        mf.write_json, mf.save_tensors = orig_json, orig_tensors


VARIANT_NOTES = {
    FP32: "fp32 (bf16=False)",
    "trl-bf16": "DPOConfig(bf16=True): accelerate's torch.autocast('cpu', dtype=torch.bfloat16) around the policy's "
    "and the reference model's forward; fp32 master weights, gradients and AdamW",
    "emulated": "DPOConfig(bf16=False) with dpoc's bf16 semantics: the operands of every linear-layer product "
    "(q/k/v/o, gate/up/down, LM head; forward, dX and dW) rounded to bf16 (nearest even), fp32 accumulation and "
    "output; everything else fp32",
    F64ACC: "emulated, with the q/k/v/o/gate/up/down products (not the fused LM head) accumulated in float64",
}


def run_batch(model_name, ds, tok, tmp, mode):
    """Case `sigmoid` of batch.json (pairs 0-3, max_length=None) through make_fixtures.run_batch_case."""
    n = len(mf.BATCH_PAIRS)
    chosen_rows, rejected_rows = list(range(n)), list(range(n, 2 * n))
    with precision(mode, prepare_policy=True):
        trainer, inputs, store, loss, metrics = mf.run_batch_case(model_name, ds, tok, tmp, dict(mf.DEFAULT_LOSS_CFG))
    shift_mask = inputs["completion_mask"][:, 1:]
    pol, ref = store["policy"], store["ref"]
    pol_lp, ref_lp = pol.log_probs.detach(), ref.log_probs.detach()
    assert pol_lp.dtype == ref_lp.dtype == torch.float32
    result = {
        "precision": VARIANT_NOTES[mode],
        "pair_indices": mf.BATCH_PAIRS,
        "input_ids": inputs["input_ids"].tolist(),
        "config": dict(mf.DEFAULT_LOSS_CFG),
        "loss": loss,
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
    grads = {k: p.grad.detach().clone() for k, p in trainer.model.named_parameters()}
    assert all(g.dtype == torch.float32 for g in grads.values())
    return result, grads


def first_micro_batch_loss(model_name, ds, tok, tmp, mode):
    """Loss of train3's first micro-batch (pairs 0, 1) by a compute_loss call as run_batch makes it: must equal the
    loss train() logged for it, i.e. run_batch sees the precision train() uses."""
    with precision(mode, prepare_policy=True):
        trainer = mf.build_trainer(model_name, ds, tok, tmp, **mf.TRAIN_CFG)
        inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in (0, 1)]))
        trainer.model.train()
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(trainer.model, inputs)
    return loss.item()


def check_emulated_plain_forward(model_name, ds, tok, tmp, fused_batch, fused_grads):
    """Cross-check of the emulated LM head: the same batch through the models' plain forward (fused_lm_head=False:
    full logits from lm_head, itself an EmulatedBf16Linear), log_softmax, the sigmoid DPO loss written out, backward.
    Must agree with TRL's fused path under the emulation to fp32 noise."""
    beta = mf.DEFAULT_LOSS_CFG["beta"]
    with precision("emulated"):
        trainer = mf.build_trainer(model_name, ds, tok, tmp, max_length=None, **mf.DEFAULT_LOSS_CFG)
        inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in mf.BATCH_PAIRS]))
        ids, shift_mask = inputs["input_ids"], inputs["completion_mask"][:, 1:]

        def seq_logps(model):
            logits = model(input_ids=ids, attention_mask=inputs["attention_mask"], use_cache=False).logits[:, :-1]
            return (torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0] * shift_mask).sum(1)

        trainer.model.train()
        trainer.model.zero_grad(set_to_none=True)
        pc, pr = seq_logps(trainer.model).chunk(2)
        with torch.no_grad():
            rc, rr = seq_logps(trainer.ref_model).chunk(2)
        loss = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
        loss.backward()
    grads = {k: p.grad for k, p in trainer.model.named_parameters()}
    plain = pc.tolist() + pr.tolist() + rc.tolist() + rr.tolist()
    fused = sum((fused_batch[k] for k in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
                                          "ref_rejected_logps")), [])
    out = {
        "loss_abs_diff": fdiff(loss.item(), fused_batch["loss"]),
        "seq_logps_max_abs_diff": max(fdiff(x, y) for x, y in zip(plain, fused, strict=True)),
        "grads": dict_dist(grads, fused_grads)["_all"],
    }
    assert out["loss_abs_diff"] < 1e-6 and out["seq_logps_max_abs_diff"] < 2e-5 and out["grads"]["rel_l2"] < 1e-4, out
    return out


_VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "slice", "expand", "unsqueeze", "squeeze", "detach", "alias",
             "clone", "split", "select", "permute", "reshape", "contiguous", "_local_scalar_dense", "slice_backward"}


class _DtypeTrace(TorchDispatchMode):
    """Counts the aten ops that run, keyed by op and the floating dtypes of their inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.ops = {}

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in _VIEW_OPS:
            def dtypes(x):
                return sorted({str(t.dtype).replace("torch.", "") for t in tree_leaves(x)
                               if isinstance(t, torch.Tensor) and t.is_floating_point()})
            odt = dtypes(out)
            if odt:
                key = f"{name}({','.join(dtypes((args, kwargs)))}) -> {','.join(odt)}"
                self.ops[key] = self.ops.get(key, 0) + 1
        return out


def trace_trl_bf16_ops(model_name, ds, tok, tmp):
    """Which aten ops run in which dtype under bf16=True: the batch's compute_loss (policy + reference forward, loss)
    and its backward, as in train()."""
    with precision("trl-bf16", prepare_policy=True):
        trainer = mf.build_trainer(model_name, ds, tok, tmp, max_length=None, **mf.DEFAULT_LOSS_CFG)
        inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in mf.BATCH_PAIRS]))
        trainer.model.train()
        fwd, bwd = _DtypeTrace(), _DtypeTrace()
        with fwd:
            loss = trainer.compute_loss(trainer.model, inputs)
        with bwd:
            loss.backward()
    return {"forward": dict(sorted(fwd.ops.items())), "backward": dict(sorted(bwd.ops.items()))}


def run_train3(model_name, ds, tok, rows, tmp, mode):
    with precision(mode), capture_writes() as files:
        res = mf.make_train3(model_name, ds, tok, rows, tmp)
        trainer = STATE["last_trainer"]
        # train() prepared the policy: autocast-wrapped forward under bf16=True, untouched in fp32
        assert hasattr(trainer.model, "_original_forward") is (mode == "trl-bf16")
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        assert all(p.dtype == torch.float32 for g in opt.param_groups for p in g["params"])
        assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
                   and v.dim() > 0)
    assert files["train3.json"] is res
    res["config"]["bf16"] = mode == "trl-bf16"
    res["precision"] = VARIANT_NOTES[mode]
    return res, files["weights-step3.safetensors"]


# --------------------------------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------------------------------


def fdiff(a, b):
    return abs(float(a) - float(b))


def tensor_dist(a, b, base=None):
    a, b = a.double(), b.double()
    d = a - b
    out = {
        "max_abs": float(d.abs().max()),
        "rel_l2": float(d.norm() / b.norm()) if float(b.norm()) > 0 else (0.0 if float(d.norm()) == 0 else math.inf),
    }
    if base is not None:  # relative to the change of the parameter over the run (b - initial weights)
        upd = (b - base.double()).norm()
        out["rel_l2_update"] = float(d.norm() / upd) if float(upd) > 0 else None
    return out


def dict_dist(a, b, base=None):
    per = {k: tensor_dist(a[k], b[k], None if base is None else base[k]) for k in sorted(b)}
    assert sorted(a) == sorted(b)
    da = torch.cat([(a[k].double() - b[k].double()).reshape(-1) for k in sorted(b)])
    bb = torch.cat([b[k].double().reshape(-1) for k in sorted(b)])
    per["_all"] = {"max_abs": float(da.abs().max()), "rel_l2": float(da.norm() / bb.norm())}
    if base is not None:
        uu = torch.cat([(b[k].double() - base[k].double()).reshape(-1) for k in sorted(b)])
        per["_all"]["rel_l2_update"] = float(da.norm() / uu.norm())
    return per


def batch_distances(A, B):
    out = {"loss": fdiff(A["loss"], B["loss"])}
    for k in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"):
        out[k] = [fdiff(x, y) for x, y in zip(A[k], B[k], strict=True)]
    for k in ("policy_token_logps", "ref_token_logps", "dloss_dtoken_logps"):
        out[k + "_max"] = max(
            fdiff(x, y)
            for side in ("chosen", "rejected")
            for ra, rb in zip(A[k][side], B[k][side], strict=True)
            for x, y in zip(ra, rb, strict=True)
        )
    for stat in ("entropy", "mean_logits"):
        out[f"policy_token_{stat}_max"] = max(
            fdiff(x, y)
            for side in ("chosen", "rejected")
            for ra, rb in zip(A["policy_token_stats"][stat][side], B["policy_token_stats"][stat][side], strict=True)
            for x, y in zip(ra, rb, strict=True)
        )
    out["policy_token_is_top1_flips"] = sum(
        x != y
        for side in ("chosen", "rejected")
        for ra, rb in zip(A["policy_token_stats"]["is_top1"][side], B["policy_token_stats"]["is_top1"][side])
        for x, y in zip(ra, rb, strict=True)
    )
    assert sorted(A["metrics"]) == sorted(B["metrics"])
    out["metrics"] = {k: fdiff(A["metrics"][k], B["metrics"][k]) for k in sorted(B["metrics"])}
    return out


def train_distances(A, B):
    out = {"log_history": []}
    for ha, hb in zip(A["log_history"], B["log_history"], strict=True):
        assert sorted(ha) == sorted(hb)
        out["log_history"].append({k: fdiff(ha[k], hb[k]) for k in sorted(hb)})
    out["per_step_micro_batch_losses"] = [
        [fdiff(x, y) for x, y in zip(sa, sb, strict=True)]
        for sa, sb in zip(A["per_step_micro_batch_losses"], B["per_step_micro_batch_losses"], strict=True)
    ]
    out["final_summary"] = {
        k: fdiff(A["final_summary"][k], B["final_summary"][k]) for k in sorted(B["final_summary"])
    }
    assert A["per_step_micro_batches"] == B["per_step_micro_batches"]
    return out


# --------------------------------------------------------------------------------------------------------------------


def committed_fp32(model_name):
    exp = FIXTURES / model_name / "expected"
    batch = json.loads((exp / "batch.json").read_text())
    case = next(c for c in batch["cases"] if c["name"] == "sigmoid")
    assert case["config"] == mf.DEFAULT_LOSS_CFG
    n = len(batch["pair_indices"])
    fp32 = {
        "loss": case["loss"],
        "metrics": case["metrics"],
        "dloss_dtoken_logps": case["dloss_dtoken_logps"],
        **{k: batch[k] for k in ("pair_indices", "input_ids", "policy_chosen_logps", "policy_rejected_logps",
                                 "ref_chosen_logps", "ref_rejected_logps", "policy_token_logps", "ref_token_logps",
                                 "policy_token_stats")},
    }
    assert n == len(mf.BATCH_PAIRS)
    return (
        fp32,
        load_file(str(exp / "grads-sigmoid.safetensors")),
        json.loads((exp / "train3.json").read_text()),
        load_file(str(exp / "weights-step3.safetensors")),
    )


def same_bytes_json(obj, path, tmp):
    p = Path(tmp) / "cmp.json"
    orig = mf.write_json
    orig(p, obj)
    return p.read_bytes() == path.read_bytes()


def same_bytes_tensors(tensors, path, tmp):
    p = Path(tmp) / "cmp.safetensors"
    mf.save_tensors(p, tensors)
    return p.read_bytes() == path.read_bytes()


def initial_weights(model_name):
    model = mf.load_model(FIXTURES / model_name)
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def clean_output():
    OUT.mkdir(parents=True, exist_ok=True)
    for name in mf.MODELS:
        if (OUT / name).exists():
            shutil.rmtree(OUT / name)
    for f in ("summary.json", "MANIFEST.json"):
        if (OUT / f).exists():
            (OUT / f).unlink()


def write_manifest():
    files = sorted(
        p.relative_to(OUT).as_posix() for p in OUT.rglob("*") if p.is_file() and p.name != "MANIFEST.json"
    )
    manifest = {
        "generator": "tools/make_bf16_fixtures.py",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": mf.transformers.__version__,
            "trl": mf.trl.__version__,
            "safetensors": mf.safetensors.__version__,
            "numpy": np.__version__,
            "datasets": mf.datasets.__version__,
        },
        "fp32_reference": "tests/fixtures/<model>/expected/ (sha256 in tests/fixtures/MANIFEST.json)",
        "files": {rel: hashlib.sha256((OUT / rel).read_bytes()).hexdigest() for rel in files},
    }
    mf.write_json(OUT / "MANIFEST.json", manifest)
    return files


def main():
    log(f"writing bf16 fixtures to {OUT}")
    rounding = check_bf16_rounding()
    check_emulated_linear()
    clean_output()
    rows = [json.loads(line) for line in (FIXTURES / "pairs.jsonl").read_text().splitlines()]
    ds = mf.pairs_dataset(rows)
    tok = mf.build_tokenizer()
    summary = {
        "generator": "tools/make_bf16_fixtures.py",
        "fp32": "the committed fp32 fixtures tests/fixtures/<model>/expected/ (batch.json case sigmoid, "
        "grads-sigmoid.safetensors, train3.json, weights-step3.safetensors)",
        "fp32-rerun": "the same fp32 computation rerun by this generator on this machine",
        F64ACC: VARIANT_NOTES[F64ACC] + " (not stored; a second valid implementation of the emulated semantics)",
        "comparisons": {k: f"|{a} - {b}|" for k, (a, b) in COMPARISONS.items()},
        "relative": "rel_l2 = ||a - b||_2 / ||b||_2; rel_l2_update = ||a - b||_2 / ||b - initial weights||_2; "
        "_all = over all parameters together",
        "bf16_rounding_check": rounding,
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="dpoc-bf16-fixtures-") as tmp:
        for model_name in mf.MODELS:
            c_batch, c_grads, c_train, c_weights = committed_fp32(model_name)
            batch, grads, train, weights = {FP32: c_batch}, {FP32: c_grads}, {FP32: c_train}, {FP32: c_weights}
            for mode in (FP32, *VARIANTS, F64ACC):
                key = "fp32-rerun" if mode == FP32 else mode
                for k in EMU_CALLS:
                    EMU_CALLS[k] = 0
                batch[key], grads[key] = run_batch(model_name, ds, tok, tmp, mode)
                if mode.startswith("emulated"):
                    n_lin = 14 if model_name == "tiny-llama" else 21  # Linear modules besides lm_head
                    assert EMU_CALLS["linear_forward"] == 2 * n_lin and EMU_CALLS["linear_backward"] == n_lin, EMU_CALLS
                    assert EMU_CALLS["lm_head_forward"] == 2 and EMU_CALLS["lm_head_backward_tiles"] == 1, EMU_CALLS
                else:
                    assert not any(EMU_CALLS.values()), EMU_CALLS
                train[key], weights[key] = run_train3(model_name, ds, tok, rows, tmp, mode)
                mb0 = first_micro_batch_loss(model_name, ds, tok, tmp, mode)
                assert mb0 == train[key]["micro_batches"][0]["loss"], (mode, mb0, train[key]["micro_batches"][0])
                log(f"{model_name} {key}: batch loss {batch[key]['loss']!r}, "
                    f"train3 grad_norm {[h['grad_norm'] for h in train[key]['log_history']]}")
                if mode in VARIANTS:
                    d = OUT / model_name / mode
                    mf.write_json(d / "batch.json", batch[key])
                    mf.save_tensors(d / "grads-sigmoid.safetensors", grads[key])
                    mf.write_json(d / "train3.json", train[key])
                    mf.save_tensors(d / "weights-step3.safetensors", weights[key])
            # The fp32 rerun against the committed bytes
            exp = FIXTURES / model_name / "expected"
            rerun_batch_same = all(
                batch["fp32-rerun"][k] == c_batch[k] for k in c_batch
            )
            train_rerun = dict(train["fp32-rerun"])
            del train_rerun["precision"]
            identical = {
                "batch.json (case sigmoid and the batch fields)": rerun_batch_same,
                "grads-sigmoid.safetensors": same_bytes_tensors(grads["fp32-rerun"], exp / "grads-sigmoid.safetensors", tmp),
                "train3.json": same_bytes_json(train_rerun, exp / "train3.json", tmp),
                "weights-step3.safetensors": same_bytes_tensors(weights["fp32-rerun"], exp / "weights-step3.safetensors", tmp),
            }
            log(f"{model_name}: fp32 rerun identical to the committed fixtures: {identical}")
            # The variants really differ from fp32, and fp32 is reproduced by a last rerun (no state leaks between
            # the precision modes of one process)
            for v in (*VARIANTS, F64ACC):
                assert batch[v]["loss"] != batch["fp32-rerun"]["loss"], v
            again, _ = run_batch(model_name, ds, tok, tmp, FP32)
            assert again == batch["fp32-rerun"]

            cross = check_emulated_plain_forward(model_name, ds, tok, tmp, batch["emulated"], grads["emulated"])
            w0 = initial_weights(model_name)
            m = {
                "fp32_rerun_identical_to_committed": identical,
                "emulated_fused_vs_plain_forward": cross,
                "trl_bf16_aten_ops": trace_trl_bf16_ops(model_name, ds, tok, tmp),
                "batch": {},
                "grads": {},
                "train3": {},
                "weights": {},
            }
            for name, (a, b) in COMPARISONS.items():
                m["batch"][name] = batch_distances(batch[a], batch[b])
                m["grads"][name] = dict_dist(grads[a], grads[b])
                m["train3"][name] = train_distances(train[a], train[b])
                m["weights"][name] = dict_dist(weights[a], weights[b], base=w0)
            summary["models"][model_name] = m
    mf.write_json(OUT / "summary.json", summary)
    files = write_manifest()
    total = sum((OUT / f).stat().st_size for f in files)
    log(f"done: {len(files) + 1} files, {total / 1e6:.2f} MB")


def g3(x):
    return "0" if x == 0 else f"{x:.3g}"


def markdown():
    s = json.loads((OUT / "summary.json").read_text())
    cmps = list(COMPARISONS)
    head = "| " + " | ".join(f"\\|{COMPARISONS[c][0]} − {COMPARISONS[c][1]}\\|" for c in cmps) + " |"
    sep = "|---" * (len(cmps) + 1) + "|"
    for model, m in s["models"].items():  # overview rows (the table head is in the README)
        for c in cmps:
            b, g, w = m["batch"][c], m["grads"][c]["_all"], m["weights"][c]["_all"]
            seq = max(max(b[k]) for k in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
                                          "ref_rejected_logps"))
            th = m["train3"][c]["log_history"]
            row = [b["loss"], seq, max(b["policy_token_logps_max"], b["ref_token_logps_max"]), max(b["metrics"].values()),
                   g["max_abs"], g["rel_l2"], w["max_abs"], w["rel_l2_update"], max(h["loss"] for h in th),
                   max(h["grad_norm"] for h in th)]
            print(f"| {model} | \\|{COMPARISONS[c][0]} − {COMPARISONS[c][1]}\\| | " + " | ".join(g3(x) for x in row) + " |")
    for model, m in s["models"].items():
        print(f"\n#### {model}: batch (pairs 0-3, case sigmoid)\n")
        print("| quantity " + head)
        print(sep)
        b = {c: m["batch"][c] for c in cmps}
        print("| loss | " + " | ".join(g3(b[c]["loss"]) for c in cmps) + " |")
        for k in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"):
            for i in range(len(b[cmps[0]][k])):
                print(f"| {k}[{i}] | " + " | ".join(g3(b[c][k][i]) for c in cmps) + " |")
        for k in ("policy_token_logps_max", "ref_token_logps_max", "dloss_dtoken_logps_max",
                  "policy_token_entropy_max", "policy_token_mean_logits_max", "policy_token_is_top1_flips"):
            print(f"| {k} | " + " | ".join(g3(b[c][k]) for c in cmps) + " |")
        for k in b[cmps[0]]["metrics"]:
            print(f"| metrics {k} | " + " | ".join(g3(b[c]["metrics"][k]) for c in cmps) + " |")
        print(f"\n#### {model}: gradients of that loss, max \\|diff\\| (rel_l2)\n")
        print("| tensor " + head)
        print(sep)
        for k in m["grads"][cmps[0]]:
            print(f"| {k} | " + " | ".join(
                f"{g3(m['grads'][c][k]['max_abs'])} ({g3(m['grads'][c][k]['rel_l2'])})" for c in cmps) + " |")
        print(f"\n#### {model}: train3 log history, steps 1 / 2 / 3\n")
        print("| key " + head)
        print(sep)
        t = {c: m["train3"][c] for c in cmps}
        for k in t[cmps[0]]["log_history"][0]:
            print(f"| {k} | " + " | ".join(" / ".join(g3(h[k]) for h in t[c]["log_history"]) for c in cmps) + " |")
        print("| micro-batch losses | " + " | ".join(
            " / ".join(g3(x) for st in t[c]["per_step_micro_batch_losses"] for x in st) for c in cmps) + " |")
        for k in t[cmps[0]]["final_summary"]:
            print(f"| final_summary {k} | " + " | ".join(g3(t[c]["final_summary"][k]) for c in cmps) + " |")
        print(f"\n#### {model}: weights after step 3, max \\|diff\\| (rel_l2_update)\n")
        print("| tensor " + head)
        print(sep)
        for k in m["weights"][cmps[0]]:
            print(f"| {k} | " + " | ".join(
                f"{g3(m['weights'][c][k]['max_abs'])} ({g3(m['weights'][c][k]['rel_l2_update'] or 0)})"
                for c in cmps) + " |")


if __name__ == "__main__":
    markdown() if MARKDOWN else main()

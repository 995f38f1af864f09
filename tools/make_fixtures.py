#!/usr/bin/env python3
"""Reference-fixture generator for dpoc.

Every expected value written here is produced by Hugging Face TRL / transformers / torch (never by dpoc):

  * random tiny Llama / Qwen2 checkpoints saved with `save_pretrained` (policy fp32, reference fp16 / bf16),
  * a small pre-tokenized preference data set (`pairs.jsonl`),
  * per-batch DPO losses, metrics, per-token log-probs and d loss / d log-prob for every TRL loss type,
  * the full parameter gradient of the sigmoid loss,
  * three optimizer steps of `DPOTrainer.train()` (log history + final weights),
  * a MANIFEST.json with versions and sha256 of every generated file.

Run it through `tools/make-fixtures`, which provides a venv with the pinned versions of
`tools/requirements-fixtures.txt`. Output goes to `tests/fixtures/` (or the directory given as first argument).
The output is deterministic: running it twice gives byte-identical files.
"""

import os
import sys


# Must be set before torch / transformers / datasets are imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
os.environ["WANDB_DISABLED"] = "true"

import contextlib  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
torch.set_default_dtype(torch.float32)

import datasets  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from trl import DPOConfig, DPOTrainer  # noqa: E402


datasets.disable_progress_bars()
datasets.disable_caching()
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
logging.getLogger("trl").setLevel(logging.ERROR)
logging.getLogger("accelerate").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")

REPO = Path(__file__).resolve().parent.parent
OUT = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else REPO / "tests" / "fixtures"

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB = 256
MODELS = ("tiny-llama", "tiny-qwen2")
BATCH_PAIRS = [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------------------------------


def log(msg):
    print(f"[make_fixtures {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def check_finite(x, what):
    if isinstance(x, float):
        if not math.isfinite(x):
            raise RuntimeError(f"non-finite value in {what}: {x}")
    elif isinstance(x, dict):
        for k, v in x.items():
            check_finite(v, f"{what}.{k}")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            check_finite(v, f"{what}[{i}]")


def write_json(path, obj):
    check_finite(obj, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Python floats are written with repr(), i.e. the shortest string that round-trips the (float32-valued) double.
    path.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")


def save_tensors(path, tensors):
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sorted(tensors.items())}
    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o644)


def quiet():
    """Swallow stdout/stderr chatter (progress bars, warnings) of the HF libraries."""
    return contextlib.ExitStack() if os.environ.get("DPOC_FIXTURES_VERBOSE") else _Quiet()


class _Quiet:
    def __enter__(self):
        self._o = contextlib.redirect_stdout(io.StringIO())
        self._e = contextlib.redirect_stderr(io.StringIO())
        self._o.__enter__()
        self._e.__enter__()

    def __exit__(self, *exc):
        self._e.__exit__(*exc)
        self._o.__exit__(*exc)
        return False


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer, models, data
# --------------------------------------------------------------------------------------------------------------------


def build_tokenizer():
    # WordLevel vocabulary of 256 tokens: "<pad>"=0, "<s>"=1, "</s>"=2, "t3".."t255". Only used as TRL's
    # `processing_class` (pad / eos ids); the data is pre-tokenized.
    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID, **{f"t{i}": i for i in range(3, VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t3"))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="t3"
    )
    assert tok.pad_token_id == PAD_ID and tok.eos_token_id == EOS_ID and len(tok) == VOCAB
    return tok


def llama_config():
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        hidden_act="silu",
        initializer_range=0.1,
    )


def qwen2_config():
    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        # Not Qwen2's 1e6: over these 16-token sequences the slowest RoPE frequencies of
        # theta=1e6 barely rotate, so the k_proj bias gradient in those dimensions is
        # analytically ~0 and its float32 value is rounding noise (1e-9), which AdamW
        # then normalises into full-size, implementation-dependent updates. theta=100
        # rotates every frequency pair within the sequence and keeps the check meaningful.
        rope_theta=100.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
        max_position_embeddings=128,
        initializer_range=0.1,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        hidden_act="silu",
    )


def randomize_norms_and_biases(model, gen):
    """HF initialises RMSNorm weights to 1 and q/k/v biases to 0; make them random so they are actually tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, model.norm
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def add_noise(model, gen, std=0.05):
    with torch.no_grad():
        for _, p in model.named_parameters():  # tied parameters are visited once
            p.add_(std * torch.randn(p.shape, generator=gen))


def save_model(model, path, dtype, **kwargs):
    if path.exists():
        shutil.rmtree(path)
    model = model.to(dtype)
    with quiet():
        model.save_pretrained(str(path), safe_serialization=True, **kwargs)
    for f in path.iterdir():
        if not (f.name in ("config.json", "generation_config.json") or f.name.startswith("model")):
            f.unlink()
        else:
            f.chmod(0o644)


def make_models():
    specs = {
        "tiny-llama": (LlamaForCausalLM, llama_config, 1234, torch.float16, {}),
        "tiny-qwen2": (Qwen2ForCausalLM, qwen2_config, 5678, torch.bfloat16, {"max_shard_size": "400KB"}),
    }
    for name, (cls, cfg_fn, seed, ref_dtype, save_kwargs) in specs.items():
        torch.manual_seed(seed)
        model = cls(cfg_fn()).to(torch.float32)
        gen = torch.Generator().manual_seed(seed + 1)
        randomize_norms_and_biases(model, gen)
        save_model(model, OUT / name, torch.float32, **save_kwargs)
        # Reference model: policy + N(0, 0.05) noise, saved in half precision (single file)
        noise_gen = torch.Generator().manual_seed(seed + 2)
        add_noise(model, noise_gen, 0.05)
        save_model(model, OUT / f"{name}-ref", ref_dtype)
    files = sorted(p.name for p in (OUT / "tiny-qwen2").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) >= 2, files


def load_model(path):
    # Loaded back in fp32 from disk, exactly as dpoc sees it (f16 / bf16 reference weights are upcast).
    with quiet():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    assert model.dtype == torch.float32
    return model


# Chosen-completion tokens replaced by the greedy (argmax over ids 3..255) continuation of one policy, so that
# `mean_token_accuracy` (TRL's `is_top1`) is not trivially 0: (row, number of leading chosen tokens, model).
GREEDY_CHOSEN = [(0, 5, "tiny-llama"), (1, 1, "tiny-qwen2"), (2, 4, "tiny-qwen2"), (4, 3, "tiny-llama")]


@torch.no_grad()
def next_token_logits(model, ids):
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()


def make_pairs():
    # (prompt, chosen, rejected) lengths. Rows 3, 5 and 7 have prompt+completion > 16, so `max_length=16` with
    # `keep_start` cuts a completion tail; every prompt is < 16.
    lengths = [(3, 5, 2), (7, 1, 4), (2, 9, 6), (12, 5, 3), (5, 6, 9), (10, 8, 2), (4, 2, 7), (11, 4, 9)]
    rng = random.Random(20240611)
    rows = []
    for lp, lc, lr in lengths:
        rows.append(
            {
                "prompt_input_ids": [rng.randrange(3, VOCAB) for _ in range(lp)],
                "chosen_input_ids": [rng.randrange(3, VOCAB) for _ in range(lc)],
                "rejected_input_ids": [rng.randrange(3, VOCAB) for _ in range(lr)],
            }
        )
    policies = {name: load_model(OUT / name).eval() for name in MODELS}
    for row, n, name in GREEDY_CHOSEN:
        r = rows[row]
        for k in range(n):
            logits = next_token_logits(policies[name], r["prompt_input_ids"] + r["chosen_input_ids"][:k])
            r["chosen_input_ids"][k] = 3 + int(logits[3:].argmax())
    # Robustness of `is_top1` for the C tests: the label's logit must not be within 1e-3 of the best other token
    for name, model in policies.items():
        for r in rows:
            for k in range(len(r["chosen_input_ids"])):
                logits = next_token_logits(model, r["prompt_input_ids"] + r["chosen_input_ids"][:k])
                label = r["chosen_input_ids"][k]
                other = torch.cat([logits[:label], logits[label + 1 :]]).max()
                assert abs(float(logits[label] - other)) > 1e-3, (name, r, k)
    assert len({tuple(r["prompt_input_ids"]) for r in rows}) == len(rows)  # prompts identify rows
    assert all(3 <= t < VOCAB for r in rows for v in r.values() for t in v)
    with open(OUT / "pairs.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


def pairs_dataset(rows):
    # TRL's names for pre-tokenized preference data
    return Dataset.from_list(
        [
            {"prompt_ids": r["prompt_input_ids"], "chosen_ids": r["chosen_input_ids"], "rejected_ids": r["rejected_input_ids"]}
            for r in rows
        ]
    )


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------


class FixtureDPOTrainer(DPOTrainer):
    """DPOTrainer with two additions that do not change any computation.

    * `_prepare_dataset`: TRL 1.16's version always runs `extract_prompt` / EOS appending / tokenization, which
      requires text columns. Our data is already tokenized (`prompt_ids`, `chosen_ids`, `rejected_ids`), so only
      the last step of TRL's preparation is applied: dropping examples whose prompt alone fills `max_length` under
      `keep_start` (none of ours do).
    * `compute_loss`: records which pairs each training micro-batch contained, and its loss.
    """

    pair_lookup = None  # tuple(prompt+chosen ids, possibly truncated) -> pair index
    micro_batches = None  # list of dicts, filled during train()

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names)
        if args.max_length is not None and args.truncation_mode == "keep_start":
            dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length)
        return dataset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.micro_batches is not None and self.model.training:
            n = inputs["input_ids"].size(0) // 2
            idx = []
            for row in range(n):
                length = int(inputs["attention_mask"][row].sum())
                idx.append(self.pair_lookup[tuple(inputs["input_ids"][row, :length].tolist())])
            self.micro_batches.append(
                {
                    "global_step": self.state.global_step,
                    "pair_indices": idx,
                    "loss": loss.item(),
                    "seq_lengths": inputs["attention_mask"].sum(dim=1).tolist(),
                    "completion_tokens": inputs["completion_mask"].sum(dim=1).tolist(),
                }
            )
        return loss


def base_args(outdir, **kw):
    args = dict(
        output_dir=outdir,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=42,
    )
    args.update(kw)
    return DPOConfig(**args)


def build_trainer(model_name, ds, tok, outdir, ref_dir=None, **cfg):
    policy = load_model(OUT / model_name)
    ref = load_model(OUT / (ref_dir or f"{model_name}-ref"))
    with quiet():
        trainer = FixtureDPOTrainer(
            model=policy,
            ref_model=ref,
            args=base_args(outdir, **cfg),
            train_dataset=ds,
            processing_class=tok,
        )
    return trainer


def capture_forward(module, store, key):
    """Wrap the (fused-LM-head-patched) forward so the FusedCausalLMOutput can be inspected."""
    inner = module.forward

    def forward(*args, **kwargs):
        out = inner(*args, **kwargs)
        if kwargs.get("fused_lm_head"):
            if out.log_probs.requires_grad:
                out.log_probs.retain_grad()
            store[key] = out
        return out

    module.forward = forward


def per_token(values, shift_mask, rows):
    """values[r, t] at label positions where the shifted completion mask is 1, in order."""
    return [values[r][shift_mask[r].bool()].tolist() for r in rows]


# --------------------------------------------------------------------------------------------------------------------
# Per-batch reference
# --------------------------------------------------------------------------------------------------------------------

DEFAULT_LOSS_CFG = {
    "loss_type": ["sigmoid"],
    "loss_weights": None,
    "beta": 0.1,
    "label_smoothing": 0.0,
    "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 0.5,
    "use_weighting": False,
    "ld_alpha": None,
    "discopop_tau": 0.05,
}


def cases():
    out = []

    def case(name, **kw):
        cfg = dict(DEFAULT_LOSS_CFG)
        cfg.update(kw)
        out.append((name, cfg))

    for lt in ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
               "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]:
        case(lt, loss_type=[lt], label_smoothing=0.1 if lt in ("exo_pair", "robust", "aot") else 0.0)
    case("mpo", loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    case("sigmoid_forward_kl", f_divergence_type="forward_kl")
    case("sigmoid_js", f_divergence_type="js_divergence")
    case("sigmoid_alpha", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5)
    case("hinge_beta0.5", loss_type=["hinge"], beta=0.5)
    case("sigmoid_wpo", use_weighting=True)
    case("sigmoid_ld", ld_alpha=0.5)
    case("ipo_wpo_ld", loss_type=["ipo"], use_weighting=True, ld_alpha=0.3)
    return out


def run_batch_case(model_name, ds, tok, outdir, cfg, ref_dir=None):
    trainer = build_trainer(model_name, ds, tok, outdir, ref_dir=ref_dir, max_length=None, **cfg)
    # The trainer must have taken the case's settings verbatim
    assert trainer.loss_types == cfg["loss_type"] and trainer.beta == cfg["beta"]
    assert trainer.use_weighting == cfg["use_weighting"] and trainer.ld_alpha == cfg["ld_alpha"]
    store = {}
    capture_forward(trainer.model, store, "policy")
    capture_forward(trainer.ref_model, store, "ref")
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in BATCH_PAIRS])
    inputs = trainer._prepare_inputs(inputs)
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    metrics = {k: sum(v) / len(v) for k, v in trainer._metrics["train"].items()}  # as DPOTrainer.log averages
    return trainer, inputs, store, loss.item(), metrics


def make_batch_reference(model_name, ds, tok, tmp):
    n = len(BATCH_PAIRS)
    chosen_rows, rejected_rows = list(range(n)), list(range(n, 2 * n))
    result = {"pair_indices": BATCH_PAIRS}
    entries = []
    for name, cfg in cases():
        trainer, inputs, store, loss, metrics = run_batch_case(model_name, ds, tok, tmp, cfg)
        shift_mask = inputs["completion_mask"][:, 1:]
        pol, ref = store["policy"], store["ref"]
        if name == "sigmoid":
            result["input_ids"] = inputs["input_ids"].tolist()
            result["attention_mask"] = inputs["attention_mask"].tolist()
            result["completion_mask"] = inputs["completion_mask"].tolist()
            pol_lp, ref_lp = pol.log_probs.detach(), ref.log_probs.detach()
            result["policy_chosen_logps"] = pol_lp.sum(1)[:n].tolist()
            result["policy_rejected_logps"] = pol_lp.sum(1)[n:].tolist()
            result["ref_chosen_logps"] = ref_lp.sum(1)[:n].tolist()
            result["ref_rejected_logps"] = ref_lp.sum(1)[n:].tolist()
            result["policy_token_logps"] = {
                "chosen": per_token(pol_lp, shift_mask, chosen_rows),
                "rejected": per_token(pol_lp, shift_mask, rejected_rows),
            }
            result["ref_token_logps"] = {
                "chosen": per_token(ref_lp, shift_mask, chosen_rows),
                "rejected": per_token(ref_lp, shift_mask, rejected_rows),
            }
            # Extra per-token statistics of the policy's next-token distributions (TRL's fused LM head outputs)
            result["policy_token_stats"] = {
                stat: {
                    "chosen": per_token(getattr(pol, stat).detach(), shift_mask, chosen_rows),
                    "rejected": per_token(getattr(pol, stat).detach(), shift_mask, rejected_rows),
                }
                for stat in ("entropy", "mean_logits", "is_top1")
            }
            # Cross-check TRL's fused LM head against a plain, unpadded forward + log_softmax of each sequence
            for model, tok_lp in ((trainer.model, result["policy_token_logps"]), (trainer.ref_model, result["ref_token_logps"])):
                for side, rows_ in (("chosen", chosen_rows), ("rejected", rejected_rows)):
                    for j, r in enumerate(rows_):
                        length = int(inputs["attention_mask"][r].sum())
                        ids = inputs["input_ids"][r : r + 1, :length]
                        with torch.no_grad():
                            logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
                        lp = torch.log_softmax(logits.double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
                        lp = lp[shift_mask[r, : length - 1].bool()]
                        assert torch.allclose(lp, torch.tensor(tok_lp[side][j], dtype=torch.float64), atol=2e-5), (side, j)
            grads = {k: p.grad for k, p in trainer.model.named_parameters()}
            assert all(g is not None for g in grads.values())
            save_tensors(OUT / model_name / "expected" / "grads-sigmoid.safetensors", grads)
        else:
            # The policy/reference forward does not depend on the loss configuration
            assert torch.equal(pol.log_probs.detach().sum(1), torch.tensor(result["policy_chosen_logps"] + result["policy_rejected_logps"]))
        grad = pol.log_probs.grad
        entry = {
            "name": name,
            "config": cfg,
            "loss": loss,
            "dloss_dtoken_logps": {
                "chosen": per_token(grad, shift_mask, chosen_rows),
                "rejected": per_token(grad, shift_mask, rejected_rows),
            },
            "metrics": metrics,
        }
        if cfg["use_weighting"]:
            # WPO weights use log(sum_v p_v^2) of the policy's next-token distribution (no gradient)
            lssp = pol.log_sum_sq_probs.detach()
            entry["policy_token_log_sum_sq_probs"] = {
                "chosen": per_token(lssp, shift_mask, chosen_rows),
                "rejected": per_token(lssp, shift_mask, rejected_rows),
            }
        entries.append(entry)
        del trainer
    result["cases"] = entries

    # Reference = the policy itself (a second copy loaded from the same directory): sigmoid loss must be ln 2
    trainer, _, _, loss, _ = run_batch_case(model_name, ds, tok, tmp, dict(DEFAULT_LOSS_CFG), ref_dir=model_name)
    result["policy_equals_ref_sigmoid_loss"] = loss
    assert abs(loss - math.log(2)) < 1e-7, loss
    write_json(OUT / model_name / "expected" / "batch.json", result)
    return result


# --------------------------------------------------------------------------------------------------------------------
# Three optimizer steps
# --------------------------------------------------------------------------------------------------------------------

TRAIN_CFG = {
    "loss_type": ["sigmoid"],
    "beta": 0.1,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "max_steps": 3,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "linear",
    "warmup_steps": 1,
    "weight_decay": 0.01,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 0.1,
    "logging_steps": 1,
    "seed": 42,
    "max_length": 16,
    "truncation_mode": "keep_start",
    "train_sampling_strategy": "sequential",
    "dataloader_drop_last": False,
    "optim": "adamw_torch_fused",  # the transformers 5.23 default with torch >= 2.8
}

# Keys of the end-of-training summary that depend on wall-clock time (not reproducible)
TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")


def make_train3(model_name, ds, tok, rows, tmp):
    trainer = build_trainer(model_name, ds, tok, tmp, **TRAIN_CFG)
    max_len = TRAIN_CFG["max_length"]
    trainer.pair_lookup = {
        tuple((r["prompt_input_ids"] + r["chosen_input_ids"])[:max_len]): i for i, r in enumerate(rows)
    }
    trainer.micro_batches = []
    with quiet():
        trainer.train()
    history = trainer.state.log_history
    step_logs = [h for h in history if "train_runtime" not in h]
    summary = [h for h in history if "train_runtime" in h]
    assert len(step_logs) == TRAIN_CFG["max_steps"], history
    summary = {k: v for k, v in summary[0].items() if k not in TIMING_KEYS} if summary else None

    per_step = [[] for _ in range(TRAIN_CFG["max_steps"])]
    per_step_losses = [[] for _ in range(TRAIN_CFG["max_steps"])]
    for mb in trainer.micro_batches:
        per_step[mb["global_step"]].append(mb["pair_indices"])
        per_step_losses[mb["global_step"]].append(mb["loss"])

    # Sanity: clipping active in every step, truncation active in the run, sequential order
    for h in step_logs:
        assert h["grad_norm"] > TRAIN_CFG["max_grad_norm"], (h["grad_norm"], TRAIN_CFG["max_grad_norm"])
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

    # Which parameters get weight decay (transformers: not biases, not *norm* weights)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decay, no_decay = [], []
    for group in trainer.optimizer.param_groups:
        target = decay if group["weight_decay"] > 0 else no_decay
        target.extend(names[id(p)] for p in group["params"])

    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap accelerate's AcceleratedOptimizer
    optimizer = {
        "class": f"{type(opt).__module__}.{type(opt).__qualname__}",
        **{k: opt.defaults.get(k) for k in ("betas", "eps", "amsgrad", "maximize", "foreach", "fused", "capturable")},
        "lr_scheduler": f"{type(trainer.lr_scheduler).__module__}.{type(trainer.lr_scheduler).__qualname__}",
    }
    optimizer["betas"] = list(optimizer["betas"])

    config = dict(TRAIN_CFG)
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
            "policy": f"{model_name}/",
            "ref_model": f"{model_name}-ref/ (loaded in fp32)",
        }
    )
    result = {
        "config": config,
        "sampling": "sequential",
        "sampling_note": "TrainingArguments.train_sampling_strategy='sequential' -> torch SequentialSampler "
        "(transformers 5.23 Trainer._get_train_sampler); no custom sampler",
        "log_history": step_logs,
        "final_summary": summary,
        "final_summary_removed_timing_keys": list(TIMING_KEYS),
        "per_step_micro_batches": per_step,
        "per_step_micro_batch_losses": per_step_losses,
        "micro_batches": trainer.micro_batches,
        "truncated_pairs_at_max_length": truncated,
        "optimizer": optimizer,
        "weight_decay_parameters": decay,
        "no_weight_decay_parameters": no_decay,
    }
    write_json(OUT / model_name / "expected" / "train3.json", result)
    save_tensors(
        OUT / model_name / "expected" / "weights-step3.safetensors",
        {k: p for k, p in trainer.model.named_parameters()},
    )
    return result


# --------------------------------------------------------------------------------------------------------------------


def clean_output():
    OUT.mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        for d in (OUT / name, OUT / f"{name}-ref"):
            if d.exists():
                shutil.rmtree(d)
    for f in ("pairs.jsonl", "MANIFEST.json"):
        if (OUT / f).exists():
            (OUT / f).unlink()


def generated_files():
    """The files this generator writes (tests/fixtures/ also holds other generators' directories)."""
    paths = [OUT / "pairs.jsonl"]
    for name in MODELS:
        for d in (OUT / name, OUT / f"{name}-ref"):
            paths.extend(p for p in d.rglob("*") if p.is_file())
    return sorted(p.relative_to(OUT).as_posix() for p in paths)


def write_manifest():
    files = {rel: hashlib.sha256((OUT / rel).read_bytes()).hexdigest() for rel in generated_files()}
    manifest = {
        "generator": "tools/make_fixtures.py",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
            "datasets": datasets.__version__,
        },
        "files": files,
    }
    write_json(OUT / "MANIFEST.json", manifest)
    return files


def main():
    log(f"writing fixtures to {OUT}")
    clean_output()
    make_models()
    log("models written")
    rows = make_pairs()
    ds = pairs_dataset(rows)
    tok = build_tokenizer()
    with tempfile.TemporaryDirectory(prefix="dpoc-fixtures-") as tmp:
        for model_name in MODELS:
            res = make_batch_reference(model_name, ds, tok, tmp)
            log(f"{model_name}: batch.json ({len(res['cases'])} cases), grads-sigmoid.safetensors")
            res = make_train3(model_name, ds, tok, rows, tmp)
            gn = [h["grad_norm"] for h in res["log_history"]]
            log(f"{model_name}: train3.json, weights-step3.safetensors (grad_norm per step {gn})")
    files = write_manifest()
    total = sum((OUT / f).stat().st_size for f in files)
    log(f"done: {len(files)} files, {total / 1e6:.2f} MB")


if __name__ == "__main__":
    T0 = time.monotonic()
    main()

"""Reference values for dpoc's optimizer pieces, from torch and transformers:
- the learning rate at every step of each HF scheduler (transformers.get_scheduler),
- warm-up steps from TrainingArguments.get_warmup_steps,
- torch.optim.AdamW on a small parameter vector over several steps,
- torch.nn.utils.clip_grad_norm_.
Writes tests/fixtures/optim/{schedules,adamw}.json. Run by tools/make-fixtures."""
import json
import os
import sys

import torch
import transformers
from transformers import get_scheduler

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "optim")
BASE_LR = 2e-4
TOTAL = 20


def lr_series(name, warmup, kwargs):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=BASE_LR)
    sch = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=TOTAL, scheduler_specific_kwargs=kwargs)
    out = []
    for _ in range(TOTAL):
        out.append(opt.param_groups[0]["lr"])  # the rate this step uses
        opt.step()
        sch.step()
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    cases = [
        ("constant", 0, {}),
        ("constant_with_warmup", 4, {}),
        ("linear", 0, {}),
        ("linear", 5, {}),
        ("cosine", 3, {}),
        ("cosine", 3, {"num_cycles": 1.5}),
        ("cosine_with_min_lr", 2, {"min_lr": 1e-5}),
        ("cosine_with_min_lr", 2, {"min_lr_rate": 0.25}),
    ]
    sched = []
    for name, warmup, kwargs in cases:
        sched.append({"lr_scheduler_type": name, "warmup_steps": warmup, "lr_scheduler_kwargs": kwargs,
                      "learning_rate": BASE_LR, "total_steps": TOTAL, "lr": lr_series(name, warmup, kwargs)})
    warm = []
    for ws in [0, 3, 0.1, 0.25, 0.33]:
        args = transformers.TrainingArguments(output_dir="/tmp/dpoc-optim-fixture", warmup_steps=ws, report_to=[])
        warm.append({"warmup_steps": ws, "total_steps": 37, "expected": args.get_warmup_steps(37)})
    with open(os.path.join(OUT, "schedules.json"), "w") as f:
        json.dump({"schedules": sched, "warmup": warm}, f, indent=1)

    g = torch.Generator().manual_seed(1234)
    n = 37
    p0 = torch.randn(n, generator=g)
    grads = [torch.randn(n, generator=g) * s for s in (1.0, 0.1, 3.0, 0.01, 1.0)]
    lrs = [1e-3, 5e-4, 2e-3, 1e-3, 1e-4]
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    after = []
    for gr, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        p.grad = gr.clone()
        opt.step()
        after.append(p.detach().tolist())
    q = torch.nn.Parameter(torch.zeros(n))
    q.grad = grads[2].clone()
    norm = torch.nn.utils.clip_grad_norm_([q], 0.5).item()
    with open(os.path.join(OUT, "adamw.json"), "w") as f:
        json.dump({"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "p0": p0.tolist(),
                   "grads": [x.tolist() for x in grads], "lrs": lrs, "params_after_each_step": after,
                   "clip": {"max_norm": 0.5, "grad": grads[2].tolist(), "norm": norm, "clipped": q.grad.tolist()}},
                  f, indent=1)
    print("optim fixtures written to", os.path.normpath(OUT), file=sys.stderr)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

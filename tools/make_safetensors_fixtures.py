#!/usr/bin/env python3
"""Writes the safetensors fixtures of tests/unit/test_safetensors.c with the reference
`safetensors` library, and the values a reader must get in expected.json.

Expected values are computed with numpy from the stored bit patterns (float16 via numpy's
own conversion, bfloat16 as the upper half of a float32), never by dpoc. They are stored
as float32 bit patterns ("f32_bits") so the test compares exactly (NaN: any NaN).

Usage: python tools/make_safetensors_fixtures.py [OUTDIR]   (default tests/fixtures/safetensors)
Needs: numpy, torch (for bfloat16), safetensors.
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file as save_pt

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "tests", "fixtures", "safetensors")


def f32_bits(a):
    return [int(x) for x in np.asarray(a, dtype=np.float32).reshape(-1).view(np.uint32)]


def bf16_to_f32(bits_u16):
    return (np.asarray(bits_u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def entry(dtype, shape, f32):
    return {"dtype": dtype, "shape": list(shape), "f32_bits": f32_bits(f32)}


def bf16_tensor(bits, shape):
    t = torch.tensor(np.asarray(bits, dtype=np.uint16).view(np.int16).astype(np.int16))
    return t.view(torch.bfloat16).reshape(shape)


def main():
    os.makedirs(OUT, exist_ok=True)
    expected = {}

    # F32: ordinary, tiny, negative zero, a scalar and an empty tensor.
    w = np.array([[1.0, -2.5, 3.14159265], [1e-30, -0.0, 65504.0]], dtype=np.float32)
    scalar = np.array(42.0, dtype=np.float32)
    empty = np.zeros((0, 3), dtype=np.float32)
    save_np({"w": w, "scalar": scalar, "empty": empty}, os.path.join(OUT, "f32.safetensors"))
    expected["f32.safetensors"] = {
        "w": entry("F32", w.shape, w),
        "scalar": entry("F32", (), scalar),
        "empty": entry("F32", empty.shape, empty),
    }

    # F16 from IEEE half bit patterns: normals, max, min subnormal, max subnormal,
    # min normal, +-inf, NaN, -0, 1/3, 0.
    hbits = np.array([0x3C00, 0xC000, 0x7BFF, 0x0001, 0x03FF, 0x0400,
                      0x7C00, 0xFC00, 0x7E00, 0x8000, 0x3555, 0x0000], dtype=np.uint16)
    h = hbits.view(np.float16).reshape(3, 4)
    save_np({"h": h}, os.path.join(OUT, "f16.safetensors"))
    expected["f16.safetensors"] = {"h": entry("F16", h.shape, h.astype(np.float32))}

    # BF16 from bit patterns (1, -pi's upper half, smallest subnormal, +-inf, NaN, -0, pi's
    # upper half), and one converted by torch from float32 values (expected from its bits).
    bbits = [0x3F80, 0xC049, 0x0001, 0x7F80, 0xFF80, 0x7FC0, 0x8000, 0x4049]
    b = bf16_tensor(bbits, (2, 4))
    conv = torch.tensor([0.1, -1234.5678, 3.0e38, 1.0e-40], dtype=torch.float32).to(torch.bfloat16)
    conv_bits = conv.view(torch.int16).numpy().astype(np.uint16)
    save_pt({"b": b, "conv": conv}, os.path.join(OUT, "bf16.safetensors"), metadata={"format": "pt"})
    expected["bf16.safetensors"] = {
        "b": entry("BF16", (2, 4), bf16_to_f32(bbits)),
        "conv": entry("BF16", (4,), bf16_to_f32(conv_bits)),
    }

    # A two-shard model directory with its index, as transformers writes it.
    sd = os.path.join(OUT, "sharded")
    os.makedirs(sd, exist_ok=True)
    emb = np.arange(8, dtype=np.float32).reshape(4, 2) * 0.5 - 1.0
    norm_bits = [0x3F80, 0x4000]
    lm = np.array([[0.5, -0.25], [2.0, 1024.0]], dtype=np.float16)
    lw = np.array([7.0, -8.0, 9.5], dtype=np.float32)
    shard1 = {"model.embed_tokens.weight": torch.from_numpy(emb),
              "model.norm.weight": bf16_tensor(norm_bits, (2,))}
    shard2 = {"lm_head.weight": torch.from_numpy(lm), "model.layers.0.w": torch.from_numpy(lw)}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_pt(shard1, os.path.join(sd, names[0]), metadata={"format": "pt"})
    save_pt(shard2, os.path.join(sd, names[1]), metadata={"format": "pt"})
    weight_map = {k: names[0] for k in shard1}
    weight_map.update({k: names[1] for k in shard2})
    total = sum(t.numel() * t.element_size() for t in list(shard1.values()) + list(shard2.values()))
    with open(os.path.join(sd, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": int(total)}, "weight_map": dict(sorted(weight_map.items()))},
                  f, indent=2)
        f.write("\n")
    expected["sharded"] = {
        "model.embed_tokens.weight": entry("F32", emb.shape, emb),
        "model.norm.weight": entry("BF16", (2,), bf16_to_f32(norm_bits)),
        "lm_head.weight": entry("F16", lm.shape, lm.astype(np.float32)),
        "model.layers.0.w": entry("F32", lw.shape, lw),
    }

    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()

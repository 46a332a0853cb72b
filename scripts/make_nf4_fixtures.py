#!/usr/bin/env python3
"""Golden fixtures for kiln's NF4 quantization with double quantization, made with
bitsandbytes' own `quantize_4bit(..., quant_type="nf4", compress_statistics=True,
blocksize=64)` (its CPU path, from PyPI).

Writes `tests/fixtures/nf4/nf4.safetensors` with, for a few fixed weight matrices (normal,
heavy-tailed with outliers, one with a partial last block, a bf16 one):

  <name>.weight          the f32 input
  <name>.packed          packed 4-bit codes (uint8, two per byte, first in the high nibble)
  <name>.absmax_q        8-bit codes of (absmax - offset) (uint8)
  <name>.offset          the mean of the absmax values (f32, 1 element)
  <name>.absmax2         per-256-block scale of the absmax codes (f32)
  <name>.dequant         the dequantized weight: bitsandbytes' `dequantize_blockwise` of the
                         absmax codes plus the offset, times the NF4 code of each weight
  <name>.dequant_bnb     bitsandbytes' own `dequantize_4bit` (its CPU kernel disagrees with
                         its quantizer when the row length is not a multiple of 64: kept to
                         show it, not used as the reference)
  dynamic_map            bitsandbytes' signed 8-bit dynamic map (256 f32)
  dynamic_map_unsigned   its unsigned map (8-bit AdamW's second moment)

Regenerate (from the repository root):

    python3 -m venv .venv && .venv/bin/pip install torch bitsandbytes safetensors
    .venv/bin/python scripts/make_nf4_fixtures.py
"""

import os

import torch
import bitsandbytes.functional as F
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "nf4")


def cases():
    g = torch.Generator().manual_seed(1234)
    normal = torch.randn(96, 80, generator=g) * 0.02
    torch.manual_seed(99)
    heavy = torch.distributions.StudentT(2.0).sample((64, 48)) * 0.05
    heavy[3, 7] = 4.0
    heavy[40, 0] = -6.5
    odd = torch.randn(37, 29, generator=g)  # 1073 values: a partial last block of 49
    big = torch.randn(520, 64, generator=g) * 0.1  # 520 absmax blocks: a partial absmax block of 8
    bf16 = (torch.randn(64, 64, generator=g) * 0.03).to(torch.bfloat16).float()
    return {"normal": normal, "heavy": heavy, "odd": odd, "big": big, "bf16": bf16}


def main():
    os.makedirs(OUT, exist_ok=True)
    tensors = {
        "dynamic_map": F.create_dynamic_map(signed=True).float(),
        "dynamic_map_unsigned": F.create_dynamic_map(signed=False).float(),
    }
    for name, w in cases().items():
        w = w.float().contiguous()
        packed, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        deq_bnb = F.dequantize_4bit(packed, st)
        absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
        code = F.get_4bit_type("nf4", device="cpu")
        q = torch.empty(packed.numel() * 2, dtype=torch.long)
        q[0::2] = (packed.reshape(-1) >> 4).long()
        q[1::2] = (packed.reshape(-1) & 15).long()
        n = w.numel()
        deq = (code[q[:n]] * absmax[torch.arange(n) // 64]).reshape(w.shape)
        tensors[f"{name}.weight"] = w
        tensors[f"{name}.packed"] = packed.reshape(-1).contiguous()
        tensors[f"{name}.absmax_q"] = st.absmax.reshape(-1).contiguous()
        tensors[f"{name}.offset"] = st.offset.reshape(1).float()
        tensors[f"{name}.absmax2"] = st.state2.absmax.reshape(-1).float().contiguous()
        tensors[f"{name}.dequant"] = deq.float().contiguous()
        tensors[f"{name}.dequant_bnb"] = deq_bnb.float().contiguous()
        err = (deq - w).abs().max().item()
        bnb_gap = (deq - deq_bnb).abs().max().item()
        print(f"{name}: {tuple(w.shape)}, {packed.numel()} packed bytes, {st.absmax.numel()} absmax codes, "
              f"max |dequant - w| = {err:.4g}, max |dequant - bnb dequantize_4bit| = {bnb_gap:.4g}")
    save_file(tensors, os.path.join(OUT, "nf4.safetensors"))


if __name__ == "__main__":
    main()

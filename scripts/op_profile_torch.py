#!/usr/bin/env python3
"""The blocks of `cargo run -p kiln-models --example op_profile`, timed in PyTorch.

Same shapes (the qwen2 bench model: batch 8 x 256, hidden 256, 8/2 heads of 32,
intermediate 688, vocab 4096), forward and backward, median of ITERS runs after a warmup:

    .venv/bin/python scripts/op_profile_torch.py [ITERS]
"""

import sys
import time

import torch
import torch.nn.functional as F

B, T, H, HEADS, KV, D, I, V = 8, 256, 256, 8, 2, 32, 688, 4096


def rand(*shape):
    return (torch.randn(*shape) * 0.5).requires_grad_()


def timed(iters, op):
    fwd, bwd = [], []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        out = op()
        t1 = time.perf_counter()
        out.backward()
        t2 = time.perf_counter()
        if i:
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
    return sorted(fwd)[len(fwd) // 2], sorted(bwd)[len(bwd) // 2]


def main():
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    x = rand(B, T, H)
    w = {n: rand(o, i) for n, (i, o) in {
        "qkv": (H, (HEADS + 2 * KV) * D), "o": (H, H), "up": (H, I), "down": (I, H), "head": (H, V),
    }.items()}
    h, g = rand(B, T, I), rand(B, T, I)
    norm_w = rand(H)
    q, k, v = rand(B, HEADS, T, D), rand(B, HEADS, T, D), rand(B, HEADS, T, D)
    logits = rand(B * T, V)
    rot = rand(B, T, HEADS, D)
    cos = torch.rand(T, D)
    targets = torch.zeros(B * T, dtype=torch.long)

    def rope():
        x1, x2 = rot[..., : D // 2], rot[..., D // 2:]
        c = cos.view(1, T, 1, D)
        return (rot * c + torch.cat([-x2, x1], -1) * c).sum()

    cases = [
        ("linear qkv 256->384", 4, lambda: F.linear(x, w["qkv"]).sum()),
        ("linear o 256->256", 4, lambda: F.linear(x, w["o"]).sum()),
        ("linear gate+up 256->688", 8, lambda: F.linear(x, w["up"]).sum()),
        ("linear down 688->256", 4, lambda: F.linear(h, w["down"]).sum()),
        ("linear head 256->4096", 1, lambda: F.linear(x, w["head"]).sum()),
        ("silu(g) * h", 4, lambda: (F.silu(g) * h).sum()),
        ("rmsnorm", 9, lambda: (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_w).sum()),
        ("rope (q)", 4, rope),
        ("attention core", 4, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum()),
        ("cross-entropy", 1, lambda: F.cross_entropy(logits, targets, reduction="sum")),
        ("residual add", 8, lambda: (x + x).sum()),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'op (batch 8 x 256)':<26} {'fwd ms':>9} {'bwd ms':>9} {'x/step':>6} {'ms/step':>11}")
    total = 0.0
    for name, per_step, op in cases:
        f, b = timed(iters, op)
        total += (f + b) * per_step
        print(f"{name:<26} {f:>9.2f} {b:>9.2f} {per_step:>6} {(f + b) * per_step:>11.1f}")
    print(f"{'sum':<26} {'':>9} {'':>9} {'':>6} {total:>11.1f}")


if __name__ == "__main__":
    main()

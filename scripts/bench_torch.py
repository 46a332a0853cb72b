"""The PyTorch side of `kiln bench`: the same configuration, trained the same way.

Reads the JSON result of `kiln bench` (model dimensions, parameters, batch, sequence,
optimizer, steps) and trains the PyTorch counterpart on the CPU for the same steps:

- qwen2: transformers' Qwen2ForCausalLM with the same config (SDPA attention), fp32;
- moa, convgpt: a dense baseline of the same size, a transformers Qwen2 with the same
  hidden size, layers and heads (4:1 grouped-query) and its MLP widened to the same
  parameter count, since neither family exists in PyTorch.

AdamW with the recipe's settings (`adamw8bit` as bitsandbytes' AdamW8bit). Prints the
same JSON keys as `kiln bench`, then the kiln / PyTorch ratio.

When kiln ran on CUDA, so does this (`--device` overrides). A recipe's adapter is copied
the way a PyTorch user trains it: `qlora` as transformers + peft + bitsandbytes (NF4
double-quantized Linear4bit base, `prepare_model_for_kbit_training`, LoRA on the recipe's
targets), with bf16 compute and autocast on CUDA and f32 compute on the CPU, as kiln;
`lora` as peft on an fp32 base. Activation checkpointing and NEFTune follow the recipe.

    .venv/bin/pip install torch transformers peft bitsandbytes
    kiln bench recipes/bench/qwen2-tiny-bench.toml --json /tmp/kiln.json
    .venv/bin/python scripts/bench_torch.py --like /tmp/kiln.json [--json /tmp/torch.json]
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def qwen2_params(c):
    h, layers, v = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    d = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    per_layer = (h * q + q) + 2 * (h * kv + kv) + q * h + 3 * h * c["intermediate_size"] + 2 * h
    head = 0 if c["tie_word_embeddings"] else v * h
    return v * h + per_layer * layers + h + head


def qwen2_flops_per_token(c, seq):
    """kiln's estimate (PaLM's): 6 x matmul parameters + 12 x layers x heads x head_dim x seq."""
    h, layers = c["hidden_size"], c["num_hidden_layers"]
    d = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    matmul = (h * q + 2 * h * kv + q * h + 3 * h * c["intermediate_size"]) * layers + c["vocab_size"] * h
    return 6 * matmul + 12 * layers * q * seq


def config_for(kiln):
    m = dict(kiln["model"])
    if kiln["family"] == "qwen2":
        return m, "transformers Qwen2ForCausalLM (same config)"
    heads = m["num_attention_heads"]
    c = {
        "vocab_size": m["vocab_size"],
        "hidden_size": m["hidden_size"],
        "num_hidden_layers": m["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 4) if heads % 4 == 0 else heads,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": m.get("tie_word_embeddings", True),
        "intermediate_size": 1,
    }
    base = qwen2_params(c)
    per_unit = 3 * c["hidden_size"] * c["num_hidden_layers"]
    c["intermediate_size"] = 1 + max(0, kiln["params"] - base) // per_unit
    return c, f"dense transformers Qwen2 baseline of the same size (intermediate {c['intermediate_size']})"


def qlora_base(model, targets, device, compute_dtype):
    """Replaces the targeted linears of every decoder layer by bitsandbytes' NF4
    double-quantized Linear4bit, quantizing the random weights on `device`."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if name not in targets or not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True,
                                      quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4").to(device)
                if lin.bias is not None:
                    q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
                setattr(parent, name, q)
                del lin
    if device == "cuda":
        torch.cuda.empty_cache()


def neftune(model, alpha):
    """NEFTune as transformers' Trainer adds it: uniform noise of magnitude
    alpha / sqrt(seq * hidden) on the input embeddings, in training only."""
    def hook(module, _inputs, out):
        if module.training:
            mag = alpha / (out.size(1) * out.size(2)) ** 0.5
            out = out + torch.zeros_like(out).uniform_(-mag, mag)
        return out
    model.get_input_embeddings().register_forward_hook(hook)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--like", required=True, help="kiln bench's JSON result")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: where kiln ran")
    args = ap.parse_args()
    kiln = json.load(open(args.like))
    device = args.device or ("cuda" if kiln["backend"] == "cuda" else "cpu")
    cuda = device == "cuda"
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg, what = config_for(kiln)
    adapter = kiln.get("adapter")
    train = kiln.get("train", {})
    qlora = adapter is not None and adapter["kind"] == "qlora"
    notes = []
    config = Qwen2Config(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        max_position_embeddings=max(4096, kiln["seq"]),
        rope_theta=cfg["rope_theta"],
        rms_norm_eps=cfg["rms_norm_eps"],
        tie_word_embeddings=cfg["tie_word_embeddings"],
        attn_implementation="sdpa",
    )
    # A QLoRA base is built in bf16 directly on the GPU (7.6B parameters), then quantized.
    bf16 = qlora and cuda
    torch.set_default_dtype(torch.bfloat16 if bf16 else torch.float32)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    checkpointing = bool(train.get("activation_checkpointing"))
    if adapter is not None:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if qlora:
            qlora_base(model, adapter["targets"], device, torch.bfloat16 if bf16 else torch.float32)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
            what = ("transformers Qwen2 + bitsandbytes NF4 (double quant, "
                    f"{'bf16' if bf16 else 'f32'} compute) + peft LoRA")
        else:
            what = "transformers Qwen2 (fp32) + peft LoRA"
        model = get_peft_model(model, LoraConfig(
            r=adapter["rank"], lora_alpha=adapter["alpha"], lora_dropout=adapter["dropout"],
            target_modules=adapter["targets"], use_rslora=adapter.get("rslora", False), task_type="CAUSAL_LM"))
    if checkpointing and not qlora:
        model.gradient_checkpointing_enable()
    if train.get("neftune_alpha"):
        neftune(model, train["neftune_alpha"])
    model.train()
    o = kiln["optim"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if o["kind"] == "adamw8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(trainable, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                                  weight_decay=o["weight_decay"])
    else:
        if o["kind"] != "adamw":
            notes.append(f"optimizer {o['kind']} runs as torch AdamW")
        opt = torch.optim.AdamW(trainable, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                                weight_decay=o["weight_decay"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)
    if bf16:
        notes.append("bf16 autocast (kiln computes in f32)")
    clip = train.get("clip_norm", 1.0)
    b, t, accum = kiln["batch"], kiln["seq"], kiln["grad_accum"]
    gen = torch.Generator().manual_seed(0)
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(kiln["warmup"] + kiln["steps"]):
        start = time.perf_counter()
        for _ in range(accum):
            ids = torch.randint(0, cfg["vocab_size"], (b, t), generator=gen).to(device)
            with autocast:
                out = model(input_ids=ids, labels=ids)
            (out.loss / accum).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(trainable, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - start
        if step >= kiln["warmup"]:
            times.append(dt)
        print(f"torch step {step + 1:>3} | {dt:.3f} s | {b * t * accum / dt:.0f} tokens/s", file=sys.stderr)
    step_time = statistics.median(times)
    tokens_per_s = b * t * accum / step_time
    flops = qwen2_flops_per_token(cfg, t)
    gflops = tokens_per_s * flops / 1e9
    result = {
        "framework": "pytorch",
        "torch": torch.__version__,
        "model": what,
        "params": sum(p.numel() for p in model.parameters()),
        "batch": b, "seq": t, "grad_accum": accum,
        "steps": kiln["steps"], "warmup": kiln["warmup"],
        "step_time_s": step_time,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops,
        "gflops": gflops,
        "mfu": gflops / kiln["peak"]["gflops"],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device": torch.cuda.get_device_name() if cuda else None,
        "peak_device_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "peak_device_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "threads": args.threads,
        "notes": notes,
        "step_times_s": times,
    }
    text = json.dumps(result, indent=2)
    if args.json:
        open(args.json, "w").write(text)
    print(text)
    def memory(r):
        if r.get("peak_device_bytes"):
            return f"peak device memory {r['peak_device_bytes'] / 2**30:.1f} GiB"
        return f"peak RSS {r['peak_rss_bytes'] / 1e6:.0f} MB"

    print(
        f"{kiln['family']}: kiln {kiln['tokens_per_s']:.0f} tokens/s ({kiln['gflops']:.1f} GFLOP/s, MFU {100 * kiln['mfu']:.1f}%, "
        f"{memory(kiln)}) | PyTorch {tokens_per_s:.0f} tokens/s ({gflops:.1f} GFLOP/s, "
        f"MFU {100 * result['mfu']:.1f}%, {memory(result)}, {what}) | "
        f"kiln / PyTorch: {kiln['tokens_per_s'] / tokens_per_s:.2f}x tokens/s, {kiln['gflops'] / gflops:.2f}x GFLOP/s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()

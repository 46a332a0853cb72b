#!/usr/bin/env python3
"""Greedy decoding speed of Hugging Face `transformers` on a Qwen2 directory, on the CPU.

The counterpart of kiln's `crates/kiln-models/examples/generate_speed.rs`: the same prompt
(token i is (7 i + 3) mod vocab), greedy `generate` with the KV cache, no end-of-sequence
token, one warm-up run, then the median of RUNS timed runs. The prompt time is a
`generate` call with one new token (the prompt forward plus the first choice), as kiln
counts it; the decode rate is the other NEW_TOKENS - 1 tokens over the rest of a full call.

Run (from the repository root):

    .venv/bin/python scripts/bench_generate.py tests/fixtures/qwen2/untied_gqa4
    cargo run -p kiln-models --example generate_speed -- tests/fixtures/qwen2/untied_gqa4
"""

import argparse
import statistics
import time

import torch
from transformers import Qwen2ForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("prompt_len", nargs="?", type=int, default=16)
    ap.add_argument("new_tokens", nargs="?", type=int, default=64)
    ap.add_argument("runs", nargs="?", type=int, default=5)
    ap.add_argument("--attn", default="eager", help="attn_implementation (eager or sdpa)")
    args = ap.parse_args()

    model = Qwen2ForCausalLM.from_pretrained(
        args.dir, torch_dtype=torch.float32, attn_implementation=args.attn
    ).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    vocab = model.config.vocab_size
    ids = torch.tensor([[(7 * i + 3) % vocab for i in range(args.prompt_len)]])

    def run(new):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                num_beams=1,
                max_new_tokens=new,
                min_new_tokens=new,
                eos_token_id=None,
                pad_token_id=0,
                use_cache=True,
            )
        elapsed = time.perf_counter() - start
        assert out.shape[1] == args.prompt_len + new
        return elapsed

    run(args.new_tokens)
    prompt_s = statistics.median(run(1) for _ in range(args.runs))
    total_s = statistics.median(run(args.new_tokens) for _ in range(args.runs))
    decode_s = total_s - prompt_s
    print(
        f"transformers {args.attn} ({torch.get_num_threads()} threads) prompt {args.prompt_len} tokens: "
        f"{args.prompt_len / prompt_s:9.1f} tok/s | decode {args.new_tokens} tokens: "
        f"{(args.new_tokens - 1) / decode_s:7.1f} tok/s | end to end "
        f"{args.new_tokens / total_s:7.1f} new tok/s (median of {args.runs})"
    )


if __name__ == "__main__":
    main()

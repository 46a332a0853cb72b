#!/usr/bin/env python3
"""Golden fixtures for kiln's Qwen2 parity tests, made with Hugging Face `transformers`.

For each tiny random-init `Qwen2ForCausalLM` below (fixed seeds; tied and untied heads, GQA
ratios 1, 2 and 4, rope_theta 1e6, non-power-of-two sizes, a bf16 checkpoint and a sharded
one) this writes into `tests/fixtures/qwen2/<name>/`:

  config.json, model.safetensors (or shards + index)   via `save_pretrained`
  expected.safetensors                                  input_ids [2, T], attention_mask [2, T]
                                                        (row 1 left-padded), logits [2, T, V],
                                                        loss (one step, row 0 as labels) and
                                                        grad.<name> for a few parameters

With `--roundtrip RUN_EXPORT_DIR` it instead loads a model that kiln trained and exported
(`kiln export RUN --format hf --out DIR`), runs it in transformers on fixed inputs and
writes `hf_logits.safetensors` beside it, so that kiln's test can check transformers reads
kiln's export exactly.

Regenerate (from the repository root; needs torch and transformers from PyPI):

    python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors
    .venv/bin/python scripts/make_qwen2_fixtures.py
    bash scripts/make_roundtrip_fixture.sh
"""

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "qwen2")

# name: (seed, config overrides, save dtype, max shard size)
MODELS = {
    "tied_gqa1": (
        11,
        dict(vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True),
        torch.float32,
        None,
    ),
    "untied_gqa4": (
        22,
        dict(vocab_size=101, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False),
        torch.float32,
        None,
    ),
    "bf16_gqa2": (
        33,
        dict(vocab_size=80, hidden_size=40, intermediate_size=60, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
        torch.bfloat16,
        None,
    ),
    "sharded_tied": (
        44,
        dict(vocab_size=70, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
             num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True),
        torch.float32,
        "12KB",
    ),
}

GRAD_PARAMS = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.q_proj.bias",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.norm.weight",
]

SEQ = 11
PAD = 3


def fixed_inputs(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, :PAD] = 0  # row 1 is left-padded
    return ids, mask


def make_model(name, seed, overrides, dtype, shard):
    torch.manual_seed(seed)
    config = Qwen2Config(
        max_position_embeddings=128,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
        use_sliding_window=False,
        **overrides,
    )
    config._attn_implementation = "eager"
    model = Qwen2ForCausalLM(config).float().eval()
    out = os.path.join(OUT, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    to_save = model.to(dtype) if dtype != torch.float32 else model
    kwargs = {"safe_serialization": True}
    if shard:
        kwargs["max_shard_size"] = shard
    to_save.save_pretrained(out, **kwargs)
    # The reference runs in f32 on exactly the saved (possibly bf16-rounded) weights.
    model = to_save.float().eval()

    ids, mask = fixed_inputs(config.vocab_size, seed + 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits

    model.zero_grad()
    row = ids[:1]
    loss = model(input_ids=row, labels=row).loss
    loss.backward()
    params = dict(model.named_parameters())
    tensors = {
        "input_ids": ids.to(torch.int64),
        "attention_mask": mask.to(torch.int64),
        "logits": logits.float().contiguous(),
        "loss": loss.detach().reshape(1).float(),
    }
    for p in GRAD_PARAMS:
        tensors[f"grad.{p}"] = params[p].grad.float().contiguous()
    save_file(tensors, os.path.join(out, "expected.safetensors"))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{name}: loss {loss.item():.6f}, {size / 1024:.1f} KiB")


def roundtrip(export_dir):
    model = Qwen2ForCausalLM.from_pretrained(export_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
    ids, mask = fixed_inputs(model.config.vocab_size, 5)
    mask[:] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    save_file(
        {"input_ids": ids.to(torch.int64), "logits": logits.float().contiguous()},
        os.path.join(export_dir, "hf_logits.safetensors"),
    )
    with open(os.path.join(export_dir, "hf_check.json"), "w") as f:
        json.dump({"transformers_loaded": True, "logits_shape": list(logits.shape)}, f)
        f.write("\n")
    print(f"transformers loaded {export_dir}; logits {tuple(logits.shape)} written")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--roundtrip", metavar="EXPORT_DIR", help="check a kiln export instead")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    if args.roundtrip:
        roundtrip(args.roundtrip)
        return
    for name, (seed, overrides, dtype, shard) in MODELS.items():
        make_model(name, seed, overrides, dtype, shard)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Golden greedy generations for kiln's decoding test, made with Hugging Face `transformers`.

For each tiny random-init Qwen2 model in `tests/fixtures/qwen2/<name>/` (written by
`scripts/make_qwen2_fixtures.py`; run that first if they are missing) this loads the
directory in float32 with eager attention (the bf16 checkpoint is upcast), runs greedy
`generate` (no sampling, one beam, no end-of-sequence token, so every run produces exactly
MAX_NEW_TOKENS tokens) on two fixed prompts of different lengths, and writes
`tests/fixtures/qwen2/<name>/generate.json`:

  {"max_new_tokens": 24, "cases": [{"prompt": [...], "tokens": [...], "margins": [...]}]}

`tokens` are the new ids only; `margins[i]` is transformers' gap between the largest and the
second-largest logit at step i, so that a mismatch in kiln's test can be told apart from a
near-tie.

Regenerate (from the repository root; torch and transformers as in make_qwen2_fixtures.py):

    .venv/bin/python scripts/make_generate_fixtures.py

and check with `cargo test -p kiln-models --test generate_parity`.
"""

import json
import os

import torch
import transformers
from transformers import Qwen2ForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "qwen2")
NAMES = ["tied_gqa1", "untied_gqa4", "bf16_gqa2", "sharded_tied"]
PROMPT_LENGTHS = [3, 12]
MAX_NEW_TOKENS = 24
SEED = 2024


def prompts(vocab):
    """The fixed prompts for a vocabulary size: one per length, from a fixed seed."""
    g = torch.Generator().manual_seed(SEED)
    return [torch.randint(0, vocab, (1, n), generator=g) for n in PROMPT_LENGTHS]


def make(name):
    path = os.path.join(FIXTURES, name)
    model = Qwen2ForCausalLM.from_pretrained(
        path, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    # No end-of-sequence token: generation always runs the full length.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    cases = []
    for ids in prompts(model.config.vocab_size):
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                num_beams=1,
                max_new_tokens=MAX_NEW_TOKENS,
                min_new_tokens=MAX_NEW_TOKENS,
                eos_token_id=None,
                pad_token_id=0,
                use_cache=True,
                output_logits=True,
                return_dict_in_generate=True,
            )
        new = out.sequences[0, ids.shape[1]:].tolist()
        assert len(new) == MAX_NEW_TOKENS, (name, len(new))
        margins = []
        for step, logits in enumerate(out.logits):
            top = torch.topk(logits[0].float(), 2)
            assert top.indices[0].item() == new[step], (name, step)
            margins.append(float(f"{(top.values[0] - top.values[1]).item():.4g}"))
        cases.append({"prompt": ids[0].tolist(), "tokens": new, "margins": margins})
    doc = {
        "generator": "scripts/make_generate_fixtures.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "max_new_tokens": MAX_NEW_TOKENS,
        "cases": cases,
    }
    # One line per case keeps the file short and its diffs readable.
    text = json.dumps(doc, indent=1)
    for c in cases:
        text = text.replace(json.dumps(c, indent=1).replace("\n", "\n  "), json.dumps(c), 1)
    assert json.loads(text) == doc
    with open(os.path.join(path, "generate.json"), "w") as f:
        f.write(text + "\n")
    smallest = min(m for c in cases for m in c["margins"])
    print(f"{name}: {len(cases)} prompts, smallest top-2 logit margin {smallest:.3g}")


def main():
    torch.use_deterministic_algorithms(True)
    for name in NAMES:
        make(name)


if __name__ == "__main__":
    main()

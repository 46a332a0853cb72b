#!/usr/bin/env bash
# Regenerates tests/fixtures/qwen2/peft: kiln trains LoRA adapters (r=4, alpha=8, q/v/up
# projections) on the round-trip base (tests/fixtures/qwen2/roundtrip), exports them with
# `kiln export --format peft`, and PEFT's `PeftModel.from_pretrained` loads them onto the
# base in transformers and writes the logits it computes (hf_logits.safetensors). kiln's
# test checks it computes the same logits from the same files.
#
#   python3 -m venv .venv && .venv/bin/pip install torch transformers peft safetensors
#   bash scripts/make_peft_fixture.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kiln-target}"
cargo build -q -p kiln-cli
kiln="$CARGO_TARGET_DIR/debug/kiln"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/lora.toml" <<TOML
# LoRA on the round-trip base, for the PEFT golden fixture.
[run]
name = "lora"
out_dir = "$work"
[model]
family = "qwen2"
[model.qwen2]
hf_dir = "tests/fixtures/qwen2/roundtrip"
[data]
[[data.sources]]
name = "notes"
format = "jsonl"
path = "data/notes.jsonl"
[[phases]]
sources = { notes = 1.0 }
batch_size = 4
window = 64
steps = 15
[optim]
lr = 1e-2
[train]
checkpoint_every = 15
[adapter]
kind = "lora"
rank = 4
alpha = 8
targets = ["q_proj", "v_proj", "up_proj"]
TOML
"$kiln" train "$work/lora.toml"
out=tests/fixtures/qwen2/peft
rm -rf "$out"
"$kiln" export "$work/lora" --format peft --out "$out"
.venv/bin/python - "$out" <<'PY'
import json, os, sys
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import Qwen2ForCausalLM
out = sys.argv[1]
base = Qwen2ForCausalLM.from_pretrained("tests/fixtures/qwen2/roundtrip", torch_dtype=torch.float32, attn_implementation="eager")
model = PeftModel.from_pretrained(base, out).eval()
g = torch.Generator().manual_seed(7)
ids = torch.randint(0, 256, (2, 13), generator=g)
with torch.no_grad():
    logits = model(input_ids=ids).logits
    plain = base.get_base_model()(input_ids=ids).logits if hasattr(base, "get_base_model") else None
save_file({"input_ids": ids, "logits": logits.float().contiguous()}, os.path.join(out, "hf_logits.safetensors"))
print("PEFT loaded kiln's adapter; logits", tuple(logits.shape))
PY

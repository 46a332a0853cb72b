#!/usr/bin/env bash
# Regenerates tests/fixtures/qwen2/roundtrip: kiln trains a tiny Qwen2 on the shipped corpus,
# exports it in Hugging Face format, and transformers loads the export and writes the logits
# it computes (hf_logits.safetensors). kiln's test then checks that kiln computes the same
# logits from the same files, i.e. that transformers reads kiln's export exactly.
#
#   python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors
#   bash scripts/make_roundtrip_fixture.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kiln-target}"
cargo build -q -p kiln-cli
kiln="$CARGO_TARGET_DIR/debug/kiln"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$kiln" train recipes/smoke/qwen2-tiny.toml --out "$work" \
    --set model.qwen2.hidden_size=32 --set model.qwen2.intermediate_size=64 \
    --set model.qwen2.num_hidden_layers=2 --set phases[0].steps=30 --set phases[1].steps=10 \
    --set train.checkpoint_every=40 --set train.eval_every=0
out=tests/fixtures/qwen2/roundtrip
rm -rf "$out"
"$kiln" export "$work/qwen2-tiny" --format hf --out "$out"
.venv/bin/python scripts/make_qwen2_fixtures.py --roundtrip "$out"

#!/usr/bin/env bash
# Throughput and memory of kiln's data path on generated Parquet corpora of two sizes
# (default 100 MB and 1000 MB of text): read + tokenize + write the token cache, reopen it,
# and cut windows from it. Byte tokenizer, phase 0 = batch 8 x window 512, belt windowing.
#
#   scripts/bench-data.sh [SMALL_MB] [LARGE_MB]
#
# TOKENIZER=path/to/tokenizer.json uses that BPE tokenizer instead of bytes.
# Needs about 6 GB of free disk per 1000 MB (the byte tokenizer caches 4 bytes per byte).
# Compare the window rate with the trainer's tokens/s on the smoke recipes (metrics.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/kiln-target}
cargo build -q -p kiln-data --example data_bench
BENCH=$CARGO_TARGET_DIR/debug/examples/data_bench
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
for mb in "${1:-100}" "${2:-1000}"; do
  "$BENCH" make "$WORK/corpus-$mb" "$mb" >/dev/null
  cat >"$WORK/r-$mb.toml" <<TOML
[run]
name = "bench"
out_dir = "$WORK/runs"
[model]
family = "qwen2"
[model.qwen2]
vocab_size = 200000
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 1
num_attention_heads = 2
num_key_value_heads = 1
max_position_embeddings = 512
$( [ -n "${TOKENIZER:-}" ] && printf '[tokenizer]\nkind = "hf"\npath = "%s"\n' "$(realpath "$TOKENIZER")" )
[data]
eval_holdout = 0.001
cache_dir = "$WORK/cache-$mb"
[[data.sources]]
name = "corpus"
format = "parquet"
path = "$WORK/corpus-$mb"
[[phases]]
sources = { corpus = 1.0 }
batch_size = 8
window = 512
steps = 1
TOML
  printf '%5s MB: ' "$mb"
  "$BENCH" run "$WORK/r-$mb.toml" 2>/dev/null
  rm -rf "$WORK/corpus-$mb" "$WORK/cache-$mb"
done

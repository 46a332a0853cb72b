#!/usr/bin/env bash
# Proves that a change preserves behaviour: trains every smoke recipe (plus the qwen2 smoke
# in each backward mode: head chunks, activation checkpointing, both; and on ndarray) with a
# given `kiln` binary, and compares every deterministic value of `metrics.jsonl` and
# `dream.jsonl` with a baseline recorded from another binary. Timing columns (tokens/s, step
# time, elapsed, GFLOP/s, MFU, all-reduce time) and the per-session "data" rows' wall-clock
# fields are left out; every other value must be equal, bit for bit.
#
#   scripts/compare_metrics.sh record BASE_DIR [KILN_BIN]   # before the change
#   scripts/compare_metrics.sh check  BASE_DIR [KILN_BIN]   # after: exit 1 on any difference
#
# KILN_BIN defaults to $CARGO_TARGET_DIR/debug/kiln (CARGO_TARGET_DIR defaults to
# ~/.cache/kiln-target, as in .ci/run). Runs from the repository root; takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:?usage: compare_metrics.sh record|check BASE_DIR [KILN_BIN]}"
base="${2:?usage: compare_metrics.sh record|check BASE_DIR [KILN_BIN]}"
target="${CARGO_TARGET_DIR:-$HOME/.cache/kiln-target}"
bin="${3:-$target/debug/kiln}"
[[ -x "$bin" ]] || { echo "compare_metrics: \`$bin\` is not an executable kiln binary" >&2; exit 2; }
case "$mode" in record | check) ;; *) echo "compare_metrics: unknown mode \`$mode\`" >&2; exit 2 ;; esac

# name | recipe | overrides (space-separated KEY=VALUE)
cases=(
    "qwen2-tiny|recipes/smoke/qwen2-tiny.toml|"
    "qwen2-tiny-ndarray|recipes/smoke/qwen2-tiny.toml|run.backend=ndarray"
    "qwen2-tiny-headchunks|recipes/smoke/qwen2-tiny.toml|train.head_chunk_tokens=100"
    "qwen2-tiny-ckpt|recipes/smoke/qwen2-tiny.toml|train.activation_checkpointing=true"
    "qwen2-tiny-ckpt-headchunks|recipes/smoke/qwen2-tiny.toml|train.activation_checkpointing=true train.head_chunk_tokens=100"
    "qwen2-qlora-tiny|recipes/smoke/qwen2-qlora-tiny.toml|"
    "qwen2-qlora-tiny-ckpt-headchunks|recipes/smoke/qwen2-qlora-tiny.toml|train.activation_checkpointing=true train.head_chunk_tokens=100"
    "qwen2-hf-finetune|recipes/smoke/qwen2-hf-finetune.toml|"
    "moa-tiny|recipes/smoke/moa-tiny.toml|"
    "moa-tiny-ckpt|recipes/smoke/moa-tiny.toml|train.activation_checkpointing=true"
    "convgpt-tiny|recipes/smoke/convgpt-tiny.toml|"
    "convgpt-tiny-ckpt-headchunks|recipes/smoke/convgpt-tiny.toml|train.activation_checkpointing=true train.head_chunk_tokens=100"
)

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$base"
status=0
for case in "${cases[@]}"; do
    IFS='|' read -r name recipe overrides <<<"$case"
    args=(train "$recipe" --out "$work/$name" --overwrite)
    for kv in $overrides; do args+=(--set "$kv"); done
    if ! NO_COLOR=1 "$bin" "${args[@]}" >"$work/$name.log" 2>&1; then
        echo "FAIL $name: kiln exited with an error; its log:" >&2
        tail -20 "$work/$name.log" >&2
        status=1
        continue
    fi
    run="$(find "$work/$name" -name metrics.jsonl -printf '%h\n' | head -1)"
    for file in metrics.jsonl dream.jsonl; do
        [[ -f "$run/$file" ]] || continue
        python3 - "$run/$file" >"$work/$name.$file" <<'PY'
import json, sys
# Wall-clock and throughput fields differ from run to run by nature; every other value is
# a function of the recipe and the data alone and must be reproduced exactly.
TIMING = {"tokens_per_s", "gflops", "step_time_s", "elapsed_s", "allreduce_s", "mfu",
          "time", "wall_s", "read_s", "tokenize_s", "seconds", "timestamp"}
for line in open(sys.argv[1]):
    row = json.loads(line)
    kept = {k: v for k, v in row.items() if k not in TIMING and not k.endswith("_s")}
    print(json.dumps(kept, sort_keys=True))
PY
        if [[ "$mode" == record ]]; then
            cp "$work/$name.$file" "$base/$name.$file"
        elif [[ ! -f "$base/$name.$file" ]]; then
            echo "FAIL $name: no baseline $file in \`$base\`" >&2
            status=1
        elif ! diff -u "$base/$name.$file" "$work/$name.$file" >"$work/$name.$file.diff"; then
            echo "FAIL $name/$file: differs from the baseline:" >&2
            head -20 "$work/$name.$file.diff" >&2
            status=1
            continue
        fi
        rows=$(wc -l <"$work/$name.$file")
        if [[ "$mode" == record ]]; then
            echo "recorded $name/$file ($rows rows)"
        else
            echo "identical $name/$file ($rows rows)"
        fi
    done
done
exit "$status"

#!/usr/bin/env bash
# Peak resident memory and step time of one training job, three ways, on the same model:
# QLoRA (NF4 base), LoRA (f32 base) and full fine-tuning. The model is the QLoRA smoke
# recipe's architecture scaled up (about 90M parameters) so the base dominates memory.
#
#   scripts/bench-qlora-memory.sh [KILN_BINARY]
#
# Prints, per mode, the peak RSS reported by the kernel (/usr/bin/time), the trainer's own
# "frozen base" line (bytes per base weight) and the median step time. CPU only; on a machine
# with a GPU pass `--set run.backend=cuda` through EXTRA.
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=${1:-${CARGO_TARGET_DIR:-$HOME/.cache/kiln-target}/debug/kiln}
STEPS=${STEPS:-6}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
RECIPE=recipes/smoke/qwen2-qlora-tiny.toml
sed '/^\[adapter\]/,$d' "$RECIPE" >"$WORK/full.toml"
SIZE=(--set model.qwen2.hidden_size=1024 --set model.qwen2.intermediate_size=2816
  --set model.qwen2.num_hidden_layers=8 --set model.qwen2.num_attention_heads=16
  --set model.qwen2.num_key_value_heads=4 --set "phases[0].steps=$STEPS"
  --set phases[0].batch_size=4 --set phases[0].window=128
  --set train.eval_every=100000 --set train.checkpoint_every=100000 --set data.eval_holdout=0.0)
# shellcheck disable=SC2086
for mode in qlora lora full; do
  case $mode in
    qlora) args=("$RECIPE") ;;
    lora) args=("$RECIPE" --set adapter.kind=lora) ;;
    full) args=("$WORK/full.toml") ;;
  esac
  /usr/bin/time -f '%M' -o "$WORK/rss" "$KILN" train "${args[@]}" "${SIZE[@]}" ${EXTRA:-} \
    --out "$WORK/$mode" >"$WORK/$mode.log" 2>&1 || { cat "$WORK/$mode.log"; exit 1; }
  rss_mb=$(( $(cat "$WORK/rss") / 1024 ))
  base=$(grep -o 'frozen base: .*' "$WORK/$mode.log" | head -1 || true)
  step_ms=$(python3 - "$WORK/$mode"/*/metrics.jsonl <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
times = [r["step_time_s"] for r in rows if "step_time_s" in r][1:]
print(f"{statistics.median(times) * 1000:.0f}" if times else "?")
PY
)
  printf '%-6s peak RSS %6d MB  median step %6s ms  %s\n' "$mode" "$rss_mb" "$step_ms" "$base"
done

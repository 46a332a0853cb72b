#!/usr/bin/env bash
# Step time of one process against two loopback nodes (`[distributed]`, one CPU device
# each) on a smoke recipe, and the all-reduce's share of the two-node step.
#
#   scripts/bench_distributed.sh [RECIPE] [STEPS]
#
# The single process trains on the doubled per-node batch, so both train the same global
# batch per step. Needs the kiln binary (KILN, default: target/debug/kiln).
set -euo pipefail
recipe=${1:-recipes/smoke/qwen2-tiny.toml}
steps=${2:-12}
kiln=${KILN:-${CARGO_TARGET_DIR:-target}/debug/kiln}
out=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$out"' EXIT
common=(--out "$out" --set "phases[0].steps=$steps" --set "phases[1].steps=1"
  --set train.eval_every=0 --set train.checkpoint_every=1000)
batch=$(grep -m1 -E '^batch_size' "$recipe" | sed -E 's/.*= *//')
"$kiln" train "$recipe" "${common[@]}" --set run.name=one \
  --set "phases[0].batch_size=$((batch * 2))" --set "phases[1].batch_size=2" >"$out/one.log" 2>&1
port=$((7500 + RANDOM % 500))
"$kiln" orchestrator --port "$port" >"$out/orch.log" 2>&1 &
for rank in 0 1; do
  KILN_RANK=$rank KILN_ORCHESTRATOR=127.0.0.1:$port KILN_DATA_PORT=$((port + 1 + rank)) \
    "$kiln" train "$recipe" "${common[@]}" --set run.name=two \
    --set "phases[0].batch_size=$batch" --set "phases[1].batch_size=1" --set distributed.nodes=2 >"$out/two-$rank.log" 2>&1 &
done
wait %2 %3
python3 - "$out" "$recipe" "$batch" "$steps" <<'PY'
import json, statistics, sys
out, recipe, batch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def rows(run):
    rs = [json.loads(l) for l in open(f"{out}/{run}/metrics.jsonl")]
    # The first phase's steps, without the two warm-up steps.
    return [r for r in rs if r.get("kind") == "train" and 2 < r["step"] <= steps]
one, two = rows("one"), rows("two")
t1 = statistics.median(r["step_time_s"] for r in one)
t2 = statistics.median(r["step_time_s"] for r in two)
ar = statistics.median(r["allreduce_s"] for r in two)
dl = max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two))
print(f"{recipe}: global batch {2 * batch}, median over {len(one)} steps")
print(f"  1 process : step {t1 * 1e3:.1f} ms")
print(f"  2 nodes   : step {t2 * 1e3:.1f} ms ({t2 / t1:.2f}x), all-reduce {ar * 1e3:.1f} ms ({ar / t2:.0%} of the step)")
print(f"  largest loss difference: {dl:.2e}")
PY

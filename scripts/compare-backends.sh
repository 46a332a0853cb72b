#!/usr/bin/env bash
# Trains the smoke recipe on each CPU backend, one after the other in this one run, and
# prints each backend's median tokens/s (steps 11 onwards, to skip warm-up), wall time and
# CPU utilization (user+system CPU seconds per wall second: 2.0 means both cores busy).
#
#   bash scripts/compare-backends.sh [RECIPE] [extra kiln train args...]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kiln-target}"
recipe="${1:-recipes/smoke/qwen2-tiny.toml}"
shift || true
cargo build -q -p kiln-cli
kiln="$CARGO_TARGET_DIR/debug/kiln"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
printf '%-8s %12s %10s %8s %10s\n' backend "tokens/s" "GFLOP/s" wall_s "cpu_util"
for backend in flex ndarray; do
    /usr/bin/time -f '%e %U %S' -o "$out/time-$backend" \
        "$kiln" train "$recipe" --out "$out" --set run.name="$backend" --set run.backend="$backend" "$@" \
        > /dev/null 2> "$out/log-$backend"
    python3 - "$out/$backend/metrics.jsonl" "$out/time-$backend" "$backend" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"kind":"train"' in l]
rows = rows[10:] or rows
wall, user, sys_ = map(float, open(sys.argv[2]).read().split()[-3:])
tps = statistics.median(r["tokens_per_s"] for r in rows)
gf = statistics.median(r["gflops"] for r in rows)
print(f"{sys.argv[3]:<8} {tps:12.0f} {gf:10.1f} {wall:8.1f} {(user + sys_) / wall:10.2f}")
PY
done

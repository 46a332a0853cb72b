#!/usr/bin/env bash
# Two kiln binaries side by side on the bench recipes, alternating A, B, A, B so that both
# see the same machine load: prints tokens/s and step time of each run and the B/A ratio
# of the means per recipe. For a behaviour-preserving change, B/A should be within noise.
#
#   scripts/bench_ab.sh OLD_KILN NEW_KILN [ROUNDS] [RECIPE...]
#
# ROUNDS defaults to 2; the recipes to the qwen2, MoA and ConvGPT bench recipes. Each run is
# `kiln bench RECIPE --steps 10 --warmup 2`. Needs python3 (reads the JSON).
set -euo pipefail
cd "$(dirname "$0")/.."

a="${1:?usage: bench_ab.sh OLD_KILN NEW_KILN [ROUNDS] [RECIPE...]}"
b="${2:?usage: bench_ab.sh OLD_KILN NEW_KILN [ROUNDS] [RECIPE...]}"
rounds="${3:-2}"
shift $(( $# < 3 ? $# : 3 ))
recipes=("$@")
if [[ ${#recipes[@]} -eq 0 ]]; then
    recipes=(recipes/bench/qwen2-tiny-bench.toml recipes/bench/moa-bench.toml recipes/bench/convgpt-bench.toml)
fi
for bin in "$a" "$b"; do
    [[ -x "$bin" ]] || { echo "bench_ab: \`$bin\` is not an executable kiln binary" >&2; exit 2; }
done

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
printf '%-34s %-4s %5s %12s %12s\n' recipe side round tokens/s step_s
for recipe in "${recipes[@]}"; do
    name="$(basename "$recipe" .toml)"
    for round in $(seq 1 "$rounds"); do
        for side in A B; do
            bin="$a"; [[ "$side" == B ]] && bin="$b"
            json="$out/$name-$side-$round.json"
            NO_COLOR=1 "$bin" bench "$recipe" --steps 10 --warmup 2 --json "$json" >/dev/null 2>"$out/log"
            python3 - "$json" "$name" "$side" "$round" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:<34} {sys.argv[3]:<4} {sys.argv[4]:>5} {r['tokens_per_s']:>12.1f} {r['step_time_s']:>12.4f}")
PY
        done
    done
    python3 - "$out" "$name" <<'PY'
import glob, json, sys
out, name = sys.argv[1], sys.argv[2]
mean = lambda side: sum(json.load(open(f))["tokens_per_s"] for f in glob.glob(f"{out}/{name}-{side}-*.json")) / len(glob.glob(f"{out}/{name}-{side}-*.json"))
print(f"{name:<34} B/A  {mean('B') / mean('A'):.3f}")
PY
done

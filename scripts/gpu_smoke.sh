#!/usr/bin/env bash
# Trains every smoke recipe on the GPU, for comparison with the same recipes on the CPU
# (issue #8): `scripts/compare_losses.py CPU_RUNS GPU_RUNS` prints the step-by-step loss
# difference. Needs a kiln built with `cargo build -p kiln-cli --features cuda`.
#
#   KILN=target/debug/kiln scripts/gpu_smoke.sh /tmp/gpu-runs
#   KILN=target/debug/kiln scripts/gpu_smoke.sh /tmp/cpu-runs cpu     # the CPU side
#
# RECIPES="moa-tiny convgpt-tiny" picks smoke recipes by name. The first step on a GPU
# compiles and autotunes CubeCL's kernels (minutes on a bare machine; CUBECL_AUTOTUNE_LEVEL=
# minimal shortens it).
set -uo pipefail
cd "$(dirname "$0")/.."
kiln=${KILN:-kiln}
out=${1:?usage: scripts/gpu_smoke.sh OUT_DIR [cuda|cpu]}
on=${2:-cuda}
case $on in
    cuda) backend=(--set run.backend=cuda --set run.device=cuda:0) ;;
    cpu) backend=(--set run.backend=flex --set run.device=cpu) ;;
    *) echo "backend must be cuda or cpu, not $on" >&2; exit 2 ;;
esac
status=0
recipes=(qwen2-tiny qwen2-qlora-tiny moa-tiny convgpt-tiny)
[ -n "${RECIPES:-}" ] && read -r -a recipes <<<"$RECIPES"
for name in "${recipes[@]}"; do
    recipe=recipes/smoke/$name.toml
    start=$SECONDS
    if "$kiln" train "$recipe" "${backend[@]}" --out "$out" --overwrite >"$out.$(basename "$recipe" .toml).log" 2>&1; then
        printf '%-40s %s: trained in %d s\n' "$recipe" "$on" "$((SECONDS - start))"
    else
        status=1
        printf '%-40s %s: FAILED, last lines of the log:\n' "$recipe" "$on"
        tail -n 15 "$out.$(basename "$recipe" .toml).log"
    fi
done
exit $status

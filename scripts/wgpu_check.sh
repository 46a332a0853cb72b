#!/usr/bin/env bash
# kiln on Burn's wgpu backend, checked against the CPU (Flex) on any machine with a Vulkan
# driver: in CI, Mesa's lavapipe, which runs Vulkan on the CPU (`apt-get install
# mesa-vulkan-drivers`). It runs, for each fusion setting:
#   1. `kiln doctor --backend wgpu --repeat 3`: every kiln operation and its gradients;
#   2. the qwen2, QLoRA and MoA smokes for $STEPS optimizer steps on wgpu and on Flex, with
#      each step's loss compared (relative 1e-3) and its gradient norm (relative 1e-2)
#      by scripts/compare_losses.py. The QLoRA smoke runs without adapter dropout and
#      NEFTune noise, and the MoA smoke without DropPath: their random draws come from each
#      backend's own generator.
#
#   scripts/wgpu_check.sh [KILN_BIN]
#
# KILN_BIN: a kiln built with `--features wgpu` (default: $CARGO_TARGET_DIR/debug/kiln).
# Environment: DEVICE (run.device, default `software`), FUSION (default "true false"),
# STEPS (default 5), RECIPES (default "qwen2-tiny qwen2-qlora-tiny moa-tiny"), KEEP=DIR
# keeps the runs there.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$HOME/.cache/kiln-target}"
kiln="${1:-$target/debug/kiln}"
device="${DEVICE:-software}"
steps="${STEPS:-5}"
read -r -a fusions <<<"${FUSION:-true false}"
read -r -a recipes <<<"${RECIPES:-qwen2-tiny qwen2-qlora-tiny moa-tiny}"
[[ -x "$kiln" ]] || { echo "wgpu_check: \`$kiln\` is not an executable kiln binary" >&2; exit 2; }

# The Vulkan loader warns on every start when no XDG runtime directory is set.
if [[ -z "${XDG_RUNTIME_DIR:-}" ]]; then
    XDG_RUNTIME_DIR="$(mktemp -d)"
    export XDG_RUNTIME_DIR
fi
work="${KEEP:-$(mktemp -d)}"
[[ -n "${KEEP:-}" ]] || trap 'rm -rf "$work"' EXIT
mkdir -p "$work"
status=0

# Trains recipe $1 as run $1 under $2 with extra arguments; exit 75 is --stop-after's.
train() {
    local name=$1 out=$2
    shift 2
    local args=(train "recipes/smoke/$name.toml" --out "$out" --set "run.name=$name"
        --stop-after "$steps")
    # Random draws that come from each backend's own generator are turned off.
    case $name in
        qwen2-qlora-tiny) args+=(--set adapter.dropout=0 --set train.neftune_alpha=0) ;;
        moa-tiny) args+=(--set model.moa.drop_path=0) ;;
    esac
    local start=$SECONDS rc=0
    NO_COLOR=1 "$kiln" "${args[@]}" "$@" >"$out/$name.log" 2>&1 || rc=$?
    if [[ $rc -ne 0 && $rc -ne 75 ]]; then
        echo "FAIL $name ($*): kiln exited with $rc; its log:" >&2
        tail -20 "$out/$name.log" >&2
        return 1
    fi
    printf '  %-18s %-58s %4d s\n' "$name" "$*" "$((SECONDS - start))"
}

echo "== a missing adapter is a clear error, not a panic"
# Expects kiln to fail, with $1 in its message.
fails_with() {
    local want=$1 got
    shift
    if got=$("$@" 2>&1); then
        echo "FAIL: \`$*\` succeeded" >&2
        return 1
    elif ! grep -qF "$want" <<<"$got" || grep -q "panicked" <<<"$got"; then
        echo "FAIL: \`$*\` did not say \"$want\":" >&2
        tail -5 <<<"$got" >&2
        return 1
    fi
    echo "  ok: $(tail -1 <<<"$got" | cut -c1-150)..."
}
fails_with "no such wgpu adapter on this machine; the Vulkan adapters here:" \
    "$kiln" doctor --backend wgpu --device discrete:7 || status=1
VK_ICD_FILENAMES=/nonexistent.json fails_with "no Vulkan adapter at all: install a driver" \
    "$kiln" doctor --backend wgpu --device default || status=1

for fusion in "${fusions[@]}"; do
    echo "== kiln doctor --backend wgpu --device $device --fusion $fusion --repeat 3"
    start=$SECONDS
    "$kiln" doctor --backend wgpu --device "$device" --fusion "$fusion" --repeat 3 || status=1
    echo "   ($((SECONDS - start)) s)"
done

echo "== smokes, $steps steps each"
mkdir -p "$work/flex"
for name in "${recipes[@]}"; do
    train "$name" "$work/flex" --set run.backend=flex --set run.device=cpu || status=1
done
for fusion in "${fusions[@]}"; do
    side="$work/wgpu-fusion-$fusion"
    mkdir -p "$side"
    for name in "${recipes[@]}"; do
        train "$name" "$side" --set run.backend=wgpu --set "run.device=$device" \
            --set "run.fusion=$fusion" || status=1
    done
done
for fusion in "${fusions[@]}"; do
    echo "== Flex vs wgpu (fusion $fusion): loss within 1e-3, gradient norm within 1e-2 (relative, per step)"
    python3 scripts/compare_losses.py "$work/flex" "$work/wgpu-fusion-$fusion" \
        --tolerance 1e-3 --grad-tolerance 1e-2 --table || status=1
done
[[ $status -eq 0 ]] && echo "wgpu_check: passed" || echo "wgpu_check: FAILED" >&2
exit $status

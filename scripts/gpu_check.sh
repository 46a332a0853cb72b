#!/usr/bin/env bash
# The one call to make on a lent GPU (issue 22): everything it runs needs only a carried
# kiln binary built with `--features cuda` (and, if present, a carried kernel cache), and
# the whole script ends within 8 minutes (each part has a deadline). It writes under OUT:
#   1. `kiln doctor --backend cuda --repeat 3`, with fusion on and off (doctor-*.txt/json);
#   2. the QLoRA smoke for 20 steps, on this machine's CPU (Flex) and on CUDA in three
#      variants, each a hypothesis of the CUDA QLoRA fault: Burn's defaults (fusion on),
#      fusion off, and the NF4 weight dequantized on the host and uploaded
#      (KILN_NF4_WEIGHT=host); compared step by step with scripts/compare_losses.py
#      (adapter dropout and NEFTune off: their draws come from each backend's generator);
#   3. 3 steps of the 7B-shaped QLoRA bench (tokens/s, peak device memory), then
#      scripts/bench_torch.py on the same configuration if PyTorch is installed;
#   4. cubecl.tgz: the kernel cache, to carry into the next call.
#
#   scripts/gpu_check.sh OUT [KILN]
#
# KILN: the binary, or an .xz of it (default: ./kiln, else ./kiln.xz), built with
# `--features cuda,autotune` (Burn's defaults). A kernel cache carried as `cubecl.tgz`
# beside it (or $CUBECL_CACHE) is unpacked first. A second binary built with `--features
# cuda` alone, carried as `kiln-noautotune` (or .xz) beside it, adds a fourth CUDA variant:
# autotune off.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_check.sh OUT [KILN]}
kiln=${2:-./kiln}
mkdir -p "$out"
out=$(cd "$out" && pwd)
deadline=$((SECONDS + 8 * 60 - 20))
left() { local s=$((deadline - SECONDS)); ((s > 5)) && echo "$s" || echo 5; }

# Unpacks binary $1 (or $1.xz) into $out, printing its path; nothing if there is none.
unpack() {
    local bin=${1%.xz}
    if [[ -f $bin.xz ]]; then
        xz -dc "$bin.xz" >"$out/$(basename "$bin")" && chmod +x "$out/$(basename "$bin")" &&
            echo "$out/$(basename "$bin")"
    elif [[ -x $bin ]]; then
        echo "$bin"
    fi
}
kiln=$(unpack "$kiln")
[[ -n $kiln ]] || { echo "gpu_check: no kiln binary (kiln or kiln.xz) given" >&2; exit 2; }
notune=$(unpack "$(dirname "${2:-./kiln}")/kiln-noautotune")
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export KILN_CACHE_DIR="${KILN_CACHE_DIR:-$HOME/.cache/kiln}"
cache_tgz=${CUBECL_CACHE:-$(dirname "$kiln")/cubecl.tgz}
if [[ -f $cache_tgz ]]; then
    mkdir -p "$KILN_CACHE_DIR" && tar xzf "$cache_tgz" -C "$KILN_CACHE_DIR"
    echo "kernel cache: $cache_tgz"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
"$kiln" --version 2>&1 | tee -a "$out/gpu.txt"

# 1 and 2 run side by side: small models share the GPU, and their kernel compilation
# shares the machine's cores.
smoke=recipes/smoke/qwen2-qlora-tiny.toml
exact=(--set adapter.dropout=0 --set train.neftune_alpha=0 --stop-after 20 --overwrite)
export KILN_ALLOW_UNVERIFIED_CUDA_QLORA=1
cuda=(--set run.backend=cuda --set run.device=cuda:0)
pids=()
for fusion in true false; do
    timeout "$(left)" "$kiln" doctor --backend cuda --device cuda:0 --fusion "$fusion" --repeat 3 \
        --json "$out/doctor-fusion-$fusion.json" >"$out/doctor-fusion-$fusion.txt" 2>&1 &
    pids+=($!)
done
timeout "$(left)" "$kiln" train "$smoke" "${exact[@]}" --out "$out/cpu" \
    --set run.name=qlora >"$out/cpu.log" 2>&1 &
pids+=($!)
variants=(fused unfused host)
[[ -n $notune ]] && variants+=(noautotune)
for variant in "${variants[@]}"; do
    extra=()
    env=()
    bin=$kiln
    case $variant in
        unfused) extra=(--set run.fusion=false) ;;
        host) env=(KILN_NF4_WEIGHT=host) ;;
        noautotune) bin=$notune ;;
    esac
    env "${env[@]}" timeout "$(left)" "$bin" train "$smoke" "${exact[@]}" "${cuda[@]}" "${extra[@]}" \
        --out "$out/cuda-$variant" --set run.name=qlora >"$out/cuda-$variant.log" 2>&1 &
    pids+=($!)
done
# The 7B bench gets what is left after the smokes, at most 3.5 minutes before the end.
bench_deadline=$((deadline - 210))
for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < bench_deadline)); do sleep 2; done
done
for fusion in true false; do
    echo "== kiln doctor --backend cuda --fusion $fusion --repeat 3"
    tail -n 60 "$out/doctor-fusion-$fusion.txt"
done
echo "== QLoRA smoke, 20 steps, CPU (Flex) against each CUDA variant"
for variant in "${variants[@]}"; do
    echo "-- cuda-$variant"
    if [[ -f $out/cuda-$variant/qlora/metrics.jsonl ]]; then
        python3 scripts/compare_losses.py "$out/cpu" "$out/cuda-$variant" \
            --tolerance 5e-3 --grad-tolerance 5e-2 --table
    else
        tail -n 5 "$out/cuda-$variant.log"
    fi
done

echo "== 7B-shaped QLoRA bench, 3 steps (warm-up 1)"
timeout "$(left)" "$kiln" bench recipes/bench/qwen2.5-7b-qlora-bench.toml --steps 3 --warmup 1 \
    --json "$out/kiln-7b.json" >"$out/kiln-7b.log" 2>&1
echo "kiln bench: exit $?"
tail -n 15 "$out/kiln-7b.log"
if [[ -s $out/kiln-7b.json ]] && python3 -c 'import torch, peft, bitsandbytes' 2>/dev/null; then
    timeout "$(left)" python3 scripts/bench_torch.py --like "$out/kiln-7b.json" \
        --json "$out/torch-7b.json" 2>&1 | tail -n 15
else
    echo "bench_torch.py skipped: no kiln result, or no torch + peft + bitsandbytes here"
fi

tar czf "$out/cubecl.tgz" -C "$KILN_CACHE_DIR" cubecl 2>/dev/null && echo "kernel cache: $out/cubecl.tgz"
echo "gpu_check: done in $SECONDS s"

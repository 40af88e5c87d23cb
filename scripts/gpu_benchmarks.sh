#!/usr/bin/env bash
# Issue 6, target 7 on a CUDA machine, in one command that ends within BUDGET seconds (default 540):
# the paper's comparison in training and inference (with timm's B0 when timm is installed),
# fp32/bf16/fp16, channels_last, the CUDA tests, then torch.compile (most wanted first). Each step writes its output
# to OUTPUT_DIR/STEP.txt (a run_benchmark step also its figures, with the commit and machine, to
# STEP.json); a step that fails or runs out of time is noted there and the next one runs, so a
# short lease still brings back what finished. Record the figures in docs/benchmarks.md with this
# command, the machine and the date.
#
#   bash scripts/gpu_benchmarks.sh OUTPUT_DIR
#
# DEVICE, BATCH, TIMED, ROUNDS, BUDGET and PYTHON override the defaults (cuda, 128, 5, 2, 540,
# python3); STEP_CAP replaces every step's own time limit (for a step run alone on a fresh machine,
# whose compiles take longer); STEPS names the steps to run (see run_named), in order; e.g.
# DEVICE=cpu BATCH=2 TIMED=1 ROUNDS=1 COMPILE=0 checks the script itself on a machine without a GPU.
# On an H200 (2026-11-26) a step of 4-6 eager rows took 30-60 s (a new dtype or layout spends 7-26 s
# in cuDNN's autotuner), a compiled row 70-125 s more; the tests step 113 s. On an H100 (later that
# day) the tests step took 141 s and a compiled row 65-75 s; on a freshly started H100 (2026-11-27)
# the tests needed over 183 s and a compiled B2 row 209 s; on freshly started H200s (later that day) a
# compiled B2 G1-BN row 144 s, and G16-LN+PN's more than 234 s; with each row traced alone (C.13)
# 116 s and 228 s, the step train_b2_cuda_graphs_bn 467 s in all. Rows' img/s go to
# stderr as they are measured, so a step cut by its time limit still shows what finished.
#
# Compiles take most of a short lease; Inductor's cache carries them over to the next one. The
# steps compile into a cache folder, packed after them into OUTPUT_DIR/inductor-cache.tar.gz when
# that is under 16 MiB (what a device run brings back per file). CACHE=FILE.tar.gz unpacks such a
# pack before the steps, so compiles that hit it skip Inductor's code generation and Triton's
# builds (the key includes the torch version and the GPU: reuse it on the same kind of machine).
set -uo pipefail
if [ $# -ne 1 ]; then echo "usage: bash scripts/gpu_benchmarks.sh OUTPUT_DIR" >&2; exit 2; fi
out=$1
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
budget=${BUDGET:-540}
common=(--device "$device" --batch-size "${BATCH:-128}" --warmup-steps 3 --timed-steps "${TIMED:-5}"
        --rounds "${ROUNDS:-2}")
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2  # absolute: the steps run from the repository root
cache_pack=${CACHE:-}
if [ -n "$cache_pack" ]; then
    [ -f "$cache_pack" ] || { echo "error: CACHE=$cache_pack: no such file" >&2; exit 2; }
    cache_pack=$(cd "$(dirname "$cache_pack")" && pwd)/$(basename "$cache_pack")
fi
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/gpu_benchmarks_inductor_cache}
mkdir -p "$TORCHINDUCTOR_CACHE_DIR" || exit 2
if [ -n "$cache_pack" ]; then
    tar -xzf "$cache_pack" -C "$TORCHINDUCTOR_CACHE_DIR" || { echo "error: CACHE=$cache_pack is not a .tar.gz" >&2; exit 2; }
    echo "# Inductor cache unpacked from $cache_pack"
fi
# an offline GPU machine may lack simple-parsing (and docstring-parser): wheels of both in .whl/
# (pip download --no-deps ... -d .whl) are installed beside the machine's packages
if ! "$python" -c 'import simple_parsing' 2>/dev/null; then
    if ! compgen -G ".whl/*.whl" > /dev/null; then
        echo "error: simple-parsing is not installed; pip install it, or put its wheels in .whl/" >&2
        exit 2
    fi
    "$python" -m pip install -q --no-index --no-deps --target /tmp/gpu_benchmarks_site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/gpu_benchmarks_site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "$device" = cuda ]; then
    "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "error: no CUDA device")' || exit 1
    nvidia-smi > "$out/nvidia-smi.txt" 2>&1
fi
"$python" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'

failed=0
run_step() {  # name, most seconds it may take, then the command; stops at the budget's end
    local name=$1 cap=${STEP_CAP:-$2} left=$((budget - SECONDS))
    shift 2
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped, the budget of ${budget} s is spent" | tee "$out/$name.txt"
        failed=1
        return
    fi
    [ "$cap" -lt "$left" ] || cap=$left
    echo "== $name (at most $cap s)"
    timeout "$cap" "$@" 2>&1 | tee "$out/$name.txt"
    local code=${PIPESTATUS[0]}
    if [ "$code" -ne 0 ]; then
        echo "== $name: exit $code$([ "$code" -eq 124 ] && echo ", out of time")" | tee -a "$out/$name.txt"
        failed=1
    fi
}
# no new round starts after half a step's time, so that its table is printed before the cap
bench() { run_step "$1" "$2" "$python" run_benchmark.py "${common[@]}" --round-time-limit $((${STEP_CAP:-$2} / 2)) \
    --results-file "$out/$1.json" "${@:3}"; }

# an interleaved A/B of scripts/ab_proxy_norm.py at 160 px: name, --what, precision
ab() { run_step "$1" 120 "$python" scripts/ab_proxy_norm.py --what "$2" --precision "$3" --device "$device" \
    --batch-size "${BATCH:-128}" --resolution 160 --rounds 3 --steps 3; }

b0=efficientnet-b0
timm_row=()
"$python" -c 'import timm' 2>/dev/null && timm_row=(timm:efficientnet_b0@224+fp32+nocl)
# target 1 (and 3): G1-BN native, G16-GN native, G16-LN+PN native and half resolution, fp32 NCHW
paper=($b0-g1-bn@224+fp32+nocl $b0-g16-gn@224+fp32+nocl $b0-g16-lnpn@224+fp32+nocl $b0-g16-lnpn@160+fp32+nocl)
b2=efficientnet-b2
paper_b2=($b2-g1-bn@260+fp32+nocl $b2-g16-gn@260+fp32+nocl $b2-g16-lnpn@260+fp32+nocl $b2-g16-lnpn@196+fp32+nocl)
lnpn=$b0-g16-lnpn@160
ln=$b0-g16-lnpn@160+proxy_norm=false
run_named() {
    case $1 in
        train_paper) bench "$1" 100 --compare "${paper[@]}" "${timm_row[@]}" ;;
        inference_paper) bench "$1" 60 --mode inference --compare "${paper[@]}" ;;
        # targets 2, 4 and 5: Proxy Norm against LN, and precision x layout, for G16-LN+PN and G1-BN
        train_precision) bench "$1" 120 --compare $lnpn+fp32+nocl $ln+fp32+nocl $lnpn+bf16+cl \
            $ln+bf16+cl $lnpn+fp16+cl $b0-g1-bn@224+bf16+cl ;;
        tests) [ "$device" != cuda ] || run_step "$1" 200 "$python" -m pytest -q -p no:cacheprovider \
            tests/test_accelerator.py ;;
        # compiled: Proxy Norm against LN (target 2 on the GPU), bf16 against fp32, G1-BN
        train_compile_lnpn) bench "$1" 240 --compare $lnpn+bf16+cl $lnpn+bf16+cl+compile \
            $ln+bf16+cl+compile ;;
        train_compile_fp32) bench "$1" 150 --compare $lnpn+fp32+nocl $lnpn+fp32+nocl+compile ;;
        train_compile_bn) bench "$1" 150 --compare $b0-g1-bn@224+bf16+cl $b0-g1-bn@224+bf16+cl+compile ;;
        # where Proxy Norm's time goes on the GPU: kernels by GPU time, and how busy the GPU was
        # (launch-bound or not), eager then compiled, each against LN without Proxy Norm
        profile_eager) bench "$1" 90 --rounds 1 --profile-calls 3 --profile-rows 30 --compare \
            $lnpn+fp32+nocl $ln+fp32+nocl $lnpn+bf16+cl $ln+bf16+cl ;;
        # Proxy Norm's parts taken away one at a time (moments' gradient, SE terms, folds), eager
        ab_parts) ab "$1" parts fp32 ;;
        # the batched moment table against each layer's own moments (a pipeline stage's gain,
        # docs/benchmarks.md A.8), fp32 and bf16; and in bf16 the eager GPU's no-fold rule
        ab_table) ab "$1" table fp32 ;;
        ab_table_bf16) ab "$1" table bf16 ;;
        ab_fold_bf16) ab "$1" fold_gpu bf16 ;;
        # CUDA graphs (--compile-mode reduce-overhead) against plain compile, LN+PN and LN
        train_cuda_graphs) bench "$1" 300 --rounds 1 --compare $lnpn+bf16+cl+compile \
            $lnpn+bf16+cl+compile+compile_mode=reduce-overhead $ln+bf16+cl+compile+compile_mode=reduce-overhead ;;
        profile_compiled) bench "$1" 300 --rounds 1 --profile-calls 3 --profile-rows 30 --compare \
            $lnpn+bf16+cl+compile $ln+bf16+cl+compile ;;
        # B2 (docs/benchmarks.md C.10): the paper's comparison at 260 and 196 px, eager fp32 (a cuDNN
        # autotune of 10-35 s per new shape comes first); then what C.10 left: CUDA graphs for
        # G16-LN+PN at the reduced resolution against eager, and against G1-BN at its best eager setting
        train_paper_b2) bench "$1" 200 --compare "${paper_b2[@]}" ;;
        train_b2_cuda_graphs) bench "$1" 400 --rounds 1 --compare $b2-g1-bn@260+bf16+cl $b2-g16-lnpn@196+bf16+cl \
            $b2-g16-lnpn@196+bf16+cl+compile+compile_mode=reduce-overhead ;;
        # G1-BN under CUDA graphs too (C.11 compared CUDA-graphed G16-LN+PN with eager G1-BN): two B2
        # compiles, about 400 s on a fresh machine, so STEP_CAP=570 BUDGET=580 in a call of its own
        train_b2_cuda_graphs_bn) bench "$1" 400 --rounds 1 --compare $b2-g1-bn@260+bf16+cl \
            $b2-g1-bn@260+bf16+cl+compile+compile_mode=reduce-overhead \
            $b2-g16-lnpn@196+bf16+cl+compile+compile_mode=reduce-overhead ;;
        *) echo "unknown step $1" >&2; failed=1 ;;
    esac
}
# most wanted first; STEPS="a b" runs those alone (at most 8 come back from a device run)
default_steps="train_paper inference_paper train_precision tests train_compile_lnpn train_compile_bn"
[ "${COMPILE:-1}" = 1 ] || default_steps="train_paper inference_paper train_precision tests"
for name in ${STEPS:-$default_steps}; do
    run_named "$name"
done
pack=$out/inductor-cache.tar.gz
if [ -n "$(ls -A "$TORCHINDUCTOR_CACHE_DIR")" ] && tar -czf "$pack" -C "$TORCHINDUCTOR_CACHE_DIR" .; then
    size=$(stat -c %s "$pack")
    if [ "$size" -gt $((16 * 1024 * 1024)) ]; then
        rm -f "$pack"
        echo "# Inductor cache not kept: $((size / 1048576)) MiB packed, over the 16 MiB a device run brings back"
    else
        echo "# Inductor cache packed: $pack ($((size / 1024)) KiB); CACHE=... reuses it"
    fi
fi
echo "== done in $SECONDS s"
exit $failed

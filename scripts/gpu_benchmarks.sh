#!/usr/bin/env bash
# Issue 6, target 7 on a CUDA machine, in one command (about 10 minutes on one H100): the paper's
# comparison in training and inference, fp32/bf16/fp16, channels_last, torch.compile, and the
# CUDA tests. Each step's output goes to OUTPUT_DIR, one file per step; record the figures in
# docs/benchmarks.md with this command, the machine and the date.
#
#   bash scripts/gpu_benchmarks.sh OUTPUT_DIR
#
# DEVICE, BATCH, TIMED and ROUNDS override the defaults (cuda, 128, 10, 3); e.g.
# DEVICE=cpu BATCH=2 TIMED=1 ROUNDS=1 COMPILE=0 checks the script itself on a machine without a GPU.
set -euo pipefail
if [ $# -ne 1 ]; then echo "usage: bash scripts/gpu_benchmarks.sh OUTPUT_DIR" >&2; exit 2; fi
out=$1
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
common=(--device "$device" --batch-size "${BATCH:-128}" --warmup-steps 3 --timed-steps "${TIMED:-10}"
        --rounds "${ROUNDS:-3}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

if [ "$device" = cuda ]; then
    "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "error: no CUDA device")'
    nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
fi

b0=efficientnet-b0
step() {  # name, then run_benchmark.py's arguments
    local name=$1
    shift
    echo "== $name"
    "$python" run_benchmark.py "${common[@]}" "$@" 2>&1 | tee "$out/$name.txt"
}

# target 1: G1-BN native, G16-GN native, G16-LN+PN native and half resolution, fp32 NCHW
paper=($b0-g1-bn@224+fp32+nocl $b0-g16-gn@224+fp32+nocl $b0-g16-lnpn@224+fp32+nocl $b0-g16-lnpn@160+fp32+nocl)
step train_paper --compare "${paper[@]}"
step inference_paper --mode inference --compare "${paper[@]}"
# targets 2, 4 and 5: Proxy Norm against LN, and precision x layout for G16-LN+PN and G1-BN
step train_precision --compare $b0-g16-lnpn@160+fp32+nocl $b0-g16-lnpn@160+proxy_norm=false+fp32+nocl \
    $b0-g16-lnpn@160+bf16+cl $b0-g16-lnpn@160+proxy_norm=false+bf16+cl $b0-g16-lnpn@160+fp16+cl \
    $b0-g16-lnpn@160+bf16+nocl $b0-g1-bn@224+bf16+cl $b0-g1-bn@224+fp16+cl
if [ "${COMPILE:-1}" = 1 ]; then
    step train_compile --compare $b0-g16-lnpn@160+bf16+cl $b0-g16-lnpn@160+bf16+cl+compile \
        $b0-g1-bn@224+bf16+cl $b0-g1-bn@224+bf16+cl+compile
fi

if [ "$device" = cuda ]; then
    echo "== tests"
    "$python" -m pytest -q tests/test_accelerator.py 2>&1 | tee "$out/tests.txt"
fi

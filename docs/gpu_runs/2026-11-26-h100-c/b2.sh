#!/usr/bin/env bash
# H100 call (2026-11-26, twelfth session): B2 on the GPU (what C.9 left), then the CUDA tests at the current commit
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi > $OUT/nvidia-smi.txt 2>&1; git log --oneline -1 > $OUT/commit.txt 2>/dev/null
python3 -c 'import torch; print(torch.__version__, torch.backends.cudnn.version())' | tee $OUT/versions.txt
step() { local name=$1 cap=$2; shift 2; echo "== $name (at most $cap s, at ${SECONDS} s)"; local s=$SECONDS
  timeout "$cap" "$@" > "$OUT/$name.txt" 2>&1; local rc=$?; tail -n 16 "$OUT/$name.txt"; echo "== $name: exit $rc in $((SECONDS - s)) s"; }
GN=efficientnet-b2-g16-gn@260+fp32+nocl
step warm_gn_nobench 50 python3 .gpu/b2_warmup.py $GN 0 10 8 64
step warm_gn_bench 120 python3 .gpu/b2_warmup.py $GN 1 10 8 64
step warm_bn_bench 40 python3 .gpu/b2_warmup.py efficientnet-b2-g1-bn@260+fp32+nocl 1 10 8 64
L=efficientnet-b2-g16-lnpn
step train_paper_b2 200 python3 run_benchmark.py --device cuda --batch-size 64 --warmup-steps 3 --timed-steps 5 --rounds 2 \
    --round-time-limit 150 --results-file $OUT/train_paper_b2.json --compare efficientnet-b2-g1-bn@260+fp32+nocl $GN \
    $L@260+fp32+nocl $L@196+fp32+nocl timm:efficientnet_b2@260+fp32+nocl
left=$((530 - SECONDS))
if [ $left -gt 60 ]; then step tests $left python3 -m pytest -q -x tests/test_accelerator.py -p no:cacheprovider; fi
echo "== done in $SECONDS s"

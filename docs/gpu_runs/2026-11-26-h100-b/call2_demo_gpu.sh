#!/usr/bin/env bash
# second H100 call: the demo end to end on a GPU (eager; compiled with CUDA graphs), a resolution
# sweep of the eager run, and the paper's comparison for B2
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
step() { local name=$1 cap=$2; shift 2; echo "== $name (at most $cap s, at ${SECONDS} s)"; local s=$SECONDS
  timeout "$cap" "$@" > "$OUT/$name.txt" 2>&1; local rc=$?; tail -n 14 "$OUT/$name.txt"; echo "== $name: exit $rc in $((SECONDS - s)) s"; }
step demo_eager 80 python3 run_train.py --config demo --device cuda --output-dir /tmp/runs --run-name eager --noprogress
cp /tmp/runs/eager/final.json $OUT/demo_eager_final.json 2>/dev/null
step demo_graphs 150 python3 run_train.py --config demo --device cuda --compile true --compile-mode reduce-overhead \
    --output-dir /tmp/runs --run-name graphs --noprogress
cp /tmp/runs/graphs/final.json $OUT/demo_graphs_final.json 2>/dev/null
step sweep 50 python3 run_validate.py --checkpoint /tmp/runs/eager --resolutions 48,56,64,80 --device cuda --noprogress
L=efficientnet-b2-g16-lnpn
step train_paper_b2 90 python3 run_benchmark.py --device cuda --batch-size 64 --warmup-steps 3 --timed-steps 5 --rounds 2 \
    --round-time-limit 40 --compare efficientnet-b2-g1-bn@260+fp32+nocl efficientnet-b2-g16-gn@260+fp32+nocl \
    $L@260+fp32+nocl $L@196+fp32+nocl timm:efficientnet_b2@260+fp32+nocl
echo "== done in $SECONDS s"

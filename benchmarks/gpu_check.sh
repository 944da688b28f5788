#!/usr/bin/env bash
# The whole device check of issue 14, in one call (at most 9 minutes: each step has its own timeout), from the repo root:
#
#   bash benchmarks/gpu_check.sh "$OUT"          # OUT: a folder for the results (the device tool's $OUT)
#
# The GPU image has torch, triton, timm, safetensors, peft and pytest but not this project: it runs
# from the source tree (PYTHONPATH, no install, nothing from the network). Steps, most important
# first, each bounded so that a slow one cannot starve the next:
#   1. the GPU and the versions;
#   2. the kernel tests on the GPU (fused and split vs the reference; bf16 included there);
#   3. the engine's mixed batch vs per-image folded weights: every path × fp32/bf16 × graphs off/on;
#   4. the kernel benchmark with its tile sweep, the engine with its measured kernel choice, batch-1
#      latency eager and from CUDA graphs;
#   5. `medlego bench --device cuda` on vit_base at 224 px (batch 64; PEFT's mixed forward beside it).
# Results land in OUT as kernel_bench.{json,md}, gpu_correctness.{json,md}, bench.{json,md}, log.txt
# (the device tool brings back at most 8 files); copy them into benchmarks/results/ and commit.
set -u
OUT=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
LOG=$OUT/log.txt
step() { echo "=== $(date -u +%T) $*" | tee -a "$LOG"; }

step "1. device"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee -a "$LOG"

step "2. kernel tests on the GPU"
# the two tests left out run CPU tensors through Triton (they need the interpreter: CI runs them)
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernel.py \
    -k "not model_forward_through_the_kernel and not benchmark_script" 2>&1 | tail -n 30 | tee -a "$LOG"

step "3. engine vs folded weights"
timeout 120 python3 -m medlego.benchmarks.gpu_correctness --device cuda --out "$OUT" 2>&1 | tail -n 40 | tee -a "$LOG"

step "4. kernel benchmark"
timeout 180 python3 -m medlego.benchmarks.kernel_bench --out "$OUT" 2>&1 | tail -n 80 | tee -a "$LOG"

step "5. medlego bench --device cuda"
mkdir -p /tmp/medlego-bench
timeout 150 python3 -c "from medlego.cli import main; raise SystemExit(main(['bench', '--device', 'cuda', \
    '--model', 'vit_base_patch16_224', '--batch-sizes', '1,8,64', '--no-progress', '--out', '/tmp/medlego-bench']))" \
    2>&1 | tail -n 40 | tee -a "$LOG"
cp /tmp/medlego-bench/bench.json /tmp/medlego-bench/bench.md "$OUT"/ 2>/dev/null
step "done"

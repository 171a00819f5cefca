#!/usr/bin/env bash
# The CUDA-path checks in one go, on one GPU with no internet, in under 10 minutes. Writes everything to $OUT
# (default: runs/gpu_check) and prints a summary last. Each step has its own time limit; the real-scale
# measurements come first. FULL=1 adds the older comparison benches (another ~8 minutes).
#
#   bash bench/gpu_check.sh            # needs torch with CUDA, transformers, and hpo3 installed
#   FULL=1 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
command -v python >/dev/null || {   # images with only python3
  mkdir -p /tmp/pybin; ln -sf "$(command -v python3)" /tmp/pybin/python; export PATH=/tmp/pybin:$PATH; }
step() {   # step SECONDS NAME CMD...: run with a limit, log output, record time and exit code
  local lim=$1 name=$2; shift 2
  echo "=== $name" | tee -a "$LOG"
  local t0=$(date +%s%N)
  timeout "$lim" "$@" >>"$LOG" 2>&1; local rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf "%-38s rc %3d  %6d ms\n" "$name" $rc $ms | tee -a "$OUT/summary.txt"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; lscpu | grep "Model name"
  python -c "import torch, transformers, model; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'cpu bf16', torch.cpu._is_avx512_bf16_supported())"
} 2>&1 | tee "$OUT/summary.txt" >>"$LOG"
step 120 "cuda_check (parity, greedy, packed)"  python bench/cuda_check.py
# the rollout engine with the CUDA graph against the static CUDA-graph path at the 0.5B shape, bf16: Nano-vLLM's
# benchmark shape (256 requests, prompt and output lengths uniform in 100-1,024), then the GRPO shape; the
# engine's decode against the HBM roofline
step 150 "rollout engine 0.5b, Nano-vLLM shape"  python bench/rollout.py --device cuda --dtype bfloat16 \
  --preset qwen2.5-0.5b --shape nano --requests 256 --min-len 100 --max-len 1024 --slots 256 --cuda-graph \
  --repeat 1 --no-hf --no-all-rows
step 200 "rollout engine 0.5b, GRPO shape"       python bench/rollout.py --device cuda --dtype bfloat16 \
  --preset qwen2.5-0.5b --shape grpo --prompts 32 --group 8 --max-new 1024 --slots 64 --cuda-graph \
  --repeat 1 --no-hf --no-all-rows
# SFT tokens/s and MFU at the Qwen2.5-1.5B shape (packed rows, flex_attention), decode vs the HBM roofline
step 200 "roofline: SFT 1.5b, decode 0.5b"      python bench/scale.py roofline --shape qwen2.5-1.5b
# the memory plan against the allocator's peak: one SFT step and one GRPO step at the 1.5B shape, bf16
step 240 "rehearsal 1.5b, one GPU, bf16"        python bench/scale.py rehearsal --shape qwen2.5-1.5b \
  --nproc 1 --device cuda --bf16 --work "$OUT/scale"
step 100 "generate 20m fp32+bf16, cuda graph"  python bench/generate.py --device cuda --cuda-graph --repeats 2
# tensor-parallel rollouts need a group of GPUs: one GPU cannot run them (2 CPU ranks check them elsewhere)
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  step 400 "rollout-tp 1 vs 2, 0.5b, 2 GPUs"     python bench/scale.py rehearsal --shape qwen2.5-0.5b --nproc 2 \
    --device cuda --bf16 --only grpo --rollout-tp 1 2 --work "$OUT/scale_tp"
else
  echo "rollout-tp: skipped, one GPU cannot run a tensor-parallel group" | tee -a "$OUT/summary.txt"
fi
if [ "${FULL:-0}" = 1 ]; then
  step 240 "QUICK pipeline (run.sh, 1 GPU)"     env QUICK=1 OUT=runs/gpu_quick \
    VIRTUAL_ENV=${VIRTUAL_ENV:-system} bash run.sh
  step 120 "train 20m fp32+bf16 16x1024"        python bench/train.py --device cuda --batch 16 --seq 1024
  step 120 "grpo bench tiny bf16 cuda graph"    python bench/grpo.py --device cuda --bf16 --cuda-graph
  step 180 "generate qwen2.5-0.5b bf16 b64"     python bench/generate.py --device cuda --preset qwen2.5-0.5b \
    --dtype bfloat16 --batch 64 --new 128 --repeats 2 --cuda-graph
fi
cp runs/gpu_quick/stage_table.md runs/gpu_quick/curves.png "$OUT/" 2>/dev/null
KEEP="max \||greedy|tp_check|packed|ratio|^\[|tok/s|tokens/s|MFU|roofline|^\| (SFT|GRPO)|rollout|kg |\| |^engine|^static"
echo; grep -E "$KEEP" "$LOG" | grep -v "^   " | head -80
echo; cat "$OUT/summary.txt"

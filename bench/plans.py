"""
The README's memory-plan table, made again: each row is a `--dry-run` of train_sft.py or train_grpo.py with the
README's flags, on a folder holding only config.json of Qwen2.5-7B or Qwen2.5-32B (the shapes of their public
config.json files; no weights, no tokenizer: prompts are planned at 512 tokens). Prints, per row, the plan per
GPU and the lines of the plan that decide it.

    python bench/plans.py            # every row (~1 min on a CPU)
    python bench/plans.py --only 32b
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from hf_io import config_to_hf  # noqa: E402
from model import ModelConfig  # noqa: E402

SHAPES = {   # Qwen2.5-7B / -32B's config.json: the sizes a plan reads
    "7b": ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6, tie_word_embeddings=False,
                      max_position_embeddings=32768),
    "32b": ModelConfig(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                       num_attention_heads=40, num_key_value_heads=8, rope_theta=1e6, tie_word_embeddings=False,
                       max_position_embeddings=32768),
}
SFT = "--bf16 --act-ckpt --seq-len 8192 --rows-per-step 64 --micro-rows 4"
GRPO = ("--bf16 --act-ckpt --questions-per-step 64 --group-size 8 --stage2-group-size 16 "
        "--max-new-tokens 2048 --val-size 0")
ROWS = [   # (label, shape, script, GPUs, GB a GPU, flags): the README's rows, in its order
    ("7B SFT, as above", "7b", "sft", 8, 80, SFT),
    ("7B GRPO, as above", "7b", "grpo", 8, 80, GRPO + " --micro-batch 8 --kl-beta 0.04"),
    ("7B GRPO, --rollout-tp 4", "7b", "grpo", 8, 80, GRPO + " --micro-batch 8 --kl-beta 0.04 --rollout-tp 4"),
    ("7B GRPO, --micro-batch 32, no --act-ckpt", "7b", "grpo", 8, 80,
     GRPO.replace("--act-ckpt ", "") + " --micro-batch 32 --kl-beta 0.04"),
    ("32B SFT, --micro-rows 2", "32b", "sft", 16, 80, SFT.replace("--micro-rows 4", "--micro-rows 2")),
    ("32B SFT, --micro-rows 2", "32b", "sft", 8, 80, SFT.replace("--micro-rows 4", "--micro-rows 2")),
    ("32B GRPO, --micro-batch 2, the paper's loss (no KL)", "32b", "grpo", 8, 80,
     GRPO + " --micro-batch 2 --kl-beta 0"),
    ("the same, --rollout-tp 8", "32b", "grpo", 8, 80, GRPO + " --micro-batch 2 --kl-beta 0 --rollout-tp 8"),
    ("the same, --rollout-tp 0", "32b", "grpo", 8, 80, GRPO + " --micro-batch 2 --kl-beta 0 --rollout-tp 0"),
    ("32B GRPO, --micro-batch 4, KL", "32b", "grpo", 16, 80, GRPO + " --micro-batch 4 --kl-beta 0.04"),
    ("the same, --rollout-tp 8", "32b", "grpo", 16, 80,
     GRPO + " --micro-batch 4 --kl-beta 0.04 --rollout-tp 8"),
    ("32B GRPO, --micro-batch 4, KL", "32b", "grpo", 16, 141, GRPO + " --micro-batch 4 --kl-beta 0.04"),
]

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--only", choices=list(SHAPES), default=None, help="the rows of one shape")
ap.add_argument("--lines", type=int, default=3, help="the plan's largest lines printed under each row")
args = ap.parse_args()

tmp = tempfile.mkdtemp(prefix="bench_plans_")
data = {"sft": os.path.join(tmp, "sft.jsonl"), "grpo": os.path.join(tmp, "rl.jsonl")}   # read, then counted
with open(data["grpo"], "w", encoding="utf-8") as f:
    f.write(json.dumps(dict(id="1", question="q", options={"A": "x", "B": "y"}, answer="A")) + "\n")
with open(data["sft"], "w", encoding="utf-8") as f:
    f.write(json.dumps(dict(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]))
            + "\n")
for name, cfg in SHAPES.items():
    os.makedirs(os.path.join(tmp, name))
    with open(os.path.join(tmp, name, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_to_hf(cfg, "bfloat16"), f)

for label, shape, script, gpus, mem, flags in ROWS:
    if args.only and shape != args.only:
        continue
    cmd = [sys.executable, f"train_{script}.py", "--init", os.path.join(tmp, shape), "--data", data[script],
           "--dry-run", "--plan-world", str(gpus), "--gpu-mem", str(mem), "--out", os.path.join(tmp, "out")]
    cmd += flags.split()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    out = (p.stdout + p.stderr).strip().splitlines()
    plan = [line for line in out if line.startswith("  ") and " GB " in line]
    total = next((line.split("GB")[0].split()[-1] for line in plan if "total" in line), "?")
    terms = sorted((line for line in plan if "total" not in line), key=lambda x: -float(x.split()[1]))
    verdict = out[-1] if out else f"exit {p.returncode}"
    print(f"{label} | {gpus} x {mem} GB | {total} GB | {verdict}")
    for line in terms[:args.lines]:
        print(f"    {line.strip()}")
    picked = [line for line in out if line.startswith("--rollout-tp 0:")]
    if picked:
        print(f"    {picked[0]}")
shutil.rmtree(tmp, ignore_errors=True)   # the config-only folders and the one-line datasets

"""
Where a GRPO step's time goes: rollout (KV-cached generation) / reference forward (KL) / policy update,
and rollout tokens/s. Runs train_grpo.py for a few steps with a KL reference so all three parts are timed,
then summarises its metrics.jsonl (the first step is left out as warm-up), and runs the rollout engine alone
on the very requests of those steps (their prompts, each completion's length forced, the run's decode slots):
the step's rollout tokens/s beside the engine's own. With --share-prompt N > 1 (default 4) it runs again
with each question's completions scored N to a row behind one copy of the prompt, and prints the reference +
train time of that run against the first (same seed, settings and process count).

    python bench/grpo.py                 # builds a tiny KG set and a from-scratch tiny policy
    python bench/grpo.py --model runs/demo/seed0/sft --data runs/demo/data/rl_train.jsonl
    python bench/grpo.py --model models/SmolLM2-135M-Instruct --data runs/real/data/rl_train.jsonl \
        --max-new-tokens 192 --kl-beta 0 --share-prompt 1 --steps 3   # the real model, train_grpo's defaults
    torchrun is not needed here; pass --nproc 2 to time the 2-rank FSDP2 run instead.

To compare two commits, give both the same --init and --data: by default each builds its own with its own
make_data.py and train_sft.py, so the prompts (and the work) change whenever those do.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--init", "--model", dest="init", default=None, help="policy checkpoint; default: a random-init "
                "tiny model (worst "
                "case: every completion runs to --max-new-tokens)")
ap.add_argument("--data", default=None, help="rl_train.jsonl; default: built here with make_data.py")
ap.add_argument("--steps", type=int, default=6, help="GRPO steps (the first is warm-up)")
ap.add_argument("--questions-per-step", type=int, default=8, help="questions per step")
ap.add_argument("--group-size", type=int, default=8, help="completions per question")
ap.add_argument("--max-new-tokens", type=int, default=128, help="completion budget")
ap.add_argument("--kl-beta", type=float, default=0.01, help="> 0 so the reference forward is timed")
ap.add_argument("--nproc", type=int, default=1, help="ranks (torchrun, gloo on CPU)")
ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
ap.add_argument("--device", default=None, help="cpu / cuda")
ap.add_argument("--cuda-graph", action="store_true", help="rollouts with generate(cuda_graph=True) (one GPU)")
ap.add_argument("--share-prompt", type=int, default=4, help="second run with train_grpo.py --share-prompt N "
                "(1: only the first run)")
ap.add_argument("--gen-slots", type=int, default=0, help="train_grpo.py --gen-slots (0: the memory plan's)")
ap.add_argument("--seed", type=int, default=0, help="seed")
args = ap.parse_args()

tmp = tempfile.mkdtemp(prefix="bench_grpo_")
env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}


def run(cmd, nproc=1):
    pre = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              f"--nproc_per_node={nproc}"]
    p = subprocess.run(pre + cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stdout[-3000:] + p.stderr[-3000:])
    return p.stdout


data, init = args.data, args.init
if data is None:
    run(["make_data.py", "--out", f"{tmp}/data", "--kg-questions", "400", "--kg-max-diseases", "40", "--seed",
         str(args.seed)])
    data = f"{tmp}/data/rl_train.jsonl"
if init is None:
    if not os.path.exists(f"{tmp}/data/sft.jsonl"):
        sys.exit("--init is needed with --data")
    run(["train_sft.py", "--data", f"{tmp}/data/sft.jsonl", "--out", f"{tmp}/base", "--steps", "0", "--seed",
         str(args.seed)])
    init = f"{tmp}/base"


def bench(share):
    out = f"{tmp}/grpo_share{share}"
    cmd = ["train_grpo.py", "--gen-slots", str(args.gen_slots), "--init", init,
           "--data", data, "--out", out, "--steps", str(args.steps),
           "--questions-per-step", str(args.questions_per_step), "--group-size", str(args.group_size),
           "--max-new-tokens", str(args.max_new_tokens), "--kl-beta", str(args.kl_beta), "--val-size", "8",
           "--eval-every", "1000", "--save-every", "1000", "--seed", str(args.seed), "--share-prompt",
           str(share), "--log-groups", str(args.questions_per_step), "--print-every", "0"]
    cmd += ["--bf16"] if args.bf16 else []
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--cuda-graph"] if args.cuda_graph else []
    log = run(cmd, args.nproc)
    rows = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
    rows = [r for r in rows if "rollout_s" in r][1:]
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    roll, ref, train = mean("rollout_s"), mean("ref_s"), mean("train_s")
    total = roll + ref + train
    print(f"GRPO step ({len(rows)} timed steps, {args.questions_per_step} questions x {args.group_size} "
          f"samples, <= {args.max_new_tokens} new tokens, {args.nproc} rank(s), bf16 {args.bf16}, cuda graph "
          f"{args.cuda_graph}, share-prompt {share}, init {init if args.init else 'random tiny'}; "
          f"peak {max(r['mem_mb'] for r in rows) / 1024:.2f} GB)")
    print(f"  rollout   {roll:7.2f} s  ({roll / total:.0%})   {mean('rollout_tok_s'):,.0f} rollout tok/s per "
          f"rank, mean completion {mean('response_len'):.0f} tokens")
    print(f"  reference {ref:7.2f} s  ({ref / total:.0%})")
    print(f"  train     {train:7.2f} s  ({train / total:.0%})")
    print(f"  total     {total:7.2f} s per step")
    return ref + train, out, log, [r["step"] for r in rows], mean("rollout_tok_s")


def engine_alone(out, log, steps, step_tok_s):
    """The rollout engine alone on the requests of the timed steps (rollouts.jsonl: every group's prompt and
    each completion's length, forced), with the run's decode slots; one process, as the run's rank 0."""
    import re
    import time
    import torch
    sys.path.insert(0, ROOT)
    from engine import generate
    from hf_io import load_model, load_tokenizer
    from mcq import SYSTEM_PROMPT, chat_ids
    from model import SamplingParams
    slots = int(re.search(r"(\d+) decode slots", log).group(1))
    model, tok = load_model(init).eval(), load_tokenizer(init)
    groups = [json.loads(l) for l in open(f"{out}/rollouts.jsonl")]
    secs = tokens = 0
    for s in steps:
        gs = [g for g in groups if g["step"] == s]
        prompts = [chat_ids(tok, [{"role": "system", "content": SYSTEM_PROMPT},
                                  {"role": "user", "content": g["prompt"]}]) for g in gs]
        budgets = [c["length"] for g in gs for c in g["completions"]]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            t = time.perf_counter()
            sp = SamplingParams(budgets, 1.0, num_samples=len(gs[0]["completions"]))
            generate(model, prompts, sp, 0, slots)
            secs, tokens = secs + time.perf_counter() - t, tokens + sum(budgets)
    print(f"rollout tokens/s: the GRPO step {step_tok_s:,.0f} vs the engine alone on the same requests "
          f"{tokens / secs:,.0f} ({step_tok_s / (tokens / secs):.2f}x; {slots} decode slots)")


base, out, log, steps, tok_s = bench(1)
if args.nproc == 1:
    engine_alone(out, log, steps, tok_s)
if args.share_prompt > 1:
    shared = bench(args.share_prompt)[0]
    print(f"reference + train per step: {base:.2f} s (one row per completion) vs {shared:.2f} s "
          f"({args.share_prompt} "
          f"completions per prompt copy): {base / shared:.2f}x")

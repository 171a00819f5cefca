"""
Where our generate() spends its time: torch.profiler over one call, the top ops by self time.

    python bench/profile_generate.py                                  # CPU, 20m preset, batch 16 greedy
    python bench/profile_generate.py --device cuda --dtype bfloat16 --group 8
"""
import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig, Transformer, generate  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--preset", default="20m", help="model preset")
ap.add_argument("--batch", type=int, default=16, help="distinct prompts (ignored with --group > 1: one prompt)")
ap.add_argument("--group", type=int, default=1, help="G samples of one prompt (temperature 1) instead of a greedy batch")
ap.add_argument("--new", type=int, default=64, help="new tokens per row")
ap.add_argument("--device", default="cpu", help="cpu or cuda")
ap.add_argument("--dtype", default="float32", help="float32 or bfloat16")
ap.add_argument("--rows", type=int, default=15, help="ops to print")
ap.add_argument("--seed", type=int, default=0, help="seed for weights and prompts")
args = ap.parse_args()

cfg = ModelConfig.from_name(args.preset)
model = Transformer(cfg).init_weights(args.seed).to(args.device, getattr(torch, args.dtype)).eval()
g = torch.Generator().manual_seed(args.seed)
prompts = [torch.randint(10, cfg.vocab_size, (int(n),), generator=g).tolist()
           for n in torch.randint(16, 96, (args.batch,), generator=g)]
if args.group > 1:
    run = lambda: generate(model, prompts[:1], args.new, temperature=1.0, num_samples=args.group, seed=1)  # noqa: E731
else:
    run = lambda: generate(model, prompts, args.new, temperature=0.0)  # noqa: E731
sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
run()   # warm-up
sync()
t = time.perf_counter()
run()
sync()
dt = time.perf_counter() - t
rows = args.group if args.group > 1 else args.batch
print(f"{args.preset} {args.dtype} on {args.device}: {rows} rows x {args.new} tokens in {dt * 1e3:.0f} ms "
      f"({rows * args.new / dt:,.0f} tok/s, {dt / args.new * 1e3:.2f} ms per step)")
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
with profile(activities=acts) as prof:
    run()
    sync()
key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
if args.device.startswith("cuda"):   # launch-bound? then CPU time per op matters more than GPU time
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))

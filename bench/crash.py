"""
kill -9 while checkpoints are written, again and again: every time, --resume must find a checkpoint to
continue from, and the run that finally gets to the end must equal one never interrupted, bit for bit,
with each step logged once.

    python bench/crash.py                 # 20 kills of a 1-process SFT run that checkpoints every step
    python bench/crash.py --kills 50 --nproc 2

A run is started (then resumed) and watched; when a new checkpoint folder appears, the process (torchrun,
with --nproc 2) gets SIGKILL after a random 0-300 ms: inside torch.distributed.checkpoint's writes, at the
marker, in the removal of the older folder, or in the step after.
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from helpers import write_toy_sft  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--kills", type=int, default=20, help="SIGKILLs during checkpointing")
ap.add_argument("--steps", type=int, default=40, help="SFT steps (one checkpoint each)")
ap.add_argument("--nproc", type=int, default=1, help="ranks")
ap.add_argument("--seed", type=int, default=0, help="seed of the kill times")
args = ap.parse_args()

tmp = tempfile.mkdtemp(prefix="bench_crash_")
write_toy_sft(f"{tmp}/sft.jsonl")
env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
pre = [sys.executable] if args.nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                f"--nproc_per_node={args.nproc}"]


def cmd(out, *extra):
    return pre + ["train_sft.py", "--data", f"{tmp}/sft.jsonl", "--out", out, "--preset", "nano",
                  "--vocab-size",
                  "300", "--seq-len", "128", "--steps", str(args.steps), "--rows-per-step", "4",
                  "--micro-rows", "2",
                  "--eval-every", "10", "--save-every", "1"] + list(extra)


t0 = time.time()
subprocess.run(cmd(f"{tmp}/whole"), cwd=ROOT, env=env, check=True, capture_output=True)
rng = random.Random(args.seed)
out, kills, resumes_from, first = f"{tmp}/killed", 0, [], True
while kills < args.kills:
    p = subprocess.Popen(cmd(out, "--overwrite" if first else "--resume"), cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    first = False
    ck = os.path.join(out, "ckpt")
    seen = set(os.listdir(ck)) if os.path.isdir(ck) else set()
    while p.poll() is None:
        now = set(os.listdir(ck)) if os.path.isdir(ck) else set()
        if now - seen:   # a new checkpoint folder is being written
            time.sleep(rng.uniform(0, 0.3))
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            kills += 1
            break
        time.sleep(0.002)
    log = p.stdout.read()
    if p.returncode == 0:
        sys.exit(f"the run finished before {args.kills} kills: raise --steps")
    if p.returncode != -signal.SIGKILL and "resumed from" not in log and kills:
        sys.exit(f"a resume failed (exit {p.returncode}):\n{log[-2000:]}")
    resumes_from.append(next((line.split("resumed from ")[1].split(" ")[0] for line in log.splitlines()
                              if "resumed from" in line), "step 0"))
    state = sorted(os.listdir(ck)) if os.path.isdir(ck) else []
    print(f"kill {kills:2d}: left {state} (complete: "
          f"{[d for d in state if os.path.exists(os.path.join(ck, d, 'COMPLETE'))]})", flush=True)
p = subprocess.run(cmd(out, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True)
if p.returncode:
    sys.exit(f"the last resume failed:\n{(p.stdout + p.stderr)[-2000:]}")

a = [json.loads(x) for x in open(f"{tmp}/whole/metrics.jsonl")]
b = [json.loads(x) for x in open(f"{out}/metrics.jsonl")]
steps = [r["step"] for r in b]
same_metrics = all(x.get(k) == y.get(k) for x, y in zip(a, b) for k in ("step", "loss", "val_loss",
                                                                        "grad_norm"))
same_model = open(f"{tmp}/whole/model.safetensors", "rb").read() == open(f"{out}/model.safetensors",
                                                                         "rb").read()
print(f"\n{kills} kills during checkpointing, {len(resumes_from)} relaunches, {time.time() - t0:.0f} s")
print(f"relaunches resumed from: {', '.join(os.path.basename(r) for r in resumes_from[1:])}")
print(f"metrics lines {len(b)} for "
      f"{args.steps + 1} steps, duplicates {len(steps) - len(set(steps))}; metrics equal to the "
      "uninterrupted "
      f"run: {same_metrics and len(a) == len(b)}; final model.safetensors byte-identical: {same_model}")

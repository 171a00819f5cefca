import json
import os
import random
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_toy_sft(path, n=120, seed=0):
    """A toy chat set: arithmetic with a rationale and an <answer> tag."""
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = r.randint(0, 9), r.randint(0, 9)
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "Add."}, {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}. <answer>{a + b}</answer>"}]}) + "\n")


def run(args, nproc=1, timeout=300):
    """Run a script as a user would: python, or torchrun with nproc CPU ranks."""
    pythonpath = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))   # keep the caller's entries
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    if nproc == 1:
        cmd = [sys.executable] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + args
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def metrics(path):
    return [json.loads(l) for l in open(path)]

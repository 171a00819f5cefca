"""
common.py: the pieces train_sft.py, train_grpo.py and evaluate.py share: torchrun setup, the LR schedule,
JSONL metrics and PNG curves. FSDP2 sharding, sharded loading and checkpoints are in fsdp.py.
"""
import json
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist

from model import cpu_has_native_bf16


def init_distributed(device=None):
    """Under torchrun: init the process group (gloo on CPU, NCCL on CUDA). Returns (rank, world, device)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            return rank, world, torch.device("cuda", local)
        # CPU ranks share the cores: split them so two ranks do not fight over the same threads
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        return rank, world, torch.device("cpu")
    return 0, 1, torch.device(device)


def close_distributed():
    """End of a torchrun script: wait for every rank (rank 0 may still be writing files), tear the process group
    down, and leave the process at once. Even after destroy_process_group, gloo's threads can abort a rank while
    the interpreter shuts down (SIGABRT, "terminate called without an active exception": seen in a CI run of the
    2-rank GRPO test and, in session 11, after a 2-rank evaluate.py had written all of its results), which fails
    the whole launch. Every file here is written and closed by then, so os._exit skips that shutdown."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def print0(*a, **k):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **k, flush=True)


def all_reduce_sum(x):
    """Sum of a float/int across ranks (identity on one process)."""
    if not dist.is_initialized():
        return x
    t = torch.tensor(float(x), dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def wants_autocast(bf16, device, world):
    """--bf16 means autocast except where FSDP's mixed precision does it already (several GPUs): on CPU, and on a
    single GPU (one process is not sharded, so there is no MixedPrecisionPolicy)."""
    return bf16 and not (device.type == "cuda" and world > 1)


def autocast(device, enabled):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def check_bf16(bf16, device):
    if bf16 and device.type == "cpu" and not cpu_has_native_bf16():
        print0("warning: --bf16 on a CPU without native bf16 (no AVX512-BF16/AMX): emulated, far slower than fp32")


def lr_at(step, total, lr, min_lr, warmup):
    """Linear warmup, then cosine decay to min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * p))


def set_seed(seed):
    random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# metrics


class MetricsLog:
    """One JSON object per line; rank 0 writes. Resumed runs append (earlier steps are kept)."""

    def __init__(self, path, rank, resume=False):
        self.path, self.rank = path, rank
        if rank == 0:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            if not resume and os.path.exists(path):
                os.remove(path)
        self.t0 = time.time()

    def log(self, **row):
        if self.rank == 0:
            row["time"] = round(time.time() - self.t0, 3)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def read_metrics(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def plot_metrics(jsonl, png, keys, title=""):
    """PNG of the given keys against step (matplotlib is optional: skipped quietly if absent)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(jsonl)
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r and r[k] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plot_runs(run_dir):
    """One PNG for a run.sh folder: SFT loss, GRPO reward, training accuracy, zero-variance fraction and
    held-out accuracy by step, one line per seed."""
    import glob
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    panels = [("sft", "loss", "SFT loss"), ("sft", "val_loss", "SFT held-out loss"), ("grpo", "reward", "GRPO reward"),
              ("grpo", "accuracy", "GRPO rollout accuracy"), ("grpo", "zero_var_frac", "zero-variance groups"),
              ("grpo", "val_accuracy", "GRPO held-out accuracy (%)")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (stage, key, title) in zip(axes.flat, panels):
        for sd in sorted(glob.glob(os.path.join(run_dir, "seed*"))):
            p = os.path.join(sd, stage, "metrics.jsonl")
            if os.path.exists(p):
                pts = [(r["step"], r[key]) for r in read_metrics(p) if r.get(key) is not None]
                ax.plot([a for a, _ in pts], [b for _, b in pts], label=os.path.basename(sd), marker="." if len(pts) < 15 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    out = os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def add_run_flags(ap, out, eval_every, save_every, eval_help):
    """The '# --- run' flags both trainers share."""
    ap.add_argument("--out", default=out, help="output folder")
    ap.add_argument("--eval-every", type=int, default=eval_every, help=eval_help)
    ap.add_argument("--save-every", type=int, default=save_every, help="resumable checkpoint every N steps")
    ap.add_argument("--resume", action="store_true", help="continue from {out}/ckpt")
    ap.add_argument("--stop-after", type=int, default=None, help="stop after this step (tests of resume)")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    ap.add_argument("--dry-run", action="store_true", help="print the memory plan per rank and exit: 0 if it fits, "
                    "1 (naming the flag to change) if not; reads config.json, never the weights")
    ap.add_argument("--plan-world", type=int, default=None, help="plan for this many ranks (default: this launch's)")
    ap.add_argument("--gpu-mem", type=float, default=None, help="plan for a GPU with this many GB (default: this "
                    "device's; on a CPU, this machine's memory shared by its ranks)")

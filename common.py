"""
common.py: only what the scripts share (train_sft.py, train_grpo.py, evaluate.py, and fast.py's bf16 probe):
torchrun setup and collectives, bf16 / autocast checks, the LR schedule and seeds, JSONL metrics, the run
folder (refused, resumed or overwritten; locked) and the shared run flags. It imports nothing of the project
but cli.py. Elsewhere: FSDP2 sharding, loading and checkpoints in fsdp.py; the end of a run (export, curves,
report.html, memory against the plan) in report.py; intervals and tests in stats.py.
"""
import atexit
import ctypes
import ctypes.util
import functools
import json
import math
import os
import random
import shutil
import sys
import time

import torch
import torch.distributed as dist

from cli import at_least


def cpu_has_native_bf16():
    """True when this CPU computes bf16 in hardware (AVX512-BF16 or AMX). Elsewhere (AVX2-only CPUs) bf16
    autocast is emulated and far slower than fp32 (bench/RESULTS.md); run.sh's BF16=1 passes --bf16 only
    where this is True."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def die_with_launcher():
    """Under torchrun each rank is started with setsid (a process group of its own), so kill -9 of torchrun's
    group does not reach it and it trains on to the end: ask Linux to kill this rank when its parent, the
    launcher, dies."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):   # not Linux: nothing to ask
        return
    if os.getppid() == 1:   # the launcher died before we asked
        os._exit(1)


def init_distributed(device=None):
    """Under torchrun: init the process group (gloo on CPU, NCCL on CUDA). Returns (rank, world, device)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise SystemExit(f"--device {device}: {why} (use --device cpu)")
    if not device.startswith(("cuda", "cpu")):
        raise SystemExit(f"--device {device}: expected cpu or cuda")
    if device.startswith("cpu"):
        steady_heap()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_launcher()
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
    """End of a torchrun script: wait for every rank (rank 0 may still be writing files), tear the process
    group down, and leave the process at once. Even after destroy_process_group, gloo's threads can abort
    a rank while the interpreter shuts down (SIGABRT, "terminate called without an active exception": seen
    in a CI run of the 2-rank GRPO test and after a 2-rank evaluate.py had written all of its results),
    which fails the whole launch. Every file here is written and closed by then, so os._exit skips that
    shutdown."""
    release_lock()
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


def all_reduce_max(x):
    """Largest value of a float/int across ranks (identity on one process)."""
    if not dist.is_initialized():
        return x
    t = torch.tensor(float(x), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def gather_objects(x):
    """Every rank's x (picklable), in rank order; [x] on one process."""
    if not dist.is_initialized():
        return [x]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x)
    return parts


def even_micro_batches(keep, size):
    """keep (this rank's sequence indices) in micro-batches of `size`, as [(indices, weight)]. Every rank
    gets the same number: FSDP's forwards are collective, so a rank with fewer runs empty-weight passes
    (weight 0, on sequence 0) until the others are done."""
    n = math.ceil(len(keep) / size)
    n = max(int(all_reduce_max(n)), 1) if dist.is_initialized() else n
    return [(keep[i:i + size] or [0], 1.0 if keep[i:i + size] else 0.0) for i in range(0, n * size, size)]


class _MallInfo2(ctypes.Structure):   # glibc's struct mallinfo2 (malloc.h): ten size_t counters
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # mallopt's parameters (glibc's malloc.h)


@functools.lru_cache(maxsize=None)
def libc():
    """glibc through ctypes, or None where there is none (musl, macOS): the heap calls below then do nothing."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "mallopt") else None
    except OSError:
        return None


def steady_heap(mmap_from=64 << 20, trim_from=1 << 30):
    """glibc's heap, fixed for a tensor workload: blocks of `mmap_from` bytes and more get their own mmap
    (returned when freed), and the heap's free top goes back to the system only past `trim_from` bytes. By
    default glibc moves both thresholds as blocks are freed (up to 32 and 64 MB) and then hands the top of its
    heap back after nearly every decode step that freed a few large temporaries, only to fault it in again at
    the next: an evaluation of SmolLM2-135M on MedQA spent 40 % of its time in the kernel (32 M page faults for
    64 items; 1.2 M once fixed, 1.5x faster; EXPERIMENTS.md)."""
    lib = libc()
    if lib is not None:
        lib.mallopt(M_MMAP_THRESHOLD, mmap_from)   # setting either also ends glibc's moving them
        lib.mallopt(M_TRIM_THRESHOLD, trim_from)


def trim_heap(device, slack=1 << 30):
    """On CPU with glibc: when the heap holds more than `slack` bytes of freed memory, hand its free pages
    back to the system (malloc_trim). Activations of ever new shapes leave holes that glibc keeps resident:
    without it a fine-tune's resident set grew from 6 to 14 GB over 40 steps (SmolLM2-135M, bf16, 2 x 1,024
    tokens, EXPERIMENTS.md). Trimming at every call costs page faults; past a slack, rarely. Else nothing."""
    lib = libc()
    if device.type != "cpu" or lib is None or not hasattr(lib, "mallinfo2"):
        return
    lib.mallinfo2.restype = _MallInfo2
    if lib.mallinfo2().fordblks > slack:
        lib.malloc_trim(0)


def clip_and_check(model, clip, step, loss):
    """Clip the gradient norm to `clip` (0: measured, not clipped) and return it. A loss or norm that is nan
    or inf stops the run in one line before the update: nothing after the last checkpoint is kept."""
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf"))
    gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {gnorm}"
        raise SystemExit(f"step {step}: {what}: stopped before the update (nothing saved or exported after "
                         f"the last checkpoint); lower --lr or keep --clip on")
    return gnorm


def wants_autocast(bf16, device, world):
    """--bf16 means autocast except where FSDP's mixed precision does it already (several GPUs): on CPU, and a
    single GPU (one process is not sharded, so there is no MixedPrecisionPolicy)."""
    return bf16 and not (device.type == "cuda" and world > 1)


def autocast(device, enabled):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def check_bf16(bf16, device):
    if bf16 and device.type == "cpu" and not cpu_has_native_bf16():
        print0("warning: --bf16 on a CPU without native bf16 (no AVX512-BF16/AMX): emulated, far slower than "
               "fp32")


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
    """One JSON object per line; rank 0 writes. A resumed run keeps the lines up to its checkpoint's step and
    drops the rest (steps it will log again, a line cut by a kill)."""

    def __init__(self, path, rank, resume_step=None):
        self.path, self.rank = path, rank
        if rank == 0:
            rows = []
            if resume_step is not None and os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        try:
                            r = json.loads(line)
                        except json.JSONDecodeError:
                            continue
                        if r.get("step", 0) <= resume_step:
                            rows.append(line if line.endswith("\n") else line + "\n")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(rows)
            os.replace(path + ".tmp", path)
        self.t0 = time.time()

    def log(self, **row):
        if self.rank == 0:
            row["time"] = round(time.time() - self.t0, 3)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


# -----------------------------------------------------------------------------
# the run folder: no run silently written over, one job at a time

RUN_OUTPUTS = ("metrics.jsonl", "ckpt", "stage1", "tokenizer", "config.json", "generation_config.json",
               "model.safetensors", "model.safetensors.index.json", "curves.png", "loss.png",
               "rollouts.jsonl",
               "report.html")
_lock = None


def prepare_out(out, resume, overwrite, rank):
    """Rank 0 takes the folder's lock, then: an earlier run there is continued (--resume), removed
    (--overwrite: only what a run writes), or refused in one line. Every rank must call."""
    global _lock
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        lock = os.path.join(out, ".lock")
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, f"{os.getpid()} {os.uname().nodename}\n".encode())
                os.close(fd)
                _lock = lock
                break
            except FileExistsError:
                pid, _, host = open(lock).read().strip().partition(" ")
                if host == os.uname().nodename and pid.isdigit() and _alive(int(pid)):
                    raise SystemExit(f"{out} is in use by another run (pid {pid}, {lock}); wait for it to "
                                     f"end or pick another --out")
                os.remove(lock)   # its owner is gone: a stale lock
        earlier = [f for f in RUN_OUTPUTS if os.path.exists(os.path.join(out, f))] + \
            [f for f in os.listdir(out) if f.startswith("model-") and f.endswith(".safetensors")]
        if earlier and not resume:
            if not overwrite:
                release_lock()
                raise SystemExit(f"{out} already holds a run ({', '.join(earlier[:4])}): --resume "
                                 f"continues it, --overwrite starts it again")
            for f in earlier:
                p = os.path.join(out, f)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    if dist.is_initialized():
        dist.barrier()


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def release_lock():
    global _lock
    if _lock and os.path.exists(_lock):
        os.remove(_lock)
    _lock = None


atexit.register(release_lock)


def read_metrics(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def run_done(step, args):
    """The stop test both trainers share: the last step, or --stop-after's."""
    return step == args.steps or (args.stop_after is not None and step >= args.stop_after)


def need(path, what, hint):
    """A missing input named in one line, with what to do about it."""
    if not os.path.exists(path):
        raise SystemExit(f"{path}: {what}: {hint}")


def add_run_flags(ap, out, eval_every, save_every, eval_help):
    """The '# --- run' flags both trainers share."""
    ap.add_argument("--out", default=out, help="output folder")
    ap.add_argument("--eval-every", type=at_least(1), default=eval_every, help=eval_help)
    ap.add_argument("--save-every", type=at_least(1), default=save_every, help="resumable checkpoint every "
                    "N steps")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out from its newest "
                    "complete checkpoint ({out}/ckpt/step-N)")
    ap.add_argument("--overwrite", action="store_true", help="start again in an --out that holds a run (its "
                    "outputs are removed first); without it such an --out is refused")
    ap.add_argument("--stop-after", type=at_least(1), default=None, help="stop after this step (tests "
                    "of resume)")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    ap.add_argument("--plain", action="store_true", help="the textbook paths only (model.py's attention and "
                    "generate, no speed path of fast.py): the same numbers up to float rounding, slower")
    ap.add_argument("--dry-run", action="store_true", help="print the memory plan per rank and exit: 0 if "
                    "it fits, 1 (naming the flag to change) if not; reads config.json, never the weights")
    ap.add_argument("--plan-world", type=at_least(1), default=None, help="plan for this many ranks "
                    "(default: this launch's)")
    ap.add_argument("--gpu-mem", type=at_least(0.5, float), default=None, help="plan for a GPU with this "
                    "many GB (default: this device's; on a CPU, this machine's memory shared by its ranks)")

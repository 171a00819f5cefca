"""
memplan.py: the memory a training run needs on each rank, worked out before it starts, and what it used.

    python train_grpo.py --init /models/Qwen2.5-7B-Instruct --dry-run --plan-world 8 --gpu-mem 80 --bf16 ...
    python train_sft.py --init /models/Qwen2.5-7B-Instruct --dry-run --plan-world 8 --gpu-mem 80 --bf16 ...

The trainers print the plan at start, warn above 90 % of the device and refuse above 100 % in one line naming
the flag to change; --dry-run prints it and exits 0 if it fits, 1 if not. A dry run reads config.json (and
the tokenizer and data, for the prompt lengths), never the weights: it plans a 32B run on a laptop.
Per rank, P parameters sharded over W ranks by FSDP2 (fp32 master weights, AdamW), three phases that do not
overlap (total = always + the largest phase):
  always    weights 4P/W, AdamW 8P/W, the frozen reference, the process itself
  step      gradients 4P/W; the blocks FSDP2 gathers and the root; activations (layer_act_bytes; with
            --act-ckpt each block's input and one block recomputed); a CPU's attention scores; a logits chunk
  rollout   the policy gathered (or its tensor-parallel shard, tp.py, and what builds it), a CPU's packed
            weights; the engine's KV cache (--gen-slots x context), sampling's temporaries, the prefill
"""
import os
import re
import resource
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fast import WASTE

GB = 2 ** 30
# python, torch, tokenizer, data, gloo buffers (measured: ~0.4-0.5 GB before any model)
CPU_PROCESS = 0.5 * GB
CUDA_PROCESS = 1.5 * GB   # CUDA context, cuBLAS workspaces, allocator slack
# sampling, per slot and vocabulary entry: the slots' fp32 logits, logits / temperature, the int32 hash of the
# Gumbel noise with two temporaries, the noise in fp32 (model.sample_next: 20 bytes measured, 4 of margin)
SAMPLING_BYTES = 24


def param_counts(cfg):
    """(all parameters, the largest decoder block's, the root's: embedding, final norm, untied lm_head)."""
    from model import Transformer
    with torch.device("meta"):
        m = Transformer(cfg)
    total = sum(p.numel() for p in m.parameters())
    block = max(sum(p.numel() for p in b.parameters()) for b in m.model.layers)
    return total, block, total - block * cfg.num_hidden_layers


def layer_act_bytes(cfg, c, resid=4):
    """Bytes autograd keeps per token for one decoder block: the two norms' inputs (the residual stream,
    resid bytes), and in the compute dtype the q/k/v projection's input, q, k and v, attention's output
    twice (SDPA's and o_proj's input), the MLP's input, gate/up (2I), silu(gate) and the product (I each);
    attention's logsumexp."""
    H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    return 2 * H * resid + c * (2 * H + 3 * q + 2 * kv + 4 * I) + 4 * cfg.num_attention_heads


def tp_params(cfg, n):
    """(parameters one rank of a tensor-parallel group of n holds, the part of them in linears (packed for
    oneDNN on a CPU)), as tp.build lays them out."""
    from model import Transformer
    from tp import local_config
    with torch.device("meta"):
        m = Transformer(local_config(cfg, n))
    linear = sum(p.numel() for name, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)
                 and not (name == "lm_head" and cfg.tie_word_embeddings) for p in mod.parameters())
    return sum(p.numel() for p in m.parameters()), linear


@dataclass(frozen=True)
class Job:
    """What a run's memory depends on beyond the model's config. kind: "sft" or "grpo"; tokens: tokens in one
    micro-batch's forward; chunk: --logits-chunk; sdpa_len: the longest sequence that attends as one (a CPU's
    per-sequence attention scores; 0: none); slots / ctx: the rollout engine's decode slots and their prompt +
    new tokens; ref: a frozen reference (KL); tp: the rollout's tensor-parallel degree (--rollout-tp);
    prefill: (prompt tokens in the largest prefill forward, the longest prompt)."""
    kind: str
    world: int
    cuda: bool
    bf16: bool
    tokens: int
    act_ckpt: bool = False
    chunk: int = 0
    sdpa_len: int = 0
    slots: int = 0
    ctx: int = 0
    ref: bool = False
    tp: int = 1
    prefill: tuple = (0, 0)


def plan(cfg, job):
    """[(what, bytes, phase)] per rank for a Job."""
    world, cuda, bf16, tokens, act_ckpt, chunk, tp = job.world, job.cuda, job.bf16, job.tokens, job.act_ckpt, \
        job.chunk, job.tp
    P, block, root = param_counts(cfg)
    W, L, V = world, cfg.num_hidden_layers, cfg.vocab_size
    mp = cuda and bf16 and W > 1                # FSDP mixed precision: gathered weights in bf16
    c = 2 if bf16 else 4                        # compute dtype (autocast or FSDP mixed precision)
    p_gather = 2 if mp else 4                   # dtype of gathered / unsharded weights
    # residual stream: fp32 under autocast, bf16 under mixed precision
    resid = 2 if mp else 4
    ref_c = 2 if bf16 else 4
    chunk = min(tokens, chunk or max(1, 2 ** 26 // V))
    rows_out = [("weights, fp32, 1/W of them", 4 * P / W, "always"),
                ("AdamW state, fp32", 8 * P / W, "always")]
    if job.ref:
        what = f"reference model ({'bf16' if ref_c == 2 else 'fp32'}, sharded)"
        rows_out.append((what, ref_c * P / W, "always"))
    rows_out.append(("the process (CUDA context, allocator)" if cuda else "the process (python, torch, data)",
                     CUDA_PROCESS if cuda else CPU_PROCESS, "always"))
    # --- a training step
    rows_out.append(("gradients, fp32", 4 * P / W, "step"))
    if W > 1:
        gathered = p_gather * root + 2 * (p_gather + 4) * block
        rows_out.append(("gathered by FSDP2: root + two blocks", gathered, "step"))
    if bf16 and not mp and not act_ckpt:        # autocast's bf16 copies of the weights, kept for backward
        rows_out.append(("autocast's bf16 weight copies", 2 * P, "step"))
    per_tok = layer_act_bytes(cfg, c, resid)
    ckpt_act = tokens * (L * cfg.hidden_size * resid + 2 * per_tok)   # block inputs + one block recomputed
    if act_ckpt:
        act = ckpt_act
        what = f"activations, {tokens:,} tokens, block inputs + one block recomputed (--act-ckpt)"
    else:
        act = tokens * (L + 1) * per_tok
        what = f"activations, {tokens:,} tokens x {L} blocks (--act-ckpt: {ckpt_act / GB:.2f} GB)"
    rows_out.append((what, act, "step"))
    if job.sdpa_len and not cuda:   # CPU: scores + probabilities per sequence, per layer kept
        n_layers = 1 if act_ckpt else L
        rows_out.append((f"attention scores (CPU), sequences of up to {job.sdpa_len} tokens",
                         n_layers * tokens * job.sdpa_len * cfg.num_attention_heads * (4 + c), "step"))
    rows_out.append((f"vocabulary logits, {chunk:,} tokens at a time (--logits-chunk)", (c + 12) * chunk * V,
                     "step"))
    if job.kind == "grpo":
        # --- a rollout: the whole policy gathered for generation, or its tensor-parallel shard
        if tp > 1:
            # a CPU keeps the linears packed for oneDNN only (in the compute dtype), the rest in fp32
            from tp import build_peak
            held, peak = build_peak(cfg, tp, p_gather, 0 if cuda else c)
            what = f"rollout: the policy's tensor-parallel shard, 1/{tp} (--rollout-tp)"
            rows_out.append((what, held, "rollout"))
            # one weight at a time: its all_to_all's send buffer beside its received piece (the vocabulary
            # first, while little else is held); what that adds to the built shard at its peak
            rows_out.append(("rollout: building the shard, what its transfer buffers add", peak - held,
                             "rollout"))
        elif W > 1:
            rows_out.append(("rollout: the policy gathered", p_gather * P, "rollout"))
        if tp == 1 and not cuda:
            rows_out.append(("rollout: weights packed for oneDNN (CPU)", c * P, "rollout"))
        elif tp == 1 and bf16 and not mp:
            rows_out.append(("rollout: autocast's bf16 weight copies", 2 * P, "rollout"))
        rows_out.append((f"rollout: KV cache, {job.slots} slots x {job.ctx:,} tokens (--gen-slots)",
                         job.slots * kv_bytes(cfg, job.ctx, bf16, tp), "rollout"))
        rows_out.append((f"rollout: sampling over the vocabulary, {job.slots} slots",
                         SAMPLING_BYTES * job.slots * V,
                         "rollout"))
        if job.prefill[0]:
            rows_out.append((f"rollout: prefill of arrivals, {job.prefill[0]:,} prompt tokens in one forward",
                             prefill_bytes(cfg, *job.prefill, c, cuda, tp), "rollout"))
        if job.ref:   # its forward, no gradients: a gathered block, one block's activations, a logits chunk
            rows_out.append(("reference forward", (ref_c * (root + 2 * block) if W > 1 else 0)
                             + tokens * per_tok + (c + 8) * chunk * V, "ref"))
    return rows_out


def kv_bytes(cfg, ctx, bf16, tp=1):
    """One decode slot's KV cache on a rank: keys and values of ctx tokens in every layer for the rank's KV
    heads (all of them, or 1/tp, at least one), in the compute dtype."""
    heads = max(1, cfg.num_key_value_heads // tp)
    return ctx * cfg.num_hidden_layers * 2 * heads * cfg.head_dim * (2 if bf16 else 4)


def prefill_bytes(cfg, tokens, prompt, c, cuda, tp=1):
    """A no-grad forward over `tokens` prompt tokens (padded by up to fast.WASTE in prefill's buckets), one
    layer live at a time: the fp32 residual stream, and at the MLP's peak its input, gate/up and their product
    in the compute dtype (1/tp of the columns); on a CPU the masked attention's scores of each prompt (heads x
    its length, fp32, and the mask); the prompts' keys and values, kept until their samples have slots."""
    heads = max(1, cfg.num_attention_heads // tp)
    per_tok = 4 * cfg.hidden_size + c * (cfg.hidden_size + 4 * cfg.intermediate_size // tp)
    per_tok += 0 if cuda else (4 * heads + 1) * prompt
    return (1 + WASTE) * tokens * per_tok + kv_bytes(cfg, tokens, c == 2, tp)


def slot_bytes(cfg, ctx, bf16, tp=1):
    """A decode slot's whole rollout memory: its KV cache and its share of sampling's (slots x vocab)
    temporaries (SAMPLING_BYTES a vocabulary entry; every rank of a tensor-parallel group samples the whole
    vocabulary)."""
    return kv_bytes(cfg, ctx, bf16, tp) + SAMPLING_BYTES * cfg.vocab_size


# past a few hundred rows a decode step is compute-bound, on a GPU too (vLLM schedules 256-1,024)
MAX_AUTO_SLOTS = 512


def fill(cuda):
    """The share of a device that what is chosen to fit (decode slots, the micro-batch) may fill: 90 % of a
    GPU; 75 % of a CPU's memory, which the system, its page cache and other processes share."""
    return 0.9 if cuda else 0.75


def phase_bytes(rows, phase):
    """What a phase holds at its peak: the always-held part and the phase's own."""
    return sum(b for _, b, ph in rows if ph in ("always", phase))


def fit_slots(rows, budget, per_slot, most):
    """--gen-slots 0: the decode slots the rollout phase has room for within `budget` beside everything else
    it holds (rows: a plan with 0 slots; the training step's needs play no part), at least 1 and at most the
    requests of the largest call (`most`) or MAX_AUTO_SLOTS."""
    return int(max(1, min(most, MAX_AUTO_SLOTS, (budget - phase_bytes(rows, "rollout")) // per_slot)))


def fit_micro(plan_for, budget, most_rows):
    """--micro-batch 0: the largest micro-batch (a power of two up to 64, or the step's rows of a rank) whose
    training step fits `budget`, first without activation checkpointing, then with it. plan_for(micro,
    act_ckpt) -> plan rows. Returns (micro, act_ckpt); (1, True) when nothing fits (the verdict then names
    the flag)."""
    top = max(1, min(64, most_rows))
    sizes = sorted({top} | {2 ** k for k in range(7) if 2 ** k <= top}, reverse=True)
    for ckpt in (False, True):
        for m in sizes:
            if phase_bytes(plan_for(m, ckpt), "step") <= budget:
                return m, ckpt
    return 1, True


def total(rows):
    always = sum(b for _, b, ph in rows if ph == "always")
    phases = {}
    for _, b, ph in rows:
        if ph != "always":
            phases[ph] = phases.get(ph, 0) + b
    return always + max(phases.values(), default=0)


def device_memory(gpu_mem, cuda, local_world):
    """Bytes a rank may use: --gpu-mem GB, else the GPU's, else this machine's RAM shared by its ranks."""
    if gpu_mem:
        return gpu_mem * GB
    if cuda and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(1, local_world)


def capacity(args, cuda):
    """The bytes a rank may use for this launch's flags (--gpu-mem, --plan-world, or this launch's ranks)."""
    local = args.plan_world or int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return device_memory(args.gpu_mem, cuda, local)


def size(cfg):
    """'7.62B' / '494M': the parameter count, for headers."""
    n = param_counts(cfg)[0]
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def report(rows, cap, header):
    """The plan as text and the share of the device it takes."""
    t = total(rows)
    lines = [f"memory plan per rank: {header}"]
    for what, b, ph in rows:
        lines.append(f"  {ph:7s} {b / GB:8.2f} GB  {what}")
    lines.append(f"  total   {t / GB:8.2f} GB  of {cap / GB:.1f} GB ({100 * t / cap:.0f} %; always + the "
                 f"largest phase)")
    return "\n".join(lines), t / cap


# which flag to change when a term is the largest
ADVICE = [("activations", "lower --micro-batch / --micro-rows or add --act-ckpt"),
          ("attention scores", "add --act-ckpt or lower --seq-len / --micro-rows"),
          ("logits", "lower --logits-chunk"),
          ("KV cache", "lower --gen-slots or --max-new-tokens, or add ranks"),
          ("sampling", "lower --gen-slots"),
          ("reference", "add --bf16 or ranks, or --kl-beta 0"),
          ("weights", "add ranks (torchrun --nproc_per_node / --nnodes)"),
          ("AdamW", "add ranks (torchrun --nproc_per_node / --nnodes)"),
          ("gradients", "add ranks (torchrun --nproc_per_node / --nnodes)"),
          ("policy gathered", "generation gathers the whole policy on every GPU (2 bytes a parameter under "
           "--bf16, 4 without): --rollout-tp N holds 1/N of it (or --rollout-tp 0: the smallest N that "
           "fits)"),
          ("tensor-parallel shard", "a larger --rollout-tp"), ("building the shard", "a larger --rollout-tp"),
          ("gathered", "add --bf16 (gathered in bf16) or ranks"), ("rollout", "add --bf16 or ranks"),
          ("autocast", "add --act-ckpt"), ("the process", "a device with more memory (--gpu-mem)")]


def verdict(rows, cap):
    """None if the plan fits, else one line naming the largest term and the flag to change."""
    t = total(rows)
    if t <= cap:
        return None
    what, b, _ = max(rows, key=lambda r: r[1])
    advice = next((a for key, a in ADVICE if key in what), "")
    return (f"memory plan: {t / GB:.1f} GB per rank does not fit in {cap / GB:.1f} GB; the largest part is "
            f"{what} ({b / GB:.1f} GB): {advice}")


def announce(rows, header, args, cuda):
    """Print the plan (rank 0). --dry-run: exit 0 if it fits, else 1 with the line naming the flag to change.
    A real run warns above 90 %. Returns the planned total."""
    cap = capacity(args, cuda)
    text, frac = report(rows, cap, header)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        print(text, flush=True)
    if args.dry_run:
        why = verdict(rows, cap)
        if rank0:
            print(why or "memory plan: fits", flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(1 if why else 0)
    why = verdict(rows, cap)
    if why:
        raise SystemExit(why)
    if frac > 0.9 and rank0:
        print(f"warning: the memory plan takes {100 * frac:.0f} % of this device's memory "
              f"({verdict(rows, cap * 0.9) or ''})", flush=True)
    return total(rows)


def report_peaks(meter, planned, rank, world):
    """One line (rank 0): each rank's measured peak beside the plan, and each phase's rise over its start."""
    mine = dict(meter.peaks, run=(0, meter.overall()))
    every = [mine]
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, mine)
    if rank == 0:
        peaks = " / ".join(f"{p['run'][1] / GB:.2f}" for p in every)
        parts = [f"peak {peaks} GB (plan {planned / GB:.2f} GB)"]
        for k in mine:
            if k != "run":
                parts.append(f"{k} " + " / ".join(f"+{p[k][0] / GB:.2f}" for p in every) + " GB")
        print(f"memory per rank: {'; '.join(parts)}", flush=True)


# -----------------------------------------------------------------------------
# measured: peak memory per phase (CUDA: the allocator's; CPU: the process's resident set, Linux's VmHWM)


class Meter:
    """meter.phase("load") ... : the peak memory while a phase runs and the whole run's, per rank."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.peaks, self.run_peak = {}, 0

    def now(self):
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return self._status("VmRSS") or 0

    def peak(self):
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        return self._status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @staticmethod
    def _status(field):
        """Bytes of a field of Linux's /proc/self/status, or None elsewhere."""
        if not os.path.exists("/proc/self/status"):
            return None
        m = re.search(field + r":\s+(\d+)", open("/proc/self/status").read())
        return int(m.group(1)) * 1024 if m else None

    def reset(self):
        self.run_peak = max(self.run_peak, self.peak())
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/clear_refs"):
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")   # resets VmHWM to the current resident set
            except OSError:
                pass

    class _Phase:
        def __init__(self, meter, name):
            self.m, self.name = meter, name

        def __enter__(self):
            self.m.reset()
            self.before = self.m.now()

        def __exit__(self, *exc):
            p = self.m.peak()
            old = self.m.peaks.get(self.name, (0, 0))
            self.m.peaks[self.name] = (max(old[0], p - self.before), max(old[1], p))

    def phase(self, name):
        return Meter._Phase(self, name)

    def overall(self):
        return max(self.run_peak, self.peak())

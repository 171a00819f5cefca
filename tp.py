"""
tp.py: tensor-parallel rollouts built from the FSDP shards (--rollout-tp N). Without it every rank gathers the
whole policy to generate (fsdp.unsharded): 61 GB a GPU at 32B in bf16, whatever the number of ranks. With it
the ranks form groups of N (consecutive ranks: one node's GPUs); each rank of a group holds 1/N of the
policy, rebuilt for every rollout straight from the FSDP shards, and the group decodes its ranks' requests
together in one rollout engine (engine.py), each rank taking its own completions back.

    group = Group(2, world, rank)                  # every rank calls it, once (it makes the process groups)
    with torch.no_grad(), policy(model, group) as m:
        outs, reasons = generate(m, prompts, SamplingParams(256), group=group, seed=seeds, slots=64)

The layout is Megatron-LM's: qkv_proj and gate_up_proj column-parallel (a rank's heads, their KV heads, its
MLP columns: the KV cache splits by KV head), o_proj and down_proj row-parallel (outputs summed over the group:
logits agree to ~1e-6, tests/test_tp.py), embed_tokens and lm_head split by vocabulary rows (the logits
all-gathered, so every rank samples the same token), norms whole. Each weight is one all_to_all over the world
in which each rank sends every other exactly the part of its FSDP shard that rank keeps: a build receives P/N
parameters a rank (gathering receives P) and its transient is one weight's buffers, the vocabulary first
(build_peak: what memplan plans). On a CPU each linear is packed for oneDNN as it arrives and its plain copy
dropped, and glibc is told to return freed tensors of 1 MB and more (EXPERIMENTS.md, 2026-12-03).
"""
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import engine
import fast
from common import M_MMAP_THRESHOLD, libc
from fsdp import owned_rows, unsharded
from model import Transformer, prompt_seeds


def _splits(cfg, n):
    """Whether n ranks split the heads, the KV heads (or repeat them) and the MLP columns evenly."""
    H, Hkv, I = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    return not (H % n or (Hkv % n and n % Hkv) or I % n)


def degree_problem(cfg, n, world, flag="--rollout-tp"):
    """None if the policy splits over n ranks of `world`, else one line (naming `flag`) saying why not."""
    H, Hkv, I = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    if n < 1 or world % n:
        return f"{flag} {n} must divide the number of ranks ({world})"
    if not _splits(cfg, n):
        ok = [d for d in range(1, world + 1) if world % d == 0 and _splits(cfg, d)]
        return (f"{flag} {n} does not split {H} attention heads, {Hkv} KV heads and {I} MLP columns "
                f"evenly; degrees that do with {world} ranks: {', '.join(map(str, ok))}")
    return None


def local_config(cfg, n):
    """The shapes one rank of n computes: its heads, its KV heads, its MLP columns, 1/n of the vocabulary
    (head_dim stays: it is set, not derived)."""
    return replace(cfg, num_attention_heads=cfg.num_attention_heads // n,
                   num_key_value_heads=max(1, cfg.num_key_value_heads // n),
                   intermediate_size=cfg.intermediate_size // n, vocab_size=-(-cfg.vocab_size // n))


def piece(cfg, n, t, name):
    """What rank t of n holds of the weight `name`: (row ranges [(lo, hi)] ascending or None for all rows,
    column range (lo, hi) or None for all columns)."""
    H, Hkv, D, I = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    h0, nh = t * H // n, H // n
    k0, nk = (t * Hkv // n, Hkv // n) if Hkv >= n else (t // (n // Hkv), 1)   # the KV heads of its q heads
    i0, ni = t * I // n, I // n
    vc = -(-cfg.vocab_size // n)
    if "qkv_proj" in name:
        return [(h0 * D, (h0 + nh) * D), ((H + k0) * D, (H + k0 + nk) * D),
                ((H + Hkv + k0) * D, (H + Hkv + k0 + nk) * D)], None
    if "gate_up_proj" in name:
        return [(i0, i0 + ni), (I + i0, I + i0 + ni)], None
    if "o_proj" in name:
        return None, (h0 * D, (h0 + nh) * D)
    if "down_proj" in name:
        return None, (i0, i0 + ni)
    if "embed_tokens" in name or "lm_head" in name:
        return [(min(t * vc, cfg.vocab_size), min((t + 1) * vc, cfg.vocab_size))], None
    return None, None


def _parts(rows, cols, lo, hi, width):
    """Of the rows lo .. hi - 1 of a weight, the blocks (a, b) that (rows, cols) asks for, and their size."""
    blocks = [(max(a, lo), min(b, hi)) for a, b in (rows if rows is not None else [(lo, hi)])]
    blocks = [(a, b) for a, b in blocks if a < b]
    return blocks, sum(b - a for a, b in blocks) * (width if cols is None else cols[1] - cols[0])


def fetch(p, name, cfg, n, dtype, rows_out=0):
    """This rank's piece of weight p (an FSDP2 DTensor sharded on dim 0 over the world) in dtype, as (rows,
    columns) or (rows,), zero-padded to rows_out rows: one all_to_all in which each rank sends every other
    rank the part of its shard that rank keeps. Buffers: the send and the receive one."""
    shape, width = p.shape, (p.shape[1] if p.dim() == 2 else 1)
    rank, world = dist.get_rank(), dist.get_world_size()
    local = p.to_local().detach()
    lo, hi = owned_rows(shape[0], rank, world)
    asks = [piece(cfg, n, j % n, name) for j in range(world)]
    parts = [_parts(r, c, lo, hi, width) for r, c in asks]
    send = torch.empty(sum(k for _, k in parts), dtype=dtype, device=local.device)
    at = 0
    for (_, c), (blocks, _) in zip(asks, parts):   # each rank's part, block after block, cast on the way
        for a, b in blocks:
            x = local[a - lo:b - lo]
            x = x if c is None or x.dim() == 1 else x[:, c[0]:c[1]]
            send[at:at + x.numel()].view(x.shape).copy_(x)
            at += x.numel()
    rows, cols = piece(cfg, n, rank % n, name)
    keep_w = width if cols is None else cols[1] - cols[0]
    # what each sender holds of the rows kept here (the senders' rows ascend: they arrive in order)
    recv = [_parts(rows, cols, *owned_rows(shape[0], i, world), width)[1] for i in range(world)]
    got = torch.zeros(max(sum(recv), rows_out * keep_w), dtype=dtype, device=local.device)
    dist.all_to_all_single(got[:sum(recv)], send, output_split_sizes=recv,
                           input_split_sizes=[k for _, k in parts])
    return got if p.dim() == 1 else got.view(-1, keep_w)


def _is_vocab(name):
    return "embed_tokens" in name or "lm_head" in name


def build_order(named):
    """(name, weight) pairs in the order build fetches them: the vocabulary matrices first (the largest
    weights, while nothing else is held), then the model's order."""
    named = list(named)
    return [x for x in named if _is_vocab(x[0])] + [x for x in named if not _is_vocab(x[0])]


def build_peak(cfg, n, fetch_bytes, packed_bytes):
    """(bytes held once built, the peak while building) on one rank of n (what memplan plans): each weight's
    piece arrives (fetch_bytes a parameter) beside its send buffer (as large: every rank sends what others
    keep of its FSDP rows, ~1/N of the weight, as it receives ~1/N); then a linear is packed (packed_bytes a
    parameter, 0: not packed) and its received copy dropped."""
    with torch.device("meta"):
        m = Transformer(local_config(cfg, n))
    held = peak = 0
    for name, p in build_order(m.named_parameters()):
        got = fetch_bytes * p.numel()
        lin = packed_bytes and p.dim() == 2 and "embed_tokens" not in name   # an nn.Linear's weight
        peak = max(peak, held + got + max(got, packed_bytes * p.numel() if lin else 0))
        held += packed_bytes * p.numel() if lin else got
    return held, max(peak, held)


class VocabEmbedding(nn.Module):
    """Rows lo .. lo + Vc - 1 of the embedding; the others' rows come from the rank that holds them."""

    def __init__(self, weight, lo, group):
        super().__init__()
        self.weight, self.lo, self.group = weight, lo, group

    def forward(self, ids):
        local = ids - self.lo
        mine = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * mine[..., None]
        dist.all_reduce(x, group=self.group)
        return x


class VocabHead(nn.Module):
    """The lm_head's rows of this rank's vocabulary share; the logits of the whole vocabulary all-gathered.
    linear: an nn.Linear (packed for oneDNN on a CPU) or, tied, the embedding's Parameter (kept once)."""

    def __init__(self, linear, vocab, n, group):
        super().__init__()
        self.linear, self.vocab, self.n, self.group = linear, vocab, n, group

    def forward(self, h):
        y = self.linear(h) if isinstance(self.linear, nn.Module) else F.linear(h, self.linear)
        y = y.contiguous()
        out = y.new_empty((self.n * y.shape[0],) + y.shape[1:])   # the ranks' shares one after another
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, y, group=self.group)
        return torch.movedim(out.view((self.n,) + y.shape), 0, -2).flatten(-2)[..., :self.vocab]


def _sum_over_group(group):
    def hook(module, inputs, out):
        dist.all_reduce(out, group=group)
        return out
    return hook


def return_freed_memory(threshold=1 << 20):
    """On Linux with glibc: tensors of `threshold` bytes and more get their own mmap, returned to the system
    when freed. By default glibc raises that threshold to 32 MB after the first free of a large chunk and
    keeps smaller freed chunks in its heap, so a process's resident memory holds every transfer buffer the
    build freed. Elsewhere nothing changes."""
    lib = libc()
    if lib is not None:
        lib.mallopt(M_MMAP_THRESHOLD, threshold)   # fixing it also ends the raising


class Group:
    """This rank's tensor-parallel group: ranks [g * n, g * n + n) of the world; index = the rank's place in
    it. Every rank must build it at the same point (torch makes every group on every rank). On CPU ranks
    (gloo) it also calls return_freed_memory: a shard is there to save memory."""

    def __init__(self, n, world, rank):
        self.n, self.index, self.pg = n, rank % n, None
        if n > 1 and dist.get_backend() == "gloo":
            return_freed_memory()
        if n < world:
            for g in range(world // n):
                pg = dist.new_group(list(range(g * n, (g + 1) * n)))
                if rank // n == g:
                    self.pg = pg


def build(model, group, dtype=None, pack_rows=64):
    """This rank's shard of the policy as a Transformer of the local shapes (its config: its heads and MLP
    columns, the whole vocabulary's logits), weights in dtype (default: the shards'). Every rank calls it.
    On a CPU under fast.ON each linear is packed for oneDNN (in autocast's dtype where it is on) once its
    weight and bias are in, and its plain weight dropped."""
    cfg, n, t = model.config, group.n, group.index
    local = local_config(cfg, n)
    dev = next(model.parameters()).device
    with torch.device("meta"):
        m = Transformer(replace(local, tie_word_embeddings=False))
    autocast_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    for name, p in build_order(model.named_parameters()):
        # the vocabulary padded to V/N rows on every rank (those logits are cut off)
        vocab = _is_vocab(name)
        w = fetch(p, name, cfg, n, dtype or p.dtype, local.vocab_size if vocab else 0).to(dev)
        owner, leaf = name.rsplit(".", 1)
        mod = m.get_submodule(owner)
        setattr(mod, leaf, nn.Parameter(w, requires_grad=False))
        ready = isinstance(mod, nn.Linear) and all(q is None or not q.is_meta for q in (mod.weight, mod.bias))
        pack_dtype = autocast_dtype or w.dtype
        if ready and fast.ON and fast.packs(dev, pack_dtype):
            fast.pack_linear(mod, pack_rows, pack_dtype)
            mod.weight = None
    embed = m.model.embed_tokens.weight
    m.model.embed_tokens = VocabEmbedding(embed, t * local.vocab_size, group.pg)
    m.lm_head = VocabHead(embed if cfg.tie_word_embeddings else m.lm_head, cfg.vocab_size, n, group.pg)
    for blk in m.model.layers:
        blk.self_attn.o_proj.register_forward_hook(_sum_over_group(group.pg))
        blk.mlp.down_proj.register_forward_hook(_sum_over_group(group.pg))
    m.config = replace(local, vocab_size=cfg.vocab_size)
    return m.eval()


@contextmanager
def policy(model, group=None, dtype=None, pack_rows=64):
    """with policy(model, group) as m: the model to generate with. group None: the policy itself, every
    weight gathered once for the whole rollout (fsdp.unsharded); else this rank's tensor-parallel shard,
    built from the FSDP shards (build), freed with the caller's last reference to it."""
    if group is None:
        with unsharded(model):
            yield model
        return
    yield build(model, group, dtype, pack_rows)


def generate(model, prompts, sp, group=None, seed=None, **kw):
    """engine.generate for a tensor-parallel group: the requests of every rank of the group in one queue
    (seeds travel with their prompts, so a completion is the one its rank alone would get), and each rank
    gets its own rows back, in its order. group None: engine.generate."""
    if group is None:
        return engine.generate(model, prompts, sp, seed, **kw)
    if seed is None:
        raise ValueError("tp.generate: a seed for every prompt, so that the group's samples are each rank's")
    every = [None] * group.n
    dist.all_gather_object(every, (prompts, prompt_seeds(seed, len(prompts))), group=group.pg)
    start = sum(len(p) for p, _ in every[:group.index]) * sp.num_samples
    n_rows = len(prompts) * sp.num_samples
    on_done = kw.pop("on_done", None)
    done = None if on_done is None else (lambda r: on_done(r - start) if start <= r < start + n_rows else None)
    res = engine.generate(model, [q for p, _ in every for q in p], sp, [s for _, s in every for s in s],
                          on_done=done, **kw)
    return tuple(x[start:start + n_rows] for x in res)

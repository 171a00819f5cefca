"""
fast.py: the speed paths, apart from the textbook path in model.py they replace. Each gives model.py's
numbers up to float rounding (tests/test_fast.py checks each against the plain path) and is on by default;
--plain (ON = False) runs the textbook path alone, for reading and for timing against (bench/*.py).

    packed_linears     a generate call's matmuls through weights packed once for oneDNN (CPU)
    Fold               decode attention with the query heads of a KV head folded into one batch
    prefill_buckets    prompts prefilled in buckets of similar length (engine.py)
    doc_attention      packed SFT rows: each document attends alone, per-document matmuls on a CPU
                       (DocBuckets), flex_attention on a GPU (FlexMask), not SDPA under a dense mask;
                       train_grpo.completion_logprobs packs a group's completions with them
Why each is faster, measured: bench/RESULTS.md.
"""
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import cpu_has_native_bf16
from model import doc_starts

ON = True   # False: --plain, the textbook paths of model.py / train_grpo.py only
WASTE = 0.15   # the padding share a prefill bucket may hold (prefill_buckets; memplan plans it)

# -----------------------------------------------------------------------------
# CPU matmuls: weights packed once per generate call for oneDNN


def packs(device, dtype):
    """Whether a CPU packs weights for oneDNN in this compute dtype: fp32, and bf16 where it is native."""
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and (dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_native_bf16())))


def pack_linear(m, rows, dtype):
    """m (an nn.Linear) multiplies through a copy of its weight in oneDNN's blocked layout for rows-row
    inputs; `del m.forward` undoes it. tp.py packs its shards this way once and drops the plain weight."""
    w = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach().to(dtype), rows)
    b = None if m.bias is None else m.bias.detach().to(dtype)
    # a plain function, not a method bound to m: no reference cycle, so a packed module (a TP shard) is
    # freed as soon as its last reference goes, not at the next garbage collection
    m.forward = lambda x, w=w, b=b: torch.ops.mkldnn._linear_pointwise(
        x.reshape(-1, x.shape[-1]).to(dtype), w, b, "none", [], "").view(*x.shape[:-1], -1)


@contextmanager
def packed_linears(model, rows, dtype):
    """While the block runs, every nn.Linear multiplies through a copy of its weight in oneDNN's blocked
    layout for rows-row inputs, then the copies are dropped (weights change between GRPO rollouts). dtype:
    the compute dtype (the weights', or autocast's). Why: F.linear in bf16 re-lays-out the weight on every
    call, and fp32 F.linear goes to MKL, slow on some CPUs (bench/generate.py). Packs fp32, and bf16 on
    CPUs with native bf16; a no-op on GPU and without oneDNN. Same math, another summation order (fp32:
    ~1e-4 on the outputs)."""
    # under FSDP2 outside a rollout the weights are DTensor shards, and tp.py's packed shards have none:
    # both left alone by the type check
    mods = [m for m in model.modules() if isinstance(m, nn.Linear) and type(m.weight) is nn.Parameter]
    mods = mods if packs(next(model.parameters()).device, dtype) else []
    for m in mods:
        pack_linear(m, rows, dtype)
    try:
        yield
    finally:
        for m in mods:
            del m.forward   # nn.Linear's own forward again


# -----------------------------------------------------------------------------
# attention: objects with .attend(q, k, v) -> (B, T, H * D), which model.Attention uses as given


class Fold:
    """One decode step (T = 1): the H // Hkv query heads that share a KV head folded into the query axis, (B,
    Hkv, H // Hkv, D), so SDPA sees a few queries per KV head instead of one per head; the CPU kernel
    handles a single query badly. mask (B, 1, 1, S) is the same for every one of those queries."""

    def __init__(self, mask):
        self.mask = mask

    def attend(self, q, k, v):
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        y = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, D), k, v, attn_mask=self.mask)
        return y.reshape(B, T, H * D)


class DocBuckets:
    """Packed rows on CPU: attention per sequence instead of over whole rows under a mask. Each sequence is a
    run of query tokens that attend causally to themselves and, optionally, to a shared prefix elsewhere
    in the row (a GRPO prompt that several completions sit behind). The sequences are regrouped into
    buckets of similar length (prefill_buckets), each a right-padded (n, L) batch, and attend with plain
    matmuls; one gather puts the outputs back in place. Why: over a whole row, SDPA's CPU kernel computes
    every (query, key) pair the mask throws away, and its backward is slow (bench/train.py). The masked
    SDPA's numbers up to rounding."""
    # longer sequences keep the masked SDPA: the scores here are a full (Lq, L) matrix per head
    MAX_LEN = 1024

    def __init__(self, seqs, n_tokens, device, waste=0.15):
        """seqs: (prefix_start, prefix_len, start, length) per sequence, as indices into the flattened (B *
        T) tokens: tokens start .. start + length - 1 are the queries, and attend causally to themselves
        after the prefix_len tokens from prefix_start (prefix_len 0: a plain document). Every token is the
        query of exactly one sequence (padding too: make it a document of its own)."""
        # (query index (n, Lq), key index (n, L), prefix lengths (n,) or None); B * T = a zero row
        self.buckets = []
        self.ok = max(p + n for _, p, _, n in seqs) <= self.MAX_LEN
        if not self.ok:
            return
        # token -> its row in the concatenated bucket outputs
        slot_of = torch.empty(n_tokens, dtype=torch.long)
        offset = 0
        plain = [s for s in seqs if s[1] == 0]
        prefixed = [s for s in seqs if s[1] > 0]
        # apart: a plain document's queries are all of its keys, the others' not
        for group in (plain, prefixed):
            if not group:
                continue
            ps, pl, st, ln = (torch.tensor(c) for c in zip(*group))
            for rows, L in prefill_buckets((pl + ln).tolist(), waste):
                rows = torch.tensor(rows)
                P, S, N = pl[rows, None], st[rows, None], ln[rows, None]
                Lq = int(N.max())
                u = torch.arange(Lq)
                q_real = u < N
                qidx = torch.where(q_real, S + u, n_tokens)
                j = torch.arange(L)
                kidx = torch.where(j < P, ps[rows, None] + j, torch.where(j < P + N, S + j - P, n_tokens))
                slot_of[qidx[q_real]] = offset + torch.nonzero(q_real.flatten()).flatten()
                offset += qidx.numel()
                P = P.flatten().to(device) if group is prefixed else None
                self.buckets.append((qidx.to(device), kidx.to(device), P))
        self.slot_of = slot_of.to(device)
        self._bias = {}

    @classmethod
    def from_doc_ids(cls, doc_ids):
        """Packed documents: doc_ids (B, T), each run of equal ids a document that attends only to itself."""
        B, T = doc_ids.shape
        # a row's start always ends a document
        starts = torch.nonzero(doc_starts(doc_ids).flatten()).flatten().cpu()
        lens = torch.diff(starts, append=starts.new_tensor([B * T]))
        return cls([(0, 0, s, n) for s, n in zip(starts.tolist(), lens.tolist())], B * T, doc_ids.device)

    def bias(self, b, dtype, G, n_heads_kv):
        """Additive causal bias of bucket b: (G * L, L) shared by a bucket of plain documents, else (n * Hkv,
        G * Lq, L) (query u of a sequence with a prefix of P sees keys <= P + u). Built once per forward and
        dtype, then reused by every layer."""
        key = (b, dtype)
        if key not in self._bias:
            qidx, kidx, P = self.buckets[b]
            (n, Lq), L = qidx.shape, kidx.shape[1]
            u = torch.arange(Lq, device=qidx.device)
            j = torch.arange(L, device=qidx.device)
            off = P[:, None, None] if P is not None else 0
            see = j[None, None, :] <= u[None, :, None] + off            # (n or 1, Lq, L)
            t = torch.zeros(see.shape, dtype=dtype, device=qidx.device).masked_fill_(~see, float("-inf"))
            # the G query heads of a KV head are stacked
            t = t.repeat(1, G, 1)
            if P is None:
                t = t[0]
            else:
                t = t[:, None].expand(n, n_heads_kv, G * Lq, L).reshape(n * n_heads_kv, G * Lq, L)
            self._bias[key] = t
        return self._bias[key]

    def attend(self, q, k, v):
        """q (B, H, T, D), k and v (B, Hkv, T, D) -> attention output (B, T, H * D)."""
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        G = H // Hkv

        def tokens(x):   # (B, heads, T, D) -> (B * T + 1, heads, D), the last row zeros (what padding reads)
            x = x.transpose(1, 2).reshape(B * T, x.shape[1], D)
            return torch.cat([x, x.new_zeros(1, x.shape[1], D)])
        qt, kt, vt = tokens(q), tokens(k), tokens(v)
        outs = []
        for b, (qidx, kidx, _) in enumerate(self.buckets):
            (n, Lq), L = qidx.shape, kidx.shape[1]
            # index_select, not x[idx]: its backward is an index_add, several times faster on CPU than the
            # index_put that advanced indexing takes. The G query heads that share a KV head are stacked along
            # the query axis: one matmul per KV head
            qb = qt.index_select(0, qidx.flatten()).view(n, Lq, H, D).permute(0, 2, 1, 3)
            qb = qb.reshape(n, Hkv, G * Lq, D)
            kb = kt.index_select(0, kidx.flatten()).view(n, L, Hkv, D).permute(0, 2, 1, 3)   # (n, Hkv, L, D)
            vb = vt.index_select(0, kidx.flatten()).view(n, L, Hkv, D).permute(0, 2, 1, 3)
            # scores = causal bias + scale * q k^T in one baddbmm (a separate scale and masked_fill cost ~10
            # %)
            s = torch.baddbmm(self.bias(b, qb.dtype, G, Hkv), qb.reshape(n * Hkv, G * Lq, D),
                              kb.reshape(n * Hkv, L, D).transpose(1, 2), alpha=D ** -0.5)
            p = torch.softmax(s, dim=-1, dtype=torch.float32).to(vb.dtype)      # fp32 softmax, as SDPA does
            y = p.view(n, Hkv, G * Lq, L) @ vb                                  # (n, Hkv, G * Lq, D)
            outs.append(y.view(n, H, Lq, D).transpose(1, 2).reshape(n * Lq, H * D))
        return torch.cat(outs).index_select(0, self.slot_of).view(B, T, H * D)


class FlexMask:
    """Packed rows on CUDA: flex_attention with a block mask from segment ids (B, T): the dense mask's
    pattern in (128 x 128)-token blocks, so the kernel skips the blocks no query may see. A token sees
    earlier tokens of its own segment; with shared_prefix, also those of segment 0 (a GRPO prompt its
    completions share)."""
    _flex = None

    def __init__(self, seg, shared_prefix=False):
        from torch.nn.attention.flex_attention import create_block_mask

        def allowed(b, h, q, kv):
            same = seg[b, q] == seg[b, kv]
            if shared_prefix:
                same = same | (seg[b, kv] == 0)
            return same & (q >= kv)
        B, T = seg.shape
        self.block = create_block_mask(allowed, B, None, T, T, device=seg.device)

    def attend(self, q, k, v):
        if FlexMask._flex is None:   # compiled once on CUDA (the eager form materialises every score)
            from torch.nn.attention.flex_attention import flex_attention
            FlexMask._flex = torch.compile(flex_attention) if q.is_cuda else flex_attention
        y = FlexMask._flex(q, k, v, block_mask=self.block, enable_gqa=q.shape[1] != k.shape[1])
        return y.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)




def doc_attention(doc_ids):
    """Packed SFT rows (doc_ids (B, T)): the attention object for model.forward(attention_mask=...), or None
    for model.py's dense mask (--plain, or documents too long for DocBuckets)."""
    if not ON:
        return None
    if doc_ids.is_cuda:
        return FlexMask(doc_ids)
    buckets = DocBuckets.from_doc_ids(doc_ids)
    return buckets if buckets.ok else None


# -----------------------------------------------------------------------------
# generation


def prefill_buckets(lens, waste=WASTE):
    """Split rows into buckets of similar prompt length -> [(row indices, bucket's longest length)]. Sorted
    longest first, a bucket grows while its padded size stays within (1 + waste) x its real tokens; so a
    ragged batch pays little padding, and an even one stays a single (B, P) forward."""
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    buckets, cur, real = [], [], 0
    for i in order:
        if cur and (len(cur) + 1) * lens[cur[0]] > (1 + waste) * (real + lens[i]):
            buckets.append((cur, lens[cur[0]]))
            cur, real = [], 0
        cur.append(i)
        real += lens[i]
    buckets.append((cur, lens[cur[0]]))
    return buckets

"""
fast.py: the speed paths, apart from the textbook path in model.py they replace. Each gives model.py's
numbers up to float rounding (tests/test_fast.py checks each against the plain path) and is on by default;
--plain (ON = False) runs the textbook path alone, for reading and for timing against (bench/*.py).

    generate               model.generate with: prompts prefilled in buckets of similar length, G samples
                           from one prefill, finished rows dropped from the batch, weights packed for oneDNN
                           on a CPU (packed_linears), query heads folded in decode attention (Fold), and on a
                           GPU each decode step one CUDA graph replay (cuda_graph=True, fixed_shape_step)
    doc_attention          packed SFT rows: each document attends alone, per-document matmuls on a CPU
                           (DocBuckets), flex_attention on a GPU (FlexMask), not SDPA under a dense mask
    completion_logprobs    GRPO scoring: a group's completions behind one copy of their prompt
                           (--share-prompt), laid end to end in one unpadded row on a CPU
Why each is faster, measured: bench/RESULTS.md.
"""
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import cpu_has_native_bf16
from model import KVCache, doc_starts, sample_next, sample_seeds
from model import generate as model_generate

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




class FastCache(KVCache):
    """model.KVCache, plus rows selected (G copies of a prefilled prompt; finished rows dropped) and Fold for
    decode steps."""

    def begin(self, T, pad_mask=None):
        mask = super().begin(T, pad_mask)
        return Fold(mask) if T == 1 else mask

    def select_rows(self, idx):
        self.k, self.v, self.valid = self.k[:, idx], self.v[:, idx], self.valid[idx]
        return self


class FixedShapeCache(FastCache):
    """Fixed-shape decoding (CUDA graphs): `slot`, a (1,) device tensor, names the slot the next token goes
    to; attention runs over all max_len slots (valid masks the unfilled ones), so no shape depends on the
    step and nothing reads `length` on the host."""

    def __init__(self, *a):
        super().__init__(*a)
        self.slot = torch.zeros(1, dtype=torch.long, device=self.k.device)

    def begin(self, T, pad_mask=None):   # decode steps only: generate prefills into FastCache parts
        assert T == 1, "fixed-shape decoding takes one token per row"
        self.valid.index_fill_(1, self.slot, True)
        # the filled slots, this token's included: causal by construction
        return Fold(self.valid[:, None, None, :])

    def update(self, layer, k, v):
        self.k[layer].index_copy_(2, self.slot, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, self.slot, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]

    def end(self, T):
        pass


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


def fixed_shape_step(model, tok_in, pos_in, cache):
    """One decode step with fixed shapes, reading its inputs from tok_in / pos_in (N, 1) and cache.slot.
    On CUDA it is captured once as a CUDA graph and replayed: a decode step of a small model is hundreds of
    kernel launches that each cost more host time than GPU time (bench/generate.py --cuda-graph), and a
    replay launches them all at once. On CPU it just runs."""
    step = lambda: model(tok_in, position_ids=pos_in, cache=cache)[:, -1].float()  # noqa: E731
    if not tok_in.is_cuda:
        return step
    # warm up on a side stream (kernels and workspaces get chosen), then capture. Both run the real first
    # step: writing the same k, v into the same slot again is harmless
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = step()

    def replay():
        graph.replay()
        return logits
    return replay


def compute_dtype(model):
    """(device, dtype) of a generate call: the weights' dtype, or autocast's when it is on (the cache is
    stored in it, as attention reads it so: half the memory, no cast of the whole cache per layer per step;
    and the weights are packed for it)."""
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if torch.is_autocast_enabled(dev.type):
        dtype = torch.get_autocast_dtype(dev.type)
    return dev, dtype


def prefill(model, prompts, dtype, waste=WASTE, pad_id=0):
    """The prompts' forward, in buckets of similar length (prefill_buckets), each left-padded only to its own
    longest prompt. Yields (rows, Pc, cache part (len(rows) rows x Pc slots), logits of each row's last
    prompt token (len(rows), vocab) fp32) per bucket."""
    dev, cfg = next(model.parameters()).device, model.config
    for rows, Pc in prefill_buckets([len(p) for p in prompts], waste):
        ids = torch.full((len(rows), Pc), pad_id, dtype=torch.long)
        real = torch.zeros(len(rows), Pc, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, Pc - len(prompts[i]):] = torch.tensor(prompts[i])
            real[r, Pc - len(prompts[i]):] = 1
        ids, real = ids.to(dev), real.to(dev)
        part = FastCache(cfg.num_hidden_layers, len(rows), cfg.num_key_value_heads, Pc, cfg.head_dim, dev,
                         dtype)
        logits = model(ids, position_ids=(real.cumsum(1) - 1).clamp(min=0), cache=part, attention_mask=real,
                       last_only=True)[:, -1].float()
        yield rows, Pc, part, logits


def row_budgets(max_new_tokens, n):
    """max_new_tokens: one budget for every row, or one per row (a scripted stop: bench/rollout.py)."""
    budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != n or min(budgets) < 1:
        raise ValueError(f"generate: {n} rows need {n} budgets of at least 1 token, got {len(budgets)}")
    return budgets


def count_pass(stats, rows):
    """bench/rollout.py's counters: decode forward passes, and the rows they computed."""
    if stats is not None:
        stats["passes"] = stats.get("passes", 0) + 1
        stats["row_steps"] = stats.get("row_steps", 0) + rows


@torch.no_grad()
def generate(model, prompts, max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0, stop_ids=(),
             num_samples=1, seed=None, pad_id=0, compact_frac=0.25, waste=WASTE, cuda_graph=False,
             return_logprobs=False, stats=None):
    """prompts: list of token-id lists (ragged). Returns (completions, finish_reasons), one per prompt and
    sample, in order prompt0-sample0, prompt0-sample1, ...; each completion ends with its stop token if it
    stopped ("stop"), else it is max_new_tokens long ("length"). One static batch: every row starts
    together and the call lasts as long as its longest row (engine.generate refills finished rows instead).

    Prompts are left-padded into one batch; each row has its own positions, and pad slots are masked out
    of attention, so a row's tokens do not depend on what else is in the batch. The prefill runs in
    buckets of similar lengths (see prefill_buckets; waste=the padding share a bucket may have). With
    num_samples=G the prompts are prefilled once and the cache is copied G ways (the GRPO rollout case).
    Finished rows are dropped from the batch (and the cache) once they are compact_frac of it, so they
    stop costing compute. seed: an int (prompt i gets seed + i) or one seed per prompt; sample j of a
    prompt is a function of its prompt's seed and j only, never of the rest of the batch. cuda_graph:
    decode with fixed shapes (attention over the whole cache, finished rows kept) so that the step is one
    CUDA graph replay on a GPU (see fixed_shape_step); same tokens up to float rounding. Not under FSDP.
    With ON False (--plain): model.generate, the textbook loop, same tokens. return_logprobs: also each
    sampled token's log-probability under the model (temperature 1, before top-k / top-p), for comparing
    the trainer's scoring with the rollout's. max_new_tokens may be one budget per row; stats: a dict that
    counts decode passes and the rows they computed (bench/rollout.py)."""
    if not ON:
        return model_generate(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids,
                              num_samples, seed, pad_id, return_logprobs)
    dev, dtype = compute_dtype(model)
    cfg = model.config
    B, G = len(prompts), num_samples
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    if int(lens.min()) == 0:
        raise ValueError("generate: empty prompt")
    budget = torch.tensor(row_budgets(max_new_tokens, B * G), device=dev)
    max_new = int(budget.max())
    P = int(lens.max())
    row_seeds = torch.tensor(sample_seeds(seed, B, G), dtype=torch.long, device=dev)
    cache = (FixedShapeCache if cuda_graph else FastCache)(cfg.num_hidden_layers, B, cfg.num_key_value_heads,
                                                            P + max_new, cfg.head_dim, dev, dtype)
    # bf16 on CPU: weights packed once for all the matmuls of this call
    with packed_linears(model, B * G, dtype):
        logits = torch.empty(B, cfg.vocab_size, device=dev)
        # each bucket of similar lengths prefilled padded only to its own longest prompt, into the right end
        # of the shared cache (slots P - Pc .. P): the padding FLOPs of one (B, P) prefill are mostly saved
        for rows_, Pc, part, lg in prefill(model, prompts, dtype, waste, pad_id):
            r = torch.tensor(rows_, device=dev)
            logits[r] = lg
            cache.k[:, r, :, P - Pc:P], cache.v[:, r, :, P - Pc:P] = part.k, part.v
            cache.valid[r, P - Pc:P] = part.valid
        cache.length = P
        if G > 1:   # prefill once, then G copies of each prompt's cache
            rep = torch.arange(B, device=dev).repeat_interleave(G)
            cache.select_rows(rep)
            logits, lens = logits[rep], lens[rep]
        N = B * G
        out = torch.full((N, max_new), -1, dtype=torch.long, device=dev)   # -1 = not generated
        logps = torch.zeros(N, max_new, device=dev) if return_logprobs else None
        stopped = torch.zeros(N, dtype=torch.bool, device=dev)
        rows = torch.arange(N, device=dev)   # output row of each batch row; -1 once finished (until dropped)
        next_pos = lens.clone()
        stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=dev)
        if cuda_graph:
            tok_in, pos_in = torch.zeros(N, 1, dtype=torch.long, device=dev), next_pos[:, None].clone()
            fixed_step = None
        for step in range(max_new):
            tok = sample_next(logits, temperature, top_k, top_p, row_seeds, step)
            live = rows >= 0
            out[rows[live], step] = tok[live]
            if return_logprobs:
                lp = logits.gather(1, tok[:, None])[:, 0] - torch.logsumexp(logits, -1)
                logps[rows[live], step] = lp[live]
            hit = live & torch.isin(tok, stop)
            stopped[rows[hit]] = True
            done = hit | (live & (budget[rows.clamp(min=0)] <= step + 1))
            rows = torch.where(done, -1, rows)
            n_live = int((rows >= 0).sum())
            if n_live == 0 or step == max_new - 1:
                break
            count_pass(stats, len(rows))
            # new inputs into the fixed buffers; finished rows decode throwaway tokens to the end
            if cuda_graph:
                tok_in.copy_(tok[:, None])
                pos_in.copy_(next_pos[:, None])
                cache.slot.fill_(P + step)
                if fixed_step is None:
                    fixed_step = fixed_shape_step(model, tok_in, pos_in, cache)
                logits = fixed_step()
            else:
                # finished rows decode throwaway tokens until enough of them can be dropped in one gather
                if 1 - n_live / len(rows) >= compact_frac:
                    keep = (rows >= 0).nonzero().flatten()
                    cache.select_rows(keep)
                    rows, tok, next_pos, row_seeds = rows[keep], tok[keep], next_pos[keep], row_seeds[keep]
                logits = model(tok[:, None], position_ids=next_pos[:, None], cache=cache)[:, -1].float()
            next_pos = next_pos + 1
    out = out.tolist()
    completions = [[t for t in row if t != -1] for row in out]
    reasons = ["stop" if s else "length" for s in stopped.tolist()]
    if return_logprobs:
        return completions, reasons, [lp[:len(c)] for lp, c in zip(logps.tolist(), completions)]
    return completions, reasons


# -----------------------------------------------------------------------------
# GRPO scoring


def completion_logprobs(model, prompts, outs, device, pad_id, share=1, want_entropy=False, chunk=0):
    """train_grpo.completion_logprobs with less work: (log-prob of each completion token (N, Lc), mask,
    entropy).

    share: how many completions of the same prompt go into one row behind a single copy of it, e.g.
    [prompt, c1, c2, c3, c4]: each c_k attends to the prompt and to itself, not to the other c's, and
    restarts its positions where the prompt ends, so its log-probs are the ones of [prompt, c_k] alone. A
    GRPO group shares its prompt, and KG prompts are ~2x longer than the answers, so this does ~half the
    forward/backward work (bench/grpo.py prints the ratio against share=1). On CPU the rows are laid end
    to end in a single row with no padding (padding to the longest row was ~20 % of the tokens) and each
    prompt and each completion attends as its own short sequence (DocBuckets; SDPA under a dense mask
    computed every (query, key) pair of the row). On a GPU the rows are padded and attend through
    flex_attention with a block mask (FlexMask). Logits are computed only where a completion token is
    predicted: the prompt positions carry no loss, and the lm_head + log-softmax over them would be most
    of the cost."""
    rows = []   # (prompt, [completion indices])
    for i, (p, o) in enumerate(zip(prompts, outs)):
        if rows and len(rows[-1][1]) < share and rows[-1][0] == p:
            rows[-1][1].append(i)
        else:
            rows.append((p, [i]))
    lens = [len(p) + sum(len(outs[i]) for i in idx) for p, idx in rows]
    longest = max(len(p) + len(o) for p, o in zip(prompts, outs))
    packed = torch.device(device).type == "cpu" and longest <= DocBuckets.MAX_LEN
    if packed:   # (batch row, start) of each row
        place, B, T = [(0, sum(lens[:r])) for r in range(len(rows))], 1, sum(lens)
    else:
        place, B, T = [(r, 0) for r in range(len(rows))], len(rows), max(lens)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)   # -1 pad, 0 prompt, k >= 1 the row's k-th completion
    # packed: (prefix start, prefix length, start, length) of each attention sequence (DocBuckets)
    seqs = []
    where = []   # per completion: (batch row, [position predicting each of its tokens])
    for (p, idx), (r, s0) in zip(rows, place):
        P = len(p)
        ids[r, s0:s0 + P] = torch.tensor(p)
        pos[r, s0:s0 + P] = torch.arange(P)
        seg[r, s0:s0 + P] = 0
        seqs.append((0, 0, s0, P))
        s = s0 + P
        for k, i in enumerate(idx):
            n = len(outs[i])
            ids[r, s:s + n] = torch.tensor(outs[i], dtype=torch.long)
            pos[r, s:s + n] = torch.arange(P, P + n)
            seg[r, s:s + n] = k + 1
            seqs.append((s0, P, s, n))
            # token 0 is predicted by the prompt's last position, token j > 0 by the completion's token j - 1
            where.append((r, ([s0 + P - 1] + list(range(s, s + n - 1)))[:n]))
            s += n
    mask = None
    if packed:
        mask = DocBuckets(seqs, T, device)
    elif share > 1 and torch.device(device).type == "cuda":   # flex_attention skips the blocks no one sees
        mask = FlexMask(seg.to(device), shared_prefix=True)
    elif share > 1:
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)
        # a pad sees itself: no NaN
        mask = ((same & causal) | torch.eye(T, dtype=torch.bool))[:, None].to(device)
    # the scored tokens: where each is predicted (flat index into the (B, T) row positions; a shared prompt's
    # last position predicts the first token of each of its completions) and the token itself
    at = torch.tensor([r * T + j for r, js in where for j in js], device=device)
    tgt = torch.tensor([t for o in outs for t in o], device=device)
    lp, ent = model(ids.to(device), position_ids=pos.to(device), attention_mask=mask, logits_at=at,
                    targets=tgt,
                    chunk=chunk, want_entropy=want_entropy)
    lens = torch.tensor([len(o) for o in outs])
    Lc = int(lens.max())
    mask_c = (torch.arange(Lc)[None] < lens[:, None]).float()
    # -> index into lp
    col = torch.where(mask_c.bool(), (lens.cumsum(0) - lens)[:, None] + torch.arange(Lc), 0)
    col, mask_c = col.to(device), mask_c.to(device)
    return lp[col] * mask_c, mask_c, (ent[col] * mask_c if want_entropy else None)

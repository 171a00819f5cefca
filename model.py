"""
model.py: a Qwen2 / Qwen2.5 / Qwen3 (and plain Llama-style) decoder written directly in PyTorch,
Hugging Face checkpoint I/O, and KV-cached batched generation.

    from model import load_model, load_tokenizer, generate
    model = load_model("runs/demo/sft")                 # any HF-layout Qwen2/Qwen3 directory
    tok = load_tokenizer("runs/demo/sft")
    ids = [tok.encode("The patient presents with"), tok.encode("Hi")]
    out, reasons = generate(model, ids, max_new_tokens=32, temperature=0.0,
                            stop_ids=[tok.eos_token_id])

    python model.py --preset tiny            # prints the parameter count of a preset
    python model.py --path runs/demo/sft --prompt "A patient presents with"

Weight names are the Hugging Face ones (model.embed_tokens, model.layers.N.self_attn.o_proj, ..., lm_head)
except two fused projections, as vLLM has them (gpt-fast fuses q/k/v too): self_attn.qkv_proj = [q_proj; k_proj;
v_proj] and mlp.gate_up_proj = [gate_proj; up_proj]. One matmul instead of three, and of two: a small-batch bf16
matmul on CPU has a large fixed cost, and bf16 decoding got ~10 % faster (bench/RESULTS.md). load_model /
save_model split and join them (hf_to_ours / ours_to_hf), so the files on disk are the Hugging Face layout.

On a CPU, generate() decodes through weights pre-packed once per call in oneDNN's layout (Linear,
packed_linears): in bf16 the same numbers as F.linear and ~1.2x faster generation; in fp32 another summation
order (~1e-4) and ~1.8x faster, where F.linear's MKL runs slowly (a Zen 5 box; bench/RESULTS.md).

Packed training rows (doc_ids) on CPU attend per document, not over whole rows under a block-diagonal mask
(DocBuckets): the documents are regrouped by length and attend with plain matmuls, ~2x less attention time in
train_sft.py's step (bench/RESULTS.md). GRPO's completions behind one shared prompt go the same way (each
completion attends to the prompt and itself). On CUDA they keep the mask (SDPA), or, for a single packed row with
flash-attn installed, its varlen kernel.

On a GPU, generate(..., cuda_graph=True) replays each decode step as one CUDA graph: a small model's step is
hundreds of kernel launches, and on an H200 that made generation 4-5x faster than the eager loop (and than
transformers' generate), with the same tokens (bench/RESULTS.md).
"""
import argparse
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional fast attention for training on CUDA (packed sequences via varlen)
    from flash_attn import flash_attn_func, flash_attn_varlen_func
    HAVE_FLASH = True
except Exception:
    HAVE_FLASH = False

# -----------------------------------------------------------------------------
# config


@dataclass
class ModelConfig:
    model_type: str = "qwen2"        # qwen2 (q/k/v bias) | qwen3 (q_norm/k_norm, no bias) | llama
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 0                # 0 = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool = True      # Qwen2: bias on q/k/v; Qwen3 / Llama: none
    qk_norm: bool = False            # Qwen3: RMSNorm over each head of q and k before RoPE
    bos_token_id: int = None
    eos_token_id: int = None
    pad_token_id: int = None

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        assert self.num_attention_heads % self.num_key_value_heads == 0, "heads must be a multiple of kv heads"

    @classmethod
    def from_name(cls, name, **overrides):
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, d, path="config.json"):
        """Build from a transformers config.json dict (transformers 4.x or 5.x)."""
        model_type = d.get("model_type", "qwen2")
        if model_type not in ("qwen2", "qwen3", "llama"):
            raise ValueError(f"{path}: model_type {model_type!r} is not supported (qwen2, qwen3, llama)")
        # transformers 5 writes rope_parameters={rope_theta, rope_type}; 4.x wrote rope_theta (+ rope_scaling)
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"{path}: rope_type {rope_type!r} is not implemented (only default RoPE)")
        rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{path}: hidden_act {d['hidden_act']!r} is not implemented (only silu)")
        window, context = d.get("sliding_window"), d.get("max_position_embeddings", 2048)
        if (d.get("use_sliding_window") or "sliding_attention" in (d.get("layer_types") or [])) and window \
                and window < context:
            raise ValueError(f"{path}: sliding-window attention ({window} of {context} positions) is not implemented")
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0]
        return cls(
            model_type=model_type, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or 0, rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=rope_theta,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),   # transformers' default for all three
            attention_bias=d.get("attention_bias", model_type == "qwen2"),
            qk_norm=(model_type == "qwen3"), bos_token_id=d.get("bos_token_id"), eos_token_id=eos,
            pad_token_id=d.get("pad_token_id"))

    def to_hf(self, dtype="float32"):
        arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[self.model_type]
        d = dict(architectures=[arch], model_type=self.model_type, vocab_size=self.vocab_size,
                 hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                 num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                 num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, hidden_act="silu",
                 rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
                 tie_word_embeddings=self.tie_word_embeddings, attention_bias=self.attention_bias,
                 # both spellings, so transformers 4.x and 5.x (and vLLM) read the same theta
                 rope_theta=self.rope_theta, rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default"},
                 bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                 use_cache=True, dtype=dtype, torch_dtype=dtype)
        if self.model_type == "qwen2":
            d.update(use_sliding_window=False, sliding_window=None)
        return d


# presets for from-scratch models (Qwen2 layout); real checkpoints bring their own config.json
PRESETS = {
    "nano":  dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "tiny":  dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2),
    "20m":   dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2, vocab_size=8192),
    # the shape of Qwen2.5-0.5B (random weights): GPU benchmarks at a real model's size without the hub
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=32768),
}

# -----------------------------------------------------------------------------
# the decoder


def cpu_has_native_bf16():
    """True when this CPU computes bf16 in hardware (AVX512-BF16 or AMX). Elsewhere (e.g. AVX2-only CPUs) bf16
    autocast is emulated: an SFT step of the tiny model took ~30 s vs ~2.4 s in fp32 on a 2-core AVX2 EPYC.
    run.sh passes --bf16 only where this is True."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


class Linear(nn.Linear):
    """nn.Linear, plus an optional copy of the weight in oneDNN's blocked layout for CPU generation (set by
    packed_linears for one generate call, prefill and decode). Two reasons, measured on a 2-core Zen 5 with
    16-row inputs: F.linear in bf16 re-lays-out the weight on every call ((384 -> 2048) 75 -> 51 us packed), and
    fp32 F.linear goes to MKL, which runs at ~120 GFLOP/s there against oneDNN's 230-430 ((384 -> 8192) lm_head
    894 -> 233 us). Same math, another summation order (fp32: ~1e-4 on the outputs)."""
    packed = None

    def forward(self, x):
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        w, b, dtype = self.packed
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).to(dtype), w, b, "none", [], "")
        return y.view(*x.shape[:-1], -1)


@contextmanager
def packed_linears(model, rows, dtype):
    """Pack every Linear's weight for rows-row matmuls on CPU while the block runs, then drop the copies
    (weights change between GRPO rollouts). dtype: the compute dtype (the weights', or autocast's). Packs fp32,
    and bf16 on CPUs with native bf16 (emulated bf16 gains nothing); a no-op on GPU and without oneDNN. Packing
    the 20m model takes ~10 ms, against ~0.4 s for 64 decode steps of 16 rows."""
    on = (next(model.parameters()).device.type == "cpu" and torch.backends.mkldnn.is_available()
          and (dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_native_bf16())))
    # under FSDP2 outside a Rollout the weights are DTensor shards: left alone by the type check
    mods = [m for m in model.modules() if isinstance(m, Linear) and type(m.weight) is nn.Parameter] if on else []
    for m in mods:
        bias = None if m.bias is None else m.bias.detach().to(dtype)
        m.packed = (torch.ops.mkldnn._reorder_linear_weight(m.weight.detach().to(dtype), rows), bias, dtype)
    try:
        yield
    finally:
        for m in mods:
            m.packed = None


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32 like the reference, then cast back (matters in bf16); the weight goes inside the
        # fused op: on CPU that is one pass instead of two (about 2x faster on a (T, hidden) activation).
        # When x and the weight share a dtype the fused op does that fp32 math itself (same bits): no casts,
        # which in a bf16 decode step are 3 of the 11 kernels a norm call runs
        if x.dtype == self.weight.dtype:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """positions: (B, T) integer tensor -> cos, sin of shape (B, 1, T, head_dim). sin comes with its first half
    negated, so that apply_rope is two products and a roll (fewer small ops per layer, which is most of a CPU
    decode step) and equal bit for bit to the usual x * cos + rotate_half(x) * sin."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq            # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]           # (B, 1, T, D)
    sin = emb.sin()
    return emb.cos().to(dtype), torch.cat([-sin[..., :head_dim // 2], sin[..., head_dim // 2:]], dim=-1).to(dtype)


def apply_rope(x, cos, sin):
    """x (B, heads, T, D) rotated by position; sin as rope_cos_sin returns it (first half negated)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def doc_attention_mask(doc_ids):
    """Packed rows: doc_ids (B, T) -> (B, 1, T, T) boolean, True where a token may attend (earlier tokens of its
    own document). Also the 4D attention_mask that transformers takes for the same rows."""
    T = doc_ids.shape[1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril())[:, None]


def flex_block_mask(seg, shared_prefix=False):
    """Packed rows on CUDA: flex_attention's block mask from segment ids (B, T), the same pattern as the dense
    mask but in (128 x 128)-token blocks, so the kernel skips the blocks no query may see. A token sees earlier
    tokens of its own segment; with shared_prefix, also those of segment 0 (a GRPO prompt its completions share)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def allowed(b, h, q, kv):
        same = seg[b, q] == seg[b, kv]
        if shared_prefix:
            same = same | (seg[b, kv] == 0)
        return same & (q >= kv)
    return create_block_mask(allowed, seg.shape[0], None, seg.shape[1], seg.shape[1], device=seg.device)


_flex = None


def flex_attention(q, k, v, block_mask):
    """torch's flex_attention, compiled once on CUDA (its eager form materialises every score); eager elsewhere."""
    global _flex
    if _flex is None:
        from torch.nn.attention.flex_attention import flex_attention as fa
        _flex = torch.compile(fa) if q.is_cuda else fa
    return _flex(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def doc_starts(doc_ids):
    """Packed rows: doc_ids (B, T) -> (B, T) bool, True where a document starts (a row's first token always)."""
    B = doc_ids.shape[0]
    return torch.cat([torch.ones(B, 1, dtype=torch.bool, device=doc_ids.device), doc_ids[:, 1:] != doc_ids[:, :-1]], 1)


def doc_positions(doc_ids):
    """Packed rows: doc_ids (B, T) -> position of each token within its document (B, T)."""
    B, T = doc_ids.shape
    starts = doc_starts(doc_ids)
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    return idx - torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), 1).values


class DocBuckets:
    """Packed rows on CPU: attention per sequence instead of over whole rows under a mask. Each attention
    sequence is a run of query tokens that attend causally to themselves and, optionally, to a shared prefix
    elsewhere in the row (a GRPO prompt that several completions sit behind). The sequences are regrouped into
    buckets of similar length (prefill_buckets), each a right-padded (n, L) batch, and attend with plain matmuls;
    one gather puts the outputs back in place.
    Why: over a whole row, SDPA's CPU kernel computes every (query, key) pair the mask throws away, and its
    backward is slow; per document there is ~3x less work at the demo's ~170-token examples in 512-token rows
    (one attention layer, forward + backward, 4 x 512 tokens: 30 -> 15 ms in bf16, 33 -> 25 ms in fp32;
    bench/RESULTS.md). Same numbers as the masked SDPA up to rounding (tests/test_model.py, tests/test_grpo.py).
    Built by from_doc_ids (packed SFT documents) or from a list of sequences (train_grpo.completion_logprobs)."""
    MAX_LEN = 1024   # longer sequences keep the masked SDPA: the scores here are a full (Lq, L) matrix per head

    def __init__(self, seqs, n_tokens, device, waste=0.15):
        """seqs: (prefix_start, prefix_len, start, length) per sequence, as indices into the flattened (B * T)
        tokens: tokens start .. start + length - 1 are the queries, and attend causally to themselves after the
        prefix_len tokens from prefix_start (prefix_len 0: a plain document). Every token is the query of exactly
        one sequence (padding too: make it a document of its own)."""
        self.buckets = []   # (query index (n, Lq), key index (n, L), prefix lengths (n,) or None); B * T = a zero row
        self.ok = max(p + n for _, p, _, n in seqs) <= self.MAX_LEN
        if not self.ok:
            return
        slot_of = torch.empty(n_tokens, dtype=torch.long)   # token -> its row in the concatenated bucket outputs
        offset = 0
        plain = [s for s in seqs if s[1] == 0]
        prefixed = [s for s in seqs if s[1] > 0]
        for group in (plain, prefixed):   # apart: a plain document's queries are all of its keys, the others' not
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
        starts = torch.nonzero(doc_starts(doc_ids).flatten()).flatten().cpu()   # a row's start always ends a document
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
            t = t.repeat(1, G, 1)                                       # the G query heads of a KV head are stacked
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
            qb = qt.index_select(0, qidx.flatten()).view(n, Lq, H, D).permute(0, 2, 1, 3).reshape(n, Hkv, G * Lq, D)
            kb = kt.index_select(0, kidx.flatten()).view(n, L, Hkv, D).permute(0, 2, 1, 3)   # (n, Hkv, L, D)
            vb = vt.index_select(0, kidx.flatten()).view(n, L, Hkv, D).permute(0, 2, 1, 3)
            # scores = causal bias + scale * q k^T in one baddbmm (a separate scale and masked_fill cost ~10 %)
            s = torch.baddbmm(self.bias(b, qb.dtype, G, Hkv), qb.reshape(n * Hkv, G * Lq, D),
                              kb.reshape(n * Hkv, L, D).transpose(1, 2), alpha=D ** -0.5)
            p = torch.softmax(s, dim=-1, dtype=torch.float32).to(vb.dtype)      # fp32 softmax, as SDPA does
            y = p.view(n, Hkv, G * Lq, L) @ vb                                  # (n, Hkv, G * Lq, D)
            outs.append(y.view(n, H, Lq, D).transpose(1, 2).reshape(n * Lq, H * D))
        return torch.cat(outs).index_select(0, self.slot_of).view(B, T, H * D)


class KVCache(nn.Module):
    """Static per-layer cache: (B, Hkv, Tmax, D) buffers written in place, plus which slots hold a real
    token (left padding of ragged prompts leaves holes that must never be attended)."""

    def __init__(self, num_layers, batch, num_kv_heads, max_len, head_dim, device, dtype):
        super().__init__()
        self.k = torch.zeros(num_layers, batch, num_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0   # slots filled so far (the same for every row)
        # fixed-shape decoding (CUDA graphs): a (1,) device tensor naming the slot the next token goes to; then
        # attention runs over all max_len slots (cache.valid masks the unfilled ones), so no shape depends on
        # the step and nothing reads `length` on the host
        self.slot = None

    def select_rows(self, idx):
        """Keep (or repeat) rows: finished rows are dropped, one prompt becomes G samples."""
        self.k, self.v, self.valid = self.k[:, idx], self.v[:, idx], self.valid[idx]
        return self


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, (H + 2 * Hkv) * D, bias=cfg.attention_bias)   # [q; k; v]
        self.o_proj = Linear(H * D, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, layer_idx, cache, cu_seqlens):
        B, T, _ = x.shape
        H, Hkv, D = self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, D)   # heads: H of q, then Hkv of k, then Hkv of v
        if self.cfg.qk_norm:
            qkv = torch.cat([self.q_norm(qkv[:, :, :H]), self.k_norm(qkv[:, :, H:H + Hkv]), qkv[:, :, H + Hkv:]], dim=2)
        qkv = qkv.transpose(1, 2)                                # (B, heads, T, D)
        qk = apply_rope(qkv[:, :H + Hkv], cos, sin)              # q and k rotated in one go
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]
        if cache is not None and cache.slot is not None:   # one token into a device-side slot (fixed shapes)
            cache.k[layer_idx].index_copy_(2, cache.slot, k.to(cache.k.dtype))
            cache.v[layer_idx].index_copy_(2, cache.slot, v.to(cache.v.dtype))
            k, v = cache.k[layer_idx], cache.v[layer_idx]
        elif cache is not None:
            s = cache.length
            cache.k[layer_idx, :, :, s:s + T] = k
            cache.v[layer_idx, :, :, s:s + T] = v
            k, v = cache.k[layer_idx, :, :, :s + T], cache.v[layer_idx, :, :, :s + T]
        # packed rows keep their mask as well: flash-attn runs only in fp16/bf16, and SDPA needs the mask otherwise
        if HAVE_FLASH and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and (mask is None or cu_seqlens is not None):
            # flash-attn wants (B, T, H, D); it handles GQA itself
            qf, kf, vf = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if cu_seqlens is not None:   # packed documents: B == 1, attention stays inside each document
                maxlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
                y = flash_attn_varlen_func(qf[0], kf[0], vf[0], cu_seqlens, cu_seqlens, maxlen, maxlen, causal=True)[None]
            else:
                y = flash_attn_func(qf, kf, vf, causal=True)
            y = y.reshape(B, T, H * D)
        elif isinstance(mask, DocBuckets):   # packed documents on CPU
            y = mask.attend(q, k, v)
        elif type(mask).__name__ == "BlockMask":   # packed rows on CUDA (flex_block_mask)
            y = flex_attention(q, k, v, mask).transpose(1, 2).reshape(B, T, H * D)
        elif T == 1 and cache is not None:
            # one decode step: fold the H // Hkv query heads that share a KV head into the query axis, (B, Hkv,
            # H // Hkv, D), so SDPA sees a few queries per KV head instead of one per head. The CPU kernel handles
            # a single query badly (measured in bf16: 570 -> 110 us per call on a (16, 6, 1, 64) query over 150 keys).
            # mask (B, 1, 1, S) is the same for every one of those queries: query i sees every valid key
            y = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, D), k, v, attn_mask=mask)
            y = y.reshape(B, T, H * D)
        else:
            # an explicit boolean mask whenever the query is not square with the keys: is_causal=True would
            # align the triangle top-left, which is wrong once a KV cache makes keys longer than queries
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=H != Hkv)
            y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)   # [gate; up]
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, layer_idx, cache, cu_seqlens):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, layer_idx, cache, cu_seqlens)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, seed=0):
        """GPT-2 style init, drawn per Hugging Face tensor (q, k, v, gate, up separately, in that order), so a seed
        gives the same weights as it did before the projections were fused."""
        g = torch.Generator().manual_seed(seed)
        hf = ours_to_hf(self.state_dict(), self.config)
        for name, p in hf.items():
            if name.endswith("norm.weight"):
                hf[name] = torch.ones(p.shape)
            elif name.endswith(".bias"):
                hf[name] = torch.zeros(p.shape)
            else:   # small normal, output projections scaled down by depth
                std = 0.02 / math.sqrt(2 * self.config.num_hidden_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                hf[name] = torch.randn(p.shape, generator=g) * std
        with torch.no_grad():
            for name, t in hf_to_ours(hf, self.config).items():
                self.get_parameter(name).copy_(t)
        return self

    def forward(self, input_ids, position_ids=None, doc_ids=None, cache=None, attention_mask=None, last_only=False,
                logits_at=None, targets=None, chunk=0, want_entropy=False):
        """input_ids (B, T) -> logits (B, T, vocab).
        doc_ids (B, T): packed training; attention stays within equal ids and positions restart per document.
        cache + position_ids: incremental decoding; cache.valid says which key slots are real tokens.
        attention_mask (B, T) of 1/0: left-padded prompts without a cache (pads are never attended).
        attention_mask (B, 1, T, T) bool: used as given, True where query t may attend key s (with position_ids:
        several completions behind one shared prompt, as train_grpo.py --share-prompt scores them on a GPU);
        attention_mask a DocBuckets: attention per sequence as it describes (train_grpo.py scores completions
        behind a shared prompt so on CPU).
        last_only: logits of the last position only (generation needs no more; saves a (B, T, vocab) matmul).
        logits_at (B, T) bool, or flat indices into the B * T positions (repeats allowed): logits of those
        positions only, as (N, vocab) (only completion / assistant tokens carry loss: the lm_head matmul and the
        log-softmax over prompt positions would be wasted work).
        targets (N,) with logits_at: instead of logits, (log p(target) (N,) fp32, entropy (N,) or None), computed
        chunk tokens at a time (see token_logprobs): no (N, vocab) tensor is ever held."""
        B, T = input_ids.shape
        dev = input_ids.device
        mask, cu_seqlens = None, None
        if doc_ids is not None:
            if input_ids.is_cuda:
                mask = None if HAVE_FLASH and B == 1 else flex_block_mask(doc_ids)
            else:
                mask = DocBuckets.from_doc_ids(doc_ids)
            if mask is None or (isinstance(mask, DocBuckets) and not mask.ok):
                mask = doc_attention_mask(doc_ids)
            if position_ids is None:
                position_ids = doc_positions(doc_ids)
            if HAVE_FLASH and input_ids.is_cuda and B == 1:   # for flash-attn varlen (fp16/bf16), in place of the mask
                starts = torch.nonzero(doc_starts(doc_ids)[0]).flatten()
                cu_seqlens = torch.cat([starts, starts.new_tensor([T])]).to(torch.int32)
        elif cache is not None and cache.slot is not None:
            assert T == 1, "fixed-shape decoding takes one token per row"
            cache.valid.index_fill_(1, cache.slot, True)
            mask = cache.valid[:, None, None, :]   # the filled slots, this token's included: causal by construction
        elif cache is not None:
            s = cache.length
            cache.valid[:, s:s + T] = True if attention_mask is None else attention_mask.bool()
            keys_ok = cache.valid[:, None, None, :s + T]                                  # (B, 1, 1, S)
            causal = torch.ones(T, s + T, dtype=torch.bool, device=dev).tril(diagonal=s)  # query i sees keys <= s+i
            diag = torch.zeros(T, s + T, dtype=torch.bool, device=dev)
            diag[:, s:] = torch.eye(T, dtype=torch.bool, device=dev)   # a pad query sees itself: no empty rows, no NaN
            mask = (keys_ok & causal) | diag
        elif isinstance(attention_mask, DocBuckets) or type(attention_mask).__name__ == "BlockMask" or \
                (attention_mask is not None and attention_mask.dim() == 4):
            mask = attention_mask
        elif attention_mask is not None:
            am = attention_mask.bool()
            causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
            mask = (am[:, None, None, :] & causal) | torch.eye(T, dtype=torch.bool, device=dev)
            if position_ids is None:
                position_ids = (am.long().cumsum(1) - 1).clamp(min=0)
        if position_ids is None:
            position_ids = torch.arange(T, device=dev).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, i, cache, cu_seqlens)
        if cache is not None and cache.slot is None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:
            x = x.flatten(0, 1)[logits_at.flatten()]
        if targets is not None:
            return token_logprobs(self.lm_head, self.model.norm(x), targets, chunk, want_entropy)
        return self.lm_head(self.model.norm(x))


LOGITS_BUDGET = 2 ** 26   # vocab x tokens of fp32 logits per chunk (256 MB) when no chunk size is given


def token_logprobs(lm_head, h, targets, chunk=0, want_entropy=False):
    """log p(target) of each row of hidden states h (N, hidden), and the entropy of each row's distribution
    (no gradient; for logging). The (N, vocab) fp32 logits, their log-softmax and their gradient would be
    ~3 x 4 x N x vocab bytes: 15 GB for 16 completions x 512 tokens at Qwen's 151,936-token vocabulary. So rows
    go chunk at a time (default: LOGITS_BUDGET / vocab), each chunk under activation checkpointing: its logits
    are freed once its log-probs are out, and made again in backward. One chunk is the plain computation."""
    chunk = chunk or max(1, LOGITS_BUDGET // lm_head.weight.shape[0])

    def part(h, t):
        logp = lm_head(h).float().log_softmax(-1)
        ent = None
        if want_entropy:
            with torch.no_grad():
                ent = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, t[:, None])[:, 0], ent

    if h.shape[0] <= chunk:
        return part(h, targets)
    from torch.utils.checkpoint import checkpoint
    parts = [checkpoint(part, h[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
             for i in range(0, h.shape[0], chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]) if want_entropy else None


# -----------------------------------------------------------------------------
# checkpoints in the Hugging Face layout


def _atomic_write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def fused_projections(cfg):
    """Our fused projection -> (the Hugging Face tensors it stacks along dim 0, their sizes)."""
    H, Hkv, D, I = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    return {"qkv_proj": (("q_proj", "k_proj", "v_proj"), [H * D, Hkv * D, Hkv * D]),
            "gate_up_proj": (("gate_proj", "up_proj"), [I, I])}


def ours_to_hf(state, cfg):
    """Our state dict -> Hugging Face names (fused projections split). A tied lm_head is left out (it is the
    embedding)."""
    out = {}
    for k, v in state.items():
        if cfg.tie_word_embeddings and k == "lm_head.weight":
            continue
        fused = [f for f in fused_projections(cfg).items() if f".{f[0]}." in k]
        if not fused:
            out[k] = v
            continue
        name, (parts, sizes) = fused[0]
        for part, t in zip(parts, v.split(sizes, dim=0)):
            out[k.replace(name, part)] = t
    return out


def hf_to_ours(state, cfg):
    """Hugging Face names -> ours (the inverse of ours_to_hf). A projection with a part missing stays unfused,
    so load_model's check names what is missing with its Hugging Face name."""
    out = dict(state)
    for name, (parts, _) in fused_projections(cfg).items():
        for k in [k for k in state if f".{parts[0]}." in k]:
            keys = [k.replace(parts[0], p) for p in parts]
            if all(x in out for x in keys):
                out[k.replace(parts[0], name)] = torch.cat([out.pop(x) for x in keys], dim=0)
    return out


ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def read_config(path):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: no config.json (expected a Hugging Face model directory)")
    with open(cfg_path, encoding="utf-8") as f:
        try:
            return ModelConfig.from_hf(json.load(f), cfg_path)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e.msg})") from None


def safetensors_index(path):
    """{Hugging Face tensor name: (file, dtype, shape, byte offset of its data)} over model.safetensors or the
    shards an index lists. Only the headers are read; every size is checked against the file's."""
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_file):
        with open(index_file, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    index = {}
    for name in files:
        fp = os.path.join(path, name)
        if not os.path.exists(fp):
            raise FileNotFoundError(f"{fp}: listed in {index_file} but missing")
        size = os.path.getsize(fp)
        with open(fp, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(n)) if 8 + n <= size else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                header = None
        if not isinstance(header, dict):
            raise ValueError(f"{fp}: not a safetensors file (its header does not parse)")
        for k, v in header.items():
            if k == "__metadata__" or "rotary_emb" in k:
                continue
            if v["dtype"] not in ST_DTYPES:
                raise ValueError(f"{fp}: tensor {k} has dtype {v['dtype']} (supported: {', '.join(ST_DTYPES)})")
            start, end = v["data_offsets"]
            if 8 + n + end > size:
                raise ValueError(f"{fp}: truncated: tensor {k} ends at byte {8 + n + end:,}, the file has {size:,}")
            index[k] = (fp, ST_DTYPES[v["dtype"]], v["shape"], 8 + n + start)
    return index


def read_rows(entry, lo, hi, out):
    """Rows lo..hi of one safetensors tensor (dim 0) into out, with plain file reads: straight into out's memory
    when dtype and device allow, else through 64 MB buffers. Nothing else of the file is read or mapped, so a
    rank that owns 1/world of a weight reads 1/world of it."""
    path, dtype, shape, offset = entry
    row = math.prod(shape[1:]) * dtype.itemsize
    step = max(1, (64 << 20) // max(row, 1))
    direct = out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
    with open(path, "rb") as f:
        for a in range(lo, hi, step):
            b = min(a + step, hi)
            buf = out[a - lo:b - lo] if direct else torch.empty((b - a, *shape[1:]), dtype=dtype)
            f.seek(offset + a * row)
            if f.readinto(buf.reshape(-1).view(torch.uint8).numpy()) != (b - a) * row:
                raise ValueError(f"{path}: truncated while reading a tensor")
            if not direct:
                out[a - lo:b - lo].copy_(buf)


def load_rows(index, cfg, name, lo, hi, out):
    """Rows lo..hi of our parameter `name` into out; a fused projection reads them from its Hugging Face parts."""
    fused = [(f, parts) for f, parts in fused_projections(cfg).items() if f".{f}." in name]
    if not fused:
        read_rows(index[name], lo, hi, out)
        return
    f, (parts, sizes) = fused[0]
    start = 0
    for part, n in zip(parts, sizes):   # this part holds rows start .. start + n of the fused weight
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            read_rows(index[name.replace(f, part)], a - start, b - start, out[a - lo:b - lo])
        start += n


def check_weights(index, model, path):
    """The file's tensors are exactly the model's (by Hugging Face name) and of the right shapes."""
    cfg = model.config
    expected = {k: list(v.shape) for k, v in ours_to_hf(model.state_dict(), cfg).items()}
    extra = [k for k in index if k not in expected and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    missing = [k for k in expected if k not in index]
    if missing or extra:
        raise ValueError(f"{path}: weights do not match config.json (missing {missing[:5]}, unexpected {extra[:5]})")
    for k, shape in expected.items():
        if list(index[k][2]) != shape:
            raise ValueError(f"{path}: tensor {k} has shape {index[k][2]}, config.json says {shape}")


def load_model(path, device=None, dtype=None):
    """Load an HF-layout directory (config.json + model.safetensors, or shards + index) into our Transformer.
    dtype: the parameters' (default: the file's). The model is built on the meta device and each weight read
    once into its place, so loading holds the model's bytes once (fsdp.load_sharded: 1/world of them)."""
    cfg = read_config(path)
    index = safetensors_index(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    check_weights(index, model, path)
    model = model.to(dtype or index["model.embed_tokens.weight"][1]).to_empty(device=device or "cpu")
    if cfg.tie_word_embeddings:   # to_empty gives each module its own tensor
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            load_rows(index, cfg, name, 0, p.shape[0], p)
    return model


def save_model(model, path, max_shard_bytes=5 * 2**30, generation_config=None, tensors=None):
    """Write config.json, generation_config.json and safetensors (sharded above max_shard_bytes).
    tensors: (our name, tensor) pairs to write instead of model.state_dict(), e.g. fsdp.full_tensors gathering
    one weight at a time: only one shard file's tensors are ever held. Each file goes through a temp name and
    a rename, and weight files of an earlier save that this one did not write are removed."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    parts, cur, size, total, dtype = [], {}, 0, 0, "float32"

    def flush():
        parts.append((os.path.join(path, f"part-{len(parts):05d}.safetensors.tmp"), list(cur)))
        save_file(cur, parts[-1][0], metadata={"format": "pt"})

    for k, v in (tensors if tensors is not None else model.state_dict().items()):
        # HF names (fused projections split); a tied lm_head is written once, as the embedding
        for hk, hv in ours_to_hf({k: v}, cfg).items():
            hv = hv.detach().contiguous().cpu()
            n = hv.numel() * hv.element_size()
            if cur and size + n > max_shard_bytes:
                flush()
                cur, size = {}, 0
            cur[hk], size, total, dtype = hv, size + n, total + n, str(hv.dtype).replace("torch.", "")
    flush()
    names = ["model.safetensors"] if len(parts) == 1 else \
        [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    for (tmp, _), name in zip(parts, names):
        os.replace(tmp, os.path.join(path, name))
    if len(parts) > 1:
        wmap = {k: name for name, (_, keys) in zip(names, parts) for k in keys}
        _atomic_write_text(os.path.join(path, "model.safetensors.index.json"),
                           json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=2))
    for f in os.listdir(path):   # an earlier, differently sharded save must not be read back
        if (f.endswith(".safetensors") and f not in names) or (f == "model.safetensors.index.json" and len(parts) == 1):
            os.remove(os.path.join(path, f))
    _atomic_write_text(os.path.join(path, "config.json"), json.dumps(cfg.to_hf(dtype), indent=2))
    gen = generation_config or {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                                "pad_token_id": cfg.pad_token_id, "do_sample": False}
    _atomic_write_text(os.path.join(path, "generation_config.json"), json.dumps(gen, indent=2))


def has_tokenizer(path):
    return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def load_tokenizer(path):
    """The tokenizer exactly as its tokenizer.json specifies (never trust_remote_code). We avoid AutoTokenizer
    when tokenizer.json exists: with a qwen2 config.json beside it, transformers 5 picks Qwen2Tokenizer, which
    rebuilds the pre-tokenizer from vocab + merges and tokenises our trained BPE differently."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


# ChatML, as Qwen uses; written into tokenizers we train so apply_chat_template works like on Qwen
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# Qwen2's pre-tokenizer split (the regex its tokenizer uses); ours is identical so that transformers'
# Qwen2Tokenizer, which AutoTokenizer picks for a qwen2 checkpoint, tokenises our BPE exactly as we do
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def train_tokenizer(texts, vocab_size, path):
    """Byte-level BPE trained on our own text, saved with the ChatML special tokens and template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


# -----------------------------------------------------------------------------
# KV-cached batched generation


def _signed(c):
    return c - (1 << 64) if c >= 1 << 63 else c


_MASK = [(1 << (64 - k)) - 1 for k in range(64)]


def row_uniforms(row_seeds, step, V):
    """(B, V) uniforms in (0, 1) from a counter-based hash (splitmix64) of (row seed, step, token id).
    Why not torch.multinomial with one generator: there a row's sample depends on which other rows share the
    batch. Here it depends only on its own seed, so rollouts are the same whatever the batch, the number of
    ranks or the order of prompts, which GRPO's 1-rank == N-rank equivalence needs."""
    x = row_seeds[:, None] * _signed(0x9E3779B97F4A7C15) + torch.full_like(row_seeds[:, None], step) * _signed(0xD1B54A32D192ED03) \
        + torch.arange(V, device=row_seeds.device) * _signed(0x8CB92BA72F3D8DD7)
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = x ^ ((x >> shift) & _MASK[shift])
        x = x * _signed(mult)
    x = x ^ ((x >> 31) & _MASK[31])
    return (((x >> 11) & ((1 << 53) - 1)).double() + 0.5) / 2.0 ** 53


def sample_next(logits, temperature, top_k, top_p, row_seeds=None, step=0):
    """logits (B, V) fp32 -> next ids (B,). temperature 0 = greedy. Sampling is Gumbel-max with per-row
    uniforms (row_uniforms): exactly a draw from softmax(logits / temperature) after top-k / top-p."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p      # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    gumbel = -torch.log(-torch.log(row_uniforms(row_seeds, step, logits.shape[-1])))
    return (logits.double() + gumbel).argmax(-1)


def prefill_buckets(lens, waste=0.15):
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
    kernel launches that each cost more host time than GPU time (measured on an H200: 40 ms of GPU work in
    386 ms of a 64-step generation), and a replay launches them all at once. On CPU it just runs."""
    step = lambda: model(tok_in, position_ids=pos_in, cache=cache)[:, -1].float()  # noqa: E731
    if not tok_in.is_cuda:
        return step
    # warm up on a side stream (kernels and workspaces get chosen), then capture. Both run the real first step:
    # writing the same k, v into the same slot again is harmless
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


@torch.no_grad()
def generate(model, prompts, max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0, stop_ids=(),
             num_samples=1, seed=None, pad_id=0, compact_frac=0.25, waste=0.15, cuda_graph=False,
             return_logprobs=False):
    """prompts: list of token-id lists (ragged). Returns (completions, finish_reasons), one per prompt and
    sample, in order prompt0-sample0, prompt0-sample1, ...; each completion ends with its stop token if it
    stopped ("stop"), else it is max_new_tokens long ("length").

    Prompts are left-padded into one batch; each row has its own positions, and pad slots are masked out
    of attention, so a row's tokens do not depend on what else is in the batch. The prefill runs in buckets
    of similar lengths (see prefill_buckets; waste=the padding share a bucket may have). With num_samples=G the
    prompts are prefilled once and the cache is copied G ways (the GRPO rollout case). Finished rows are
    dropped from the batch (and the cache) once they are compact_frac of it, so they stop costing compute.
    seed: an int (prompt i gets seed + i) or one seed per prompt; sample j of a prompt is a function of its
    prompt's seed and j only, never of the rest of the batch.
    cuda_graph: decode with fixed shapes (attention over the whole cache, finished rows kept) so that the step
    is one CUDA graph replay on a GPU (see fixed_shape_step); same tokens up to float rounding. Not under FSDP.
    return_logprobs: also each sampled token's log-probability under the model (temperature 1, before top-k /
    top-p), for comparing the trainer's scoring with the rollout's."""
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if torch.is_autocast_enabled(dev.type):
        # under autocast the compute dtype is autocast's: the cache is stored in it (attention reads it so; half
        # the memory, and no cast of the whole cache per layer per step) and the weights are packed for it
        dtype = torch.get_autocast_dtype(dev.type)
    cfg = model.config
    B, G = len(prompts), num_samples
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    if int(lens.min()) == 0:
        raise ValueError("generate: empty prompt")
    P = int(lens.max())
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=dev)
    amask = torch.zeros(B, P, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, device=dev)
        amask[i, P - len(p):] = 1
    positions = (amask.cumsum(1) - 1).clamp(min=0)
    if seed is None:   # fresh entropy, without re-seeding torch's global generator (callers' state is theirs)
        seed = int.from_bytes(os.urandom(4), "little") % 2**31
    seeds = [seed + i for i in range(B)] if isinstance(seed, int) else list(seed)
    row_seeds = torch.tensor([s * 1_000_003 + j for s in seeds for j in range(G)], dtype=torch.long, device=dev)
    cache = KVCache(cfg.num_hidden_layers, B, cfg.num_key_value_heads, P + max_new_tokens, cfg.head_dim, dev, dtype)
    with packed_linears(model, B * G, dtype):   # bf16 on CPU: weights packed once for all the matmuls of this call
        logits = torch.empty(B, cfg.vocab_size, device=dev)
        for rows_, Pc in prefill_buckets(lens.tolist(), waste):
            # each bucket of similar lengths is prefilled padded only to its own longest prompt, into the right
            # end of the shared cache (slots P - Pc .. P): the padding FLOPs of one (B, P) prefill are mostly saved
            r = torch.tensor(rows_, device=dev)
            part = KVCache(cfg.num_hidden_layers, len(rows_), cfg.num_key_value_heads, Pc, cfg.head_dim, dev, dtype)
            logits[r] = model(ids[r, P - Pc:], position_ids=positions[r, P - Pc:], cache=part,
                              attention_mask=amask[r, P - Pc:], last_only=True)[:, -1].float()
            cache.k[:, r, :, P - Pc:P], cache.v[:, r, :, P - Pc:P] = part.k, part.v
            cache.valid[r, P - Pc:P] = part.valid
        cache.length = P
        if G > 1:   # prefill once, then G copies of each prompt's cache
            rep = torch.arange(B, device=dev).repeat_interleave(G)
            cache.select_rows(rep)
            logits, lens = logits[rep], lens[rep]
        N = B * G
        out = torch.full((N, max_new_tokens), -1, dtype=torch.long, device=dev)   # -1 = not generated
        logps = torch.zeros(N, max_new_tokens, device=dev) if return_logprobs else None
        stopped = torch.zeros(N, dtype=torch.bool, device=dev)
        rows = torch.arange(N, device=dev)   # output row of each batch row; -1 once finished (until dropped)
        next_pos = lens.clone()
        stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=dev)
        if cuda_graph:
            cache.slot = torch.zeros(1, dtype=torch.long, device=dev)
            tok_in, pos_in, fixed_step = torch.zeros(N, 1, dtype=torch.long, device=dev), next_pos[:, None].clone(), None
        for step in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_k, top_p, row_seeds, step)
            live = rows >= 0
            out[rows[live], step] = tok[live]
            if return_logprobs:
                lp = logits.gather(1, tok[:, None])[:, 0] - torch.logsumexp(logits, -1)
                logps[rows[live], step] = lp[live]
            done = live & torch.isin(tok, stop)
            stopped[rows[done]] = True
            rows = torch.where(done, -1, rows)
            n_live = int((rows >= 0).sum())
            if n_live == 0 or step == max_new_tokens - 1:
                break
            if cuda_graph:   # new inputs into the fixed buffers; finished rows decode throwaway tokens to the end
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
if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Inspect a preset or generate from a checkpoint directory.")
    ap.add_argument("--preset", default=None, help=f"print the parameter count of a preset: {', '.join(PRESETS)}")
    ap.add_argument("--path", default=None, help="HF-layout checkpoint directory to generate from")
    ap.add_argument("--prompt", default="A patient presents with", help="user message (chat template applied)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = ap.parse_args()
    if args.preset:
        m = Transformer(ModelConfig.from_name(args.preset))
        print(f"{args.preset}: {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters")
    if args.path:
        m, tok = load_model(args.path), load_tokenizer(args.path)
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        out, why = generate(m, [ids], args.max_new_tokens, args.temperature, stop_ids=[tok.eos_token_id], seed=args.seed)
        print(tok.decode(out[0]), f"[{why[0]}]")

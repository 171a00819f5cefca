"""
model.py: a Qwen2 / Qwen2.5 / Qwen3 (and plain Llama-style) decoder written directly in PyTorch, Hugging
Face checkpoint I/O, and KV-cached generation: the textbook path. The speed paths (fast.py) give the same
numbers.

    from hf_io import load_model, load_tokenizer
    from model import SamplingParams, generate
    model = load_model("runs/demo/sft")                 # any HF-layout Qwen2/Qwen3 directory
    tok = load_tokenizer("runs/demo/sft")
    ids = [tok.encode("The patient presents with"), tok.encode("Hi")]
    out, reasons = generate(model, ids, SamplingParams(32, temperature=0.0, stop_ids=(tok.eos_token_id,)))

    python model.py --preset tiny            # prints the parameter count of a preset

The decoder: token embedding, then blocks of [RMSNorm -> attention (grouped-query, RoPE; Qwen2: q/k/v
bias, Qwen3: RMSNorm on each head of q and k) -> residual, RMSNorm -> SwiGLU MLP -> residual], a final
RMSNorm and the lm_head (tied to the embedding or not, as config.json says). Weight names are the Hugging
Face ones except two fused projections, as vLLM has them: self_attn.qkv_proj = [q_proj; k_proj; v_proj]
and mlp.gate_up_proj = [gate_proj; up_proj] (one matmul instead of three, and of two); hf_io.load_model /
save_model split and join them, so the files on disk are the Hugging Face layout.
"""
import argparse
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config


@dataclass
class ModelConfig:   # to and from a transformers config.json: hf_io.config_from_hf / config_to_hf
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
        assert self.num_attention_heads % self.num_key_value_heads == 0, "heads: a multiple of kv heads"

    @classmethod
    def from_name(cls, name, **overrides):
        return cls(**{**PRESETS[name], **overrides})


# presets for from-scratch models (Qwen2 layout); real checkpoints bring their own config.json
PRESETS = {
    "nano": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
                  num_key_value_heads=2),
    "20m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
                num_key_value_heads=2, vocab_size=8192),
    # the shape of Qwen2.5-0.5B (random weights): GPU benchmarks at a real model's size without the hub
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6,
                         max_position_embeddings=32768),
}

# -----------------------------------------------------------------------------
# the decoder


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalised in fp32 like the reference, then cast back (matters in bf16); when x and the weight share
        # a dtype the fused op does that fp32 math itself, with no casts
        if x.dtype == self.weight.dtype:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """positions: (B, T) integer tensor -> cos, sin of shape (B, 1, T, head_dim). sin comes with its first
    half negated, so that apply_rope is two products and a roll, equal bit for bit to the usual x * cos +
    rotate_half(x) * sin."""
    even = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (even / head_dim))
    freqs = positions.float()[..., None] * inv_freq            # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]           # (B, 1, T, D)
    sin = emb.sin()
    sin = torch.cat([-sin[..., :head_dim // 2], sin[..., head_dim // 2:]], dim=-1)
    return emb.cos().to(dtype), sin.to(dtype)


def apply_rope(x, cos, sin):
    """x (B, heads, T, D) rotated by position; sin as rope_cos_sin returns it (first half negated)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def doc_attention_mask(doc_ids):
    """Packed rows: doc_ids (B, T) -> (B, 1, T, T) boolean, True where a token may attend (earlier tokens of
    its own document). Also the 4D attention_mask that transformers takes for the same rows."""
    T = doc_ids.shape[1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril())[:, None]


def doc_starts(doc_ids):
    """Packed rows: doc_ids (B, T) -> (B, T) bool, True where a document starts (a row's first token too)."""
    B = doc_ids.shape[0]
    first = torch.ones(B, 1, dtype=torch.bool, device=doc_ids.device)
    return torch.cat([first, doc_ids[:, 1:] != doc_ids[:, :-1]], 1)


def doc_positions(doc_ids):
    """Packed rows: doc_ids (B, T) -> position of each token within its document (B, T)."""
    B, T = doc_ids.shape
    starts = doc_starts(doc_ids)
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    return idx - torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), 1).values


class KVCache:
    """Static per-layer buffers (B, Hkv, max_len, D). A forward of T tokens writes their keys and values at
    slots length .. length + T - 1 and attends over slots 0 .. length + T - 1; valid says which slots hold
    a real token (left padding of ragged prompts leaves holes that must never be attended)."""

    def __init__(self, num_layers, batch, num_kv_heads, max_len, head_dim, device, dtype):
        self.k = torch.zeros(num_layers, batch, num_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0   # slots filled so far (the same for every row)

    def begin(self, T, pad_mask=None):
        """The attention mask of T new tokens (pad_mask (B, T): 0 where a token is padding): query i sees the
        valid keys up to its own slot, and a padding query sees itself (no empty rows, no NaN)."""
        s, dev = self.length, self.k.device
        self.valid[:, s:s + T] = True if pad_mask is None else pad_mask.bool()
        causal = torch.ones(T, s + T, dtype=torch.bool, device=dev).tril(diagonal=s)
        diag = torch.zeros(T, s + T, dtype=torch.bool, device=dev)
        diag[:, s:] = torch.eye(T, dtype=torch.bool, device=dev)
        return (self.valid[:, None, None, :s + T] & causal) | diag

    def update(self, layer, k, v):
        s, T = self.length, k.shape[2]
        self.k[layer, :, :, s:s + T] = k
        self.v[layer, :, :, s:s + T] = v
        return self.k[layer, :, :, :s + T], self.v[layer, :, :, :s + T]

    def end(self, T):
        self.length += T


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (H + 2 * Hkv) * D, bias=cfg.attention_bias)   # [q; k; v]
        self.o_proj = nn.Linear(H * D, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, layer_idx, cache):
        B, T, _ = x.shape
        H, Hkv, D = self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, D)   # heads: H of q, then Hkv of k, then Hkv of v
        if self.cfg.qk_norm:
            q, k = self.q_norm(qkv[:, :, :H]), self.k_norm(qkv[:, :, H:H + Hkv])
            qkv = torch.cat([q, k, qkv[:, :, H + Hkv:]], dim=2)
        qkv = qkv.transpose(1, 2)                                # (B, heads, T, D)
        qk = apply_rope(qkv[:, :H + Hkv], cos, sin)              # q and k rotated in one go
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        # fast.py's attention (per-document matmuls, flex_attention, ...): same numbers
        if hasattr(mask, "attend"):
            return self.o_proj(mask.attend(q, k, v))
        # an explicit boolean mask whenever the query is not square with the keys: is_causal=True would align
        # the triangle top-left, which is wrong once a KV cache makes keys longer than queries
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=H != Hkv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)   # [gate; up]
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

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

    def forward(self, x, cos, sin, mask, layer_idx, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, layer_idx, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Named as transformers' Qwen2Model, so that state-dict keys read model.layers.N...."""

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
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, seed=0):
        """GPT-2 style init, drawn per Hugging Face tensor (q, k, v, gate, up separately, in that order)."""
        g = torch.Generator().manual_seed(seed)
        hf = ours_to_hf(self.state_dict(), self.config)
        for name, p in hf.items():
            if name.endswith("norm.weight"):
                hf[name] = torch.ones(p.shape)
            elif name.endswith(".bias"):
                hf[name] = torch.zeros(p.shape)
            else:   # small normal, output projections scaled down by depth
                out_proj = name.endswith(("o_proj.weight", "down_proj.weight"))
                std = 0.02 / math.sqrt(2 * self.config.num_hidden_layers) if out_proj else 0.02
                hf[name] = torch.randn(p.shape, generator=g) * std
        with torch.no_grad():
            for name, t in hf_to_ours(hf, self.config).items():
                self.get_parameter(name).copy_(t)
        return self

    def forward(self, input_ids, position_ids=None, doc_ids=None, cache=None, attention_mask=None,
                last_only=False, logits_at=None, targets=None, chunk=0, want_entropy=False):
        """input_ids (B, T) -> logits (B, T, vocab). The attention mask:
        nothing given: causal.
        doc_ids (B, T): packed rows; attention stays within equal ids, positions restart per document.
        cache: incremental decoding (KVCache); attention_mask (B, T) of 1/0 then marks left padding.
        attention_mask (B, T) of 1/0 without a cache: left-padded prompts (pads are never attended).
        attention_mask (B, 1, T, S) bool: used as given, True where query t may attend key s.
        attention_mask with .attend(q, k, v): used as given (fast.py's attention for packed rows).
        last_only: logits of the last position only (generation needs no more).
        logits_at (B, T) bool, or flat indices into the B * T positions (repeats allowed): logits of those
        positions only, as (N, vocab): only completion / assistant tokens carry loss.
        targets (N,) with logits_at: instead of logits, (log p(target) (N,) fp32, entropy (N,) or None),
        computed chunk tokens at a time (token_logprobs): no (N, vocab) tensor is ever held."""
        B, T = input_ids.shape
        dev = input_ids.device
        mask = attention_mask
        if doc_ids is not None:
            mask = doc_attention_mask(doc_ids) if attention_mask is None else attention_mask
            position_ids = doc_positions(doc_ids) if position_ids is None else position_ids
        elif cache is not None:
            mask = cache.begin(T, attention_mask)
        elif attention_mask is not None and not hasattr(mask, "attend") and attention_mask.dim() == 2:
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
            x = layer(x, cos, sin, mask, i, cache)
        if cache is not None:
            cache.end(T)
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
    ~3 x 4 x N x vocab bytes: 15 GB for 16 completions x 512 tokens at Qwen's 151,936-token vocabulary. So
    rows go chunk at a time (default: LOGITS_BUDGET / vocab), each chunk under activation checkpointing:
    its logits are freed once its log-probs are out, and made again in backward. One chunk is the plain
    computation."""
    chunk = chunk or max(1, LOGITS_BUDGET // lm_head.weight.shape[0])

    def part(h, t):
        logp = lm_head(h).float().log_softmax(-1)
        ent = None
        if want_entropy:
            with torch.no_grad():
                ent = -(logp.exp() * logp).sum(-1)
        # nll_loss picks -logp[i, t_i] into a tensor of its own: FSDP2 warns when a module returns a view
        return -F.nll_loss(logp, t, reduction="none"), ent

    if h.shape[0] <= chunk:
        return part(h, targets)
    from torch.utils.checkpoint import checkpoint
    parts = [checkpoint(part, h[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
             for i in range(0, h.shape[0], chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]) if want_entropy else None


# -----------------------------------------------------------------------------
# our weight names and the Hugging Face ones (hf_io.py reads and writes the files)


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


# -----------------------------------------------------------------------------
# KV-cached generation


def _signed(c):
    return c - (1 << 64) if c >= 1 << 63 else c


def _signed32(c):
    return c - (1 << 32) if c >= 1 << 31 else c


_MASK = [(1 << (64 - k)) - 1 for k in range(64)]


def seed_of(*keys):
    """The one derivation of a sampling seed: its keys (a run's seed, a step, an item's index, a sample's
    index) folded as s * 1_000_003 + key, modulo 2**63. A sample's tokens depend on its keys alone, never on
    the batch, the rank or the order of arrival (row_keys)."""
    s = 0
    for k in keys:
        s = (s * 1_000_003 + k) % 2 ** 63
    return s


def prompt_seeds(seed, n_prompts):
    """Each prompt's seed: seed_of(seed, i) for an int seed, the i-th of a list, or fresh entropy for None
    (torch's global generator untouched)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") % 2**31
    return [seed_of(seed, i) for i in range(n_prompts)] if isinstance(seed, int) else list(seed)


def sample_seeds(seed, n_prompts, n_samples):
    """Each row's seed, prompt-major: sample j of prompt i gets seed_of(prompt i's seed, j)."""
    return [seed_of(s, j) for s in prompt_seeds(seed, n_prompts) for j in range(n_samples)]


def row_keys(row_seeds, step):
    """(B,) int32 keys, one per row and step: splitmix64 of (row seed, step), its top 32 bits. Why not
    torch.rand with one generator: there a row's draw depends on which other rows share the batch. Here it
    depends only on its own seed and step, so rollouts are the same whatever the batch, the number of ranks
    or the order of prompts, which GRPO's 1-rank == N-rank equivalence needs."""
    # step: one for every row, or a (B,) tensor (engine.py: each slot is at its own step)
    steps = step if torch.is_tensor(step) else torch.full_like(row_seeds, step)
    x = row_seeds * _signed(0x9E3779B97F4A7C15) + steps * _signed(0xD1B54A32D192ED03)
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = x ^ ((x >> shift) & _MASK[shift])
        x = x * _signed(mult)
    x = x ^ ((x >> 31) & _MASK[31])
    return (x >> 32).to(torch.int32)


def gumbel_noise(keys, V):
    """(B, V) fp32 Gumbel noise, entry (b, i) a function of keys[b] and token i only: murmur3's 32-bit finaliser
    of (key xor i * golden ratio), as a uniform in (0, 1) with 31 bits, then -log(-log(u)). int32 arithmetic
    wraps, as the hash wants (tests/test_model.py checks it against Python's integers)."""
    x = torch.arange(V, dtype=torch.int32, device=keys.device).mul_(_signed32(0x9E3779B9)) ^ keys[:, None]
    x ^= (x >> 16) & 0xFFFF
    x *= _signed32(0x85EBCA6B)
    x ^= (x >> 13) & 0x7FFFF
    x *= _signed32(0xC2B2AE35)
    x ^= (x >> 16) & 0xFFFF
    v = ((x >> 1) & 0x7FFFFFFF).float().add_(0.5).mul_(2.0 ** -31)   # 1 - u: exact near 0, where the top
    return v.neg_().log1p_().neg_().log_().neg_()                    # tail of the noise comes from


def sample_next(logits, temperature, top_k, top_p, row_seeds=None, step=0):
    """logits (B, V) fp32 -> next ids (B,). temperature 0 = greedy. Sampling is Gumbel-max with noise hashed
    from each row's key (row_keys, gumbel_noise): exactly a draw from softmax(logits / temperature) after
    top-k / top-p. A token changes only where the two best noisy logits are within float rounding of each
    other, so paths whose logits differ by rounding (batching, packing, ranks) sample the same tokens."""
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
    return logits.add_(gumbel_noise(row_keys(row_seeds, step), logits.shape[-1])).argmax(-1)


@dataclass(frozen=True)
class SamplingParams:
    """How a generate call samples (model.generate, engine.generate). max_new_tokens: one budget, or one per
    row (a scripted stop: bench/rollout.py). temperature 0: greedy. num_samples: completions per prompt.
    logprobs: also return each sampled token's log-probability (temperature 1, before top-k / top-p)."""
    max_new_tokens: object = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: tuple = ()
    num_samples: int = 1
    logprobs: bool = False

    def budgets(self, n):
        b = [self.max_new_tokens] * n if isinstance(self.max_new_tokens, int) else list(self.max_new_tokens)
        if len(b) != n or min(b, default=1) < 1:
            raise ValueError(f"generate: {n} rows need {n} budgets of at least 1 token, got {len(b)}")
        return b


@torch.no_grad()
def generate(model, prompts, sp, seed=None):
    """prompts: token-id lists (ragged) -> (completions, finish reasons[, log-probs]), one per prompt and
    sample, in the order prompt0-sample0, prompt0-sample1, ...; a completion ends with its stop token if it
    stopped ("stop"), else it is its budget long ("length"). The textbook loop: the prompts, G copies of each,
    left-padded into one batch; one forward over them fills the KV cache; then each step samples one token
    per row and feeds it back, until every row has stopped. engine.generate makes the same tokens with less
    work. seed: an int, one per prompt, or None (sample_seeds): a sample depends only on its own seed."""
    dev = next(model.parameters()).device
    # under autocast the cache is kept in autocast's dtype (attention reads it so)
    dtype = next(model.parameters()).dtype
    if torch.is_autocast_enabled(dev.type):
        dtype = torch.get_autocast_dtype(dev.type)
    cfg = model.config
    if not prompts:
        return ([], [], []) if sp.logprobs else ([], [])
    if min(map(len, prompts)) == 0:
        raise ValueError("generate: empty prompt")
    rows = [p for p in prompts for _ in range(sp.num_samples)]
    row_seeds = torch.tensor(sample_seeds(seed, len(prompts), sp.num_samples), device=dev)
    budget = torch.tensor(sp.budgets(len(rows)), device=dev)
    N, P, T = len(rows), max(map(len, rows)), int(budget.max())
    ids = torch.zeros(N, P, dtype=torch.long, device=dev)
    real = torch.zeros(N, P, dtype=torch.long, device=dev)   # 1 where a prompt token is, 0 on the left padding
    for i, p in enumerate(rows):
        ids[i, P - len(p):] = torch.tensor(p, device=dev)
        real[i, P - len(p):] = 1
    cache = KVCache(cfg.num_hidden_layers, N, cfg.num_key_value_heads, P + T, cfg.head_dim, dev, dtype)
    logits = model(ids, position_ids=(real.cumsum(1) - 1).clamp(min=0), cache=cache, attention_mask=real,
                   last_only=True)[:, -1].float()
    pos = real.sum(1)                                      # the next token's position in each row
    stop = torch.tensor(sorted(set(sp.stop_ids)) or [-1], device=dev)
    out, logps = torch.zeros(N, T, dtype=torch.long, device=dev), torch.zeros(N, T, device=dev)
    done, stopped = torch.zeros(N, dtype=torch.bool, device=dev), torch.zeros(N, dtype=torch.bool, device=dev)
    n = torch.zeros(N, dtype=torch.long, device=dev)      # tokens each row keeps
    for step in range(T):
        tok = sample_next(logits, sp.temperature, sp.top_k, sp.top_p, row_seeds, step)
        out[:, step] = tok
        logps[:, step] = logits.gather(1, tok[:, None])[:, 0] - torch.logsumexp(logits, -1)
        n += ~done                                         # a finished row keeps nothing more
        stopped |= ~done & torch.isin(tok, stop)
        done |= stopped | (n >= budget)
        if bool(done.all()):
            break
        logits = model(tok[:, None], position_ids=pos[:, None], cache=cache)[:, -1].float()
        pos = pos + 1
    completions = [out[i, :k].tolist() for i, k in enumerate(n.tolist())]
    reasons = ["stop" if s else "length" for s in stopped.tolist()]
    if sp.logprobs:
        return completions, reasons, [logps[i, :k].tolist() for i, k in enumerate(n.tolist())]
    return completions, reasons


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Print the parameter count of a preset (to generate from a "
                                 "checkpoint: python engine.py --path DIR).")
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model preset")
    name = ap.parse_args().preset
    n = sum(p.numel() for p in Transformer(ModelConfig.from_name(name)).parameters())
    print(f"{name}: {n / 1e6:.2f}M parameters")

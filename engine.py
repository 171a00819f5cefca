"""
engine.py: the rollout engine, apart from the model (model.py) as nanochat keeps engine.py apart from gpt.py.
Continuous batching over a fixed pool of decode slots: the GRPO rollouts, stage-2 mining, periodic evaluation
and evaluate.py all generate here; model.generate is the textbook loop it is tested equal to (--plain).

    from engine import generate
    from model import SamplingParams
    outs, reasons = generate(model, prompts, SamplingParams(256, num_samples=8), seed=0, slots=64)

    python engine.py --path runs/demo/seed0/sft --prompt "A patient presents with"   # one chat answer
    python bench/rollout.py            # against static batches, model.generate and transformers

A call is a queue of requests, (prompt i, sample j) in order, over S slots of one preallocated KV cache. Each
step samples one token in every live slot and decodes all S slots in one forward; a slot whose request stops
takes the next waiting request at once. Arrivals are prefilled together (in buckets of similar length, at
most PREFILL_TOKENS prompt tokens a forward), the G samples of a prompt share one prefill, and a new request
samples its first token from its prefill's logits, so that no slot idles through a step. The step keeps one
shape (S rows): on CUDA one CUDA graph replay (fixed_shape_step); eagerly it attends only up to the longest
live slot and drops finished slots once the queue is empty. Each completion depends only on its prompt, its
sample index and its seed (model.row_keys): the tokens of model.generate, whatever S, the order of arrival
or the number of ranks (tests/test_engine.py). Why contiguous slots and not a block table: EXPERIMENTS.md.
"""
import argparse
from collections import deque

import torch

import fast
from cli import at_least
from fast import WASTE, Fold, packed_linears, prefill_buckets
from model import KVCache, SamplingParams, sample_next, sample_seeds
from model import generate as model_generate

# prompt tokens one prefill forward takes at most (vLLM's max_num_batched_tokens): a call's first admission
# fills every slot at once, and 512 slots of 300-token prompts would be 150k tokens of activations at once
PREFILL_TOKENS = 32768
COMPACT_FRAC = 0.25   # eager, queue empty: finished slots leave the batch once they are this share of it


class SlotCache:
    """KV buffers (layers, S, Hkv, max_len, D), one contiguous row per slot: slot s holds its request's prompt
    and completion at 0 .. lens[s] - 1, and the token being decoded goes to lens[s] (also its position). An
    idle slot has lens 0: it decodes a throwaway token at 0, which the next prefill overwrites."""

    def __init__(self, cfg, slots, max_len, device, dtype, fixed):
        shape = (cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.lens = torch.zeros(slots, dtype=torch.long, device=device)
        self.fixed = fixed   # CUDA graph: nothing may depend on the host, so attend over all max_len
        self.span = max_len

    def begin(self, T, pad_mask=None):
        assert T == 1, "the slot cache decodes one token per slot"
        S, Hkv, M, D = self.k.shape[1:]
        if not self.fixed:   # eager: only as far as the longest slot (a host read per step)
            self.span = int(self.lens.max()) + 1
        self.at = self.lens.view(S, 1, 1, 1).expand(S, Hkv, 1, D)
        seen = torch.arange(self.span, device=self.lens.device) <= self.lens[:, None]   # this token included
        return Fold(seen[:, None, None, :])

    def update(self, layer, k, v):
        self.k[layer].scatter_(2, self.at, k.to(self.k.dtype))
        self.v[layer].scatter_(2, self.at, v.to(self.v.dtype))
        return self.k[layer, :, :, :self.span], self.v[layer, :, :, :self.span]

    def end(self, T):
        pass   # the engine advances lens of the live slots only

    def fill(self, slot, k, v):
        """A prompt's prefilled keys and values (layers, Hkv, P, D) into a slot."""
        P = k.shape[2]
        self.k[:, slot, :, :P], self.v[:, slot, :, :P] = k, v
        self.lens[slot] = P

    def keep(self, idx):
        self.k, self.v, self.lens = self.k[:, idx], self.v[:, idx], self.lens[idx]


def compute_dtype(model):
    """(device, dtype) of a generate call: the weights' dtype, or autocast's when it is on (the cache is
    stored in it, as attention reads it so; and the weights are packed for it)."""
    dev = next(model.parameters()).device
    if torch.is_autocast_enabled(dev.type):
        return dev, torch.get_autocast_dtype(dev.type)
    return dev, next(model.parameters()).dtype


def prefill(model, prompts, dtype):
    """The prompts' forward, in buckets of similar length (fast.prefill_buckets), each left-padded only to its
    own longest prompt. Yields (rows, Pc, cache (len(rows) x Pc slots), logits of each row's last prompt token
    (len(rows), vocab) fp32) per bucket."""
    dev, cfg = next(model.parameters()).device, model.config
    for rows, Pc in prefill_buckets([len(p) for p in prompts], WASTE):
        ids = torch.zeros(len(rows), Pc, dtype=torch.long)
        real = torch.zeros(len(rows), Pc, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, Pc - len(prompts[i]):] = torch.tensor(prompts[i])
            real[r, Pc - len(prompts[i]):] = 1
        ids, real = ids.to(dev), real.to(dev)
        part = KVCache(cfg.num_hidden_layers, len(rows), cfg.num_key_value_heads, Pc, cfg.head_dim, dev, dtype)
        logits = model(ids, position_ids=(real.cumsum(1) - 1).clamp(min=0), cache=part, attention_mask=real,
                       last_only=True)[:, -1].float()
        yield rows, Pc, part, logits


def fixed_shape_step(model, tok_in, pos_in, cache):
    """One decode step with fixed shapes, reading its inputs from tok_in / pos_in (N, 1) and the cache. On CUDA
    it is captured once as a CUDA graph and replayed: a small model's decode step is hundreds of kernel
    launches that each cost more host time than GPU time, and a replay launches them all at once. On CPU it
    just runs."""
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


def token_chunks(items, lengths, limit):
    """items in order, cut into runs of at most `limit` tokens (a longer item alone)."""
    chunks, n = [], limit + 1
    for it, ln in zip(items, lengths):
        if n + ln > limit:
            chunks.append([])
            n = 0
        chunks[-1].append(it)
        n += ln
    return chunks


class Engine:
    """One generate call's state: the queue of requests, the slots and what each decodes, the prompts whose
    prefill waits for a free slot, and each request's tokens. on_done(row) runs as each row finishes (a
    progress bar); stats counts decode passes and the rows they computed (bench/rollout.py)."""

    def __init__(self, model, prompts, sp, seed, slots, cuda_graph):
        self.model, self.prompts, self.sp, self.graph = model, prompts, sp, cuda_graph
        self.dev, self.dtype = compute_dtype(model)
        G, N = sp.num_samples, len(prompts) * sp.num_samples
        self.budget, self.seeds = sp.budgets(N), sample_seeds(seed, len(prompts), G)
        S = self.S = max(1, min(slots or N, N))
        ctx = max(map(len, prompts)) + max(self.budget)
        self.cache = SlotCache(model.config, S, ctx, self.dev, self.dtype, cuda_graph)
        self.queue, self.pending = deque(range(N)), {}   # pending: prompt -> [k, v, logits, samples to place]
        self.req = [-1] * S                               # the row each slot decodes, -1 when idle
        self.steps = torch.zeros(S, dtype=torch.long, device=self.dev)       # tokens each slot's row has
        self.row_seeds = torch.zeros(S, dtype=torch.long, device=self.dev)
        self.logits = torch.zeros(S, model.config.vocab_size, device=self.dev)
        self.outs, self.logps, self.reasons = [[] for _ in range(N)], [[] for _ in range(N)], ["length"] * N
        self.tok_in = torch.zeros(S, 1, dtype=torch.long, device=self.dev)
        self.graph_step, self.on_done, self.stats = None, None, None

    def admit(self, free):
        """The next requests into the free slots (their first tokens' logits in place); prompts not seen yet
        prefilled together. Returns the slots filled."""
        G = self.sp.num_samples
        new = [self.queue.popleft() for _ in range(min(len(free), len(self.queue)))]
        fresh = sorted({r // G for r in new} - set(self.pending))
        for some in token_chunks(fresh, [len(self.prompts[i]) for i in fresh], PREFILL_TOKENS):
            for rows, Pc, part, lg in prefill(self.model, [self.prompts[i] for i in some], self.dtype):
                for b, r in enumerate(rows):
                    n = len(self.prompts[some[r]])
                    self.pending[some[r]] = [part.k[:, b, :, Pc - n:], part.v[:, b, :, Pc - n:], lg[b], G]
        for s, r in zip(free, new):
            p = self.pending[r // G]
            self.cache.fill(s, p[0], p[1])
            self.logits[s], self.steps[s], self.row_seeds[s], self.req[s] = p[2], 0, self.seeds[r], r
            p[3] -= 1
            if p[3] == 0:
                del self.pending[r // G]
        return free[:len(new)]

    def sample(self, slots):
        idx = torch.tensor(slots, device=self.dev)
        sp = self.sp
        return sample_next(self.logits[idx], sp.temperature, sp.top_k, sp.top_p, self.row_seeds[idx],
                           self.steps[idx])

    def take(self, slots, tok):
        """Each of these slots' sampled token onto its row; returns the slots whose rows just finished (stop
        token or budget), now idle."""
        lg = self.logits[torch.tensor(slots, device=self.dev)]
        lp = None
        if self.sp.logprobs:
            lp = (lg.gather(1, tok[:, None])[:, 0] - torch.logsumexp(lg, -1)).tolist()
        done = []
        for i, (s, t) in enumerate(zip(slots, tok.tolist())):
            r = self.req[s]
            if r < 0:
                continue
            self.outs[r].append(t)
            if lp is not None:
                self.logps[r].append(lp[i])
            if t in self.sp.stop_ids or len(self.outs[r]) >= self.budget[r]:
                self.reasons[r] = "stop" if t in self.sp.stop_ids else "length"
                self.req[s] = -1
                done.append(s)
                if self.on_done:
                    self.on_done(r)
        return done

    def step(self):
        """Sample a token in every slot, refill the slots that finished (their first token sampled from their
        prefill at once), then decode. Returns False once every request is done."""
        every = list(range(len(self.req)))
        tok = self.sample(every)
        free = self.take(every, tok)
        while free and self.queue:
            new = self.admit(free)
            first = self.sample(new)
            tok[torch.tensor(new, device=self.dev)] = first
            free = free[len(new):] + self.take(new, first)
        if free:   # idle slots decode a throwaway token at position 0
            self.cache.lens[torch.tensor(free, device=self.dev)] = 0
        live = [s for s in every if self.req[s] >= 0]
        if not live:   # and the queue is empty
            return False
        if not self.queue and not self.graph and 1 - len(live) / len(self.req) >= COMPACT_FRAC:
            tok = self.compact(live, tok)
        self.decode(tok)
        return True

    def compact(self, live, tok):
        """The queue is empty: finished slots leave the batch (eager only; a CUDA graph keeps its shape)."""
        idx = torch.tensor(live, device=self.dev)
        self.cache.keep(idx)
        self.req = [self.req[s] for s in live]
        self.steps, self.row_seeds, self.logits = self.steps[idx], self.row_seeds[idx], self.logits[idx]
        self.tok_in = self.tok_in[:len(live)]
        return tok[idx]

    def decode(self, tok):
        """One forward of every slot: the next logits; the live slots' lengths and steps advance."""
        if self.stats is not None:
            self.stats["passes"] = self.stats.get("passes", 0) + 1
            self.stats["row_steps"] = self.stats.get("row_steps", 0) + len(self.req)
        self.tok_in.copy_(tok[:, None])
        if self.graph:
            if self.graph_step is None:   # positions are the slots' lens: the graph reads them in place
                self.graph_step = fixed_shape_step(self.model, self.tok_in, self.cache.lens[:, None],
                                                   self.cache)
            self.logits.copy_(self.graph_step())
        else:
            self.logits = self.model(self.tok_in, position_ids=self.cache.lens[:, None],
                                     cache=self.cache)[:, -1].float()
        on = torch.tensor([r >= 0 for r in self.req], device=self.dev)
        self.cache.lens += on
        self.steps += on


@torch.no_grad()
def generate(model, prompts, sp, seed=None, slots=None, cuda_graph=False, on_done=None, stats=None):
    """model.generate's results (completions, finish reasons[, log-probs]), one per prompt and sample in the
    order prompt0-sample0, prompt0-sample1, ..., with the requests decoded through `slots` slots (default: all
    rows at once). on_done(row): called as each row finishes. stats: decode passes and the slots they
    computed. With fast.ON False (--plain): model.generate itself."""
    if not fast.ON:
        return model_generate(model, prompts, sp, seed)
    if not prompts:   # a rank whose share of a call is empty
        return ([], [], []) if sp.logprobs else ([], [])
    if min(map(len, prompts)) == 0:
        raise ValueError("generate: empty prompt")
    eng = Engine(model, prompts, sp, seed, slots, cuda_graph)
    eng.on_done, eng.stats = on_done, stats
    with packed_linears(model, eng.S, eng.dtype):
        eng.admit(list(range(eng.S)))
        while eng.step():
            pass
    return (eng.outs, eng.reasons, eng.logps) if sp.logprobs else (eng.outs, eng.reasons)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Answer one chat prompt from an HF-layout checkpoint.")
    ap.add_argument("--path", required=True, help="checkpoint directory (ours or a real Qwen)")
    ap.add_argument("--prompt", default="A patient presents with", help="user message (chat template "
                    "applied)")
    ap.add_argument("--max-new-tokens", type=at_least(1), default=64, help="tokens to generate")
    ap.add_argument("--temperature", type=at_least(0, float), default=0.0, help="0 = greedy")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = ap.parse_args()
    from hf_io import load_model, load_tokenizer
    from mcq import chat_ids
    m, tok = load_model(args.path).eval(), load_tokenizer(args.path)
    ids = chat_ids(tok, [{"role": "user", "content": args.prompt}])
    stop = tuple(t for t in (tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id) if t is not None)
    out, why = generate(m, [ids], SamplingParams(args.max_new_tokens, args.temperature, stop_ids=stop),
                        seed=args.seed)
    print(tok.decode(out[0], skip_special_tokens=True), f"[{why[0]}]")

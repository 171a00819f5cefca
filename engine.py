"""
engine.py: the rollout engine. Continuous batching over a fixed pool of decode slots, apart from the model
(model.py) and from the static-batch generate it replaces (fast.generate), as nanochat keeps engine.py
apart from gpt.py. The GRPO rollouts, stage-2 mining, periodic evaluation and evaluate.py all generate here.

    from engine import generate        # fast.generate's arguments and results, plus slots=
    outs, reasons = generate(model, prompts, max_new_tokens=256, num_samples=8, seed=0, slots=64)

    python engine.py --path runs/demo/seed0/sft --prompt "A patient presents with"   # one chat answer
    python bench/rollout.py            # against fast.generate (eager and fixed-shape) and transformers

A call is a queue of requests, (prompt i, sample j) in order, and S slots over one preallocated KV cache.
Each step samples one token in every live slot and decodes all S slots in one forward; a slot whose
request stops (its stop token or its budget) takes the next waiting request at once: the prompts that
arrive in a step are prefilled together (fast.prefill: buckets of similar length; at most PREFILL_TOKENS
prompt tokens a forward, so that a call's first admission, every slot at once, is a bounded transient) and
copied into their slots, their first tokens sampled from the prefill's logits so that they decode in that
same step (no slot idles through a step), and the G samples of a prompt share that one prefill (its KV
stays pending until its last sample has a slot). So a call costs about (completion tokens / S) decode
passes instead of (rows / S) x its longest completion, and the cache is S x (longest prompt + budget), not
rows x that.

Why a contiguous cache per slot and not blocks (vLLM's PagedAttention, Nano-vLLM's block manager): blocks
let a request hold only the context it has, so the same bytes hold more slots; but attention over a block
table has no kernel in PyTorch. Written in plain ops (each block scored against its slot's query, the
softmax of a slot gathered over its blocks) and measured on a 2-core CPU at the same KV memory with twice
the rows a pass (EXPERIMENTS.md, 2026-12-07), it took 0.62-0.66x the decode passes and ran 1.14-1.18x
slower: its attention cost 1.8x the contiguous one's, more than the passes saved (on a GPU, where a pass
costs about the same at any row count, the balance may differ: not measured). Here every request of a
call fits one context (longest prompt + max_new_tokens), so a slot never overflows and needs no table.

The step keeps one shape (S rows): with cuda_graph=True it is one CUDA graph replay (fast.fixed_shape_step)
and attends over the whole slot length under a mask; eagerly (a CPU) it attends only up to the longest
live slot, and once the queue is empty it drops finished slots from the batch (compact_frac), as
fast.generate does. Each completion is a function of its prompt, its sample index and its seed only
(model.row_keys, one step counter per slot): the tokens of fast.generate and model.generate, whatever
S, the order of arrival or the number of ranks (tests/test_engine.py).
"""
import argparse
from collections import deque

import torch

import fast
from fast import Fold, compute_dtype, count_pass, fixed_shape_step, packed_linears, prefill, row_budgets
from model import generate as model_generate
from model import sample_next, sample_seeds


class SlotCache:
    """KV buffers (layers, S, Hkv, max_len, D), one contiguous row per slot: slot s holds its request's prompt
    and completion at 0 .. lens[s] - 1, and the token being decoded goes to lens[s] (also its position). An
    idle slot has lens 0: it decodes a throwaway token at 0, which the next prefill overwrites."""

    def __init__(self, num_layers, slots, num_kv_heads, max_len, head_dim, device, dtype, fixed):
        self.k = torch.zeros(num_layers, slots, num_kv_heads, max_len, head_dim, device=device, dtype=dtype)
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


# prompt tokens one prefill forward takes at most (vLLM's max_num_batched_tokens): a call's first admission
# fills every slot at once: 512 slots of 300-token prompts would be 150k tokens of activations in one forward
PREFILL_TOKENS = 32768


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


@torch.no_grad()
def generate(model, prompts, max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0, stop_ids=(),
             num_samples=1, seed=None, pad_id=0, slots=None, cuda_graph=False, return_logprobs=False,
             compact_frac=0.25, waste=fast.WASTE, on_done=None, stats=None, prefill_tokens=PREFILL_TOKENS):
    """fast.generate's arguments and results (completions, finish reasons[, log-probs]), one per prompt and
    sample in the order prompt0-sample0, prompt0-sample1, ..., with the requests decoded through `slots`
    slots (default: all rows at once). max_new_tokens: one budget, or one per row. on_done(row): called
    as each row finishes (a progress bar). stats: counts decode passes and the slots they computed.
    prefill_tokens: the most prompt tokens one prefill forward takes (a step's arrivals go in runs). With
    fast.ON False (--plain): model.generate, the textbook loop, same tokens."""
    if not fast.ON:
        return model_generate(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids,
                              num_samples, seed, pad_id, return_logprobs)
    if min(map(len, prompts), default=1) == 0:
        raise ValueError("generate: empty prompt")
    dev, dtype = compute_dtype(model)
    cfg = model.config
    G, N = num_samples, len(prompts) * num_samples
    budget = row_budgets(max_new_tokens, N)
    seeds = sample_seeds(seed, len(prompts), G)
    S = max(1, min(slots or N, N))
    cache = SlotCache(cfg.num_hidden_layers, S, cfg.num_key_value_heads, max(map(len, prompts)) + max(budget),
                      cfg.head_dim, dev, dtype, cuda_graph)
    queue = deque(range(N))
    pending = {}                        # prompt -> [keys, values, last logits, samples not yet in a slot]
    req = [-1] * S                      # the row each slot decodes, -1 when idle
    steps = torch.zeros(S, dtype=torch.long, device=dev)       # tokens each slot's row has so far
    row_seeds = torch.zeros(S, dtype=torch.long, device=dev)
    logits = torch.zeros(S, cfg.vocab_size, device=dev)
    outs, logps, reasons = [[] for _ in range(N)], [[] for _ in range(N)], ["length"] * N
    stop = set(stop_ids)
    tok_in = torch.zeros(S, 1, dtype=torch.long, device=dev)
    graph_step = None

    def admit(free):
        """The next requests into the free slots; prompts not seen yet prefilled together."""
        new = [queue.popleft() for _ in range(min(len(free), len(queue)))]
        fresh = sorted({r // G for r in new} - set(pending))
        for some in token_chunks(fresh, [len(prompts[i]) for i in fresh], prefill_tokens):
            for rows, Pc, part, lg in prefill(model, [prompts[i] for i in some], dtype, waste, pad_id):
                for b, r in enumerate(rows):
                    n = len(prompts[some[r]])
                    pending[some[r]] = [part.k[:, b, :, Pc - n:], part.v[:, b, :, Pc - n:], lg[b], G]
        for s, r in zip(free, new):
            p = pending[r // G]
            cache.fill(s, p[0], p[1])
            logits[s], steps[s], row_seeds[s], req[s] = p[2], 0, seeds[r], r
            p[3] -= 1
            if p[3] == 0:
                del pending[r // G]
        return free[:len(new)]

    def take(slots_, tok, lg):
        """Each of these slots' sampled token (tok, from logits lg) onto its row; returns the slots whose rows
        just finished (stop token or budget), now idle."""
        lp = (lg.gather(1, tok[:, None])[:, 0] - torch.logsumexp(lg, -1)).tolist() \
            if return_logprobs else None
        done = []
        for i, (s, t) in enumerate(zip(slots_, tok.tolist())):
            r = req[s]
            if r < 0:
                continue
            outs[r].append(t)
            if return_logprobs:
                logps[r].append(lp[i])
            if t in stop or len(outs[r]) >= budget[r]:
                reasons[r] = "stop" if t in stop else "length"
                req[s] = -1
                done.append(s)
                if on_done:
                    on_done(r)
        return done

    with packed_linears(model, S, dtype):
        admit(list(range(S)))
        while True:
            tok = sample_next(logits, temperature, top_k, top_p, row_seeds, steps)
            free = take(range(len(req)), tok, logits)
            # a finished slot takes the next request at once: its first token comes from its prefill's logits,
            # so the slot decodes that token in this very step instead of idling through it
            while free and queue:
                new = admit(free)
                idx = torch.tensor(new, device=dev)
                first = sample_next(logits[idx], temperature, top_k, top_p, row_seeds[idx], steps[idx])
                tok[idx] = first
                free = free[len(new):] + take(new, first, logits[idx])
            if free:   # idle slots decode a throwaway token at position 0
                cache.lens[torch.tensor(free, device=dev)] = 0
            live = [s for s in range(len(req)) if req[s] >= 0]
            if not live:   # and the queue is empty
                break
            # the queue is empty: finished slots leave the batch once they are compact_frac of it (eager only;
            # a CUDA graph keeps its shape)
            if not queue and not cuda_graph and 1 - len(live) / len(req) >= compact_frac:
                idx = torch.tensor(live, device=dev)
                cache.keep(idx)
                req, tok, steps, row_seeds, logits = ([req[s] for s in live], tok[idx], steps[idx],
                                                      row_seeds[idx], logits[idx])
                tok_in = tok_in[:len(live)]
            count_pass(stats, len(req))
            tok_in.copy_(tok[:, None])
            if cuda_graph:
                if graph_step is None:   # positions are the slots' lens: the graph reads them in place
                    graph_step = fixed_shape_step(model, tok_in, cache.lens[:, None], cache)
                logits.copy_(graph_step())
            else:
                logits = model(tok_in, position_ids=cache.lens[:, None], cache=cache)[:, -1].float()
            on = torch.tensor([r >= 0 for r in req], device=dev)
            cache.lens += on
            steps += on
    if return_logprobs:
        return outs, reasons, logps
    return outs, reasons


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Answer one chat prompt from an HF-layout checkpoint.")
    ap.add_argument("--path", required=True, help="checkpoint directory (ours or a real Qwen)")
    ap.add_argument("--prompt", default="A patient presents with", help="user message (chat template "
                    "applied)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = ap.parse_args()
    from hf_io import load_model, load_tokenizer
    m, tok = load_model(args.path).eval(), load_tokenizer(args.path)
    ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                  tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    stop = [t for t in (tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id) if t is not None]
    out, why = generate(m, [ids], args.max_new_tokens, args.temperature, seed=args.seed, stop_ids=stop)
    print(tok.decode(out[0], skip_special_tokens=True), f"[{why[0]}]")

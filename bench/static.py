"""
bench/static.py: the static-batch generate the rollout engine replaced, kept as the baseline bench/rollout.py
measures the engine against (eager, and fixed-shape as a CUDA graph would run it). Not used by the product.

    import static
    outs, reasons = static.generate(model, prompts, SamplingParams(128, num_samples=8), seed=0)

One static batch: every row starts together and the call lasts as long as its longest row. Prompts are
prefilled once in buckets of similar length (engine.prefill) and their caches copied G ways; finished rows
are dropped once they are COMPACT_FRAC of the batch (eager); cuda_graph=True decodes with fixed shapes
(attention over the whole cache, finished rows kept). The same tokens as model.generate and the engine
(tests/test_engine.py).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine import COMPACT_FRAC, compute_dtype, fixed_shape_step, prefill  # noqa: E402
from fast import Fold, packed_linears  # noqa: E402
from model import KVCache, sample_next, sample_seeds  # noqa: E402


class StaticCache(KVCache):
    """model.KVCache with rows selected (G copies of a prefilled prompt; finished rows dropped), Fold for
    decode steps, and with fixed=True the fixed-shape form: `slot`, a (1,) device tensor, names the slot the
    next token goes to, and attention runs over every slot (valid masks the unfilled ones)."""

    def __init__(self, *a, fixed=False):
        super().__init__(*a)
        self.fixed, self.slot = fixed, torch.zeros(1, dtype=torch.long, device=self.k.device)

    def begin(self, T, pad_mask=None):
        if not self.fixed:
            mask = super().begin(T, pad_mask)
            return Fold(mask) if T == 1 else mask
        self.valid.index_fill_(1, self.slot, True)
        return Fold(self.valid[:, None, None, :])

    def update(self, layer, k, v):
        if not self.fixed:
            return super().update(layer, k, v)
        self.k[layer].index_copy_(2, self.slot, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, self.slot, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]

    def end(self, T):
        if not self.fixed:
            super().end(T)

    def select_rows(self, idx):
        self.k, self.v, self.valid = self.k[:, idx], self.v[:, idx], self.valid[idx]


@torch.no_grad()
def generate(model, prompts, sp, seed=None, cuda_graph=False, stats=None):
    """model.generate's results for one static batch; stats counts decode passes and the rows they computed."""
    dev, dtype = compute_dtype(model)
    cfg, B, G = model.config, len(prompts), sp.num_samples
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    budget = torch.tensor(sp.budgets(B * G), device=dev)
    T, P, N = int(budget.max()), int(lens.max()), B * G
    row_seeds = torch.tensor(sample_seeds(seed, B, G), dtype=torch.long, device=dev)
    cache = StaticCache(cfg.num_hidden_layers, B, cfg.num_key_value_heads, P + T, cfg.head_dim, dev, dtype,
                        fixed=cuda_graph)
    with packed_linears(model, N, dtype):
        logits = torch.empty(B, cfg.vocab_size, device=dev)
        for rows_, Pc, part, lg in prefill(model, prompts, dtype):   # into the right end of the cache
            r = torch.tensor(rows_, device=dev)
            logits[r] = lg
            cache.k[:, r, :, P - Pc:P], cache.v[:, r, :, P - Pc:P] = part.k, part.v
            cache.valid[r, P - Pc:P] = part.valid
        cache.length = P
        rep = torch.arange(B, device=dev).repeat_interleave(G)   # prefill once, then G copies of each prompt
        cache.select_rows(rep)
        logits, next_pos = logits[rep], lens[rep]
        out = torch.full((N, T), -1, dtype=torch.long, device=dev)   # -1 = not generated
        logps, stopped = torch.zeros(N, T, device=dev), torch.zeros(N, dtype=torch.bool, device=dev)
        rows = torch.arange(N, device=dev)   # output row of each batch row; -1 once finished (until dropped)
        stop = torch.tensor(sorted(set(sp.stop_ids)) or [-1], device=dev)
        tok_in, pos_in = torch.zeros(N, 1, dtype=torch.long, device=dev), next_pos[:, None].clone()
        fixed_step = None
        for step in range(T):
            tok = sample_next(logits, sp.temperature, sp.top_k, sp.top_p, row_seeds, step)
            live = rows >= 0
            out[rows[live], step] = tok[live]
            lp = logits.gather(1, tok[:, None])[:, 0] - torch.logsumexp(logits, -1)
            logps[rows[live], step] = lp[live]
            hit = live & torch.isin(tok, stop)
            stopped[rows[hit]] = True
            rows = torch.where(hit | (live & (budget[rows.clamp(min=0)] <= step + 1)), -1, rows)
            n_live = int((rows >= 0).sum())
            if n_live == 0:
                break
            if stats is not None:
                stats["passes"] = stats.get("passes", 0) + 1
                stats["row_steps"] = stats.get("row_steps", 0) + len(rows)
            if cuda_graph:   # new inputs into the fixed buffers; finished rows decode throwaway tokens
                tok_in.copy_(tok[:, None])
                pos_in.copy_(next_pos[:, None])
                cache.slot.fill_(P + step)
                fixed_step = fixed_step or fixed_shape_step(model, tok_in, pos_in, cache)
                logits = fixed_step()
            else:
                if 1 - n_live / len(rows) >= COMPACT_FRAC:   # drop finished rows in one gather
                    keep = (rows >= 0).nonzero().flatten()
                    cache.select_rows(keep)
                    rows, tok, next_pos, row_seeds = rows[keep], tok[keep], next_pos[keep], row_seeds[keep]
                logits = model(tok[:, None], position_ids=next_pos[:, None], cache=cache)[:, -1].float()
            next_pos = next_pos + 1
    completions = [[t for t in row if t != -1] for row in out.tolist()]
    reasons = ["stop" if s else "length" for s in stopped.tolist()]
    if sp.logprobs:
        return completions, reasons, [lp[:len(c)] for lp, c in zip(logps.tolist(), completions)]
    return completions, reasons

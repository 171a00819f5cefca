"""
train_grpo.py: two-stage RLVR with GRPO (paper 3.3). Rollouts from the current policy through the rollout
engine (engine.py: continuous batching over the plan's decode slots), reward = answer correctness + format
(never length), advantage = reward minus the group mean, stage 1 on Easy + Moderate items, stage 2 once
rewards go sparse: hard-sample mining over the whole training set, more rollouts per question, mining
repeated every M steps.

    python train_grpo.py --init runs/demo/sft --out runs/demo/grpo           # embedded default (CPU)
    torchrun --nproc_per_node=2 train_grpo.py --init runs/demo/sft            # 2 CPU ranks, FSDP2 + gloo
    torchrun --nproc_per_node=8 train_grpo.py --init runs/7b-sft --data data/full/rl_train.jsonl --bf16 \
        --questions-per-step 64 --group-size 8 --stage2-group-size 16 --max-new-tokens 2048 --lr 1e-6

Eq. (1)-(3) of the paper: L = -E[1/k sum_i log pi(y_i|x) A_i], A_i = r_i - mean_j r_j. By default the
log-likelihood is normalised per token over the batch (--loss-agg token-mean); seq-sum is eq. (1) literally.
"""
import math
import os
import random
import time
from collections import deque

import torch

from cli import Parser, at_least, between, fraction, guard
from common import (MetricsLog, add_run_flags, all_reduce_max, all_reduce_sum, autocast, check_bf16,
                    even_micro_batches, gather_objects, init_distributed, lr_at, need,
                    prepare_out, print0, set_seed, wants_autocast)
from mcq import build_messages, extract_answer, format_ok, prompt_ids, read_records
from fsdp import (checkpoint_blocks, empty_model, export_hf, latest_checkpoint, load_checkpoint, load_sharded,
                  save_checkpoint)
from memplan import Meter, announce, capacity, fit_slots, plan, size, slot_bytes, verdict
import fast
import tp
from engine import PREFILL_TOKENS
from hf_io import has_tokenizer, load_tokenizer, read_config
from report import finish_run
from watch import Canaries, RolloutLog, Wandb, answer_signals, merge_signals

# -----------------------------------------------------------------------------
# reward: correctness + format, nothing else


def reward_parts(text, item, finish_reason, require_think=False, require_option=False):
    """(correct, format) in {0, 1}. Strict, shared with evaluate.py: one well-formed <answer> tag holding one
    option (several tags, several letters, an empty tag or an ambiguous option text give 0). A truncated
    completion gets no correctness reward: it never finished its answer. require_option: the format reward
    also needs the tag to name one of the options (a wrong option still earns it; an entity that is not an
    option does not)."""
    fmt = format_ok(text, require_think)
    if finish_reason != "stop":
        return 0.0, 0.0
    tags = text.lower().count("<answer>")
    picked = extract_answer(text, item["options"]) if tags == 1 else None
    if require_option and picked is None:
        fmt = False
    return float(picked == item["answer"]), float(fmt)


def group_advantages(rewards, group_size, std_scale=False):
    """rewards (N,) in groups of group_size consecutive samples -> A = r - group mean (the paper);
    std_scale divides by the group std as in the original GRPO."""
    r = rewards.view(-1, group_size)
    a = r - r.mean(1, keepdim=True)
    if std_scale:
        a = a / (r.std(1, keepdim=True) + 1e-4)
    return a.reshape(-1)


# -----------------------------------------------------------------------------
# the loss


def token_objective(logp, old_logp, adv, clip_low, clip_high, use_clip):
    """Per-token policy-gradient term to minimise. Without clipping, -A * log pi (the gradient of eq. 1):
    on-policy with one update per batch the PPO ratio is exactly 1, so clipping could never act.
    With several updates per rollout batch (--ppo-epochs > 1) the ratio drifts and the clipped surrogate
    -min(rho A, clip(rho, 1-low, 1+high) A) keeps each update near the policy that sampled the data."""
    a = adv[:, None]
    if not use_clip:
        return -a * logp
    ratio = torch.exp(logp - old_logp)
    return -torch.minimum(ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a)


def kl_k3(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token, mask, mode, denom):
    """Sum of per-token terms, normalised as `mode` says, divided by `denom` (the global normaliser, so that
    ranks and micro-batches add up to the same loss as one big batch):
      token-mean: sum over all tokens / total tokens                        (denom = global token count)
      seq-mean:   sum over sequences of (token sum / its length) / N seqs  (original GRPO; denom = N)
      seq-sum:    sum over sequences of token sums / N seqs                 (eq. 1 literally; denom = N)
      token-sum:  sum over all tokens / (N seqs * constant)        (Dr. GRPO; denom = N * max_new_tokens)"""
    masked = per_token * mask
    if mode == "seq-mean":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / denom
    return masked.sum() / denom


def grpo_denominator(mode, n_tokens, n_seqs, const):
    return {"token-mean": n_tokens, "seq-mean": n_seqs, "seq-sum": n_seqs, "token-sum": n_seqs * const}[mode]


def completion_logprobs(model, prompts, outs, device, pad_id, want_entropy=False, chunk=0):
    """log pi(y_t | x, y_<t) of each completion token: prompts[i] + outs[i] -> (log-probs (N, Lc), mask (N,
    Lc), entropy or None). One right-padded row per completion, causal attention; log-probs only where a
    completion token is predicted (the prompt carries no loss). fast.completion_logprobs gives the same
    with less work."""
    L = max(len(p) + len(o) for p, o in zip(prompts, outs))
    ids = torch.full((len(outs), L), pad_id, dtype=torch.long)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        ids[i, :len(p) + len(o)] = torch.tensor(p + o)
    # token j of completion i is predicted at position len(prompt) - 1 + j of its row
    at = torch.tensor([i * L + len(p) - 1 + j for i, (p, o) in enumerate(zip(prompts, outs))
                       for j in range(len(o))])
    tgt = torch.tensor([t for o in outs for t in o])
    lp, ent = model(ids.to(device), logits_at=at.to(device), targets=tgt.to(device), chunk=chunk,
                    want_entropy=want_entropy)
    lens = torch.tensor([len(o) for o in outs])
    mask = (torch.arange(int(lens.max()))[None] < lens[:, None]).to(device)
    out = torch.zeros(mask.shape, device=device, dtype=lp.dtype).masked_scatter(mask, lp)
    ent = torch.zeros(mask.shape, device=device).masked_scatter(mask, ent) if want_entropy else None
    return out, mask.float(), ent


# -----------------------------------------------------------------------------
# curriculum: stage switch on reward sparsity, hard-sample mining


class Curriculum:
    def __init__(self, items, stage1_tiers, threshold, window, stage2_at, mix_right, hard_below, seed):
        self.items = items
        self.stage = 1
        self.pool = [i for i, it in enumerate(items) if it.get("difficulty", "Moderate") in stage1_tiers]
        self.pool = self.pool or list(range(len(items)))
        self.threshold, self.window, self.stage2_at = threshold, window, stage2_at
        self.mix_right, self.hard_below, self.seed = mix_right, hard_below, seed
        self.sparsity = deque(maxlen=window)

    def observe(self, zero_var_frac, step):
        """Record a step's zero-variance-group fraction; True when stage 1 should end now."""
        self.sparsity.append(zero_var_frac)
        if self.stage != 1:
            return False
        if self.stage2_at is not None and step >= self.stage2_at:
            return True
        return len(self.sparsity) == self.window and sum(self.sparsity) / self.window >= self.threshold

    def mine(self, pass_rates, step):
        """pass_rates: {item index: fraction of k samples correct} over the full set. The new pool: items it
        repeatedly fails (pass rate < hard_below) and unsolved Difficult ones, plus solved items so that they
        are mix_right of the pool (keeps what was learned)."""
        rng = random.Random(self.seed * 7919 + step)
        hard = [i for i, p in pass_rates.items()
                if p < self.hard_below or (self.items[i].get("difficulty") == "Difficult" and p < 1.0)]
        right = [i for i, p in pass_rates.items() if i not in set(hard)]
        n_right = int(round(len(hard) * self.mix_right / max(1e-9, 1 - self.mix_right)))
        pool = sorted(hard) + sorted(rng.sample(right, min(n_right, len(right))))
        self.stage = 2
        self.pool = pool or sorted(pass_rates)
        return dict(hard=len(hard), right_mixed=min(n_right, len(right)), pool=len(self.pool))

    def state(self):
        return dict(stage=self.stage, pool=self.pool, sparsity=list(self.sparsity))

    def load(self, st):
        self.stage, self.pool = st["stage"], st["pool"]
        self.sparsity.extend(st["sparsity"])


# -----------------------------------------------------------------------------


def get_args(argv=None):
    ap = Parser(description=__doc__)
    # --- the paper's recipe
    ap.add_argument("--init", default="runs/sft", help="policy checkpoint (HF layout), "
                    "usually train_sft.py's output")
    ap.add_argument("--data", default="data/kg/rl_train.jsonl", help="RL items from make_data.py "
                    "(with difficulty)")
    ap.add_argument("--exclude", default=None, help="JSONL whose ids are left out "
                    "of --data (e.g. the SFT file)")
    ap.add_argument("--val-size", type=at_least(0), default=128, help="items held out of --data for "
                    "periodic evaluation")
    ap.add_argument("--questions-per-step", type=at_least(1), default=8, help="questions per step (global)")
    ap.add_argument("--group-size", type=at_least(2), default=8, help="k: completions per question "
                    "in stage 1")
    ap.add_argument("--stage2-group-size", type=at_least(2), default=12, help="k in stage 2 (more rollouts, "
                    "broader exploration)")
    ap.add_argument("--max-new-tokens", type=at_least(1), default=96, help="completion budget (longer "
                    "is truncated: no reward)")
    ap.add_argument("--temperature", type=at_least(0, float), default=1.0, help="rollout sampling "
                    "temperature")
    ap.add_argument("--top-p", type=between(0.01, 1), default=1.0, help="rollout nucleus sampling")
    ap.add_argument("--w-correct", type=float, default=1.0, help="reward for the right final answer")
    ap.add_argument("--w-format", type=float, default=0.1, help="reward for the required format "
                    "(no length term, by design)")
    ap.add_argument("--kl-beta", type=at_least(0, float), default=0.0, help="KL(pi||ref) weight; the "
                    "reference is loaded only if > 0")
    ap.add_argument("--steps", type=at_least(0), default=60, help="optimizer steps (both stages)")
    ap.add_argument("--lr", type=at_least(0, float), default=2e-4, help="learning rate after warmup")
    ap.add_argument("--min-lr", type=at_least(0, float), default=None, help="cosine decay to this by the "
                    "last step (default: none, --lr throughout)")
    ap.add_argument("--warmup", type=at_least(0), default=5, help="linear warmup steps")
    ap.add_argument("--clip", type=at_least(0, float), default=1.0, help="gradient norm clip")
    ap.add_argument("--stage1-tiers", default="Easy,Moderate", help="tiers in the stage 1 pool")
    ap.add_argument("--sparsity-threshold", type=between(0, 1), default=0.5, help="stage 2 when the "
                    "zero-variance-group fraction averages at least this over --sparsity-window steps")
    ap.add_argument("--sparsity-window", type=at_least(1), default=8, help="steps in that average")
    ap.add_argument("--stage2-at", type=at_least(1), default=None, help="or switch at this step regardless")
    ap.add_argument("--mine-every", type=at_least(1), default=20, help="re-mine the stage 2 pool "
                    "every M steps (not in the last M steps: a pool that would serve fewer steps is not "
                    "worth mining)")
    ap.add_argument("--mine-samples", type=at_least(1), default=4, help="samples per item when mining")
    ap.add_argument("--hard-below", type=between(0, 1), default=0.5, help="mined as hard if its pass "
                    "rate is below this")
    ap.add_argument("--mix-right", type=fraction, default=0.25, help="share of already-solved items "
                    "in the stage 2 pool")
    # --- ablations: not the paper's recipe, to measure what it leaves out
    ap.add_argument("--loss-agg", default="token-mean",
                    choices=["token-mean", "seq-mean", "seq-sum", "token-sum"],
                    help="ablation: "
                    "the normalisation (see aggregate(); seq-sum is eq. 1 literally)")
    ap.add_argument("--adv-std", action="store_true", help="ablation: divide advantages by "
                    "the group std (classic GRPO)")
    ap.add_argument("--ppo-epochs", type=at_least(1), default=1, help="ablation: updates per rollout batch "
                    "(> 1 turns on ratio clipping)")
    ap.add_argument("--clip-low", type=between(0, 1), default=0.2, help="ablation: PPO clip, 1 - low")
    ap.add_argument("--clip-high", type=at_least(0, float), default=0.28, help="ablation: PPO clip, 1 + high")
    ap.add_argument("--require-think", action="store_true", help="ablation: format also needs a "
                    "leading <think>...</think>")
    ap.add_argument("--require-option", action="store_true", help="ablation: format also needs "
                    "the answer to name one of the options (so an answer outside the options earns less "
                    "than a wrong option)")
    ap.add_argument("--skip-zero-var", action="store_true", help="leave all-equal groups out of the update "
                    "(they carry no gradient: A = 0; saves their forward and backward)")
    ap.add_argument("--mine-max", type=at_least(0), default=0, help="mine over at most N items "
                    "(0 = the full set)")
    # --- memory and speed (the same results)
    ap.add_argument("--bf16", action="store_true", help="bf16 compute (autocast on CPU and on one GPU; FSDP "
                    "mixed precision on several GPUs)")
    ap.add_argument("--micro-batch", type=at_least(1), default=32, help="sequences per forward/backward")
    ap.add_argument("--act-ckpt", action="store_true", help="activation checkpointing per block when "
                    "scoring (saves memory at long completions)")
    ap.add_argument("--logits-chunk", type=at_least(0), default=0, help="tokens whose vocabulary "
                    "logits exist at once when scoring (0: 2**26 / vocab, i.e. 256 MB of fp32 logits; "
                    "smaller saves memory)")
    ap.add_argument("--share-prompt", type=at_least(1), default=1, help="completions of one prompt "
                    "scored in one row behind a single copy of it (same log-probs, ~2x less work for short "
                    "answers to long prompts)")
    ap.add_argument("--gen-slots", type=at_least(0), default=0, help="rollout engine decode slots per rank "
                    "(rows decoding at once; their KV cache is slots x (prompt + --max-new-tokens)); 0: as "
                    "many as the memory plan has room for, up to the most requests a call has (at most 512)")
    ap.add_argument("--rollout", default="engine", choices=["engine", "static"], help="engine: one queue "
                    "through --gen-slots slots (engine.py); static: fast.generate's one batch a call, "
                    "--gen-slots rows at a time (the same tokens; bench/grpo.py times the two)")
    ap.add_argument("--rollout-tp", type=at_least(0), default=1, help="tensor-parallel rollouts: groups of N "
                    "ranks each hold 1/N of the policy, built from the FSDP shards, and decode their ranks' "
                    "requests together (tp.py); 1: every rank gathers the whole policy; 0: the smallest N the "
                    "memory plan fits")
    ap.add_argument("--cuda-graph", action="store_true", help="one GPU, or --rollout-tp > 1: each decode step "
                    "of the rollouts and evals one CUDA graph replay (bench/generate.py); ignored on CPU and "
                    "where FSDP gathers the whole policy")
    # --- what the policy writes, and warnings (watch.py)
    ap.add_argument("--log-groups", type=at_least(0), default=8, help="groups per step kept in "
                    "rollouts.jsonl")
    ap.add_argument("--print-every", type=at_least(0), default=10, help="print one group every N "
                    "steps (0: never)")
    ap.add_argument("--warn-truncation", type=between(0, 1), default=0.2, help="warn when this share of "
                    "completions hits --max-new-tokens")
    ap.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to Weights & Biases "
                    "(WANDB_MODE=offline works without a network)")
    # --- run
    add_run_flags(ap, "runs/grpo", 20, 20, "held-out accuracy every N steps")
    ap.add_argument("--seed", type=int, default=0, help="seed for data order and sampling")
    return ap.parse_args(argv)


# -----------------------------------------------------------------------------
# one GRPO step, in the paper's order: questions -> rollouts -> rewards -> group advantages -> loss -> update


def pick_questions(cur, args, step):
    """The step's questions: a function of (seed, step, pool), so resume and world size change nothing."""
    qrng = random.Random(args.seed * 100003 + step)
    picked = qrng.sample(range(len(cur.pool)), min(args.questions_per_step, len(cur.pool)))
    return [cur.pool[j] for j in picked]


def sample_groups(model, tok, items, G, args, seeds, device, logprobs=False):
    """G completions per item -> dict of prompts (token lists), outs (token lists), texts, reasons, and the
    rollout's own log-prob of each token (logprobs=True). seeds: one per item, so a completion depends
    only on its item and step, never on the batch or the rank."""
    prompts = [prompt_ids(tok, it) for it in items]
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
              stop_ids=[tok.convert_tokens_to_ids("<|im_end|>")], num_samples=G, pad_id=tok.pad_token_id or 0,
              cuda_graph=args.use_graph, return_logprobs=logprobs)
    stats = {}   # decode passes and the rows they computed (slot use)
    # the whole policy gathered, or this rank's tensor-parallel shard of it (--rollout-tp)
    with torch.no_grad(), autocast(device, args.autocast), tp.policy(model, args.tp_group, args.tp_dtype) as m:
        if args.rollout == "engine":   # model.generate's tokens, less work (--plain: that one)
            res = tp.generate(m, prompts, group=args.tp_group, seed=seeds, slots=args.gen_slots, stats=stats,
                              **kw)
        else:   # the static batches the engine replaced, --gen-slots rows a call: the same tokens
            k, res = max(1, args.gen_slots // G), [[], [], []]
            for i in range(0, len(prompts), k):
                part = fast.generate(m, prompts[i:i + k], seed=seeds[i:i + k], stats=stats, **kw)
                for whole, rows in zip(res, part):
                    whole += rows
    outs, reasons = res[0], res[1]
    return dict(prompts=prompts, outs=outs, reasons=reasons, logps=res[2] if logprobs else None,
                texts=[tok.decode(o, skip_special_tokens=True) for o in outs], pad=tok.pad_token_id or 0,
                # every rank of a tensor-parallel group counted the group's passes: its share of them
                row_steps=stats.get("row_steps", 0) / (args.tp_group.n if args.tp_group else 1))


def score_groups(g, items, G, args):
    """Reward parts of each completion (correct, format, reward), rewards (N,), advantages A = r - group mean
    (eq. 2), and which groups are all-equal (A = 0 everywhere: no signal)."""
    parts = [reward_parts(t, items[j // G], r, args.require_think, args.require_option)
             for j, (t, r) in enumerate(zip(g["texts"], g["reasons"]))]
    parts = [(c, f, args.w_correct * c + args.w_format * f) for c, f in parts]
    correct, fmt = torch.tensor([c for c, _, _ in parts]), torch.tensor([f for _, f, _ in parts])
    rewards = args.w_correct * correct + args.w_format * fmt
    zero_var = (rewards.view(-1, G).std(1) == 0).float()
    return parts, rewards, group_advantages(rewards, G, args.adv_std), zero_var


def policy_update(model, ref, opt, g, adv, keep, args, lr, world, device, meter):
    """The GRPO loss over this rank's kept completions (eq. 1-3), one optimizer step per --ppo-epochs. Returns
    the step's statistics (sums over this rank; the caller adds the ranks up)."""
    pr, pad = g["prompts_of"], g["pad"]
    n_seq = all_reduce_sum(len(keep))
    n_tok = all_reduce_sum(sum(len(g["outs"][j]) for j in keep))
    denom = grpo_denominator(args.loss_agg, n_tok, n_seq, args.max_new_tokens)
    micro = even_micro_batches(keep, args.micro_batch)
    stats = dict(loss=0.0, kl=0.0, entropy=0.0, mismatch=0.0, grad_norm=0.0, skipped=n_seq == 0)
    # every group all-equal and skipped, on all ranks: the 0/0 normaliser would put NaN in
    if stats["skipped"]:
        return stats       # every weight, and there is nothing to learn

    # fast.completion_logprobs: the same log-probs, less work (--share-prompt)
    def score(m, mb, entropy=False):
        p, o = [pr[j] for j in mb], [g["outs"][j] for j in mb]
        if fast.ON:
            return fast.completion_logprobs(m, p, o, device, pad, args.share_prompt, entropy,
                                            args.logits_chunk)
        return completion_logprobs(m, p, o, device, pad, entropy, args.logits_chunk)

    t = time.time()
    old, refl = [], []   # the reference's log-probs (KL), and the sampling policy's (--ppo-epochs > 1)
    if ref is not None or args.ppo_epochs > 1:
        with meter.phase("reference"), torch.no_grad(), autocast(device, args.autocast):
            for mb, _ in micro:
                if ref is not None:
                    refl.append(score(ref, mb)[0])
                if args.ppo_epochs > 1:
                    old.append(score(model, mb)[0])
    stats["ref_s"] = time.time() - t
    for group in opt.param_groups:
        group["lr"] = lr
    with meter.phase("train"):
        for epoch in range(args.ppo_epochs):
            for mi, (mb, weight) in enumerate(micro):
                with autocast(device, args.autocast):
                    logp, mask, ent = score(model, mb, entropy=epoch == 0)   # log pi(y_t | x, y_<t), (n, L)
                # the loss, per token: -A * log pi (eq. 1 with A = r - mean r, eq. 2), or PPO's clipped ratio
                # when the data is reused (--ppo-epochs > 1), plus beta * KL(pi || ref) (k3, eq. 3);
                # normalised over all tokens of all ranks (token-mean). FSDP averages gradients over ranks,
                # hence * world; an empty padding micro-batch (even_micro_batches) weighs 0
                per_tok = token_objective(logp, old[mi] if old else logp.detach(), adv[mb].to(device),
                                          args.clip_low, args.clip_high, args.ppo_epochs > 1)
                if ref is not None:
                    kl = kl_k3(logp, refl[mi])
                    per_tok = per_tok + args.kl_beta * kl
                    stats["kl"] += weight * float((kl.detach() * mask).sum()) / max(n_tok, 1) * (epoch == 0)
                loss = aggregate(per_tok, mask, args.loss_agg, denom) * world * weight
                loss.backward()
                stats["loss"] += float(loss.detach()) / world
                if epoch == 0:
                    stats["entropy"] += weight * float((ent * mask).sum()) / max(n_tok, 1)
                    if g["logps"] is not None:   # trainer vs rollout: the same model, two code paths
                        roll = torch.zeros_like(logp)
                        for r, j in enumerate(mb):
                            roll[r, :len(g["logps"][j])] = torch.tensor(g["logps"][j])
                        diff = float(((logp.detach() - roll).abs() * mask).sum())
                        stats["mismatch"] += weight * diff / max(n_tok, 1)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            stats["grad_norm"] = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
            # the same on every rank: stepping would corrupt the weights
            if not math.isfinite(stats["grad_norm"]):
                print0("\nnon-finite gradient norm, update skipped")
                opt.zero_grad(set_to_none=True)
                stats["skipped"] = True
                break
            opt.step()
            opt.zero_grad(set_to_none=True)
    return stats


def pass_rates(model, tok, items, idx, k, args, rank, world, device, seed):
    """Fraction of k samples correct for each item index in idx (sharded over ranks, gathered)."""
    mine = idx[rank::world]
    # one queue over this rank's share: the engine keeps its slots full; seeds per item, as in any split
    seeds = [seed * 1_000_003 + i for i in mine]
    g = sample_groups(model, tok, [items[i] for i in mine], k, args, seeds, device)
    rates = {}
    for j, i in enumerate(mine):
        rows = range(j * k, (j + 1) * k)
        rates[i] = sum(reward_parts(g["texts"][r], items[i], g["reasons"][r])[0] for r in rows) / k
    return {i: p for part in gather_objects(rates) for i, p in part.items()}


def evaluate_policy(model, tok, val, args, rank, world, device):
    """Greedy accuracy and format rate on the held-out items (evaluate.py's runner and scoring)."""
    from evaluate import run_items, score_items
    with torch.no_grad(), autocast(device, args.autocast), tp.policy(model, args.tp_group, args.tp_dtype) as m:
        resp = run_items(m, tok, val, max_new_tokens=args.max_new_tokens, slots=args.gen_slots,
                         temperature=0.0, rank=rank, world=world, progress=False, cuda_graph=args.use_graph,
                         group=args.tp_group)
    resp = {k: v for p in gather_objects(resp) for k, v in p.items()}
    _, s = score_items(val, resp, "val")
    s["format"] = 100 * sum(format_ok(resp[it["id"]][0]) for it in val) / max(1, len(val))
    return s


def curriculum_step(cur, row, step, last_mine, model, tok, items, args, rank, world, device, meter):
    """Stage 2 once rewards go sparse (the stage-1 policy exported then), and hard-sample mining at the switch
    and every --mine-every steps after. Returns the step of the last mining."""
    switch = cur.observe(row["zero_var_frac"], step)
    if switch:   # the stage-1 policy, kept for the stage table (HF layout)
        with meter.phase("export"):
            export_hf(model, tok, os.path.join(args.out, "stage1"), rank)
    remine = (cur.stage == 2 and last_mine is not None and step - last_mine >= args.mine_every
              and args.steps - step >= args.mine_every)
    if switch or remine:
        t = time.time()
        idx = list(range(len(items)))
        if args.mine_max and len(idx) > args.mine_max:
            idx = sorted(random.Random(args.seed + step - 1).sample(idx, args.mine_max))
        with meter.phase("mining"):
            rates = pass_rates(model, tok, items, idx, args.mine_samples, args, rank, world, device,
                               args.seed + step - 1)
        info = cur.mine(rates, step)
        row.update({f"mined_{k}": v for k, v in info.items()}, mining_s=time.time() - t)
        print0(f"\nstep {step}: {'stage 2 begins' if switch else 're-mined'}: {info}")
        return step
    return last_mine


def memory_plan(args, cfg, tok, items, world, device):
    """memplan.py's budget for these flags (the longest prompt of the first 2,000 items; 512 tokens without a
    tokenizer); --dry-run stops here."""
    world = args.plan_world or world
    cuda = device.type == "cuda" or args.gpu_mem is not None
    prompt = max((len(prompt_ids(tok, it)) for it in items[:2000]), default=512) if tok else 512
    ctx = prompt + args.max_new_tokens
    # the most requests one generate call has: a step's rollouts, a mining call, or the evaluation
    n_mine = min(args.mine_max or len(items), len(items))
    most = max(args.questions_per_step // world * max(args.group_size, args.stage2_group_size),
               -(-n_mine // world) * args.mine_samples, -(-args.val_size // world), 1)
    tokens = args.micro_batch * args.max_new_tokens + -(-args.micro_batch // args.share_prompt) * prompt

    # each call's requests a rank and samples a prompt: rollouts in either stage, mining, evaluation
    calls = [(args.questions_per_step // world * g, g) for g in (args.group_size, args.stage2_group_size)]
    calls += [(-(-n_mine // world) * args.mine_samples, args.mine_samples), (-(-args.val_size // world), 1)]

    def prefill(slots, n):   # the largest first admission: every slot filled at once, in runs (engine.py)
        prompts = max((-(-min(slots, rows * n) // g) for rows, g in calls if rows), default=0)
        return min(prompts * prompt, max(PREFILL_TOKENS, prompt)), prompt

    def grpo_plan(slots, n):
        return plan(cfg, world, cuda, args.bf16, "grpo", tokens, ctx, args.act_ckpt, args.logits_chunk,
                    slots=slots, ctx=ctx, ref=args.kl_beta > 0, sdpa_len=0 if cuda else ctx, tp=n,
                    prefill=prefill(slots, n))

    cap = capacity(args, cuda)

    def fitted(n):   # slots: what the KV budget fits beside the rest (a group decodes its n ranks' requests)
        slots = args.gen_slots or fit_slots(grpo_plan(0, n), cap, slot_bytes(cfg, ctx, args.bf16, n), most * n)
        p = grpo_plan(slots, n)
        while not args.gen_slots and slots > 1 and verdict(p, cap) is not None:   # less, if the prefill
            slots = max(1, slots * 9 // 10)                                        # did not fit beside
            p = grpo_plan(slots, n)
        return slots, p, verdict(p, cap) is None
    degrees = [args.rollout_tp] if args.rollout_tp else \
        [n for n in range(1, world + 1) if not tp.degree_problem(cfg, n, world)]
    for n in degrees:   # --rollout-tp 0: the smallest degree whose plan fits (else the largest) with slots
        slots, p, fits = fitted(n)   # enough slots to keep a GPU busy: one slot would take days
        if fits and (args.gen_slots or slots >= min(64, most * n)):
            break
    if not args.rollout_tp:
        print0(f"--rollout-tp 0: {n}, {'the smallest degree that fits' if fits else 'the largest; none fits'} "
               f"(with {slots} decode slots)")
    args.rollout_tp, args.gen_slots = n, slots
    over = f", rollouts tensor-parallel over {n}" if n > 1 else ""
    return announce(p, f"GRPO, {cfg.model_type} {size(cfg)} parameters, {world} rank(s), "
                    f"{'cuda' if cuda else 'cpu'}{', bf16' if args.bf16 else ''}, prompts up to {prompt} "
                    f"tokens{over}", args, cuda)


def graph_ok(cuda_graph, device_type, world, rollout_tp):
    """Whether the rollouts decode as CUDA graph replays: on CUDA, as one process or over a tensor-parallel
    shard (rollout_tp > 1); rollout_tp 0 (not picked yet) keeps the graph until the plan picks 1."""
    return cuda_graph and device_type == "cuda" and (world == 1 or rollout_tp != 1)


def setup(args):
    """Ranks and device, and the flags and files that depend on them, checked before anything loads."""
    fast.ON = not args.plain
    rank, world, device = init_distributed(args.device)
    if not args.dry_run:
        check_bf16(args.bf16, device)
    # not under FSDP's gathered policy (its hooks run on the host); a tensor-parallel shard is plain modules.
    # --rollout-tp 0: the memory plan picks the degree (load_items), and main decides again then
    args.use_graph = graph_ok(args.cuda_graph, device.type, world, args.rollout_tp)
    args.autocast = wants_autocast(args.bf16, device, world)   # one GPU with --bf16 used to run in fp32
    if args.cuda_graph and not args.use_graph:
        print0(f"--cuda-graph ignored: it needs CUDA and one process or --rollout-tp > 1, not {world} rank(s) "
               f"on {device.type}")
    if args.questions_per_step % world:
        raise SystemExit(f"--questions-per-step must be a multiple of the world size ({world})")
    need(os.path.join(args.init, "config.json"), "no model yet",
         f"make one with `python train_sft.py --out {args.init}`, or pass --init")
    need(args.data, "no RL data", "make it with `python make_data.py --out data/kg`, or pass --data")
    if args.rollout_tp != 1 and args.rollout == "static":
        raise SystemExit("--rollout static generates on every rank alone: --rollout-tp needs the engine")
    problem = args.rollout_tp and tp.degree_problem(read_config(args.init), args.rollout_tp,
                                                    args.plan_world or world)
    if problem:
        raise SystemExit(problem)
    return rank, world, device


def load_items(args, world, device):
    """The RL items (less --exclude), the tokenizer, and the memory plan; then the held-out / train split."""
    ckpt = latest_checkpoint(args.out) if args.resume else None
    if args.resume and ckpt is None:
        print0(f"--resume: no complete checkpoint in {args.out}/ckpt, starting at step 0")
    src = ckpt or args.init
    # a dry run plans from config.json
    tok = load_tokenizer(src) if has_tokenizer(src) or not args.dry_run else None
    rows = read_records(args.data)
    for i, it in enumerate(rows):
        if it.get("answer") not in (it.get("options") or {}):
            raise SystemExit(f"{args.data}:{i + 1}: field 'answer' is not one of the options")
    # e.g. the SFT file: RL on questions the cold start never saw, whose facts it can still learn
    if args.exclude:
        seen = {str(r.get("id")) for r in read_records(args.exclude)}
        rows = [it for it in rows if str(it.get("id")) not in seen]
    planned = memory_plan(args, read_config(src), tok, rows, world, device)
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    val, train = [rows[i] for i in order[:args.val_size]], [rows[i] for i in order[args.val_size:]]
    if not train and not args.dry_run:
        excluded = f" after --exclude {args.exclude}" if args.exclude else ""
        raise SystemExit(f"{args.data}: {len(rows)} item(s){excluded} leave none to train on beside "
                         f"--val-size {args.val_size}: lower --val-size or give more items")
    return ckpt, tok, val, train, planned


def load_policy(ckpt, args, world, device, meter):
    """The policy (from --init, or a checkpoint's shape to be filled by load_checkpoint) and the frozen
    reference, sharded over the ranks as they load."""
    with meter.phase("load"):
        if ckpt:
            model = empty_model(read_config(ckpt), device, world, bf16=args.bf16)
        else:
            model = load_sharded(args.init, device, world, bf16=args.bf16)
        ref = None
        if args.kl_beta > 0:   # the starting policy, for the KL term; bf16 under --bf16 (it is never trained)
            ref = load_sharded(args.init, device, world, dtype=torch.bfloat16 if args.bf16 else torch.float32,
                               bf16=args.bf16, frozen=True)
    if ref is not None:
        held = sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in ref.parameters())
        whole = sum(p.numel() * p.element_size() for p in ref.parameters())
        print0(f"reference model: {held / 2**20:.1f} MB on rank 0, 1/{world} of its {whole / 2**20:.1f} MB")
    if args.act_ckpt:
        checkpoint_blocks(model)
    return model, ref


def main(argv=None):
    args = get_args(argv)
    rank, world, device = setup(args)
    set_seed(args.seed)
    if not args.dry_run:
        prepare_out(args.out, args.resume, args.overwrite, rank)
    ckpt, tok, val, items, planned = load_items(args, world, device)
    # the tensor-parallel groups (every rank makes every group), and the dtype FSDP would gather in
    args.tp_group = tp.Group(args.rollout_tp, world, rank) if args.rollout_tp > 1 else None
    if args.use_graph and not graph_ok(True, "cuda", world, args.rollout_tp):   # --rollout-tp 0 picked 1
        print0(f"--cuda-graph ignored: --rollout-tp 0 picked 1 on {world} ranks (FSDP's gathered policy)")
        args.use_graph = False
    args.tp_dtype = torch.bfloat16 if args.bf16 and device.type == "cuda" and world > 1 else None
    cur = Curriculum(items, set(args.stage1_tiers.split(",")), args.sparsity_threshold, args.sparsity_window,
                     args.stage2_at, args.mix_right, args.hard_below, args.seed)
    meter = Meter(device)
    model, ref = load_policy(ckpt, args, world, device, meter)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    start, last_mine = 0, None
    if ckpt:
        start, extra = load_checkpoint(ckpt, model, opt)
        cur.load(extra["curriculum"])
        last_mine = extra["last_mine"]
        print0(f"resumed from {ckpt} at step {start} (stage {cur.stage})")
    log = MetricsLog(os.path.join(args.out, "metrics.jsonl"), rank, resume_step=start if ckpt else None)
    rollout_log = RolloutLog(args.out, rank, args.log_groups, args.print_every, start if ckpt else None)
    canaries, wandb = Canaries(truncation=args.warn_truncation), Wandb(args.wandb, args, rank)
    print0(f"GRPO: {len(items)} train items ({len(cur.pool)} in the stage-1 pool), {len(val)} val | "
           f"world {world} on {device}")
    if start == 0:
        s = evaluate_policy(model, tok, val, args, rank, world, device)
        log.log(step=0, val_accuracy=s["accuracy"], val_n=s["n"], val_format=s["format"], stage=1)
        print0(f"step 0: val accuracy {s['accuracy']:.1f}%  format {s['format']:.1f}%")

    from tqdm import tqdm
    bar = tqdm(range(start, args.steps), desc="grpo", disable=rank != 0, initial=start, total=args.steps)
    for step in bar:
        G = args.group_size if cur.stage == 1 else args.stage2_group_size
        mine = pick_questions(cur, args, step)[rank::world]
        batch = [items[i] for i in mine]
        t0 = time.time()
        with meter.phase("rollout"):   # seeds per (step, item): rollouts do not depend on how items are split
            seeds = [(args.seed * 100_003 + step) * 1_000_003 + i for i in mine]
            g = sample_groups(model, tok, batch, G, args, seeds, device, logprobs=True)
        t_roll = time.time() - t0
        parts, rewards, adv, zero_var = score_groups(g, batch, G, args)
        g["prompts_of"] = [g["prompts"][j // G] for j in range(len(g["outs"]))]
        keep = [j for j in range(len(g["outs"])) if not (args.skip_zero_var and zero_var[j // G])]
        lr = lr_at(step, args.steps, args.lr, args.lr if args.min_lr is None else args.min_lr, args.warmup)
        t2 = time.time()
        stats = policy_update(model, ref, opt, g, adv, keep, args, lr, world, device, meter)
        row = step_metrics(step + 1, cur, G, lr, g, batch, parts, rewards, zero_var, stats,
                           t_roll, time.time() - t2 - stats.get("ref_s", 0), meter, args)
        picked = [extract_answer(t, batch[j // G]["options"]) for j, t in enumerate(g["texts"])]
        signals = answer_signals(g["texts"], picked, [it["answer"] for it in batch], parts, args.w_format)
        row["warnings"] = canaries.check(step + 1, row, merge_signals(gather_objects(signals)))
        index = [j * world + rank for j in range(len(mine))]
        questions = [build_messages(it)[1]["content"] for it in batch]
        kept = rollout_log.groups(step + 1, cur.stage, batch, questions, g["texts"], parts,
                                  adv, g["reasons"], [len(o) for o in g["outs"]], G, index)
        groups = [x for part in gather_objects(kept) for x in part]
        rollout_log.write(step + 1, groups)
        last_mine = curriculum_step(cur, row, step + 1, last_mine, model, tok, items, args, rank, world,
                                    device, meter)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            s = evaluate_policy(model, tok, val, args, rank, world, device)
            row.update(val_accuracy=s["accuracy"], val_n=s["n"], val_format=s["format"])
        log.log(**row)
        wandb.log(row, groups if args.print_every and (step + 1) % args.print_every == 0 else ())
        bar.set_postfix(stage=cur.stage, r=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}",
                        zv=f"{row['zero_var_frac']:.2f}")
        done = step + 1 == args.steps or (args.stop_after is not None and step + 1 >= args.stop_after)
        if (step + 1) % args.save_every == 0 or done:
            with meter.phase("save"):
                extra = dict(curriculum=cur.state(), last_mine=last_mine)
                save_checkpoint(args.out, model, opt, tok, step + 1, extra, rank)
        if done:
            break
    bar.close()
    wandb.finish()
    finish_run(model, tok, args, rank, world, meter, planned, "GRPO",
               ["reward", "accuracy", "zero_var_frac", "val_accuracy", "response_len", "entropy",
                "truncated_frac"])


def step_metrics(step, cur, G, lr, g, items, parts, rewards, zero_var, stats, t_roll, t_train, meter, args):
    """The step's row of metrics.jsonl: global means over ranks."""
    lens = [len(o) for o in g["outs"]]
    n_all = all_reduce_sum(len(lens))
    tokens = all_reduce_sum(sum(lens))
    # slot use: decoded tokens (a row's first comes from its prefill) / rows the decode passes computed
    row_steps = all_reduce_sum(g.get("row_steps", 0))
    slot_use = (tokens - n_all) / row_steps if row_steps else None
    row = dict(step=step, stage=cur.stage, group_size=G, pool=len(cur.pool), lr=lr,
               reward=all_reduce_sum(float(rewards.sum())) / n_all,
               accuracy=all_reduce_sum(sum(p[0] for p in parts)) / n_all,
               format_rate=all_reduce_sum(sum(p[1] for p in parts)) / n_all,
               zero_var_frac=all_reduce_sum(float(zero_var.sum())) / all_reduce_sum(len(zero_var)),
               truncated_frac=all_reduce_sum(sum(r == "length" for r in g["reasons"])) / n_all,
               response_len=tokens / n_all, response_len_max=all_reduce_max(max(lens)),
               entropy=all_reduce_sum(stats["entropy"]), loss=all_reduce_sum(stats["loss"]),
               grad_norm=stats["grad_norm"], skipped_update=stats["skipped"],
               logp_mismatch=all_reduce_sum(stats["mismatch"]),
               slot_use=slot_use,
               rollout_s=t_roll, ref_s=stats.get("ref_s", 0.0), train_s=t_train,
               rollout_tok_s=tokens / max(all_reduce_max(t_roll), 1e-9), mem_mb=meter.overall() / 2**20)
    if args.kl_beta > 0:
        row["kl"] = all_reduce_sum(stats["kl"])
    return row


if __name__ == "__main__":
    guard(main)

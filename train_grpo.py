"""
train_grpo.py: two-stage RLVR with GRPO (paper 3.3). Rollouts from the current policy through the rollout
engine (engine.py), reward = answer correctness + format (never length), advantage = reward minus the group
mean, stage 1 on Easy + Moderate items, stage 2 once rewards go sparse: hard-sample mining over the whole
training set, more rollouts per question, mining repeated every M steps.

    python train_grpo.py --init runs/demo/sft --out runs/demo/grpo           # embedded default (CPU)
    torchrun --nproc_per_node=2 train_grpo.py --init runs/demo/sft            # 2 CPU ranks, FSDP2 + gloo
    torchrun --nproc_per_node=8 train_grpo.py --init runs/7b-sft --data data/full/rl_train.jsonl --bf16 \\
        --questions-per-step 64 --group-size 8 --stage2-group-size 16 --max-new-tokens 2048 --lr 1e-6

Eq. (1)-(3) of the paper: L = -E[1/k sum_i log pi(y_i|x) A_i], A_i = r_i - mean_j r_j (grpo_loss). By default
the log-likelihood is normalised per token over the batch (--loss-agg token-mean); seq-sum is eq. (1)
literally. Read from main down: start (flags, ranks, data, memory plan: a Setup built once), then each step
(grpo_step): questions -> rollouts -> rewards -> group advantages -> loss -> update -> curriculum.
"""
import argparse
import os
import random
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import torch

import fast
import tp
from cli import Parser, at_least, between, finite, fraction, guard, parse_frozen
from common import (MetricsLog, add_run_flags, all_reduce_max, all_reduce_sum, autocast, check_bf16,
                    clip_and_check, even_micro_batches, gather_objects, init_distributed, lr_at, need,
                    prepare_out, print0, run_done, set_seed, wants_autocast)
from engine import PREFILL_TOKENS
from fsdp import (checkpoint_blocks, empty_model, export_hf, load_checkpoint, load_sharded, resume_checkpoint,
                  save_checkpoint)
from hf_io import has_tokenizer, load_tokenizer, read_config
from mcq import build_messages, extract_answer, format_ok, item_problem, prompt_ids, read_records
from memplan import (Job, Meter, announce, capacity, fill, fit_micro, fit_slots, phase_bytes, plan, size,
                     slot_bytes, verdict)
from model import SamplingParams, seed_of
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
    """rewards (N,) in groups of group_size consecutive samples -> A = r - group mean (eq. 2, the paper);
    std_scale divides by the group std as in the original GRPO."""
    r = rewards.view(-1, group_size)
    a = r - r.mean(1, keepdim=True)
    if std_scale:
        a = a / (r.std(1, keepdim=True) + 1e-4)
    return a.reshape(-1)


# -----------------------------------------------------------------------------
# the loss: eq. (1) with A of eq. (2), and eq. (3)'s KL pull


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


@dataclass(frozen=True)
class LossConfig:
    """What the loss needs beyond its tensors: the aggregation and its global normaliser, PPO clipping (on
    when the data is reused: --ppo-epochs > 1), and the KL weight beta."""
    agg: str = "token-mean"
    denom: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    use_clip: bool = False
    kl_beta: float = 0.0


def grpo_loss(logp, old_logp, adv, mask, hp, ref_logp=None):
    """The GRPO loss of a batch, a pure function: per token -A * log pi (eq. 1, A = r - mean r of eq. 2), or
    PPO's clipped ratio when the data is reused, plus beta * KL(pi || ref) (k3, eq. 3), aggregated over the
    mask's tokens and divided by the global normaliser. logp, old_logp, ref_logp, mask (n, L); adv (n,)."""
    per_tok = token_objective(logp, old_logp, adv, hp.clip_low, hp.clip_high, hp.use_clip)
    if ref_logp is not None:
        per_tok = per_tok + hp.kl_beta * kl_k3(logp, ref_logp)
    return aggregate(per_tok, mask, hp.agg, hp.denom)


# -----------------------------------------------------------------------------
# scoring: log pi(y_t | x, y_<t) of each completion token


def completion_logprobs(model, prompts, outs, share=1, want_entropy=False, chunk=0):
    """Log-probs of each completion token: prompts[i] + outs[i] -> (log-probs (N, Lc), mask (N, Lc), entropy
    or None). The textbook layout (--plain): one right-padded row per completion, causal attention. share > 1
    puts that many completions of one prompt in one row behind a single copy of it ([prompt, c1, c2, ...]:
    each c_k attends to the prompt and itself and restarts its positions where the prompt ends, so its
    log-probs are those of [prompt, c_k] alone): a GRPO group shares its prompt, so about half the work. With
    fast.ON on a CPU the rows go end to end in one unpadded row, each prompt and completion attending as its
    own short sequence (fast.DocBuckets); on a GPU padded rows attend through flex_attention (fast.FlexMask).
    Logits are made only where a completion token is predicted (model.token_logprobs)."""
    device = next(model.parameters()).device
    share = share if fast.ON else 1
    rows = []   # (prompt, [completion indices])
    for i, (p, o) in enumerate(zip(prompts, outs)):
        if rows and len(rows[-1][1]) < share and rows[-1][0] == p:
            rows[-1][1].append(i)
        else:
            rows.append((p, [i]))
    lens = [len(p) + sum(len(outs[i]) for i in idx) for p, idx in rows]
    longest = max(len(p) + len(o) for p, o in zip(prompts, outs))
    packed = fast.ON and device.type == "cpu" and longest <= fast.DocBuckets.MAX_LEN
    if packed:   # (batch row, start) of each row
        place, B, T = [(0, sum(lens[:r])) for r in range(len(rows))], 1, sum(lens)
    else:
        place, B, T = [(r, 0) for r in range(len(rows))], len(rows), max(lens)
    ids, pos = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)   # -1 pad, 0 prompt, k >= 1 the row's k-th completion
    seqs, where = [], []   # attention sequences (DocBuckets); per completion: the positions predicting it
    for (p, idx), (r, s0) in zip(rows, place):
        P = len(p)
        ids[r, s0:s0 + P], pos[r, s0:s0 + P], seg[r, s0:s0 + P] = torch.tensor(p), torch.arange(P), 0
        seqs.append((0, 0, s0, P))
        s = s0 + P
        for k, i in enumerate(idx):
            n = len(outs[i])
            ids[r, s:s + n], pos[r, s:s + n] = torch.tensor(outs[i]), torch.arange(P, P + n)
            seg[r, s:s + n] = k + 1
            seqs.append((s0, P, s, n))
            # token 0 is predicted by the prompt's last position, token j > 0 by the completion's token j - 1
            where.append((r, ([s0 + P - 1] + list(range(s, s + n - 1)))[:n]))
            s += n
    mask = None   # share 1, padded: causal
    if packed:
        mask = fast.DocBuckets(seqs, T, device)
    elif share > 1 and device.type == "cuda":   # flex_attention skips the blocks no one sees
        mask = fast.FlexMask(seg.to(device), shared_prefix=True)
    elif share > 1:
        same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)
        mask = ((same & torch.ones(T, T, dtype=torch.bool).tril()) | torch.eye(T, dtype=torch.bool))[:, None]
        mask = mask.to(device)   # a pad sees itself: no NaN
    at = torch.tensor([r * T + j for r, js in where for j in js], device=device)
    tgt = torch.tensor([t for o in outs for t in o], device=device)
    lp, ent = model(ids.to(device), position_ids=pos.to(device), attention_mask=mask, logits_at=at,
                    targets=tgt, chunk=chunk, want_entropy=want_entropy)
    n_tok = torch.tensor([len(o) for o in outs])
    mask_c = (torch.arange(int(n_tok.max()))[None] < n_tok[:, None]).to(device)
    out = torch.zeros(mask_c.shape, device=device, dtype=lp.dtype).masked_scatter(mask_c, lp)
    ent = torch.zeros(mask_c.shape, device=device).masked_scatter(mask_c, ent) if want_entropy else None
    return out, mask_c.float(), ent


# -----------------------------------------------------------------------------
# curriculum: stage switch on reward sparsity, hard-sample mining


class Curriculum:
    def __init__(self, items, stage1_tiers, threshold, window, stage2_at, mix_right, hard_below, seed):
        self.items = items
        self.stage = 1
        self.pool = [i for i, it in enumerate(items) if it.get("difficulty", "Moderate") in stage1_tiers]
        self.threshold, self.window, self.stage2_at = threshold, window, stage2_at
        self.mix_right, self.hard_below, self.seed = mix_right, hard_below, seed
        self.sparsity = deque(maxlen=window)
        self.last_mine = None   # the step of the last mining

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
        self.stage, self.last_mine = 2, step
        self.pool = pool or sorted(pass_rates)
        return dict(hard=len(hard), right_mixed=min(n_right, len(right)), pool=len(self.pool))

    def state(self):
        return dict(stage=self.stage, pool=self.pool, sparsity=list(self.sparsity), last_mine=self.last_mine)

    def load(self, st):
        self.stage, self.pool, self.last_mine = st["stage"], st["pool"], st.get("last_mine")
        self.sparsity.extend(st["sparsity"])


# -----------------------------------------------------------------------------
# start-up: the flags (read-only once parsed), and what the run decides from them once, in one Setup


TIERS = ("Easy", "Moderate", "Difficult")   # make_data.py's difficulty tiers


def tiers(text):
    """--stage1-tiers: a comma list of TIERS, as written there."""
    names = [t for t in text.split(",") if t]
    wrong = [t for t in names if t not in TIERS]
    if wrong or not names:
        raise argparse.ArgumentTypeError(f"{', '.join(wrong) or 'nothing'}: not a tier (have "
                                         f"{', '.join(TIERS)})")
    return tuple(names)


def recipe_flags(ap):
    # --- the paper's recipe
    ap.add_argument("--init", default="runs/sft", help="policy checkpoint (HF layout), "
                    "usually train_sft.py's output")
    ap.add_argument("--data", default="data/kg/rl_train.jsonl", help="RL items from make_data.py "
                    "(with difficulty)")
    ap.add_argument("--exclude", default=None, help="JSONL whose ids are left out "
                    "of --data (e.g. the SFT file)")
    ap.add_argument("--val-size", type=at_least(0), default=128, help="items held out of --data for "
                    "periodic evaluation (0: none)")
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
    ap.add_argument("--w-correct", type=finite, default=1.0, help="reward for the right final answer")
    ap.add_argument("--w-format", type=finite, default=0.1, help="reward for the required format "
                    "(no length term, by design)")
    ap.add_argument("--kl-beta", type=at_least(0, float), default=0.0, help="KL(pi||ref) weight; the "
                    "reference is loaded only if > 0")
    ap.add_argument("--steps", type=at_least(0), default=60, help="optimizer steps (both stages)")
    ap.add_argument("--lr", type=at_least(0, float), default=2e-4, help="learning rate after warmup")
    ap.add_argument("--min-lr", type=at_least(0, float), default=None, help="cosine decay to this by the "
                    "last step (default: none, --lr throughout)")
    ap.add_argument("--warmup", type=at_least(0), default=5, help="linear warmup steps")
    ap.add_argument("--clip", type=at_least(0, float), default=1.0, help="gradient norm clip (0: none)")
    ap.add_argument("--stage1-tiers", default="Easy,Moderate", type=tiers, help="tiers in the stage 1 pool "
                    f"(comma list of {', '.join(TIERS)})")
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


def ablation_flags(ap):
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


def speed_flags(ap):
    # --- memory and speed (the same results)
    ap.add_argument("--bf16", action="store_true", help="bf16 compute (autocast on CPU and on one GPU; FSDP "
                    "mixed precision on several GPUs)")
    ap.add_argument("--micro-batch", type=at_least(0), default=0, help="sequences per forward/backward; 0: "
                    "the largest (up to 64) whose training step fits the memory plan, with --act-ckpt if none "
                    "does")
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
    ap.add_argument("--rollout-tp", type=at_least(0), default=1, help="tensor-parallel rollouts: groups of N "
                    "ranks each hold 1/N of the policy, built from the FSDP shards, and decode their ranks' "
                    "requests together (tp.py); 1: every rank gathers the whole policy; 0: the smallest N the "
                    "memory plan fits")
    ap.add_argument("--cuda-graph", action="store_true", help="one GPU, or --rollout-tp > 1: each decode step "
                    "of the rollouts and evals one CUDA graph replay (bench/generate.py); ignored on CPU and "
                    "where FSDP gathers the whole policy")


def parser():
    ap = Parser(description=__doc__)
    recipe_flags(ap)
    ablation_flags(ap)
    speed_flags(ap)
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
    return ap


def get_args(argv=None):
    return parse_frozen(parser(), argv)


@dataclass
class Setup:
    """What a run decides once at start-up from its flags, its ranks and the memory plan, never written onto
    the flags: the device, bf16 autocast, the rollouts' CUDA graph, their tensor-parallel degree and group,
    the decode slots, the training micro-batch and activation checkpointing, the planned bytes."""
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    autocast: bool = False
    graph: bool = False
    rollout_tp: int = 1
    slots: int = 1
    micro_batch: int = 1
    act_ckpt: bool = False
    planned: float = 0.0
    group: object = None      # tp.Group of this rank (--rollout-tp > 1)
    tp_dtype: object = None   # the dtype FSDP would gather in (bf16 under FSDP mixed precision)


@contextmanager
def rollout_policy(su, model):
    """with rollout_policy(su, model) as m: no grad, autocast as decided, and the whole policy gathered or
    this rank's tensor-parallel shard of it (tp.policy)."""
    with torch.no_grad(), autocast(su.device, su.autocast), tp.policy(model, su.group, su.tp_dtype) as m:
        yield m


def graph_ok(cuda_graph, device_type, world, rollout_tp):
    """Whether the rollouts decode as CUDA graph replays: on CUDA, as one process or over a tensor-parallel
    shard (rollout_tp > 1); rollout_tp 0 (not picked yet) keeps the graph until the plan picks 1."""
    return cuda_graph and device_type == "cuda" and (world == 1 or rollout_tp != 1)


def rl_row_problem(it):
    """Why a row of --data cannot be trained on (mcq.item_problem, and a difficulty among TIERS), or None."""
    if not isinstance(it, dict):
        return "not a JSON object"
    missing = [f for f in ("question", "options", "answer") if f not in it]
    if missing:
        return f"field {missing[0]!r} is missing"
    if "difficulty" in it and it["difficulty"] not in TIERS:
        return f"field 'difficulty': {it['difficulty']!r} is not one of {', '.join(TIERS)}"
    return item_problem(it)


def read_rows(args):
    """--data's rows, each checked where it is read, less --exclude's ids (the cold start's questions: RL on
    questions it never saw, whose facts it can still learn)."""
    rows = read_records(args.data)
    for i, it in enumerate(rows):
        why = rl_row_problem(it)
        if why:
            raise SystemExit(f"{args.data}:{i + 1}: {why}")
    if args.exclude:
        seen = {str(r.get("id")) for r in read_records(args.exclude)}
        rows = [it for it in rows if str(it.get("id")) not in seen]
    return rows


def check_flags(args, world):
    """The flags and files that depend on the ranks, checked before anything loads."""
    if args.questions_per_step % world:
        raise SystemExit(f"--questions-per-step must be a multiple of the world size ({world})")
    need(os.path.join(args.init, "config.json"), "no model yet",
         f"make one with `python train_sft.py --out {args.init}`, or pass --init")
    need(args.data, "no RL data", "make it with `python make_data.py --out data/kg`, or pass --data")
    problem = args.rollout_tp and tp.degree_problem(read_config(args.init), args.rollout_tp,
                                                    args.plan_world or world)
    if problem:
        raise SystemExit(problem)


def start(args):
    """Ranks, device and checks; the run folder; the RL rows and the tokenizer; the memory plan; the held-out
    split. Returns (Setup, the checkpoint to resume or None, tokenizer, held-out items, training items)."""
    fast.ON = not args.plain
    rank, world, device = init_distributed(args.device)
    if not args.dry_run:
        check_bf16(args.bf16, device)
    check_flags(args, world)
    if not args.dry_run:
        prepare_out(args.out, args.resume, args.overwrite, rank)
    ckpt = resume_checkpoint(args)
    src = ckpt or args.init
    tok = load_tokenizer(src) if has_tokenizer(src) or not args.dry_run else None   # a dry run: config.json
    rows = read_rows(args)
    su = Setup(args, rank, world, device, autocast=wants_autocast(args.bf16, device, world))
    memory_plan(su, read_config(src), tok, rows)
    su.group = tp.Group(su.rollout_tp, world, rank) if su.rollout_tp > 1 else None
    # not under FSDP's gathered policy (its hooks run on the host); a tensor-parallel shard is plain modules
    su.graph = graph_ok(args.cuda_graph, device.type, world, su.rollout_tp)
    if args.cuda_graph and not su.graph:
        print0(f"--cuda-graph ignored: it needs CUDA and one process or --rollout-tp > 1, not {world} "
               f"rank(s) on {device.type} (--rollout-tp {su.rollout_tp})")
    su.tp_dtype = torch.bfloat16 if args.bf16 and device.type == "cuda" and world > 1 else None
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    val, train = [rows[i] for i in order[:args.val_size]], [rows[i] for i in order[args.val_size:]]
    if not train:
        excluded = f" after --exclude {args.exclude}" if args.exclude else ""
        raise SystemExit(f"{args.data}: {len(rows)} item(s){excluded} leave none to train on beside "
                         f"--val-size {args.val_size}: lower --val-size or give more items")
    return su, ckpt, tok, val, train


def memory_plan(su, cfg, tok, items):
    """memplan.py's budget for these flags (the longest prompt of the first 2,000 items; 512 tokens without a
    tokenizer), and what --micro-batch 0, --gen-slots 0 and --rollout-tp 0 leave to it (into su): the
    micro-batch fitted to the training step, the decode slots to the rollout phase, each phase on its own;
    --dry-run stops here."""
    args = su.args
    world, cuda = args.plan_world or su.world, su.device.type == "cuda" or args.gpu_mem is not None
    prompt = max((len(prompt_ids(tok, it)) for it in items[:2000]), default=512) if tok else 512
    ctx = prompt + args.max_new_tokens
    # each call's requests a rank and samples a prompt: rollouts in either stage, mining, evaluation
    n_mine = min(args.mine_max or len(items), len(items))
    calls = [(args.questions_per_step // world * g, g) for g in (args.group_size, args.stage2_group_size)]
    calls += [(-(-n_mine // world) * args.mine_samples, args.mine_samples), (-(-args.val_size // world), 1)]
    most = max(max(rows for rows, _ in calls), 1)   # the most requests one generate call has

    def grpo_plan(slots, n, micro, ckpt):
        # the largest first admission: every slot filled at once, in runs (engine.py)
        arrive = max((-(-min(slots, rows * n) // g) for rows, g in calls if rows), default=0)
        tokens = micro * args.max_new_tokens + -(-micro // args.share_prompt) * prompt
        first = (min(arrive * prompt, max(PREFILL_TOKENS, prompt)), prompt)
        return plan(cfg, Job("grpo", world, cuda, args.bf16, tokens, ckpt, args.logits_chunk,
                             0 if cuda else ctx, slots, ctx, args.kl_beta > 0, n, first))

    cap = capacity(args, cuda)
    budget = fill(cuda) * cap
    micro, ckpt = args.micro_batch, args.act_ckpt
    if not micro:
        micro, ckpt = fit_micro(lambda m, c: grpo_plan(0, 1, m, c or args.act_ckpt), budget,
                                max(calls[0][0], calls[1][0]))
        turned = " with --act-ckpt, which it turned on" if ckpt and not args.act_ckpt else ""
        print0(f"--micro-batch 0: {micro}, the largest training micro-batch that fits "
               f"{100 * fill(cuda):.0f} % of {cap / 2**30:.1f} GB{turned}")

    def fitted(n):   # slots: what the rollout phase has room for (a group decodes its n ranks' requests)
        p = grpo_plan(0, n, micro, ckpt)
        slots = args.gen_slots or fit_slots(p, budget, slot_bytes(cfg, ctx, args.bf16, n), most * n)
        p = grpo_plan(slots, n, micro, ckpt)
        while not args.gen_slots and slots > 1 and phase_bytes(p, "rollout") > budget:   # the prefill
            slots = max(1, slots * 9 // 10)                                                # did not fit
            p = grpo_plan(slots, n, micro, ckpt)
        return slots, p, verdict(p, cap) is None
    degrees = [args.rollout_tp] if args.rollout_tp else \
        [n for n in range(1, world + 1) if not tp.degree_problem(cfg, n, world)]
    for n in degrees:   # --rollout-tp 0: the smallest degree whose plan fits (else the largest) with slots
        slots, p, fits = fitted(n)   # enough slots to keep a GPU busy: one slot would take days
        if fits and (args.gen_slots or slots >= min(64, most * n)):
            break
    if not args.rollout_tp:
        which = "the smallest degree that fits" if fits else "the largest; none fits"
        print0(f"--rollout-tp 0: {n}, {which} (with {slots} decode slots)")
    if not args.gen_slots and slots < min(64, most * n):
        print0(f"warning: {slots} decode slots (all the rollout phase has room for): calls of up to "
               f"{most * n} requests decode {slots} at a time; lower --max-new-tokens or add memory "
               f"(--gen-slots N sets them)")
    su.rollout_tp, su.slots, su.micro_batch, su.act_ckpt = n, slots, micro, ckpt
    over = f", rollouts tensor-parallel over {n}" if n > 1 else ""
    su.planned = announce(p, f"GRPO, {cfg.model_type} {size(cfg)} parameters, {world} rank(s), "
                          f"{'cuda' if cuda else 'cpu'}{', bf16' if args.bf16 else ''}, prompts up to "
                          f"{prompt} tokens, micro-batch {micro}{', --act-ckpt' if ckpt else ''}, {slots} "
                          f"decode slots{over}", args, cuda)


@dataclass
class State:
    """What a step changes: the policy, the frozen reference (KL) and the optimizer; meter: peak memory."""
    model: torch.nn.Module
    ref: object
    opt: torch.optim.Optimizer
    meter: Meter


def load_state(su, ckpt, cur):
    """The policy (from --init, or a checkpoint's shape filled by load_checkpoint), the frozen reference, the
    optimizer, sharded over the ranks as they load; on resume the curriculum too. Returns (State, step)."""
    args, meter = su.args, Meter(su.device)
    with meter.phase("load"):
        if ckpt:
            model = empty_model(read_config(ckpt), su.device, su.world, bf16=args.bf16)
        else:
            model = load_sharded(args.init, su.device, su.world, bf16=args.bf16)
        ref = None
        if args.kl_beta > 0:   # the starting policy, for the KL term; bf16 under --bf16 (it is never trained)
            ref = load_sharded(args.init, su.device, su.world, dtype=torch.bfloat16 if args.bf16 else
                               torch.float32, bf16=args.bf16, frozen=True)
    if ref is not None:
        held = sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in ref.parameters())
        whole = sum(p.numel() * p.element_size() for p in ref.parameters())
        print0(f"reference model: {held / 2**20:.1f} MB on rank 0, 1/{su.world} of its "
               f"{whole / 2**20:.1f} MB")
    if su.act_ckpt:
        checkpoint_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step = 0
    if ckpt:
        step, extra = load_checkpoint(ckpt, model, opt)
        cur.load(extra["curriculum"])
        print0(f"resumed from {ckpt} at step {step} (stage {cur.stage})")
    return State(model, ref, opt, meter), step


# -----------------------------------------------------------------------------
# one GRPO step, in the paper's order: questions -> rollouts -> rewards -> group advantages -> loss -> update


@dataclass
class Rollouts:
    """A call's completions on this rank, prompt-major (G per prompt): token ids, text, finish reason, the
    sampler's own log-prob of each token (None unless asked), and the decode slot-steps computed."""
    prompts: list
    outs: list
    texts: list
    reasons: list
    logps: list
    row_steps: float
    G: int

    def prompt_of(self, j):
        return self.prompts[j // self.G]


def pick_questions(cur, args, step):
    """The step's questions: a function of (seed, step, pool), so resume and world size change nothing."""
    qrng = random.Random(args.seed * 100003 + step)
    picked = qrng.sample(range(len(cur.pool)), min(args.questions_per_step, len(cur.pool)))
    return [cur.pool[j] for j in picked]


def sample_groups(su, model, tok, items, G, seeds, logprobs=False):
    """G completions per item, through the rollout engine (tp.generate: a tensor-parallel group's requests in
    one queue). seeds: one per item (model.seed_of), so a completion depends only on its item and step."""
    args = su.args
    prompts = [prompt_ids(tok, it) for it in items]
    sp = SamplingParams(args.max_new_tokens, args.temperature, top_p=args.top_p, num_samples=G,
                        logprobs=logprobs, stop_ids=(tok.convert_tokens_to_ids("<|im_end|>"),))
    stats = {}   # decode passes and the rows they computed (slot use)
    with rollout_policy(su, model) as m:
        res = tp.generate(m, prompts, sp, group=su.group, seed=seeds, slots=su.slots, cuda_graph=su.graph,
                          stats=stats)
    # every rank of a tensor-parallel group counted the group's passes: its share of them
    texts = [tok.decode(o, skip_special_tokens=True) for o in res[0]]
    row_steps = stats.get("row_steps", 0) / (su.group.n if su.group else 1)
    return Rollouts(prompts, res[0], texts, res[1], res[2] if logprobs else None, row_steps, G)


@dataclass
class Scores:
    """Each completion's (correct, format, reward), the rewards (N,), A = r - group mean (eq. 2), and which
    groups are all-equal (A = 0 everywhere: no signal)."""
    parts: list
    rewards: torch.Tensor
    adv: torch.Tensor
    zero_var: torch.Tensor


def score_groups(args, ro, items):
    G = ro.G
    parts = [reward_parts(t, items[j // G], r, args.require_think, args.require_option)
             for j, (t, r) in enumerate(zip(ro.texts, ro.reasons))]
    parts = [(c, f, args.w_correct * c + args.w_format * f) for c, f in parts]
    correct, fmt = torch.tensor([c for c, _, _ in parts]), torch.tensor([f for _, f, _ in parts])
    rewards = args.w_correct * correct + args.w_format * fmt
    zero_var = (rewards.view(-1, G).std(1) == 0).float()
    return Scores(parts, rewards, group_advantages(rewards, G, args.adv_std), zero_var)


def policy_update(su, st, ro, adv, keep, lr, step):
    """The GRPO loss over this rank's kept completions (grpo_loss), one optimizer step per --ppo-epochs, and
    beside the loss its statistics (loss_stats). Returns the step's statistics (sums over this rank; the
    caller adds the ranks up)."""
    args, model = su.args, st.model
    if not ro.outs:   # no question on this rank this step: it joins the others' passes with weight 0
        ro = Rollouts([[0]], [[0]], [""], ["length"], [[0.0]] if ro.logps is not None else None, 0, 1)
        adv = torch.zeros(1)
    n_seq = all_reduce_sum(len(keep))
    n_tok = all_reduce_sum(sum(len(ro.outs[j]) for j in keep))
    hp = LossConfig(args.loss_agg, grpo_denominator(args.loss_agg, n_tok, n_seq, args.max_new_tokens),
                    args.clip_low, args.clip_high, args.ppo_epochs > 1, args.kl_beta)
    stats = dict(loss=0.0, kl=0.0, entropy=0.0, mismatch=0.0, grad_norm=0.0, skipped=n_seq == 0, ref_s=0.0)
    if stats["skipped"]:   # every group all-equal and skipped, on all ranks: the 0/0 normaliser would put
        return stats       # NaN in every weight, and there is nothing to learn
    micro = even_micro_batches(keep, su.micro_batch)

    def score(m, mb, entropy=False):
        return completion_logprobs(m, [ro.prompt_of(j) for j in mb], [ro.outs[j] for j in mb],
                                   args.share_prompt, entropy, args.logits_chunk)

    t = time.time()
    old, refl = [], []   # the reference's log-probs (KL), and the sampling policy's (--ppo-epochs > 1)
    if st.ref is not None or args.ppo_epochs > 1:
        with st.meter.phase("reference"), torch.no_grad(), autocast(su.device, su.autocast):
            for mb, _ in micro:
                refl += [score(st.ref, mb)[0]] if st.ref is not None else []
                old += [score(model, mb)[0]] if args.ppo_epochs > 1 else []
    stats["ref_s"] = time.time() - t
    for group in st.opt.param_groups:
        group["lr"] = lr
    with st.meter.phase("train"):
        for epoch in range(args.ppo_epochs):
            for mi, (mb, weight) in enumerate(micro):
                with autocast(su.device, su.autocast):
                    logp, mask, ent = score(model, mb, entropy=epoch == 0)   # log pi(y_t | x, y_<t), (n, L)
                ref_logp = refl[mi] if refl else None
                old_logp = old[mi] if old else logp.detach()
                loss = grpo_loss(logp, old_logp, adv[mb].to(su.device), mask, hp, ref_logp)
                # FSDP averages gradients over ranks, hence * world; an empty padding micro-batch weighs 0
                (loss * su.world * weight).backward()
                stats["loss"] += weight * float(loss.detach())
                if epoch == 0:
                    loss_stats(stats, weight / max(n_tok, 1), (logp.detach(), mask, ent, ref_logp),
                               [ro.logps[j] for j in mb] if ro.logps is not None else None)
            stats["grad_norm"] = clip_and_check(model, args.clip, step, all_reduce_sum(stats["loss"]))
            st.opt.step()
            st.opt.zero_grad(set_to_none=True)
    return stats


def loss_stats(stats, scale, tensors, rollout_logps):
    """Beside the loss, what watch.py and metrics.jsonl show, per token of the batch: KL(pi || ref) (k3), the
    policy's entropy, and how far the trainer's log-probs are from the rollout's (the same model, two code
    paths: 1e-6 in fp32)."""
    logp, mask, ent, ref_logp = tensors
    if ref_logp is not None:
        stats["kl"] += scale * float((kl_k3(logp, ref_logp) * mask).sum())
    stats["entropy"] += scale * float((ent * mask).sum())
    if rollout_logps is not None:
        roll = torch.zeros_like(logp)
        for r, lp in enumerate(rollout_logps):
            roll[r, :len(lp)] = torch.tensor(lp)
        stats["mismatch"] += scale * float(((logp - roll).abs() * mask).sum())


def step_metrics(su, st, ro, sc, stats):
    """The step's row of metrics.jsonl, global means over ranks (stats: policy_update's, with its timings)."""
    lens = [len(o) for o in ro.outs]
    n_all, tokens = all_reduce_sum(len(lens)), all_reduce_sum(sum(lens))
    # slot use: decoded tokens (a row's first comes from its prefill) / rows the decode passes computed
    row_steps = all_reduce_sum(ro.row_steps)
    mean = lambda x: all_reduce_sum(x) / n_all   # noqa: E731
    row = dict(group_size=ro.G, reward=mean(float(sc.rewards.sum())),
               accuracy=mean(sum(p[0] for p in sc.parts)), format_rate=mean(sum(p[1] for p in sc.parts)),
               zero_var_frac=all_reduce_sum(float(sc.zero_var.sum())) / all_reduce_sum(len(sc.zero_var)),
               truncated_frac=mean(sum(r == "length" for r in ro.reasons)), response_len=tokens / n_all,
               response_len_max=all_reduce_max(max(lens, default=0)),
               entropy=all_reduce_sum(stats["entropy"]), loss=all_reduce_sum(stats["loss"]),
               grad_norm=stats["grad_norm"], skipped_update=stats["skipped"],
               logp_mismatch=all_reduce_sum(stats["mismatch"]),
               slot_use=(tokens - n_all) / row_steps if row_steps else None, rollout_s=stats["rollout_s"],
               ref_s=stats["ref_s"], train_s=stats["train_s"],
               rollout_tok_s=tokens / max(all_reduce_max(stats["rollout_s"]), 1e-9),
               mem_mb=st.meter.overall() / 2**20)
    if su.args.kl_beta > 0:
        row["kl"] = all_reduce_sum(stats["kl"])
    return row


def grpo_step(su, st, tok, cur, items, step):
    """One GRPO step (step counts from 0): this rank's questions -> G rollouts each -> rewards -> group
    advantages -> the loss and one update -> the curriculum (the stage switch, mining). Returns the step's
    metrics row and what it shows of the policy's answers (watch.py)."""
    args = su.args
    G = args.group_size if cur.stage == 1 else args.stage2_group_size
    mine = pick_questions(cur, args, step)[su.rank::su.world]
    batch = [items[i] for i in mine]
    t0 = time.time()
    with st.meter.phase("rollout"):   # seeds per (step, item): rollouts do not depend on how items are split
        seeds = [seed_of(args.seed, step, i) for i in mine]
        ro = sample_groups(su, st.model, tok, batch, G, seeds, logprobs=True)
    t_roll = time.time() - t0
    sc = score_groups(args, ro, batch)
    keep = [j for j in range(len(ro.outs)) if not (args.skip_zero_var and sc.zero_var[j // G])]
    lr = lr_at(step, args.steps, args.lr, args.lr if args.min_lr is None else args.min_lr, args.warmup)
    t2 = time.time()
    stats = policy_update(su, st, ro, sc.adv, keep, lr, step + 1)
    stats.update(rollout_s=t_roll, train_s=time.time() - t2 - stats["ref_s"])
    row = dict(step=step + 1, stage=cur.stage, pool=len(cur.pool), lr=lr)
    row.update(step_metrics(su, st, ro, sc, stats))
    picked = [extract_answer(t, batch[j // G]["options"]) for j, t in enumerate(ro.texts)]
    signals = merge_signals(gather_objects(answer_signals(ro.texts, picked, [it["answer"] for it in batch],
                                                          sc.parts, args.w_format)))
    questions = [build_messages(it)[1]["content"] for it in batch]
    index = [j * su.world + su.rank for j in range(len(mine))]   # each group's place in the whole batch
    shown = (step + 1, cur.stage, batch, questions, ro, sc, index)
    curriculum_step(su, st, tok, cur, items, row)
    return row, signals, shown


def pass_rates(su, model, tok, items, idx, seed):
    """Fraction of --mine-samples samples correct for each item index in idx (sharded over ranks,
    gathered)."""
    k, mine = su.args.mine_samples, idx[su.rank::su.world]
    # one queue over this rank's share: the engine keeps its slots full; seeds per item, as in any split
    ro = sample_groups(su, model, tok, [items[i] for i in mine], k, [seed_of(seed, i) for i in mine])
    rates = {i: sum(reward_parts(ro.texts[r], items[i], ro.reasons[r])[0] for r in range(j * k, (j + 1) * k))
             / k for j, i in enumerate(mine)}
    return {i: p for part in gather_objects(rates) for i, p in part.items()}


def evaluate_policy(su, model, tok, val):
    """Greedy accuracy and format rate on the held-out items (evaluate.py's runner and scoring)."""
    from evaluate import run_items, score_items
    with rollout_policy(su, model) as m:
        resp = run_items(m, tok, val, SamplingParams(su.args.max_new_tokens, 0.0), 0,
                         (su.rank, su.world, su.group), progress=False, slots=su.slots, cuda_graph=su.graph)
    resp = {k: v for p in gather_objects(resp) for k, v in p.items()}
    _, s = score_items(val, resp, "val")
    s["format"] = 100 * sum(format_ok(resp[it["id"]][0]) for it in val) / max(1, len(val))
    return s


def curriculum_step(su, st, tok, cur, items, row):
    """Stage 2 once rewards go sparse (the stage-1 policy exported then), and hard-sample mining at the switch
    and every --mine-every steps after (row: the step's metrics, which the mining's counts join)."""
    args, step = su.args, row["step"]
    switch = cur.observe(row["zero_var_frac"], step)
    if switch:   # the stage-1 policy, kept for the stage table (HF layout)
        with st.meter.phase("export"):
            export_hf(st.model, tok, os.path.join(args.out, "stage1"), su.rank)
    remine = (cur.stage == 2 and cur.last_mine is not None and step - cur.last_mine >= args.mine_every
              and args.steps - step >= args.mine_every)
    if switch or remine:
        t = time.time()
        idx = list(range(len(items)))
        if args.mine_max and len(idx) > args.mine_max:
            idx = sorted(random.Random(args.seed + step - 1).sample(idx, args.mine_max))
        with st.meter.phase("mining"):
            rates = pass_rates(su, st.model, tok, items, idx, args.seed + step - 1)
        info = cur.mine(rates, step)
        row.update({f"mined_{k}": v for k, v in info.items()}, mining_s=time.time() - t)
        print0(f"\nstep {step}: {'stage 2 begins' if switch else 're-mined'}: {info}")


def main(argv=None):
    args = get_args(argv)
    su, ckpt, tok, val, items = start(args)
    set_seed(args.seed)
    cur = Curriculum(items, args.stage1_tiers, args.sparsity_threshold, args.sparsity_window, args.stage2_at,
                     args.mix_right, args.hard_below, args.seed)
    if not cur.pool and not ckpt:
        raise SystemExit(f"{args.data}: no training item has a difficulty in --stage1-tiers "
                         f"{','.join(args.stage1_tiers)}: stage 1 would have nothing to train on")
    st, start_step = load_state(su, ckpt, cur)
    resumed = start_step if ckpt else None
    log = MetricsLog(os.path.join(args.out, "metrics.jsonl"), su.rank, resume_step=resumed)
    rollout_log = RolloutLog(args.out, su.rank, args.log_groups, args.print_every, resumed)
    canaries, wandb = Canaries(truncation=args.warn_truncation), Wandb(args.wandb, args, su.rank)
    print0(f"GRPO: {len(items)} train items ({len(cur.pool)} in the stage-1 pool), {len(val)} val | "
           f"world {su.world} on {su.device}")
    if start_step == 0 and val:
        s = evaluate_policy(su, st.model, tok, val)
        log.log(step=0, val_accuracy=s["accuracy"], val_n=s["n"], val_format=s["format"], stage=1)
        print0(f"step 0: val accuracy {s['accuracy']:.1f}%  format {s['format']:.1f}%")
    from tqdm import tqdm
    bar = tqdm(range(start_step, args.steps), desc="grpo", disable=su.rank != 0, initial=start_step,
               total=args.steps)
    for step in bar:
        row, signals, shown = grpo_step(su, st, tok, cur, items, step)
        row["warnings"] = canaries.check(step + 1, row, signals)
        groups = [x for part in gather_objects(rollout_log.groups(*shown)) for x in part]
        rollout_log.write(step + 1, groups)
        if val and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            s = evaluate_policy(su, st.model, tok, val)
            row.update(val_accuracy=s["accuracy"], val_n=s["n"], val_format=s["format"])
        log.log(**row)
        wandb.log(row, groups if args.print_every and (step + 1) % args.print_every == 0 else ())
        bar.set_postfix(stage=cur.stage, r=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}",
                        zv=f"{row['zero_var_frac']:.2f}")
        done = run_done(step + 1, args)
        if (step + 1) % args.save_every == 0 or done:
            with st.meter.phase("save"):
                extra = dict(curriculum=cur.state())
                save_checkpoint(args.out, st.model, st.opt, tok, step + 1, extra, su.rank)
        if done:
            break
    bar.close()
    wandb.finish()
    finish_run(st.model, tok, args, (su.rank, su.world), (st.meter, su.planned), "GRPO",
               ["reward", "accuracy", "zero_var_frac", "val_accuracy", "response_len", "entropy",
                "truncated_frac"])


if __name__ == "__main__":
    guard(main)

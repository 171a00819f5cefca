"""train_grpo.py: eq. 1 gradients per aggregation mode, clipping and KL by hand, rewards, curriculum."""
import math

import pytest
import torch

from train_grpo import (Curriculum, LossConfig, aggregate, graph_ok, group_advantages, grpo_denominator,
                        grpo_loss, kl_k3, reward_parts, token_objective)

OPTS = {"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "Clopidogrel"}
ITEM = dict(options=OPTS, answer="C")


def random_batch(seed=0, N=6, L=7, V=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, L, V, generator=g, requires_grad=True)
    tokens = torch.randint(0, V, (N, L), generator=g)
    lens = torch.tensor([7, 3, 5, 1, 6, 4])
    mask = (torch.arange(L)[None] < lens[:, None]).float()
    adv = torch.randn(N, generator=g)
    return logits, tokens, mask, lens, adv


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean", "seq-sum", "token-sum"])
def test_gradient_matches_naive_eq1(mode):
    logits, tokens, mask, lens, adv = random_batch()
    N, C = len(lens), 10
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    denom = grpo_denominator(mode, float(mask.sum()), N, C)
    loss = aggregate(token_objective(logp, logp.detach(), adv, 0.2, 0.28, False), mask, mode, denom)
    g_ours, = torch.autograd.grad(loss, logits)
    # naive: one sample at a time, log pi(y_i|x) as a sum of its token log-probs (eq. 1)
    total = 0.0
    n_tok = int(lens.sum())
    for i in range(N):
        lp = sum(torch.log_softmax(logits[i, t], -1)[tokens[i, t]] for t in range(int(lens[i])))
        if mode == "token-mean":
            total = total - adv[i] * lp / n_tok
        elif mode == "seq-mean":
            total = total - adv[i] * lp / int(lens[i]) / N
        elif mode == "seq-sum":
            total = total - adv[i] * lp / N
        else:
            total = total - adv[i] * lp / (N * C)
    g_naive, = torch.autograd.grad(total, logits)
    assert torch.allclose(g_ours, g_naive, atol=1e-6)
    assert torch.allclose(loss, total, atol=1e-6)


def test_split_over_ranks_adds_up():
    """What each rank computes with the global denominator sums to the one-batch loss."""
    logits, tokens, mask, lens, adv = random_batch(1)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    per = token_objective(logp, logp, adv, 0.2, 0.2, False)
    for mode in ("token-mean", "seq-mean"):
        denom = grpo_denominator(mode, float(mask.sum()), 6, 10)
        whole = aggregate(per, mask, mode, denom)
        halves = aggregate(per[:3], mask[:3], mode, denom) + aggregate(per[3:], mask[3:], mode, denom)
        assert torch.allclose(whole, halves)


def test_clipping_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))    # ratios, since old log-prob is 0
    pos = token_objective(logp, old, torch.tensor([1.0]), 0.2, 0.28, True)
    neg = token_objective(logp, old, torch.tensor([-1.0]), 0.2, 0.28, True)
    # A > 0: -min(r, clip(r)) ; A < 0: -min(-r, -clip(r)) = max(r, clip(r))
    assert torch.allclose(pos, torch.tensor([[-1.28, -0.5, -1.1, -0.7]]), atol=1e-6)
    assert torch.allclose(neg, torch.tensor([[1.5, 0.8, 1.1, 0.8]]), atol=1e-6)
    # clipped tokens carry no gradient
    lp = logp.clone().requires_grad_(True)
    token_objective(lp, old, torch.tensor([1.0]), 0.2, 0.28, True).sum().backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 2] != 0
    # without clipping (on-policy, one update) the objective is exactly -A log pi
    assert torch.equal(token_objective(logp, old, torch.tensor([2.0]), 0.2, 0.28, False), -2.0 * logp)


def test_kl_k3_by_hand():
    logp = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    ref = torch.log(torch.tensor([0.1, 0.5, 0.6]))
    want = [0.5 - math.log(0.5) - 1, 0.0, 2.0 - math.log(2.0) - 1]
    assert torch.allclose(kl_k3(logp, ref), torch.tensor(want), atol=1e-6)
    assert (kl_k3(logp, ref) >= 0).all()


@pytest.mark.parametrize("text,reason,want", [
    ("<think>x</think>\n<answer>C</answer>", "stop", (1.0, 1.0)),
    ("reasoning <answer>c</answer>", "stop", (1.0, 1.0)),                       # lowercase letter
    ("reasoning <answer>Ｃ</answer>", "stop", (1.0, 1.0)),                      # full-width
    ("reasoning <answer>Warfarin</answer>", "stop", (1.0, 1.0)),               # option text
    ("reasoning <answer>C</answer> and some trailing text", "stop", (1.0, 0.0)),  # right, badly formed
    ("<answer>C</answer><answer>C</answer>", "stop", (0.0, 0.0)),              # several tags
    ("<answer>A</answer> no wait <answer>C</answer>", "stop", (0.0, 0.0)),
    ("<answer>C, D</answer>", "stop", (0.0, 1.0)),                             # several letters
    ("<answer>CD</answer>", "stop", (0.0, 1.0)),
    ("<answer></answer>", "stop", (0.0, 1.0)),                                 # empty tag
    ("<answer>B</answer>", "stop", (0.0, 1.0)),                                # wrong
    ("the answer is C", "stop", (0.0, 0.0)),                                   # no tag
    ("reasoning <answer>C</answer>", "length", (0.0, 0.0)),                    # truncated
])
def test_reward_cases(text, reason, want):
    assert reward_parts(text, ITEM, reason) == want


def test_reward_ambiguous_option_text_and_think_flag():
    item = dict(options={"A": "Heparin", "B": "heparin", "C": "x", "D": "y"}, answer="A")
    assert reward_parts("<answer>Heparin</answer>", item, "stop") == (0.0, 1.0)
    assert reward_parts("<answer>C</answer>", ITEM, "stop", require_think=True) == (1.0, 0.0)


def test_reward_require_option():
    item = dict(options={"A": "Heparin", "B": "Warfarin", "C": "x", "D": "y"}, answer="A")
    assert reward_parts("<answer>Aspirin</answer>", item, "stop") == (0.0, 1.0)            # well-formed tag
    assert reward_parts("<answer>Aspirin</answer>", item, "stop", require_option=True) == (0.0, 0.0)
    assert reward_parts("<answer>Warfarin</answer>", item, "stop", require_option=True) == (0.0, 1.0)
    assert reward_parts("<answer>heparin</answer>", item, "stop", require_option=True) == (1.0, 1.0)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    a = group_advantages(r, 4)
    assert torch.allclose(a, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    s = group_advantages(r, 4, std_scale=True)
    assert torch.allclose(s[:4], a[:4] / (0.5 + 1e-4), atol=1e-5) and (s[4:] == 0).all()


def test_curriculum_switch_and_mining():
    items = [dict(difficulty=d) for d in ["Easy", "Moderate", "Difficult", "Easy", "Difficult", "Moderate"]]
    cur = Curriculum(items, {"Easy", "Moderate"}, threshold=0.5, window=3, stage2_at=None, mix_right=0.5,
                     hard_below=0.5, seed=0)
    assert cur.pool == [0, 1, 3, 5]
    # a scripted policy: sparsity rising as it masters stage 1
    assert [cur.observe(z, s) for s, z in enumerate([0.1, 0.9, 0.3, 0.6, 0.7], 1)] == [False, False, False,
                                                                                       True, True]
    rates = {0: 1.0, 1: 0.25, 2: 0.75, 3: 1.0, 4: 1.0, 5: 0.0}
    info = cur.mine(rates, step=5)
    # hard: failing items (1, 5) and unsolved Difficult (2); Difficult 4 is solved; mix adds 3 solved ones
    assert cur.stage == 2 and info["hard"] == 3 and info["right_mixed"] == 3
    assert {1, 2, 5} <= set(cur.pool) and len(cur.pool) == 6
    assert not cur.observe(1.0, 6)   # no second switch
    forced = Curriculum(items, {"Easy"}, 0.99, 100, stage2_at=2, mix_right=0.0, hard_below=0.5, seed=0)
    assert [forced.observe(0.0, s) for s in (1, 2)] == [False, True]
    forced.mine(rates, 2)
    assert forced.pool == [1, 2, 5]


def test_the_cuda_graph_waits_for_the_tensor_parallel_degree():
    """--cuda-graph on several GPUs needs a tensor-parallel shard (FSDP's gathered policy runs hooks on the
    host): kept while --rollout-tp 0 has not picked its degree yet, dropped once it picks 1, kept for N > 1;
    never on a CPU."""
    assert graph_ok(True, "cuda", 1, 1) and graph_ok(True, "cuda", 8, 8) and graph_ok(True, "cuda", 8, 0)
    assert not graph_ok(True, "cuda", 8, 1) and not graph_ok(True, "cpu", 1, 1)
    assert not graph_ok(False, "cuda", 1, 1)


def test_grpo_loss_is_eq_1_to_3_by_hand():
    """grpo_loss, a pure function of (log-probs, old log-probs, advantages, mask): with the paper's
    aggregation it is -1/N_tok sum_i sum_t A_i log pi(y_it) (eq. 1 with A = r - mean r, eq. 2) plus
    beta * KL(pi || ref) by the k3 estimator (eq. 3), summed over the same tokens; with reused data (PPO) the
    clipped ratio replaces log pi. Computed here token by token in Python floats."""
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(3, 4, generator=g) * 3
    old, ref = logp + 0.3 * torch.randn(3, 4, generator=g), logp + 0.2 * torch.randn(3, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float)
    r = torch.tensor([1.0, 0.1, 0.0])
    adv = r - r.mean()
    n = float(mask.sum())
    for beta, clip in ((0.0, False), (0.04, False), (0.04, True)):
        hp = LossConfig("token-mean", n, 0.2, 0.28, clip, beta)
        want = 0.0
        for i in range(3):
            for t in range(4):
                if not mask[i, t]:
                    continue
                lp, a = float(logp[i, t]), float(adv[i])
                if clip:
                    rho = math.exp(lp - float(old[i, t]))
                    term = -min(rho * a, min(max(rho, 0.8), 1.28) * a)
                else:
                    term = -a * lp
                d = float(ref[i, t]) - lp
                want += term + beta * (math.exp(d) - d - 1)
        got = grpo_loss(logp, old, adv, mask, hp, ref if beta else None)
        assert abs(float(got) - want / n) < 1e-6, (beta, clip)

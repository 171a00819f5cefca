"""engine.generate (continuous batching over fixed slots) against the static paths it replaces: the same
tokens and finish reasons as fast.generate and model.generate (fp32, CPU) whatever the number of slots,
the order the requests arrive in, or the per-row budgets; and the schedule it promises (decode passes)."""
import pytest

import engine
import fast
from hf_io import load_model
from model import generate
from test_fast import SAMPLED
from test_model import hf_model, ragged_batch

CASES = (dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, top_k=20, num_samples=4, seed=3), SAMPLED)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_engine_makes_the_static_tokens_with_any_slots(kind, tmp_path):
    """Greedy and sampled, rows stopping early, G samples a prompt: one slot (every request queued), a few
    (a queue longer than the slots, prompts half admitted), all rows at once, and the fixed-shape step the
    CUDA graph captures: the completions and reasons of fast.generate and of model.generate, log-probs
    within float rounding."""
    _, path = hf_model(kind, kind == "qwen2", tmp_path, seed=15)
    m = load_model(path)
    prompts = ragged_batch(97, [3, 14, 7, 1, 9], seed=16)
    for kw in CASES:
        plain = generate(m, prompts, max_new_tokens=12, return_logprobs=True, **kw)
        assert fast.generate(m, prompts, max_new_tokens=12, **kw) == plain[:2]
        for slots, graph in ((1, False), (3, False), (7, True), (None, False)):
            got = engine.generate(m, prompts, max_new_tokens=12, return_logprobs=True, slots=slots,
                                  cuda_graph=graph, **kw)
            assert got[:2] == plain[:2], (kw, slots, graph)
            assert max(abs(a - b) for x, y in zip(got[2], plain[2]) for a, b in zip(x, y)) < 1e-3
    assert "stop" in plain[1] and "length" in plain[1]


def test_arrival_order_and_budgets_change_no_token(tmp_path):
    """A completion depends on its prompt, its sample index and its seed only: the same requests in another
    order (each prompt keeping its seed) give the same completions; per-row budgets (the scripted stop of
    bench/rollout.py) end each row at its own length, as fast.generate does with them."""
    _, path = hf_model("qwen3", True, tmp_path, seed=21)
    m = load_model(path)
    prompts = ragged_batch(97, [5, 11, 2, 8, 13, 4], seed=22)
    seeds = [40 + i for i in range(len(prompts))]
    kw = dict(temperature=1.0, num_samples=2, max_new_tokens=10)
    base = engine.generate(m, prompts, seed=seeds, slots=3, **kw)[0]
    order = [4, 0, 5, 2, 1, 3]
    moved = engine.generate(m, [prompts[i] for i in order], seed=[seeds[i] for i in order], slots=5, **kw)[0]
    for new, i in enumerate(order):
        assert moved[2 * new:2 * new + 2] == base[2 * i:2 * i + 2]
    budgets = [1, 7, 3, 10, 2, 5, 9, 4, 6, 8, 1, 2]
    kw["max_new_tokens"] = budgets
    want = fast.generate(m, prompts, seed=seeds, **kw)
    got = engine.generate(m, prompts, seed=seeds, slots=4, **kw)
    assert got == want and [len(c) for c in got[0]] == budgets and set(got[1]) == {"length"}


def test_schedule_refills_finished_slots(tmp_path):
    """The decode passes a queue costs: with budgets 3, 1, 2 and one slot, each request runs alone (2 + 0 + 1
    passes: a request's first token comes from its prefill); with three slots they run side by side (as long
    as the longest, 2), finished rows leaving the batch once the queue is empty (3 rows computed, not 6)."""
    _, path = hf_model("qwen2", False, tmp_path, seed=3)
    m = load_model(path)
    prompts = ragged_batch(97, [4, 6, 5], seed=4)
    for slots, passes, rows in ((1, 3, 3), (3, 2, 3)):
        st = {}
        engine.generate(m, prompts, max_new_tokens=[3, 1, 2], temperature=0.0, slots=slots, stats=st)
        assert (st["passes"], st["row_steps"]) == (passes, rows), slots
    with pytest.raises(ValueError, match="3 rows need 3 budgets"):
        engine.generate(m, prompts, max_new_tokens=[3, 1], slots=2)


def test_prefill_in_runs_of_bounded_tokens(tmp_path):
    """A step's arrivals are prefilled at most prefill_tokens prompt tokens a forward (a prompt longer than that
    alone): runs cover every arrival once, in order; and runs of any size give the same completions."""
    assert engine.token_chunks([7, 8, 9, 10], [5, 5, 12, 1], 10) == [[7, 8], [9], [10]]
    assert engine.token_chunks([], [], 10) == []
    _, path = hf_model("qwen2", True, tmp_path, seed=5)
    m = load_model(path)
    prompts = ragged_batch(97, [6, 14, 3, 9, 11], seed=6)
    kw = dict(temperature=1.0, num_samples=2, max_new_tokens=8, seed=7, slots=10)
    forwards = []
    real = engine.prefill
    engine.prefill = lambda model, ps, *a: (forwards.append(sum(map(len, ps))), real(model, ps, *a))[1]
    try:
        bounded = engine.generate(m, prompts, prefill_tokens=15, **kw)
    finally:
        engine.prefill = real
    assert max(forwards) <= 15 and sum(forwards) == sum(map(len, prompts))
    assert bounded == engine.generate(m, prompts, **kw)

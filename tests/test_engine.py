"""engine.generate (continuous batching over fixed slots) against model.generate, the textbook loop: the same
tokens and finish reasons (fp32, CPU) whatever the number of slots, the order the requests arrive in, the
per-row budgets, packed weights or not; the schedule it promises (decode passes); and bench/static.py, the
static batches the rollout bench measures it against, making the same tokens."""
import contextlib
import os
import sys

import pytest
import torch

import engine
import fast
from common import cpu_has_native_bf16
from hf_io import load_model
from model import SamplingParams as SP
from model import generate
from test_model import hf_model, ragged_batch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import static  # noqa: E402

# (sampling, seed): greedy; top-p / top-k, 4 samples a prompt; a stop set that ends ~1 row in 3 early
CASES = ((SP(12, temperature=0.0), None), (SP(12, temperature=1.0, top_p=0.9, top_k=20, num_samples=4), 3),
         (SP(12, temperature=1.0, num_samples=3, stop_ids=tuple(range(3, 12))), 5))


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_engine_makes_the_plain_tokens_with_any_slots(kind, tmp_path):
    """Greedy and sampled, rows stopping early, G samples a prompt: one slot (every request queued), a few
    (a queue longer than the slots, prompts half admitted), all rows at once, and the fixed-shape step the
    CUDA graph captures: the completions and reasons of model.generate, log-probs within float rounding;
    the static batches of bench/static.py, eager and fixed-shape, the same tokens."""
    _, path = hf_model(kind, kind == "qwen2", tmp_path, seed=15)
    m = load_model(path)
    prompts = ragged_batch(97, [3, 14, 7, 1, 9], seed=16)
    for sp, seed in CASES:
        plain = generate(m, prompts, SP(**{**vars(sp), "logprobs": True}), seed)
        for slots, graph in ((1, False), (3, False), (7, True), (None, False)):
            got = engine.generate(m, prompts, SP(**{**vars(sp), "logprobs": True}), seed, slots, graph)
            assert got[:2] == plain[:2], (sp, slots, graph)
            assert max(abs(a - b) for x, y in zip(got[2], plain[2]) for a, b in zip(x, y)) < 1e-3
        for graph in (False, True):
            assert static.generate(m, prompts, sp, seed, cuda_graph=graph) == plain[:2], (sp, graph)
    assert "stop" in plain[1] and "length" in plain[1]


def test_arrival_order_and_budgets_change_no_token(tmp_path):
    """A completion depends on its prompt, its sample index and its seed only: the same requests in another
    order (each prompt keeping its seed) give the same completions; per-row budgets (the scripted stop of
    bench/rollout.py) end each row at its own length, as model.generate does with them."""
    _, path = hf_model("qwen3", True, tmp_path, seed=21)
    m = load_model(path)
    prompts = ragged_batch(97, [5, 11, 2, 8, 13, 4], seed=22)
    seeds = [40 + i for i in range(len(prompts))]
    sp = SP(10, temperature=1.0, num_samples=2)
    base = engine.generate(m, prompts, sp, seeds, slots=3)[0]
    order = [4, 0, 5, 2, 1, 3]
    moved = engine.generate(m, [prompts[i] for i in order], sp, [seeds[i] for i in order], slots=5)[0]
    for new, i in enumerate(order):
        assert moved[2 * new:2 * new + 2] == base[2 * i:2 * i + 2]
    budgets = [1, 7, 3, 10, 2, 5, 9, 4, 6, 8, 1, 2]
    sp = SP(budgets, temperature=1.0, num_samples=2)
    want = generate(m, prompts, sp, seeds)
    got = engine.generate(m, prompts, sp, seeds, slots=4)
    assert got == want and [len(c) for c in got[0]] == budgets and set(got[1]) == {"length"}
    assert static.generate(m, prompts, sp, seeds) == want


def test_schedule_refills_finished_slots(tmp_path):
    """The decode passes a queue costs: with budgets 3, 1, 2 and one slot, each request runs alone (2 + 0 + 1
    passes: a request's first token comes from its prefill); with three slots they run side by side (as long
    as the longest, 2), finished rows leaving the batch once the queue is empty (3 rows computed, not 6)."""
    _, path = hf_model("qwen2", False, tmp_path, seed=3)
    m = load_model(path)
    prompts = ragged_batch(97, [4, 6, 5], seed=4)
    for slots, passes, rows in ((1, 3, 3), (3, 2, 3)):
        st = {}
        engine.generate(m, prompts, SP([3, 1, 2], temperature=0.0), slots=slots, stats=st)
        assert (st["passes"], st["row_steps"]) == (passes, rows), slots
    with pytest.raises(ValueError, match="3 rows need 3 budgets"):
        engine.generate(m, prompts, SP([3, 1]), slots=2)
    assert engine.generate(m, [], SP(4)) == ([], [])   # a rank with no share of a call


def test_prefill_in_runs_of_bounded_tokens(tmp_path, monkeypatch):
    """A step's arrivals are prefilled at most PREFILL_TOKENS prompt tokens a forward (a prompt longer than
    that alone): runs cover every arrival once, in order; and runs of any size give the same completions."""
    assert engine.token_chunks([7, 8, 9, 10], [5, 5, 12, 1], 10) == [[7, 8], [9], [10]]
    assert engine.token_chunks([], [], 10) == []
    _, path = hf_model("qwen2", True, tmp_path, seed=5)
    m = load_model(path)
    prompts = ragged_batch(97, [6, 14, 3, 9, 11], seed=6)
    sp = SP(8, temperature=1.0, num_samples=2)
    whole = engine.generate(m, prompts, sp, 7, slots=10)
    forwards = []
    real = engine.prefill
    monkeypatch.setattr(engine, "prefill", lambda model, ps, *a: (forwards.append(sum(map(len, ps))),
                                                                  real(model, ps, *a))[1])
    monkeypatch.setattr(engine, "PREFILL_TOKENS", 15)
    assert engine.generate(m, prompts, sp, 7, slots=10) == whole
    assert max(forwards) <= 15 and sum(forwards) == sum(map(len, prompts))


def test_bucketed_prefill(tmp_path, monkeypatch):
    """Buckets cover every row once and keep their padding within the allowed share (or hold a single row); a
    single bucket (the plain padded prefill) gives the same tokens."""
    _, path = hf_model("qwen3", True, tmp_path, seed=21)
    m = load_model(path)
    lens = [3, 20, 4, 18, 9, 19, 1]
    prompts = ragged_batch(97, lens, seed=22)
    buckets = fast.prefill_buckets(lens, waste=0.15)
    assert sorted(i for rows, _ in buckets for i in rows) == list(range(len(lens))) and len(buckets) > 1
    for rows, longest in buckets:
        assert longest == max(lens[i] for i in rows)
        assert len(rows) == 1 or len(rows) * longest <= 1.15 * sum(lens[i] for i in rows)
    for sp, seed in CASES[::2]:
        got = engine.generate(m, prompts, sp, seed, slots=3)
        monkeypatch.setattr(engine, "WASTE", 1e9)
        assert engine.generate(m, prompts, sp, seed, slots=3) == got
        monkeypatch.undo()


def packing_off(kind, tmp_path, dtype, amp, seed, monkeypatch):
    """Tokens with the oneDNN-packed weights, and without (packed_linears a no-op): the same."""
    _, path = hf_model(kind, False, tmp_path, seed=seed)
    prompts = ragged_batch(97, [3, 14, 7, 9], seed=seed + 1)
    m = load_model(path, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        runs = [engine.generate(m, prompts, sp, seed, 2) for sp, seed in CASES[::2]]
        monkeypatch.setattr(engine, "packed_linears", lambda *a: contextlib.nullcontext())
        assert [engine.generate(m, prompts, sp, seed, 2) for sp, seed in CASES[::2]] == runs
        monkeypatch.undo()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="packing needs oneDNN")
@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_packed_fp32_weights_make_the_same_tokens(kind, tmp_path, monkeypatch):
    packing_off(kind, tmp_path, torch.float32, False, 19, monkeypatch)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="bf16 is packed only on CPUs with native bf16")
@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_packed_bf16_weights_make_the_same_tokens(kind, tmp_path, monkeypatch):
    """bf16 weights, and fp32 weights under bf16 autocast (the GRPO rollout case)."""
    packing_off(kind, tmp_path, torch.bfloat16, False, 17, monkeypatch)
    packing_off(kind, tmp_path, torch.float32, True, 17, monkeypatch)


def test_plain_switch(tmp_path):
    """--plain: engine.generate is model.generate."""
    _, path = hf_model("qwen2", True, tmp_path, seed=2)
    m = load_model(path)
    try:
        fast.ON = False
        for sp, seed in CASES:
            prompts = [[1, 2, 3], [4, 5]]
            assert engine.generate(m, prompts, sp, seed, 1) == generate(m, prompts, sp, seed)
    finally:
        fast.ON = True

"""tp.py: tensor-parallel rollouts built from the FSDP shards, against the gathered policy on 2 gloo ranks; the
memory plan with --rollout-tp."""
import re
import subprocess
import sys

import pytest

from helpers import ROOT, config_only, run
from hf_io import save_model
from memplan import GB, Job, plan, total, tp_params, verdict
from model import ModelConfig, Transformer
from tp import degree_problem, local_config

TP_CHECK = r'''
import sys, torch, torch.distributed as dist
from common import init_distributed
from fsdp import load_sharded
import engine, tp
from model import SamplingParams as SP
rank, world, device = init_distributed("cpu")
model = load_sharded(sys.argv[1], device, world)
group = tp.Group(2, world, rank)
g = torch.Generator().manual_seed(rank)   # each rank its own requests, as in GRPO
mine = [torch.randint(0, 97, (int(n),), generator=g).tolist()
        for n in torch.randint(2, 14, (3,), generator=g)]
seeds = [1000 * rank + i for i in range(3)]
ids = torch.arange(1, 13)[None] % 97
greedy, sampled = SP(24, 0.0, stop_ids=(5,)), SP(24, 1.0, stop_ids=(5,), num_samples=3, logprobs=True)
with torch.no_grad():
    with tp.policy(model, group) as m:
        held = sum(p.numel() for p in m.parameters())
        assert m.config.num_key_value_heads == max(1, model.config.num_key_value_heads // 2)
        lt = m(ids)[0].double()
        tg = tp.generate(m, mine, greedy, group=group, seed=seeds, slots=2)
        ts = tp.generate(m, mine, sampled, group=group, seed=seeds, slots=4)
    with tp.policy(model, None) as m:
        lf = m(ids)[0].double()
        fg = engine.generate(m, mine, greedy, seeds, slots=3)
        fs = engine.generate(m, mine, sampled, seeds, slots=9)
rel = float((lt - lf).abs().max() / lf.abs().max())
assert rel <= 1e-5, rel
assert tg == fg, (tg, fg)
assert ts[0] == fs[0] and ts[1] == fs[1], "sampled completions differ"
assert max(abs(a - b) for x, y in zip(ts[2], fs[2]) for a, b in zip(x, y)) < 1e-4
print(f"rank {rank}: tp ok, rel {rel:.1e}, {held} parameters held", flush=True)
dist.destroy_process_group()
'''


@pytest.mark.parametrize("kind", ["qwen2-tied", "qwen2-one-kv-head", "qwen3-untied"])
def test_tensor_parallel_generation_equals_the_gathered_policy(kind, tmp_path):
    """2 ranks, each with its own prompts: the group's queue gives each rank the greedy and sampled outputs
    (and log-probs) the gathered policy gives it for the same seeds; logits agree within 1e-5 relative
    (fp32; the row-parallel all_reduce sums in another order). One KV head: replicated on both ranks. Each
    rank holds what memplan.tp_params says, about half the model."""
    extra = dict(qwen2_tied={}, qwen2_one_kv_head=dict(num_key_value_heads=1),
                 qwen3_untied=dict(model_type="qwen3", attention_bias=False, qk_norm=True,
                                   tie_word_embeddings=False))[kind.replace("-", "_")]
    cfg = ModelConfig.from_name("nano", vocab_size=97, **extra)
    save_model(Transformer(cfg).init_weights(1), str(tmp_path / "m"))
    (tmp_path / "check.py").write_text(TP_CHECK)
    out = run([str(tmp_path / "check.py"), str(tmp_path / "m")], nproc=2)
    assert out.count("tp ok") == 2
    held = [int(x) for x in re.findall(r"(\d+) parameters held", out)]
    # packed linears (a CPU) hold their weights outside .parameters(): the rest, biases included, counts here
    whole, linear = tp_params(cfg, 2)
    assert len(held) == 2 and all(whole - linear <= h <= whole for h in held)
    assert whole < 0.6 * sum(p.numel() for p in Transformer(cfg).parameters())


def test_degree_problem_names_the_degrees_that_work():
    q7 = ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4)
    assert degree_problem(q7, 4, 8) is None and degree_problem(q7, 2, 8) is None
    msg = degree_problem(q7, 8, 8)
    assert "28 attention heads" in msg and "1, 2, 4" in msg
    assert "divide" in degree_problem(q7, 3, 8)
    local = local_config(q7, 4)
    assert (local.num_attention_heads, local.num_key_value_heads, local.head_dim) == (7, 1, 128)


def test_plan_with_tensor_parallel_rollouts():
    """The gathered policy becomes 1/N of it (plus a weight's transfer buffers) and the KV cache of a slot
    shrinks with the rank's KV heads."""
    q32 = ModelConfig(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                      num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False)

    def get(rows, key):
        return sum(b for w, b, _ in rows if key in w)
    one = plan(q32, Job("grpo", 8, True, True, 4096, True, slots=64, ctx=2842))
    eight = plan(q32, Job("grpo", 8, True, True, 4096, True, slots=64, ctx=2842, tp=8))
    assert get(one, "policy gathered") / GB > 60 and not get(eight, "policy gathered")
    assert 7 < get(eight, "tensor-parallel shard") / GB < 8
    assert get(eight, "KV cache") * 8 == pytest.approx(get(one, "KV cache"))
    assert verdict(one, 80 * GB) and verdict(eight, 80 * GB) is None and total(eight) < total(one) - 50 * GB


def test_dry_run_picks_the_smallest_degree_that_fits(tmp_path):
    """32B GRPO on 8 x 80 GB (the paper's loss, eq. 1: no KL reference): refused with the whole policy
    gathered, naming --rollout-tp; accepted with --rollout-tp 8; --rollout-tp 0 finds the smallest degree."""
    q32 = ModelConfig(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                      num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False)
    d, data = config_only(tmp_path, q32, "q32")
    args = [sys.executable, "train_grpo.py", "--init", str(d), "--data", str(data), "--dry-run",
            "--plan-world", "8", "--gpu-mem", "80", "--bf16", "--questions-per-step", "64", "--group-size", "8",
            "--stage2-group-size", "16", "--max-new-tokens", "2048", "--micro-batch", "2", "--act-ckpt",
            "--val-size", "0"]

    def dry(*extra):
        p = subprocess.run(args + list(extra), cwd=ROOT, capture_output=True, text=True, timeout=300)
        return p.returncode, p.stdout + p.stderr
    rc, out = dry("--rollout-tp", "1")
    assert rc == 1 and "policy gathered (61.0 GB)" in out.splitlines()[-1] and "--rollout-tp" in out
    rc, out = dry("--rollout-tp", "8")
    assert rc == 0 and "memory plan: fits" in out and "tensor-parallel shard, 1/8" in out
    rc, out = dry("--rollout-tp", "0")
    smallest = int(out.split("--rollout-tp 0: ")[1].split(",")[0])
    assert rc == 0 and smallest in (2, 4, 8) and "the smallest degree that fits" in out
    rc, out = dry("--rollout-tp", "3")
    assert rc == 1 and "--rollout-tp 3 must divide" in out

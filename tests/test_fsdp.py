"""fsdp.py: shards read straight from the files, sharded checkpoints that resume on any world size, crash-safe
checkpoint folders; memplan.py: the plan and its verdict."""
import os
import subprocess
import sys

import pytest
import torch

from fsdp import latest_checkpoint
from helpers import ROOT, config_only, run
from hf_io import save_model
from model import ModelConfig, Transformer

SHARD_CHECK = r'''
import sys, torch, torch.distributed as dist
from common import init_distributed
from fsdp import load_sharded, owned_rows
from hf_io import load_model
rank, world, device = init_distributed("cpu")
for path, dtype in zip(sys.argv[1::2], sys.argv[2::2]):
    dtype = getattr(torch, dtype)
    full = load_model(path, dtype=dtype)            # the reference: every weight, whole
    sharded = load_sharded(path, device, world, dtype=dtype)
    for (name, p), (name2, q) in zip(sharded.named_parameters(), full.named_parameters()):
        assert name == name2
        lo, hi = owned_rows(q.shape[0], rank, world)
        assert p.to_local().dtype == dtype and torch.equal(p.to_local(), q.detach()[lo:hi]), name
    print(f"rank {rank}: {path}: {len(list(full.parameters()))} tensors equal", flush=True)
dist.destroy_process_group()
'''


@pytest.mark.parametrize("kind", ["qwen2-untied", "qwen3-tied"])
def test_sharded_load_equals_the_files(kind, tmp_path):
    """Each rank's shards (odd row counts, fused q/k/v and gate/up split across ranks, several files, a bf16
    file read into fp32) equal the rows of the file's tensors."""
    qwen3 = kind.startswith("qwen3")
    cfg = ModelConfig.from_name("nano", vocab_size=97, model_type="qwen3" if qwen3 else "qwen2",
                                attention_bias=not qwen3, qk_norm=qwen3, tie_word_embeddings=qwen3)
    m = Transformer(cfg).init_weights(3)
    (tmp_path / "check.py").write_text(SHARD_CHECK)
    cases = []
    for file_dtype, load_dtype in ((torch.float32, "float32"), (torch.bfloat16, "float32"), (torch.bfloat16,
                                                                                             "bfloat16")):
        path = tmp_path / f"m_{file_dtype}"
        save_model(m.to(file_dtype), str(path), max_shard_bytes=60_000)
        assert os.path.exists(path / "model.safetensors.index.json")
        cases += [str(path), load_dtype]
    out = run([str(tmp_path / "check.py")] + cases, nproc=2)
    assert out.count("tensors equal") == 6


def test_latest_checkpoint_skips_incomplete(tmp_path):
    """Only folders with COMPLETE count: a kill mid-save (no marker) or mid-deletion (marker removed first)
    leaves the newest complete checkpoint to resume from."""
    root = tmp_path / "ckpt"
    for step, complete in ((3, True), (6, True), (9, False)):
        (root / f"step-{step:06d}").mkdir(parents=True)
        if complete:
            (root / f"step-{step:06d}" / "COMPLETE").write_text(f"{step}\n")
    assert latest_checkpoint(str(tmp_path)) == str(root / "step-000006")
    os.remove(root / "step-000006" / "COMPLETE")
    assert latest_checkpoint(str(tmp_path)) == str(root / "step-000003")
    assert latest_checkpoint(str(tmp_path / "nothing")) is None


def test_memory_plan_verdicts():
    """The plan counts what FSDP2 shards (1/W) and what it does not, and refuses with the flag to change."""
    from memplan import GB, Job, plan, total, verdict
    cfg = ModelConfig.from_name("qwen2.5-0.5b")
    one = plan(cfg, Job("sft", 1, True, True, 8192))
    eight = plan(cfg, Job("sft", 8, True, True, 8192))
    get = lambda rows, key: next(b for w, b, _ in rows if w.startswith(key))   # noqa: E731
    assert get(one, "AdamW") == pytest.approx(8 * get(eight, "AdamW"))
    # one GPU autocasts (fp32 residual stream); eight use FSDP mixed precision (bf16 throughout)
    assert get(eight, "activations") < get(one, "activations")
    assert get(plan(cfg, Job("sft", 1, False, False, 8192)), "activations") == \
        get(plan(cfg, Job("sft", 4, False, False, 8192)), "activations")
    ckpt = plan(cfg, Job("sft", 8, True, True, 8192, True))
    assert get(ckpt, "activations") < get(eight, "activations") / 5
    assert verdict(eight, 80 * GB) is None
    small = verdict(eight, total(eight) * 0.5)
    assert small.startswith("memory plan:") and "activations" in small and "--act-ckpt" in small


def test_dry_run_refuses_what_cannot_fit_and_accepts_the_recipe(tmp_path):
    """--dry-run reads config.json (no weights): the README's 8 x 80 GB 7B GRPO recipe fits; the same with a
    micro-batch of 64 full-length completions and no activation checkpointing does not, in one line."""
    cfg = ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
                      tie_word_embeddings=False)
    d, data = config_only(tmp_path, cfg, "qwen7b")
    recipe = ["train_grpo.py", "--init", str(d), "--data", str(data), "--dry-run", "--plan-world", "8",
              "--gpu-mem", "80",
              "--bf16", "--questions-per-step", "64", "--group-size", "8", "--stage2-group-size", "16",
              "--max-new-tokens", "2048", "--micro-batch", "4", "--act-ckpt", "--kl-beta", "0.04",
              "--val-size", "0"]
    out = run(recipe)
    assert "memory plan per rank" in out and "memory plan: fits" in out
    # the rollout engine's KV cache: slots x context, as many slots as a step's 8 x 16 requests per rank
    assert "rollout: KV cache, 128 slots x " in out and "(--gen-slots)" in out
    p = subprocess.run([sys.executable] + recipe + ["--gen-slots", "4096"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    last = p.stdout.strip().splitlines()[-1]
    assert p.returncode == 1 and "4096 slots" in last and "lower --gen-slots" in last
    bad = recipe[:recipe.index("--micro-batch")] + ["--micro-batch", "64", "--kl-beta", "0.04", "--val-size",
                                                    "0"]
    p = subprocess.run([sys.executable] + bad, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("memory plan:") and "does not fit" in last and "--micro-batch" in last

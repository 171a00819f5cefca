"""watch.py and report.py: the rollout log, the trainer-vs-rollout log-prob mismatch, the canaries on scripted
policies, Weights & Biases offline, and report.html."""
import json
import os
from html.parser import HTMLParser

import pytest
import torch

from helpers import metrics, run
from test_pipeline import grpo_args


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trainer_and_rollout_logprobs_agree(dtype):
    """The same model scores a completion twice: token by token while sampling (KV cache, oneDNN-packed
    weights on a CPU) and all at once when training. fp32: the same numbers up to summation order; bf16
    autocast: bounded."""
    import engine
    from model import ModelConfig, SamplingParams, Transformer
    from train_grpo import completion_logprobs
    m = Transformer(ModelConfig.from_name("nano", vocab_size=97)).init_weights(0).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 9, 7)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        sp = SamplingParams(12, 1.0, num_samples=4, logprobs=True)
        outs, _, roll = engine.generate(m, prompts, sp, [1, 2, 3])
        pr = [p for p in prompts for _ in range(4)]
        lp, mask, _ = completion_logprobs(m, pr, outs, share=4)
    roll_t = torch.zeros_like(lp)
    for i, r in enumerate(roll):
        roll_t[i, :len(r)] = torch.tensor(r)
    per_token = ((lp - roll_t).abs() * mask).sum() / mask.sum()
    assert per_token < (1e-4 if dtype == torch.float32 else 0.05), float(per_token)
    assert all(len(r) == len(o) for r, o in zip(roll, outs))


def scripted(tiny, name, body):
    """train_grpo.py with its sample_groups replaced by a scripted policy (body: the completion text)."""
    runner = tiny / f"{name}.py"
    runner.write_text(
        "import sys\nimport train_grpo\n"
        "def sample_groups(su, model, tok, items, G, seeds, logprobs=False):\n"
        f"    texts = [{body} for it in items for _ in range(G)]\n"
        "    outs = [tok.encode(t) + [tok.convert_tokens_to_ids('<|im_end|>')] for t in texts]\n"
        "    return train_grpo.Rollouts([train_grpo.prompt_ids(tok, it) for it in items], outs, texts,\n"
        "                               ['stop'] * len(texts), None, 0, G)\n"
        "train_grpo.sample_groups = sample_groups\ntrain_grpo.main(sys.argv[1:])\n")
    return str(runner)


def test_canaries_trip_on_scripted_policies(tiny):
    """A policy that always answers A trips the letter canary; a completion cap below the answer's length
    trips the truncation canary; both are printed and logged."""
    out = run([scripted(tiny, "always_a", "'<think>sure</think><answer>A</answer>'")] +
              grpo_args(tiny, tiny / "always_a") + ["--steps", "2"])
    rows = [r for r in metrics(tiny / "always_a" / "metrics.jsonl") if "warnings" in r]
    collapse = "collapse onto one letter: 100% of the answers name A"
    assert rows and all(any(collapse in w for w in r["warnings"])
                        for r in rows)
    assert "warning (step 1): answers collapse onto one letter" in out
    out = run(["train_grpo.py"] + grpo_args(tiny, tiny / "capped") + ["--steps", "2", "--max-new-tokens",
                                                                      "2"])
    rows = [r for r in metrics(tiny / "capped" / "metrics.jsonl") if "warnings" in r]
    assert all(r["truncated_frac"] == 1.0
               and any("hit --max-new-tokens" in w for w in r["warnings"]) for r in rows)
    assert "warning (step 1): 100% of completions hit --max-new-tokens" in out


def test_rollout_log_and_report(tiny):
    """rollouts.jsonl holds each kept group once per step (prompt once, G completions with reward parts,
    advantage, finish reason, length); a group is printed every --print-every steps; report.html holds the
    curves and the groups side by side."""
    out = run(["train_grpo.py"] + grpo_args(tiny, tiny / "logged") + ["--log-groups", "3", "--print-every",
                                                                      "2"],
              nproc=2)
    groups = [json.loads(line) for line in open(tiny / "logged" / "rollouts.jsonl")]
    assert [(g["step"], g["index"]) for g in groups] == [(s, i) for s in (1, 2, 3, 4) for i in range(3)]
    g = groups[-1]
    assert len(g["completions"]) == 6 and g["stage"] == 2 and g["prompt"].count("Think it through") == 1
    c = g["completions"][0]
    assert set(c) == {"text", "correct", "format", "reward", "advantage", "finish", "length"}
    assert abs(sum(x["advantage"] for x in g["completions"])) < 1e-3   # A = r - group mean
    assert out.count("--- step 2 (stage 1), question") == 1 and "--- step 4 (stage 2)" in out
    row = metrics(tiny / "logged" / "metrics.jsonl")[1]
    for k in ("truncated_frac", "response_len_max", "slot_use", "logp_mismatch", "entropy", "rollout_tok_s",
              "zero_var_frac", "warnings"):
        assert k in row, k
    assert 0 < row["slot_use"] <= 1 and row["logp_mismatch"] < 1e-3

    class Parse(HTMLParser):
        imgs, cards, tables = 0, 0, 0

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            self.imgs += tag == "img" and a.get("src", "").startswith("data:image/png;base64,")
            self.cards += tag == "div" and "card" in a.get("class", "").split()
    p = Parse()
    p.feed(open(tiny / "logged" / "report.html", encoding="utf-8").read())
    assert p.imgs == 1 and p.cards >= 6


def test_wandb_offline(tiny, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run(["train_grpo.py"] + grpo_args(tiny, tiny / "wb") + ["--steps", "2", "--wandb", "nanofleming-test",
                                                             "--print-every", "1"])
    runs = [d for d in os.listdir(tiny / "wb" / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1 and any(f.endswith(".wandb") for f in os.listdir(tiny / "wb" / "wandb" / runs[0]))

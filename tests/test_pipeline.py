"""End to end on a tiny KG set: GRPO and evaluation give the same numbers on 1 and 2 gloo ranks, GRPO resumes
exactly, and evaluate.py runs over the shared benchmark samples with a trained tiny model."""
import json
import os
import re

from helpers import metrics, run

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def grpo_args(tiny, out):
    return ["--init", str(tiny / "sft"), "--data", str(tiny / "data" / "rl_train.jsonl"),
            "--out", str(out), "--steps", "4", "--questions-per-step", "4", "--group-size", "4",
            "--stage2-group-size", "6", "--stage2-at", "2", "--mine-max", "8", "--mine-samples", "2",
            "--mine-every", "2", "--val-size", "8", "--eval-every", "2", "--max-new-tokens", "40",
            "--micro-batch", "8"]


def grpo(tiny, out, nproc=1, extra=()):
    return run(["train_grpo.py"] + grpo_args(tiny, out) + list(extra), nproc=nproc)


def odd_reward_runner(tiny):
    """train_grpo.py with a stand-in reward that gives some groups variance and leaves others all-equal (the
    tiny policy never answers right): the parity of the completion's length, for questions of odd length."""
    runner = tiny / "odd_reward_grpo.py"
    runner.write_text("import sys\nimport train_grpo\n"
                      "train_grpo.reward_parts = lambda text, item, reason, *a: "
                      "(float(len(text) % 2 * len(item['question']) % 2), 1.0)\n"
                      "train_grpo.main(sys.argv[1:])\n")
    return str(runner)


# KL on, all-equal groups skipped, two completions a micro-batch: the ranks keep different numbers of
# completions
KL = ["--kl-beta", "0.05", "--skip-zero-var", "--micro-batch", "2", "--warmup", "0"]


def two_rank_run(tiny):
    """The 2-rank run the tests below compare with (each group's prompt scored once: --share-prompt 4)."""
    if not (tiny / "g2" / "model.safetensors").exists():
        # and three decode slots a rank: the rollout, mining and evaluation queues are longer than the slots
        extra = ["--share-prompt", "4", "--gen-slots", "3"]
        out = run([odd_reward_runner(tiny)] + grpo_args(tiny, tiny / "g2") + KL + extra, nproc=2)
        (tiny / "g2.log").write_text(out)
    return tiny / "g2"


def test_grpo_two_ranks_match_one_and_stages(tiny):
    """1 rank and 2 (FSDP2, gloo), all rows in slots at once and 3 slots a rank: the same rollouts, rewards,
    losses and KL. The rank with fewer kept
    completions runs empty-weight passes to keep the collective FSDP forwards in step; those passes once
    looked up reference log-probs that had not been computed for them. The reference is sharded: half of
    it on each rank."""
    run([odd_reward_runner(tiny)] + grpo_args(tiny, tiny / "g1") + KL)
    g2 = two_rank_run(tiny)
    held, whole = map(float, re.search(r"reference model: ([\d.]+) MB on rank 0, 1/2 of its ([\d.]+) MB",
                                       (tiny / "g2.log").read_text()).groups())
    assert abs(held - whole / 2) < 0.02 * whole
    a, b = metrics(tiny / "g1" / "metrics.jsonl"), metrics(g2 / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4]
    assert a[4]["kl"] > 0 and 0 < sum(r["zero_var_frac"] for r in a[1:]) < 4
    for x, y in zip(a[1:], b[1:]):
        for k in ("reward", "accuracy", "format_rate", "zero_var_frac", "response_len", "loss", "kl"):
            assert abs(x[k] - y[k]) <= 1e-4 * abs(x[k]) + 1e-7, (k, x, y)
    assert [r.get("stage") for r in a[1:]] == [1, 1, 2, 2]
    assert "mined_pool" in a[2] and a[3]["group_size"] == 6
    assert "mined_pool" not in a[4]   # no re-mining for a pool that no step would use
    for f in ("config.json", "model.safetensors", "curves.png", "report.html", "stage1/config.json"):
        assert os.path.exists(tiny / "g1" / f), f


def test_grpo_tensor_parallel_rollouts_match_the_gathered_policy(tiny):
    """--rollout-tp 2 on 2 ranks: each rank holds half of the policy to generate (built from the FSDP shards,
    tp.py) and the two ranks decode their requests in one queue; the rollouts, mining, evaluations, losses and
    KL are those of the 2-rank run that gathers the whole policy (fp32: the tokens do not move)."""
    g2 = two_rank_run(tiny)
    extra = ["--share-prompt", "4", "--gen-slots", "3", "--rollout-tp", "2"]
    out = run([odd_reward_runner(tiny)] + grpo_args(tiny, tiny / "tp2") + KL + extra, nproc=2)
    assert "rollouts tensor-parallel over 2" in out and "tensor-parallel shard, 1/2 (--rollout-tp)" in out
    a, b = metrics(g2 / "metrics.jsonl"), metrics(tiny / "tp2" / "metrics.jsonl")
    assert len(a) == len(b) == 5 and b[4]["kl"] > 0
    for x, y in zip(a, b):
        for k in ("reward", "accuracy", "zero_var_frac", "response_len", "val_accuracy", "stage", "pool"):
            assert x.get(k) == y.get(k), (k, x, y)
        for k in ("loss", "kl"):
            assert abs(x.get(k, 0) - y.get(k, 0)) <= 1e-6 * abs(x.get(k, 0)) + 1e-9, (k, x, y)


def test_grpo_exclude_leaves_out_the_sft_questions(tiny):
    """--exclude sft.jsonl (run.sh): RL only on the training questions that got no cold-start trace."""
    rows = [json.loads(line) for line in open(tiny / "data" / "rl_train.jsonl")]
    sft_ids = {str(json.loads(line)["id"]) for line in open(tiny / "data" / "sft.jsonl")}
    n_left = sum(str(r["id"]) not in sft_ids for r in rows)
    assert 8 < n_left < len(rows)
    out = grpo(tiny, tiny / "ex", extra=["--exclude", str(tiny / "data" / "sft.jsonl"), "--steps", "1"])
    assert f"GRPO: {n_left - 8} train items" in out   # 8 more held out for --val-size


def test_grpo_step_with_no_signal_leaves_weights_alone(tiny):
    """Zero reward weights: every group is all-equal, --skip-zero-var leaves nothing to train on. The step
    must be skipped, not taken: with 2 ranks the collective empty-weight pass divides by a 0 normaliser,
    and before this guard that put NaN into every weight."""
    from safetensors.torch import load_file
    grpo(tiny, tiny / "nosignal", nproc=2,
         extra=["--skip-zero-var", "--w-correct", "0", "--w-format", "0", "--steps", "2"])
    before = load_file(str(tiny / "sft" / "model.safetensors"))
    after = load_file(str(tiny / "nosignal" / "model.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        assert after[k].isfinite().all() and after[k].equal(before[k]), k
    rows = [r for r in metrics(tiny / "nosignal" / "metrics.jsonl") if "reward" in r]
    assert [r["skipped_update"] for r in rows] == [True,
                                                   True] and all(r["zero_var_frac"] == 1.0 for r in rows)


def test_evaluate_shared_samples_one_and_two_ranks(tiny):
    args = ["evaluate.py", "--model", str(tiny / "sft"), "--benchmarks", "medqa,medbullets,medxpertqa",
            "--file", f"medqa={FIX}/medqa_5opt_sample.jsonl", "--file",
            f"medbullets={FIX}/medbullets_op4_sample.jsonl",
            "--file", f"medxpertqa={FIX}/medxpertqa_text_sample.jsonl", "--max-new-tokens", "16",
            "--gen-slots", "8"]
    out = run(args + ["--out", str(tiny / "e1")])
    # two ranks, and two models in one launch (run.sh's four evaluations per seed): each as if run alone
    # and 3 decode slots a rank instead of 8: one queue longer than the slots
    run(args[:3] + [str(tiny / "sft")] + args[3:] + ["--out", str(tiny / "e2"), str(tiny / "e3"), "--label",
                                                     "ours", "again", "--gen-slots", "3"], nproc=2)
    # tensor parallel: each rank holds half of the model, the two answer their items in one queue
    run(args + ["--out", str(tiny / "etp"), "--tp", "2", "--gen-slots", "3"], nproc=2)
    assert "| ours |" in out and "Fleming-R1-7B (paper)" in out
    r1 = json.load(open(tiny / "e1" / "results.json"))
    assert json.load(open(tiny / "etp" / "results.json")) == r1
    assert sorted(open(tiny / "etp" / "responses.jsonl").read().splitlines()) == \
        sorted(open(tiny / "e1" / "responses.jsonl").read().splitlines())
    r2 = json.load(open(tiny / "e2" / "results.json"))
    assert r1 == r2 and set(r1) == {"medqa", "medbullets", "medxpertqa",
                                    "macro_average"} and r1["medqa"]["n"] == 20
    assert r1["macro_average"]["benchmarks"] == 3 and len(r1["macro_average"]["ci95"]) == 2
    rows1 = sorted(open(tiny / "e1" / "responses.jsonl").read().splitlines())
    rows2 = sorted(open(tiny / "e2" / "responses.jsonl").read().splitlines())
    assert rows1 == rows2 and len(rows1) == 60
    assert json.load(open(tiny / "e3" / "results.json")) == r1
    assert sorted(open(tiny / "e3" / "responses.jsonl").read().splitlines()) == rows1


def test_grpo_sharded_checkpoint_resumes_on_any_world_size(tiny):
    """A 2-rank checkpoint is written as per-rank shards (torch.distributed.checkpoint) and resumes on 2 ranks
    exactly as the uninterrupted run goes on, and on 1 rank as a 1-rank run matches a 2-rank one (the same
    rollouts, losses to float rounding)."""
    import shutil
    runner, full = odd_reward_runner(tiny), two_rank_run(tiny)
    args = grpo_args(tiny, tiny / "cut2") + KL + ["--share-prompt", "4"]
    run([runner] + args + ["--stop-after", "2", "--save-every", "100"], nproc=2)
    ck = tiny / "cut2" / "ckpt"
    assert os.listdir(ck) == ["step-000002"]
    files = set(os.listdir(ck / "step-000002"))
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "COMPLETE", "trainer_state.json",
            "config.json"} <= files
    shutil.copytree(tiny / "cut2", tiny / "cut1")
    run([runner] + args + ["--resume"], nproc=2)
    run([runner] + grpo_args(tiny, tiny / "cut1") + KL + ["--share-prompt", "4", "--resume"])
    full, two, one = (metrics(d / "metrics.jsonl") for d in (full, tiny / "cut2", tiny / "cut1"))
    assert [r["step"] for r in full] == [r["step"] for r in two] == [r["step"] for r in one] == [0, 1, 2, 3,
                                                                                                 4]
    assert any(r.get("loss") for r in full) and any(r.get("kl") for r in full[2:])
    keys = ("reward", "accuracy", "zero_var_frac", "response_len", "loss", "kl", "entropy", "grad_norm",
            "val_accuracy", "stage", "pool")
    for x, y in zip(full, two):
        assert all(x.get(k) == y.get(k) for k in keys), (x, y)          # bit for bit
    for x, y in zip(full[3:], one[3:]):
        for k in ("reward", "zero_var_frac", "response_len", "loss", "kl"):
            assert abs(x[k] - y[k]) <= 1e-4 * abs(x[k]) + 1e-7, (k, x, y)


def test_grpo_two_rank_export_loads_in_transformers(tiny):
    """The final model of a 2-rank run, gathered one weight at a time, loads in transformers with our
    logits."""
    import torch
    import transformers
    from hf_io import load_model
    path = str(two_rank_run(tiny))
    ours = load_model(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[5, 17, 33, 2, 9, 44]])
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max() <= 1e-5


def test_evaluate_with_shuffled_options(tiny):
    """--shuffle-options 3: every item asked in three orders, and the report says how consistent the model
    is."""
    out = run(["evaluate.py", "--model", str(tiny / "sft"), "--benchmarks", "medbullets", "--file",
               f"medbullets={FIX}/medbullets_op4_sample.jsonl", "--max-new-tokens", "16", "--batch-size",
               "20",
               "--shuffle-options", "3", "--out", str(tiny / "shuf")])
    r = json.load(open(tiny / "shuf" / "results.json"))["medbullets"]
    assert r["n"] == 60 and r["orders"] == 3 and len(r["accuracy_per_order"]) == 3
    assert 0 <= r["consistency"] <= 100
    assert "consistency" in out
    rows = [json.loads(line) for line in open(tiny / "shuf" / "responses.jsonl")]
    assert sorted({x["id"].rsplit("#p", 1)[1] for x in rows}) == ["0", "1", "2"]

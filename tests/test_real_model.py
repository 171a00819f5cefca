"""What a real pretrained model exposed, fixed for every model: local files never wait on a hub, decode slots
fitted to the rollout phase alone and the micro-batch to the training step, one answer contract."""
import json
import os
import socket
import subprocess
import sys
import time

from helpers import ROOT

FIX = os.path.join(ROOT, "tests", "fixtures")


def silent_hub():
    """A hub that accepts connections and never answers (HF_ENDPOINT points there)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s, f"http://127.0.0.1:{s.getsockname()[1]}"


def test_local_files_never_wait_on_a_hub_that_does_not_answer(tiny, tmp_path):
    """--file NAME=PATH alone evaluates what it names (it tried the eight other benchmarks on the hub: over
    10 minutes against a hub that accepts connections and never answers); a benchmark asked for by name with
    no local file is skipped after one short probe of the hub."""
    sock, url = silent_hub()
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_ENDPOINT": url,
           "HF_HUB_ETAG_TIMEOUT": "600", "HF_HUB_DOWNLOAD_TIMEOUT": "600"}
    base = [sys.executable, "evaluate.py", "--model", str(tiny / "sft"), "--max-new-tokens", "8", "--limit",
            "4", "--file", f"kg={tiny / 'data' / 'test.jsonl'}"]
    try:
        t = time.time()
        p = subprocess.run(base + ["--out", str(tmp_path / "a")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
        alone = time.time() - t
        assert p.returncode == 0 and "[skip]" not in p.stdout, p.stdout + p.stderr
        assert list(json.load(open(tmp_path / "a" / "results.json"))) == ["kg", "macro_average"]
        t = time.time()
        p = subprocess.run(base + ["--benchmarks", "medqa,kg", "--out", str(tmp_path / "b")], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and "[skip] medqa: no local file, and the hub does not answer" in p.stdout
        assert time.time() - t < alone + 30
    finally:
        sock.close()


SMOL = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
            num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
            rms_norm_eps=1e-5, attention_bias=False, tie_word_embeddings=True)


def dry_run(tmp_path, *flags):
    from helpers import config_only
    from model import ModelConfig
    d = tmp_path / "smol"
    if not d.exists():
        config_only(tmp_path, ModelConfig(**SMOL), "smol")
    p = subprocess.run([sys.executable, "train_grpo.py", "--init", str(d), "--data",
                        str(tmp_path / "rl.jsonl"), "--dry-run", "--val-size", "0", "--max-new-tokens", "192", *flags], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout


def test_slots_are_fitted_to_the_rollout_phase_and_the_micro_batch_to_the_step(tmp_path):
    """SmolLM2-135M's shape, 8 x 8 rollouts of 192 tokens (8 x 12 in stage 2), a 12 GB device, 800-token
    prompts: the training step of 32 sequences
    did not fit, and the slot fitter answered by shrinking the decode slots to 1 (54 tokens/s where 64 slots
    make 473). Now the micro-batch is chosen to fit the step, and the slots the rollout phase."""
    code, out = dry_run(tmp_path, "--gpu-mem", "12")
    assert code == 0 and "memory plan: fits" in out, out
    assert "rollout: KV cache, 96 slots x " in out, out   # every request of the largest call (8 x 12)
    micro = int(out.split("--micro-batch 0: ")[1].split(",")[0])
    assert 1 <= micro < 32 and "warning" not in out
    code, out = dry_run(tmp_path, "--gpu-mem", "12", "--micro-batch", "64")   # asked for: refused by name
    assert code == 1 and "--micro-batch" in out.strip().splitlines()[-1]
    code, out = dry_run(tmp_path, "--gpu-mem", "2.6", "--act-ckpt")   # little room: fewer slots, said
    assert "warning: " in out and "decode slots (all the rollout phase has room for)" in out, out


def test_one_answer_contract_for_the_prompt_and_the_cold_start_targets(tmp_path):
    """The prompt asked for 'the letter of the correct option' while every cold-start target answered with the
    option's text: the data taught against its own instruction. Now both are the option's text, and the
    strict parser still takes a letter from a model that writes one."""
    import re
    import make_data
    from mcq import INSTRUCTION, extract_answer
    make_data.main(["--out", str(tmp_path / "d"), "--kg-questions", "60", "--kg-max-diseases", "40"])
    rows = [json.loads(line) for line in open(tmp_path / "d" / "sft.jsonl")]
    items = {json.loads(line)["id"]: json.loads(line) for line in open(tmp_path / "d" / "items.jsonl")}
    assert rows and "letter" not in INSTRUCTION and "exactly as it is given" in INSTRUCTION
    for r in rows:
        it = items[r["id"]]
        assert r["messages"][1]["content"].endswith(INSTRUCTION)
        tag = re.search(r"<answer>(.*)</answer>", r["messages"][-1]["content"]).group(1)
        assert tag == it["options"][it["answer"]]
        assert extract_answer(f"<answer>{it['answer']}</answer>", it["options"]) == it["answer"]



def test_the_cpu_heap_thresholds_are_fixed_at_start(monkeypatch):
    """glibc moves its mmap and trim thresholds as blocks are freed and then handed the top of its heap back
    after each decode step that freed large temporaries, faulting it in again at the next (an evaluation of
    SmolLM2-135M spent 40 % of its time in the kernel, EXPERIMENTS.md). init_distributed fixes both on CPU,
    on CUDA it leaves the host heap alone."""
    import common
    calls = []

    class FakeLibc:
        def mallopt(self, what, value):
            calls.append((what, value))
    monkeypatch.setattr(common, "libc", lambda: FakeLibc())
    assert common.init_distributed("cpu")[2].type == "cpu"
    assert calls == [(-3, 64 << 20), (-1, 1 << 30)]   # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD (malloc.h)
    calls.clear()
    monkeypatch.delenv("RANK", raising=False)
    try:
        common.init_distributed("cuda")
    except SystemExit:
        pass   # a CPU-only torch: refused before anything else
    assert calls == []

"""Runs that a crash, a reused folder or a bad input could corrupt: checkpoints left half-written, metrics
after a resume, a finished run relaunched, two jobs in one folder, ranks outliving torchrun, bad flags and
files."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, metrics, run, write_toy_sft

SFT = ["train_sft.py", "--preset", "nano", "--vocab-size", "300", "--seq-len", "128", "--steps", "6",
       "--rows-per-step", "4", "--micro-rows", "2", "--eval-every", "3", "--warmup", "2"]


def fails(args, timeout=120, cwd=ROOT):
    """Run a script (from the repository) that must fail: (exit code, its stderr)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, args[0])] + args[1:], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode != 0, p.stdout[-2000:]
    return p.returncode, p.stderr.strip()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    write_toy_sft(str(d / "sft.jsonl"))
    run(SFT + ["--data", str(d / "sft.jsonl"), "--out", str(d / "full")])
    return d


def test_resume_after_a_crash_in_checkpointing(toy):
    """The states a kill can leave while a checkpoint is replaced: a newer folder without its COMPLETE marker
    (killed while writing) beside the older complete one (not yet deleted), and metrics logged past the
    checkpoint with a last line cut in half. --resume continues from the complete one, drops the extra lines,
    and ends exactly as the uninterrupted run, every step logged once."""
    data = ["--data", str(toy / "sft.jsonl")]
    out = toy / "crash"
    run(SFT + data + ["--out", str(out), "--stop-after", "4", "--save-every", "2"])
    ck = out / "ckpt"
    assert os.listdir(ck) == ["step-000004"]   # the older one was removed after the newer was complete
    shutil.copytree(ck / "step-000004", ck / "step-000003")   # pretend: 3 complete, 4 killed mid-write
    os.remove(ck / "step-000004" / "COMPLETE")
    os.remove(ck / "step-000004" / "__0_0.distcp")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.0')            # cut by the kill
    out_text = run(SFT + data + ["--out", str(out), "--resume"])
    assert "resumed from" in out_text and "step-000003" in out_text
    a, b = metrics(toy / "full" / "metrics.jsonl"), metrics(out / "metrics.jsonl")
    assert [r["step"] for r in b] == [r["step"] for r in a] == [0, 1, 2, 3, 4, 5, 6]
    for k in ("loss", "val_loss", "grad_norm"):   # steps 4-6 redone from step 3's state: the same bits
        assert [r.get(k) for r in a] == [r.get(k) for r in b], k
    assert os.listdir(ck) == ["step-000006"]


def test_reused_folder_is_refused_overwritten_or_resumed(toy):
    data = ["--data", str(toy / "sft.jsonl")]
    out = toy / "again"
    run(SFT + data + ["--out", str(out), "--steps", "2"])
    (out / "stage1").mkdir()   # a stale stage-1 export from some earlier GRPO run in the same folder
    code, err = fails(SFT + data + ["--out", str(out), "--steps", "2"])
    assert err.splitlines() == [f"error: {out} already holds a run (metrics.jsonl, ckpt, stage1, tokenizer): "
                                f"--resume continues it, --overwrite starts it again"]
    assert os.path.exists(out / "model.safetensors")                     # nothing was touched
    run(SFT + data + ["--out", str(out), "--steps", "2", "--overwrite"])
    assert not os.path.exists(out / "stage1") and len(metrics(out / "metrics.jsonl")) == 3


def test_one_job_per_folder(toy):
    """A live owner's lock refuses a second job; a dead owner's lock is taken over."""
    data = ["--data", str(toy / "sft.jsonl")]
    out = toy / "locked"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{sleeper.pid} {os.uname().nodename}\n")
        code, err = fails(SFT + data + ["--out", str(out), "--steps", "1"])
        assert f"is in use by another run (pid {sleeper.pid}" in err and len(err.splitlines()) == 1
    finally:
        sleeper.kill()
        sleeper.wait()
    run(SFT + data + ["--out", str(out), "--steps", "1"])   # its owner is gone: taken over
    assert not os.path.exists(out / ".lock")                 # and released at the end


def test_ranks_die_with_torchrun(toy):
    """kill -9 of torchrun (torchrun starts each rank with setsid, out of reach of its process group): the
    ranks must not train on."""
    out = toy / "orphans"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + SFT + \
        ["--data", str(toy / "sft.jsonl"), "--out", str(out), "--steps", "100000", "--eval-every", "100000"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < 120 and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(2)

    def ranks():
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if str(out) in cmdline and "torch.distributed.run" not in cmdline:
                found.append(int(pid))
        return found
    assert len(ranks()) == 2
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    t0 = time.time()
    while ranks() and time.time() - t0 < 20:
        time.sleep(0.2)
    left = ranks()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left


@pytest.mark.parametrize("args,flag", [
    (["train_grpo.py", "--steps", "-3"], "--steps: must be at least 0, got -3"),
    (["train_grpo.py", "--group-size", "1"], "--group-size: must be at least 2, got 1"),
    (["train_grpo.py", "--max-new-tokens", "0"], "--max-new-tokens: must be at least 1, got 0"),
    (["make_data.py", "--kg-questions", "0"], "--kg-questions: must be at least 1, got 0"),
    (["make_data.py", "--test-frac", "1.5"], "--test-frac: must be a fraction in [0, 1), got 1.5"),
    (["evaluate.py", "--limit", "-1"], "--limit: must be at least 1, got -1"),
    (["train_sft.py", "--micro-rows", "0"], "--micro-rows: must be at least 1, got 0"),
])
def test_bad_numbers_are_refused_by_flag(args, flag):
    code, err = fails(args)
    assert code == 2 and err == f"{args[0]}: argument {flag} (see --help)"


def test_bad_files_get_one_line(toy, tmp_path):
    """Non-UTF-8 data, a truncated safetensors file, an empty --init folder, the default paths of a fresh
    clone: one line naming the file (and line), no traceback."""
    bad = tmp_path / "latin1.jsonl"
    good = open(toy / "sft.jsonl", encoding="utf-8").readline()
    bad.write_bytes(good.encode() + '{"messages": "caf\xe9"}\n'.encode("latin-1"))
    code, err = fails(SFT + ["--data", str(bad), "--out", str(tmp_path / "o1")])
    assert err.splitlines() == [f"error: {bad}:2: not UTF-8 text"]
    model = tmp_path / "cut"
    shutil.copytree(toy / "full", model, ignore=shutil.ignore_patterns("ckpt"))
    with open(model / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(model / "model.safetensors") - 100)
    code, err = fails(SFT + ["--data", str(toy / "sft.jsonl"), "--init", str(model), "--out",
                             str(tmp_path / "o2")])
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {model / 'model.safetensors'}: truncated")
    (tmp_path / "empty").mkdir()
    code, err = fails(SFT + ["--data", str(toy / "sft.jsonl"), "--init", str(tmp_path / "empty"),
                             "--out", str(tmp_path / "o3")])
    want = "no model: --init takes a Hugging Face model folder"
    assert err == f"error: {tmp_path / 'empty' / 'config.json'}: {want}"
    code, err = fails(["train_grpo.py"], cwd=tmp_path)   # a fresh clone's first command: the defaults
    assert err == ("error: runs/sft/config.json: no model yet: make one with "
                   "`python train_sft.py --out runs/sft`, or pass --init")


def test_model_folder_without_tokenizer_is_refused(toy, tmp_path):
    """Weights without tokenizer files: transformers would build a 3-token tokenizer that encodes every text
    to []; train_sft.py (which then trained on nothing and exited 0) and evaluate.py (every response empty, an
    accuracy printed) stop in one line naming the folder."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(toy / "full" / f, bare / f)
    want = f"error: {bare}: no tokenizer files (tokenizer.json or tokenizer_config.json); copy them"
    _, err = fails(SFT + ["--data", str(toy / "sft.jsonl"), "--init", str(bare), "--out",
                          str(tmp_path / "o")])
    assert len(err.splitlines()) == 1 and err.startswith(want)
    fix = os.path.join(ROOT, "tests", "fixtures", "medqa_5opt_sample.jsonl")
    _, err = fails(["evaluate.py", "--model", str(bare), "--benchmarks", "medqa", "--file", f"medqa={fix}",
                    "--out", str(tmp_path / "ev")])
    assert len(err.splitlines()) == 1 and err.startswith(want)
    assert not (tmp_path / "ev").exists() and not (tmp_path / "o" / "model.safetensors").exists()


def test_unknown_preset_lists_the_presets():
    code, err = fails(["train_sft.py", "--preset", "huge"])
    assert code == 2 and err.startswith("train_sft.py: argument --preset: invalid choice: 'huge'")
    assert "'nano'" in err and "'tiny'" in err and len(err.splitlines()) == 1


def test_grpo_with_no_training_items_says_so(tiny, tmp_path):
    """An empty --data file, or --val-size taking every item: one line with the counts and the flag (it was a
    torch RuntimeError from generate)."""
    (tmp_path / "empty.jsonl").write_text("")
    args = ["train_grpo.py", "--init", str(tiny / "sft"), "--steps", "1"]
    _, err = fails(args + ["--data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "g1")])
    assert err == (f"error: {tmp_path / 'empty.jsonl'}: 0 item(s) leave none to train on beside --val-size "
                   "128: lower --val-size or give more items")
    data = str(tiny / "data" / "rl_train.jsonl")
    n = sum(1 for line in open(data) if line.strip())
    _, err = fails(args + ["--data", data, "--val-size", str(n), "--out", str(tmp_path / "g2")])
    assert err == (f"error: {data}: {n} item(s) leave none to train on beside --val-size {n}: "
                   "lower --val-size or give more items")

"""Defects an independent probe found (round 3), one test per root cause: numbers that are not numbers, a
run that trains on past a nan, repeated ids, results replaced in halves, a rank with no work, silent fallbacks,
tracebacks on plausible input."""
import errno
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import evaluate
import make_data
import train_grpo
import train_sft
from helpers import ROOT, run, write_toy_sft

FIX = os.path.join(ROOT, "tests", "fixtures")
SCRIPTS = {"train_sft.py": train_sft, "train_grpo.py": train_grpo, "evaluate.py": evaluate,
           "make_data.py": make_data}


def fails(args, timeout=300, env=None):
    """Run a script that must fail: (exit code, its stderr)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run([sys.executable, os.path.join(ROOT, args[0])] + args[1:], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode != 0, p.stdout[-2000:]
    return p.returncode, p.stderr.strip()


def float_flags(script):
    ap = SCRIPTS[script].parser()
    return [a.option_strings[0] for a in ap._actions
            if a.option_strings and (a.type is float or getattr(a.type, "__name__", None) == "float")]


# --- 1, 5: every float flag of the four scripts refuses nan and inf, by name

@pytest.mark.parametrize("script,flag", [(s, f) for s in SCRIPTS for f in float_flags(s)])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_flag_refuses_non_numbers(script, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        SCRIPTS[script].parser().parse_args([flag, value])
    assert e.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_the_sweep_covers_the_flags_the_probe_named():
    named = {"train_sft.py": ["--lr", "--weight-decay", "--clip", "--min-lr"],
             "train_grpo.py": ["--lr", "--clip", "--min-lr", "--temperature", "--w-correct", "--w-format",
                               "--kl-beta", "--clip-high", "--gpu-mem"],
             "evaluate.py": ["--temperature"], "make_data.py": ["--teacher-timeout", "--rarity"]}
    for script, flags in named.items():
        assert set(flags) <= set(float_flags(script)), script


def test_clip_zero_means_no_clipping():
    from common import clip_and_check
    m = torch.nn.Linear(3, 2)
    m(torch.ones(4, 3)).sum().backward()
    before = [p.grad.clone() for p in m.parameters()]
    norm = clip_and_check(m, 0, 1, 1.0)
    assert norm > 0 and all(torch.equal(b, p.grad) for b, p in zip(before, m.parameters()))
    with pytest.raises(SystemExit, match="step 7: loss nan"):
        clip_and_check(m, 1.0, 7, float("nan"))


def test_a_poisoned_learning_rate_stops_the_run_and_writes_nothing(tmp_path):
    """A finite learning rate that sends the weights to inf: the run stops in one line at the first non-finite
    loss or gradient norm, with no checkpoint and no export (it exported NaN weights with exit 0)."""
    write_toy_sft(str(tmp_path / "sft.jsonl"))
    out = tmp_path / "run"
    code, err = fails(["train_sft.py", "--preset", "nano", "--vocab-size", "300", "--seq-len", "128",
                       "--steps", "6", "--rows-per-step", "4", "--warmup", "0", "--lr", "1e30", "--data",
                       str(tmp_path / "sft.jsonl"), "--out", str(out)])
    errors = [line for line in err.splitlines() if not line.startswith("sft:")]   # the progress bar's
    assert code == 1 and len(errors) == 1 and "stopped before the update" in errors[0], err
    assert not (out / "model.safetensors").exists() and not (out / "ckpt").exists()


def test_non_finite_weights_are_never_saved(tmp_path):
    from fsdp import export_hf
    from model import ModelConfig, Transformer
    m = Transformer(ModelConfig.from_name("nano", vocab_size=64))
    with torch.no_grad():
        m.model.norm.weight[0] = float("inf")
    with pytest.raises(SystemExit, match="nan or inf"):
        export_hf(m, None, str(tmp_path / "x"), 0)
    assert not (tmp_path / "x").exists()


# --- 2: repeated ids; 9: items that cannot be asked

def test_a_repeated_id_is_refused_with_file_and_line(tmp_path):
    rows = [dict(id="a", question="q1", options={"A": "x", "B": "y"}, answer="A"),
            dict(id="b", question="q2", options={"A": "x", "B": "y"}, answer="B"),
            dict(id="a", question="q3", options={"A": "x", "B": "y"}, answer="B")]
    f = tmp_path / "kg.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"kg.jsonl:3: field 'id': 'a' repeats record 1"):
        evaluate.load_benchmark("kg", str(f))
    mx = [json.loads(line) for line in open(os.path.join(FIX, "medxpertqa_text_sample.jsonl"))]
    f = tmp_path / "mx.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in mx + mx[:1]))
    with pytest.raises(ValueError, match=f"mx.jsonl:{len(mx) + 1}: field 'id'"):
        evaluate.load_benchmark("medxpertqa", str(f))


@pytest.mark.parametrize("options,question,why", [
    ({c: f"o{c}" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:22]}, "q", "22 options (2 to 21)"),
    ({"A": "x", "B": None}, "q", "option B is empty"),
    ({"A": "x", "B": "  "}, "q", "option B is empty"),
    ({"A": "x", "B": "y"}, " ", "field 'question' is empty"),
])
def test_items_that_cannot_be_asked_are_refused(options, question, why, tmp_path):
    f = tmp_path / "kg.jsonl"
    f.write_text(json.dumps(dict(id="1", question=question, options=options, answer="A")) + "\n")
    with pytest.raises(ValueError, match=f"kg.jsonl:1: .*{re.escape(why)}"):
        evaluate.load_benchmark("kg", str(f))


# --- 3: responses and results replaced together

def test_results_are_replaced_together_or_not_at_all(tmp_path, monkeypatch):
    items = evaluate.load_benchmark("medqa", os.path.join(FIX, "medqa_5opt_sample.jsonl"))
    resp = {it["id"]: ["<answer>A</answer>"] for it in items}
    recs, s = evaluate.score_items(items, resp, "medqa")
    out = tmp_path / "ev"
    evaluate.write_outputs(str(out), recs, {"medqa": s}, "old")
    recs2, s2 = evaluate.score_items(items, {k: ["<answer>B</answer>"] for k in resp}, "medqa")
    real = os.replace

    def killed(a, b):   # the process dies as the last file is renamed in
        if b.endswith("results.json"):
            raise KeyboardInterrupt
        real(a, b)
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate.write_outputs(str(out), recs2, {"medqa": s2}, "new")
    monkeypatch.setattr(os, "replace", real)
    assert not (out / "results.json").exists()   # no results beside responses they do not describe
    evaluate.refuse_earlier_results([str(out)], overwrite=False)   # an unfinished folder is not refused
    with pytest.raises(OSError, match="could not write the results"):
        monkeypatch.setattr("builtins.open", _full_disk(open))
        evaluate.write_outputs(str(tmp_path / "ev2"), recs, {"medqa": s}, "x")
    monkeypatch.undo()
    assert not [f for f in os.listdir(tmp_path / "ev2") if f.endswith(".tmp")]


def _full_disk(real_open):
    def opened(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode and str(path).endswith(".tmp"):
            f.write = lambda *_: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return f
    return opened


def test_a_full_disk_during_a_checkpoint_says_so(tmp_path, monkeypatch):
    import torch.distributed.checkpoint.filesystem as fs
    from fsdp import save_checkpoint
    from model import ModelConfig, Transformer
    m = Transformer(ModelConfig.from_name("nano", vocab_size=64))
    opt = torch.optim.AdamW(m.parameters())

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(fs, "_write_item", full)
    with pytest.raises(OSError, match="the disk is full"):
        save_checkpoint(str(tmp_path), m, opt, None, 3, {}, 0)
    assert not os.path.exists(tmp_path / "ckpt" / "step-000003")


# --- 4: a rank with no share of the work; its error reaches the user

def test_two_ranks_mining_one_item_finish_as_one_rank_does(tiny, tmp_path):
    """Mining leaves one question: rank 1 has no prompt in stage 2 (it died in fast.row_budgets, unseen)."""
    args = ["train_grpo.py", "--init", str(tiny / "sft"), "--data", str(tiny / "data" / "rl_train.jsonl"),
            "--steps", "3", "--questions-per-step", "2", "--group-size", "2", "--stage2-group-size", "2",
            "--stage2-at", "1", "--mine-max", "1", "--mine-every", "1", "--val-size", "4", "--eval-every", "3",
            "--max-new-tokens", "24", "--micro-batch", "4", "--warmup", "0", "--print-every", "0"]
    run(args + ["--out", str(tmp_path / "one")])
    run(args + ["--out", str(tmp_path / "two")], nproc=2)
    rows = [[json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")] for d in ("one", "two")]
    assert [r["pool"] for r in rows[1] if "pool" in r][-1] == 1
    for a, b in zip(*rows):
        for k in ("reward", "accuracy", "val_accuracy"):
            assert a.get(k) == b.get(k), (k, a, b)


def test_every_ranks_error_is_printed(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text("import os, sys\nsys.path.insert(0, %r)\nfrom cli import guard\n"
                      "def main():\n    if os.environ['RANK'] == '1':\n        raise ValueError('only here')\n"
                      "guard(main)\n" % ROOT)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "rank 1: error: only here" in p.stderr


# --- 6: silent fallbacks in the RL data

def test_rl_rows_are_checked_where_they_are_read(tiny, tmp_path):
    rows = [json.loads(line) for line in open(tiny / "data" / "rl_train.jsonl")][:40]
    base = ["train_grpo.py", "--init", str(tiny / "sft"), "--steps", "1", "--val-size", "4", "--dry-run"]
    for i, bad, want in ((3, dict(rows[3], difficulty=7), "field 'difficulty': 7 is not one of"),
                         (5, {k: v for k, v in rows[5].items() if k != "question"},
                          "field 'question' is missing")):
        f = tmp_path / f"rl{i}.jsonl"
        f.write_text("".join(json.dumps(bad if j == i else r) + "\n" for j, r in enumerate(rows)))
        _, err = fails(base + ["--data", str(f)])
        assert err == f"error: {f}:{i + 1}: {want}" or err.startswith(f"error: {f}:{i + 1}: {want}"), err
    for tiers in ("Nope", "easy,moderate"):
        code, err = fails(base + ["--data", str(tiny / "data" / "rl_train.jsonl"), "--stage1-tiers", tiers])
        assert code == 2 and "--stage1-tiers" in err and "not a tier" in err
    only_hard = tmp_path / "hard.jsonl"
    only_hard.write_text("".join(json.dumps(dict(r, difficulty="Difficult")) + "\n" for r in rows))
    _, err = fails(["train_grpo.py", "--init", str(tiny / "sft"), "--steps", "1", "--val-size", "4",
                    "--data", str(only_hard), "--out", str(tmp_path / "g")])
    assert "no training item has a difficulty in --stage1-tiers Easy,Moderate" in err


# --- 7: one line, not a traceback

def test_model_folders_without_tokenizer_json_or_chat_template(tiny, tmp_path):
    no_json = tmp_path / "no_json"
    shutil.copytree(tiny / "sft", no_json, ignore=shutil.ignore_patterns("ckpt", "tokenizer.json"))
    no_tpl = tmp_path / "no_tpl"
    shutil.copytree(tiny / "sft", no_tpl, ignore=shutil.ignore_patterns("ckpt", "chat_template.jinja"))
    cfg = json.load(open(no_tpl / "tokenizer_config.json"))
    cfg.pop("chat_template", None)
    (no_tpl / "tokenizer_config.json").write_text(json.dumps(cfg))
    fix = os.path.join(FIX, "medqa_5opt_sample.jsonl")
    for folder, want in ((no_json, "tokenizer"), (no_tpl, "has no chat template")):
        for args in (["evaluate.py", "--model", str(folder), "--file", f"medqa={fix}", "--out",
                      str(tmp_path / "ev")],
                     ["train_sft.py", "--init", str(folder), "--data", str(tiny / "data" / "sft.jsonl"),
                      "--out", str(tmp_path / "o"), "--steps", "1"]):
            _, err = fails(args)
            assert len(err.splitlines()) == 1 and err.startswith(f"error: {folder}: ") and want in err, err


@pytest.mark.parametrize("args,want", [
    (["evaluate.py", "--file", "medqa.jsonl"], "argument --file: expected NAME=PATH, got 'medqa.jsonl'"),
    (["evaluate.py", "--file", "medqa=nope.jsonl"], "argument --file: nope.jsonl: no such file"),
    (["evaluate.py", "--dtype", "float64x"], "argument --dtype: invalid choice: 'float64x'"),
    (["make_data.py", "--tier-frac", "a:b:c"], "argument --tier-frac: expected three shares"),
    (["make_data.py", "--tier-frac", "0:0:0"], "argument --tier-frac: expected three shares"),
    (["make_data.py", "--tier-frac", "nan:1:1"], "argument --tier-frac: expected three shares"),
    (["make_data.py", "--options", "22"], "argument --options: must be at least 4 and at most 21, got 22"),
])
def test_bad_flags_are_refused_by_name(args, want):
    code, err = fails(args, timeout=60)
    assert code == 2 and want in err and len(err.splitlines()) == 1, err


def test_cross_flag_and_device_checks(tmp_path):
    _, err = fails(["make_data.py", "--min-evidence", "5", "--max-evidence", "2", "--out",
                    str(tmp_path / "d")])
    assert err == "error: --min-evidence 5 is above --max-evidence 2"
    if not torch.cuda.is_available():
        for script in ("evaluate.py", "train_sft.py"):
            args = [script, "--device", "cuda"]
            if script == "evaluate.py":
                fix = os.path.join(FIX, "medqa_5opt_sample.jsonl")
                args += ["--model", str(tmp_path), "--file", f"medqa={fix}", "--out", str(tmp_path / "ev")]
            else:
                write_toy_sft(str(tmp_path / "s.jsonl"))
                args += ["--data", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "o")]
            _, err = fails(args)
            assert err.startswith("error: --device cuda: ") and len(err.splitlines()) == 1, err


def test_public_options_as_a_list_are_read(tmp_path):
    f = tmp_path / "medqa.jsonl"
    f.write_text(json.dumps(dict(question="Which?", options=["x", "y", "z"], answer_idx="B")) + "\n")
    items = make_data.load_public("medqa", str(f))
    assert items[0]["options"] == {"A": "x", "B": "y", "C": "z"} and items[0]["answer"] == "B"


def test_grpo_with_no_held_out_set_and_no_steps(tiny, tmp_path):
    """--val-size 0 (no held-out evaluation), --steps 0 and --log-groups 0: runs that export what they have
    (an IndexError in write_report, a min() of nothing)."""
    args = ["train_grpo.py", "--init", str(tiny / "sft"), "--data", str(tiny / "data" / "rl_train.jsonl"),
            "--questions-per-step", "2", "--group-size", "2", "--max-new-tokens", "16", "--print-every", "0"]
    run(args + ["--val-size", "0", "--steps", "1", "--log-groups", "0", "--out", str(tmp_path / "a")])
    run(args + ["--steps", "0", "--val-size", "4", "--out", str(tmp_path / "b")])
    for d in ("a", "b"):
        assert (tmp_path / d / "model.safetensors").exists() and (tmp_path / d / "report.html").exists()


# --- 8: the official PubMedQA file

def test_official_pubmedqa_file_evaluates_its_test_split():
    path = os.path.join(ROOT, "benchmarks", "pubmedqa", "ori_pqal.json")
    items = evaluate.load_benchmark("pubmedqa", path)
    test = json.load(open(os.path.join(ROOT, "benchmarks", "pubmedqa", "test_ground_truth.json")))
    assert len(items) == 500 and {it["id"] for it in items} == set(test)
    assert all(it["answer"] == "ABC"[["yes", "no", "maybe"].index(test[it["id"]])] for it in items)
    assert evaluate.comparability("pubmedqa", items) == ["500 items where the paper's set has 1,000"]
    rest = make_data.load_public("pubmedqa_labeled", path)
    assert len(rest) == 500 and not {it["id"].split("-", 1)[1] for it in rest} & set(test)
    assert all(it["rationale"] for it in rest)


def test_medqa_file_in_the_repository():
    items = evaluate.load_benchmark("medqa", os.path.join(ROOT, "benchmarks", "medqa", "medqa_test.jsonl"))
    assert len(items) == 1273 and all(len(it["options"]) == 5 for it in items)


# --- 9: the rest

def test_stage_table_of_an_empty_or_missing_folder(tmp_path):
    code, err = fails(["evaluate.py", "--stage-table", str(tmp_path)], timeout=60)
    assert code == 1 and err == f"error: {tmp_path}: no seed*/eval_*/results.json in it: nothing to tabulate"
    assert not (tmp_path / "stage_table.md").exists()
    code, err = fails(["evaluate.py", "--stage-table", str(tmp_path / "nope")], timeout=60)
    assert err.startswith(f"error: {tmp_path / 'nope'}: no such folder")


def test_rescoring_an_unknown_benchmark_names_it(tmp_path):
    (tmp_path / "r.jsonl").write_text(json.dumps(dict(benchmark="foo", id="1", response="A")) + "\n")
    code, err = fails(["evaluate.py", "--responses", str(tmp_path / "r.jsonl"), "--benchmarks", "foo",
                       "--out", str(tmp_path / "ev")], timeout=60)
    assert err == "error: no benchmark could be loaded: foo (the [skip] lines above say why)"


def test_a_teacher_that_never_answers_warns_and_its_url_key_stays_hidden(tmp_path):
    from helpers import FakeOpenAI
    args = [sys.executable, "make_data.py", "--kg-questions", "40", "--kg-max-diseases", "10",
            "--teacher-model", "m", "--retries", "0"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    srv = FakeOpenAI(nulls=10 ** 9)
    p = subprocess.run(args + ["--teacher-url", srv.url + "?api-key=SECRET123", "--out", str(tmp_path / "d")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    srv.close()
    assert p.returncode == 0 and "warning: none of the" in p.stdout and "sft.jsonl (0)" in p.stdout
    srv = FakeOpenAI(echo_auth=True)
    p = subprocess.run(args + ["--teacher-url", srv.url + "?api-key=SECRET123", "--out", str(tmp_path / "e")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    srv.close()
    assert p.returncode == 1 and "?[query hidden]: HTTP 401" in p.stderr
    assert "SECRET123" not in p.stdout + p.stderr

"""evaluate.py and mcq.py: loaders on upstream schemas, strict extraction, scoring, re-scoring, rank
equivalence."""
import json
import os
import random
import shutil

import pytest

from evaluate import load_benchmark, macro_average, results_table, score_items, stage_table, stage_tables
from mcq import build_messages, extract_answer, format_ok

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
QUOTED = {"A": '"Tell me more."', "B": "Reassure the patient\n", "C": "Order an MRI"}
OPTS4 = {"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "Clopidogrel"}
JMED = {L: f"option {L.lower()} text" for L in "ABCDEFGHIJKLMNOPQRSTU"}
PUB = {"A": "yes", "B": "no", "C": "maybe"}
DUP = {"A": "Heparin", "B": "heparin ", "C": "Warfarin", "D": "Other"}

# (response, options, expected letter or None)
CASES = [
    ("<answer>C</answer>", OPTS4, "C"),
    ("reasoning... <answer> C </answer>", OPTS4, "C"),
    ("<answer>c</answer>", OPTS4, "C"),                              # lowercase letter
    ("<answer>(C)</answer>", OPTS4, "C"),
    ("<answer>[B]</answer>", OPTS4, "B"),
    ("<answer>C.</answer>", OPTS4, "C"),
    ("<answer>C)</answer>", OPTS4, "C"),
    ("<answer>**D**</answer>", OPTS4, "D"),
    ("<ANSWER>A</ANSWER>", OPTS4, "A"),                              # tag case
    ("<answer>Ｃ</answer>", OPTS4, "C"),                             # full-width letter
    ("<answer>（Ｂ）</answer>", OPTS4, "B"),                           # full-width brackets
    ("<answer>答案：C</answer>", OPTS4, "C"),                         # Chinese prefix and colon
    ("<answer>选项B</answer>", OPTS4, "B"),
    ("<answer>C。</answer>", OPTS4, "C"),                            # Chinese full stop
    ("<answer>The answer is D</answer>", OPTS4, "D"),
    ("<answer>Answer: A</answer>", OPTS4, "A"),
    ("<answer>Warfarin</answer>", OPTS4, "C"),                       # exact option text
    ("<answer>warfarin.</answer>", OPTS4, "C"),
    ("<answer>C. Warfarin</answer>", OPTS4, "C"),                    # letter + its own text
    ("<answer>(C) Warfarin</answer>", OPTS4, "C"),
    ("<answer>C. Heparin</answer>", OPTS4, None),                    # letter and text disagree
    ("<answer>A, C</answer>", OPTS4, None),                          # two letters
    ("<answer>AC</answer>", OPTS4, None),
    ("<answer>A or B</answer>", OPTS4, None),
    ("<answer></answer>", OPTS4, None),                              # empty tag
    ("<answer>   </answer>", OPTS4, None),
    ("<answer>E</answer>", OPTS4, None),                             # not an option
    ("<answer>Z</answer>", OPTS4, None),
    ("The answer is C.", OPTS4, None),                               # no tag: strict gives nothing
    ("<answer>C", OPTS4, None),                                      # unclosed
    ("<answer>A</answer> then <answer>B</answer>", OPTS4, "B"),      # last well-formed tag
    ("<answer>B</answer> trailing words after the tag", OPTS4, "B"),
    ("<answer>Heparin</answer>", DUP, None),                         # text matching two options
    ("<answer>Aspirin and heparin</answer>", OPTS4, None),
    ("<answer>U</answer>", JMED, "U"),                               # JMED goes to U
    ("<answer>T</answer>", JMED, "T"),
    ("<answer>option u text</answer>", JMED, "U"),
    ("<answer>yes</answer>", PUB, "A"),                              # PubMedQA decisions as options
    ("<answer>Maybe</answer>", PUB, "C"),
    ("<answer>no</answer>", PUB, "B"),
    ("<answer>perhaps</answer>", PUB, None),
    ("<think>hmm <answer>A</answer>?</think><answer>D</answer>", OPTS4, "D"),
    # option texts that end in a stray quote or newline, as 68 MedQA and 68 MedXpertQA options do
    ('<answer>A. "Tell me more."</answer>', QUOTED, "A"),
    ('<answer>"Tell me more."</answer>', QUOTED, "A"),
    ("<answer>B. Reassure the patient</answer>", QUOTED, "B"),
    ("<answer>B</answer>", QUOTED, "B"),
    ("<answer>C. Tell me more</answer>", QUOTED, None),              # the letter of another option's text
]


@pytest.mark.parametrize("response,options,expected", CASES)
def test_strict_extraction(response, options, expected):
    assert extract_answer(response, options) == expected


def test_table_size_and_lenient():
    assert len(CASES) >= 40
    assert extract_answer("so the answer is (C).", OPTS4, lenient=True) == "C"
    assert extract_answer("so the answer is (C).", OPTS4) is None


def test_format_ok():
    assert format_ok("reasoning <answer>B</answer>")
    assert format_ok("<think>x</think>\n<answer>B</answer>", require_think=True)
    assert not format_ok("reasoning <answer>B</answer>", require_think=True)
    assert not format_ok("<answer>A</answer><answer>B</answer>")
    assert not format_ok("<answer>B</answer> and more text")
    assert not format_ok("no tag at all")


def test_shared_fixture_loaders():
    for name, fname, n_opts in [("medqa", "medqa_5opt_sample.jsonl", 5), ("medbullets",
                                                                          "medbullets_op4_sample.jsonl", 4),
                                ("medxpertqa", "medxpertqa_text_sample.jsonl", 10)]:
        items = load_benchmark(name, os.path.join(FIX, fname))
        assert len(items) == 20
        for it in items:
            assert len(it["options"]) == n_opts and it["answer"] in it["options"]
            assert "Answer Choices" not in it["question"]


def write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_crafted_upstream_schemas(tmp_path):
    write(tmp_path / "medmcqa.jsonl", [dict(id="x1", question="Q?", opa="a", opb="b", opc="c", opd="d", cop=2,
                                            choice_type="single", exp="", subject_name="s")])
    write(tmp_path / "careqa.jsonl", [dict(question="Q?", op1="a", op2="b", op3="c", op4="d", cop=1)])
    write(tmp_path / "pubmedqa.jsonl", [dict(pubid=7, question="Does X?", context={"contexts": ["c1", "c2"],
                                                                                   "labels": [],
                                             "meshes": []}, long_answer="", final_decision="maybe")])
    write(tmp_path / "mmlu_pro_biology.jsonl", [
        dict(question_id=1, question="Q?", options=["o1", "o2", "o3", "N/A"], answer="B", answer_index=1,
             category="biology"),
        dict(question_id=2, question="Q2?", options=["o1", "o2"], answer="A", answer_index=0,
             category="law")])
    write(tmp_path / "jmed.jsonl", [dict(id=1, question="Q?", options=JMED, answer=["U"]),
                                    dict(id=2, question="Q?", options=JMED, answer=["A", "B"])])
    mx = dict(id="T-1", question="Which?\nAnswer Choices: (A) x (B) y", options={"A": "x", "B": "y"},
              label="B")
    write(tmp_path / "medxpertqa.jsonl", [mx])
    got = {n: load_benchmark(n, data_dir=str(tmp_path)) for n in
           ["medmcqa", "careqa", "pubmedqa", "mmlu_pro_biology", "jmed", "medxpertqa"]}
    assert got["medmcqa"][0]["answer"] == "C"
    assert got["careqa"][0]["answer"] == "A"                           # 1-based cop
    assert got["pubmedqa"][0]["answer"] == "C" and got["pubmedqa"][0]["context"] == "c1 c2"
    assert len(got["mmlu_pro_biology"]) == 1 and list(got["mmlu_pro_biology"][0]["options"]) == ["A", "B",
                                                                                                 "C"]
    assert len(got["jmed"]) == 1 and got["jmed"][0]["answer"] == "U"   # multi-answer dropped
    assert got["medxpertqa"][0]["question"] == "Which?"                # options printed once
    prompt = build_messages(got["medxpertqa"][0])[1]["content"]
    assert prompt.count("A. x") == 1 and "Answer Choices" not in prompt


def test_bad_file_names_line(tmp_path):
    (tmp_path / "medqa.jsonl").write_text('{"question": "q", "options": {"A": "x"}, "answer_idx": "A"}\n{bad '
                                          'json\n')
    with pytest.raises(ValueError, match="medqa.jsonl:2"):
        load_benchmark("medqa", str(tmp_path / "medqa.jsonl"))
    (tmp_path / "medqa.jsonl").write_text('{"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "C"}\n')
    with pytest.raises(ValueError, match="medqa.jsonl:1: field 'answer'"):
        load_benchmark("medqa", str(tmp_path / "medqa.jsonl"))


def test_missing_benchmark_is_skipped(capsys):
    assert load_benchmark("kg_heldout") is None
    assert "[skip]" in capsys.readouterr().out


def test_scoring_macro_and_table():
    items = [dict(id="1", question="q", options=OPTS4, answer="A"), dict(id="2", question="q", options=OPTS4,
                                                                         answer="B")]
    recs, s = score_items(items, {"1": ["<answer>A</answer>"], "2": ["nothing"]}, "medqa")
    assert s["accuracy"] == 50 and s["unanswered"] == 50 and recs[1]["extracted"] is None
    recs, s2 = score_items(items, {"1": ["<answer>B</answer>", "<answer>A</answer>", "<answer>A</answer>"],
                                   "2": ["<answer>B</answer>"] * 3}, "medqa")
    assert s2["accuracy"] == 50 and s2["pass_at_n"] == 100 and s2["majority"] == 100
    assert macro_average({"a": {"n": 1, "accuracy": 40.0}, "b": {"n": 1, "accuracy": 60.0}}) == 50
    table = results_table({"medqa": s})
    header = table.splitlines()[0]
    assert header.index("CareQA") < header.index("MedQA") < header.index("MMLU-Pro Health")
    assert "Fleming-R1-7B (paper)" in table


def test_responses_rescoring_cli(tmp_path):
    from helpers import run
    src = os.path.join(FIX, "medqa_5opt_sample.jsonl")
    items = load_benchmark("medqa", src)
    with open(tmp_path / "resp.jsonl", "w") as f:
        for i, it in enumerate(items):
            letter = it["answer"] if i % 2 == 0 else "Z"
            f.write(json.dumps(dict(benchmark="medqa", id=it["id"], response=f"<answer>{letter}</answer>"))
                    + "\n")
    out = run(["evaluate.py", "--benchmarks", "medqa", "--file", f"medqa={src}", "--responses",
               str(tmp_path / "resp.jsonl"),
               "--out", str(tmp_path / "ev")])
    res = json.load(open(tmp_path / "ev" / "results.json"))
    assert res["medqa"]["accuracy"] == 50.0 and res["medqa"]["n"] == 20
    assert "| ours |" in out
    # 20 items of the 5-option MedQA: warned, marked, and said why (the paper's MedQA: 1,273 items, 4 options)
    why = res["medqa"]["not_comparable"]
    assert "20 items where the paper's set has 1,273" in why
    assert "5 (20 items) where the paper's set has 4" in why
    assert "warning: medqa:" in out and "| 50.00 (29.9-70.1) † |" in out
    assert "† MedQA: not comparable" in out
    lines = [json.loads(l) for l in open(tmp_path / "ev" / "responses.jsonl")]
    assert {"id", "prompt", "response", "extracted", "gold", "correct"} <= set(lines[0])


def test_stage_table_paired_gain(tmp_path):
    # two seeds; the gain column pairs each RL stage with the cold start of the same seed
    accs = {"seed0": dict(base=0.0, sft=50.0, grpo_stage1=52.0, grpo_stage2=55.0),
            "seed1": dict(base=0.0, sft=60.0, grpo_stage1=61.0)}   # seed1 has no stage-2 result
    for sd, per in accs.items():
        for stage, a in per.items():
            d = tmp_path / sd / f"eval_{stage}"
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps({"kg": {"n": 10, "accuracy": a,
                                                               "unanswered": 100 - a}}))
    text, means = stage_table(str(tmp_path))
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    assert means["sft"] == (55.0, pytest.approx(7.0710678))
    assert "+1.5 +- 0.7 (+2.0, +1.0)" in rows["+RL stage 1"]
    assert "+5.0 +- 0.0 (+5.0)" in rows["+RL stage 2"]
    assert rows["+CoT cold start"].split(" | ")[3] == "-"


def test_intervals_and_paired_tests_by_hand():
    """Wilson's interval for 8 of 10 is 49.02-94.33 %; McNemar's exact p for 10 vs 2 discordant pairs is
    2 x (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 158 / 4096; the bootstrap draws are numpy's for the seed."""
    import numpy as np
    from stats import bootstrap_means, mcnemar, paired_diff_ci, percentile_ci, wilson
    lo, hi = wilson(8, 10)
    assert abs(lo - 49.016) < 1e-3 and abs(hi - 94.332) < 1e-3
    assert wilson(0, 20)[0] == 0 and abs(wilson(20, 20)[1] - 100) < 1e-9
    assert mcnemar(10, 2) == 158 / 4096 and mcnemar(2, 10) == 158 / 4096 and mcnemar(0, 0) == 1.0
    assert mcnemar(5, 5) == 1.0
    v = [1, 0, 1, 1, 0, 0, 1, 1, 1, 0]
    rng = np.random.default_rng(7)
    # the same draws, one by one
    naive = [np.mean([v[i] for i in rng.integers(0, 10, 10)]) for _ in range(500)]
    assert np.allclose(bootstrap_means(v, reps=500, seed=7), naive)
    assert percentile_ci(bootstrap_means([1] * 30, seed=3)) == (1.0, 1.0)
    d, (lo, hi) = paired_diff_ci([0, 1, 0, 1], [1, 1, 1, 1])   # B right wherever A was, and on two more
    assert d == 50.0 and 0 <= lo <= 50 <= hi <= 100


def test_shuffled_options_keep_the_gold_answer():
    from evaluate import permuted, shuffle_stats
    items = load_benchmark("medqa", os.path.join(FIX, "medqa_5opt_sample.jsonl"))
    asked = permuted(items, 3, seed=0)
    assert len(asked) == 60 and len({a["id"] for a in asked}) == 60
    orders = set()
    for a in asked:
        it = next(i for i in items if i["id"] == a["base_id"])
        # the gold text, at its new letter
        assert a["options"][a["answer"]] == it["options"][it["answer"]]
        assert sorted(a["options"].values()) == sorted(it["options"].values())
        orders.add(tuple(a["options"].values()))
    assert len(orders) > 40                                                   # the orders do differ
    # a model that always picks the same text is fully consistent; one that always says "A" is not
    same = [dict(id=a["id"], correct=True, extracted=a["answer"]) for a in asked]
    assert shuffle_stats(asked, same, 3)["consistency"] == 100.0
    first = [dict(id=a["id"], correct=a["answer"] == "A", extracted="A") for a in asked]
    st = shuffle_stats(asked, first, 3)
    assert st["consistency"] < 50 and len(st["accuracy_per_order"]) == 3


def test_stage_table_gains_over_the_previous_stage_with_intervals(tmp_path):
    """With per-item outputs, each stage's gain over the previous one, per seed and pooled, with its
    interval: the pooled gain is the mean of the seeds' gains on the same items (here +10 and +30 points:
    +20)."""
    correct = {"seed0": dict(sft=[1, 0, 0, 1, 0, 1, 0, 0, 1, 0], grpo_stage1=[1, 1, 0, 1, 0, 1, 0, 0, 1, 0]),
               "seed1": dict(sft=[0, 0, 0, 1, 0, 1, 0, 0, 1, 0], grpo_stage1=[1, 1, 1, 1, 0, 1, 0, 0, 1, 0])}
    for sd, per in correct.items():
        for stage, c in per.items():
            d = tmp_path / sd / f"eval_{stage}"
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps({"kg": {"n": 10, "accuracy": 10.0 * sum(c),
                                                               "unanswered": 0}}))
            (d / "responses.jsonl").write_text("".join(json.dumps(dict(benchmark="kg", id=str(i),
                                                                       correct=bool(x)))
                                                       + "\n" for i, x in enumerate(c)))
    text, _ = stage_table(str(tmp_path))
    row = next(line for line in text.splitlines() if line.startswith("| +RL stage 1"))
    step = row.split(" | ")[4]
    assert step.startswith("+20.0 [") and "(+10.0 [" in step and "; +30.0 [" in step
    lo, hi = (float(x) for x in step.split("[")[1].split("]")[0].split(", "))
    assert 0 <= lo < 20 < hi <= 60


def test_stage_table_seed_interval_does_not_depend_on_other_seeds(tmp_path):
    """SEEDS="1 2" and SEEDS="0 1 2" print the same interval for seed 2 (its resampling is seeded by 2)."""
    rng = random.Random(0)
    for sd in ("seed0", "seed2"):
        for stage in ("sft", "grpo_stage1"):
            c = [rng.random() < 0.5 for _ in range(200)]
            d = tmp_path / sd / f"eval_{stage}"
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps({"kg": {"n": 200, "accuracy": sum(c) / 2,
                                                               "unanswered": 0}}))
            (d / "responses.jsonl").write_text("".join(json.dumps(dict(benchmark="kg", id=str(i), correct=x))
                                                       + "\n" for i, x in enumerate(c)))

    def seed2_interval():
        row = next(r for r in stage_table(str(tmp_path))[0].splitlines() if r.startswith("| +RL stage 1"))
        return row.split(" | ")[4].split("(")[1].split("; ")[-1].rstrip(")")

    both = seed2_interval()
    shutil.rmtree(tmp_path / "seed0")
    assert seed2_interval() == both


def rescore(tmp_path, rows, out="ev", extra=()):
    """evaluate.py --responses over rows of the MedQA sample: (exit code, stdout, stderr)."""
    import subprocess
    import sys
    from helpers import ROOT
    with open(tmp_path / "resp.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    p = subprocess.run([sys.executable, "evaluate.py", "--benchmarks", "medqa", "--file",
                        f"medqa={os.path.join(FIX, 'medqa_5opt_sample.jsonl')}", "--responses",
                        str(tmp_path / "resp.jsonl"), "--out", str(tmp_path / out)] + list(extra),
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr.strip()


def test_rescoring_names_every_row_it_does_not_score(tmp_path):
    """Rows whose id is not among the benchmark's items, of a benchmark not asked, or repeated: named in one
    summary line (they used to vanish: n = 3 of 4); a file where nothing matches is an error, not n 0 and
    nan; a response that is not a string names its file and line."""
    items = load_benchmark("medqa", os.path.join(FIX, "medqa_5opt_sample.jsonl"))
    good = [dict(benchmark="medqa", id=it["id"], response=f"<answer>{it['answer']}</answer>")
            for it in items[:3]]
    odd = [dict(benchmark="medqa", id="nope-7", response="<answer>A</answer>"),
           dict(benchmark="pubmedqa", id="1", response="x"), good[0]]
    code, out, _ = rescore(tmp_path, good + odd)
    assert code == 0 and json.load(open(tmp_path / "ev" / "results.json"))["medqa"]["n"] == 3
    line = [l for l in out.splitlines() if "not scored" in l]
    assert len(line) == 1 and "3 of 6 rows not scored" in line[0] and "medqa:nope-7 (no such item)" in line[0]
    assert "pubmedqa:1 (benchmark not asked)" in line[0] and "(repeated: the last kept)" in line[0]
    code, _, err = rescore(tmp_path, [dict(benchmark="medqa", id="x1", response="A")], out="ev2")
    assert code == 1 and err.startswith(f"error: {tmp_path / 'resp.jsonl'}: none of its 1 rows matches")
    assert not (tmp_path / "ev2").exists()
    code, _, err = rescore(tmp_path, good[:1] + [dict(benchmark="medqa", id=items[1]["id"], response=3)],
                           out="ev3")
    assert code == 1 and err == (f"error: {tmp_path / 'resp.jsonl'}:2: field 'response' must be a string "
                                 "('responses' a list of strings), got int")


def test_earlier_results_are_not_replaced_silently(tmp_path):
    items = load_benchmark("medqa", os.path.join(FIX, "medqa_5opt_sample.jsonl"))
    rows = [dict(benchmark="medqa", id=it["id"], response="<answer>A</answer>") for it in items]
    assert rescore(tmp_path, rows)[0] == 0
    before = (tmp_path / "ev" / "results.json").read_text()
    code, _, err = rescore(tmp_path, rows[:5])
    assert code == 1 and err == (f"error: {tmp_path / 'ev'} already holds results (results.json, results.md, "
                                 "responses.jsonl): --overwrite replaces them, or pick another --out")
    assert (tmp_path / "ev" / "results.json").read_text() == before
    assert rescore(tmp_path, rows[:5], extra=["--overwrite"])[0] == 0
    assert json.load(open(tmp_path / "ev" / "results.json"))["medqa"]["n"] == 5


def test_stage_table_gain_over_the_cold_start_with_intervals(tmp_path):
    """With per-item outputs, stage 2's gain over the cold start pairs it with the cold start's answers (+40
    points here), not with stage 1's (+20), with a 95 % interval that excludes 0; stage 1's two gain columns
    are the same comparison."""
    correct = dict(sft=[1, 0, 0, 1, 0, 1, 0, 0, 1, 0], grpo_stage1=[1, 1, 1, 1, 0, 1, 0, 0, 1, 0],
                   grpo_stage2=[1, 1, 1, 1, 1, 1, 1, 0, 1, 0])
    for stage, c in correct.items():
        d = tmp_path / "seed0" / f"eval_{stage}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"kg": {"n": 10, "accuracy": 10.0 * sum(c),
                                                           "unanswered": 0}}))
        (d / "responses.jsonl").write_text("".join(json.dumps(dict(benchmark="kg", id=str(i), correct=bool(x)))
                                                   + "\n" for i, x in enumerate(c)))
    lines = stage_table(str(tmp_path))[0].splitlines()[2:]
    rows = {r.split(" | ")[0].strip("| "): r.split(" | ") for r in lines}
    assert rows["+RL stage 1"][3] == rows["+RL stage 1"][4] and rows["+RL stage 1"][3].startswith("+20.0 [")
    assert rows["+RL stage 2"][3].startswith("+40.0 [") and rows["+RL stage 2"][4].startswith("+20.0 [")
    lo = float(rows["+RL stage 2"][3].split("[")[1].split(",")[0])
    assert lo > 0 and rows["+CoT cold start"][3] == "-"


def test_stage_tables_for_several_benchmarks_with_lenient(tmp_path):
    """The real track evaluates each stage on several benchmarks with --lenient: one section each (kg first),
    the lenient accuracy beside the strict one, and the Base row named as run.sh's real track names it."""
    for stage, (kg, mq, lk) in dict(base=(0.0, 0.0, 5.0), sft=(40.0, 20.0, 30.0)).items():
        d = tmp_path / "seed0" / f"eval_{stage}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({
            "medqa": {"n": 10, "accuracy": mq, "unanswered": 50.0, "lenient_accuracy": lk},
            "kg": {"n": 10, "accuracy": kg, "unanswered": 10.0, "lenient_accuracy": kg},
            "macro_average": {}}))
    text, means = stage_tables(str(tmp_path), "a real model as it came")
    assert text.index("### kg") < text.index("### medqa") and set(means) == {"kg", "medqa"}
    medqa = text.split("### medqa")[1]
    assert "| Base (a real model as it came) | 0.0 +- 0.0 | 0.0 |" in medqa
    assert "lenient accuracy (%) |" in medqa
    assert medqa.strip().splitlines()[-1].endswith("| 50.0 | 30.0 |")

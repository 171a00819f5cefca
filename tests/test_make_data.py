"""make_data.py: public loaders, filters, decontamination, anonymisation, label verification, distillation
against a scripted OpenAI-compatible server on 127.0.0.1, and resume after an interruption."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

import make_data
from helpers import ROOT, FakeOpenAI
from make_data import anonymise, format_problem, load_public

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def test_public_loaders(tmp_path):
    items = load_public("medqa5", os.path.join(FIX, "medqa_5opt_sample.jsonl"))
    assert len(items) == 20 and all(it["source"] == "medqa5" and len(it["options"]) == 5 for it in items)
    write(tmp_path / "mm.jsonl", [dict(id="a", question="Q?", opa="w", opb="x", opc="y", opd="z", cop=3,
                                       exp="because")])
    it = load_public("medmcqa", str(tmp_path / "mm.jsonl"))[0]
    assert it["answer"] == "D" and it["rationale"] == "because"
    write(tmp_path / "pq.jsonl", [dict(pubid=1, question="Does?", context={"contexts": ["c"]},
                                       final_decision="no")])
    assert load_public("pubmedqa", str(tmp_path / "pq.jsonl"))[0]["answer"] == "B"
    opts = [{"key": "A", "value": "甲"}, {"key": "B", "value": "乙"}]
    write(tmp_path / "cm.jsonl", [dict(Question="问题一", Options=opts, Answer="B", Explanation="解释"),
                                  dict(Question="问题二", Options=opts, Answer="AB", Explanation="")])
    cm = load_public("cmexam", str(tmp_path / "cm.jsonl"))
    assert len(cm) == 1 and cm[0]["answer"] == "B"    # multi-letter answers dropped


@pytest.mark.parametrize("item,reason", [
    (dict(question="", options={"A": "x", "B": "y"}, answer="A"), "empty_question"),
    (dict(question="q", options={"A": "x", "B": ""}, answer="A"), "empty_option"),
    (dict(question="q", options={"A": "Same", "B": "same "}, answer="A"), "duplicate_options"),
    (dict(question="q", options={"A": "x", "B": "y"}, answer="C"), "answer_not_in_options"),
    (dict(question="caf\u00c3\u00a9 au lait", options={"A": "x", "B": "y"}, answer="A"), "mojibake"),
    (dict(question="q\ufffd", options={"A": "x", "B": "y"}, answer="A"), "mojibake"),
    (dict(question="q" * 7000, options={"A": "x", "B": "y"}, answer="A"), "too_long"),
    (dict(question="q", options={"A": "x", "C": "y"}, answer="A"), "bad_option_letters"),
    (dict(question="A fine question?", options={"A": "x", "B": "y"}, answer="B"), None),
])
def test_format_filters(item, reason):
    assert format_problem(item, 6000) == reason


def test_anonymisation():
    text = ("Mr. John Smith (MRN: 48213377, DOB: 03/14/1962) was seen by Dr. Alvarez; call 555-867-5309 or "
            "mail "
            "jsmith@example.org. A 45-year-old man presents with chest pain.")
    out = anonymise(text)
    for secret in ("John", "Smith", "48213377", "03/14/1962", "Alvarez", "867-5309", "jsmith@example.org"):
        assert secret not in out
    assert "[NAME]" in out and "[RECORD]" in out and "[DOB]" in out and "[PHONE]" in out and "[EMAIL]" in out
    assert "A 45-year-old man presents with chest pain." in out   # clinical content untouched


def small_kg_args(out, extra=()):
    return ["--out", str(out), "--kg-questions", "60", "--kg-max-diseases", "40", "--seed", "1"] + list(extra)


def test_dedup_decontam_and_report(tmp_path):
    # a public file whose second row duplicates the first and whose third is planted from the eval set
    ev = json.loads(open(os.path.join(FIX, "medqa_5opt_sample.jsonl")).readline())
    rows = [dict(question="What causes scurvy in sailors on long voyages without fresh food?",
                 options={"A": "Vitamin C deficiency", "B": "Iron", "C": "Zinc", "D": "Salt"},
                 answer_idx="A")] * 2
    rows.append(dict(question=ev["question"], options=ev["options"], answer_idx=ev["answer_idx"]))
    write(tmp_path / "pub.jsonl", rows)
    make_data.main(small_kg_args(tmp_path / "d", ["--public", f"medqa={tmp_path / 'pub.jsonl'}",
                                                   "--decontam", os.path.join(FIX,
                                                                              "medqa_5opt_sample.jsonl")]))
    rep = json.load(open(tmp_path / "d" / "report.json"))
    assert rep["dropped"]["duplicate"] == 1 and rep["dropped"]["contaminated"] == 1
    items = [json.loads(l) for l in open(tmp_path / "d" / "items.jsonl")]
    assert sum(it["source"] == "medqa" for it in items) == 1
    assert not any(ev["question"][:60] in it["question"] for it in items)
    sft = [json.loads(l) for l in open(tmp_path / "d" / "sft.jsonl")]
    assert sft and all(m["messages"][-1]["content"].endswith("</answer>") for m in sft)
    assert {"Easy", "Moderate", "Difficult"} == set(rep["tiers"])


def public_file(path, n=12):
    rows = []
    for i in range(n):
        opts = {"A": f"wrong {i} a", "B": f"RIGHT {i}", "C": f"wrong {i} c", "D": f"wrong {i} d"}
        rows.append(dict(question=f"Planted question number {i} about condition {i}?", options=opts,
                         answer_idx="A" if i == 0 else "B"))   # item 0 is mislabeled
    write(path, rows)


def test_distillation_refines_and_verification_flags(tmp_path, monkeypatch):
    srv = FakeOpenAI()
    monkeypatch.setenv("TEST_KEY", "sk-secret-value")
    try:
        public_file(tmp_path / "pub.jsonl")
        out = tmp_path / "d"
        make_data.main(["--kg", "none", "--public", f"medqa={tmp_path / 'pub.jsonl'}", "--out", str(out),
                        "--teacher-url", srv.url, "--teacher-model", "t", "--validator-url", srv.url,
                        "--validator-model", "v", "--key-env", "TEST_KEY", "--test-frac", "0", "--sft-frac",
                        "1.0"])
    finally:
        srv.close()
    rep = json.load(open(out / "report.json"))
    review = [json.loads(l) for l in open(out / "review.jsonl")]
    assert [r["question"] for r in review] == ["Planted question number 0 about condition 0?"]
    assert rep["dropped"]["never_answered_by_validator"] == 1
    d = rep["distillation"]
    assert d["failed_wrong_answer"] == 11 and d["verified_round_1"] == 11 and d["dropped_unverified"] == 0
    sft = [json.loads(l) for l in open(out / "sft.jsonl")]
    # the teacher answered with the letter; the targets answer as the prompt asks: the option's text
    assert len(sft) == 11 and all(re.search(r"<answer>RIGHT \d+</answer>$", s["messages"][-1]["content"])
                                  for s in sft)
    assert {t for s in sft for t in ("Z",) if "<answer>Z" in s["messages"][-1]["content"]} == set()
    for f in os.listdir(out):   # the key is never written anywhere
        assert "sk-secret-value" not in open(out / f, encoding="utf-8").read()


def test_interrupted_run_resumes_from_cache(tmp_path):
    public_file(tmp_path / "pub.jsonl")
    args = lambda url: ["--kg", "none", "--public", f"medqa={tmp_path / 'pub.jsonl'}", "--out",
                        str(tmp_path / "d"),
                        "--teacher-url", url, "--teacher-model", "t", "--test-frac", "0", "--sft-frac", "1.0",
                        "--retries", "2"]
    srv = FakeOpenAI(fail_after=5)      # dies after 5 answered calls, like a killed run
    try:
        with pytest.raises(ConnectionError, match="failed 3 times"):
            make_data.main(args(srv.url))
    finally:
        srv.close()
    assert not os.path.exists(tmp_path / "d" / "sft.jsonl")     # nothing half-written
    srv2 = FakeOpenAI()
    try:
        make_data.main(args(srv2.url))
    finally:
        srv2.close()
    # 12 items x 2 rounds = 24 teacher calls in all; the 5 answered before the crash are not paid again
    assert srv2.calls == 24 - 5
    sft = [json.loads(l) for l in open(tmp_path / "d" / "sft.jsonl")]
    assert len(sft) == 12 and len({s["id"] for s in sft}) == 12


def test_default_is_deterministic(tmp_path):
    make_data.main(small_kg_args(tmp_path / "a"))
    make_data.main(small_kg_args(tmp_path / "b"))
    for f in ("sft.jsonl", "rl_train.jsonl", "test.jsonl"):
        assert open(tmp_path / "a" / f).read() == open(tmp_path / "b" / f).read()


def test_short_rationale_with_text_answers(tmp_path):
    """The default (--kg-rationale short) against walk: no option walk, the tag holds the option text (the
    answer contract), and every trace scores as its item's letter under the strict parser."""
    from mcq import extract_answer, format_ok
    make_data.main(small_kg_args(tmp_path / "w") + ["--kg-rationale", "walk"])
    make_data.main(small_kg_args(tmp_path / "s"))   # the default: short, text
    walk = [json.loads(l) for l in open(tmp_path / "w" / "sft.jsonl")]
    short = [json.loads(l) for l in open(tmp_path / "s" / "sft.jsonl")]
    assert [s["id"] for s in short] == [w["id"] for w in walk]   # same items, only the traces differ
    items = {json.loads(l)["id"]: json.loads(l) for l in open(tmp_path / "s" / "items.jsonl")}
    for s, w in zip(short, walk):
        it, ts, tw = items[s["id"]], s["messages"][-1]["content"], w["messages"][-1]["content"]
        assert "Checking the options" in tw and "Checking the options" not in ts and len(ts) < len(tw)
        tag = re.search(r"<answer>(.*)</answer>", ts).group(1)
        assert tag == it["options"][it["answer"]] and format_ok(ts)
        assert extract_answer(ts, it["options"]) == it["answer"]


def distill_args(tmp_path, url, out, extra=()):
    return ["--kg", "none", "--public", f"medqa={tmp_path / 'pub.jsonl'}", "--out", str(out), "--teacher-url",
            url,
            "--teacher-model", "t", "--validator-url", url, "--validator-model", "v", "--test-frac", "0",
            "--sft-frac", "1.0"] + list(extra)


def test_same_outputs_whatever_the_concurrency(tmp_path):
    """Requests in flight at once change when answers arrive, not what is written."""
    public_file(tmp_path / "pub.jsonl", n=40)
    srv = FakeOpenAI(delay=0.01)
    try:
        for c in (1, 16):
            make_data.main(distill_args(tmp_path, srv.url, tmp_path / f"c{c}", ["--concurrency", str(c)]))
    finally:
        srv.close()
    for f in ("items.jsonl", "sft.jsonl", "rl_train.jsonl", "review.jsonl"):
        assert (tmp_path / "c1" / f).read_bytes() == (tmp_path / "c16" / f).read_bytes(), f
    rep = json.load(open(tmp_path / "c16" / "report.json"))
    assert rep["teacher_requests"]["answered"] == 78 and rep["validator_requests"]["answered"] == 40


def test_kill_mid_run_then_rerun(tmp_path):
    """kill -9 while requests are in flight: the rerun asks only what the cache lacks, and the outputs hold
    every item once."""
    public_file(tmp_path / "pub.jsonl", n=40)
    out = tmp_path / "d"
    srv = FakeOpenAI(delay=0.05)
    try:
        args = distill_args(tmp_path, srv.url, out, ["--concurrency", "4"])
        env = {**os.environ, "PYTHONPATH": ROOT}
        p = subprocess.Popen([sys.executable, "make_data.py"] + args, cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        cache, t0 = out / "cache.jsonl", time.time()
        while time.time() - t0 < 60 and (not cache.exists() or cache.read_text().count("\n") < 50):
            time.sleep(0.02)
        p.kill()
        p.wait()
        n = -1
        while n != srv.calls:   # requests the killed process sent may still reach the server: let them land
            n = srv.calls
            time.sleep(0.3)
        lines = cache.read_text().splitlines()
        cached = {json.loads(l)["key"] for l in lines if l.endswith("}")}
        assert 50 <= len(cached) < 118 and not (out / "sft.jsonl").exists()
        before = srv.calls
        make_data.main(args)
    finally:
        srv.close()
    assert srv.calls - before == 118 - len(cached)   # 40 validator + 39 x 2 teacher requests in all
    keys = [json.loads(l)["key"] for l in cache.read_text().splitlines() if l.strip()]
    assert len(keys) == len(set(keys)) == 118
    sft = [json.loads(l) for l in open(out / "sft.jsonl")]
    assert len(sft) == 39 and len({s["id"] for s in sft}) == 39


def test_throttled_requests_are_retried(tmp_path):
    """HTTP 429 twice, then 200: waited out (Retry-After), the run completes."""
    public_file(tmp_path / "pub.jsonl", n=5)
    srv = FakeOpenAI(throttle=2)
    try:
        make_data.main(distill_args(tmp_path, srv.url, tmp_path / "d", ["--concurrency", "1"]))
    finally:
        srv.close()
    rep = json.load(open(tmp_path / "d" / "report.json"))
    assert rep["validator_requests"]["retries"] == 2 and rep["sft"] == 4


def test_silent_endpoint_times_out_and_keeps_what_was_answered(tmp_path):
    """An endpoint that accepts requests and never answers: --teacher-timeout bounds the wait, the run stops
    with one clear error, and the answers that did arrive stay in the cache."""
    public_file(tmp_path / "pub.jsonl", n=12)
    srv = FakeOpenAI(hang_after=5)
    t0 = time.time()
    try:
        with pytest.raises(ConnectionError, match="no answer within --teacher-timeout 1 s"):
            make_data.main(distill_args(tmp_path, srv.url, tmp_path / "d", ["--concurrency", "2",
                                                                            "--teacher-timeout",
                                                                            "1", "--retries", "1"]))
    finally:
        srv.close()
    assert time.time() - t0 < 30
    assert len((tmp_path / "d" / "cache.jsonl").read_text().splitlines()) == 5


def test_null_answers_are_retried_never_cached(tmp_path):
    """A server that answers 200 with "content": null (a content filter, a tool call): each such answer is a
    failed attempt, retried; the run completes and the cache holds no null. A cache that already holds nulls
    (written before this check) is read with a warning and those calls are asked again."""
    public_file(tmp_path / "pub.jsonl", n=5)
    out = tmp_path / "d"
    srv = FakeOpenAI(nulls=3)
    try:
        make_data.main(distill_args(tmp_path, srv.url, out, ["--concurrency", "1"]))
    finally:
        srv.close()
    rep = json.load(open(out / "report.json"))
    assert rep["sft"] == 4 and rep["validator_requests"]["retries"] == 3
    values = [json.loads(l)["value"] for l in open(out / "cache.jsonl")]
    assert values and all(v and all(isinstance(c, str) and c for c in v) for v in values)
    # a poisoned cache: every value null; the rerun warns, asks again and ends with the same data
    poisoned = [dict(json.loads(l), value=[None]) for l in open(out / "cache.jsonl")]
    write(out / "cache.jsonl", poisoned)
    srv = FakeOpenAI()
    try:
        p = subprocess.run([sys.executable, "make_data.py"] + distill_args(tmp_path, srv.url, out),
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        srv.close()
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"{len(poisoned)} line(s) hold no valid answer" in p.stdout and srv.calls == len(poisoned)


def test_null_answers_after_every_retry_count_as_rejections(tmp_path):
    """Nulls to the last retry: the item's trace is rejected (failed_empty_answer), the run still ends."""
    public_file(tmp_path / "pub.jsonl", n=3)
    srv = FakeOpenAI(nulls=10 ** 6)
    try:
        make_data.main(["--kg", "none", "--public", f"medqa={tmp_path / 'pub.jsonl'}", "--out",
                        str(tmp_path / "d"), "--teacher-url", srv.url, "--teacher-model", "t", "--test-frac",
                        "0", "--sft-frac", "1.0", "--retries", "1", "--refine-rounds", "0"])
    finally:
        srv.close()
    rep = json.load(open(tmp_path / "d" / "report.json"))
    assert rep["sft"] == 0 and rep["distillation"]["failed_empty_answer"] == 3
    assert not (tmp_path / "d" / "cache.jsonl").read_text().strip()


def test_api_key_never_reaches_a_message(tmp_path):
    """A server whose 401 reason phrase echoes the Authorization header: the error names the endpoint and the
    status, the key itself is redacted."""
    public_file(tmp_path / "pub.jsonl", n=2)
    srv = FakeOpenAI(echo_auth=True)
    env = {**os.environ, "PYTHONPATH": ROOT, "NF_TEST_KEY": "sk-very-secret-123"}
    try:
        p = subprocess.run([sys.executable, "make_data.py", "--key-env", "NF_TEST_KEY"]
                           + distill_args(tmp_path, srv.url, tmp_path / "d"), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    finally:
        srv.close()
    assert p.returncode == 1 and "HTTP 401" in p.stderr and "[API key]" in p.stderr
    assert "sk-very-secret-123" not in p.stdout + p.stderr


def test_empty_public_file_is_an_error(tmp_path):
    """A --public file with no rows (and no KG): said by name, non-zero exit, nothing written."""
    (tmp_path / "empty.jsonl").write_text("")
    p = subprocess.run([sys.executable, "make_data.py", "--kg", "none", "--public",
                        f"medqa={tmp_path / 'empty.jsonl'}", "--out", str(tmp_path / "d")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "has no rows" in p.stdout
    assert p.stderr.strip().splitlines()[-1].startswith("error: no items to write")
    assert not (tmp_path / "d" / "rl_train.jsonl").exists()


def test_folder_with_another_dataset_is_refused(tmp_path):
    """The same flags again (the documented resume of the teacher cache) keep the folder; other flags are
    refused in one line naming them, --overwrite replaces the dataset."""
    out = tmp_path / "d"
    make_data.main(small_kg_args(out))
    make_data.main(small_kg_args(out, ["--concurrency", "3"]))   # how it is fetched, not what it is
    first = (out / "rl_train.jsonl").read_bytes()
    with pytest.raises(SystemExit, match=r"other flags \(--kg-questions\): --overwrite replaces it"):
        make_data.main(small_kg_args(out, ["--kg-questions", "30"]))
    assert (out / "rl_train.jsonl").read_bytes() == first
    make_data.main(small_kg_args(out, ["--kg-questions", "30", "--overwrite"]))
    assert (out / "rl_train.jsonl").read_bytes() != first

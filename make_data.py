"""
make_data.py: the paper's data strategy (RODS, 3.1) and CoT cold-start data (3.2) in one script.
Sources -> one MCQ schema -> format filters, de-duplication, decontamination, anonymisation -> label
verification (k trials) -> difficulty tiers -> mixing -> verified CoT traces -> SFT and RL files.

    python make_data.py                                   # embedded default: KG questions from hpo3, offline
    python make_data.py --public medqa=medqa_train.jsonl --public medmcqa=hub --decontam evalsets/*.jsonl \
        --teacher-url http://localhost:8000/v1 --teacher-model Qwen2.5-72B-Instruct \
        --validator-url http://localhost:8000/v1 --validator-model Qwen2.5-72B-Instruct --out data/full
    python make_data.py --teacher-ckpt runs/big/sft       # a local checkpoint as teacher (our generate)

Outputs in --out: items.jsonl (every kept item, one schema), sft.jsonl (chat messages with verified
traces), rl_train.jsonl (question + gold + tier), test.jsonl (held-out split for evaluate.py),
review.jsonl (items the validator never got right), report.json. Teacher / validator calls are cached in
{out}/cache.jsonl, so an interrupted run resumes without paying twice. API keys come from the environment.
"""
import argparse
import email.utils
import hashlib
import json
import math
import os
import random
import re
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter

from cli import Parser, at_least, between, fraction, guard
from mcq import (LETTERS, build_messages, chat_ids, conv_medmcqa, conv_medqa, conv_pubmedqa, convert,
                 extract_answer, format_ok, official_test_ids, read_records)

# -----------------------------------------------------------------------------
# sources -> one schema: id, source, question, options {letter: text}, answer, context, rationale, difficulty,
# meta


def conv_cmexam(r, i):
    opts = {o["key"]: o["value"] for o in r["Options"]}
    ans = str(r["Answer"]).strip()
    if len(ans) != 1:
        return None   # multi-answer items are not single-choice
    return dict(id=r.get("id", i), question=r["Question"], options=opts, answer=ans,
                rationale=r.get("Explanation"))


def conv_medmcqa_train(r, i):
    it = conv_medmcqa(r, i)
    it["rationale"] = r.get("exp")
    return it


PUBLIC = {   # name: (hub id, config, split, converter)
    "medqa": ("GBaker/MedQA-USMLE-4-options", None, "train", conv_medqa),
    "medqa5": ("bigbio/med_qa", "med_qa_en_source", "train", conv_medqa),
    "medmcqa": ("openlifescienceai/medmcqa", None, "train", conv_medmcqa_train),
    "pubmedqa": ("qiaojin/PubMedQA", "pqa_artificial", "train", conv_pubmedqa),
    "pubmedqa_labeled": ("qiaojin/PubMedQA", "pqa_labeled", "train", conv_pubmedqa),
    "cmexam": ("fzkuji/CMExam", None, "train", conv_cmexam),
}


def load_public(name, where):
    """where: a local JSONL/JSON/Parquet/CSV path in the upstream schema, or 'hub'."""
    if name not in PUBLIC:
        raise SystemExit(f"--public {name}: unknown set (have {', '.join(PUBLIC)})")
    hub, config, split, conv = PUBLIC[name]
    if where == "hub":
        import datasets
        try:
            rows, src = datasets.load_dataset(hub, config, split=split), hub
        except Exception as e:
            print(f"[skip] {name}: hub load of {hub} failed ({type(e).__name__}); give a local file instead")
            return []
    else:
        rows, src = read_records(where), where
    items = convert(rows, conv, src)
    test = official_test_ids(where)
    if test is not None:   # PubMedQA's authors' file: their test split stays out of training
        items = [it for it in items if it["id"] not in test]
        print(f"{name}: {where} without the {len(test)} test ids of test_ground_truth.json beside it")
    for it in items:
        it["id"] = f"{name}-{it['id']}"
        it["source"] = name
    return items


def kg_items(args):
    """KG-guided synthetic questions (kg.py), with evidence paths and KG-rendered rationales."""
    import numpy as np
    from kg import QuestionSampler, load_kg
    kg = full = load_kg(args.kg)
    if args.kg_max_diseases and "disease" in kg.type_names:
        # a small closed world a tiny model can learn: N diseases (rarity-weighted draw) and their findings
        rng = np.random.default_rng(args.seed)
        dis = np.nonzero(kg.types == kg.type_id("disease"))[0]
        dis = dis[kg.degree[dis] >= 6]
        w = kg.degree[dis].astype(float) ** -args.rarity
        chosen = rng.choice(dis, size=min(args.kg_max_diseases, len(dis)), replace=False, p=w / w.sum())
        keep = kg.types != kg.type_id("disease")
        if "gene" in kg.type_names:
            keep &= kg.types != kg.type_id("gene")
        keep[chosen] = True
        kg = kg.subgraph(keep)
    kinds = [k for k in args.kg_kinds.split(",") if k] or None
    # vignettes are checked against the whole graph (truth), not just the subgraph
    sampler = QuestionSampler(kg, seed=args.seed, rarity=args.rarity, n_options=args.options, kinds=kinds,
                              min_evidence=args.min_evidence, max_evidence=args.max_evidence,
                              rationale=args.kg_rationale, truth=full)
    qs = sampler.sample_many(args.kg_questions)
    out = []
    for i, q in enumerate(qs):
        out.append(dict(id=f"kg-{args.seed}-{i}", source="kg", question=q["question"], options=q["options"],
                        answer=q["answer"], rationale=q["rationale"],
                        meta=dict(kind=q["kind"], hops=q["hops"], answer_degree=q["answer_degree"],
                                  target_degree=q["target_degree"],
                                  distractor_overlap=q["distractor_overlap"], evidence=q["evidence"],
                                  entities=q["entities"])))
    return out, kg.source


# -----------------------------------------------------------------------------
# refinement

MOJIBAKE = re.compile("[\ufffd]|Ã.|â€|Â[^\\w]")


def norm_text(s):
    return " ".join(unicodedata.normalize("NFKC", str(s)).lower().split())


def format_problem(it, max_chars):
    """The reason an item is malformed, or None."""
    opts = it.get("options") or {}
    if not it.get("question") or not str(it["question"]).strip():
        return "empty_question"
    if len(opts) < 2:
        return "too_few_options"
    if any(not str(v).strip() for v in opts.values()):
        return "empty_option"
    if len({norm_text(v) for v in opts.values()}) < len(opts):
        return "duplicate_options"
    if list(opts) != list(LETTERS[:len(opts)]):
        return "bad_option_letters"
    if it.get("answer") not in opts:
        return "answer_not_in_options"
    text = it["question"] + " ".join(map(str, opts.values())) + (it.get("context") or "")
    if MOJIBAKE.search(text) or any(unicodedata.category(c) == "Cc" and c not in "\n\t\r" for c in text):
        return "mojibake"
    if len(text) > max_chars:
        return "too_long"
    return None


def ngrams(text, n):
    w = re.findall(r"\w+", norm_text(text))
    if len(w) < n:   # a short text is its own n-gram
        return {" ".join(w)} if w else set()
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


def decontam_index(paths, n):
    """n-grams of every evaluation question: any JSONL/JSON/Parquet/CSV whose rows have a question field
    (every benchmark schema does), so the files need no particular name."""
    grams = set()
    for p in paths:
        rows = read_records(p)
        test = official_test_ids(p)   # PubMedQA's ori_pqal.json: its test split only
        rows = [r for r in rows if test is None or str(r.get("id")) in test]
        qs = [r.get("question") or r.get("Question") or r.get("QUESTION") for r in rows]
        if not any(qs):
            raise SystemExit(f"{p}: no 'question' field in its rows; cannot decontaminate against it")
        for q in qs:
            grams |= ngrams(q or "", n)
    return grams


ANON = [   # (pattern, replacement): obvious identifiers, conservative on purpose (clinical text keeps ages)
    (re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+"), "[EMAIL]"),
    (re.compile(r"\b(?:MRN|medical record (?:number|no\.?)|record #|patient ID)"
                r"\s*[:#]?\s*[A-Z0-9-]{4,}", re.I), "[RECORD]"),
    (re.compile(r"\b(?:DOB|date of birth|born on)\s*[:]?\s*"
                r"(?:\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}|[A-Z][a-z]+ \d{1,2},? \d{4})", re.I), "[DOB]"),
    (re.compile(r"(?<!\w)(?:\+?\d{1,3}[ .-]?)?\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b"), "[PHONE]"),
    (re.compile(r"\b(Mr|Mrs|Ms|Miss|Dr|Prof)\.? [A-Z][a-z]+(?: [A-Z][a-z]+)?"), r"\1. [NAME]"),
]


def anonymise(text):
    if not text:
        return text
    for pat, rep in ANON:
        text = pat.sub(rep, text)
    return text


# -----------------------------------------------------------------------------
# models: an OpenAI-compatible endpoint or a local checkpoint, every call cached on disk


def answered(value):
    """A cacheable answer: a list of non-empty strings (a server may answer 200 with content null)."""
    return isinstance(value, list) and bool(value) and all(isinstance(c, str) and c.strip() for c in value)


class CallCache:
    """Append-only JSONL of request-hash -> response, flushed per answer: a kill loses only what was in
    flight. A line that holds no valid answer (cut by a kill, or null / empty contents written by an older
    version) is ignored: that call is asked again."""

    def __init__(self, path):
        self.path, self.data = path, {}
        bad = 0
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        r = json.loads(line)
                        if answered(r["value"]):
                            self.data[r["key"]] = r["value"]
                            continue
                    except (json.JSONDecodeError, KeyError, TypeError):
                        pass
                    bad += bool(line.strip())
        if bad:
            print(f"warning: {path}: {bad} line(s) hold no valid answer (cut short, or null / empty "
                  "contents); those calls are asked again", flush=True)
        self.f = open(path, "a", encoding="utf-8")
        if self.f.tell() and open(path, "rb").read()[-1:] != b"\n":
            self.f.write("\n")   # close a line cut by a kill, so the next record starts on its own line

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        if not answered(value):   # never cache a failed answer: the next run asks again
            return
        self.data[key] = value
        self.f.write(json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")
        self.f.flush()


RETRY_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)   # the server is busy or restarting: wait and retry


def retry_after(err, attempt, rng, cap=60.0):
    """Seconds to wait before retry `attempt` (0-based): the server's Retry-After if it sent one, else
    exponential backoff (0.5 s, 1 s, 2 s ... up to cap) with full jitter, so clients that failed together
    do not return together."""
    http = isinstance(err, urllib.error.HTTPError) and err.headers
    header = err.headers.get("Retry-After") if http else None
    if header:
        try:
            return min(cap, max(0.0, float(header)))
        except ValueError:
            try:
                return min(cap, max(0.0, email.utils.parsedate_to_datetime(header).timestamp() - time.time()))
            except (TypeError, ValueError):
                pass
    return rng.uniform(0, min(cap, 0.5 * 2 ** attempt))


def shown_url(url):
    """A URL as messages may print it: no query string or user:password (a key put there stays out of logs)."""
    u = urllib.parse.urlsplit(url)
    host = u.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((u.scheme, host, u.path, "[query hidden]" if u.query else "", ""))


class ChatModel:
    """chat(list of message lists, n samples, temperature) -> list (per conversation) of n strings. An HTTP
    endpoint gets up to `concurrency` requests at once (a vLLM server batches them: 64 at once take about the
    time of one); each answer goes to the cache as it arrives, so a killed run resumes where it was."""

    def __init__(self, endpoint, cache, args):
        """endpoint: (url, model name, local checkpoint); args: make_data's flags (--key-env, --max-tokens,
        --seed, --teacher-timeout, --concurrency, --retries)."""
        url, model, ckpt = endpoint
        self.url, self.model, self.cache = url, model, cache
        self.max_tokens, self.seed = args.max_tokens, args.seed
        self.timeout, self.concurrency, self.retries = args.teacher_timeout, args.concurrency, args.retries
        self.key = os.environ.get(args.key_env) if url else None   # never printed or written
        self.shown = shown_url(url) if url else None          # the URL as messages print it
        self.local = None
        if ckpt:
            from hf_io import load_model, load_tokenizer
            self.local = (load_model(ckpt).eval(), load_tokenizer(ckpt))
            self.model = ckpt
        self.calls, self.retried, self.seconds = 0, 0, 0.0   # answers, retries, time waiting for them
        self.rng = random.Random()   # jitter only: never touches what is asked or answered

    def redact(self, text):
        """The API key out of any message (a server may echo the Authorization header in its reason)."""
        text = str(text)
        return text.replace(self.key, "[API key]") if self.key else text

    def _http(self, messages, temperature, n):
        """n answers; an answer that is null or empty (a content filter, a tool call) is retried like a busy
        server, and after the last retry comes back as "" (the caller counts it as a rejection and does
        not cache it)."""
        body = json.dumps(dict(model=self.model, messages=messages, temperature=temperature, n=n,
                               max_tokens=self.max_tokens, seed=self.seed)).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        for attempt in range(self.retries + 1):
            try:
                u = urllib.parse.urlsplit(self.url)   # the path goes before a query string, if any
                url = urllib.parse.urlunsplit(u._replace(path=u.path.rstrip("/") + "/chat/completions"))
                req = urllib.request.Request(url, body, headers)
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    out = json.loads(r.read())
                got = [c["message"]["content"] for c in out["choices"]]
                if answered(got) or attempt == self.retries:
                    return [c if isinstance(c, str) else "" for c in got]
                last, err = "an answer with null or empty content", None
            except urllib.error.HTTPError as e:
                if e.code not in RETRY_STATUS:   # 400, 401, 404...: asking again will not help
                    why = self.redact(f"endpoint {self.shown}: HTTP {e.code} {e.reason}")
                    raise ConnectionError(why) from None
                last = f"HTTP {e.code}"
                err = e
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = self.redact(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
                if "timed out" in str(e):
                    last = f"no answer within --teacher-timeout {self.timeout:g} s"
                err = e
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConnectionError(self.redact(f"endpoint {self.shown}: not an OpenAI chat completion "
                                                  f"({e})")) from None
            if attempt < self.retries:
                self.retried += 1
                time.sleep(retry_after(err, attempt, self.rng))
        raise ConnectionError(f"endpoint {self.shown} failed {self.retries + 1} times, last: {last}")

    def _http_all(self, todo, temperature, n):
        """Each (key, messages) of todo, `concurrency` at a time at most; yields (key, answer) on arrival."""
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
        from tqdm import tqdm
        pool = ThreadPoolExecutor(max(1, self.concurrency))
        pending = {pool.submit(self._http, msgs, temperature, n): key for key, msgs in todo}
        error, t0 = None, time.time()
        bar = tqdm(total=len(todo), desc=f"requests to {self.model}", unit="req", smoothing=0.05)
        try:
            while pending:
                done, _ = wait(pending, timeout=5, return_when=FIRST_COMPLETED)
                for fut in done:
                    key = pending.pop(fut)
                    if fut.cancelled():
                        continue
                    if fut.exception() is not None:
                        if error is None:   # keep what is in flight, start nothing new
                            error = fut.exception()
                            for f in pending:
                                f.cancel()
                        continue
                    bar.update()
                    yield key, fut.result()
                pending = {f: k for f, k in pending.items() if not f.cancelled()}
                bar.set_postfix(in_flight=min(len(pending), self.concurrency), retries=self.retried,
                                waited=f"{time.time() - t0:.0f}s")
        finally:
            bar.close()
            pool.shutdown(wait=False, cancel_futures=True)
        if error is not None:
            raise error

    def stats(self):
        return dict(answered=self.calls, retries=self.retried, seconds=round(self.seconds, 2),
                    per_s=round(self.calls / self.seconds, 2) if self.seconds else None,
                    concurrency=self.concurrency)

    def chat(self, convs, n=1, temperature=0.7):
        outs, todo = [None] * len(convs), {}
        keys = []
        for i, msgs in enumerate(convs):
            request = json.dumps([self.model, msgs, n, temperature, self.seed])
            key = hashlib.sha256(request.encode()).hexdigest()
            keys.append(key)
            hit = self.cache.get(key) if self.cache else None
            if hit is not None:
                outs[i] = hit
            else:
                todo.setdefault(key, msgs)   # the same conversation twice is asked once
        answers = {}
        if self.local and todo:   # one queue through the rollout engine; conversation i has seed + i
            from engine import generate
            from model import SamplingParams
            m, tok = self.local
            items = list(todo.items())
            sp = SamplingParams(self.max_tokens, temperature, num_samples=n,
                                stop_ids=(tok.convert_tokens_to_ids("<|im_end|>"),))
            gen, _ = generate(m, [chat_ids(tok, msgs) for _, msgs in items], sp, seed=self.seed, slots=64)
            for j, (key, _) in enumerate(items):
                answers[key] = [tok.decode(g, skip_special_tokens=True) for g in gen[j * n:(j + 1) * n]]
                self.calls += 1
                if self.cache:
                    self.cache.put(key, answers[key])
        elif todo:
            t0 = time.time()
            try:
                for key, answer in self._http_all(list(todo.items()), temperature, n):
                    answers[key] = answer
                    self.calls += 1
                    if self.cache:
                        self.cache.put(key, answer)
            finally:
                self.seconds += time.time() - t0
        return [o if o is not None else answers[k] for o, k in zip(outs, keys)]


def verify_labels(items, validator, k):
    """The paper's label check: the validator answers each item k times; its pass rate is kept, and items it
    never gets right are flagged for review."""
    convs = [build_messages(it) for it in items]
    answers = validator.chat(convs, n=k, temperature=0.7)
    for it, resp in zip(items, answers):
        it["pass_rate"] = sum(extract_answer(r, it["options"]) == it["answer"] for r in resp) / k


JUDGE_PROMPT = ("Classify the difficulty of this medical question for a practising clinician as Easy (basic, "
                "commonly known), Moderate (detailed knowledge or intermediate reasoning) or Difficult "
                "(specialised knowledge, "
                "multi-step inference or rare conditions). Reply with one word.\n\n")


def assign_tiers(items, judge=None):
    """Easy / Moderate / Difficult by measured pass rate, else an LLM judge, else KG signals (terciles)."""
    if all("pass_rate" in it for it in items):
        for it in items:
            p = it["pass_rate"]
            it["difficulty"] = "Easy" if p >= 0.8 else "Moderate" if p >= 0.4 else "Difficult"
        return "pass rate of the validator over k samples"
    if judge is not None:
        asks = [[{"role": "user", "content": JUDGE_PROMPT + build_messages(it)[1]["content"]}]
                for it in items]
        outs = judge.chat(asks, n=1, temperature=0.0)
        for it, o in zip(items, outs):
            w = re.findall(r"easy|moderate|difficult", o[0].lower())
            it["difficulty"] = w[0].capitalize() if w else "Moderate"
        return "LLM judge"
    def score(it):   # hops, rarity of the answer, and how much the distractors share the evidence
        m = it.get("meta") or {}
        rare = 1.0 / (1 + (m.get("answer_degree", 30) / 30))
        return m.get("hops", 1) + rare + m.get("distractor_overlap", 0.5)
    ranked = sorted(items, key=score)
    for i, it in enumerate(ranked):
        it["difficulty"] = ("Easy", "Moderate", "Difficult")[min(2, 3 * i // max(1, len(ranked)))]
    return "KG signals (hops, answer rarity, distractor overlap), terciles"


# -----------------------------------------------------------------------------
# CoT cold start: teacher rationales, verified, refined


TEACHER_PROMPT = ("Here is a medical multiple-choice question and its correct answer. Write a concise chain "
                  "of reasoning that a careful clinician would follow to reach that answer from the question "
                  "alone: weigh the findings, consider the alternatives, and rule them out. Do not state the "
                  "answer at the start. Wrap the reasoning in <think></think> and end with "
                  "<answer>{text}</answer>.\n\n{prompt}\n\n"
                  "Correct answer: {letter}. {text}")
REFINE_PROMPTS = [   # the paper's three refinement strategies, one per round
    "Your reasoning did not reach a verified correct answer in the required format. Backtrack: re-examine "
    "the "
    "assumptions you made early on, find the one that was wrong, and write the reasoning again.",
    "Explore other paths: list the competing hypotheses, test each against the findings, and write the "
    "reasoning again.",
    "Self-correct: find the logical error in your reasoning, fix it, and write the full corrected reasoning "
    "again.",
]


def answer_leaks(trace, it):
    first = re.split(r"(?<=[.!?])\s", re.sub(r"</?think>", "", trace).strip(), maxsplit=1)[0].lower()
    gold = norm_text(it["options"][it["answer"]])
    names_letter = re.search(rf"answer is\s*\(?{it['answer'].lower()}\b", first)
    return bool(names_letter) or (len(gold) > 3 and gold in norm_text(first))


def check_trace(trace, it):
    """A kept trace: the right letter, exactly one answer tag at the end, no answer leak in the first
    sentence."""
    if not trace.strip():   # a null / empty answer from the teacher
        return "empty_answer"
    if not format_ok(trace):
        return "format"
    if extract_answer(trace, it["options"]) != it["answer"]:
        return "wrong_answer"
    if answer_leaks(trace, it):
        return "leak"
    return None


def distill(items, teacher, rounds):
    """Teacher traces with up to `rounds` refinement turns. Returns {id: trace} and counts of outcomes."""
    stats = Counter()
    convs = {}
    for it in items:
        prompt = build_messages(it)[1]["content"]
        convs[it["id"]] = [{"role": "user", "content": TEACHER_PROMPT.format(
            letter=it["answer"], text=it["options"][it["answer"]], prompt=prompt)}]
    kept, pending = {}, list(items)
    for rnd in range(rounds + 1):
        if not pending:
            break
        outs = teacher.chat([convs[it["id"]] for it in pending], n=1, temperature=0.7)
        still = []
        for it, out in zip(pending, outs):
            why = check_trace(out[0], it)
            if why is None:
                kept[it["id"]] = as_contract(out[0].strip(), it)
                stats[f"verified_round_{rnd}"] += 1
            else:
                stats[f"failed_{why}"] += 1
                refine = REFINE_PROMPTS[rnd % len(REFINE_PROMPTS)]
                convs[it["id"]] = convs[it["id"]] + [{"role": "assistant", "content": out[0]},
                                                     {"role": "user", "content": refine}]
                still.append(it)
        pending = still
    stats["dropped_unverified"] = len(pending)
    return kept, stats


def kg_trace(it):
    """No teacher: the KG evidence path (or a public set's explanation) rendered as the reasoning, verified by
    construction, ending in the answer contract's form (mcq.INSTRUCTION): the right option's text."""
    return f"<think>{it['rationale']}</think>\n<answer>{it['options'][it['answer']]}</answer>"


def as_contract(trace, it):
    """A verified trace with its answer tag in the contract's form: a teacher's letter becomes the option's
    text, so that every cold-start target answers as the prompt asks."""
    head = trace[:trace.lower().rindex("<answer>")]
    return f"{head}<answer>{it['options'][it['answer']]}</answer>"


# -----------------------------------------------------------------------------


def write_jsonl(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


OUTPUTS = ("items.jsonl", "sft.jsonl", "rl_train.jsonl", "test.jsonl", "review.jsonl", "report.json")
# flags that change how the data is fetched, not what it is (the same models at another address too): another
# value continues the same dataset
RUN_ONLY = ("out", "overwrite", "concurrency", "teacher_timeout", "retries", "key_env", "teacher_url",
            "validator_url")


def claim_out(args):
    """The folder's dataset is named by its flags (args.json): the same flags continue it (the teacher cache
    resumes), others are refused unless --overwrite (which removes the old outputs; the cache of answers,
    keyed by request, stays valid)."""
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "args.json")
    flags = {k: v for k, v in vars(args).items() if k not in RUN_ONLY}
    outputs = [f for f in OUTPUTS if os.path.exists(os.path.join(args.out, f))]
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        differ = ["--" + k.replace("_", "-") for k in sorted(set(old) | set(flags))
                  if old.get(k) != flags.get(k)]
    else:
        differ = ["flags not recorded"] if outputs else []
    if differ and not args.overwrite:
        raise SystemExit(f"{args.out} holds a dataset made with other flags ({', '.join(differ[:5])}): "
                         "--overwrite replaces it, or pick another --out")
    if differ:
        for f in outputs:
            os.remove(os.path.join(args.out, f))
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(flags, f, indent=1)
    os.replace(path + ".tmp", path)


def tier_frac(text):
    """--tier-frac E:M:D: three finite shares >= 0, not all 0 -> {tier: share}."""
    parts = text.split(":")
    try:
        fr = [float(x) for x in parts]
    except ValueError:
        fr = []
    if len(fr) != 3 or not all(math.isfinite(x) and x >= 0 for x in fr) or not sum(fr):
        raise argparse.ArgumentTypeError(f"expected three shares E:M:D (numbers >= 0, not all 0), got {text}")
    return dict(zip(("Easy", "Moderate", "Difficult"), fr))


def parser():
    ap = Parser(description=__doc__)
    # --- sources
    ap.add_argument("--kg", default="hpo", help="KG source for synthesis: hpo | primekg:PATH | "
                    "wikidata:PATH | tsv:PATH | none")
    ap.add_argument("--kg-questions", type=at_least(1), default=3000, help="KG questions to synthesise")
    ap.add_argument("--kg-max-diseases", type=at_least(0), default=150, help="restrict the KG to N diseases "
                    "(0 = all); a small closed world is what a tiny CPU model can learn")
    ap.add_argument("--kg-kinds", default="identify,attribute,two_hop", help="question kinds")
    ap.add_argument("--kg-rationale", default="short", choices=["walk", "short"], help="KG-rendered chain "
                    "of thought: walk (every option checked by letter) or short (the conclusion only; half "
                    "the tokens)")
    ap.add_argument("--rarity", type=at_least(0, float), default=1.0, help="rare-entity emphasis: "
                    "weight degree**-rarity (0 = off)")
    ap.add_argument("--options", type=at_least(4, int, len(LETTERS)), default=4,
                    help=f"options per KG question (4..{len(LETTERS)})")
    ap.add_argument("--min-evidence", type=at_least(1), default=2, help="fewest findings shown in a vignette")
    ap.add_argument("--max-evidence", type=at_least(1), default=5, help="most findings shown in a vignette")
    ap.add_argument("--public", action="append", default=[],
                    help="NAME=PATH or NAME=hub; names: " + ", ".join(PUBLIC))
    # --- refinement
    ap.add_argument("--max-chars", type=at_least(1), default=6000, help="drop items longer than "
                    "this (question+options+context)")
    ap.add_argument("--decontam", nargs="*", default=[], help="evaluation files; items "
                    "sharing an n-gram are dropped")
    ap.add_argument("--ngram", type=at_least(1), default=13, help="n for decontamination")
    ap.add_argument("--no-anonymise", action="store_true", help="skip identifier scrubbing")
    ap.add_argument("--validator-url", default=None, help="OpenAI-compatible base URL for label verification")
    ap.add_argument("--validator-model", default=None, help="model name at that endpoint")
    ap.add_argument("--validator-ckpt", default=None, help="or a local checkpoint as validator")
    ap.add_argument("--k", type=at_least(1), default=5, help="validator trials per item")
    ap.add_argument("--keep-flagged", action="store_true", help="keep items the validator never got right")
    ap.add_argument("--judge", action="store_true", help="tier by an LLM judge (the validator "
                    "endpoint) when no pass rates")
    # --- mixing and splits
    ap.add_argument("--public-frac", type=between(0, 1), default=None, help="target fraction of public "
                    "items in the RL set")
    ap.add_argument("--tier-frac", default=None, type=tier_frac, help="target E:M:D proportions, e.g. "
                    "0.3:0.4:0.3 (default: as is)")
    ap.add_argument("--test-frac", type=fraction, default=0.1, help="held-out test split (never trained on)")
    ap.add_argument("--test-sources", default=None, help="comma list of sources (kg, or a --public name) "
                    "the test split is drawn from (default: all); public sets have official test splits of "
                    "their own")
    ap.add_argument("--sft-frac", type=between(0, 1), default=0.5, help="share of the training "
                    "items that get SFT traces")
    # --- CoT cold start
    ap.add_argument("--teacher-url", default=None, help="OpenAI-compatible base URL of the "
                    "teacher (e.g. a vLLM server)")
    ap.add_argument("--teacher-model", default=None, help="teacher model name at that endpoint")
    ap.add_argument("--teacher-ckpt", default=None, help="or a local HF checkpoint as "
                    "teacher (model.py generation)")
    ap.add_argument("--key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    ap.add_argument("--refine-rounds", type=at_least(0), default=3, help="refinement rounds for failed "
                    "traces")
    ap.add_argument("--max-tokens", type=at_least(1), default=1024, help="teacher / validator max tokens")
    ap.add_argument("--concurrency", type=at_least(1), default=64, help="teacher / validator requests in "
                    "flight at once (a vLLM server batches them; results are the same whatever this is)")
    ap.add_argument("--teacher-timeout", type=between(0.01, 86400), default=600, help="seconds to wait for "
                    "one answer (teacher or validator) before retrying it")
    ap.add_argument("--retries", type=at_least(0), default=5, help="retries per request on 429 / 5xx / "
                    "timeouts (exponential backoff with jitter, or the server's Retry-After)")
    # --- run
    ap.add_argument("--out", default="data/kg", help="output folder (its flags kept in args.json: the same "
                    "flags resume it, others need --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="replace a dataset made in --out with other "
                    "flags")
    ap.add_argument("--seed", type=int, default=0, help="seed for sampling, splits and mixing")
    return ap


def get_args(argv=None):
    return parser().parse_args(argv)


def load_sources(args, report):
    """Every item of the --public sets and the KG's questions, in one schema."""
    items = []
    for spec in args.public:
        name, _, where = spec.partition("=")
        got = load_public(name, where or "hub")
        print(f"{name}: {len(got)} items" + ("" if got else f" (warning: --public {spec} has no rows)"))
        items += got
    if args.kg != "none":
        got, src = kg_items(args)
        print(f"KG ({src}): {len(got)} questions")
        items += got
    report["loaded"] = len(items)
    if not items:
        sources = ", ".join("--public " + p for p in args.public) or "no --public"
        raise SystemExit(f"no items to write: {sources} and --kg {args.kg} gave none")
    return items


def refine(items, args, report):
    """Format filters, de-duplication, decontamination against the evaluation files, anonymisation."""
    kept, seen = [], set()
    grams = decontam_index(args.decontam, args.ngram) if args.decontam else set()
    for it in items:
        why = format_problem(it, args.max_chars)
        if why is None:
            h = hashlib.sha1(norm_text(it["question"] + "|".join(sorted(map(str, it["options"].values()))))
                             .encode()).hexdigest()
            why = "duplicate" if h in seen else None
            seen.add(h)
        if why is None and grams and ngrams(it["question"], args.ngram) & grams:
            why = "contaminated"
        if why:
            report["dropped"][why] += 1
            continue
        if not args.no_anonymise:
            for f in ("question", "context", "rationale"):
                it[f] = anonymise(it.get(f))
            it["options"] = {k: anonymise(v) for k, v in it["options"].items()}
        kept.append(it)
    return kept


def verify_and_tier(items, args, cache, report):
    """The validator's k trials per item (the ones it never gets right flagged, and dropped unless
    --keep-flagged), then difficulty tiers."""
    validator = None
    if args.validator_url or args.validator_ckpt:
        validator = ChatModel((args.validator_url, args.validator_model, args.validator_ckpt), cache, args)
        verify_labels(items, validator, args.k)
        flagged = [it for it in items if it["pass_rate"] == 0]
        write_jsonl(os.path.join(args.out, "review.jsonl"), flagged)
        report.update(flagged_for_review=len(flagged), validator_requests=validator.stats())
        if not args.keep_flagged:
            report["dropped"]["never_answered_by_validator"] += len(flagged)
            items = [it for it in items if it["pass_rate"] > 0]
    report["tiering"] = assign_tiers(items, validator if args.judge else None)
    return items


def split_and_mix(items, args, rng):
    """The test split first (from --test-sources), so nothing about it leaks into training; then the public /
    synthetic and tier proportions of the training split. Returns (test, train)."""
    rng.shuffle(items)
    pool = [it for it in items if not args.test_sources or it["source"] in args.test_sources.split(",")]
    test = pool[:int(len(pool) * args.test_frac)]
    held = {id(it) for it in test}
    train = [it for it in items if id(it) not in held]
    if args.public_frac is not None:
        pub = [it for it in train if it["source"] != "kg"]
        syn = [it for it in train if it["source"] == "kg"]
        if pub and syn:   # the largest set with the asked proportion
            n = len(train)
            if 0 < args.public_frac < 1:
                n = min(len(pub) / args.public_frac, len(syn) / (1 - args.public_frac))
            train = pub[:int(n * args.public_frac)] + syn[:int(n * (1 - args.public_frac))]
    if args.tier_frac:
        fr = args.tier_frac
        by = {t: [it for it in train if it["difficulty"] == t] for t in fr}
        n = min(len(by[t]) / fr[t] for t in fr if fr[t] > 0)
        train = [it for t in fr for it in by[t][:int(n * fr[t])]]
    rng.shuffle(train)
    return test, train


def cold_start(sft_pool, args, cache, report):
    """The SFT rows: each item's prompt and a verified trace, the teacher's (refined) or, without one, its KG
    evidence path or dataset explanation."""
    traces = {}
    if args.teacher_url or args.teacher_ckpt:
        teacher = ChatModel((args.teacher_url, args.teacher_model, args.teacher_ckpt), cache, args)
        traces, dstats = distill(sft_pool, teacher, args.refine_rounds)
        report.update(distillation=dict(dstats), teacher_requests=teacher.stats())
    else:
        for it in sft_pool:
            if it.get("rationale") and check_trace(kg_trace(it), it) is None:
                traces[it["id"]] = kg_trace(it)
        report["distillation"] = {"teacher": "none: KG evidence paths / dataset explanations",
                                  "traces": len(traces)}
    sft = [dict(id=it["id"], messages=build_messages(it) + [dict(role="assistant", content=traces[it["id"]])])
           for it in sft_pool if it["id"] in traces]
    if sft_pool and not sft:
        print(f"warning: none of the {len(sft_pool)} SFT items got a verified trace: sft.jsonl is empty "
              f"({report['distillation']})")
    return sft


def write_outputs(args, splits, report):
    """items.jsonl, sft.jsonl, rl_train.jsonl, test.jsonl and report.json. splits: (items, sft, train,
    test)."""
    items, sft, train, test = splits
    fields = ("id", "source", "question", "options", "answer", "context", "difficulty", "meta")
    rl_rows = [{k: it[k] for k in fields if it.get(k) is not None} for it in train]
    test_rows = [{k: it[k] for k in fields if it.get(k) is not None} for it in test]
    for name, rows in (("items", items), ("sft", sft), ("rl_train", rl_rows), ("test", test_rows)):
        write_jsonl(os.path.join(args.out, f"{name}.jsonl"), rows)
    report.update(kept=len(items), train=len(train), test=len(test), sft=len(sft),
                  sources=dict(Counter(it["source"] for it in train)),
                  tiers=dict(Counter(it["difficulty"] for it in train)), dropped=dict(report["dropped"]))
    with open(os.path.join(args.out, "report.json.tmp"), "w") as f:
        json.dump(report, f, indent=2)
    os.replace(os.path.join(args.out, "report.json.tmp"), os.path.join(args.out, "report.json"))
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out}/: sft.jsonl ({len(sft)}), rl_train.jsonl ({len(train)}), "
          f"test.jsonl ({len(test)})")


def main(argv=None):
    args = get_args(argv)
    if args.min_evidence > args.max_evidence:
        raise SystemExit(f"--min-evidence {args.min_evidence} is above --max-evidence {args.max_evidence}")
    t0 = time.time()
    claim_out(args)
    report = dict(dropped=Counter(), sources=Counter())
    models = args.teacher_url or args.teacher_ckpt or args.validator_url or args.validator_ckpt
    cache = CallCache(os.path.join(args.out, "cache.jsonl")) if models else None
    items = verify_and_tier(refine(load_sources(args, report), args, report), args, cache, report)
    test, train = split_and_mix(items, args, random.Random(args.seed))
    sft = cold_start(train[:int(len(train) * args.sft_frac)], args, cache, report)
    if not train and not test:
        raise SystemExit(f"no items to write: every one of the {report['loaded']} loaded was dropped "
                         f"({dict(report['dropped'])}); nothing written to {args.out}")
    report["seconds"] = round(time.time() - t0, 1)
    write_outputs(args, (items, sft, train, test), report)


if __name__ == "__main__":
    guard(main)

"""
evaluate.py: the paper's nine-benchmark suite (4.1) with auditable per-item outputs.

    python evaluate.py --model runs/demo/seed0/grpo --benchmarks kg --file kg=runs/demo/data/test.jsonl
    python evaluate.py --model Qwen2.5-7B-dir --data-dir benchmarks/ --limit 200        # local files
    torchrun --nproc_per_node=2 evaluate.py --model runs/demo/sft --benchmarks kg --file kg=data/kg/test.jsonl
    python evaluate.py --model runs/a runs/b --out runs/eval_a runs/eval_b --label a b --benchmarks kg --file ...
    python evaluate.py --responses vllm_out.jsonl --out runs/rescored                 # re-score, no model

Each benchmark is read from a local file ({data-dir}/{name}.jsonl|.json|.parquet|.csv, or --file NAME=PATH)
in its upstream schema, else from the Hugging Face hub by id (skipped with a clear line when offline).
The prompt and the strict answer parser here are the ones training uses (make_data.py, train_grpo.py).
Writes {out}/responses.jsonl (id, prompt, response, extracted, gold, correct) and {out}/results.md.
"""
import json
import os
import re
import sys
import unicodedata
from collections import Counter

from cli import Parser, at_least, guard

LETTERS = "ABCDEFGHIJKLMNOPQRSTU"

# -----------------------------------------------------------------------------
# one prompt format, shared with training

SYSTEM_PROMPT = "You are a medical expert. Reason step by step, then give the final answer."
INSTRUCTION = "Think it through, then put the letter of the correct option in <answer></answer>."


def build_messages(item):
    """item: {question, options {letter: text}, optional context} -> chat messages (system + user)."""
    parts = []
    if item.get("context"):
        parts.append(f"Context: {item['context']}")
    parts.append(item["question"].strip())
    parts.append("\n".join(f"{L}. {t}" for L, t in item["options"].items()))
    parts.append(INSTRUCTION)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n\n".join(parts)}]


def prompt_ids(tok, item):
    ids = tok.apply_chat_template(build_messages(item), add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


# -----------------------------------------------------------------------------
# strict answer extraction (also the GRPO reward's parser)

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_PREFIX = re.compile(r"^(the\s+)?(final\s+)?(answer|option|choice|答案|选项)\s*(is)?\s*[:：是为]?\s*", re.IGNORECASE)


_EDGES = "*_`'\" \t\r\n.。!,;，；:："


def _canon(text):
    """The form option texts and answers are compared in, the same on both sides: NFKC (full-width letters and
    punctuation to ASCII), case and runs of spaces folded, quotes, markup and end punctuation trimmed from the
    ends (public options can end in a stray quote or newline: 'A. "Tell me more."')."""
    return " ".join(unicodedata.normalize("NFKC", str(text)).lower().split()).strip(_EDGES)


def parse_answer_content(content, options):
    """The inside of one <answer> tag -> a letter, or None (empty, several letters, ambiguous text)."""
    valid = list(options)
    canon = {L: _canon(t) for L, t in options.items()}

    def by_text(text):   # the letter whose option text this is, if exactly one
        hits = [L for L in valid if canon[L] == _canon(text)]
        return hits[0] if len(hits) == 1 else None

    s = unicodedata.normalize("NFKC", content).strip()
    if by_text(s):   # the whole content is one option's text (checked before prefixes are stripped)
        return by_text(s)
    s = _PREFIX.sub("", s).strip().strip(_EDGES)
    if not s:
        return None
    # a bare letter, maybe bracketed: C, (C), [C], C), c
    m = re.fullmatch(r"[\(\[]?([A-Za-z])[\)\]]?", s)
    if m:
        L = m.group(1).upper()
        return L if L in valid else None
    # "C. text" / "(C) text" / "C: text": the letter counts if the text is that option's
    m = re.fullmatch(r"[\(\[]?([A-Za-z])[\)\]\.:：]\s*(.+)", s, re.DOTALL)
    if m:
        L = m.group(1).upper()
        return L if L in valid and _canon(m.group(2)) == canon[L] else None
    return by_text(s)   # the text of exactly one option


def extract_answer(response, options, lenient=False):
    """Strict: the last well-formed <answer> tag holding one option letter or one exact option text.
    lenient: if that fails, phrases like 'the answer is C' (reported separately, never mixed in)."""
    tags = ANSWER_TAG.findall(response)
    if tags:
        return parse_answer_content(tags[-1], options)
    if lenient:
        m = re.findall(r"answer\s+is\s*:?\s*\(?([A-Za-z])\)?(?![A-Za-z])", unicodedata.normalize("NFKC", response), re.I)
        if m and m[-1].upper() in options:
            return m[-1].upper()
    return None


def format_ok(response, require_think=False):
    """Exactly one <answer>...</answer>, nothing after it but whitespace / end token; optional <think> block first."""
    if len(ANSWER_TAG.findall(response)) != 1 or response.lower().count("<answer>") != 1:
        return False
    tail = response[ANSWER_TAG.search(response).end():].replace("<|im_end|>", "").replace("<|endoftext|>", "")
    if tail.strip():
        return False
    if require_think:
        return re.match(r"\s*<think>.+?</think>", response, re.DOTALL) is not None
    return True


# -----------------------------------------------------------------------------
# benchmarks: upstream schema -> {id, question, options, answer, context?}

def _letters(opts):
    return {LETTERS[i]: str(t) for i, t in enumerate(opts)}


def _strip_listed_options(q):
    # MedXpertQA's question text can end with "Answer Choices: (A) ... (B) ...": printed once, by us
    return re.split(r"\n?\s*Answer Choices:\s*\(A\)", q, maxsplit=1)[0].rstrip()


def conv_medqa(r, i):
    return dict(id=r.get("id", i), question=r["question"], options=dict(r["options"]), answer=r["answer_idx"])


def conv_medxpertqa(r, i):
    return dict(id=r.get("id", i), question=_strip_listed_options(r["question"]), options=dict(r["options"]),
                answer=r["label"])


def conv_medmcqa(r, i):
    return dict(id=r.get("id", i), question=r["question"], options=_letters([r["opa"], r["opb"], r["opc"], r["opd"]]),
                answer=LETTERS[int(r["cop"])])


def conv_careqa(r, i):   # cop is 1-based
    return dict(id=r.get("unique_id", r.get("id", i)), question=r["question"],
                options=_letters([r["op1"], r["op2"], r["op3"], r["op4"]]), answer=LETTERS[int(r["cop"]) - 1])


def conv_mmlu_pro(r, i):
    return dict(id=r.get("question_id", i), question=r["question"],
                options=_letters([o for o in r["options"] if o not in ("N/A", "")]), answer=r["answer"])


def conv_jmed(r, i):
    ans = r["answer"]
    if isinstance(ans, list):
        if len(ans) != 1:
            return None   # multi-answer items are not single-choice
        ans = ans[0]
    return dict(id=r.get("id", i), question=r["question"], options=dict(r["options"]), answer=str(ans).strip())


def conv_pubmedqa(r, i):
    ctx = r["context"]["contexts"] if isinstance(r["context"], dict) else r["context"]
    return dict(id=r.get("pubid", i), question=r["question"], context=" ".join(ctx),
                options={"A": "yes", "B": "no", "C": "maybe"}, answer="ABC"["yes no maybe".split().index(r["final_decision"])])


def conv_medbullets(r, i):
    if "options" in r:
        opts = dict(r["options"])
    else:
        opts = _letters([r[k] for k in ("opa", "opb", "opc", "opd", "ope") if r.get(k)])
    return dict(id=r.get("id", i), question=r["question"], options=opts, answer=r["answer_idx"])


def conv_ours(r, i):   # make_data.py's schema
    return dict(id=r["id"], question=r["question"], options=dict(r["options"]), answer=r["answer"],
                context=r.get("context"))


# name: (column in the paper's Table 3, hub id, config, split, size, converter, row filter, options an item)
BENCHMARKS = {
    "careqa": ("CareQA", "HPAI-BSC/CareQA", "CareQA_en", "test", 5621, conv_careqa, None, 4),
    "jmed": ("JMED", "jdh-algo/JMED", None, "test", 1000, conv_jmed, None, None),
    "medbullets": ("Medbullets", "LangAGI-Lab/medbullets", "op4", "test", 308, conv_medbullets, None, 4),
    "medmcqa": ("MedMCQA", "openlifescienceai/medmcqa", None, "validation", 4183, conv_medmcqa, None, 4),
    "medqa": ("MedQA", "GBaker/MedQA-USMLE-4-options", None, "test", 1273, conv_medqa, None, 4),
    "medxpertqa": ("MedXpertQA", "TsinghuaC3I/MedXpertQA", "Text", "test", 2450, conv_medxpertqa, None, 10),
    "pubmedqa": ("PubMedQA", "qiaojin/PubMedQA", "pqa_labeled", "train", 1000, conv_pubmedqa, None, 3),
    "mmlu_pro_biology": ("MMLU-Pro Bio", "TIGER-Lab/MMLU-Pro", None, "test", 717, conv_mmlu_pro,
                         ("category", "biology"), None),
    "mmlu_pro_health": ("MMLU-Pro Health", "TIGER-Lab/MMLU-Pro", None, "test", 818, conv_mmlu_pro,
                        ("category", "health"), None),
}
PAPER_ROWS = {   # Table 3, same column order
    "Qwen2.5-7B (paper)": [70.56, 59.20, 42.95, 55.89, 59.86, 11.96, 74.00, 72.38, 52.08, 55.43],
    "HuatuoGPT-o1-7B (paper)": [72.00, 52.70, 41.61, 62.11, 66.30, 10.94, 64.46, 74.34, 60.51, 56.12],
    "Fleming-R1-7B (paper)": [77.28, 59.60, 57.05, 64.16, 75.10, 19.14, 78.60, 74.76, 64.67, 63.37],
    "Fleming-R1-32B (paper)": [90.41, 68.70, 76.51, 74.52, 89.32, 30.33, 80.40, 90.93, 77.63, 75.42],
}


def read_records(path):
    """JSONL / JSON list / Parquet / CSV rows as dicts; errors name the file and line."""
    if path.endswith(".parquet") or path.endswith(".csv"):
        import datasets
        return list(datasets.load_dataset("parquet" if path.endswith(".parquet") else "csv", data_files=path, split="train"))
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not a UTF-8 JSON file ({type(e).__name__})") from None
        return data if isinstance(data, list) else list(data.values())
    return [r for _, r in jsonl_rows(path)]


def jsonl_rows(path):
    """(line number, object) for each non-blank line; errors name the file and line."""
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{line}: not UTF-8 text") from None
            if text.strip():
                try:
                    yield line, json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line}: not valid JSON ({e.msg})") from None


def convert(rows, conv, path, row_filter=None):
    items = []
    for i, r in enumerate(rows):
        if row_filter and r.get(row_filter[0]) != row_filter[1]:
            continue
        try:
            it = conv(r, i)
        except (KeyError, ValueError, IndexError, TypeError) as e:
            raise ValueError(f"{path}:{i + 1}: bad record, field {e}") from None
        if it is None:
            continue
        if it["answer"] not in it["options"]:
            raise ValueError(f"{path}:{i + 1}: field 'answer': {it['answer']!r} is not one of the options {list(it['options'])}")
        it["id"] = str(it["id"])
        items.append(it)
    return items


def comparability(name, items, limit=None):
    """Why a loaded benchmark's accuracy cannot stand beside the paper's Table 3 column ([] if it can): another
    number of items (a subset, another release) or of options (the 5-option MedQA where the paper's has 4)."""
    if name not in BENCHMARKS:
        return []
    size, n_opt = BENCHMARKS[name][4], BENCHMARKS[name][7]
    why = []
    if limit:
        why.append(f"the first {len(items)} items only (--limit)")
    elif len(items) != size:
        why.append(f"{len(items):,} items where the paper's set has {size:,}")
    counts = Counter(len(it["options"]) for it in items)
    if n_opt and set(counts) != {n_opt}:
        got = ", ".join(f"{k} ({v:,} items)" for k, v in sorted(counts.items()))
        why.append(f"options per item {got} where the paper's set has {n_opt}")
    return why


def load_benchmark(name, path=None, data_dir=None, limit=None):
    """Items of a benchmark, or None (with a printed reason) when neither a local file nor the hub has it."""
    if name in BENCHMARKS:
        _, hub, config, split, _, conv, filt, _ = BENCHMARKS[name]
    else:
        hub, config, split, conv, filt = None, None, None, conv_ours, None
    if path is None and data_dir:
        for ext in (".jsonl", ".json", ".parquet", ".csv"):
            if os.path.exists(os.path.join(data_dir, name + ext)):
                path = os.path.join(data_dir, name + ext)
                break
    if path is not None:
        items = convert(read_records(path), conv, path, filt)
    elif hub is None:
        print(f"[skip] {name}: no local file (give --file {name}=PATH)")
        return None
    else:
        try:
            import datasets
            ds = datasets.load_dataset(hub, config, split=split)
        except Exception as e:   # offline, gated, renamed...
            print(f"[skip] {name}: no local file and the hub load of {hub} failed ({type(e).__name__})")
            return None
        items = convert(ds, conv, hub, filt)
    return items[:limit] if limit else items


# -----------------------------------------------------------------------------
# running a model over items


def run_items(model, tok, items, max_new_tokens=512, batch_size=16, temperature=0.0, n_samples=1, seed=0,
              rank=0, world=1, progress=True, cuda_graph=False):
    """Generate for this rank's share (sorted by prompt length so batches pad little). Returns
    {item id: [responses]} for the items of this rank."""
    from model import generate
    from tqdm import tqdm
    mine = items[rank::world]
    prompts = [prompt_ids(tok, it) for it in mine]
    order = sorted(range(len(mine)), key=lambda i: -len(prompts[i]))
    out = {}
    stop = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    bar = tqdm(range(0, len(order), batch_size), desc="eval", disable=not progress or rank != 0, leave=False)
    for b in bar:
        idx = order[b:b + batch_size]
        # per-item seeds (its index in the full list): the same samples on 1 rank or N, in any batch
        outs, _ = generate(model, [prompts[i] for i in idx], max_new_tokens=max_new_tokens, temperature=temperature,
                           num_samples=n_samples, stop_ids=[s for s in stop if s is not None],
                           seed=[seed * 1_000_033 + rank + world * i for i in idx], pad_id=tok.pad_token_id or 0,
                           cuda_graph=cuda_graph)
        for j, i in enumerate(idx):
            out[mine[i]["id"]] = [tok.decode(o, skip_special_tokens=True) for o in outs[j * n_samples:(j + 1) * n_samples]]
    return out


def score_items(items, responses, bench, lenient=False):
    """Per-item records and the benchmark's summary. With several samples: accuracy = the first sample's
    (comparable to greedy), plus pass@n and majority vote."""
    recs = []
    for it in items:
        resps = responses.get(it["id"])
        if resps is None:
            continue
        ext = [extract_answer(r, it["options"]) for r in resps]
        rec = dict(benchmark=bench, id=it["id"], prompt=build_messages(it)[1]["content"], response=resps[0],
                   extracted=ext[0], gold=it["answer"], correct=ext[0] == it["answer"])
        if len(resps) > 1:
            votes = Counter(e for e in ext if e)
            rec.update(responses=resps, extracted_all=ext, pass_at_n=it["answer"] in ext,
                       majority=votes.most_common(1)[0][0] if votes else None)
            rec["majority_correct"] = rec["majority"] == it["answer"]
        if lenient and ext[0] is None:
            rec["lenient"] = extract_answer(resps[0], it["options"], lenient=True)
        recs.append(rec)
    n = max(len(recs), 1)
    summary = dict(n=len(recs), accuracy=100 * sum(r["correct"] for r in recs) / n,
                   unanswered=100 * sum(r["extracted"] is None for r in recs) / n)
    if recs and "pass_at_n" in recs[0]:
        summary["pass_at_n"] = 100 * sum(r["pass_at_n"] for r in recs) / n
        summary["majority"] = 100 * sum(r["majority_correct"] for r in recs) / n
    if lenient:
        summary["lenient_accuracy"] = 100 * sum(r["correct"] or r.get("lenient") == r["gold"] for r in recs) / n
    return recs, summary


def macro_average(summaries):
    accs = [s["accuracy"] for s in summaries.values() if s["n"] > 0]
    return sum(accs) / len(accs) if accs else float("nan")


def results_table(summaries, label="ours"):
    """Markdown: the nine benchmarks in Table 3's order with the paper's rows, then any other sets."""
    names = list(BENCHMARKS)
    lines = ["| model | " + " | ".join(BENCHMARKS[n][0] for n in names) + " | Avg. |",
             "|---" * (len(names) + 2) + "|"]
    if any(n in summaries for n in names):
        mark = lambda n: " †" if summaries[n].get("not_comparable") else ""   # noqa: E731
        cells = [f"{summaries[n]['accuracy']:.2f}{mark(n)}" if n in summaries else "-" for n in names]
        nine = {n: summaries[n] for n in names if n in summaries}
        avg = f"{macro_average(nine):.2f}" + (" †" if any(mark(n) for n in nine) or len(nine) < len(names) else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {avg} |")
    for row, vals in PAPER_ROWS.items():
        lines.append(f"| {row} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    for n in names:
        if n in summaries and summaries[n].get("not_comparable"):
            lines.append(f"\n† {BENCHMARKS[n][0]}: not comparable with the paper's rows: {summaries[n]['not_comparable']}")
    lines.append("")
    lines.append("| benchmark | n | accuracy | unanswered | extra |")
    lines.append("|---|---|---|---|---|")
    for n, s in summaries.items():
        extra = ", ".join(f"{k} {v:.2f}" for k, v in s.items() if isinstance(v, float) and k not in ("accuracy",
                                                                                                     "unanswered"))
        lines.append(f"| {n} | {s['n']} | {s['accuracy']:.2f} | {s['unanswered']:.2f} | {extra} |")
    lines.append(f"\nmacro average over {len(summaries)} set(s): {macro_average(summaries):.2f}")
    return "\n".join(lines)


def write_outputs(out_dir, recs, summaries, label):
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "responses.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, os.path.join(out_dir, "responses.jsonl"))
    for name, text in (("results.md", results_table(summaries, label)), ("results.json", json.dumps(summaries, indent=2))):
        with open(os.path.join(out_dir, name + ".tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))


def report(out, recs, summaries, label):
    """Write the outputs and print the table (rank 0)."""
    write_outputs(out, recs, summaries, label)
    print(results_table(summaries, label))
    print(f"wrote {out}/responses.jsonl and {out}/results.md")


def evaluate_model(model, tok, benches, rank=0, world=1, lenient=False, **gen):
    """benches: {name: items}. Returns (records, summaries) on every rank (responses gathered)."""
    import torch.distributed as dist
    recs, summaries = [], {}
    for name, items in benches.items():
        responses = run_items(model, tok, items, rank=rank, world=world, **gen)
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, responses)
            responses = {k: v for p in parts for k, v in p.items()}
        r, s = score_items(items, responses, name, lenient)
        recs += r
        summaries[name] = s
    return recs, summaries


STAGES = [("base", "Base (random init)"), ("sft", "+CoT cold start"), ("grpo_stage1", "+RL stage 1"),
          ("grpo_stage2", "+RL stage 2")]


def stage_table(run_dir, bench="kg"):
    """Table 4 in miniature: accuracy per stage, mean +- std over the seed*/ runs of run.sh, and for each later
    stage its gain over the cold start of the same seed (mean +- std of the paired differences): the seeds
    share the test items, so the paired gain is the comparison that the seed-to-seed spread does not swamp."""
    import glob
    import statistics
    rows = ["| stage | accuracy (%) mean +- std | per seed | gain over cold start, same seed (points) | "
            "format-failure / unanswered (%) |", "|---|---|---|---|---|"]
    seeds = sorted(glob.glob(os.path.join(run_dir, "seed*")))
    acc = {}   # (stage, seed dir) -> accuracy
    means = {}

    def mean_sd(xs):
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    for key, label in STAGES:
        accs, unans, gains = [], [], []
        for sd in seeds:
            p = os.path.join(sd, f"eval_{key}", "results.json")
            if os.path.exists(p):
                r = json.load(open(p))[bench]
                acc[key, sd] = r["accuracy"]
                accs.append(r["accuracy"])
                unans.append(r["unanswered"])
                if key not in ("base", "sft") and ("sft", sd) in acc:
                    gains.append(r["accuracy"] - acc["sft", sd])
        if not accs:
            continue
        means[key] = mean_sd(accs)
        gain = "-" if not gains else "{:+.1f} +- {:.1f} ({})".format(*mean_sd(gains), ", ".join(f"{g:+.1f}" for g in gains))
        rows.append(f"| {label} | {means[key][0]:.1f} +- {means[key][1]:.1f} | " + ", ".join(f"{a:.1f}" for a in accs) +
                    f" | {gain} | {statistics.mean(unans):.1f} |")
    return "\n".join(rows), means


def main():
    ap = Parser(description=__doc__)
    # --- what to evaluate
    ap.add_argument("--model", nargs="+", default=None, help="HF-layout checkpoint directory (ours or a real Qwen); "
                    "several: each in turn in this one launch, with one --out and one --label each")
    ap.add_argument("--benchmarks", default=",".join(BENCHMARKS),
                    help="comma list; the nine: " + ",".join(BENCHMARKS) + "; any other name needs --file")
    ap.add_argument("--data-dir", default=None, help="folder of local files named {benchmark}.jsonl/.json/.parquet/.csv")
    ap.add_argument("--file", action="append", default=[], help="NAME=PATH for one benchmark (repeatable)")
    ap.add_argument("--limit", type=at_least(1), default=None, help="first N items per benchmark (quick runs)")
    ap.add_argument("--responses", default=None, help="re-score a saved responses JSONL (fields benchmark, id, "
                    "response; items looked up from the benchmarks) without any model")
    # --- generation
    ap.add_argument("--max-new-tokens", type=at_least(1), default=512, help="generation budget per answer")
    ap.add_argument("--batch-size", type=at_least(1), default=16, help="prompts per generation batch")
    ap.add_argument("--temperature", type=at_least(0, float), default=0.0, help="0 = greedy")
    ap.add_argument("--n-samples", type=at_least(1), default=1, help="samples per item: > 1 reports pass@n and majority vote")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--cuda-graph", action="store_true", help="on CUDA: each decode step one CUDA graph replay (4-5x "
                    "faster generation measured on an H200 by bench/generate.py; same tokens); ignored on CPU")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    # --- output
    ap.add_argument("--lenient", action="store_true", help="also report a lenient extraction ('the answer is C')")
    ap.add_argument("--out", nargs="+", default=["runs/eval"], help="output folder (responses.jsonl, results.md, "
                    "results.json); one per --model")
    ap.add_argument("--label", nargs="+", default=None, help="row label in the table, one per --model (default: "
                    "ours, or each model folder's name)")
    ap.add_argument("--stage-table", default=None, help="print the stage table of a run.sh folder (seed*/eval_*) and exit")
    args = ap.parse_args()
    if args.stage_table:
        text, _ = stage_table(args.stage_table)
        with open(os.path.join(args.stage_table, "stage_table.md"), "w") as f:
            f.write(text + "\n")
        print(text)
        return

    files = dict(f.split("=", 1) for f in args.file)
    names = [n for n in args.benchmarks.split(",") if n]
    for n in files:
        if n not in names:
            names.append(n)
    benches, notes = {}, {}
    for n in names:
        items = load_benchmark(n, files.get(n), args.data_dir, args.limit)
        if items:
            benches[n] = items
            notes[n] = "; ".join(comparability(n, items, args.limit))
            if notes[n]:
                print(f"warning: {n}: {notes[n]}: not comparable with the paper's rows (marked †)")
    if not benches:
        sys.exit("no benchmark could be loaded (see the [skip] lines)")

    if args.responses:
        saved = {}
        for i, r in enumerate(read_records(args.responses)):
            if "benchmark" not in r or "id" not in r or "response" not in r:
                sys.exit(f"{args.responses}:{i + 1}: needs fields benchmark, id, response")
            saved.setdefault(r["benchmark"], {})[str(r["id"])] = r.get("responses") or [r["response"]]
        recs, summaries = [], {}
        for n, items in benches.items():
            if n in saved:
                rr, s = score_items(items, saved[n], n, args.lenient)
                recs += rr
                summaries[n] = dict(s, not_comparable=notes[n]) if notes[n] else s
        report(args.out[0], recs, summaries, (args.label or ["ours"])[0])
        return

    if not args.model:
        sys.exit("give --model (or --responses to re-score)")
    names = [os.path.basename(os.path.normpath(m)) for m in args.model]
    labels = args.label or (["ours"] if len(args.model) == 1 else names)
    if not len(args.model) == len(args.out) == len(labels):
        sys.exit(f"--model has {len(args.model)} paths: give as many --out folders ({len(args.out)}) and --label "
                 f"names ({len(labels)})")
    import torch
    from common import close_distributed, init_distributed
    from model import load_model, load_tokenizer
    rank, world, device = init_distributed(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # several models in one launch: the process start-up (torch, tokenizers, the process group) is paid once
    for path, out, label in zip(args.model, args.out, labels):
        model = load_model(path, device=device, dtype=dtype).eval()
        tok = load_tokenizer(path)
        recs, summaries = evaluate_model(model, tok, benches, rank, world, args.lenient,
                                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                         temperature=args.temperature, n_samples=args.n_samples, seed=args.seed,
                                         cuda_graph=args.cuda_graph and device.type == "cuda")
        summaries = {n: dict(s, not_comparable=notes[n]) if notes[n] else s for n, s in summaries.items()}
        if rank == 0:
            report(out, recs, summaries, label)
    close_distributed()


if __name__ == "__main__":
    guard(main)

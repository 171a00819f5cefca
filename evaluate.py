"""
evaluate.py: the paper's nine-benchmark suite (4.1) with auditable per-item outputs.

    python evaluate.py --model runs/demo/seed0/grpo --benchmarks kg --file kg=runs/demo/data/test.jsonl
    python evaluate.py --model Qwen2.5-7B-dir --data-dir benchmarks/ --limit 200        # local files
    torchrun --nproc_per_node=2 evaluate.py --model runs/demo/sft --benchmarks kg --file kg=data/kg/test.jsonl
    python evaluate.py --model runs/a runs/b --out runs/eval_a runs/eval_b --label a b --benchmarks kg ...
    python evaluate.py --responses vllm_out.jsonl --out runs/rescored                 # re-score, no model
    python evaluate.py --compare runs/eval_a runs/eval_b    # B - A per benchmark, paired interval, McNemar
    python evaluate.py --model runs/demo/seed0/grpo --file medqa=medqa.jsonl --shuffle-options 3

Each benchmark is read from a local file ({data-dir}/{name}.jsonl|.json|.parquet|.csv, or --file
NAME=PATH) in its upstream schema, else from the Hugging Face hub by id (skipped with a clear line when
offline). The prompt and the strict answer parser here are the ones training uses (make_data.py,
train_grpo.py). Writes {out}/responses.jsonl (id, prompt, response, extracted, gold, correct),
{out}/results.md and {out}/results.json: each accuracy with its 95 % interval (Wilson; a bootstrap over
items for the macro average).
"""
import argparse
import json
import math
import os
import random
import sys
from collections import Counter
from dataclasses import replace

from cli import Parser, at_least, guard
from mcq import (LETTERS, build_messages, canon, conv_careqa, conv_jmed, conv_medbullets, conv_medmcqa,
                 conv_medqa, conv_medxpertqa, conv_mmlu_pro, conv_ours, conv_pubmedqa, convert,
                 extract_answer, jsonl_rows, official_test_ids, prompt_ids, read_records)
from stats import bootstrap_means, macro_ci, mcnemar, paired_diff_ci, percentile_ci, wilson

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


def comparability(name, items, limit=None):
    """Why a loaded benchmark's accuracy cannot stand beside the paper's Table 3 column ([] if it can):
    another number of items (a subset, another release) or of options (the 5-option MedQA where the
    paper's has 4)."""
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


def hub_answers(timeout=5.0):
    """Whether the Hugging Face hub answers within `timeout` seconds (HF_ENDPOINT, else huggingface.co). Asked
    once, before any hub load: a hub that accepts connections but never answers would hold each load for
    minutes. HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set: no."""
    import urllib.error
    import urllib.request
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        return False
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/") + "/api/datasets?limit=1"
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
        return True
    except urllib.error.HTTPError:   # it answered, if not with a 200
        return True
    except (OSError, ValueError):
        return False


_HUB = {}


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
        test = official_test_ids(path)
        if test is not None:
            items = [it for it in items if it["id"] in test]
            print(f"{name}: the {len(items)} test ids of test_ground_truth.json beside {path}")
    elif hub is None:
        print(f"[skip] {name}: no local file (give --file {name}=PATH)")
        return None
    else:
        if "up" not in _HUB:
            _HUB["up"] = hub_answers()
        if not _HUB["up"]:
            print(f"[skip] {name}: no local file, and the hub does not answer (give --file {name}=PATH)")
            return None
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


def run_items(model, tok, items, sp, seed=0, ranks=(0, 1, None), progress=True, **engine_kw):
    """Generate for this rank's share of items: one queue through the rollout engine's slots (engine.py;
    engine_kw: slots, cuda_graph), so a long answer holds one slot, not a whole batch. ranks: (rank, world,
    tensor-parallel group or None; with a group, model is this rank's shard and the group's shares go through
    one queue). Returns {item id: [responses]} for this rank's items."""
    from model import seed_of
    from tp import generate
    from tqdm import tqdm
    rank, world, group = ranks
    mine = items[rank::world]
    stop = tuple(s for s in (tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id) if s is not None)
    sp = replace(sp, stop_ids=stop)
    bar = tqdm(total=len(mine) * sp.num_samples, desc="eval", disable=not progress or rank != 0, leave=False)
    # an item's seed: its index in the whole list, so the same samples on 1 rank or N, with any slots
    outs = generate(model, [prompt_ids(tok, it) for it in mine], sp, group=group,
                    seed=[seed_of(seed, rank + world * i) for i in range(len(mine))],
                    on_done=lambda _: bar.update(), **engine_kw)[0]
    bar.close()
    n = sp.num_samples
    return {it["id"]: [tok.decode(o, skip_special_tokens=True) for o in outs[j * n:(j + 1) * n]]
            for j, it in enumerate(mine)}


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
    k = sum(r["correct"] for r in recs)
    summary = dict(n=len(recs), accuracy=100 * k / n, ci95=[round(x, 2) for x in wilson(k, len(recs))],
                   unanswered=100 * sum(r["extracted"] is None for r in recs) / n)
    if recs and "pass_at_n" in recs[0]:
        summary["pass_at_n"] = 100 * sum(r["pass_at_n"] for r in recs) / n
        summary["majority"] = 100 * sum(r["majority_correct"] for r in recs) / n
    if lenient:
        right = sum(r["correct"] or r.get("lenient") == r["gold"] for r in recs)
        summary["lenient_accuracy"] = 100 * right / n
    return recs, summary


def macro_average(summaries):
    accs = [s["accuracy"] for s in summaries.values() if s["n"] > 0]
    return sum(accs) / len(accs) if accs else float("nan")


def macro_summary(recs, summaries):
    """The macro average over the nine benchmarks scored (or every set, if none of the nine), with its 95 %
    bootstrap interval (each benchmark's items resampled)."""
    names = [n for n in BENCHMARKS if n in summaries] or list(summaries)
    correct = {n: [r["correct"] for r in recs if r["benchmark"] == n] for n in names}
    correct = {n: c for n, c in correct.items() if c}
    return dict(accuracy=macro_average({n: summaries[n] for n in correct}), benchmarks=len(correct),
                ci95=[round(x, 2) for x in macro_ci(correct)] if correct else None)


def with_ci(value, ci):
    return f"{value:.2f} ({ci[0]:.1f}-{ci[1]:.1f})" if ci else f"{value:.2f}"


def results_table(summaries, label="ours", macro=None):
    """Markdown: the nine benchmarks in Table 3's order with the paper's rows (each accuracy with its 95 %
    interval), then any other sets."""
    names = list(BENCHMARKS)
    lines = ["| model | " + " | ".join(BENCHMARKS[n][0] for n in names) + " | Avg. |",
             "|---" * (len(names) + 2) + "|"]
    if any(n in summaries for n in names):
        mark = lambda n: " †" if summaries[n].get("not_comparable") else ""   # noqa: E731
        cells = [with_ci(summaries[n]["accuracy"], summaries[n].get("ci95")) + mark(n) if n in summaries
                 else "-" for n in names]
        nine = {n: summaries[n] for n in names if n in summaries}
        avg = with_ci(macro_average(nine), macro and macro.get("ci95"))
        avg += " †" if any(mark(n) for n in nine) or len(nine) < len(names) else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {avg} |")
    for row, vals in PAPER_ROWS.items():
        lines.append(f"| {row} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    for n in names:
        if n in summaries and summaries[n].get("not_comparable"):
            why = summaries[n]["not_comparable"]
            lines.append(f"\n† {BENCHMARKS[n][0]}: not comparable with the paper's rows: {why}")
    lines.append("\n(95 % intervals: Wilson per benchmark, a bootstrap over items for the average)\n")
    lines.append("| benchmark | n | accuracy | 95 % interval | unanswered | extra |")
    lines.append("|---|---|---|---|---|---|")
    for n, s in summaries.items():
        extra = ", ".join(f"{k} {v:.2f}" for k, v in s.items()
                          if isinstance(v, float) and k not in ("accuracy", "unanswered"))
        ci = s.get("ci95") or [float("nan")] * 2
        lines.append(f"| {n} | {s['n']} | {s['accuracy']:.2f} | {ci[0]:.1f}-{ci[1]:.1f} | "
                     f"{s['unanswered']:.2f} | {extra} |")
    avg = with_ci(macro["accuracy"], macro["ci95"]) if macro else f"{macro_average(summaries):.2f}"
    lines.append(f"\nmacro average over {macro['benchmarks'] if macro else len(summaries)} set(s): {avg}")
    return "\n".join(lines)


def write_outputs(out_dir, recs, summaries, label):
    """responses.jsonl, results.md and results.json, replaced together: each is written whole beside its
    place first; then the old results.json (what marks a folder's results complete) goes, the new files are
    renamed in, results.json last. A kill leaves the old set, or new files without results.json, which the
    next run treats as unfinished. A failed write (a full disk) leaves no temporary file behind."""
    os.makedirs(out_dir, exist_ok=True)
    macro = macro_summary(recs, summaries)
    table = results_table(summaries, label, macro)
    texts = [("responses.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)),
             ("results.md", table),
             ("results.json", json.dumps(dict(summaries, macro_average=macro), indent=2))]
    tmps = [os.path.join(out_dir, name + ".tmp") for name, _ in texts]
    try:
        for tmp, (_, text) in zip(tmps, texts):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
    except OSError as e:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise OSError(f"{out_dir}: could not write the results ({e.strerror or e}); nothing was replaced") \
            from None
    if os.path.exists(os.path.join(out_dir, "results.json")):
        os.remove(os.path.join(out_dir, "results.json"))
    for tmp, (name, _) in zip(tmps, texts):
        os.replace(tmp, os.path.join(out_dir, name))
    return table


def report(out, recs, summaries, label):
    """Write the outputs and print the table (rank 0)."""
    print(write_outputs(out, recs, summaries, label))
    print(f"wrote {out}/responses.jsonl and {out}/results.md")


def evaluate_model(model, tok, benches, args, ranks):
    """benches: {name: items}. Returns (records, summaries) on every rank (responses gathered)."""
    import torch.distributed as dist
    from model import SamplingParams
    recs, summaries = [], {}
    world = ranks[1]
    sp = SamplingParams(args.max_new_tokens, args.temperature, num_samples=args.n_samples)
    for name, items in benches.items():
        responses = run_items(model, tok, items, sp, args.seed, ranks, slots=args.gen_slots,
                              cuda_graph=args.cuda_graph and next(model.parameters()).is_cuda)
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, responses)
            responses = {k: v for p in parts for k, v in p.items()}
        r, s = score_items(items, responses, name, args.lenient)
        recs += r
        summaries[name] = s
    return recs, summaries


# -----------------------------------------------------------------------------
# option order: multiple-choice accuracy moves with the position of the options; ask each item K times


def permuted(items, k, seed=0):
    """Each item K times, its options in K seeded orders (the gold letter follows its option's text); ids
    become id#pJ, and base_id / perm say which item and which order."""
    out = []
    for it in items:
        letters = list(it["options"])
        for j in range(k):
            order = letters[:]
            random.Random(f"{seed}/{j}/{it['id']}").shuffle(order)
            options = {LETTERS[i]: it["options"][L] for i, L in enumerate(order)}
            answer = LETTERS[order.index(it["answer"])]
            out.append(dict(it, id=f"{it['id']}#p{j}", options=options, answer=answer, base_id=it["id"],
                            perm=j))
    return out


def shuffle_stats(items, recs, k):
    """Accuracy under each order, its spread, and consistency: the share of items whose chosen option (its
    text; no answer counts as one choice) is the same under every order."""
    by_id = {it["id"]: it for it in items}
    right, asked, chosen = [0] * k, [0] * k, {}
    for r in recs:
        it = by_id.get(r["id"])
        if it is None or "perm" not in it:
            continue
        right[it["perm"]] += r["correct"]
        asked[it["perm"]] += 1
        choice = canon(it["options"][r["extracted"]]) if r["extracted"] else None
        chosen.setdefault(it["base_id"], set()).add(choice)
    per = [100 * a / max(1, n) for a, n in zip(right, asked)]
    mean = sum(per) / k
    return dict(orders=k, accuracy_per_order=[round(p, 2) for p in per], accuracy_spread=max(per) - min(per),
                accuracy_sd=math.sqrt(sum((p - mean) ** 2 for p in per) / k),
                consistency=100 * sum(len(c) == 1 for c in chosen.values()) / max(1, len(chosen)))


def compare(dir_a, dir_b):
    """Two evaluations of the same items (their responses.jsonl): per benchmark, each accuracy, B - A with its
    95 % paired-bootstrap interval, and McNemar's exact test on the items only one of them got right."""
    def load(d):
        out = {}
        for _, r in jsonl_rows(os.path.join(d, "responses.jsonl")):
            out.setdefault(r["benchmark"], {})[r["id"]] = bool(r["correct"])
        return out
    a, b = load(dir_a), load(dir_b)
    lines = [f"A = {dir_a}, B = {dir_b}", "", "| benchmark | items in both | A (%) | B (%) | "
             "B - A (points) [95 % CI] | only A right | only B right | McNemar p |",
             "|---|---|---|---|---|---|---|---|"]
    for bench in [n for n in a if n in b]:
        ids = [i for i in a[bench] if i in b[bench]]
        if not ids:
            continue
        x, y = [a[bench][i] for i in ids], [b[bench][i] for i in ids]
        d, (lo, hi) = paired_diff_ci(x, y)
        only_a, only_b = sum(p and not q for p, q in zip(x, y)), sum(q and not p for p, q in zip(x, y))
        lines.append(f"| {bench} | {len(ids)} | {100 * sum(x) / len(x):.2f} | {100 * sum(y) / len(y):.2f} | "
                     f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}] | {only_a} | {only_b} | "
                     f"{mcnemar(only_a, only_b):.3g} |")
    return "\n".join(lines)


STAGES = [("base", "Base"), ("sft", "+CoT cold start"), ("grpo_stage1", "+RL stage 1"),
          ("grpo_stage2", "+RL stage 2")]


def stage_tables(run_dir, base_label="random init"):
    """The stage table of every benchmark the runs were evaluated on (kg first), one section each."""
    import glob
    names = []
    for p in sorted(glob.glob(os.path.join(run_dir, "seed*", "eval_*", "results.json"))):
        with open(p) as f:
            names += [n for n in json.load(f) if n != "macro_average" and n not in names]
    names.sort(key=lambda n: n != "kg")
    parts, means = [], {}
    for n in names:
        text, means[n] = stage_table(run_dir, n, base_label)
        parts.append(text if len(names) == 1 else f"### {n}\n\n{text}")
    return "\n\n".join(parts), means


def stage_table(run_dir, bench="kg", base_label="random init"):
    """Table 4 in miniature: accuracy per stage, mean +- std over the seed*/ runs of run.sh; each RL stage's
    gain over the cold start of the same seed, and each stage's gain over the previous stage, with 95 % paired-
    bootstrap intervals, pooled (the seeds' mean gain, the test items resampled: an interval over items, not
    over seeds) and per seed. The seeds share the test items, so a paired gain is the comparison that the
    seed-to-seed spread does not swamp. Without per-item answers (responses.jsonl) the gain over the cold
    start is the mean +- std of the seeds' differences."""
    import glob
    import statistics
    seeds = sorted(glob.glob(os.path.join(run_dir, "seed*")))
    lenient = any("lenient_accuracy" in json.load(open(p)).get(bench, {})
                  for p in glob.glob(os.path.join(run_dir, "seed*", "eval_*", "results.json")))
    rows = ["| stage | accuracy (%) mean +- std | per seed | gain over cold start, same seed [95 % CI] "
            "(per seed) | gain over the previous stage [95 % CI] (per seed) | unanswered (%) |"
            + (" lenient accuracy (%) |" if lenient else ""), "|---" * (7 if lenient else 6) + "|"]
    acc, correct, means, prev = {}, {}, {}, None   # (stage, seed dir) -> accuracy / {item id: 0 or 1}

    def mean_sd(xs):
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    def paired(ref, key):
        """key's answers minus ref's on the items both have: pooled [CI] (per seed [CI]), or None."""
        both = [sd for sd in seeds if (ref, sd) in correct and (key, sd) in correct]
        diffs = {sd: {i: c - correct[ref, sd][i] for i, c in correct[key, sd].items() if i in correct[ref, sd]}
                 for sd in both}
        if not diffs:
            return None
        per_seed = []
        for sd, d in diffs.items():
            # resampling seeded by the run's seed number: a seed's interval whatever seeds sit beside it
            j = int("".join(c for c in os.path.basename(sd) if c.isdigit()) or 0)
            lo, hi = percentile_ci(bootstrap_means(list(d.values()), seed=j))
            per_seed.append(f"{100 * sum(d.values()) / len(d):+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]")
        first, *rest = diffs.values()
        pooled = [sum(d[i] for d in diffs.values()) / len(diffs) for i in first if all(i in d for d in rest)]
        lo, hi = percentile_ci(bootstrap_means(pooled))
        return (f"{100 * sum(pooled) / len(pooled):+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] "
                f"({'; '.join(per_seed)})")

    for key, label in STAGES:
        label = f"{label} ({base_label})" if key == "base" else label
        accs, unans, gains, lens = [], [], [], []
        for sd in seeds:
            p = os.path.join(sd, f"eval_{key}", "results.json")
            if os.path.exists(p) and bench in json.load(open(p)):
                r = json.load(open(p))[bench]
                lens.append(r.get("lenient_accuracy", float("nan")))
                acc[key, sd] = r["accuracy"]
                accs.append(r["accuracy"])
                unans.append(r["unanswered"])
                if key not in ("base", "sft") and ("sft", sd) in acc:
                    gains.append(r["accuracy"] - acc["sft", sd])
                resp = os.path.join(sd, f"eval_{key}", "responses.jsonl")
                if os.path.exists(resp):
                    correct[key, sd] = {r["id"]: int(r["correct"]) for _, r in jsonl_rows(resp)
                                        if r["benchmark"] == bench}
        if not accs:
            continue
        means[key] = mean_sd(accs)
        gain = (paired("sft", key) if key not in ("base", "sft") else None) or "-"
        if gain == "-" and gains:
            gain = "{:+.1f} +- {:.1f} ({})".format(*mean_sd(gains), ", ".join(f"{g:+.1f}" for g in gains))
        step = (paired(prev, key) if prev else None) or "-"
        per = ", ".join(f"{a:.1f}" for a in accs)
        rows.append(f"| {label} | {means[key][0]:.1f} +- {means[key][1]:.1f} | {per} | {gain} | {step} | "
                    f"{statistics.mean(unans):.1f} |" + (f" {statistics.mean(lens):.1f} |" if lenient else ""))
        prev = key
    return "\n".join(rows), means


def read_responses(path):
    """A saved responses JSONL -> ({benchmark: {id: [responses]}}, rows read, repeated (benchmark, id))."""
    saved, repeated, n = {}, [], 0
    for i, r in enumerate(read_records(path)):
        n += 1
        if "benchmark" not in r or "id" not in r or "response" not in r:
            sys.exit(f"{path}:{i + 1}: needs fields benchmark, id, response")
        resps = r.get("responses") or [r["response"]]
        if not isinstance(resps, list) or not all(isinstance(x, str) for x in resps):
            sys.exit(f"{path}:{i + 1}: field 'response' must be a string ('responses' a list of strings), "
                     f"got {type(r['response']).__name__}")
        key = (str(r["benchmark"]), str(r["id"]))
        if key[1] in saved.get(key[0], {}):
            repeated.append(key)
        saved.setdefault(key[0], {})[key[1]] = resps
    return saved, n, repeated


def rescore(path, asked, lenient):
    """--responses: score the saved rows against the asked benchmarks' items. Every row is scored or named in
    one summary line (benchmark not asked, id not among its items, repeated id); none scored is an error."""
    saved, n, repeated = read_responses(path)
    recs, summaries, left = [], {}, []
    for bench, rows in saved.items():
        if bench not in asked:
            left += [f"{bench}:{i} (benchmark not asked)" for i in rows]
            continue
        known = {str(it["id"]) for it in asked[bench]}
        left += [f"{bench}:{i} (no such item)" for i in rows if i not in known]
        rr, s = score_items(asked[bench], rows, bench, lenient)
        if rr:
            recs += rr
            summaries[bench] = s
    left += [f"{b}:{i} (repeated: the last kept)" for b, i in repeated]
    if not recs:
        sys.exit(f"{path}: none of its {n} rows matches an item of {', '.join(asked)} (first: "
                 f"{', '.join(left[:3])}); check --benchmarks / --file")
    if left:
        print(f"warning: {path}: {len(left)} of {n} rows not scored: {', '.join(left[:5])}"
              f"{', ...' if len(left) > 5 else ''}")
    return recs, summaries


def refuse_earlier_results(outs, overwrite):
    """An --out folder whose results are complete (results.json) is replaced only with --overwrite; one that a
    killed run left unfinished (responses without results.json) is replaced, with a line saying so."""
    for out in outs:
        held = [f for f in ("results.json", "results.md", "responses.jsonl")
                if os.path.exists(os.path.join(out, f))]
        if "results.json" in held and not overwrite:
            sys.exit(f"{out} already holds results ({', '.join(held)}): --overwrite replaces them, or pick "
                     "another --out")
        if held and "results.json" not in held:
            print(f"{out}: an unfinished evaluation ({', '.join(held)} without results.json) is replaced")


def parser():
    ap = Parser(description=__doc__)
    # --- what to evaluate
    ap.add_argument("--model", nargs="+", default=None, help="HF-layout checkpoint "
                    "directory (ours or a real Qwen); several: each in turn in this one launch, with one "
                    "--out and one --label each")
    ap.add_argument("--benchmarks", default=None, help="comma list (default: the nine, or with --file only "
                    "the files named); the nine: " + ",".join(BENCHMARKS) + "; any other name needs --file")
    ap.add_argument("--data-dir", default=None, help="folder of local files named "
                    "{benchmark}.jsonl/.json/.parquet/.csv")
    ap.add_argument("--file", action="append", default=[], type=name_path, help="NAME=PATH for one benchmark "
                    "(repeatable)")
    ap.add_argument("--limit", type=at_least(1), default=None, help="first N items per "
                    "benchmark (quick runs)")
    ap.add_argument("--responses", default=None, help="re-score a saved responses JSONL (fields benchmark, "
                    "id, response; items looked up from the benchmarks) without any model")
    # --- generation
    ap.add_argument("--max-new-tokens", type=at_least(1), default=512, help="generation budget per answer")
    ap.add_argument("--gen-slots", "--batch-size", dest="gen_slots", type=at_least(1), default=64,
                    help="rows decoding at once (the rollout engine's slots: their KV cache is slots x "
                    "(prompt + --max-new-tokens)); the whole benchmark is one queue through them")
    ap.add_argument("--tp", type=at_least(1), default=1, help="tensor parallel: groups of N ranks each hold "
                    "1/N of the model (loaded as FSDP shards, then split: tp.py) and answer their ranks' items "
                    "together; 1: every rank holds the whole model")
    ap.add_argument("--temperature", type=at_least(0, float), default=0.0, help="0 = greedy")
    ap.add_argument("--n-samples", type=at_least(1), default=1, help="samples per item: > 1 reports "
                    "pass@n and majority vote")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="weights and compute (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--plain", action="store_true", help="model.py's generate, not "
                    "fast.py's (the same tokens)")
    ap.add_argument("--cuda-graph", action="store_true", help="on CUDA: each decode step one "
                    "CUDA graph replay (4-5x faster generation measured on an H200 by bench/generate.py; "
                    "same tokens); ignored on CPU")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    # --- output
    ap.add_argument("--lenient", action="store_true", help="also report a lenient "
                    "extraction ('the answer is C')")
    ap.add_argument("--out", nargs="+", default=["runs/eval"], help="output folder (responses.jsonl, "
                    "results.md, results.json); one per --model")
    ap.add_argument("--overwrite", action="store_true", help="replace results already in an --out folder")
    ap.add_argument("--label", nargs="+", default=None, help="row label in the table, one per --model "
                    "(default: ours, or each model folder's name)")
    ap.add_argument("--stage-table", default=None, help="print the stage table of a run.sh "
                    "folder (seed*/eval_*) and exit")
    ap.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"), help="two evaluation folders of "
                    "the same items: per benchmark, B - A with a paired-bootstrap 95 %% interval and "
                    "McNemar's test; then exit")
    ap.add_argument("--shuffle-options", type=at_least(1), default=None, metavar="K", help="ask each item K "
                    "times, its options in K seeded orders: mean accuracy, its spread, and how often the "
                    "chosen option is the same")
    ap.add_argument("--base-label", default="random init", help="--stage-table: what the Base row's model is")
    return ap


def name_path(text):
    """--file NAME=PATH, the file there."""
    name, eq, path = text.partition("=")
    if not (eq and name and path):
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path}: no such file")
    return name, path


def print_stage_table(run_dir, base_label):
    if not os.path.isdir(run_dir):
        sys.exit(f"{run_dir}: no such folder (--stage-table takes the folder run.sh wrote)")
    text, means = stage_tables(run_dir, base_label)
    if not means:
        sys.exit(f"{run_dir}: no seed*/eval_*/results.json in it: nothing to tabulate")
    with open(os.path.join(run_dir, "stage_table.md.tmp"), "w") as f:
        f.write(text + "\n")
    os.replace(os.path.join(run_dir, "stage_table.md.tmp"), os.path.join(run_dir, "stage_table.md"))
    print(text)


def load_asked(args):
    """The benchmarks to ask ({name: items}; --shuffle-options: each item in K orders) and, per benchmark, why
    it cannot stand beside the paper's column. --file alone asks only the files it names."""
    files = dict(args.file)
    names = args.benchmarks.split(",") if args.benchmarks else ([] if files else list(BENCHMARKS))
    names = [n for n in names if n] + [n for n in files if n not in names]
    benches, notes = {}, {}
    for n in names:
        items = load_benchmark(n, files.get(n), args.data_dir, args.limit)
        if items:
            benches[n] = items
            notes[n] = "; ".join(comparability(n, items, args.limit))
            if notes[n]:
                print(f"warning: {n}: {notes[n]}: not comparable with the paper's rows (marked †)")
    if not benches:
        sys.exit(f"no benchmark could be loaded: {', '.join(names)} (the [skip] lines above say why)")
    if args.shuffle_options:
        return {n: permuted(items, args.shuffle_options, args.seed) for n, items in benches.items()}, notes
    return benches, notes


def annotate(summaries, recs, notes, asked, k):
    """The comparability notes, and with --shuffle-options K the option-order statistics."""
    for n in summaries:
        if notes.get(n):
            summaries[n] = dict(summaries[n], not_comparable=notes[n])
        if k:
            summaries[n] = dict(summaries[n], **shuffle_stats(asked[n], recs, k))
    return summaries


def run_models(args, asked, notes):
    """Each --model in turn over the asked items (one launch: torch, tokenizers and the process group start
    once), its results written to its --out."""
    names = [os.path.basename(os.path.normpath(m)) for m in args.model]
    labels = args.label or (["ours"] if len(args.model) == 1 else names)
    if not len(args.model) == len(args.out) == len(labels):
        sys.exit(f"--model has {len(args.model)} paths: give as many --out folders ({len(args.out)}) and "
                 f"--label names ({len(labels)})")
    import torch
    from common import close_distributed, init_distributed
    import fast
    from hf_io import load_model, load_tokenizer, read_config
    import tp
    fast.ON = not args.plain
    rank, world, device = init_distributed(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    for path in args.model:
        problem = args.tp > 1 and tp.degree_problem(read_config(path), args.tp, world, "--tp")
        if problem:
            sys.exit(f"{path}: {problem}")
    group = tp.Group(args.tp, world, rank) if args.tp > 1 else None
    for path, out, label in zip(args.model, args.out, labels):
        tok = load_tokenizer(path)
        if group is None:
            model = load_model(path, device=device, dtype=dtype).eval()
        else:   # each rank reads its FSDP rows, then the group redistributes them into its TP shards
            from fsdp import load_sharded
            model = tp.build(load_sharded(path, device, world, dtype=dtype, frozen=True), group)
        recs, summaries = evaluate_model(model, tok, asked, args, (rank, world, group))
        if rank == 0:
            report(out, recs, annotate(summaries, recs, notes, asked, args.shuffle_options), label)
    close_distributed()


def main(argv=None):
    args = parser().parse_args(argv)
    if args.compare:
        print(compare(*args.compare))
        return
    if args.stage_table:
        return print_stage_table(args.stage_table, args.base_label)
    refuse_earlier_results(args.out, args.overwrite)
    asked, notes = load_asked(args)
    if args.responses:
        recs, summaries = rescore(args.responses, asked, args.lenient)
        report(args.out[0], recs, annotate(summaries, recs, notes, asked, args.shuffle_options),
               (args.label or ["ours"])[0])
    elif not args.model:
        sys.exit("give --model (or --responses to re-score)")
    else:
        run_models(args, asked, notes)


if __name__ == "__main__":
    guard(main)

"""
mcq.py: the multiple-choice contract that data preparation, training and evaluation share: the prompt, the
strict answer parser (the GRPO reward reads answers with it), the format check, and the readers and
converters that bring each benchmark's upstream rows to one schema: {id, question, options {letter: text},
answer (a letter), context?}.

    from mcq import build_messages, extract_answer
    extract_answer("<think>...</think><answer>C</answer>", {"A": "x", "B": "y", "C": "z"})   # -> "C"
"""
import json
import os
import re
import unicodedata

LETTERS = "ABCDEFGHIJKLMNOPQRSTU"

# -----------------------------------------------------------------------------
# one prompt format, shared with training

SYSTEM_PROMPT = "You are a medical expert. Reason step by step, then give the final answer."
# the answer contract: the option's text, as given (small models name the right option's text far more often
# than its letter: EXPERIMENTS.md, 2026-12-07); the parser takes a letter too, for models that write one
INSTRUCTION = "Think it through, then write the correct option, exactly as it is given, in <answer></answer>."


def build_messages(item):
    """item: {question, options {letter: text}, optional context} -> chat messages (system + user)."""
    parts = []
    if item.get("context"):
        parts.append(f"Context: {item['context']}")
    parts.append(item["question"].strip())
    parts.append("\n".join(f"{L}. {t}" for L, t in item["options"].items()))
    parts.append(INSTRUCTION)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n\n".join(parts)}]


def chat_ids(tok, messages, generation_prompt=True):
    """The token ids of a conversation in the tokenizer's chat template (transformers 4 returns a list, 5 a
    BatchEncoding)."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def prompt_ids(tok, item):
    return chat_ids(tok, build_messages(item))


# -----------------------------------------------------------------------------
# strict answer extraction (also the GRPO reward's parser)

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_PREFIX = re.compile(r"^(the\s+)?(final\s+)?(answer|option|choice|答案|选项)\s*(is)?\s*[:：是为]?\s*",
                     re.IGNORECASE)


_EDGES = "*_`'\" \t\r\n.。!,;，；:："


def canon(text):
    """The form option texts and answers are compared in, the same on both sides: NFKC (full-width letters and
    punctuation to ASCII), case and runs of spaces folded, quotes, markup and end punctuation trimmed from the
    ends (public options can end in a stray quote or newline: 'A. "Tell me more."')."""
    return " ".join(unicodedata.normalize("NFKC", str(text)).lower().split()).strip(_EDGES)


def parse_answer_content(content, options):
    """The inside of one <answer> tag -> a letter, or None (empty, several letters, ambiguous text)."""
    valid = list(options)
    texts = {L: canon(t) for L, t in options.items()}

    def by_text(text):   # the letter whose option text this is, if exactly one
        hits = [L for L in valid if texts[L] == canon(text)]
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
        return L if L in valid and canon(m.group(2)) == texts[L] else None
    return by_text(s)   # the text of exactly one option


def extract_answer(response, options, lenient=False):
    """Strict: the last well-formed <answer> tag holding one option letter or one exact option text.
    lenient: if that fails, what a reader would take as the answer (lenient_answer; reported separately,
    never mixed in)."""
    tags = ANSWER_TAG.findall(response)
    got = parse_answer_content(tags[-1], options) if tags else None
    return got if got or not lenient else lenient_answer(response, options, tags)


def lenient_answer(response, options, tags):
    """The option a reader would take as meant: the tag's content naming exactly one option's text inside it
    (or inside that text: a shortened option); with no tag, 'the answer is C' or 'the answer is <text>'."""
    def one_option(text):
        where = canon(text)
        hits = [L for L, t in options.items()
                if canon(t) and (canon(t) in where or (len(where) >= 4 and where in canon(t)))]
        return hits[0] if len(hits) == 1 else None

    if tags:
        return one_option(tags[-1])
    said = re.findall(r"answer\s+is\s*:?\s*(.+)", unicodedata.normalize("NFKC", response), re.I)
    if not said:
        return None
    m = re.match(r"(?:\(([A-Za-z])\)|([A-Z]))(?![A-Za-z])", said[-1].strip())   # C, (C), (c); not "a bit"
    if m and (m.group(1) or m.group(2)).upper() in options:
        return (m.group(1) or m.group(2)).upper()
    return one_option(said[-1].splitlines()[0])


def format_ok(response, require_think=False):
    """Exactly one <answer>...</answer>, nothing after it but whitespace / end token; optional <think> block
    first."""
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
    return {LETTERS[i]: None if t is None else str(t) for i, t in enumerate(opts)}


def _options(x):
    """Options as {letter: text}, or as a list (lettered A, B, ... in order)."""
    if isinstance(x, dict):
        return dict(x)
    if isinstance(x, (list, tuple)):
        return _letters(x)
    raise TypeError(f"'options' must be an object or a list, got {type(x).__name__}")


def _strip_listed_options(q):
    # MedXpertQA's question text can end with "Answer Choices: (A) ... (B) ...": printed once, by us
    return re.split(r"\n?\s*Answer Choices:\s*\(A\)", q, maxsplit=1)[0].rstrip()


def conv_medqa(r, i):
    return dict(id=r.get("id", i), question=r["question"], options=_options(r["options"]),
                answer=r["answer_idx"])


def conv_medxpertqa(r, i):
    return dict(id=r.get("id", i), question=_strip_listed_options(r["question"]),
                options=_options(r["options"]),
                answer=r["label"])


def conv_medmcqa(r, i):
    return dict(id=r.get("id", i), question=r["question"],
                options=_letters([r["opa"], r["opb"], r["opc"], r["opd"]]),
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
    return dict(id=r.get("id", i), question=r["question"], options=_options(r["options"]),
                answer=str(ans).strip())


def conv_pubmedqa(r, i):
    """The hub's rows (question, context {contexts}, long_answer) or the authors' ori_pqal.json (QUESTION,
    CONTEXTS, LONG_ANSWER, keyed by PubMed id)."""
    if "QUESTION" in r:
        q, ctx, why = r["QUESTION"], r["CONTEXTS"], r.get("LONG_ANSWER")
    else:
        q, why = r["question"], r.get("long_answer")
        ctx = r["context"]["contexts"] if isinstance(r["context"], dict) else r["context"]
    return dict(id=r.get("pubid", r.get("id", i)), question=q, context=" ".join(ctx),
                options={"A": "yes", "B": "no", "C": "maybe"}, rationale=why,
                answer="ABC"[["yes", "no", "maybe"].index(r["final_decision"])])


def official_test_ids(path):
    """PubMedQA's expert-labelled set as its authors ship it: ori_pqal.json with test_ground_truth.json beside
    it, whose 500 ids are the test split. Those ids, or None for any other file."""
    gt = os.path.join(os.path.dirname(path), "test_ground_truth.json")
    if os.path.basename(path) != "ori_pqal.json" or not os.path.exists(gt):
        return None
    with open(gt, encoding="utf-8") as f:
        return set(json.load(f))


def conv_medbullets(r, i):
    if "options" in r:
        opts = _options(r["options"])
    else:
        opts = _letters([r[k] for k in ("opa", "opb", "opc", "opd", "ope") if r.get(k)])
    return dict(id=r.get("id", i), question=r["question"], options=opts, answer=r["answer_idx"])


def conv_ours(r, i):   # make_data.py's schema
    return dict(id=r["id"], question=r["question"], options=_options(r["options"]), answer=r["answer"],
                context=r.get("context"))


# -----------------------------------------------------------------------------
# reading files


def read_records(path):
    """JSONL / JSON list / Parquet / CSV rows as dicts; errors name the file and line."""
    if path.endswith(".parquet") or path.endswith(".csv"):
        import datasets
        kind = "parquet" if path.endswith(".parquet") else "csv"
        return list(datasets.load_dataset(kind, data_files=path, split="train"))
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not a UTF-8 JSON file ({type(e).__name__})") from None
        if isinstance(data, dict):   # {id: row} (PubMedQA's ori_pqal.json): the key is the row's id
            return [dict(v, id=v.get("id", k)) if isinstance(v, dict) else v for k, v in data.items()]
        return data
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


def item_problem(it):
    """Why a converted item cannot be asked (a field and what is wrong with it), or None."""
    opts = it["options"]
    if not isinstance(it["question"], str) or not it["question"].strip():
        return "field 'question' is empty"
    if not isinstance(opts, dict) or not 2 <= len(opts) <= len(LETTERS):
        n = len(opts) if isinstance(opts, dict) else repr(opts)
        return f"field 'options': {n} options (2 to {len(LETTERS)})"
    if list(opts) != list(LETTERS[:len(opts)]):
        return f"field 'options': letters {list(opts)}, not {LETTERS[0]}..{LETTERS[len(opts) - 1]} in order"
    empty = [L for L, t in opts.items() if t is None or not str(t).strip()]
    if empty:
        return f"field 'options': option {empty[0]} is empty"
    if it["answer"] not in opts:
        return f"field 'answer': {it['answer']!r} is not one of the options {list(opts)}"
    return None


def convert(rows, conv, path, row_filter=None):
    """Upstream rows -> items, each checked (item_problem); a repeated id is refused: answers are keyed by
    it."""
    items, seen = [], {}
    for i, r in enumerate(rows):
        if row_filter and r.get(row_filter[0]) != row_filter[1]:
            continue
        try:
            it = conv(r, i)
        except (KeyError, ValueError, IndexError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}:{i + 1}: bad record, field {e}") from None
        if it is None:
            continue
        why = item_problem(it)
        if why:
            raise ValueError(f"{path}:{i + 1}: {why}")
        it["id"], it["options"] = str(it["id"]), {L: str(t) for L, t in it["options"].items()}
        if it["id"] in seen:
            raise ValueError(f"{path}:{i + 1}: field 'id': {it['id']!r} repeats record {seen[it['id']]} "
                             f"(answers are kept by id)")
        seen[it["id"]] = i + 1
        items.append(it)
    return items
